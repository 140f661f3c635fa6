"""The official PyTorch Vim / Mamba-Reg / ShuffleMamba weights (SPEC §5): names, layouts, files.

One rule per kind of tensor maps an official name and layout to ours, and back:

  patch_embed.proj.weight (D, 3, p, p)    <-> patch_embed.kernel (p, p, 3, D)
  cls_token, pos_embed, pos_embed_cls (1, n, D) <-> the same names, (n, D)
  <norm*>.weight                          <-> <norm*>.scale
  <conv1d*>.weight (E, 1, k)              <-> <conv1d*>.kernel (k, E)
  <any other>.weight (out, in)            <-> <any other>.kernel (in, out)
  patch_embed.proj.bias                   <-> patch_embed.bias; everything else as it is.

The detection / segmentation adapter (`models.adapter.VimAdapter`, the official `Mamba_Adapter`)
adds, with the same names on both sides:

  <query|feat|ffn>_norm.weight            <-> <..>_norm.scale (LayerNorms)
  spm.*, ffn.dwconv.dwconv .weight (O, I, kh, kw) <-> .kernel (kh, kw, I, O)  convolutions
  up.weight (I, O, 2, 2) (ConvTranspose2d) <-> up.kernel (2, 2, I, O)
  BatchNorms (spm.stem.{1,4,7}, spm.conv{2,3,4}.1, norm1..norm4): weight <-> scale, and the
  model state running_mean, running_var <-> mean, var; num_batches_tracked is dropped on import
  and written as int64 0.

Block tensors keep their index (`layers.{i}.mixer.in_proj.kernel`): `params.fill` stacks them and
names every missing, unused and mis-shaped tensor by its official name and shape. Transposes
only, so an import followed by an export gives the same bytes.

State-dict files: `.pth` / `.pt` / `.bin` (needs torch; official files wrap the state dict under
"model"), `.safetensors` (the `safetensors` package's numpy API, no torch) and `.npz`.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import tempfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy
from etils import epath
from flax import nnx

from shufflemamba_jax.models import vim
from shufflemamba_jax.weights import params as params_lib

_log = logging.getLogger(__name__)
# Token parameters: (n, D) here, (1, n, D) in PyTorch.
_TOKENS = ("cls_token", "pos_embed", "pos_embed_cls")
# Wrappers of the state dict in training checkpoints, tried in this order.
_CHECKPOINT_KEYS = ("model", "state_dict", "model_ema", "module")
# (to ours, to official) for each layout.
LAYOUTS = {
  "linear": (np.transpose, np.transpose),
  "conv2d": (lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),
  "conv1d": (lambda x: x[:, 0, :].T, lambda x: x.T[:, None, :]),
  "token": (lambda x: x[0], lambda x: x[None]),
  "conv_transpose": (lambda x: x.transpose(2, 3, 0, 1), lambda x: x.transpose(2, 3, 0, 1)),
  "same": (lambda x: x, lambda x: x),
}
# BatchNorm statistics: official leaf -> ours. They are model state, not parameters.
BATCH_NORM_STATS = {"running_mean": "mean", "running_var": "var"}
NUM_BATCHES_TRACKED = "num_batches_tracked"


# Whole names that are renamed or re-laid out: official -> (ours, layout).
_NAMES = {
  "patch_embed.proj.weight": ("patch_embed.kernel", "conv2d"),
  "patch_embed.proj.bias": ("patch_embed.bias", "same"),
  **{name: (name, "token") for name in _TOKENS},
}


def is_batch_norm(module: list[str]) -> bool:
  """Whether the module path names one of the adapter's BatchNorms (the Vim has none)."""
  if module[:1] == ["spm"]:
    return (
      module[1:2] == ["stem"]
      and module[-1] in ("1", "4", "7")
      or module[1:] in (["conv2", "1"], ["conv3", "1"], ["conv4", "1"])
    )
  return len(module) == 1 and module[0] in ("norm1", "norm2", "norm3", "norm4")


def _weight_rule(module: list[str]) -> tuple[str, str]:
  """(our leaf name, layout) of the official `weight` of the module at path `module`."""
  if module[-1].startswith("norm") or module[-1].endswith("_norm") or is_batch_norm(module):
    return "scale", "same"
  if module[0] == "spm" or module[-1] == "dwconv":
    return "kernel", "conv2d"
  if module == ["up"]:
    return "kernel", "conv_transpose"
  return "kernel", "conv1d" if module[-1].startswith("conv1d") else "linear"


def _rename(name: str, *, to_ours: bool) -> tuple[str, str]:
  """(the other side's name, layout) of an official name (to_ours) or of ours (not to_ours)."""
  names = _NAMES if to_ours else {ours: (official, layout) for official, (ours, layout) in _NAMES.items()}
  if name in names:
    return names[name]
  *module, leaf = name.split(".")
  if module:
    our_leaf, layout = _weight_rule(module)
    if leaf == ("weight" if to_ours else our_leaf):
      return ".".join(module + [our_leaf if to_ours else "weight"]), layout
    stats = BATCH_NORM_STATS if to_ours else {ours: official for official, ours in BATCH_NORM_STATS.items()}
    if leaf in stats and is_batch_norm(module):
      return ".".join(module + [stats[leaf]]), "same"
  return name, "same"


def describe_official(name: str, shape) -> tuple[str, tuple]:
  """(official name, official shape) of our (name, shape): how `params.fill` words its errors."""
  official, layout = _rename(name, to_ours=False)
  return official, LAYOUTS[layout][1](np.empty(shape, np.bool_)).shape


def to_flat(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """An official-named state dict as {our name: array in our layout} (blocks one at a time).

  BatchNorm statistics come out under their state names (`split_state` separates them);
  BatchNorms' `num_batches_tracked` counters are dropped (nothing here reads them).
  """
  flat = {}
  for name, value in state_dict.items():
    *module, leaf = name.split(".")
    if leaf == NUM_BATCHES_TRACKED and module and is_batch_norm(module):
      continue
    ours, layout = _rename(name, to_ours=True)
    flat[ours] = LAYOUTS[layout][0](_to_numpy(value))
  return flat


def split_state(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(parameters, BatchNorm statistics) of a `to_flat` dict, by our leaf names."""
  stats = set(BATCH_NORM_STATS.values())
  state = {name: value for name, value in flat.items() if name.rsplit(".", 1)[-1] in stats}
  return {name: value for name, value in flat.items() if name not in state}, state


def import_params(
  state_dict: Mapping[str, Any],
  config: vim.VisionMambaConfig,
  *,
  source: str,
  resize_positions: bool = False,
  new_head_seed: int | None = None,
) -> dict:
  """Our parameter tree (a nested dict of numpy arrays) for `config` from an official state dict.

  resize_positions: a pos_embed trained on another (square) patch grid is resized bicubically to
    config's; without it, that is an error. Only for patch stride = patch size: the stride-8 Vim
    "+" models cannot be represented.
  new_head_seed: when given and the checkpoint's head has another number of classes, a fresh head
    for config.num_classes is initialized from this seed (SPEC §2: normal 0.02, zero bias).
  Raises a ValueError naming every missing, unused and mis-shaped tensor (`params.fill`).
  """
  target = params_lib.param_tree(params_lib.abstract_model(config))
  if new_head_seed is not None:
    target["head"] = params_lib.param_tree(vim.classification_head(config, nnx.Rngs(new_head_seed)))
  flat = params_lib.adapt(
    to_flat(state_dict),
    target,
    config,
    source=source,
    resize_positions=resize_positions,
    new_head=new_head_seed is not None,
  )
  return params_lib.fill(target, flat, source=source, describe=describe_official)


def export_state_dict(params: Mapping, model_state: Mapping | None = None) -> dict[str, np.ndarray]:
  """Our parameters (a nested dict) and, for the adapter, its BatchNorm statistics (nested) as
  an official-named state dict of numpy arrays (with PyTorch's int64 `num_batches_tracked`)."""
  state_dict = {}
  for name in params_lib.flatten(model_state or {}):
    module = name.split(".")[:-1]
    state_dict[".".join(module + [NUM_BATCHES_TRACKED])] = np.zeros((), np.int64)
  for name, value in {**params_lib.flatten(params), **params_lib.flatten(model_state or {})}.items():
    value = np.asarray(value)
    blocks = (
      [(f"{vim.LAYERS}.{i}.{name[len(vim.LAYERS) + 1 :]}", value[i]) for i in range(value.shape[0])]
      if name.startswith(vim.LAYERS + ".")
      else [(name, value)]
    )
    for block_name, block_value in blocks:
      official, layout = _rename(block_name, to_ours=False)
      state_dict[official] = np.ascontiguousarray(LAYOUTS[layout][1](block_value))
  return state_dict


def _to_numpy(value) -> np.ndarray:
  """A numpy array for a numpy, JAX or torch array (torch bfloat16 becomes ml_dtypes.bfloat16)."""
  if type(value).__module__.startswith("torch"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      import torch  # pylint: disable=g-import-not-at-top

      return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)


def _unwrap(checkpoint: Mapping, path: str, checkpoint_key: str | None) -> Mapping:
  """The state dict inside a training checkpoint ({"model": ...} and similar)."""
  if checkpoint_key is not None:
    if checkpoint_key not in checkpoint:
      raise KeyError(f"{path} has no entry {checkpoint_key!r}; its entries: {sorted(checkpoint)}")
    return checkpoint[checkpoint_key]
  for key in _CHECKPOINT_KEYS:
    if isinstance(checkpoint.get(key), Mapping):
      _log.info("Using the state dict under %r in %s.", key, path)
      return checkpoint[key]
  return checkpoint


def _torch_load(path: str, allow_pickle: bool):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f"reading {path} needs PyTorch (pip install torch); or convert it to .safetensors or .npz elsewhere"
    ) from e
  with epath.Path(path).open("rb") as f:
    if allow_pickle:
      return torch.load(f, map_location="cpu", weights_only=False)
    # Training checkpoints also hold their argparse arguments and numpy scalars (accuracies):
    # plain data, allowed here; anything else needs the caller's trust.
    plain_data = [argparse.Namespace, np.dtype, np._core.multiarray.scalar] + [
      getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")
    ]
    with torch.serialization.safe_globals(plain_data):
      try:
        return torch.load(f, map_location="cpu", weights_only=True)
      except pickle.UnpicklingError as e:
        raise ValueError(
          f"{path} holds objects beyond tensors and plain data; if you trust the "
          f"file, pass --allow-pickle (allow_pickle=True). torch said: {e}"
        ) from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  # The safetensors numpy API reads bfloat16 from a file but not from bytes: remote files are
  # read through a local copy.
  if "://" not in path:
    return safetensors.numpy.load_file(path)
  with tempfile.TemporaryDirectory() as folder:
    local = epath.Path(folder) / "weights.safetensors"
    local.write_bytes(epath.Path(path).read_bytes())
    return safetensors.numpy.load_file(local)


def read_state_dict(
  path: str, *, checkpoint_key: str | None = None, allow_pickle: bool = False
) -> dict[str, np.ndarray]:
  """Reads an official-named state dict from .pth/.pt/.bin, .safetensors or .npz as numpy arrays.

  Training checkpoints that wrap the state dict ("model", "state_dict", "model_ema", "module",
  or `checkpoint_key`) are unwrapped and a DataParallel "module." prefix is stripped. `.pth` files
  are read with torch's weights_only loader (argparse.Namespace and numpy scalars allowed, as
  training checkpoints hold them); `allow_pickle` runs the full unpickler, for trusted files only.
  """
  if path.endswith(".safetensors"):
    state_dict = _read_safetensors(path)
  elif path.endswith(".npz"):
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as archive:
      state_dict = {name: archive[name] for name in archive.files}
  elif path.endswith((".pth", ".pt", ".bin")):
    state_dict = _unwrap(_torch_load(path, allow_pickle), path, checkpoint_key)
  else:
    raise ValueError(f"{path}: unknown state-dict format; use .pth, .pt, .safetensors or .npz")
  if path.endswith((".safetensors", ".npz")) and checkpoint_key is not None:
    prefix = checkpoint_key + "."
    state_dict = {n[len(prefix) :]: v for n, v in state_dict.items() if n.startswith(prefix)}
  stripped = {}
  for name, value in state_dict.items():
    if not hasattr(value, "shape"):
      raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    stripped[name.removeprefix("module.")] = _to_numpy(value)
  return stripped


def write_state_dict(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes an official-named state dict as .pth ({"model": ...}, like official files),
  .safetensors or .npz, chosen by the file extension."""
  file = epath.Path(path)
  if not path.endswith((".safetensors", ".npz", ".pth", ".pt")):
    raise ValueError(f"{path}: unknown state-dict format; use .pth, .pt, .safetensors or .npz")
  bfloat16 = sorted(n for n, v in state_dict.items() if v.dtype == ml_dtypes.bfloat16)
  if path.endswith(".npz") and bfloat16:  # .npz would store them as opaque 2-byte records
    raise ValueError(
      f"{path}: .npz cannot hold bfloat16 tensors ({', '.join(bfloat16[:3])}, ...); write .safetensors or .pth instead"
    )
  file.parent.mkdir(parents=True, exist_ok=True)
  if path.endswith(".safetensors"):
    file.write_bytes(safetensors.numpy.save(dict(state_dict), metadata={"format": "pt"}))
    return
  with file.open("wb") as f:
    if path.endswith(".npz"):
      np.savez(f, **state_dict)
      return
    import torch  # pylint: disable=g-import-not-at-top

    def tensor(value):
      if value.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
      return torch.from_numpy(np.array(value))

    torch.save({"model": {name: tensor(v) for name, v in state_dict.items()}}, f)

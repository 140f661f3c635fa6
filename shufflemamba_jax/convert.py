"""Imports the official PyTorch Vim / Mamba-Reg / ShuffleMamba weights, and exports ours back.

The official state dicts (SPEC section 5) name one tensor per layer (`layers.{i}.mixer.in_proj.weight`)
and store Linear weights as (out, in), Conv2d as (out, in, kh, kw), the depthwise conv1d as
(channels, 1, width) and tokens with a leading batch axis of 1. Our parameters stack the layers on a
leading axis (the model scans over them) and use Flax layouts, so every tensor is renamed, transposed
and stacked here, and every shape is checked: a checkpoint that does not fit the chosen variant
fails with one error that lists every missing, unused and mis-shaped tensor.

Command line:

  python -m shufflemamba_jax.convert --from-pytorch vim_t_midclstok_76p1acc.pth \
      --variant vim_tiny --out /ckpt/vim_tiny [--img-size 256] [--num-classes 100]
  python -m shufflemamba_jax.convert --to-pytorch /ckpt/vim_tiny --out vim_tiny.safetensors

State-dict files: `.pth` / `.pt` (needs torch; official files wrap the state dict under "model"),
`.safetensors` (read and written here with numpy, the `safetensors` package is not needed) and `.npz`.

Our checkpoint directory (`save_params` / `load_params`) is an Orbax `CheckpointManager` directory
with one step, 0, holding two items:
  - "params": `nnx.state(model, nnx.Param)` as a pure nested dict of arrays (StandardSave), the
    paths of CONTRACT.md (e.g. params["layers"]["mixer"]["in_proj"]["kernel"], (depth, D, 2E));
  - "model_config": JSON {"format": "shufflemamba_jax.params/1", "variant": name,
    "overrides": {create_model keyword overrides}, "config": {every VisionMambaConfig field}}.
`create_model(variant, **overrides)` rebuilds the model the parameters belong to;
`is_params_checkpoint(path)` recognizes such a directory, `load_model(path)` rebuilds the model.

Python API: `from_pytorch_state_dict(state_dict, config) -> params`, `to_pytorch_state_dict(params)`,
`convert_pytorch_checkpoint(path, variant, **overrides) -> model`, `load_state_dict(path)` and
`save_state_dict(path, state_dict)` for the file formats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

PARAMS_FORMAT = "shufflemamba_jax.params/1"
_log = logging.getLogger("shufflemamba_jax.convert")
# Token parameters: (n, D) here, (1, n, D) in PyTorch.
_TOKEN_PARAMS = ("cls_token", "pos_embed", "pos_embed_cls")
# Wrappers of the state dict in training checkpoints, tried in this order.
_CHECKPOINT_KEYS = ("model", "state_dict", "model_ema", "module")

# --------------------------------------------------------------------------------------------------
# Name and layout mapping.
# --------------------------------------------------------------------------------------------------


def _official_name_and_layout(path: str) -> tuple[str, str]:
  """Maps one of our parameter paths (layer axis not expanded) to its official name and layout.

  The layer index is written as "{i}". Layouts: "linear" (transpose), "conv2d" (HWIO <-> OIHW),
  "conv1d" ((width, channels) <-> (channels, 1, width)), "token" (leading axis of 1), "same".
  """
  parts = path.split(".")
  if parts[0] == "layers":
    parts = ["layers", "{i}"] + parts[1:]
  module, leaf = parts[:-1], parts[-1]
  if path == "patch_embed.kernel":
    return "patch_embed.proj.weight", "conv2d"
  if path == "patch_embed.bias":
    return "patch_embed.proj.bias", "same"
  if path in _TOKEN_PARAMS:
    return path, "token"
  if leaf == "scale":
    return ".".join(module + ["weight"]), "same"
  if leaf == "kernel":
    layout = "conv1d" if module[-1].startswith("conv1d") else "linear"
    return ".".join(module + ["weight"]), layout
  return ".".join(parts), "same"


def _to_ours(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return value.T
  if layout == "conv2d":
    return value.transpose(2, 3, 1, 0)
  if layout == "conv1d":
    return value[:, 0, :].T
  if layout == "token":
    return value[0]
  return value


def _to_official(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return value.T
  if layout == "conv2d":
    return value.transpose(3, 2, 0, 1)
  if layout == "conv1d":
    return value.T[:, None, :]
  if layout == "token":
    return value[None]
  return value


def _official_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  return _to_official(np.empty(shape, np.bool_), layout).shape


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _as_pure_dict(params) -> dict:
  if isinstance(params, nnx.State):
    return nnx.to_pure_dict(params)
  return params


def _to_numpy(value) -> np.ndarray:
  """A numpy array for a numpy, JAX or torch array (torch bfloat16 becomes ml_dtypes.bfloat16)."""
  if type(value).__module__.startswith("torch"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      import ml_dtypes  # a JAX dependency
      import torch
      return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)


# --------------------------------------------------------------------------------------------------
# Model configuration helpers.
# --------------------------------------------------------------------------------------------------


def _as_config(model_config):
  import shufflemamba_jax as smj
  if isinstance(model_config, Mapping):
    return smj.VisionMambaConfig(**model_config)
  return model_config


def _abstract_model(model_config) -> nnx.Module:
  """The model of model_config with jax.ShapeDtypeStruct parameters; nothing is computed."""
  import shufflemamba_jax as smj
  config = _as_config(model_config)
  return nnx.eval_shape(lambda: smj.VisionMamba(config, rngs=nnx.Rngs(0)))


def _abstract_params(model_config) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of the model described by model_config."""
  return _flatten(nnx.to_pure_dict(nnx.state(_abstract_model(model_config), nnx.Param)))


def model_with_params(model_config, params) -> nnx.Module:
  """A VisionMamba of model_config holding `params` (a pure dict or nnx.State of arrays).

  Skips the random initialization (for the full-size models that is tens of seconds of
  compilation on a CPU) by filling an abstract model; every parameter must be given.
  """
  model = _abstract_model(model_config)
  state = nnx.state(model, nnx.Param)
  expected = set(_flatten(nnx.to_pure_dict(state)))
  given = set(_flatten(_as_pure_dict(params)))
  if expected != given:
    raise ValueError(f"parameters do not match the model config: missing {sorted(expected - given)}, "
                     f"unexpected {sorted(given - expected)}")
  expected_shapes = {name: tuple(value.shape) for name, value in _flatten(nnx.to_pure_dict(state)).items()}
  wrong = [f"{name}: {tuple(np.shape(value))} given, {expected_shapes[name]} expected"
           for name, value in _flatten(_as_pure_dict(params)).items()
           if tuple(np.shape(value)) != expected_shapes[name]]
  if wrong:
    raise ValueError("parameters do not match the model config: " + "; ".join(sorted(wrong)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, _as_pure_dict(params)))
  nnx.update(model, state)
  return model


# --------------------------------------------------------------------------------------------------
# Conversion.
# --------------------------------------------------------------------------------------------------


def _resized_pos_embed(value: np.ndarray, width: int, config) -> np.ndarray | None:
  """value (L, D) resized bicubically to config's patch grid, or None if it is not a square grid."""
  from shufflemamba_jax import tokens
  if value.ndim != 2 or value.shape[1] != width:
    return None
  try:
    resized = tokens.resize_pos_embed_table(value, config.grid, config.token_layout)
  except ValueError:
    return None  # reported with the other mis-shaped tensors
  _log.info("Resized pos_embed %s to %s for the %dx%d patch grid.",
            value.shape, resized.shape, *config.grid)
  return np.asarray(resized, value.dtype)


def from_pytorch_state_dict(state_dict: Mapping[str, Any], model_config, *,
                            resize_pos_embed: bool = False,
                            head_params: Mapping[str, Any] | None = None,
                            source: str = "the state dict") -> dict:
  """Converts an official-named PyTorch state dict into our parameter tree.

  Args:
    state_dict: official names (SPEC section 5) -> torch tensors or arrays.
    model_config: the VisionMambaConfig (or its fields as a dict) the weights are for.
    resize_pos_embed: when model_config's img_size gives another patch grid than the checkpoint's
      (square) one, resize pos_embed bicubically instead of reporting a mis-shaped tensor. Only
      for checkpoints whose patch stride equals the patch size: the stride-8 Vim "+" models
      cannot be represented here.
    head_params: {"kernel", "bias"} to use instead of the checkpoint's head (e.g. a freshly
      initialized head for another number of classes); the checkpoint's head.* are then ignored.
    source: named in error messages.

  Returns:
    A pure nested dict (the layout of `nnx.state(model, nnx.Param)`) of numpy arrays in the
    model's parameter dtype, layers stacked on the leading axis.

  Raises:
    ValueError: listing every missing, unused and mis-shaped tensor at once.
  """
  state_dict = {name: _to_numpy(value) for name, value in state_dict.items()}
  config = _as_config(model_config)
  expected = _abstract_params(config)
  depth = config.depth
  used: set[str] = set()
  missing, mismatched = [], []
  flat: dict[str, np.ndarray] = {}
  for path, target in expected.items():
    if head_params is not None and path.startswith("head."):
      flat[path] = np.asarray(_to_numpy(head_params[path.split(".", 1)[1]]), target.dtype)
      continue
    template, layout = _official_name_and_layout(path)
    is_layer = path.startswith("layers.")
    shape = tuple(target.shape[1:] if is_layer else target.shape)
    values = []
    for i in range(depth if is_layer else 1):
      name = template.format(i=i)
      if name not in state_dict:
        missing.append(name)
        continue
      used.add(name)
      value = state_dict[name]
      if value.shape != _official_shape(shape, layout):
        if path == "pos_embed" and resize_pos_embed and value.ndim == 3 and value.shape[0] == 1:
          resized = _resized_pos_embed(value[0], shape[-1], config)
          if resized is not None:
            values.append(resized)
            continue
        hint = (" (trained at another image size? pass --img-size / resize_pos_embed=True; the "
                "stride-8 Vim '+' checkpoints cannot be converted)") if path == "pos_embed" else ""
        mismatched.append(f"{name}: {tuple(value.shape)} in {source}, "
                          f"expected {_official_shape(shape, layout)}{hint}")
        continue
      values.append(_to_ours(value, layout))
    if len(values) == (depth if is_layer else 1):
      value = np.stack(values) if is_layer else values[0]
      flat[path] = np.array(value, target.dtype)  # a copy: never aliases the caller's tensors
  unused = sorted(set(state_dict) - used
                  - ({n for n in state_dict if n.startswith("head.")} if head_params is not None else set()))
  if missing or unused or mismatched:
    lines = [f"{source} does not fit the model config "
             f"(token_layout={config.token_layout!r}, embed_dim={config.embed_dim}, depth={depth}, "
             f"num_classes={config.num_classes}): is it the right --variant?"]
    for title, names in (("missing", missing), ("unused", unused), ("mis-shaped", mismatched)):
      if names:
        lines.append(f"  {len(names)} {title}: " + ", ".join(names))
    raise ValueError("\n".join(lines))
  return _unflatten(flat)


def to_pytorch_state_dict(params, model_config=None) -> dict[str, np.ndarray]:
  """Converts our parameters (pure dict or nnx.State) to an official-named state dict.

  The inverse of `from_pytorch_state_dict`: transposes only, so values are bit-identical. When
  model_config is given, the parameter paths and shapes are checked against it first.
  """
  flat = {path: np.asarray(value) for path, value in _flatten(_as_pure_dict(params)).items()}
  if model_config is not None:
    expected = {p: tuple(s.shape) for p, s in _abstract_params(model_config).items()}
    got = {p: tuple(v.shape) for p, v in flat.items()}
    if expected != got:
      diff = sorted(set(expected.items()) ^ set(got.items()))
      raise ValueError(f"parameters do not match the model config: {diff}")
  state_dict = {}
  for path, value in flat.items():
    template, layout = _official_name_and_layout(path)
    if path.startswith("layers."):
      for i in range(value.shape[0]):
        state_dict[template.format(i=i)] = np.ascontiguousarray(_to_official(value[i], layout))
    else:
      state_dict[template] = np.ascontiguousarray(_to_official(value, layout))
  return state_dict


# --------------------------------------------------------------------------------------------------
# State-dict files: .pth, .safetensors, .npz.
# --------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _safetensors_dtypes() -> dict[str, np.dtype]:
  dtypes = {name: np.dtype(t) for name, t in _SAFETENSORS_DTYPES.items()}
  import ml_dtypes  # a JAX dependency
  dtypes["BF16"] = np.dtype(ml_dtypes.bfloat16)
  return dtypes


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
  """Writes the safetensors format: 8-byte little-endian header size, JSON header, raw data."""
  names = {dtype: name for name, dtype in _safetensors_dtypes().items()}
  header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  arrays = []
  for name, value in tensors.items():
    value = np.ascontiguousarray(value)
    if value.dtype not in names:
      raise ValueError(f"{path}: tensor {name} has dtype {value.dtype}, not storable in safetensors")
    value = value.astype(value.dtype.newbyteorder("<"), copy=False)
    header[name] = {"dtype": names[value.dtype], "shape": list(value.shape),
                    "data_offsets": [offset, offset + value.nbytes]}
    offset += value.nbytes
    arrays.append(value)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for value in arrays:
      f.write(value.tobytes())


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a safetensors file into numpy arrays (copies, in the stored dtypes)."""
  dtypes = _safetensors_dtypes()
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
    data = f.read()
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dtype = dtypes[info["dtype"]].newbyteorder("<")
    tensors[name] = np.frombuffer(data[start:end], dtype).reshape(info["shape"]).copy()
  return tensors


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


def load_state_dict(path: str, *, checkpoint_key: str | None = None,
                    allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads an official-named state dict from .pth/.pt, .safetensors or .npz as numpy arrays.

  Training checkpoints that wrap the state dict ("model", "state_dict", "model_ema", "module",
  or `checkpoint_key`) are unwrapped and a DataParallel "module." prefix is stripped. `.pth` files
  are read with torch's weights_only loader (argparse.Namespace and numpy scalars allowed, as
  training checkpoints hold them); `allow_pickle` runs the full unpickler, for trusted files only.
  """
  if path.endswith(".safetensors"):
    state_dict = read_safetensors(path)
  elif path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as archive:
      state_dict = {name: archive[name] for name in archive.files}
  elif path.endswith((".pth", ".pt", ".bin")):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path} needs PyTorch (pip install torch); or convert it to "
                        ".safetensors or .npz elsewhere") from e
    if allow_pickle:
      checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    else:
      # Training checkpoints also hold their argparse arguments and numpy scalars (accuracies):
      # plain data, allowed here; anything else needs the caller's trust.
      numpy_core = np._core if hasattr(np, "_core") else np.core  # renamed in numpy 2
      plain_data = [argparse.Namespace, np.dtype, numpy_core.multiarray.scalar] + [
          getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
      with torch.serialization.safe_globals(plain_data):
        try:
          checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
          raise ValueError(f"{path} holds objects beyond tensors and plain data; if you trust the "
                           f"file, pass --allow-pickle (allow_pickle=True). torch said: {e}") from e
    state_dict = _unwrap(checkpoint, path, checkpoint_key)
  else:
    raise ValueError(f"{path}: unknown state-dict format; use .pth, .pt, .safetensors or .npz")
  if path.endswith((".safetensors", ".npz")) and checkpoint_key is not None:
    prefix = checkpoint_key + "."
    state_dict = {n[len(prefix):]: v for n, v in state_dict.items() if n.startswith(prefix)}
  stripped = {}
  for name, value in state_dict.items():
    if not hasattr(value, "shape"):
      raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    stripped[name.removeprefix("module.")] = _to_numpy(value)
  return stripped


def save_state_dict(path: str, state_dict: Mapping[str, np.ndarray]):
  """Writes an official-named state dict as .pth ({"model": ...}, like official files),
  .safetensors or .npz, chosen by the file extension."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".safetensors"):
    write_safetensors(path, state_dict, {"format": "pt"})
  elif path.endswith(".npz"):
    import ml_dtypes
    bfloat16 = sorted(n for n, v in state_dict.items() if v.dtype == ml_dtypes.bfloat16)
    if bfloat16:  # .npz would store them as opaque 2-byte records
      raise ValueError(f"{path}: .npz cannot hold bfloat16 tensors ({', '.join(bfloat16[:3])}, ...); "
                       "write .safetensors or .pth instead")
    np.savez(path, **state_dict)
  elif path.endswith((".pth", ".pt")):
    import torch
    import ml_dtypes

    def tensor(value):
      if value.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
      return torch.from_numpy(np.array(value))
    torch.save({"model": {name: tensor(v) for name, v in state_dict.items()}}, path)
  else:
    raise ValueError(f"{path}: unknown state-dict format; use .pth, .pt, .safetensors or .npz")


# --------------------------------------------------------------------------------------------------
# Our checkpoint directory (Orbax).
# --------------------------------------------------------------------------------------------------


def _manager(directory: str, *, read_only: bool):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(directory, options=options, item_names=("params", "model_config"))


def save_params(directory: str, model: nnx.Module, variant: str, overrides: Mapping[str, Any]):
  """Writes the model's parameters and how to rebuild it as an Orbax checkpoint (step 0).

  The layout is described in this module's docstring. Fails if `directory` already holds one.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  meta = {"format": PARAMS_FORMAT, "variant": variant, "overrides": dict(overrides),
          "config": dataclasses.asdict(model.config)}
  with _manager(directory, read_only=False) as manager:
    if manager.latest_step() is not None:
      raise FileExistsError(f"{directory} already holds a checkpoint; choose an empty --out")
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            model_config=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def load_model_config(directory: str) -> dict:
  """The "model_config" JSON item of a checkpoint written by `save_params`."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  if not is_params_checkpoint(directory):
    raise FileNotFoundError(f"{directory} holds no checkpoint written by shufflemamba_jax.convert")
  with _manager(directory, read_only=True) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory} holds no Orbax checkpoint")
    meta = manager.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
  meta = dict(meta["model_config"])
  if meta.get("format") != PARAMS_FORMAT:
    raise ValueError(f"{directory}: model_config format {meta.get('format')!r}, expected {PARAMS_FORMAT!r}")
  return meta


def is_params_checkpoint(path: str) -> bool:
  """Whether `path` is a `save_params` directory (step folders with "params" and "model_config")."""
  if not os.path.isdir(path):
    return False
  steps = [name for name in os.listdir(path) if name.isdigit()]
  return any(os.path.isdir(os.path.join(path, step, "model_config")) and
             os.path.isdir(os.path.join(path, step, "params")) for step in steps)


def saved_model_config(meta: Mapping):
  """The VisionMambaConfig of a `load_model_config` result (rebuilt from variant + overrides)."""
  import shufflemamba_jax as smj
  return smj.model_config(meta["variant"], **meta["overrides"])


def load_params(directory: str, abstract_params=None) -> tuple[dict, dict]:
  """Restores (params as a pure nested dict, model_config JSON) from a `save_params` directory.

  abstract_params: an optional pure dict (or nnx.State) of jax.ShapeDtypeStruct with shardings
  to restore into (e.g. a mesh-sharded `nnx.eval_shape` of the model); by default the arrays
  land on the first local device.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  meta = load_model_config(directory)
  if abstract_params is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.to_pure_dict(nnx.state(_abstract_model(saved_model_config(meta)), nnx.Param)))
  abstract_params = _as_pure_dict(abstract_params)
  with _manager(directory, read_only=True) as manager:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
  return restored["params"], meta


def load_model(directory: str) -> nnx.Module:
  """The model saved by `save_params`, rebuilt from its variant and overrides, with its weights."""
  params, meta = load_params(directory)
  return model_with_params(saved_model_config(meta), params)


# --------------------------------------------------------------------------------------------------
# End to end.
# --------------------------------------------------------------------------------------------------


def _fresh_head(config, seed: int) -> dict[str, np.ndarray]:
  """A new classification head, initialized as SPEC section 2 says (normal 0.02, zero bias)."""
  kernel = _abstract_model(config).head.kernel
  normal = jax.random.normal(jax.random.key(seed), kernel.shape, kernel.dtype) * 0.02
  return {"kernel": np.asarray(normal), "bias": np.zeros(kernel.shape[-1], kernel.dtype)}


def convert_pytorch_checkpoint(path: str, variant: str, *, seed: int = 0, checkpoint_key: str | None = None,
                               allow_pickle: bool = False, **overrides) -> nnx.Module:
  """`create_model(variant, **overrides)` holding the weights of an official PyTorch file.

  An img_size override whose patch grid differs from the checkpoint's resizes the position
  embeddings bicubically (without it, a grid mismatch is an error); a num_classes override that
  differs from the checkpoint's head gives a freshly initialized head (seeded by `seed`).
  """
  import shufflemamba_jax as smj
  config = smj.model_config(variant, **overrides)
  state_dict = load_state_dict(path, checkpoint_key=checkpoint_key, allow_pickle=allow_pickle)
  head_params = None
  head = state_dict.get("head.weight")
  if "num_classes" in overrides and head is not None and head.shape[0] != config.num_classes:
    _log.warning("%s has a %d-class head: the head is re-initialized for %d classes.",
                 path, head.shape[0], config.num_classes)
    head_params = _fresh_head(config, seed)
  params = from_pytorch_state_dict(state_dict, config, resize_pos_embed="img_size" in overrides,
                                   head_params=head_params, source=path)
  return model_with_params(config, params)


def export_pytorch_checkpoint(model_or_directory, path: str) -> dict[str, np.ndarray]:
  """Writes the official-named state dict of a model (or a `save_params` directory) to `path`."""
  if isinstance(model_or_directory, (str, os.PathLike)):
    params, _ = load_params(os.fspath(model_or_directory))
    params = jax.tree.map(np.asarray, params)
  else:
    params = nnx.state(model_or_directory, nnx.Param)
  state_dict = to_pytorch_state_dict(params)
  save_state_dict(path, state_dict)
  return state_dict


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m shufflemamba_jax.convert",
      description="Convert official PyTorch Vim / Mamba-Reg / ShuffleMamba weights to and from "
                  "shufflemamba_jax Orbax checkpoints.")
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from-pytorch", metavar="CKPT",
                         help="official state dict (.pth, .safetensors or .npz) to import")
  direction.add_argument("--to-pytorch", metavar="DIR", help="our checkpoint directory to export")
  parser.add_argument("--out", required=True,
                      help="import: new checkpoint directory; export: .pth, .safetensors or .npz file")
  parser.add_argument("--variant", help="model variant (import only), e.g. vim_tiny")
  parser.add_argument("--img-size", type=int, help="input resolution; position embeddings are resized")
  parser.add_argument("--num-classes", type=int, help="classes; a different head is re-initialized")
  parser.add_argument("--seed", type=int, default=0, help="seed of a re-initialized head")
  parser.add_argument("--checkpoint-key", help="entry holding the state dict (default: auto)")
  parser.add_argument("--allow-pickle", action="store_true",
                      help="unpickle arbitrary objects in a .pth file (trusted files only)")
  args = parser.parse_args(argv)
  if not _log.handlers:  # our messages only; Orbax's INFO chatter stays off
    _log.addHandler(logging.StreamHandler())
    _log.setLevel(logging.INFO)
    _log.propagate = False
  if args.from_pytorch:
    import shufflemamba_jax as smj
    if args.variant not in smj.VARIANTS:
      parser.error(f"--variant must be one of {sorted(smj.VARIANTS)}, got {args.variant!r}")
    overrides = {k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes))
                 if v is not None}
    try:
      model = convert_pytorch_checkpoint(args.from_pytorch, args.variant, seed=args.seed,
                                         checkpoint_key=args.checkpoint_key,
                                         allow_pickle=args.allow_pickle, **overrides)
      save_params(args.out, model, args.variant, overrides)
    except (ValueError, KeyError, OSError, ImportError) as error:
      parser.exit(1, f"error: {error}\n")
    _log.info("Wrote %s (variant %s, overrides %s).", args.out, args.variant, overrides)
  else:
    try:
      state_dict = export_pytorch_checkpoint(args.to_pytorch, args.out)
    except (ValueError, OSError, ImportError) as error:
      parser.exit(1, f"error: {error}\n")
    _log.info("Wrote %d tensors to %s.", len(state_dict), args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())

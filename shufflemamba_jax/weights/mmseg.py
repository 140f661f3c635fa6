"""mmsegmentation's state-dict names for the segmentation heads, and ours (numpy only, no torch).

An mmseg `EncoderDecoder` with a UPerHead decode head and a one-conv FCNHead auxiliary head
(`num_convs=1, concat_input=False`, as in the UperNet configs) saves its heads under
`decode_head.` and `auxiliary_head.`; our `upernet.UperNet` keeps them under `decode_head` and
`aux_head`. Each mmcv ConvModule (conv without bias, BatchNorm `bn`, ReLU) is one of our
`ConvNormReLU`s:

  <module>.conv.weight (O, I, kh, kw)  <-> <module>.conv.kernel (kh, kw, I, O)   parameter
  <module>.bn.weight, <module>.bn.bias <-> <module>.norm.scale, <module>.norm.bias  parameters
  <module>.bn.running_mean, _var       <-> <module>.norm.mean, <module>.norm.var    model state
  <module>.bn.num_batches_tracked      <-> nothing (dropped on import, written as int64 0)

and the modules are, for pool scales (s_0, s_1, ...) (mmseg's `pool_scales`, in that order):

  decode_head.psp_modules.{i}.1   <-> decode_head.pool{s_i}   (the pooling, index 0, has no weights)
  decode_head.bottleneck          <-> decode_head.pool_bottleneck
  decode_head.lateral_convs.{i}   <-> decode_head.lateral{i}
  decode_head.fpn_convs.{i}       <-> decode_head.fpn{i}
  decode_head.fpn_bottleneck      <-> decode_head.fpn_bottleneck
  decode_head.conv_seg (with bias) <-> decode_head.classifier (.weight OIHW <-> .kernel HWIO)
  auxiliary_head.convs.0          <-> aux_head.conv
  auxiliary_head.conv_seg         <-> aux_head.classifier

The state dict stores no pool scale (pooling has no weights), only their order: both directions
take `pool_scales`, which must be the model's (UperNetConfig.pool_scales) in its order, since the
bottleneck's input channels follow it. Names outside the heads (`backbone.*`, ...) are not read:
the caller maps them (`weights.pytorch` for the backbone's official names) and merges the dicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from shufflemamba_jax.models import adapter as adapter_lib
from shufflemamba_jax.models import upernet, vim
from shufflemamba_jax.weights import params as params_lib
from shufflemamba_jax.weights import pytorch

# mmseg's UPerHead default, which UperNetConfig shares (a dataclass keeps a field's default on the class).
DEFAULT_POOL_SCALES: tuple[int, ...] = upernet.UperNetConfig.pool_scales
# (ours, mmseg's) prefix of each head.
HEAD_PREFIXES = (("decode_head.", "decode_head."), ("aux_head.", "auxiliary_head."))
MMSEG_PREFIXES = tuple(theirs for _, theirs in HEAD_PREFIXES)
OUR_PREFIXES = tuple(ours for ours, _ in HEAD_PREFIXES)
_CONV = "conv2d"
# (to ours, to mmseg's) for each layout.
_LAYOUTS = {
  _CONV: (lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),
  "same": (lambda x: x, lambda x: x),
}


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One mmseg tensor: our name (None for num_batches_tracked, which we do not keep), its layout,
  and whether it is model state (BatchNorm statistics) rather than a parameter."""

  mmseg: str
  ours: str | None
  layout: str = "same"
  state: bool = False


def _conv_module(mmseg: str, ours: str) -> list[_Tensor]:
  return [
    _Tensor(f"{mmseg}.conv.weight", f"{ours}.conv.kernel", _CONV),
    _Tensor(f"{mmseg}.bn.weight", f"{ours}.norm.scale"),
    _Tensor(f"{mmseg}.bn.bias", f"{ours}.norm.bias"),
    _Tensor(f"{mmseg}.bn.running_mean", f"{ours}.norm.mean", state=True),
    _Tensor(f"{mmseg}.bn.running_var", f"{ours}.norm.var", state=True),
    _Tensor(f"{mmseg}.bn.num_batches_tracked", None, state=True),
  ]


def _classifier(mmseg: str, ours: str) -> list[_Tensor]:
  return [
    _Tensor(f"{mmseg}.conv_seg.weight", f"{ours}.classifier.kernel", _CONV),
    _Tensor(f"{mmseg}.conv_seg.bias", f"{ours}.classifier.bias"),
  ]


def _tensors(pool_scales: Sequence[int]) -> list[_Tensor]:
  """Every head tensor, in the order of mmseg's state dict."""
  if len(set(pool_scales)) != len(pool_scales) or not pool_scales:
    raise ValueError(f"pool_scales {tuple(pool_scales)} must be distinct and at least one")
  tensors = _classifier("decode_head", "decode_head")
  for index, scale in enumerate(pool_scales):
    tensors += _conv_module(f"decode_head.psp_modules.{index}.1", f"decode_head.pool{scale}")
  tensors += _conv_module("decode_head.bottleneck", "decode_head.pool_bottleneck")
  for level in range(upernet.NUM_LEVELS - 1):
    tensors += _conv_module(f"decode_head.lateral_convs.{level}", f"decode_head.lateral{level}")
  for level in range(upernet.NUM_LEVELS - 1):
    tensors += _conv_module(f"decode_head.fpn_convs.{level}", f"decode_head.fpn{level}")
  tensors += _conv_module("decode_head.fpn_bottleneck", "decode_head.fpn_bottleneck")
  tensors += _classifier("auxiliary_head", "aux_head")
  tensors += _conv_module("auxiliary_head.convs.0", "aux_head.conv")
  return tensors


def _unknown(name: str, pool_scales: Sequence[int]) -> ValueError:
  return ValueError(
    f"{name}: not a tensor of the heads UPerHead(pool_scales={tuple(pool_scales)}) and "
    "FCNHead(num_convs=1, concat_input=False)"
  )


def _convert(name: str, value: Any, entry: _Tensor, *, to_ours: bool) -> np.ndarray:
  value = np.asarray(value)
  if entry.layout == _CONV and value.ndim != 4:
    raise ValueError(f"{name}: shape {value.shape} is not a 2-d convolution's (4 dimensions)")
  if entry.layout != _CONV and value.ndim != 1:
    raise ValueError(f"{name}: shape {value.shape} is not a vector of channels")
  to_ours_fn, to_mmseg_fn = _LAYOUTS[entry.layout]
  return to_ours_fn(value) if to_ours else np.ascontiguousarray(to_mmseg_fn(value))


def split_heads(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the heads' entries, everything else) of an mmseg state dict, for callers that map the rest."""
  heads = {name: value for name, value in state_dict.items() if name.startswith(MMSEG_PREFIXES)}
  return heads, {name: value for name, value in state_dict.items() if name not in heads}


def heads_from_mmseg(
  state_dict: Mapping[str, Any], *, pool_scales: Sequence[int] = DEFAULT_POOL_SCALES
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Our (parameters, model state) of the heads in an mmseg state dict, as flat {name: array}.

  Args:
    state_dict: {mmseg name: array}, numpy arrays or anything `np.asarray` reads (CPU torch
      tensors). Only `decode_head.*` and `auxiliary_head.*` are read; `num_batches_tracked` is
      dropped. A head without its entries (a model without an auxiliary head) gives none.
    pool_scales: the model's pool scales, in order (see the module docstring).

  Returns:
    ({"decode_head.pool1.conv.kernel": (1, 1, D, C), ...}, {"decode_head.pool1.norm.mean": (C,),
    ...}), named as `params.flatten` names the UperNet's `nnx.Param`s and its other state;
    `params.fill` checks that nothing is missing.

  Raises:
    ValueError naming the first head entry that has no counterpart (another head kind, or
    another number of pool scales) or a convolution weight that is not 4-d.
  """
  table = {entry.mmseg: entry for entry in _tensors(pool_scales)}
  params, model_state = {}, {}
  for name, value in state_dict.items():
    if not name.startswith(MMSEG_PREFIXES):
      continue
    entry = table.get(name)
    if entry is None:
      raise _unknown(name, pool_scales)
    if entry.ours is not None:
      (model_state if entry.state else params)[entry.ours] = _convert(name, value, entry, to_ours=True)
  return params, model_state


def heads_to_mmseg(
  params: Mapping[str, Any], model_state: Mapping[str, Any], *, pool_scales: Sequence[int] = DEFAULT_POOL_SCALES
) -> dict[str, np.ndarray]:
  """The heads' entries of an mmseg state dict, from our flat (parameters, model state).

  Args:
    params, model_state: {our name: array}, e.g. `params.flatten` of `nnx.to_pure_dict` of
      `nnx.state(model, nnx.Param)` and of `nnx.state(model, nnx.Not(nnx.Param))`. Only
      `decode_head.*` and `aux_head.*` are read.
    pool_scales: the model's UperNetConfig.pool_scales, in order.

  Returns:
    {mmseg name: numpy array} in mmseg's order and layouts (OIHW convolutions), each BatchNorm
    with `num_batches_tracked` int64 0, which `load_state_dict(strict=True)` into mmseg's heads
    accepts.

  Raises:
    ValueError naming the first head entry that has no counterpart, or that is a parameter where
    mmseg has a statistic or the reverse.
  """
  table = {entry.ours: entry for entry in _tensors(pool_scales) if entry.ours is not None}
  found = {}
  for values, state in ((params, False), (model_state, True)):
    for name, value in values.items():
      if not name.startswith(OUR_PREFIXES):
        continue
      entry = table.get(name)
      if entry is None:
        raise _unknown(name, pool_scales)
      if entry.state != state:
        kind = "model state" if state else "parameters"
        raise ValueError(f"{name}: found in the {kind}, but it is {'state' if entry.state else 'a parameter'}")
      found[entry.mmseg] = _convert(name, value, entry, to_ours=False)
  state_dict = {}
  for entry in _tensors(pool_scales):
    if entry.mmseg in found:
      state_dict[entry.mmseg] = found[entry.mmseg]
    elif entry.ours is None and entry.mmseg.replace("num_batches_tracked", "running_mean") in found:
      state_dict[entry.mmseg] = np.array(0, np.int64)
  return state_dict


def describe_mmseg(name: str, shape, *, pool_scales: Sequence[int] = DEFAULT_POOL_SCALES) -> tuple[str, tuple]:
  """(mmseg name, mmseg shape) of our head tensor (name, shape), for `params.fill`'s `describe`;
  other names come back unchanged."""
  entry = {entry.ours: entry for entry in _tensors(pool_scales) if entry.ours is not None}.get(name)
  if entry is None:
    return name, tuple(shape)
  return entry.mmseg, _LAYOUTS[entry.layout][1](np.empty(shape, np.bool_)).shape


@dataclasses.dataclass(frozen=True)
class HeadSizes:
  """The heads' sizes read from tensor shapes.

  in_channels is the width of the backbone maps (our backbone's embed_dim); channels and
  aux_channels are UperNetConfig's (aux_channels None without an auxiliary head); the pool
  scales' count is known, their values are not (see the module docstring).
  """

  num_classes: int
  in_channels: int
  channels: int
  num_pool_scales: int
  aux_channels: int | None


def head_sizes(state_dict: Mapping[str, Any]) -> HeadSizes:
  """The `HeadSizes` of an mmseg state dict's heads; a ValueError names a missing tensor."""

  def shape(name: str) -> tuple[int, ...]:
    if name not in state_dict:
      raise ValueError(f"{name}: missing; it gives the heads' sizes")
    return tuple(np.shape(state_dict[name]))

  num_classes, channels = shape("decode_head.conv_seg.weight")[:2]
  in_channels = shape("decode_head.lateral_convs.0.conv.weight")[1]
  num_pool_scales = 0
  while f"decode_head.psp_modules.{num_pool_scales}.1.conv.weight" in state_dict:
    num_pool_scales += 1
  aux = "auxiliary_head.convs.0.conv.weight"
  aux_channels = shape(aux)[0] if aux in state_dict else None
  return HeadSizes(num_classes, in_channels, channels, num_pool_scales, aux_channels)


# ---- The whole segmenter: an mmseg EncoderDecoder state dict of the reference ---------------

BACKBONE_PREFIX = "backbone."


def is_segmenter_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether a state dict is an mmseg EncoderDecoder's (a backbone under `backbone.` and a
  decode head), rather than a classifier's."""
  return "decode_head.conv_seg.weight" in state_dict and any(name.startswith(BACKBONE_PREFIX) for name in state_dict)


def backbone_sizes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The VisionMambaConfig sizes the reference's `Backbone_VideoMamba` tensors imply."""

  def shape(name: str) -> tuple[int, ...]:
    if BACKBONE_PREFIX + name not in state_dict:
      raise ValueError(f"{BACKBONE_PREFIX}{name}: missing; it gives the backbone's sizes")
    return tuple(np.shape(state_dict[BACKBONE_PREFIX + name]))

  width, _, patch, _ = shape("patch_embed.proj.weight")
  depth = 0
  while f"{BACKBONE_PREFIX}layers.{depth}.norm.weight" in state_dict:
    depth += 1
  if not depth:
    raise ValueError(f"{BACKBONE_PREFIX}layers.0.norm.weight: missing; the backbone has no blocks")
  rows = shape("pos_embed")[-2]
  side = int(round(rows**0.5))
  if side * side != rows:
    raise ValueError(f"{BACKBONE_PREFIX}pos_embed: {rows} rows are not a square patch grid (patch tokens only)")
  inner = shape("layers.0.mixer.in_proj.weight")[0] // 2
  return dict(
    embed_dim=width,
    patch_size=patch,
    depth=depth,
    d_state=shape("layers.0.mixer.A_log")[1],
    d_conv=shape("layers.0.mixer.conv1d.weight")[-1],
    expand=inner // width,
    dt_rank=shape("layers.0.mixer.dt_proj.weight")[1],
    norm="layernorm" if f"{BACKBONE_PREFIX}layers.0.norm.bias" in state_dict else "rmsnorm",
    pos_embed_size=side * patch,
  )


def is_adapter_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether a segmenter's backbone is the ViT-Adapter (the reference's `Mamba_Adapter`)."""
  return f"{BACKBONE_PREFIX}spm.stem.0.weight" in state_dict


def adapter_sizes(state_dict: Mapping[str, Any], n_points: int, width: int) -> dict[str, Any]:
  """The AdapterConfig sizes the adapter's tensors imply; the heads need the point count."""
  rows = lambda name: np.shape(state_dict[f"{BACKBONE_PREFIX}interactions.0.{name}.weight"])[0]
  heads, remainder = divmod(rows("injector.attn.attention_weights"), 3 * n_points)
  if remainder:
    raise ValueError(f"n_points={n_points} does not divide the injector's attention weights; give --set n_points=...")
  return dict(
    conv_inplane=np.shape(state_dict[f"{BACKBONE_PREFIX}spm.stem.0.weight"])[0],
    deform_num_heads=heads,
    deform_ratio=rows("injector.attn.value_proj") / width,
    cffn_ratio=rows("extractor.ffn.fc1") / width,
    use_extra_extractor=any(".extra_extractors." in name for name in state_dict),
  )


def segmenter_config(state_dict: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> upernet.UperNetConfig:
  """The UperNetConfig of an mmseg state dict of the reference: sizes from the tensors (width,
  depth, patch, SSM sizes, LayerNorm or RMSNorm, position grid, classes, head widths, and for
  an adapter backbone its SPM width, heads, value and ConvFFN ratios and extra extractors),
  every other setting from `settings` (VisionMambaConfig, UperNetConfig or AdapterConfig field
  names, e.g. out_indices, pool_scales, img_size, drop_path_rate, n_points), else the defaults.

  Raises a ValueError naming a setting that contradicts the tensors or is no field of any.
  """
  settings = dict(settings or {})
  adapter_fields = {field.name for field in dataclasses.fields(adapter_lib.AdapterConfig)}
  inferred = backbone_sizes(state_dict)
  if is_adapter_state_dict(state_dict):
    n_points = settings.get("n_points", adapter_lib.AdapterConfig.n_points)
    inferred.update(adapter_sizes(state_dict, n_points, inferred["embed_dim"]))
  heads = head_sizes(state_dict)
  inferred.update(num_classes=heads.num_classes, channels=heads.channels)
  if heads.aux_channels is not None:
    inferred["aux_channels"] = heads.aux_channels
  for name, value in settings.items():
    if name in inferred and value != inferred[name]:
      raise ValueError(f"--set {name}={value!r} contradicts the checkpoint's tensors, which give {inferred[name]!r}")
  merged = {**inferred, **settings}
  backbone_fields = {field.name for field in dataclasses.fields(vim.VisionMambaConfig)} - {"num_classes"}
  segmenter_fields = {field.name for field in dataclasses.fields(upernet.UperNetConfig)} - {"backbone"}
  unknown = sorted(set(merged) - backbone_fields - segmenter_fields - adapter_fields)
  if unknown:
    raise ValueError(
      f"--set {unknown[0]}: not a setting of the backbone (VisionMambaConfig), UperNetConfig or AdapterConfig"
    )
  adapter = None
  if is_adapter_state_dict(state_dict):
    adapter = adapter_lib.AdapterConfig(**{name: value for name, value in merged.items() if name in adapter_fields})
  elif set(settings) & adapter_fields:
    raise ValueError(f"--set {sorted(set(settings) & adapter_fields)[0]}: the checkpoint's backbone has no adapter")
  # The reference backbone scans patches only and trains in float32; the crop is 512 pixels.
  backbone = dict(token_layout="head", slws_max_prob=0.0, img_size=512)
  backbone.update({name: value for name, value in merged.items() if name in backbone_fields})
  pool_scales = tuple(merged.get("pool_scales", DEFAULT_POOL_SCALES))
  if len(pool_scales) != heads.num_pool_scales:
    raise ValueError(
      f"pool_scales {pool_scales}: the checkpoint has {heads.num_pool_scales} pooling branches; "
      "give their scales with --set pool_scales=(...)"
    )
  fields = {name: value for name, value in merged.items() if name in segmenter_fields}
  fields = {name: tuple(value) if isinstance(value, list) else value for name, value in fields.items()}
  return upernet.UperNetConfig(backbone=vim.VisionMambaConfig(**backbone), adapter=adapter, **fields)


def import_segmenter(state_dict: Mapping[str, Any], config: upernet.UperNetConfig, *, source: str) -> tuple[dict, dict]:
  """(parameters, model state) nested dicts of our UperNet of `config`, from the reference's
  mmseg state dict (strictly: every missing, unused and mis-shaped tensor is one ValueError)."""
  heads, rest = split_heads(state_dict)
  head_params, head_state = heads_from_mmseg(heads, pool_scales=config.pool_scales)
  backbone = {name[len(BACKBONE_PREFIX) :]: value for name, value in rest.items() if name.startswith(BACKBONE_PREFIX)}
  flat = {BACKBONE_PREFIX + name: value for name, value in pytorch.to_flat(backbone).items()}
  flat, backbone_state = pytorch.split_state(flat)  # The adapter's BatchNorm statistics.
  flat.update({name: value for name, value in rest.items() if not name.startswith(BACKBONE_PREFIX)})
  flat.update(head_params)
  model = params_lib.abstract_model(config)
  describe = _describer(config.pool_scales)
  params = params_lib.fill(params_lib.param_tree(model), flat, source=source, describe=describe)
  state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
  return params, params_lib.fill(state, {**head_state, **backbone_state}, source=source, describe=describe)


def _describer(pool_scales: Sequence[int]):
  """`params.fill`'s describe for a segmenter: mmseg's names for the heads, the reference's for the backbone."""

  def describe(name: str, shape) -> tuple[str, tuple]:
    if name.startswith(BACKBONE_PREFIX):
      official, official_shape = pytorch.describe_official(name[len(BACKBONE_PREFIX) :], shape)
      return BACKBONE_PREFIX + official, official_shape
    return describe_mmseg(name, shape, pool_scales=pool_scales)

  return describe


def export_segmenter(
  params: Mapping[str, Any], model_state: Mapping[str, Any], *, pool_scales: Sequence[int] = DEFAULT_POOL_SCALES
) -> dict[str, np.ndarray]:
  """The reference's mmseg state dict (`backbone.*`, `decode_head.*`, `auxiliary_head.*`) of our
  UperNet's nested (parameters, model state), loadable with `strict=True` into the official
  EncoderDecoder (no neck), with the plain backbone or the adapter (`Mamba_Adapter`)."""
  flat_params, flat_state = params_lib.flatten(params), params_lib.flatten(model_state)
  if any(name.startswith("pyramid.") for name in flat_params):
    raise ValueError("a segmenter with the simple-pyramid neck has no counterpart in the reference (neck=None)")
  backbone, backbone_state = (
    {name[len(BACKBONE_PREFIX) :]: v for name, v in flat.items() if name.startswith(BACKBONE_PREFIX)}
    for flat in (flat_params, flat_state)
  )
  exported = pytorch.export_state_dict(params_lib.unflatten(backbone), params_lib.unflatten(backbone_state))
  state_dict = {BACKBONE_PREFIX + name: value for name, value in exported.items()}
  state_dict.update(heads_to_mmseg(flat_params, flat_state, pool_scales=pool_scales))
  return state_dict

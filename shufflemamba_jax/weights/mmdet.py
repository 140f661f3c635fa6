"""mmdet's state-dict names for the official Mask R-CNN with the ViT-Adapter backbone, and ours.

The official detector (`MaskRCNN` of mmdet 3.3.0 with `MM_VSSM_ADT`, the
`mask_rcnn_shufflemamba_reg_fpn_coco_*_adapter.py` configs) saves `backbone.*` (the adapter: the
reference's names, mapped by `weights.pytorch`), `neck.*`, `rpn_head.*` and `roi_head.*`. Our
`models.detection.MaskRCNN` keeps mmdet's module names outside the backbone, so the rules are
per kind of tensor:

  <...>.weight of fc_cls, fc_reg, shared_fcs.{i}  (out, in)        <-> .kernel (in, out)
  <...>.upsample.weight (ConvTranspose2d, in, out, 2, 2)             <-> .kernel (2, 2, in, out)
  any other <...>.weight (a convolution, O, I, kh, kw)               <-> .kernel (kh, kw, I, O)
  <...>.bn.weight / running_mean / running_var (the FPN's SyncBN)    <-> .bn.scale / mean / var
  <...>.bn.num_batches_tracked                                       <-> nothing (int64 0 on export)
  biases as they are.

The first box-head FC reads the 7x7 RoI features flattened channel-major, as PyTorch's, so its
weight needs only the transpose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from shufflemamba_jax.models import adapter as adapter_lib
from shufflemamba_jax.models import vim
from shufflemamba_jax.models.detection import mask_rcnn
from shufflemamba_jax.weights import mmseg, pytorch
from shufflemamba_jax.weights import params as params_lib

BACKBONE_PREFIX = mmseg.BACKBONE_PREFIX
HEAD_PREFIXES = ("neck.", "rpn_head.", "roi_head.")
_LINEAR_MODULES = ("fc_cls", "fc_reg")


def is_detector_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether a state dict is an mmdet two-stage detector's (an RPN head and an RoI head)."""
  return any(name.startswith("rpn_head.") for name in state_dict) and any(
    name.startswith("roi_head.") for name in state_dict
  )


def _rename(name: str, *, to_ours: bool) -> tuple[str | None, str, bool]:
  """(the other side's name or None to drop, layout, is model state) of a head tensor's name."""
  *module, leaf = name.split(".")
  if module and module[-1] == "bn":
    official = {"weight": "scale", "running_mean": "mean", "running_var": "var", "bias": "bias"}
    names = official if to_ours else {v: k for k, v in official.items()}
    if to_ours and leaf == pytorch.NUM_BATCHES_TRACKED:
      return None, "same", True
    if leaf not in names:
      raise ValueError(f"{name}: not a BatchNorm tensor")
    return ".".join(module + [names[leaf]]), "same", leaf in ("running_mean", "running_var", "mean", "var")
  if leaf == ("weight" if to_ours else "kernel"):
    if module[-1] in _LINEAR_MODULES or (len(module) > 1 and module[-2] == "shared_fcs"):
      layout = "linear"
    else:
      layout = "conv_transpose" if module[-1] == "upsample" else "conv2d"
    return ".".join(module + ["kernel" if to_ours else "weight"]), layout, False
  return name, "same", False


def _describe(name: str, shape) -> tuple[str, tuple]:
  """`params.fill`'s describe: the official name and shape of our (name, shape)."""
  if name.startswith(BACKBONE_PREFIX):
    official, official_shape = pytorch.describe_official(name[len(BACKBONE_PREFIX) :], shape)
    return BACKBONE_PREFIX + official, official_shape
  official, layout, _ = _rename(name, to_ours=False)
  return official, pytorch.LAYOUTS[layout][1](np.empty(shape, np.bool_)).shape


def detector_config(state_dict: Mapping[str, Any], settings: Mapping[str, Any] | None = None):
  """The MaskRCNNConfig of an official adapter detector's state dict: sizes from the tensors (the
  backbone's and adapter's as `mmseg.segmenter_config` reads them, classes, FPN, box and mask
  head widths), other settings from `settings` (VisionMambaConfig, AdapterConfig or
  MaskRCNNConfig field names), else the defaults. A ValueError names a contradicting setting."""
  settings = dict(settings or {})
  if not mmseg.is_adapter_state_dict(state_dict):
    raise ValueError("the detector's backbone is not the ViT-Adapter (no backbone.spm.*): not the official detector")
  shape = lambda name: tuple(np.shape(state_dict[name]))
  backbone = mmseg.backbone_sizes(state_dict)
  pos_embed_size = backbone.pop("pos_embed_size")
  n_points = settings.get("n_points", adapter_lib.AdapterConfig.n_points)
  adapter = mmseg.adapter_sizes(state_dict, n_points, backbone["embed_dim"])
  lateral = 0
  while f"neck.lateral_convs.{lateral}.conv.weight" in state_dict:
    lateral += 1
  inferred = dict(
    num_classes=shape("roi_head.bbox_head.fc_cls.weight")[0] - 1,
    in_channels=tuple(shape(f"neck.lateral_convs.{i}.conv.weight")[1] for i in range(lateral)),
    fpn_channels=shape("neck.lateral_convs.0.conv.weight")[0],
    fpn_norm="neck.lateral_convs.0.bn.weight" in state_dict,
    fc_channels=shape("roi_head.bbox_head.fc_cls.weight")[1],
    mask_channels=shape("roi_head.mask_head.convs.0.conv.weight")[0],
    pos_embed_size=pos_embed_size,
  )
  groups = {
    "backbone": ({f.name for f in dataclasses.fields(vim.VisionMambaConfig)} - {"num_classes"}, backbone),
    "adapter": ({f.name for f in dataclasses.fields(adapter_lib.AdapterConfig)}, adapter),
    "detector": ({f.name for f in dataclasses.fields(mask_rcnn.MaskRCNNConfig)} - {"backbone", "adapter"}, inferred),
  }
  for name, value in settings.items():
    owners = [values for fields, values in groups.values() if name in fields]
    if not owners:
      raise ValueError(f"--set {name}: not a setting of VisionMambaConfig, AdapterConfig or MaskRCNNConfig")
    for values in owners:
      if name in values and values[name] != value:
        raise ValueError(f"--set {name}={value!r} contradicts the checkpoint's tensors, which give {values[name]!r}")
      values[name] = value
  # The official backbone scans patches only, trains in float32 and never shuffles.
  backbone = dict(dict(token_layout="head", slws_max_prob=0.0, img_size=224), **backbone)
  return mask_rcnn.MaskRCNNConfig(
    backbone=vim.VisionMambaConfig(**backbone), adapter=adapter_lib.AdapterConfig(**adapter), **inferred
  )


def import_detector(state_dict: Mapping[str, Any], config, *, source: str) -> tuple[dict, dict]:
  """(parameters, model state) nested dicts of our MaskRCNN of `config` from the official state
  dict, strictly: every missing, unused and mis-shaped tensor is one ValueError by official name."""
  flat, state = {}, {}
  backbone = {name[len(BACKBONE_PREFIX) :]: v for name, v in state_dict.items() if name.startswith(BACKBONE_PREFIX)}
  backbone_params, backbone_state = pytorch.split_state(pytorch.to_flat(backbone))
  flat.update({BACKBONE_PREFIX + name: value for name, value in backbone_params.items()})
  state.update({BACKBONE_PREFIX + name: value for name, value in backbone_state.items()})
  for name, value in state_dict.items():
    if name.startswith(BACKBONE_PREFIX):
      continue
    ours, layout, is_state = _rename(name, to_ours=True) if name.startswith(HEAD_PREFIXES) else (name, "same", False)
    if ours is not None:
      (state if is_state else flat)[ours] = pytorch.LAYOUTS[layout][0](np.asarray(value))
  model = params_lib.abstract_model(config)
  params = params_lib.fill(params_lib.param_tree(model), flat, source=source, describe=_describe)
  target_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
  return params, params_lib.fill(target_state, state, source=source, describe=_describe)


def export_detector(params: Mapping[str, Any], model_state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The official mmdet state dict of our MaskRCNN's nested (parameters, model state), loadable
  with `strict=True` into the official detector."""
  flat_params, flat_state = params_lib.flatten(params), params_lib.flatten(model_state)
  backbone, backbone_state = (
    {name[len(BACKBONE_PREFIX) :]: v for name, v in flat.items() if name.startswith(BACKBONE_PREFIX)}
    for flat in (flat_params, flat_state)
  )
  exported = pytorch.export_state_dict(params_lib.unflatten(backbone), params_lib.unflatten(backbone_state))
  state_dict = {BACKBONE_PREFIX + name: value for name, value in exported.items()}
  for name, value in {**flat_params, **flat_state}.items():
    if name.startswith(BACKBONE_PREFIX):
      continue
    official, layout, _ = _rename(name, to_ours=False)
    state_dict[official] = np.ascontiguousarray(pytorch.LAYOUTS[layout][1](np.asarray(value)))
    if official.endswith(".bn.running_mean"):
      state_dict[official.replace("running_mean", pytorch.NUM_BATCHES_TRACKED)] = np.zeros((), np.int64)
  return state_dict

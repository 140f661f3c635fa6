"""Optimizer of the training recipe (SPEC §4): masked AdamW, warmup + cosine, clipping, EMA decay.

The learning rate is optax's `warmup_cosine_decay_schedule` over optimizer steps: linear from
`warmup_lr` to the peak (`OptimizerSettings.peak_lr`), then cosine to `min_lr` at the last step.
Gradient accumulation is not an optax wrapper here: the train step loops over micro-batches
itself, so one call of the step is one optimizer update.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from shufflemamba_jax import checks
from shufflemamba_jax.models import vim

# Parameters that never decay, whatever their rank (SPEC §4).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "pos_embed_cls")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """The optimizer fields of a training config (configs/default.py documents each)."""

  lr: float
  lr_scale_batch: bool
  warmup_epochs: float
  warmup_lr: float
  min_lr: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip: float | None
  ema_decay: float

  def __post_init__(self):
    for name in ("lr", "warmup_epochs", "warmup_lr", "min_lr", "weight_decay", "eps"):
      checks.number(f"config.{name}", getattr(self, name))
    if self.grad_clip is not None:
      checks.number("config.grad_clip", self.grad_clip)
    for name in ("b1", "b2"):
      checks.number(f"config.{name}", getattr(self, name), 0.0, 1.0)
    # 1 would freeze the EMA; 0 turns it off.
    checks.number("config.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)

  @classmethod
  def from_config(cls, config) -> OptimizerSettings:
    return cls(**{field.name: config[field.name] for field in dataclasses.fields(cls)})

  def peak_lr(self, batch_size: int) -> float:
    """`lr`, times the global batch size / 512 (the DeiT scaling rule) when `lr_scale_batch` is on."""
    return self.lr * batch_size / 512.0 if self.lr_scale_batch else self.lr


def learning_rate_schedule(
  settings: OptimizerSettings, *, batch_size: int, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """Learning rate per optimizer step (0-based), float32: warmup, then cosine to min_lr (held)."""
  warmup = min(round(settings.warmup_epochs * steps_per_epoch), total_steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=settings.warmup_lr,
    peak_value=settings.peak_lr(batch_size),
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=settings.min_lr,
  )


def decays(path: tuple[str, ...], ndim: int) -> bool:
  """Whether the parameter at `path` (names from the root) with `ndim` dimensions decays.

  Rank >= 2 per layer decays (Linear and conv kernels, A_log); rank <= 1 (biases, D, norm
  scales) and the position / class / register embeddings do not. Under `layers` the leading
  axis stacks the blocks, so it does not count.
  """
  if any(name in NO_DECAY_NAMES for name in path) or path[-1] == "bias":
    return False
  return ndim - (path[0] == vim.LAYERS) >= 2


def weight_decay_mask(params: Any):
  """A tree of bools like `params` (a nested dict of arrays): True = decays."""
  return traverse_util.path_aware_map(lambda path, leaf: decays(path, jnp.ndim(leaf)), params)


def layer_decay_optimizer(
  settings: OptimizerSettings, schedule: optax.Schedule, rate: float, depth: int
) -> optax.GradientTransformation:
  """`create_optimizer` as the layer-decay constructor builds it (the detection recipes, and a
  segmenter's opt-in): its weight-decay rule and `layer_decay_scales(rate, depth)` rates."""
  return create_optimizer(
    settings,
    schedule,
    mask=layer_decay_weight_decay_mask,
    lr_scales=lambda updates: layer_decay_scales(updates, rate, depth),
  )


def create_optimizer(
  settings: OptimizerSettings, schedule: optax.Schedule, *, mask=weight_decay_mask, lr_scales: Any = None
) -> optax.GradientTransformation:
  """AdamW (decoupled decay, masked by `mask`: `weight_decay_mask`, or a segmenter's
  `segmentation_weight_decay_mask`, or `layer_decay_weight_decay_mask`) after optional global-norm
  clipping.

  lr_scales: None, or a tree like the parameters of arrays broadcastable to each leaf
    (`layer_decay_scales`), or a function of the updates' tree returning one (like optax's
    masks, for a task that builds its optimizer before its parameters exist): each AdamW update
    is multiplied by its scale, which is torch AdamW with one parameter group per scale
    (lr = scale * lr scales both the Adam step and the decay).
  """
  adamw = optax.adamw(
    learning_rate=schedule,
    b1=settings.b1,
    b2=settings.b2,
    eps=settings.eps,
    weight_decay=settings.weight_decay,
    mask=mask,
  )
  parts = [adamw] if lr_scales is None else [adamw, scale_updates(lr_scales)]
  if settings.grad_clip:
    parts.insert(0, optax.clip_by_global_norm(settings.grad_clip))
  # One transform alone, not a chain of one: the optimizer state keeps the layout it always had.
  return parts[0] if len(parts) == 1 else optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Semantic segmentation (the ADE20K UperNet recipe).
# ---------------------------------------------------------------------------------------------

# The segmentation recipe's paramwise_cfg custom_keys (decay_mult 0), which mmengine matches as
# substrings of the full PyTorch name ("backbone.layers.3.mixer.A_log"). The match is kept
# exactly, quirks included: ".A_log" misses the backward direction's A_b_log, which decays,
# ".D" catches D_b, and "norm" misses the heads' BatchNorms, which mmcv names `bn` (they decay).
SEGMENTATION_NO_DECAY_KEYS = (".pos_embed", ".cls_token", "norm", ".A_log", ".D")


def segmentation_decays(path: tuple[str, ...], ndim: int) -> bool:
  """Whether a segmenter parameter decays under the reference's substring rule (see above).

  Backbone names are ours and the reference's alike up to the leaf (`.kernel` / `.scale` for
  `.weight`, which no key names); the heads' and the opt-in pyramid's are not named in the
  reference, whose head modules contain none of the keys: they always decay.
  """
  del ndim
  names = [str(part) for part in path]
  if names[0] != "backbone":
    return True
  return not any(key in "backbone." + ".".join(names[1:]) for key in SEGMENTATION_NO_DECAY_KEYS)


def segmentation_weight_decay_mask(params: Any):
  """A tree of bools like a segmenter's `params` (a nested dict of arrays): True = decays."""
  return traverse_util.path_aware_map(lambda path, leaf: segmentation_decays(path, jnp.ndim(leaf)), params)


def warmup_poly_schedule(
  peak: float, *, warmup_steps: int, warmup_factor: float, total_steps: int, power: float = 1.0, end_value: float = 0.0
) -> optax.Schedule:
  """mmseg's LinearLR(start_factor=warmup_factor) over `warmup_steps`, then PolyLR(power) from
  `peak` to `end_value` at `total_steps` (the reference: 1500, 1e-6, 160k, 1.0, 0)."""
  checks.integer("warmup_steps", warmup_steps, minimum=0)
  checks.integer("total_steps", total_steps)
  if warmup_steps >= total_steps:
    raise checks.SettingError("warmup_steps", warmup_steps, f"must be fewer than total_steps={total_steps}")
  checks.number("warmup_factor", warmup_factor, 0.0, 1.0)
  checks.number("power", power)
  decay = optax.polynomial_schedule(peak, end_value, power, total_steps - warmup_steps)
  if not warmup_steps:
    return decay

  def warmup(step):
    # Not optax.linear_schedule: its float32 (start - peak) * (1 - t / W) + peak loses a 1e-6 start (3% off at t=0).
    fraction = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
    return peak * (warmup_factor + (1.0 - warmup_factor) * fraction)

  return optax.join_schedules([warmup, decay], [warmup_steps])


def warmup_multistep_schedule(
  peak: float, *, warmup_steps: int, warmup_factor: float, boundaries: tuple[int, ...], decay: float = 0.1
) -> optax.Schedule:
  """mmdet's 1x schedule: mmengine's LinearLR(start_factor=warmup_factor, by_epoch=False, begin=0,
  end=warmup_steps) and MultiStepLR(milestones=boundaries, gamma=decay), both chained on `peak`.

  boundaries: optimizer steps (0-based) from which one more `decay` applies (the recipe's
  milestones in epochs times the steps per epoch); repeats count twice, as mmengine's Counter.
  The two multiply wherever they overlap: lr(step) = peak * linear(step) * decay ** #{b <= step},
  linear going from warmup_factor at step 0 to 1 at step warmup_steps - 1 (mmengine's LinearLR
  reaches its end factor one step before `end`: total_iters = end - begin - 1), and staying 1.
  warmup_steps 0 = no warmup; 1 is refused (mmengine's LinearLR(end=1) never leaves warmup_factor).
  """
  checks.integer("warmup_steps", warmup_steps, minimum=0)
  if warmup_steps == 1:
    raise checks.SettingError("warmup_steps", warmup_steps, "must be 0 (no warmup) or >= 2")
  checks.number("warmup_factor", warmup_factor, 0.0, 1.0)
  checks.number("decay", decay)
  if isinstance(boundaries, (str, bytes)) or not hasattr(boundaries, "__iter__"):
    raise checks.SettingError("boundaries", boundaries, "must be a sequence of steps")
  boundaries = tuple(checks.integer("boundaries", boundary, minimum=0) for boundary in boundaries)
  counts = collections.Counter(boundaries)
  steps = optax.piecewise_constant_schedule(peak, {boundary: decay**count for boundary, count in counts.items()})
  if not warmup_steps:
    return steps

  def schedule(step):
    # As warmup_poly_schedule's, not optax.linear_schedule: a small warmup_factor survives float32.
    fraction = jnp.clip(jnp.asarray(step, jnp.float32) / (warmup_steps - 1), 0.0, 1.0)
    return steps(step) * (warmup_factor + (1.0 - warmup_factor) * fraction)

  return schedule


# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay (the detection recipe).
# ---------------------------------------------------------------------------------------------

# The reference detection recipes (mask_rcnn_shufflemamba_reg_fpn_coco_*_adapter.py) build AdamW with
# `MyLayerDecayOptimizerConstructor` (detection/mmdet_custom/layer_decay_optimizer_constructor.py,
# BEiT's), whose rules over the whole detector's PyTorch names are reproduced here on ours. Its
# `get_num_layer_for_vit` puts these names at layer 0 (the embeddings): whole names, then prefixes.
# The decode_head ones are Mask2Former's: no model here has them, they are kept for exactness.
LAYER_DECAY_EMBEDDING_NAMES = (
  "backbone.cls_token",
  "backbone.mask_token",
  "backbone.pos_embed",
  "backbone.visual_embed",
)
LAYER_DECAY_EMBEDDING_PREFIXES = (
  "backbone.patch_embed",
  "backbone.visual_embed",
  "decode_head.mask_embed",
  "decode_head.cls_embed",
  "decode_head.level_embed",
  "decode_head.query_embed",
  "decode_head.query_feat",
)
# The subtree holding the backbone in a detector's or segmenter's parameters.
BACKBONE = "backbone"


def _is_stacked(names: list[str]) -> bool:
  """Whether the parameter at `names` is one of the backbone's stacked blocks' (leading depth axis)."""
  return names[:2] == [BACKBONE, vim.LAYERS]


def layer_decay_decays(path: tuple[str, ...], ndim: int) -> bool:
  """Whether a detector parameter decays under the layer-decay constructor's rule.

  The constructor's test is `len(param.shape) == 1 or name.endswith('.bias') or name in
  ('pos_embed', 'cls_token', 'visual_embed')`. The last clause never matches (the names it sees
  are prefixed, `backbone.pos_embed`), so pos_embed, level_embed and A_log decay; and the
  recipes' paramwise custom_keys (`.pos_embed`, `norm`, `.A_log`, `.D` at decay_mult 0) are
  ignored, since the constructor overrides `add_params` which reads them. Biases, D, gamma and
  norm scales (1-D) do not decay. A stacked block leaf counts its dimensions per block; ours have
  the reference's rank wherever it matters (only transposes, and (n, D) for its (1, n, D) tokens).
  A 0-d parameter decays, as len(()) != 1 (no model here has one).
  """
  names = [str(part) for part in path]
  return ndim - _is_stacked(names) != 1 and names[-1] != "bias"


def layer_decay_weight_decay_mask(params: Any):
  """A tree of bools like a detector's or segmenter's `params` (a nested dict of arrays): True = decays."""
  return traverse_util.path_aware_map(lambda path, leaf: layer_decay_decays(path, jnp.ndim(leaf)), params)


def layer_decay_scales(params: Any, rate: float, depth: int):
  """The layer-decay constructor's learning-rate scale of every parameter of a detector / segmenter.

  params: a nested dict of arrays (or jax.ShapeDtypeStruct) with the backbone under `backbone`,
    its stacked blocks under `backbone.layers` with a leading (depth,) axis.
  rate, depth: the recipe's `layer_decay_rate` (0.9) and `num_layers` (the backbone's depth).
  Returns a tree like `params` of float32 arrays: () for a plain leaf, (depth, 1, ..., 1) (the
  leaf's rank) for a stacked one. With n = depth + 2 layers, layer ids are 0 for the embeddings
  (patch_embed, pos_embed, cls_token: rate ** (depth + 1)), i + 1 for block i (rate ** (depth - i))
  and n - 1 for everything else, the backbone's other parts (norm_f, the adapter) included:
  scale rate ** (n - 1 - id) = 1. Per-slice scales because the blocks are stacked in one leaf.
  Raises a SettingError for a rate outside (0, 1], a depth < 1 or a depth that is not the stacked
  blocks', and a ValueError when there is no `backbone.layers` (the rule would scale nothing).
  """
  if checks.number("rate", rate, 0.0, 1.0) == 0.0:
    raise checks.SettingError("rate", rate, "must be in (0.0, 1.0]")
  depth = checks.integer("depth", depth)
  backbone = params.get(BACKBONE) if isinstance(params, Mapping) else None
  if not isinstance(backbone, Mapping) or vim.LAYERS not in backbone:
    raise ValueError(
      f"layer decay needs a detector's or segmenter's parameters, blocks under '{BACKBONE}.{vim.LAYERS}'"
    )
  num_layers = depth + 2
  # Exponents in float64, then float32: rate ** k as PyTorch's group lr computes it in Python.
  block_scales = (rate ** np.arange(depth, 0, -1, dtype=np.float64)).astype(np.float32)

  def scale(path, leaf):
    names = [str(part) for part in path]
    shape = jnp.shape(leaf)
    if _is_stacked(names):
      if not shape or shape[0] != depth:
        raise checks.SettingError(
          "depth", depth, f"must be the stacked blocks' leading axis: {'.'.join(names)} has shape {tuple(shape)}"
        )
      return block_scales.reshape((depth,) + (1,) * (len(shape) - 1))
    name = ".".join(names)
    if name in LAYER_DECAY_EMBEDDING_NAMES or name.startswith(LAYER_DECAY_EMBEDDING_PREFIXES):
      return np.asarray(rate ** (num_layers - 1), np.float32)
    return np.asarray(1.0, np.float32)

  return traverse_util.path_aware_map(scale, params)


def scale_updates(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update by its scale in `scales` (a tree like the updates of broadcastable
  arrays, or a function of the updates returning one).

  A per-leaf multiply after AdamW rather than optax.multi_transform over one AdamW per group:
  the stacked blocks hold every block in one leaf, each slice with its own scale, which labels
  per leaf cannot express; and scaling AdamW's whole update is what a group lr does in PyTorch.
  """

  def update(updates, params=None):
    del params
    tree = scales(updates) if callable(scales) else scales
    return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, tree)

  return optax.stateless(update)

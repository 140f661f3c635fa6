"""Optimizer of the training recipe (SPEC §4): masked AdamW, warmup + cosine, clipping, EMA decay.

The learning rate is optax's `warmup_cosine_decay_schedule` over optimizer steps: linear from
`warmup_lr` to the peak (`OptimizerSettings.peak_lr`), then cosine to `min_lr` at the last step.
Gradient accumulation is not an optax wrapper here: the train step loops over micro-batches
itself, so one call of the step is one optimizer update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
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


def create_optimizer(
  settings: OptimizerSettings, schedule: optax.Schedule, *, mask=weight_decay_mask
) -> optax.GradientTransformation:
  """AdamW (decoupled decay, masked by `mask`: `weight_decay_mask`, or a segmenter's
  `segmentation_weight_decay_mask`) after optional global-norm clipping."""
  adamw = optax.adamw(
    learning_rate=schedule,
    b1=settings.b1,
    b2=settings.b2,
    eps=settings.eps,
    weight_decay=settings.weight_decay,
    mask=mask,
  )
  if not settings.grad_clip:
    return adamw
  return optax.chain(optax.clip_by_global_norm(settings.grad_clip), adamw)


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

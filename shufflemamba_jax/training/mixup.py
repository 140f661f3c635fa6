"""Mixup / CutMix with label smoothing, as pure jnp functions for the jitted train step.

timm `Mixup` semantics in "batch" mode (the DeiT recipe, SPEC section 4): with probability
`mixup_prob` a batch is mixed at all; if both alphas are on, CutMix is used with probability
`mixup_switch_prob`, else Mixup. One lambda ~ Beta(alpha, alpha) for the whole batch; every sample is
mixed with the batch reversed along its leading axis. CutMix pastes one box of relative side
sqrt(1 - lambda) (centre uniform, clipped at the borders) and corrects lambda to the pasted area.
Targets are label-smoothed one-hots (`optax.smooth_labels`) mixed with the same lambda.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from shufflemamba_jax.models import checks


@dataclasses.dataclass(frozen=True)
class MixupSettings:
  """The mixup / cutmix / label-smoothing fields of a training config's `aug` (configs/default.py)."""

  mixup_alpha: float  # Beta(alpha, alpha) for mixup; 0 = no mixup.
  cutmix_alpha: float  # Beta(alpha, alpha) for cutmix; 0 = no cutmix.
  mixup_prob: float  # Probability that a batch is mixed at all.
  mixup_switch_prob: float  # Probability of cutmix instead of mixup when both are on.
  label_smoothing: float

  def __post_init__(self):
    for name in ("mixup_alpha", "cutmix_alpha"):
      checks.number(f"config.aug.{name}", getattr(self, name))
    for name in ("mixup_prob", "mixup_switch_prob", "label_smoothing"):
      checks.number(f"config.aug.{name}", getattr(self, name), 0.0, 1.0)

  @classmethod
  def from_config(cls, config) -> MixupSettings:
    return cls(**{field.name: config.aug[field.name] for field in dataclasses.fields(cls)})


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """(batch,) int -> (batch, num_classes) float32: 1 - s + s/C on the label, s/C elsewhere."""
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)


def cutmix_box(key: jax.Array, lam: jax.Array, height: int, width: int):
  """The CutMix box (top, bottom, left, right), int32 scalars, rows [top, bottom) cols [left, right).

  Side lengths are floor(size * sqrt(1 - lam)); the centre is uniform over the image and the box
  is clipped to it, so the pasted area can be smaller than (1 - lam) of the image.
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  key_y, key_x = jax.random.split(key)
  centre_y = jax.random.randint(key_y, (), 0, height)
  centre_x = jax.random.randint(key_x, (), 0, width)
  top = jnp.clip(centre_y - cut_h // 2, 0, height)
  bottom = jnp.clip(centre_y + cut_h // 2, 0, height)
  left = jnp.clip(centre_x - cut_w // 2, 0, width)
  right = jnp.clip(centre_x + cut_w // 2, 0, width)
  return top, bottom, left, right


def box_mask(box, height: int, width: int) -> jax.Array:
  """(height, width) bool, True inside the box (top, bottom, left, right)."""
  top, bottom, left, right = box
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int, settings: MixupSettings):
  """Mixes a batch; returns (images, soft targets, lam).

  Args:
    key: a typed PRNG key for this batch.
    images: (batch, height, width, channels) float, NHWC.
    labels: (batch,) int class indices.
    num_classes: width of the targets.
    settings: the alphas, probabilities and label smoothing.
  Returns:
    images of the same shape and dtype; targets (batch, num_classes) float32 whose rows sum to 1;
    lam, float32 scalar: the weight of each sample's own label (1 when the batch is not mixed).
  """
  mixup_alpha, cutmix_alpha = settings.mixup_alpha, settings.cutmix_alpha
  targets = smooth_one_hot(labels, num_classes, settings.label_smoothing)
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or settings.mixup_prob <= 0:
    return images, targets, jnp.ones((), jnp.float32)
  _, height, width, _ = images.shape
  key_apply, key_switch, key_mixup, key_cutmix, key_box = jax.random.split(key, 5)
  apply = jax.random.uniform(key_apply) < settings.mixup_prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(key_switch) < settings.mixup_switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(key_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.ones(())
  lam_cutmix = jax.random.beta(key_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.ones(())
  box = cutmix_box(key_box, lam_cutmix, height, width)
  inside = box_mask(box, height, width)
  lam_box = 1.0 - jnp.sum(inside) / (height * width)

  flipped = images[::-1]
  lam_mixup_images = lam_mixup.astype(images.dtype)
  mixed = jnp.where(
    use_cutmix,
    jnp.where(inside[None, :, :, None], flipped, images),
    images * lam_mixup_images + flipped * (1 - lam_mixup_images),
  )
  lam = jnp.where(use_cutmix, lam_box, lam_mixup).astype(jnp.float32)
  lam = jnp.where(apply, lam, 1.0)
  images = jnp.where(apply, mixed, images)
  targets = targets * lam + targets[::-1] * (1.0 - lam)
  return images, targets, lam

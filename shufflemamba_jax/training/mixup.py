"""Mixup / CutMix with label smoothing, as pure jnp functions for the jitted train step.

timm `Mixup` semantics in "batch" mode (the DeiT recipe, SPEC section 4), applied to fixed groups
of `mixup_group_size` consecutive samples, as the reference applies it to each GPU's batch: with
probability `mixup_prob` a group is mixed at all; if both alphas are on, CutMix is used with
probability `mixup_switch_prob`, else Mixup. One lambda ~ Beta(alpha, alpha) per group; every
sample is mixed with its group reversed. CutMix pastes one box of relative side sqrt(1 - lambda)
(centre uniform, clipped at the borders) and corrects lambda to the pasted area. Targets are
label-smoothed one-hots (`optax.smooth_labels`) mixed with the same lambda.

Group g draws from fold_in(key, g), so the result does not depend on the mesh; a group that
divides each device's share of the batch never leaves its device (the reference's per-GPU batch
is the recipe's group size).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import optax

from shufflemamba_jax import checks
from shufflemamba_jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class MixupSettings:
  """The mixup / cutmix / label-smoothing fields of a training config's `aug` (configs/default.py)."""

  mixup_alpha: float  # Beta(alpha, alpha) for mixup; 0 = no mixup.
  cutmix_alpha: float  # Beta(alpha, alpha) for cutmix; 0 = no cutmix.
  mixup_prob: float  # Probability that a group is mixed at all.
  mixup_switch_prob: float  # Probability of cutmix instead of mixup when both are on.
  label_smoothing: float
  mixup_group_size: int  # Consecutive samples that share one draw and are mixed among themselves.

  def __post_init__(self):
    for name in ("mixup_alpha", "cutmix_alpha"):
      checks.number(f"config.aug.{name}", getattr(self, name))
    for name in ("mixup_prob", "mixup_switch_prob", "label_smoothing"):
      checks.number(f"config.aug.{name}", getattr(self, name), 0.0, 1.0)
    checks.integer("config.aug.mixup_group_size", self.mixup_group_size)

  @property
  def enabled(self) -> bool:
    """Whether any sample can be mixed."""
    return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mixup_prob > 0

  def check_batch(self, global_batch: int, batch_shards: int = 1) -> None:
    """Raises a SettingError unless the group size divides `global_batch`; warns when a group
    spans devices (`batch_shards` of them hold the batch), which costs cross-device traffic."""
    if not self.enabled:
      return
    group = self.mixup_group_size
    if global_batch % group:
      raise checks.SettingError(
        "config.aug.mixup_group_size", group, f"must divide the global batch of {global_batch} (config.batch_size)"
      )
    per_device = global_batch // batch_shards
    if per_device % group:
      logging.warning(
        "config.aug.mixup_group_size=%d does not divide the %d samples of each of the %d devices: "
        "mixup groups span devices and every step sends images between them. Use a divisor of %d.",
        group,
        per_device,
        batch_shards,
        per_device,
      )

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


def _draw(key, settings: MixupSettings, height: int, width: int) -> dict[str, jax.Array]:
  """One group's random choices: whether it is mixed, CutMix or Mixup, lambdas and the box."""
  mixup_alpha, cutmix_alpha = settings.mixup_alpha, settings.cutmix_alpha
  key_apply, key_switch, key_mixup, key_cutmix, key_box = jax.random.split(key, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(key_switch) < settings.mixup_switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(key_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.ones(())
  lam_cutmix = jax.random.beta(key_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.ones(())
  return {
    "apply": jax.random.uniform(key_apply) < settings.mixup_prob,
    "use_cutmix": use_cutmix,
    "lam_mixup": lam_mixup.astype(jnp.float32),
    "box": jnp.stack(cutmix_box(key_box, lam_cutmix, height, width)),
  }


def _mix_group(draw, images, targets):
  """One group: (images, targets) mixed with the group reversed by `draw`, and its lambda."""
  _, height, width, _ = images.shape
  inside = box_mask(tuple(draw["box"]), height, width)
  lam_box = 1.0 - jnp.sum(inside) / (height * width)
  flipped = images[::-1]
  lam_mixup_images = draw["lam_mixup"].astype(images.dtype)
  mixed = jnp.where(
    draw["use_cutmix"],
    jnp.where(inside[None, :, :, None], flipped, images),
    images * lam_mixup_images + flipped * (1 - lam_mixup_images),
  )
  lam = jnp.where(draw["use_cutmix"], lam_box, draw["lam_mixup"]).astype(jnp.float32)
  lam = jnp.where(draw["apply"], lam, 1.0)
  images = jnp.where(draw["apply"], mixed, images)
  return images, targets * lam + targets[::-1] * (1.0 - lam), lam


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int, settings: MixupSettings):
  """Mixes a batch group by group; returns (images, soft targets, lam).

  Args:
    key: a typed PRNG key for this batch; group g uses fold_in(key, g).
    images: (batch, height, width, channels) float, NHWC; batch a multiple of
      settings.mixup_group_size.
    labels: (batch,) int class indices.
    num_classes: width of the targets.
    settings: the alphas, probabilities, label smoothing and group size.
  Returns:
    images of the same shape and dtype; targets (batch, num_classes) float32 whose rows sum to 1;
    lam, (batch,) float32: the weight of each sample's own label (1 where it is not mixed).
  """
  batch = images.shape[0]
  targets = smooth_one_hot(labels, num_classes, settings.label_smoothing)
  if not settings.enabled:
    return images, targets, jnp.ones((batch,), jnp.float32)
  settings.check_batch(batch)
  group = settings.mixup_group_size
  num_groups = batch // group

  _, height, width, _ = images.shape
  draws = jax.vmap(lambda index: _draw(jax.random.fold_in(key, index), settings, height, width))(jnp.arange(num_groups))
  mixed, targets, lam = jax.vmap(_mix_group)(
    sharding.replicate(draws),
    images.reshape((num_groups, group) + images.shape[1:]),
    targets.reshape(num_groups, group, num_classes),
  )
  return mixed.reshape(images.shape), targets.reshape(batch, num_classes), jnp.repeat(lam, group)

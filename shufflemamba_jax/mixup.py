"""Mixup / CutMix with label smoothing, as pure jnp functions for the jitted train step.

timm `Mixup` semantics in "batch" mode (the DeiT recipe, SPEC section 4): with probability
`prob` a batch is mixed at all; if both alphas are on, CutMix is used with probability
`switch_prob`, else Mixup. One lambda ~ Beta(alpha, alpha) for the whole batch; every sample is
mixed with the batch reversed along its leading axis. CutMix pastes one box of relative side
sqrt(1 - lambda) (centre uniform, clipped at the borders) and corrects lambda to the pasted area.
Targets are label-smoothed one-hots mixed with the same lambda.
"""

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """(batch,) int -> (batch, num_classes) float32: 1 - s + s/C on the label, s/C elsewhere."""
  off_value = smoothing / num_classes
  on_value = 1.0 - smoothing + off_value
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return one_hot * (on_value - off_value) + off_value


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


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
              mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
              switch_prob: float = 0.5, label_smoothing: float = 0.1):
  """Mixes a batch; returns (images, soft targets, lam).

  Args:
    key: a typed PRNG key for this batch.
    images: (batch, height, width, channels) float, NHWC.
    labels: (batch,) int class indices.
  Returns:
    images of the same shape and dtype; targets (batch, num_classes) float32 whose rows sum to 1;
    lam, float32 scalar: the weight of each sample's own label (1 when the batch is not mixed).
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
    return images, targets, jnp.ones((), jnp.float32)
  _, height, width, _ = images.shape
  key_apply, key_switch, key_mixup, key_cutmix, key_box = jax.random.split(key, 5)
  apply = jax.random.uniform(key_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(key_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = (jax.random.beta(key_mixup, mixup_alpha, mixup_alpha)
               if mixup_alpha > 0 else jnp.ones(()))
  lam_cutmix = (jax.random.beta(key_cutmix, cutmix_alpha, cutmix_alpha)
                if cutmix_alpha > 0 else jnp.ones(()))
  box = cutmix_box(key_box, lam_cutmix, height, width)
  inside = box_mask(box, height, width)
  lam_box = 1.0 - jnp.sum(inside) / (height * width)

  flipped = images[::-1]
  lam_mixup_images = lam_mixup.astype(images.dtype)
  mixed = jnp.where(
      use_cutmix,
      jnp.where(inside[None, :, :, None], flipped, images),
      images * lam_mixup_images + flipped * (1 - lam_mixup_images))
  lam = jnp.where(use_cutmix, lam_box, lam_mixup).astype(jnp.float32)
  lam = jnp.where(apply, lam, 1.0)
  images = jnp.where(apply, mixed, images)
  targets = targets * lam + targets[::-1] * (1.0 - lam)
  return images, targets, lam


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example cross entropy with soft targets: (batch, classes) x2 -> (batch,) float32."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets * log_probs, axis=-1)

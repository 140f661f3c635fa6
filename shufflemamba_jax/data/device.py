"""What happens to an input batch once it is on the device, inside the jitted steps.

Host batches cross to the accelerators as uint8, a quarter of the bytes of float32; the
normalization and random erasing (which needs normalized pixels) run here, in jnp, under the
same jit as the model. Every op is per sample and keyed by the sample's index in the global
batch, so nothing crosses devices and the result does not depend on the mesh.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from shufflemamba_jax.data import IMAGENET_MEAN, IMAGENET_STD


def normalize(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """uint8 (or 0..255 float) (..., 3) pixels -> float32 (x / 255 - mean) / std."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def _erase_one(key, image, prob, area_range, ratio_range, max_attempts):
  apply_key, area_key, ratio_key, top_key, left_key, noise_key = jax.random.split(key, 6)
  height, width, _ = image.shape
  target = jax.random.uniform(area_key, (max_attempts,), minval=area_range[0], maxval=area_range[1]) * height * width
  log_ratio = jax.random.uniform(
    ratio_key, (max_attempts,), minval=math.log(ratio_range[0]), maxval=math.log(ratio_range[1])
  )
  aspect = jnp.exp(log_ratio)
  erase_h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  erase_w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (erase_h < height) & (erase_w < width)
  first = jnp.argmax(fits)
  erase_h, erase_w = erase_h[first], erase_w[first]
  top = jax.random.randint(top_key, (), 0, jnp.maximum(height - erase_h, 0) + 1)
  left = jax.random.randint(left_key, (), 0, jnp.maximum(width - erase_w, 0) + 1)
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  inside = (rows >= top) & (rows < top + erase_h) & (cols >= left) & (cols < left + erase_w)
  erase = jnp.any(fits) & (jax.random.uniform(apply_key) < prob)
  noise = jax.random.normal(noise_key, image.shape, image.dtype)
  return jnp.where(inside & erase, noise, image)


def random_erasing(
  key: jax.Array,
  images: jax.Array,
  prob: float = 0.25,
  area_range=(0.02, 1 / 3),
  ratio_range=(0.3, 3.3),
  max_attempts: int = 10,
) -> jax.Array:
  """timm RandomErasing(mode='pixel', max_count=1) on normalized float (batch, H, W, C) images.

  Each sample, with probability `prob`, gets one rectangle of area fraction U(area_range) and
  log-uniform aspect ratio in `ratio_range` filled with N(0, 1) noise per pixel and channel: the
  first of `max_attempts` candidates that fits, none if none fits. Sample i draws from
  fold_in(key, i), i its index in the (global) batch.
  """
  keys = jax.vmap(lambda index: jax.random.fold_in(key, index))(jnp.arange(images.shape[0]))
  return jax.vmap(lambda k, image: _erase_one(k, image, prob, area_range, ratio_range, max_attempts))(keys, images)


@dataclasses.dataclass(frozen=True)
class DeviceTransform:
  """The on-device part of the input transform: normalization, and random erasing in training.

  The settings are checked where they are configured (`augment.TrainAugmentation`).
  """

  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  random_erasing_prob: float = 0.0

  def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """uint8 (batch, H, W, 3) -> float32 normalized; with a `key` (training), random erasing too."""
    images = normalize(images, self.mean, self.std)
    if key is not None and self.random_erasing_prob > 0:
      images = random_erasing(key, images, self.random_erasing_prob)
    return images

  @classmethod
  def of_run(cls, run_config: dict) -> DeviceTransform:
    """The evaluation transform of a saved run's config (a checkpoint's `config` item; {}: ImageNet's)."""
    aug = run_config.get("aug", {})
    return cls(tuple(aug.get("mean", IMAGENET_MEAN)), tuple(aug.get("std", IMAGENET_STD)))


# The evaluation transform of every ImageNet recipe: normalization with the ImageNet statistics.
IMAGENET = DeviceTransform()

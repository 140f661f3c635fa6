"""mmseg's ADE20K training augmentation for (image, label map) pairs, in TensorFlow ops.

Training: random resize of a (long, short) scale by a ratio in [0.5, 2.0] keeping the aspect
ratio (image bilinear, labels nearest); a random crop whose most frequent class covers at most
`cat_max_ratio` of the labelled pixels (up to 10 tries, then the last one, as mmseg's
RandomCrop); horizontal flip with probability 0.5; photometric distortion (brightness,
contrast, saturation and hue, each with probability 0.5, contrast before or after the other
two); padding to the crop size with the mean color and label 255 (the mean color becomes 0
once normalized, as mmseg pads after normalizing). Evaluation (`eval_views`): the image alone,
resized keeping its ratio to fit the scale (mmseg's test pipeline), or by each test-time
augmentation ratio (its tta_pipeline), never padded; the label map stays at its original size.

Every random choice uses `tf.random.stateless_*` ops on a seed of shape (2,), so an example is
a pure function of (image, label, seed). Images are uint8 (height, width, 3) throughout and
labels uint8 (height, width); normalization happens on the device.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from shufflemamba_jax import checks
from shufflemamba_jax.data import IGNORE_INDEX, IMAGENET_MEAN

CAT_MAX_TRIES = 10


@dataclasses.dataclass(frozen=True)
class SegmentationAugmentation:
  """Settings of the training augmentation (config `seg_aug.*`), with the ADE20K recipe's values."""

  scale: tuple[int, int] = (2048, 512)  # (long side, short side) before the ratio.
  ratio_range: tuple[float, float] = (0.5, 2.0)
  crop_size: int = 512
  cat_max_ratio: float = 0.75
  hflip_prob: float = 0.5
  photometric: bool = True
  brightness_delta: float = 32.0
  contrast_range: tuple[float, float] = (0.5, 1.5)
  saturation_range: tuple[float, float] = (0.5, 1.5)
  hue_delta: float = 18.0  # OpenCV hue units: 180 is the full circle.
  fill_color: tuple[int, int, int] = tuple(round(255 * m) for m in IMAGENET_MEAN)
  # Evaluation: the image resized to fit eval_scale (long, short) keeping its ratio, unpadded.
  eval_scale: tuple[int, int] = (2048, 512)

  def __post_init__(self):
    def field(name):
      return f"config.seg_aug.{name}"

    for name in ("scale", "eval_scale"):
      checks.size_pair(field(name), getattr(self, name))
    checks.integer(field("crop_size"), self.crop_size)
    for name in ("ratio_range", "contrast_range", "saturation_range"):
      low, high = getattr(self, name)
      if not 0 < low <= high:
        raise checks.SettingError(field(name), getattr(self, name), "must be (low, high) with 0 < low <= high")
    checks.number(field("cat_max_ratio"), self.cat_max_ratio, 0.0, 1.0)
    checks.number(field("hflip_prob"), self.hflip_prob, 0.0, 1.0)
    checks.number(field("brightness_delta"), self.brightness_delta, 0.0, 255.0)
    checks.number(field("hue_delta"), self.hue_delta, 0.0, 180.0)


def rescale_size(height, width, scale, ratio=1.0):
  """mmcv's keep-ratio rescale: the largest size with long side <= max(scale) * ratio and short
  side <= min(scale) * ratio. Returns int32 (new height, new width)."""
  height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  long_edge, short_edge = float(max(scale)) * ratio, float(min(scale)) * ratio
  factor = tf.minimum(long_edge / tf.maximum(height, width), short_edge / tf.minimum(height, width))
  return tf.cast(height * factor + 0.5, tf.int32), tf.cast(width * factor + 0.5, tf.int32)


def resize_pair(image: tf.Tensor, label: tf.Tensor | None, size):
  """Image bilinear (uint8 out), label nearest; `label` may be None."""
  resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")
  resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
  if label is None:
    return resized, None
  label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
  return resized, label


def keep_ratio_size(height, width, scale):
  """mmcv's `rescale_size` in float64 as mmcv computes it in Python: factor = min(max(scale) / long
  side, min(scale) / short side), new side = int(side * factor + 0.5). `scale` is a pair of (int)
  tensors or numbers in either order. Returns int32 (new height, new width)."""
  height, width = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  first, second = tf.cast(scale[0], tf.float64), tf.cast(scale[1], tf.float64)
  factor = tf.minimum(
    tf.maximum(first, second) / tf.maximum(height, width), tf.minimum(first, second) / tf.minimum(height, width)
  )
  return tf.cast(height * factor + 0.5, tf.int32), tf.cast(width * factor + 0.5, tf.int32)


def ratio_size(height, width, ratio: float):
  """The size mmcv's `Resize(scale_factor=ratio, keep_ratio=True)` gives an image of (height,
  width): the scale (int(width * ratio + 0.5), int(height * ratio + 0.5)) of the image itself (not
  of eval_scale), then `keep_ratio_size` within it. Returns int32 (new height, new width)."""
  h64, w64 = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  scale = (tf.cast(w64 * ratio + 0.5, tf.int32), tf.cast(h64 * ratio + 0.5, tf.int32))
  return keep_ratio_size(height, width, scale)


def eval_resize(image: tf.Tensor, scale) -> tf.Tensor:
  """Evaluation: uint8 image resized (bilinear, keep ratio, mmcv's sizes) to fit `scale` = (long, short)."""
  shape = tf.shape(image)
  return resize_pair(image, None, keep_ratio_size(shape[0], shape[1], scale))[0]


def eval_views(image: tf.Tensor, scale, ratios: tuple[float, ...] | None = None) -> tuple[tf.Tensor, ...]:
  """The evaluation inputs of one uint8 (H, W, 3) image, unpadded uint8 (h, w, 3) each.

  ratios None: one view, mmseg's test pipeline `Resize(scale=scale, keep_ratio=True)`. Otherwise
  one view per ratio, its tta_pipeline `Resize(scale_factor=ratio, keep_ratio=True)` of the
  original image (`ratio_size`; the flips are made on the device). The label map is not
  resized: predictions are scored at the original size.
  """
  if ratios is None:
    return (eval_resize(image, scale),)
  shape = tf.shape(image)
  return tuple(resize_pair(image, None, ratio_size(shape[0], shape[1], ratio))[0] for ratio in ratios)


def _crop_offsets(shape, crop_size, seed):
  margin_h = tf.maximum(shape[0] - crop_size, 0)
  margin_w = tf.maximum(shape[1] - crop_size, 0)
  top = tf.random.stateless_uniform([], seed, 0, margin_h + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], _fold(seed, 1), 0, margin_w + 1, dtype=tf.int32)
  return top, left


def _fold(seed, value):
  return tf.random.experimental.stateless_fold_in(seed, value)


def random_crop(image, label, seed, crop_size: int, cat_max_ratio: float = 0.75):
  """mmseg's RandomCrop: a crop_size window (smaller where the image is), retried up to 10 times
  while one class covers more than `cat_max_ratio` of its non-ignored pixels."""
  shape = tf.shape(label)
  height, width = tf.minimum(shape[0], crop_size), tf.minimum(shape[1], crop_size)

  def crop_label(offsets):
    return label[offsets[0] : offsets[0] + height, offsets[1] : offsets[1] + width]

  def acceptable(offsets):
    counts = tf.math.bincount(tf.cast(tf.reshape(crop_label(offsets), [-1]), tf.int32), minlength=256)[:IGNORE_INDEX]
    counts = tf.boolean_mask(counts, counts > 0)
    total = tf.reduce_sum(counts)
    return tf.logical_and(
      tf.size(counts) > 1, tf.cast(tf.reduce_max(counts), tf.float32) < cat_max_ratio * tf.cast(total, tf.float32)
    )

  offsets = tf.stack(_crop_offsets(shape, crop_size, _fold(seed, 0)))
  if cat_max_ratio < 1.0:

    def retry(attempt, offsets):
      return attempt + 1, tf.stack(_crop_offsets(shape, crop_size, _fold(seed, attempt)))

    def keep_trying(attempt, offsets):
      # mmseg checks 10 crops and, when all fail, takes an 11th unchecked.
      return tf.logical_and(attempt <= CAT_MAX_TRIES, tf.logical_not(acceptable(offsets)))

    _, offsets = tf.while_loop(keep_trying, retry, (tf.constant(1, tf.int32), offsets))
  top, left = offsets[0], offsets[1]
  return image[top : top + height, left : left + width], label[top : top + height, left : left + width]


def photometric_distortion(image, seed, settings: SegmentationAugmentation):
  """mmseg's PhotoMetricDistortion on a uint8 image (each step clipped to 0..255)."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 9))
  coin = lambda s: tf.random.stateless_uniform([], s) < 0.5
  uniform = lambda s, low, high: tf.random.stateless_uniform([], s, low, high)
  image = tf.cast(image, tf.float32)
  clip = lambda x: tf.clip_by_value(x, 0.0, 255.0)
  delta = settings.brightness_delta
  image = tf.where(coin(seeds[0]), clip(image + uniform(seeds[1], -delta, delta)), image)
  contrast_first = coin(seeds[2])
  contrast_factor = uniform(seeds[4], *settings.contrast_range)
  contrast = lambda x: tf.where(coin(seeds[3]), clip(x * contrast_factor), x)
  image = tf.cond(contrast_first, lambda: contrast(image), lambda: image)
  hsv = tf.image.rgb_to_hsv(image / 255.0)
  saturation = tf.where(
    coin(seeds[5]), tf.clip_by_value(hsv[..., 1] * uniform(seeds[6], *settings.saturation_range), 0.0, 1.0), hsv[..., 1]
  )
  hue_shift = uniform(seeds[8], -settings.hue_delta, settings.hue_delta) / 180.0
  hue = tf.where(coin(seeds[7]), tf.math.floormod(hsv[..., 0] + hue_shift, 1.0), hsv[..., 0])
  image = clip(tf.image.hsv_to_rgb(tf.stack([hue, saturation, hsv[..., 2]], axis=-1)) * 255.0)
  image = tf.cond(contrast_first, lambda: image, lambda: contrast(image))
  return tf.cast(tf.round(image), tf.uint8)


def pad_to(image, label, size, fill_color):
  """Pads at the bottom and right to `size` (an int for a square, or (height, width)): the image
  with `fill_color`, the label with 255."""
  height, width = (size, size) if isinstance(size, int) else size
  shape = tf.shape(label)
  paddings = [[0, height - shape[0]], [0, width - shape[1]]]
  channels = [tf.pad(image[..., c], paddings, constant_values=int(fill_color[c])) for c in range(3)]
  label = tf.pad(label, paddings, constant_values=IGNORE_INDEX)
  image = tf.stack(channels, axis=-1)
  image.set_shape([height, width, 3])
  label.set_shape([height, width])
  return image, label


def augment_train_pair(image, label, seed, settings: SegmentationAugmentation):
  """The training augmentation of one example.

  Args:
    image: uint8 (H, W, 3); label: uint8 (H, W), 255 ignored; seed: int (2,) stateless seed.

  Returns:
    (uint8 (crop, crop, 3), uint8 (crop, crop)).
  """
  resize_seed, crop_seed, flip_seed, photo_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  ratio = tf.random.stateless_uniform([], resize_seed, *settings.ratio_range)
  shape = tf.shape(label)
  image, label = resize_pair(image, label, rescale_size(shape[0], shape[1], settings.scale, ratio))
  image, label = random_crop(image, label, crop_seed, settings.crop_size, settings.cat_max_ratio)
  flip = tf.random.stateless_uniform([], flip_seed) < settings.hflip_prob
  image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
  label = tf.cond(flip, lambda: label[:, ::-1], lambda: label)
  if settings.photometric:
    image = photometric_distortion(image, photo_seed, settings)
  return pad_to(image, label, settings.crop_size, settings.fill_color)

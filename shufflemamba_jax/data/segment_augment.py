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

Equal to mmseg 1.2.2 with mmcv 2.x bit for bit, given the same random choices (checked with
opencv-python 5.1 on x86 with AVX2; tests/test_segment_augment.py): the resized size
(RandomResize truncates scale * ratio to integers, then mmcv's rescale_size in float64); the
label map's resize (cv2's INTER_NEAREST: source index floor(x * (1 / (target / source))) in
float64); PhotoMetricDistortion in uint8, each step truncated, saturation and hue each through
OpenCV's uint8 HSV and back (its fixed-point RGB2HSV; its float32 HSV2RGB with the fused
multiply-add, the truncation of its SIMD loop and the rounding of each row's last width % 32
pixels, which OpenCV's build on another SIMD width would place elsewhere; all 2^24 inputs of
each conversion checked once against cv2.cvtColor). Not equal: the image's bilinear resize is
TF's float bilinear (half-pixel centres, rounded) where cv2's INTER_LINEAR uses 11-bit
fixed-point weights: at most 1 gray level apart, about 0.1 on average (8-13% of values differ by
1 on ADE20K-like sizes and ratios 0.5 to 2); and the random numbers come from stateless seeds,
not numpy's generator (the same distributions).

Every random choice uses `tf.random.stateless_*` ops on a seed of shape (2,), so an example is
a pure function of (image, label, seed). Images are uint8 (height, width, 3) throughout and
labels uint8 (height, width); normalization happens on the device.
"""

from __future__ import annotations

import dataclasses

import numpy as np
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
  hue_delta: int = 18  # OpenCV hue units: 180 is the full circle; shifts in [-hue_delta, hue_delta).
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
    checks.integer(field("hue_delta"), self.hue_delta, minimum=0)
    checks.number(field("hue_delta"), self.hue_delta, 0.0, 180.0)


def rescale_size(height, width, scale, ratio=1.0):
  """mmcv's keep-ratio rescale after RandomResize's ratio: the scale becomes
  (int(long * ratio), int(short * ratio)) (mmcv's `_random_sample_ratio`), then the factor is
  min(long' / max(h, w), short' / min(h, w)) and each side int(side * factor + 0.5) (mmcv's
  `rescale_size`), in float64 as Python computes it. `height`, `width` and `ratio` may be tensors
  of one shape. Returns int32 (new height, new width)."""
  height, width = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  ratio = tf.cast(ratio, tf.float64)
  long_edge, short_edge = tf.floor(float(max(scale)) * ratio), tf.floor(float(min(scale)) * ratio)
  factor = tf.minimum(long_edge / tf.maximum(height, width), short_edge / tf.minimum(height, width))
  return tf.cast(height * factor + 0.5, tf.int32), tf.cast(width * factor + 0.5, tf.int32)


def _nearest_indices(source, target):
  """OpenCV's INTER_NEAREST source index of each target index: floor(x * (1 / (target / source)))
  in float64 (as cv::resizeNN computes it), at most source - 1."""
  inverse_scale = 1.0 / (tf.cast(target, tf.float64) / tf.cast(source, tf.float64))
  index = tf.cast(tf.floor(tf.cast(tf.range(target), tf.float64) * inverse_scale), tf.int32)
  return tf.minimum(index, source - 1)


def resize_nearest(label: tf.Tensor, size) -> tf.Tensor:
  """cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST), which mmcv's imresize
  and imrescale use for label maps: (H, W, ...) to `size` = (height, width)."""
  shape = tf.shape(label)
  rows = _nearest_indices(shape[0], size[0])
  columns = _nearest_indices(shape[1], size[1])
  return tf.gather(tf.gather(label, rows, axis=0), columns, axis=1)


def resize_pair(image: tf.Tensor, label: tf.Tensor | None, size):
  """Image bilinear (uint8 out; TF's half-pixel bilinear, rounded), label as cv2's
  INTER_NEAREST; `label` may be None."""
  resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")
  resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
  if label is None:
    return resized, None
  return resized, resize_nearest(label, size)


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


# OpenCV's uint8 RGB <-> HSV (H in [0, 180), S and V in [0, 255]) as cv2.cvtColor computes it
# (modules/imgproc/src/color_hsv.simd.hpp), on int32 planes (one op per plane is several times
# faster than on interleaved channels). RGB2HSV_b is fixed point with 12 fraction bits and
# reciprocal tables rint((255 << 12) / v) and rint((180 << 12) / (6 diff)); the tables' entries
# are computed per pixel here (the same float64 division and rounding; tf.gather is slower).
_HSV_SHIFT = 12
# HSV2RGB_b goes through float32: hue * (6 / 180), the sector's table entry, times 255. Its SIMD
# loop (blocks of 4 vectors of 8 float32 per row, 32 pixels, in the AVX2 code OpenCV dispatches
# on x86) truncates to uint8, and the compiler fuses 1 - s * f into one rounding (FMA); the pixels
# after a row's last whole block go through the scalar loop, which rounds to nearest instead.
HSV2RGB_BLOCK = 32
_HSV_HUE_SCALE = np.float32(6.0) / np.float32(180.0)
_INV_255 = np.float32(1.0) / np.float32(255.0)


def rgb_to_hsv_cv(red, green, blue):
  """cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV) on int32 (H, W) planes of 0..255: int32 (hue,
  saturation, value) planes (equal to COLOR_BGR2HSV of the channel-reversed image)."""
  value = tf.maximum(tf.maximum(blue, green), red)
  diff = value - tf.minimum(tf.minimum(blue, green), red)
  half = 1 << (_HSV_SHIFT - 1)
  # Where the value or diff is 0 the table holds 0; any entry gives the same result there.
  sdiv = tf.cast(tf.round((255 << _HSV_SHIFT) / tf.cast(tf.maximum(value, 1), tf.float64)), tf.int32)
  saturation = tf.bitwise.right_shift(diff * sdiv + half, _HSV_SHIFT)
  hdiv = tf.cast(tf.round((180 << _HSV_SHIFT) / (6.0 * tf.cast(tf.maximum(diff, 1), tf.float64))), tf.int32)
  hue = tf.where(
    tf.equal(value, red), green - blue, tf.where(tf.equal(value, green), blue - red + 2 * diff, red - green + 4 * diff)
  )
  hue = tf.bitwise.right_shift(hue * hdiv + half, _HSV_SHIFT)  # Arithmetic: hue may be negative.
  return tf.where(hue < 0, hue + 180, hue), saturation, value


def _one_minus_product(a, b):
  """1 - a * b in float32 with one rounding, as the fused multiply-add OpenCV's build does (the
  product of two float32 is exact in float64; checked on every uint8 HSV input)."""
  return tf.cast(1.0 - tf.cast(a, tf.float64) * tf.cast(b, tf.float64), tf.float32)


def hsv_to_rgb_cv(hue, saturation, value):
  """cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) on int32 (H, W) planes of 0..255: int32 (red, green,
  blue) planes, including the rounding (not truncation) of each row's last width % HSV2RGB_BLOCK
  pixels."""
  hue = tf.cast(hue, tf.float32) * _HSV_HUE_SCALE
  sector = tf.floor(hue)
  fraction = hue - sector
  saturation = tf.cast(saturation, tf.float32) * _INV_255
  value = tf.cast(value, tf.float32) * _INV_255
  # OpenCV's table: v, v(1 - s), v(1 - s f), v(1 - s(1 - f)), and which entry each channel takes.
  t0, t1 = value, value * (1.0 - saturation)
  t2 = value * _one_minus_product(saturation, fraction)
  t3 = value * _one_minus_product(saturation, 1.0 - fraction)
  k = tf.math.floormod(tf.cast(sector, tf.int32), 6)
  red = tf.where(k == 1, t2, tf.where(k == 4, t3, tf.where((k == 2) | (k == 3), t1, t0)))
  green = tf.where(k == 0, t3, tf.where(k == 3, t2, tf.where(k >= 4, t1, t0)))
  blue = tf.where(k == 2, t3, tf.where(k == 5, t2, tf.where(k <= 1, t1, t0)))
  width = tf.shape(hue)[1]
  scalar_tail = (tf.range(width) >= width - width % HSV2RGB_BLOCK)[None, :]

  def to_uint8_range(channel):
    channel = channel * 255.0
    channel = tf.where(scalar_tail, tf.round(channel), channel)  # tf.round: half to even, as cvRound.
    return tf.clip_by_value(tf.cast(channel, tf.int32), 0, 255)  # The cast truncates.

  return to_uint8_range(red), to_uint8_range(green), to_uint8_range(blue)


def _convert(plane, alpha=1.0, beta=0.0):
  """mmseg's PhotoMetricDistortion.convert: clip(float32(x) * alpha + beta, 0, 255) truncated, in
  float32 as numpy computes it (alpha and beta float32); int32 out."""
  plane = tf.cast(plane, tf.float32) * tf.cast(alpha, tf.float32) + tf.cast(beta, tf.float32)
  return tf.cast(tf.clip_by_value(plane, 0.0, 255.0), tf.int32)


def photometric_parameters(seed, settings: SegmentationAugmentation) -> dict[str, tf.Tensor]:
  """The random choices of PhotoMetricDistortion from a stateless seed: each step on with
  probability 0.5; brightness beta ~ U[-brightness_delta, brightness_delta); contrast before the
  saturation and hue (mmseg's mode 1) with probability 0.5, alpha ~ U[contrast_range);
  saturation alpha ~ U[saturation_range); hue shift an integer in [-hue_delta, hue_delta) (numpy's
  randint excludes the upper bound)."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 9))
  coin = lambda s: tf.random.stateless_uniform([], s) < 0.5
  uniform = lambda s, low, high: tf.random.stateless_uniform([], s, low, high)
  delta = int(settings.hue_delta)
  hue_shift = tf.random.stateless_uniform([], seeds[8], -delta, delta, dtype=tf.int32) if delta else tf.constant(0)
  return {
    "brightness": coin(seeds[0]),
    "beta": uniform(seeds[1], -settings.brightness_delta, settings.brightness_delta),
    "contrast_first": coin(seeds[2]),
    "contrast": coin(seeds[3]),
    "contrast_alpha": uniform(seeds[4], *settings.contrast_range),
    "saturation": coin(seeds[5]),
    "saturation_alpha": uniform(seeds[6], *settings.saturation_range),
    "hue": coin(seeds[7]),
    "hue_shift": hue_shift,
  }


def apply_photometric(image, parameters) -> tf.Tensor:
  """PhotoMetricDistortion.transform on an RGB uint8 (H, W, 3) image with the given choices (see
  `photometric_parameters`), in uint8 as mmseg does it on BGR: each step truncated to uint8;
  saturation and hue each through OpenCV's uint8 HSV and back."""
  p = parameters
  planes = tuple(tf.cast(plane, tf.int32) for plane in tf.unstack(image, axis=-1))

  def when(flag, step, planes):
    return tf.cond(flag, lambda: tuple(step(*planes)), lambda: planes)

  def brightness(*rgb):
    return [_convert(x, beta=p["beta"]) for x in rgb]

  def contrast(*rgb):
    return [_convert(x, alpha=p["contrast_alpha"]) for x in rgb]

  def saturation(*rgb):
    hue, sat, value = rgb_to_hsv_cv(*rgb)
    return hsv_to_rgb_cv(hue, _convert(sat, alpha=p["saturation_alpha"]), value)

  def hue(*rgb):
    hue, sat, value = rgb_to_hsv_cv(*rgb)
    return hsv_to_rgb_cv(tf.math.floormod(hue + p["hue_shift"], 180), sat, value)

  planes = when(p["brightness"], brightness, planes)
  planes = when(tf.logical_and(p["contrast_first"], p["contrast"]), contrast, planes)
  planes = when(p["saturation"], saturation, planes)
  planes = when(p["hue"], hue, planes)
  planes = when(tf.logical_and(tf.logical_not(p["contrast_first"]), p["contrast"]), contrast, planes)
  return tf.stack([tf.cast(plane, tf.uint8) for plane in planes], axis=-1)


def photometric_distortion(image, seed, settings: SegmentationAugmentation):
  """mmseg's PhotoMetricDistortion on an RGB uint8 (H, W, 3) image, a pure function of the seed."""
  return apply_photometric(image, photometric_parameters(seed, settings))


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
  ratio = tf.random.stateless_uniform([], resize_seed, *settings.ratio_range, dtype=tf.float64)
  shape = tf.shape(label)
  image, label = resize_pair(image, label, rescale_size(shape[0], shape[1], settings.scale, ratio))
  image, label = random_crop(image, label, crop_seed, settings.crop_size, settings.cat_max_ratio)
  flip = tf.random.stateless_uniform([], flip_seed) < settings.hflip_prob
  image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
  label = tf.cond(flip, lambda: label[:, ::-1], lambda: label)
  if settings.photometric:
    image = photometric_distortion(image, photo_seed, settings)
  return pad_to(image, label, settings.crop_size, settings.fill_color)

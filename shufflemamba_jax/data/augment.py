"""DeiT image augmentations written in TensorFlow ops, stateless and seeded per example.

Training (DeiT / timm `create_transform`): inception crop (area 0.08-1, ratio 3/4-4/3) decoded
straight from the JPEG, bicubic resize, horizontal flip, RandAugment ('rand-m9-mstd0.5': 2 ops per
image, each applied with probability 0.5, magnitude ~ N(9, 0.5) clipped to [0, 10]). Normalization
with the ImageNet mean/std and random erasing (prob 0.25, per-pixel normal noise) after it run on
the device, inside the jitted train step (`data.device`), so batches cross to it as uint8.
Color jitter 0.3 is part of the config but, as in timm and therefore DeiT, it only runs when
RandAugment is off (timm drops it whenever an auto-augment policy is set).
Evaluation: bicubic resize of the shorter side to floor(size / crop_ratio), center crop.

Every random choice uses `tf.random.stateless_*` ops on a seed of shape (2,), so an example's
augmentation is a pure function of (bytes, seed): the input pipeline derives the seed from
(run seed, epoch, position) and a resumed run reproduces the same images.
Images are uint8 (height, width, 3) throughout.
"""

import dataclasses
import math

import tensorflow as tf

from shufflemamba_jax import checks
from shufflemamba_jax.data import IMAGENET_MEAN, IMAGENET_STD, device

MAX_MAGNITUDE = 10.0  # timm's _LEVEL_DENOM: magnitudes live on a 0..10 scale.


@dataclasses.dataclass(frozen=True)
class TrainAugmentation:
  """The DeiT training augmentation settings (config `aug.*`), with DeiT's defaults.

  `mean`, `std` and `random_erasing_prob` are applied on the device (`data.device.DeviceTransform`).
  """

  inception_crop: bool = True
  crop_area_min: float = 0.08
  crop_ratio_min: float = 3 / 4
  crop_ratio_max: float = 4 / 3
  hflip: bool = True
  randaugment_num_ops: int = 2
  randaugment_magnitude: float = 9.0
  randaugment_magnitude_std: float = 0.5
  randaugment_prob: float = 0.5
  color_jitter: float = 0.3
  random_erasing_prob: float = 0.25
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    def field(name):
      return f"config.aug.{name}"

    for name in ("crop_area_min", "randaugment_prob", "color_jitter", "random_erasing_prob"):
      checks.number(field(name), getattr(self, name), 0.0, 1.0)
    for name in ("crop_ratio_min", "crop_ratio_max", "randaugment_magnitude", "randaugment_magnitude_std"):
      checks.number(field(name), getattr(self, name))
    if not 0 < self.crop_ratio_min <= self.crop_ratio_max:
      raise checks.SettingError(
        field("crop_ratio_min"),
        self.crop_ratio_min,
        f"must be > 0 and <= config.aug.crop_ratio_max={self.crop_ratio_max}",
      )
    checks.integer(field("randaugment_num_ops"), self.randaugment_num_ops, minimum=0)
    for name in ("mean", "std"):
      if len(getattr(self, name)) != 3:
        raise checks.SettingError(field(name), getattr(self, name), "must be 3 numbers, one per RGB channel")
    if min(self.std) <= 0:
      raise checks.SettingError(field("std"), self.std, "must be positive")

  def device_transform(self) -> device.DeviceTransform:
    """The part of this augmentation that runs on the device: normalization and random erasing."""
    return device.DeviceTransform(self.mean, self.std, self.random_erasing_prob)

  @property
  def fill_color(self) -> tuple[int, int, int]:
    """Fill for pixels that geometric ops move in: the mean color in 0..255, as timm does."""
    return tuple(min(255, round(255 * m)) for m in self.mean)


# ---------------------------------------------------------------------------------------------
# Decoding and cropping.
# ---------------------------------------------------------------------------------------------


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 (height, width, 3); gray images get 3 channels."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def random_crop_window(shape, seed, area_range=(0.08, 1.0), ratio_range=(3 / 4, 4 / 3)):
  """Samples an inception-style crop window: returns int32 (top, left, height, width).

  Area fraction uniform in `area_range`, aspect ratio in `ratio_range`, 10 attempts; when all
  fail the whole image is used (tf.image's fallback; timm center-crops instead).
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    image_size=shape,
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
    seed=seed,
    min_object_covered=0.0,
    aspect_ratio_range=ratio_range,
    area_range=area_range,
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def resize_bicubic(image: tf.Tensor, size) -> tf.Tensor:
  """Bicubic resize to `size` (height, width): float32 in [0, 255].

  Antialiased, so downscaling behaves like PIL's bicubic that timm uses.
  """
  resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bicubic", antialias=True)
  return tf.clip_by_value(resized, 0.0, 255.0)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def eval_resize_and_center_crop(image: tf.Tensor, image_size: int, crop_ratio: float = 0.875):
  """timm eval transform: shorter side to floor(size / crop_ratio) (bicubic), center crop.

  image: uint8 (height, width, 3). Returns float32 (image_size, image_size, 3) in [0, 255].
  """
  scale_size = math.floor(image_size / crop_ratio)
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  shorter = tf.minimum(height, width)
  # torchvision Resize(int): the shorter side gets scale_size, the longer one is truncated.
  new_height = tf.where(height <= width, scale_size, tf.cast(scale_size * height / shorter, tf.int32))
  new_width = tf.where(width <= height, scale_size, tf.cast(scale_size * width / shorter, tf.int32))
  new_height = tf.cast(new_height, tf.int32)
  new_width = tf.cast(new_width, tf.int32)
  resized = resize_bicubic(image, tf.stack([new_height, new_width]))
  top = tf.cast(tf.round(tf.cast(new_height - image_size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_width - image_size, tf.float32) / 2.0), tf.int32)
  cropped = resized[top : top + image_size, left : left + image_size]
  cropped.set_shape([image_size, image_size, 3])
  return cropped


def random_flip(image: tf.Tensor, seed) -> tf.Tensor:
  return tf.image.stateless_random_flip_left_right(image, seed)


# ---------------------------------------------------------------------------------------------
# RandAugment ops (timm semantics). Each takes a uint8 (H, W, 3) image, a magnitude on the 0..10
# scale (float32 scalar), a seed (2,) for the random sign timm draws, and the fill color.
# ---------------------------------------------------------------------------------------------


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped, uint8."""
  degenerate = tf.cast(degenerate, tf.float32)
  return to_uint8(degenerate + factor * (tf.cast(image, tf.float32) - degenerate))


def _grayscale(image):
  """PIL 'L' conversion (ITU-R 601-2 luma), float32 (H, W, 1)."""
  weights = tf.constant([0.299, 0.587, 0.114], tf.float32)
  return tf.round(tf.reduce_sum(tf.cast(image, tf.float32) * weights, axis=-1, keepdims=True))


def _random_sign(value, seed):
  """timm's _randomly_negate: the value or its negation with probability 1/2 each."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.where(flip, -value, value)


def _enhance_factor(magnitude):
  return magnitude / MAX_MAGNITUDE * 1.8 + 0.1


def _affine(image, matrix, fill_color):
  """Applies an output->input affine map [a0, a1, a2, b0, b1, b2] (PIL's convention), bilinear.

  Pixels mapped from outside the image get `fill_color`. Shifting by the fill color first lets
  the scalar fill value of ImageProjectiveTransformV3 be zero for every channel.
  """
  fill = tf.constant(fill_color, tf.float32)
  shifted = tf.cast(image, tf.float32)[None] - fill
  transform = tf.concat([tf.cast(matrix, tf.float32), tf.zeros([2], tf.float32)], axis=0)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=shifted,
    transforms=transform,
    output_shape=tf.shape(image)[:2],
    fill_value=0.0,
    interpolation="BILINEAR",
    fill_mode="CONSTANT",
  )
  return to_uint8(out[0] + fill)


def rotate_image(image, degrees, fill_color=(128, 128, 128)):
  """Rotates counter-clockwise by `degrees` about the image center, like PIL's Image.rotate."""
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  center_x, center_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
  cos, sin = tf.cos(radians), tf.sin(radians)
  # input = R(-angle)-style inverse map about the center; rows grow downwards, hence the signs.
  matrix = tf.stack(
    [cos, -sin, center_x - cos * center_x + sin * center_y, sin, cos, center_y - sin * center_x - cos * center_y]
  )
  return _affine(image, matrix, fill_color)


def auto_contrast(image, magnitude=None, seed=None, fill_color=None):
  """Stretches each channel to the full 0..255 range (PIL ImageOps.autocontrast, cutoff 0)."""
  del magnitude, seed, fill_color
  x = tf.cast(image, tf.float32)
  low = tf.reduce_min(x, axis=[0, 1])
  high = tf.reduce_max(x, axis=[0, 1])
  scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1.0), 1.0)
  offset = tf.where(high > low, low, 0.0)
  return to_uint8((x - offset) * scale)


def _equalize_channel(channel):
  """PIL ImageOps.equalize on one uint8 (H, W) channel: a lookup table from the histogram."""
  values = tf.cast(channel, tf.int32)
  histogram = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(histogram, histogram > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

  def equalized():
    lut = (tf.cumsum(histogram) - histogram + step // 2) // tf.maximum(step, 1)
    return tf.gather(tf.clip_by_value(lut, 0, 255), values)

  return tf.cast(tf.cond(step > 0, equalized, lambda: values), tf.uint8)


def equalize(image, magnitude=None, seed=None, fill_color=None):
  """Per-channel histogram equalization (PIL ImageOps.equalize)."""
  del magnitude, seed, fill_color
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image, magnitude=None, seed=None, fill_color=None):
  del magnitude, seed, fill_color
  return 255 - image


def rotate(image, magnitude, seed, fill_color=(128, 128, 128)):
  """Rotation by magnitude / 10 * 30 degrees, random direction."""
  return rotate_image(image, _random_sign(magnitude / MAX_MAGNITUDE * 30.0, seed), fill_color)


def posterize(image, magnitude, seed=None, fill_color=None):
  """Keeps int(magnitude / 10 * 4) most significant bits (0 bits: black; timm 'Posterize')."""
  del seed, fill_color
  bits = tf.cast(tf.floor(magnitude / MAX_MAGNITUDE * 4.0), tf.int32)
  divisor = tf.bitwise.left_shift(1, 8 - bits)
  values = tf.cast(image, tf.int32)
  return tf.cast(values // divisor * divisor, tf.uint8)


def solarize(image, magnitude, seed=None, fill_color=None):
  """Inverts pixels >= int(magnitude / 10 * 256)."""
  del seed, fill_color
  threshold = tf.cast(tf.floor(magnitude / MAX_MAGNITUDE * 256.0), tf.int32)
  values = tf.cast(image, tf.int32)
  return tf.cast(tf.where(values >= threshold, 255 - values, values), tf.uint8)


def solarize_add(image, magnitude, seed=None, fill_color=None):
  """Adds int(magnitude / 10 * 110) to pixels below 128, saturating at 255."""
  del seed, fill_color
  addition = tf.cast(tf.floor(magnitude / MAX_MAGNITUDE * 110.0), tf.int32)
  values = tf.cast(image, tf.int32)
  return tf.cast(tf.where(values < 128, tf.minimum(values + addition, 255), values), tf.uint8)


def color(image, magnitude, seed=None, fill_color=None):
  """Saturation: blend with the grayscale image, factor magnitude / 10 * 1.8 + 0.1."""
  del seed, fill_color
  return _blend(_grayscale(image), image, _enhance_factor(magnitude))


def contrast(image, magnitude, seed=None, fill_color=None):
  """Blend with the mean gray level, factor magnitude / 10 * 1.8 + 0.1."""
  del seed, fill_color
  mean = tf.round(tf.reduce_mean(_grayscale(image)))
  return _blend(tf.fill(tf.shape(image), mean), image, _enhance_factor(magnitude))


def brightness(image, magnitude, seed=None, fill_color=None):
  """Blend with black, factor magnitude / 10 * 1.8 + 0.1."""
  del seed, fill_color
  return _blend(tf.zeros_like(image), image, _enhance_factor(magnitude))


def sharpness(image, magnitude, seed=None, fill_color=None):
  """Blend with PIL's SMOOTH-filtered image (border pixels unfiltered), factor as `color`."""
  del seed, fill_color
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  x = tf.cast(image, tf.float32)[None]
  smooth = tf.round(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], padding="VALID"))[0]
  # Keep the one-pixel border from the original, as PIL does.
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth[1:-1, 1:-1, :1]), [[1, 1], [1, 1], [0, 0]]) > 0
  degenerate = tf.where(interior, smooth, tf.cast(image, tf.float32))
  return _blend(degenerate, image, _enhance_factor(magnitude))


def shear_x(image, magnitude, seed, fill_color=(128, 128, 128)):
  """Horizontal shear by magnitude / 10 * 0.3, random sign: input x = x + level * y."""
  level = _random_sign(magnitude / MAX_MAGNITUDE * 0.3, seed)
  return _affine(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0]), fill_color)


def shear_y(image, magnitude, seed, fill_color=(128, 128, 128)):
  """Vertical shear by magnitude / 10 * 0.3, random sign: input y = level * x + y."""
  level = _random_sign(magnitude / MAX_MAGNITUDE * 0.3, seed)
  return _affine(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0]), fill_color)


def translate_x_relative(image, magnitude, seed, fill_color=(128, 128, 128)):
  """Horizontal shift by magnitude / 10 * 0.45 of the width, random direction."""
  pixels = _random_sign(magnitude / MAX_MAGNITUDE * 0.45, seed) * tf.cast(tf.shape(image)[1], tf.float32)
  return _affine(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]), fill_color)


def translate_y_relative(image, magnitude, seed, fill_color=(128, 128, 128)):
  """Vertical shift by magnitude / 10 * 0.45 of the height, random direction."""
  pixels = _random_sign(magnitude / MAX_MAGNITUDE * 0.45, seed) * tf.cast(tf.shape(image)[0], tf.float32)
  return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]), fill_color)


# timm's _RAND_TRANSFORMS, in its order.
RANDAUGMENT_OPS = {
  "AutoContrast": auto_contrast,
  "Equalize": equalize,
  "Invert": invert,
  "Rotate": rotate,
  "Posterize": posterize,
  "Solarize": solarize,
  "SolarizeAdd": solarize_add,
  "Color": color,
  "Contrast": contrast,
  "Brightness": brightness,
  "Sharpness": sharpness,
  "ShearX": shear_x,
  "ShearY": shear_y,
  "TranslateXRel": translate_x_relative,
  "TranslateYRel": translate_y_relative,
}


def rand_augment(image, seed, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, fill_color=(124, 116, 104)):
  """timm RandAugment: `num_ops` ops drawn uniformly with replacement, each applied w.p. `prob`.

  Each applied op draws its own magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10].
  image: uint8 (H, W, 3) -> uint8 (H, W, 3).
  """
  ops = list(RANDAUGMENT_OPS.values())
  for seed_i in tf.unstack(tf.random.experimental.stateless_split(seed, num_ops)):
    choice_seed, apply_seed, magnitude_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(seed_i, 4))
    index = tf.random.stateless_uniform([], choice_seed, 0, len(ops), dtype=tf.int32)
    level = magnitude + magnitude_std * tf.random.stateless_normal([], magnitude_seed)
    level = tf.clip_by_value(level, 0.0, MAX_MAGNITUDE)
    # switch_case calls the branches right here, inside this iteration: binding `op` suffices.
    branches = [(lambda op=op: op(image, level, op_seed, fill_color)) for op in ops]  # noqa: B023
    applied = tf.switch_case(index, branches)
    applied.set_shape(image.shape)
    image = tf.where(tf.random.stateless_uniform([], apply_seed) < prob, applied, image)
  return image


def color_jitter(image, seed, strength=0.3):
  """torchvision ColorJitter(b, c, s = strength) in random order. uint8 -> uint8.

  Brightness blends with black, contrast with the mean gray level, saturation with the
  grayscale image; each factor is uniform in [1 - strength, 1 + strength].
  """
  order_seed, *factor_seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  factors = [tf.random.stateless_uniform([], s, 1.0 - strength, 1.0 + strength) for s in factor_seeds]
  adjustments = [
    lambda x: _blend(tf.zeros_like(x), x, factors[0]),
    lambda x: _blend(tf.fill(tf.shape(x), tf.round(tf.reduce_mean(_grayscale(x)))), x, factors[1]),
    lambda x: _blend(_grayscale(x), x, factors[2]),
  ]
  order = tf.argsort(tf.random.stateless_uniform([3], order_seed))
  for step in range(3):
    image = tf.switch_case(order[step], [(lambda f=f, x=image: f(x)) for f in adjustments])
  return image


# ---------------------------------------------------------------------------------------------
# Full transforms.
# ---------------------------------------------------------------------------------------------


def augment_train_image(image, seed, settings: TrainAugmentation, image_size: int):
  """Resize, flip, RandAugment (or color jitter): the host part of the training transform.

  image: uint8 (h, w, 3), the (cropped) decoded image.
  Returns uint8 (image_size, image_size, 3); normalization and random erasing follow on the
  device (`data.device.DeviceTransform`).
  """
  flip_seed, randaugment_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  image = to_uint8(resize_bicubic(image, (image_size, image_size)))
  image.set_shape([image_size, image_size, 3])
  if settings.hflip:
    image = random_flip(image, flip_seed)
  if settings.randaugment_num_ops > 0:
    image = rand_augment(
      image,
      randaugment_seed,
      settings.randaugment_num_ops,
      settings.randaugment_magnitude,
      settings.randaugment_magnitude_std,
      settings.randaugment_prob,
      settings.fill_color,
    )
  elif settings.color_jitter > 0:
    image = color_jitter(image, jitter_seed, settings.color_jitter)
  return image

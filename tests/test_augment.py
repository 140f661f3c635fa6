"""DeiT augmentations: every RandAugment op, crops and eval geometry in TF ops on the host; normalization
and random erasing in jnp on the device."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from shufflemamba_jax.data import IMAGENET_MEAN, IMAGENET_STD, augment, decodable, device, pipeline  # noqa: E402

SEED = tf.constant([3, 7], tf.int64)
FILL = (124, 116, 104)


def _test_image(height=32, width=40):
  """Colored, textured, not spanning 0..255: every op has something to change."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:height, 0:width]
  image = np.stack([30 + 5 * x, 40 + 5 * y, 100 + 2 * (x + y)], axis=-1).astype(np.float64)
  image[8:20, 10:30] = (235, 60, 90)  # A bright red block: Solarize at magnitude 9 inverts it.
  image += rng.integers(-8, 9, image.shape)
  return tf.constant(np.clip(image, 30, 240).astype(np.uint8))


@pytest.mark.parametrize("name", list(augment.RANDAUGMENT_OPS))
def test_every_randaugment_op_runs_and_changes_the_image(name):
  image = _test_image()
  out = augment.RANDAUGMENT_OPS[name](image, tf.constant(9.0), SEED, FILL)
  assert out.shape == image.shape and out.dtype == tf.uint8
  assert np.any(out.numpy() != image.numpy()), f"{name} left the image unchanged"
  # uint8 guarantees the range; a constant output would mean a broken op (except none here).
  assert out.numpy().std() > 0


def test_point_ops_match_numpy_definitions():
  image = _test_image()
  x = image.numpy().astype(np.int32)
  magnitude = tf.constant(9.0)
  np.testing.assert_array_equal(augment.invert(image).numpy(), 255 - x)
  np.testing.assert_array_equal(augment.posterize(image, magnitude).numpy(), x & 0b11100000)  # 3 bits.
  np.testing.assert_array_equal(augment.solarize(image, magnitude).numpy(), np.where(x >= 230, 255 - x, x))
  np.testing.assert_array_equal(
    augment.solarize_add(image, magnitude).numpy(), np.where(x < 128, np.minimum(x + 99, 255), x)
  )
  # Magnitude 0 posterizes to 0 bits (black), as timm's non-increasing 'Posterize'.
  assert augment.posterize(image, tf.constant(0.0)).numpy().max() == 0


def test_enhance_and_histogram_ops_match_pil():
  pil_image = pytest.importorskip("PIL.Image")
  from PIL import ImageEnhance, ImageOps  # pylint: disable=g-import-not-at-top

  image = _test_image()
  pil = pil_image.fromarray(image.numpy())
  magnitude = tf.constant(7.0)
  factor = 7.0 / 10 * 1.8 + 0.1
  expected = {
    "AutoContrast": ImageOps.autocontrast(pil),
    "Equalize": ImageOps.equalize(pil),
    "Color": ImageEnhance.Color(pil).enhance(factor),
    "Contrast": ImageEnhance.Contrast(pil).enhance(factor),
    "Brightness": ImageEnhance.Brightness(pil).enhance(factor),
    "Sharpness": ImageEnhance.Sharpness(pil).enhance(factor),
  }
  for name, reference in expected.items():
    out = augment.RANDAUGMENT_OPS[name](image, magnitude, SEED, FILL).numpy().astype(np.int32)
    difference = np.abs(out - np.asarray(reference, np.int32))
    # PIL works in fixed point; allow off-by-a-few rounding on a small share of pixels.
    assert difference.max() <= 3 and difference.mean() < 0.6, (name, difference.max(), difference.mean())


def test_geometric_ops_move_pixels_as_specified():
  rng = np.random.default_rng(1)
  square = tf.constant(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8))
  np.testing.assert_array_equal(augment.rotate_image(square, 90.0).numpy(), np.rot90(square.numpy()))
  image = _test_image()
  # TranslateXRel at magnitude 10: 0.45 * 40 = 18 pixels, either direction; vacated area = fill.
  out = augment.translate_x_relative(image, tf.constant(10.0), SEED, FILL).numpy()
  x = image.numpy()
  if np.array_equal(out[:, :22], x[:, 18:]):
    vacated = out[:, 22:]
  else:
    np.testing.assert_array_equal(out[:, 18:], x[:, :22])
    vacated = out[:, :18]
  assert np.all(vacated == np.array(FILL, np.uint8))
  # ShearX keeps row 0 (input x = x + level * y) and moves the last row.
  sheared = augment.shear_x(image, tf.constant(9.0), SEED, FILL).numpy()
  np.testing.assert_array_equal(sheared[0], x[0])
  assert np.any(sheared[-1] != x[-1])


def test_rand_augment_is_seeded_and_prob_zero_is_identity():
  image = _test_image()
  first = augment.rand_augment(image, SEED).numpy()
  np.testing.assert_array_equal(first, augment.rand_augment(image, SEED).numpy())
  outputs = [augment.rand_augment(image, tf.constant([s, 0], tf.int64)).numpy() for s in range(8)]
  assert all(o.shape == image.shape for o in outputs)
  assert sum(not np.array_equal(o, image.numpy()) for o in outputs) >= 4
  assert len({o.tobytes() for o in outputs}) >= 4
  np.testing.assert_array_equal(augment.rand_augment(image, SEED, prob=0.0).numpy(), image.numpy())


def test_random_erasing_on_the_device_erases_one_rectangle_of_noise_per_sample():
  size, batch = 32, 40
  images = jnp.full((batch, size, size, 3), 5.0)  # Far from N(0, 1) noise, so erased pixels are visible.
  out = np.asarray(device.random_erasing(jax.random.key(11), images, prob=1.0))
  fractions = []
  for sample in out:
    erased = np.any(sample != 5.0, axis=-1)
    rows, cols = np.nonzero(erased)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert erased.sum() == height * width, "erased region is not one rectangle"
    assert sample[erased].std() > 0.5  # Per-pixel noise, not a constant.
    fractions.append(height * width / size**2)
    # Rounding h and w to pixels moves the area and ratio a little past the sampled bounds.
    assert 0.02 * 0.6 <= fractions[-1] <= (math.sqrt(1 / 3) + 1 / size) ** 2 * 1.05
    assert 0.3 / 1.6 <= height / width <= 3.3 * 1.6
  assert max(fractions) - min(fractions) > 0.1  # Areas really vary.
  np.testing.assert_array_equal(device.random_erasing(jax.random.key(0), images, prob=0.0), images)
  # Sample i draws from fold_in(key, i): the first rows of a larger batch are erased alike.
  more = device.random_erasing(jax.random.key(11), jnp.full((batch + 8, size, size, 3), 5.0), prob=1.0)
  np.testing.assert_array_equal(np.asarray(more)[:batch], out)
  half = np.mean([np.any(s != 5.0) for s in np.asarray(device.random_erasing(jax.random.key(1), images, 0.5))])
  assert 0.2 <= half <= 0.8


def test_device_transform_normalizes_uint8_and_erases_only_with_a_key():
  pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  transform = device.DeviceTransform(random_erasing_prob=1.0)
  expected = (pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
  np.testing.assert_allclose(transform(pixels), expected, rtol=1e-5, atol=1e-6)
  assert transform(pixels).dtype == jnp.float32
  assert not np.allclose(transform(pixels, jax.random.key(0)), expected)
  settings = augment.TrainAugmentation(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), random_erasing_prob=0.3)
  assert settings.device_transform() == device.DeviceTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.3)


def test_inception_crop_window_bounds_and_jpeg_crop():
  shape = tf.constant([120, 160, 3], tf.int32)
  for s in range(30):
    top, left, height, width = augment.random_crop_window(shape, tf.constant([s, 5], tf.int64)).numpy()
    assert 0 <= top and top + height <= 120 and 0 <= left and left + width <= 160
    area = height * width / (120 * 160)
    assert 0.08 * 0.9 <= area <= 1.0
    if area < 1.0:  # The whole-image fallback is exempt from the ratio range.
      assert 3 / 4 * 0.9 <= width / height <= 4 / 3 * 1.1
  rng = np.random.default_rng(2)
  pixels = tf.constant(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
  encoded = tf.io.encode_jpeg(pixels)
  top, left, height, width = augment.random_crop_window(shape, SEED).numpy()

  def crop_of(image_bytes):  # What the input pipeline decodes: only the crop window.
    window_fn = lambda image_shape: augment.random_crop_window(image_shape, SEED)  # noqa: E731
    return decodable.decode_window(image_bytes, window_fn)

  crop = crop_of(encoded)
  full = tf.io.decode_jpeg(encoded).numpy()
  # decode_and_crop_jpeg upsamples chroma at the window edge on its own: near-equal, not equal.
  difference = np.abs(crop.numpy().astype(int) - full[top : top + height, left : left + width])
  assert crop.shape == (height, width, 3) and difference.mean() < 1.0
  png_crop = crop_of(tf.io.encode_png(pixels))
  np.testing.assert_array_equal(png_crop.numpy(), pixels.numpy()[top : top + height, left : left + width])


def test_eval_resize_and_center_crop_geometry():
  # 80x160 image; size 56 / 0.875 = 64 -> resized 64x128, center 56x56 covers x in [45, 115)
  # and y in [5, 75) of the original. Paint outside x in [40, 120), y in [3, 77) red.
  image = np.zeros((80, 160, 3), np.uint8)
  image[..., 1] = 200
  image[:, :40] = image[:, 120:] = image[:3] = image[77:] = (255, 0, 0)
  out = augment.eval_resize_and_center_crop(tf.constant(image), 56, 0.875).numpy()
  assert out.shape == (56, 56, 3) and out.dtype == np.float32  # In [0, 255], before rounding.
  assert out[..., 0].max() < 20 and out[..., 1].min() > 180
  # A tall image: the width is the shorter side now.
  tall = augment.eval_resize_and_center_crop(tf.constant(np.transpose(image, (1, 0, 2))), 56).numpy()
  assert tall.shape == (56, 56, 3) and tall[..., 0].max() < 20
  # Crop ratio 1 on an image already at the size is the identity.
  same = augment.eval_resize_and_center_crop(tf.constant(image[:56, 50:106]), 56, 1.0).numpy()
  np.testing.assert_allclose(same, image[:56, 50:106], atol=1e-3)


def test_train_and_eval_transforms_shapes_types_and_determinism():
  rng = np.random.default_rng(3)
  image = tf.constant(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
  settings = augment.TrainAugmentation()
  outs = [augment.augment_train_image(image, tf.constant([s, 1], tf.int64), settings, 24).numpy() for s in range(4)]
  for out in outs:
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8  # Normalized and erased on the device.
  assert len({o.tobytes() for o in outs}) == 4
  again = augment.augment_train_image(image, tf.constant([0, 1], tf.int64), settings, 24).numpy()
  np.testing.assert_array_equal(outs[0], again)
  evaluated = pipeline.eval_image(tf.io.encode_png(image), 24, 0.875)
  assert evaluated.shape == (24, 24, 3) and evaluated.dtype == tf.uint8


def test_color_jitter_runs_only_without_randaugment():
  image = _test_image()
  jittered = augment.color_jitter(image, SEED, 0.3).numpy()
  assert jittered.shape == image.shape and np.any(jittered != image.numpy())
  np.testing.assert_array_equal(augment.color_jitter(image, SEED, 0.0).numpy(), image.numpy())

  def train_output(**fields):
    settings = augment.TrainAugmentation(hflip=False, random_erasing_prob=0.0, **fields)
    return augment.augment_train_image(image, SEED, settings, 32).numpy()

  # timm/DeiT: with RandAugment on, color jitter does not run.
  np.testing.assert_array_equal(train_output(color_jitter=0.3), train_output(color_jitter=0.0))
  off = dict(randaugment_num_ops=0)
  assert np.any(train_output(color_jitter=0.3, **off) != train_output(color_jitter=0.0, **off))

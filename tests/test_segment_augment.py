"""The segmentation augmentation: sizes, padding, the crop's class cap, and images and labels
moved together."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from shufflemamba_jax.data import IGNORE_INDEX, segment_augment
from shufflemamba_jax.models import SettingError


def banded_pair(height: int, width: int, classes=(3, 7, 9, 12)):
  """A label map of vertical bands and an image whose gray level is 10 x the band's class."""
  bands = np.asarray(classes)[np.arange(width) * len(classes) // width]
  label = np.broadcast_to(bands, (height, width)).astype(np.uint8)
  image = np.repeat((label * 10).astype(np.uint8)[..., None], 3, axis=-1)
  return tf.constant(image), tf.constant(label)


def test_rescale_size_keeps_the_ratio_within_the_scale():
  assert [int(x) for x in segment_augment.rescale_size(512, 683, (2048, 512))] == [512, 683]
  assert [int(x) for x in segment_augment.rescale_size(300, 400, (2048, 512))] == [512, 683]
  assert [int(x) for x in segment_augment.rescale_size(100, 1000, (2048, 512))] == [205, 2048]
  assert [int(x) for x in segment_augment.rescale_size(300, 400, (2048, 512), 0.5)] == [256, 341]


def test_train_pairs_are_crop_sized_aligned_and_padded_with_ignore():
  settings = segment_augment.SegmentationAugmentation(scale=(128, 32), crop_size=48, photometric=False)
  image, label = banded_pair(30, 40)
  flipped = 0
  for index in range(12):
    out_image, out_label = segment_augment.augment_train_pair(image, label, tf.constant([index, 5]), settings)
    out_image, out_label = out_image.numpy(), out_label.numpy()
    assert out_image.shape == (48, 48, 3) and out_image.dtype == np.uint8
    assert out_label.shape == (48, 48) and out_label.dtype == np.uint8
    valid = out_label != IGNORE_INDEX
    assert set(np.unique(out_label[valid])) <= {3, 7, 9, 12}
    # Padding: label 255 and the mean color, only at the bottom and right.
    np.testing.assert_array_equal(out_image[~valid], np.broadcast_to(settings.fill_color, out_image[~valid].shape))
    assert valid[0, 0]
    # Image and label moved together: away from band edges the gray is 10 x the class.
    # (Bilinear and nearest resizes may place a band edge a pixel apart, and the crop edge may
    # cut next to one: compare 2 pixels inside both.)
    padded = np.pad(out_label.astype(int), ((0, 0), (2, 2)), constant_values=-1)
    interior = valid & np.all([padded[:, 2 + d : 2 + d + 48] == out_label for d in (-2, -1, 1, 2)], axis=0)
    np.testing.assert_allclose(out_image[..., 0][interior], out_label[interior] * 10.0, atol=1)
    columns = out_label[0][valid[0]]
    flipped += bool(columns[0] > columns[-1])
  assert 0 < flipped < 12  # Both orientations occur.


def test_crops_respect_the_class_cap_when_they_can():
  """A map that is 90% one class: a random 16x16 crop mostly sees only it; the retries find one
  where the largest class stays under 75%."""
  label = np.zeros((64, 64), np.uint8)
  label[40:56, 40:56] = 1
  label[:8, :8] = IGNORE_INDEX
  image = tf.zeros([64, 64, 3], tf.uint8)
  capped = uncapped = 0
  for index in range(20):
    seed = tf.constant([index, 1])
    _, crop = segment_augment.random_crop(image, tf.constant(label), seed, 16, cat_max_ratio=0.75)
    _, plain = segment_augment.random_crop(image, tf.constant(label), seed, 16, cat_max_ratio=1.0)
    for result, name in ((crop, "capped"), (plain, "uncapped")):
      counts = np.bincount(result.numpy().ravel(), minlength=256)[:255]
      ok = (counts > 0).sum() > 1 and counts.max() < 0.75 * counts.sum()
      if name == "capped":
        capped += ok
      else:
        uncapped += ok
  assert capped > uncapped


def test_photometric_distortion_is_seeded_and_keeps_gray_levels_in_range():
  settings = segment_augment.SegmentationAugmentation()
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (16, 16, 3)), tf.uint8)
  first = segment_augment.photometric_distortion(image, tf.constant([1, 2]), settings)
  again = segment_augment.photometric_distortion(image, tf.constant([1, 2]), settings)
  other = segment_augment.photometric_distortion(image, tf.constant([3, 4]), settings)
  assert first.dtype == tf.uint8
  np.testing.assert_array_equal(first.numpy(), again.numpy())
  assert not np.array_equal(first.numpy(), other.numpy())


def test_eval_resize_fits_the_scale():
  image = tf.zeros([300, 400, 3], tf.uint8)
  assert segment_augment.eval_resize(image, (2048, 512)).shape == (512, 683, 3)


@pytest.mark.parametrize(
  "settings, name",
  [
    (dict(scale=(512,)), "config.seg_aug.scale"),
    (dict(ratio_range=(2.0, 0.5)), "config.seg_aug.ratio_range"),
    (dict(cat_max_ratio=1.5), "config.seg_aug.cat_max_ratio"),
    (dict(crop_size=0), "config.seg_aug.crop_size"),
  ],
)
def test_bad_settings_name_themselves(settings, name):
  with pytest.raises(SettingError) as error:
    segment_augment.SegmentationAugmentation(**settings)
  assert error.value.setting == name

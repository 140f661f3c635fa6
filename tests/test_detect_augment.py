"""The detection pipeline of one example against mmcv's sizes, mmdet's box arithmetic and the
detector's own mask crops."""

import jax.numpy as jnp
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from shufflemamba_jax.data import detect_augment  # noqa: E402
from shufflemamba_jax.models import SettingError  # noqa: E402
from shufflemamba_jax.models.detection import mask_rcnn  # noqa: E402


def test_rescale_size_is_mmcvs():
  geometric = pytest.importorskip("mmcv.image.geometric")
  rng = np.random.default_rng(0)
  sizes = [(480, 640), (640, 480), (427, 640), (500, 375), (1, 1), (2000, 3), (800, 1333), (801, 1334)]
  sizes += [tuple(int(v) for v in rng.integers(16, 1500, 2)) for _ in range(200)]
  for height, width in sizes:
    (want_w, want_h), _ = geometric.rescale_size((width, height), (1333, 800), return_scale=True)
    new_h, new_w, _ = detect_augment.rescale_size(height, width, (1333, 800))
    assert (int(new_h), int(new_w)) == (want_h, want_w), (height, width)


def _example(height=96, width=128):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, (height, width, 3), np.uint8)
  yy, xx = np.mgrid[:height, :width] + 0.5
  ellipse = ((xx - 40) / 25) ** 2 + ((yy - 50) / 30) ** 2 <= 1
  square = (xx >= 70) & (xx < 120) & (yy >= 10) & (yy < 40)
  masks = np.stack([ellipse, square, square]).astype(np.uint8)
  boxes = []
  for mask in masks:
    ys, xs = np.nonzero(mask)
    boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
  return image, np.asarray(boxes, np.float32), np.array([3, 7, 7]), np.array([False, False, True]), masks


@pytest.mark.parametrize("flip", [False, True])
def test_train_example_resizes_flips_pads_as_mmdet(flip):
  image, boxes, labels, crowd, masks = _example()
  aug = detect_augment.DetectionAugmentation(
    scale=(256, 160), canvas=(256, 256), max_gt=4, crop_size=32, hflip_prob=float(flip)
  )
  out = detect_augment.train_example(image, boxes, labels, crowd, masks, tf.constant([1, 2]), aug)
  # mmcv: factor min(256 / 128, 160 / 96) = 5/3; sizes int(96 * 5/3 + 0.5) = 160, int(128 * 5/3 + 0.5) = 213.
  assert out["image_size"].numpy().tolist() == [160, 213]
  scale = np.array([213 / 128, 160 / 96] * 2, np.float32)
  expected = boxes * scale
  if flip:
    expected = np.stack([213 - expected[:, 2], expected[:, 1], 213 - expected[:, 0], expected[:, 3]], 1)
  np.testing.assert_allclose(out["boxes"].numpy()[:3], expected, rtol=1e-6)
  assert out["labels"].numpy().tolist() == [3, 7, 7, 0]
  assert out["valid"].numpy().tolist() == [True, True, False, False]  # The crowd is kept, invalid.
  canvas = out["image"].numpy()
  resized = tf.cast(tf.round(tf.image.resize(image, (160, 213))), tf.uint8).numpy()
  np.testing.assert_array_equal(canvas[:160, :213], resized[:, ::-1] if flip else resized)
  assert np.all(canvas[160:] == aug.fill_color) and np.all(canvas[:, 213:] == aug.fill_color)
  # The crops are the detector's own (RoIAlign over each box) up to boundary pixels, flipped along.
  reference = np.asarray(mask_rcnn.crop_masks(jnp.asarray(masks), jnp.asarray(boxes), 32)) >= 0.5
  crops = out["masks"].numpy()[:3].astype(bool)
  assert np.mean(crops != (reference[:, :, ::-1] if flip else reference)) < 0.02
  assert not out["masks"].numpy()[3].any()


def test_overflow_drops_crowds_first():
  image, boxes, labels, crowd, masks = _example()
  aug = detect_augment.DetectionAugmentation(
    scale=(256, 160), canvas=(256, 256), max_gt=2, crop_size=16, hflip_prob=0.0
  )
  crowd = np.array([True, False, False])
  out = detect_augment.train_example(image, boxes, labels, crowd, masks, tf.constant([0, 0]), aug)
  assert out["valid"].numpy().tolist() == [True, True]
  np.testing.assert_allclose(out["boxes"].numpy()[0], boxes[1] * np.array([213 / 128, 160 / 96] * 2), rtol=1e-6)


def test_settings_are_checked():
  with pytest.raises(SettingError, match="config.det_aug.canvas"):
    detect_augment.DetectionAugmentation(canvas=(1344, 1000))
  with pytest.raises(SettingError, match="config.det_aug.canvas"):
    detect_augment.DetectionAugmentation(canvas=(800, 800))

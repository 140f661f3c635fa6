"""Segmentation metrics and loss against direct NumPy computations, with ignored pixels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflemamba_jax.data import IGNORE_INDEX
from shufflemamba_jax.parallel import sharding
from shufflemamba_jax.training.tasks import segmentation

NUM_CLASSES = 6


def random_batches(seed: int, count: int = 3):
  """(predictions, labels, mask) batches; labels have ~20% ignored pixels; class 5 never labelled."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    labels = rng.integers(0, NUM_CLASSES - 1, (4, 9, 11))
    labels[rng.random(labels.shape) < 0.2] = IGNORE_INDEX
    predictions = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, NUM_CLASSES, labels.shape))
    predictions[predictions == IGNORE_INDEX] = 0
    mask = np.array([1, 1, 1, 0], np.float32)  # The last example is padding.
    batches.append((predictions, labels, mask))
  return batches


def direct_metrics(batches):
  """The definitions, class by class, over every counted pixel of every batch at once."""
  predictions = np.concatenate([p[m > 0] for p, _, m in batches]).ravel()
  labels = np.concatenate([label[m > 0] for _, label, m in batches]).ravel()
  keep = labels != IGNORE_INDEX
  predictions, labels = predictions[keep], labels[keep]
  iou, accuracy = [], []
  for c in range(NUM_CLASSES):
    intersect = np.sum((predictions == c) & (labels == c))
    union = np.sum((predictions == c) | (labels == c))
    iou.append(intersect / union if union else np.nan)
    accuracy.append(intersect / np.sum(labels == c) if np.sum(labels == c) else np.nan)
  return {
    "mIoU": np.nanmean(iou),
    "mAcc": np.nanmean(accuracy),
    "aAcc": np.mean(predictions == labels),
    "IoU": iou,
    "Acc": accuracy,
  }


def test_metrics_sum_areas_over_the_dataset_before_dividing():
  batches = random_batches(0)
  areas_fn = jax.jit(lambda p, label, m: segmentation.intersect_and_union(p, label, NUM_CLASSES, mask=m))
  areas = [jax.device_get(areas_fn(predictions, labels, mask)) for predictions, labels, mask in batches]
  totals = {name: np.sum([np.asarray(a[name], np.int64) for a in areas], axis=0) for name in segmentation.AREAS}
  metrics = segmentation.segmentation_metrics(totals)
  expected = direct_metrics(batches)
  for name in ("mIoU", "mAcc", "aAcc"):
    np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-12)
  np.testing.assert_allclose(list(metrics["IoU"].values()), expected["IoU"], rtol=1e-12)
  np.testing.assert_allclose(list(metrics["Acc"].values()), expected["Acc"], rtol=1e-12)
  # Class 5 is predicted but never labelled: IoU 0, accuracy NaN (left out of mAcc).
  assert metrics["IoU"]["5"] == 0.0 and np.isnan(metrics["Acc"]["5"])
  # Not the mean of per-batch mIoUs: that is a different number here.
  per_batch = [direct_metrics([batch])["mIoU"] for batch in batches]
  assert abs(np.mean(per_batch) - metrics["mIoU"]) > 1e-6


def test_areas_of_a_sharded_batch_are_global():
  batch_sharding = sharding.batch_sharding(sharding.create_mesh(data=8))
  rng = np.random.default_rng(1)
  labels = rng.integers(0, NUM_CLASSES, (8, 5, 7))
  labels[:, 0] = IGNORE_INDEX
  predictions = rng.integers(0, NUM_CLASSES, (8, 5, 7))
  areas_fn = jax.jit(lambda p, label: segmentation.intersect_and_union(p, label, NUM_CLASSES))
  sharded = areas_fn(jax.device_put(predictions, batch_sharding), jax.device_put(labels, batch_sharding))
  single = areas_fn(predictions, labels)
  for name in segmentation.AREAS:
    np.testing.assert_array_equal(np.asarray(sharded[name]), np.asarray(single[name]))
  assert int(sharded["area_label"].sum()) == 8 * 4 * 7


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_cross_entropy_ignores_the_ignore_index(avg_non_ignore):
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 6, 8, NUM_CLASSES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (2, 6, 8))
  labels[:, :2] = IGNORE_INDEX
  loss = segmentation.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), avg_non_ignore=avg_non_ignore)
  keep = labels != IGNORE_INDEX
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, np.where(keep, labels, 0)[..., None], -1)[..., 0]
  expected = -picked[keep].sum() / (keep.sum() if avg_non_ignore else keep.size)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_cross_entropy_weighs_each_pixel_by_its_class(avg_non_ignore):
  """mmseg 1.x's class_weight: each counted pixel's loss times its label's weight, divided by the
  summed weights (an ignored pixel weighs 1 there without avg_non_ignore, as with no class
  weights; test_mmseg_oracle.py checks mmseg itself); a wrong number of weights is an error."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 6, NUM_CLASSES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (2, 5, 6))
  labels[0, 0] = IGNORE_INDEX
  weights = rng.uniform(0.1, 2.0, NUM_CLASSES)
  loss = segmentation.cross_entropy(
    jnp.asarray(logits), jnp.asarray(labels), avg_non_ignore=avg_non_ignore, class_weight=tuple(weights)
  )
  keep = labels != IGNORE_INDEX
  shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  safe = np.where(keep, labels, 0)
  picked = np.take_along_axis(log_probs, safe[..., None], -1)[..., 0] * weights[safe]
  divisor = weights[safe][keep].sum() + (0 if avg_non_ignore else (~keep).sum())
  expected = -picked[keep].sum() / divisor
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  unweighted = segmentation.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), avg_non_ignore=avg_non_ignore)
  ones = segmentation.cross_entropy(
    jnp.asarray(logits), jnp.asarray(labels), avg_non_ignore=avg_non_ignore, class_weight=(1.0,) * NUM_CLASSES
  )
  np.testing.assert_allclose(float(ones), float(unweighted), rtol=1e-6)
  with pytest.raises(ValueError, match=f"2 weights for {NUM_CLASSES} classes"):
    segmentation.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), class_weight=(1.0, 2.0))


def test_cross_entropy_resizes_the_logits_to_the_labels():
  """Logits at 1/4 resolution are upsampled: a constant logit map gives the same loss at any size."""
  logits = jnp.broadcast_to(jnp.arange(NUM_CLASSES, dtype=jnp.float32), (1, 2, 3, NUM_CLASSES))
  labels = jnp.full((1, 8, 12), 2)
  expected = -jax.nn.log_softmax(jnp.arange(NUM_CLASSES, dtype=jnp.float32))[2]
  np.testing.assert_allclose(float(segmentation.cross_entropy(logits, labels)), float(expected), rtol=1e-6)


def test_label_colors_are_distinct_and_ignored_pixels_black():
  colors = segmentation.label_colors(150)
  assert colors.shape == (150, 3) and colors.dtype == np.uint8
  assert len({tuple(c) for c in colors}) == 150 and not (colors == 0).all(axis=1).any()
  labels = np.array([[0, 1], [149, IGNORE_INDEX]])
  image = segmentation.colorize(labels, 150)
  np.testing.assert_array_equal(image[0, 0], colors[0])
  np.testing.assert_array_equal(image[1, 0], colors[149])
  np.testing.assert_array_equal(image[1, 1], [0, 0, 0])

"""Mixup / CutMix of the train step (timm batch-mode semantics) and the soft-target loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflemamba_jax.training import mixup

NUM_CLASSES = 10
DEIT = mixup.MixupSettings(
  mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1
)


def mix(key, images, labels, **changes):
  return mixup.mix_batch(key, images, labels, num_classes=NUM_CLASSES, settings=dataclasses.replace(DEIT, **changes))


def _batch(batch=8, size=16):
  images = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
  labels = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
  return images, labels


@pytest.mark.parametrize("seed", range(3))
def test_mixed_targets_sum_to_one_and_follow_lambda(seed):
  images, labels = _batch()
  _, targets, lam = mix(jax.random.key(seed), images, labels, label_smoothing=0.1)
  np.testing.assert_allclose(np.sum(targets, axis=-1), 1.0, rtol=1e-6)
  smoothed = mixup.smooth_one_hot(labels, NUM_CLASSES, 0.1)
  expected = lam * smoothed + (1 - lam) * smoothed[::-1]
  np.testing.assert_allclose(targets, expected, rtol=1e-6, atol=1e-7)
  assert 0.0 <= float(lam) <= 1.0


def test_label_smoothing_values():
  targets = mixup.smooth_one_hot(jnp.array([3]), NUM_CLASSES, 0.1)
  assert np.isclose(targets[0, 3], 1 - 0.1 + 0.01)
  assert np.isclose(targets[0, 0], 0.01)
  assert targets.dtype == jnp.float32


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_lambda_equals_unpasted_area(seed):
  """With CutMix only, lambda is 1 - (pasted pixels / all pixels), and the box holds the flip."""
  images, labels = _batch(size=16)
  mixed, _, lam = mix(jax.random.key(seed), images, labels, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
  from_partner = np.all(np.isclose(mixed, images[::-1]) & ~np.isclose(mixed, images), axis=-1)
  pasted = from_partner[0].sum()  # Pixels of sample 0 taken from its partner (the last sample).
  np.testing.assert_allclose(float(lam), 1.0 - pasted / (16 * 16), atol=1e-6)
  # Pixels outside the box are untouched.
  assert np.all(np.isclose(mixed, images) | from_partner[..., None])


def test_cutmix_box_is_clipped_and_sized():
  for seed in range(10):
    lam = jnp.float32(0.3)
    top, bottom, left, right = mixup.cutmix_box(jax.random.key(seed), lam, 16, 12)
    assert 0 <= top <= bottom <= 16 and 0 <= left <= right <= 12
    cut_h, cut_w = int(16 * np.sqrt(0.7)), int(12 * np.sqrt(0.7))
    assert bottom - top <= 2 * (cut_h // 2) and right - left <= 2 * (cut_w // 2)
    mask = mixup.box_mask((top, bottom, left, right), 16, 12)
    assert int(mask.sum()) == int((bottom - top) * (right - left))


def test_mixup_is_a_convex_combination_with_lambda():
  images, labels = _batch()
  mixed, _, lam = mix(jax.random.key(0), images, labels, mixup_alpha=0.8, cutmix_alpha=0.0)
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)


def test_no_mixing_when_off_or_probability_zero():
  images, labels = _batch()
  for kwargs in ({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, {"mixup_prob": 0.0}):
    mixed, targets, lam = mix(jax.random.key(0), images, labels, label_smoothing=0.0, **kwargs)
    assert float(lam) == 1.0
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_array_equal(np.argmax(targets, -1), labels)


def test_switch_probability_picks_cutmix_or_mixup():
  """switch_prob 1 -> always CutMix (pixels copied exactly); 0 -> always Mixup (blended)."""
  images, labels = _batch()
  cut, _, lam = mix(jax.random.key(2), images, labels, mixup_switch_prob=1.0)
  copied = np.isclose(cut, images) | np.isclose(cut, images[::-1])
  assert copied.all()
  mixed, _, lam = mix(jax.random.key(2), images, labels, mixup_switch_prob=0.0)
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)

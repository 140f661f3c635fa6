"""Mixup / CutMix of the train step (timm batch-mode semantics per group) and the soft-target loss."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflemamba_jax import checks
from shufflemamba_jax.parallel import sharding
from shufflemamba_jax.training import mixup

NUM_CLASSES = 10
DEIT = mixup.MixupSettings(
  mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1, mixup_group_size=8
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
  expected = lam[:, None] * smoothed + (1 - lam[:, None]) * smoothed[::-1]
  np.testing.assert_allclose(targets, expected, rtol=1e-6, atol=1e-7)
  assert lam.shape == (8,) and np.all(lam == lam[0]) and 0.0 <= float(lam[0]) <= 1.0


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
  np.testing.assert_allclose(float(lam[0]), 1.0 - pasted / (16 * 16), atol=1e-6)
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
  lam = float(lam[0])
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)


def test_no_mixing_when_off_or_probability_zero():
  images, labels = _batch()
  for kwargs in ({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, {"mixup_prob": 0.0}):
    mixed, targets, lam = mix(jax.random.key(0), images, labels, label_smoothing=0.0, **kwargs)
    assert np.all(lam == 1.0)
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_array_equal(np.argmax(targets, -1), labels)


def test_switch_probability_picks_cutmix_or_mixup():
  """switch_prob 1 -> always CutMix (pixels copied exactly); 0 -> always Mixup (blended)."""
  images, labels = _batch()
  cut, _, lam = mix(jax.random.key(2), images, labels, mixup_switch_prob=1.0)
  copied = np.isclose(cut, images) | np.isclose(cut, images[::-1])
  assert copied.all()
  mixed, _, lam = mix(jax.random.key(2), images, labels, mixup_switch_prob=0.0)
  lam = float(lam[0])
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)


def test_groups_mix_among_themselves_with_their_own_draw():
  """Groups of 4 in a batch of 12: partners are mirrors within the group, one lambda per group,
  and group g depends only on its own samples and fold_in(key, g) (a prefix of whole groups
  mixes the same as in the full batch)."""
  images, labels = _batch(batch=12)
  key = jax.random.key(7)
  mixed, targets, lam = mix(key, images, labels, mixup_group_size=4, mixup_alpha=0.0, label_smoothing=0.0)
  partner = np.array([3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8])
  assert np.all(np.isclose(mixed, images) | np.isclose(mixed, images[partner]))
  lam = np.asarray(lam).reshape(3, 4)
  assert np.all(lam == lam[:, :1]) and len(set(lam[:, 0])) == 3
  np.testing.assert_allclose(
    targets,
    lam.reshape(12, 1) * np.eye(NUM_CLASSES)[labels] + (1 - lam.reshape(12, 1)) * np.eye(NUM_CLASSES)[labels[partner]],
    atol=1e-6,
  )
  prefix = mix(key, images[:8], labels[:8], mixup_group_size=4, mixup_alpha=0.0, label_smoothing=0.0)
  np.testing.assert_allclose(prefix[0], mixed[:8], rtol=1e-6, atol=1e-7)


def test_group_size_must_divide_the_batch_and_a_spanning_group_warns(caplog):
  with pytest.raises(checks.SettingError, match=r"config.aug.mixup_group_size=3: must divide the global batch of 8"):
    mix(jax.random.key(0), *_batch(), mixup_group_size=3)
  settings = dataclasses.replace(DEIT, mixup_group_size=8)
  with caplog.at_level(logging.WARNING):
    settings.check_batch(32, batch_shards=8)  # 4 samples per device: a group of 8 spans two.
  assert "config.aug.mixup_group_size=8 does not divide the 4 samples of each of the 8 devices" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    settings.check_batch(64, batch_shards=8)
    dataclasses.replace(settings, mixup_alpha=0.0, cutmix_alpha=0.0).check_batch(12, batch_shards=8)  # Off.
  assert not caplog.text


def test_mixed_batch_does_not_depend_on_the_mesh():
  """On 8 devices, with groups of each device's 2 samples, the result equals one device's."""
  images, labels = _batch(batch=16)
  key = jax.random.key(3)
  settings = dataclasses.replace(DEIT, mixup_group_size=2)

  def run(images, labels):
    return mixup.mix_batch(key, images, labels, num_classes=NUM_CLASSES, settings=settings)

  expected = jax.jit(run)(images, labels)
  mesh = sharding.create_mesh(8, 1)
  batch = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    got = jax.jit(run, in_shardings=(batch, batch))(images, labels)
  for want, have in zip(expected, got):
    np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-7)

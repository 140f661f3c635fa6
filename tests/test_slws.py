"""The stochastic layer-wise shuffle: probabilities, permutation sampling and exact restoration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflemamba_jax.models import slws


def test_linear_schedule_is_linspace_and_first_layer_never_shuffled():
  probs = slws.layer_shuffle_probabilities(24, 0.5)
  np.testing.assert_allclose(probs, np.linspace(0, 0.5, 24), rtol=1e-6)
  assert probs[0] == 0.0 and probs[-1] == np.float32(0.5)
  np.testing.assert_allclose(probs[5], 5 / 23 * 0.5, rtol=1e-6)


def test_constant_schedule():
  probs = slws.layer_shuffle_probabilities(6, 0.3, "constant")
  np.testing.assert_allclose(probs, [0, 0.3, 0.3, 0.3, 0.3, 0.3], rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(depth=4, max_prob=1.5), "max_prob"),
    (dict(depth=4, max_prob=-0.1), "max_prob"),
    (dict(depth=4, max_prob=0.5, schedule="cubic"), "schedule"),
    (dict(depth=0, max_prob=0.5), "depth"),
  ],
)
def test_bad_schedule_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    slws.layer_shuffle_probabilities(**kwargs)


def test_group_size_must_be_positive():
  with pytest.raises(ValueError, match="group_size"):
    slws.sample_token_permutations(jax.random.key(0), 4, 5, 0.5, 0)


sample_many = jax.jit(
  jax.vmap(slws.sample_token_permutations, in_axes=(0, None, None, None, None)), static_argnums=(1, 2, 4)
)


def test_rows_are_permutations_and_groups_share_one_draw():
  orders = np.asarray(slws.sample_token_permutations(jax.random.key(3), 10, 7, 1.0, 4))
  assert orders.shape == (10, 7) and orders.dtype == np.int32
  for row in orders:
    assert sorted(row) == list(range(7))
  # Groups [0:4], [4:8], [8:10] share their permutation.
  for start, stop in [(0, 4), (4, 8), (8, 10)]:
    assert (orders[start:stop] == orders[start]).all()
  assert not (orders[0] == orders[4]).all()


def test_prob_zero_is_identity_and_group_size_one_is_per_sample():
  identity = np.asarray(slws.sample_token_permutations(jax.random.key(0), 6, 9, 0.0, 1))
  assert (identity == np.arange(9)).all()
  per_sample = np.asarray(slws.sample_token_permutations(jax.random.key(0), 6, 9, 1.0, 1))
  assert len({tuple(row) for row in per_sample}) == 6


def test_groups_do_not_depend_on_batch_size():
  """A group's draw depends only on (key, group index): a bigger batch extends, never changes, it."""
  small = np.asarray(slws.sample_token_permutations(jax.random.key(5), 8, 11, 0.5, 2))
  large = np.asarray(slws.sample_token_permutations(jax.random.key(5), 32, 11, 0.5, 2))
  assert (large[:8] == small).all()


@pytest.mark.parametrize("prob", [0.0, 1 / 23 * 0.5, 0.25, 0.5])
def test_shuffle_frequency_within_binomial_bounds(prob):
  trials = 4000
  keys = jax.random.split(jax.random.key(11), trials)
  orders = np.asarray(sample_many(keys, 1, 8, prob, 1))[:, 0]
  fired = (orders != np.arange(8)).any(axis=1)
  # A fired draw can be the identity with probability 1/8!: negligible.
  sigma = np.sqrt(trials * prob * (1 - prob))
  assert abs(fired.sum() - trials * prob) <= 4.5 * sigma + 1


def test_positions_are_uniform():
  trials, length = 6000, 5
  keys = jax.random.split(jax.random.key(7), trials)
  orders = np.asarray(sample_many(keys, 1, length, 1.0, 1))[:, 0]
  counts = np.stack([(orders == token).sum(axis=0) for token in range(length)])  # (token, position)
  expected = trials / length
  chi2 = ((counts - expected) ** 2 / expected).sum()
  # 16 degrees of freedom; P(chi2 > 45) < 2e-4.
  assert chi2 < 45, counts


def test_restore_undoes_permute_exactly():
  x = jax.random.normal(jax.random.key(1), (12, 17, 5))
  order = slws.sample_token_permutations(jax.random.key(2), 12, 17, 0.7, 3)
  shuffled = slws.permute_tokens(x, order)
  assert not np.array_equal(shuffled, x)
  np.testing.assert_array_equal(slws.restore_tokens(shuffled, order), x)
  np.testing.assert_array_equal(slws.permute_tokens(slws.restore_tokens(x, order), order), x)


def test_permute_moves_whole_tokens():
  x = jnp.arange(2 * 4 * 3).reshape(2, 4, 3)
  order = jnp.array([[3, 0, 1, 2], [0, 1, 2, 3]], jnp.int32)
  np.testing.assert_array_equal(slws.permute_tokens(x, order)[0], np.asarray(x[0])[[3, 0, 1, 2]])
  np.testing.assert_array_equal(slws.permute_tokens(x, order)[1], x[1])

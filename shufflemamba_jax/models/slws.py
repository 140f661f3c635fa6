"""Stochastic layer-wise shuffle (SLWS): the ShuffleMamba training regularizer.

Layer i of `depth` runs, with probability p_i, on a randomly permuted token sequence whose order
is restored afterwards. Deeper layers are shuffled more often (p_i = i / (depth - 1) * P), so
low layers keep their causal inductive bias while high layers learn order-robust features.
Samples are shuffled in groups of `group_size` that share one draw and one permutation; the
draws are keyed by (step key, layer, group) so they do not depend on the device mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from shufflemamba_jax import checks

SCHEDULES = ("linear", "constant")


def layer_shuffle_probabilities(depth: int, max_prob: float, schedule: str = "linear") -> np.ndarray:
  """Returns the (depth,) float32 shuffle probability of each layer.

  "linear" is `linspace(0, max_prob, depth)`; "constant" is `[0] + [max_prob] * (depth - 1)`.
  The first layer is never shuffled under either schedule.
  """
  checks.integer("depth", depth)
  checks.number("slws_max_prob", max_prob, 0.0, 1.0)
  if checks.one_of("slws_schedule", schedule, SCHEDULES) == "linear":
    probs = np.linspace(0.0, max_prob, depth) if depth > 1 else np.zeros(1)
  else:
    probs = np.array([0.0] + [max_prob] * (depth - 1))
  return probs.astype(np.float32)


def sample_token_permutations(key: jax.Array, batch_size: int, length: int, prob, group_size: int) -> jax.Array:
  """Draws the (batch_size, length) int32 token order of one layer.

  Rows are permutations of `range(length)`. Groups of `group_size` consecutive rows share one
  Bernoulli(prob) draw and, if it fires, one uniform random permutation; rows of groups that did
  not fire are the identity. Group g uses `fold_in(key, g)`, so each group's draw is the same
  whatever the batch is split into.
  """
  checks.integer("slws_group_size", group_size)
  num_groups = -(-batch_size // group_size)

  def one_group(group):
    fire_key, perm_key = jax.random.split(jax.random.fold_in(key, group))
    fire = jax.random.bernoulli(fire_key, prob)
    perm = jax.random.permutation(perm_key, length).astype(jnp.int32)
    return jnp.where(fire, perm, jnp.arange(length, dtype=jnp.int32))

  group_orders = jax.vmap(one_group)(jnp.arange(num_groups))
  # A broadcast, not jnp.repeat: its cumsum-based indexing made XLA gather the rows across devices.
  rows = jnp.broadcast_to(group_orders[:, None], (num_groups, group_size, length))
  return rows.reshape(num_groups * group_size, length)[:batch_size]


def permute_tokens(x: jax.Array, order: jax.Array) -> jax.Array:
  """Gathers tokens: `out[b, j] = x[b, order[b, j]]`. x is (batch, length, ...), order (batch, length)."""
  index = order.reshape(order.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def inverse_permutation(order: jax.Array) -> jax.Array:
  """Returns the (batch, length) order that undoes `order` under `permute_tokens`.

  A sort along the token axis, row by row: unlike a scatter, XLA keeps it on each row's device.
  """
  return jnp.argsort(order, axis=1).astype(order.dtype)


def restore_tokens(x: jax.Array, order: jax.Array) -> jax.Array:
  """Puts tokens permuted by `permute_tokens(., order)` back in their original order."""
  return permute_tokens(x, inverse_permutation(order))

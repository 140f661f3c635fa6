"""The selective scan matches a float64 loop reference, in every method, direction and dtype."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflemamba_jax.models.ssm import selective_scan

METHODS = [("associative", 64), ("sequential", 64), ("chunked", 4), ("chunked", 5), ("chunked", 64)]


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False):
  """SPEC §3 as a float64 NumPy loop over positions (mamba_ssm's selective_scan_ref, channels-last)."""
  u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + np.asarray(delta_bias, np.float64)
  if delta_softplus:
    delta = np.log1p(np.exp(delta))
  batch, length, channels = u.shape
  h = np.zeros((batch, channels, A.shape[1]))
  y = np.zeros((batch, length, channels))
  positions = range(length - 1, -1, -1) if reverse else range(length)
  for l in positions:
    h = np.exp(delta[:, l, :, None] * A) * h + (delta[:, l] * u[:, l])[..., None] * B[:, l, None, :]
    y[:, l] = np.einsum("ben,bn->be", h, C[:, l])
  if D is not None:
    y = y + u * np.asarray(D, np.float64)
  if z is not None:
    z = np.asarray(z, np.float64)
    y = y * z / (1 + np.exp(-z))
  return y


def random_inputs(seed, batch=2, length=13, channels=6, state=4):
  rng = np.random.default_rng(seed)
  return dict(
    u=rng.normal(size=(batch, length, channels)).astype(np.float32),
    delta=rng.normal(scale=0.5, size=(batch, length, channels)).astype(np.float32),
    A=-np.exp(rng.normal(size=(channels, state))).astype(np.float32),
    B=rng.normal(size=(batch, length, state)).astype(np.float32),
    C=rng.normal(size=(batch, length, state)).astype(np.float32),
    D=rng.normal(size=(channels,)).astype(np.float32),
    z=rng.normal(size=(batch, length, channels)).astype(np.float32),
    delta_bias=rng.normal(scale=0.5, size=(channels,)).astype(np.float32),
  )


def call(inputs, *, options, method, chunk_size, reverse=False):
  use_d, use_z, use_bias, softplus = options
  kwargs = dict(
    D=inputs["D"] if use_d else None,
    z=inputs["z"] if use_z else None,
    delta_bias=inputs["delta_bias"] if use_bias else None,
    delta_softplus=softplus,
  )
  if not softplus:  # keep delta positive so the scan is stable without softplus
    inputs = dict(inputs, delta=np.abs(inputs["delta"]))
  args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
  return args, kwargs, selective_scan(*args, **kwargs, reverse=reverse, method=method, chunk_size=chunk_size)


ALL_OPTIONS = list(itertools.product([False, True], repeat=4))  # (D, z, delta_bias, softplus)


@pytest.mark.parametrize("method,chunk_size", METHODS)
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_float64_reference(method, chunk_size, reverse):
  inputs = random_inputs(0)
  # The optional terms are shared pre/post-processing: every combination on one method, and
  # none / all of them on the others.
  option_sets = ALL_OPTIONS if method == "associative" else [ALL_OPTIONS[0], ALL_OPTIONS[-1]]
  for options in option_sets:
    args, kwargs, out = call(inputs, options=options, method=method, chunk_size=chunk_size, reverse=reverse)
    expected = reference_scan(*args, **kwargs, reverse=reverse)
    assert out.dtype == jnp.float32 and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5, err_msg=str(options))


@pytest.mark.parametrize("length", [1, 3, 197, 208])
def test_odd_lengths(length):
  inputs = random_inputs(1, batch=1, length=length, channels=3, state=2)
  options = (True, True, True, True)
  args, kwargs, _ = call(inputs, options=options, method="associative", chunk_size=64)
  expected = reference_scan(*args, **kwargs)
  for method, chunk_size in METHODS:
    _, _, out = call(inputs, options=options, method=method, chunk_size=chunk_size)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=f"{method}/{chunk_size}")


@pytest.mark.parametrize("method,chunk_size", METHODS)
def test_reverse_equals_flip_scan_flip(method, chunk_size):
  inputs = random_inputs(2)
  options = (True, True, True, True)
  flipped = {k: (v[:, ::-1] if v.ndim == 3 and k != "A" else v) for k, v in inputs.items()}
  _, _, reverse = call(inputs, options=options, method=method, chunk_size=chunk_size, reverse=True)
  _, _, forward_on_flipped = call(flipped, options=options, method=method, chunk_size=chunk_size)
  np.testing.assert_allclose(reverse, np.asarray(forward_on_flipped)[:, ::-1], rtol=1e-5, atol=1e-5)


def _reference_loss_jax(u, delta, A, B, C, D, z, delta_bias, reverse):
  """A plain jnp loop of SPEC §3 (differentiable, run in float64) for reference gradients."""
  delta = jax.nn.softplus(delta + delta_bias)
  h = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), u.dtype)
  ys = [None] * u.shape[1]
  positions = range(u.shape[1] - 1, -1, -1) if reverse else range(u.shape[1])
  for l in positions:
    h = jnp.exp(delta[:, l, :, None] * A) * h + (delta[:, l] * u[:, l])[..., None] * B[:, l, None, :]
    ys[l] = jnp.einsum("ben,bn->be", h, C[:, l])
  y = (jnp.stack(ys, axis=1) + u * D) * jax.nn.silu(z)
  return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))


ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_agree_across_methods_and_reference(reverse):
  inputs = random_inputs(3, length=11)
  args = [inputs[k] for k in ARG_NAMES]
  with jax.enable_x64(True):
    expected = jax.grad(_reference_loss_jax, argnums=tuple(range(8)))(
      *[np.asarray(a, np.float64) for a in args], reverse
    )
    expected = [np.asarray(g) for g in expected]

  for method, chunk_size in METHODS:

    def loss(u, delta, A, B, C, D, z, delta_bias, method=method, chunk_size=chunk_size):
      y = selective_scan(
        u, delta, A, B, C, D, z, delta_bias, True, reverse=reverse, method=method, chunk_size=chunk_size
      )
      return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(8))))(*args)
    for name, got, want in zip(ARG_NAMES, grads, expected):
      scale = np.abs(want).max()
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=f"d{name} {method}/{chunk_size}")


@pytest.mark.parametrize("method,chunk_size", [("associative", 64), ("sequential", 64), ("chunked", 4)])
def test_bfloat16_within_upstream_tolerance(method, chunk_size):
  inputs = random_inputs(4)
  options = (True, True, True, True)
  bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
  args, kwargs, out = call(bf16, options=options, method=method, chunk_size=chunk_size)
  assert out.dtype == jnp.bfloat16
  expected = reference_scan(
    *[np.asarray(a, np.float32) for a in args],
    **{k: None if v is None else (v if isinstance(v, bool) else np.asarray(v, np.float32)) for k, v in kwargs.items()},
  )
  # Upstream mamba_ssm bf16 tolerances.
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=3e-2, atol=5e-2)


def test_bad_arguments_are_named():
  inputs = random_inputs(5)
  args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
  with pytest.raises(ValueError, match="scan_method='parallel'"):
    selective_scan(*args, method="parallel")
  with pytest.raises(ValueError, match="chunk_size"):
    selective_scan(*args, method="chunked", chunk_size=0)
  with pytest.raises(ValueError, match="shapes"):
    selective_scan(args[0], args[1], args[2][:, :2], args[3], args[4])

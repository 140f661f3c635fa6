"""The selective state-space scan (Mamba's S6 core), channels-last, in four equivalent forms.

All four methods compute the same recurrence as `selective_scan_ref` of state-spaces/mamba:
the associative form has the most parallelism, the sequential form never materializes the
(batch, length, channels, state) tensors, and the chunked form bounds that memory to one chunk
while keeping most of the parallelism. The pallas form (pallas_scan.py) is a fused kernel that
keeps the state on chip in both passes. Arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from shufflemamba_jax import checks
from shufflemamba_jax.models import pallas_scan

SCAN_METHODS = ("associative", "sequential", "chunked", "pallas")
# The default on every backend: chunks of 16 keep the ShuffleMamba-B training step at batch 256
# within 32 GiB (BENCHMARKS.md). The sequential scan is faster on CPU for short sequences.
DEFAULT_SCAN_METHOD = "chunked"
DEFAULT_CHUNK_SIZE = 16


def _combine(left, right):
  """Composes two affine maps h -> a * h + b (left applied first)."""
  a_left, b_left = left
  a_right, b_right = right
  return a_left * a_right, a_right * b_left + b_right


def _discretize(delta, A, B, u):
  """Returns (dA, dBu), each (batch, length, channels, state), float32."""
  dA = jnp.exp(delta[..., None] * A)
  dBu = (delta * u)[..., None] * B[:, :, None, :]
  return dA, dBu


def _scan_associative(u, delta, A, B, C, reverse):
  dA, dBu = _discretize(delta, A, B, u)
  _, h = jax.lax.associative_scan(_combine, (dA, dBu), axis=1, reverse=reverse)
  return jnp.einsum("blen,bln->ble", h, C)


def _per_sample(A, batch):
  """A broadcast to (batch, channels, state) before a loop that uses it.

  Its gradient then accumulates per sample inside the loop and is summed over the batch once,
  after it: with A itself, the sum over the (sharded) batch, an all-reduce across devices, would
  run in every iteration.
  """
  return jnp.broadcast_to(A, (batch,) + A.shape)


def _scan_sequential(u, delta, A, B, C, reverse):
  batch, _, channels = u.shape
  state = A.shape[-1]
  A = _per_sample(A, batch)

  def step(h, inputs):
    u_l, delta_l, B_l, C_l = inputs
    # Discretizing inside the body keeps only (batch, channels, state) per step alive.
    h = jnp.exp(delta_l[..., None] * A) * h + (delta_l * u_l)[..., None] * B_l[:, None, :]
    return h, jnp.einsum("ben,bn->be", h, C_l)

  time_major = [jnp.swapaxes(x, 0, 1) for x in (u, delta, B, C)]
  h0 = jnp.zeros((batch, channels, state), jnp.float32)
  _, y = jax.lax.scan(step, h0, time_major, reverse=reverse)
  return jnp.swapaxes(y, 0, 1)


def _scan_chunked(u, delta, A, B, C, reverse, chunk_size):
  batch, length, channels = u.shape
  state = A.shape[-1]
  chunk_size = max(1, min(chunk_size, length))
  num_chunks = -(-length // chunk_size)
  pad = num_chunks * chunk_size - length
  if pad:
    # delta = 0 on padding gives dA = 1 and dBu = 0: padded steps carry the state unchanged, so
    # they are neutral in either direction.
    widths = ((0, 0), (0, pad), (0, 0))
    u, delta, B, C = (jnp.pad(x, widths) for x in (u, delta, B, C))

  def to_chunks(x):  # (batch, L, ...) -> (num_chunks, batch, chunk, ...)
    x = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1)

  A = _per_sample(A, batch)[:, None]  # (batch, 1, channels, state): broadcasts over the chunk.

  @jax.checkpoint
  def chunk(h, inputs):
    u_c, delta_c, B_c, C_c = inputs
    dA, dBu = _discretize(delta_c, A, B_c, u_c)
    a, b = jax.lax.associative_scan(_combine, (dA, dBu), axis=1, reverse=reverse)
    h_all = a * h[:, None] + b
    y = jnp.einsum("bten,btn->bte", h_all, C_c)
    h_next = h_all[:, 0] if reverse else h_all[:, -1]
    return h_next, y

  h0 = jnp.zeros((batch, channels, state), jnp.float32)
  _, y = jax.lax.scan(chunk, h0, [to_chunks(x) for x in (u, delta, B, C)], reverse=reverse)
  y = jnp.swapaxes(y, 0, 1).reshape(batch, num_chunks * chunk_size, channels)
  return y[:, :length]


def selective_scan(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  D: jax.Array | None = None,
  z: jax.Array | None = None,
  delta_bias: jax.Array | None = None,
  delta_softplus: bool = False,
  *,
  reverse: bool = False,
  method: str = DEFAULT_SCAN_METHOD,
  chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
  """Runs the selective SSM `h_l = exp(delta_l A) h_{l-1} + delta_l B_l u_l; y_l = C_l h_l + D u_l`.

  Args:
    u: input, (batch, length, channels), any float dtype.
    delta: step sizes before `delta_bias`/softplus, (batch, length, channels).
    A: state matrix (diagonal per channel), (channels, state); negative for a stable scan.
    B, C: input-dependent projections, (batch, length, state).
    D: skip weight, (channels,), or None.
    z: gate, (batch, length, channels), or None; the output is multiplied by silu(z).
    delta_bias: added to delta before softplus, (channels,), or None.
    delta_softplus: apply softplus to delta (+ bias).
    reverse: run the recurrence from the last position to the first (the backward direction of
      a bidirectional mixer, without flipping copies).
    method: "associative", "sequential", "chunked" or "pallas" (see the module docstring).
    chunk_size: chunk length of the chunked method; the length need not divide by it. The pallas
      kernels round it up to a power of two of at least 16 (`pallas_scan.kernel_chunk`).

  Returns:
    (batch, length, channels) in u's dtype.
  """
  checks.integer("chunk_size", chunk_size)
  if u.ndim != 3 or delta.shape != u.shape:
    raise ValueError(f"u and delta must both be (batch, length, channels); got {u.shape}, {delta.shape}")
  if A.shape[0] != u.shape[-1] or B.shape != C.shape or B.shape[:2] != u.shape[:2] or B.shape[2] != A.shape[1]:
    raise ValueError(f"inconsistent shapes: u {u.shape}, A {A.shape}, B {B.shape}, C {C.shape}")

  if method == "pallas":  # the kernels fuse the casts, delta_bias, softplus, D and the gate
    return pallas_scan.pallas_selective_scan(
      u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=reverse, chunk_size=chunk_size
    )

  out_dtype = u.dtype
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  u, delta, A, B, C = f32(u), f32(delta), f32(A), f32(B), f32(C)
  if delta_bias is not None:
    delta = delta + f32(delta_bias)
  if delta_softplus:
    delta = jax.nn.softplus(delta)

  chunked = functools.partial(_scan_chunked, chunk_size=chunk_size)
  scans = {"associative": _scan_associative, "sequential": _scan_sequential, "chunked": chunked}
  if method not in scans:  # VisionMambaConfig checks its scan_method; this is for direct calls.
    raise checks.SettingError("scan_method", method, f"must be one of {SCAN_METHODS}")
  y = scans[method](u, delta, A, B, C, reverse)

  if D is not None:
    y = y + u * f32(D)
  if z is not None:
    y = y * jax.nn.silu(f32(z))
  return y.astype(out_dtype)

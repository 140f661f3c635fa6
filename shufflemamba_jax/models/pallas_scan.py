"""The selective scan as fused Pallas kernels: the (state, channels) carry never leaves the chip.

The XLA scan methods write (batch, length, channels, state) tensors to HBM in the forward and the
backward pass. These kernels read u, delta, z, B and C once and write y once; the only other output
is the state at the start of each chunk, (batch, num_chunks, state, channels), which the backward
kernel uses to recompute the states of one chunk at a time while it carries the adjoint state on chip.
The backward kernel writes du, d delta and dz, dB and dC per channel tile, and dA, dD and d delta_bias
summed over the chunks on chip per (batch, channel tile); XLA sums those partials over tiles and batch.

Three lowerings of the same math, picked by the platform being lowered for (`jax.lax.platform_dependent`):
- tpu: Mosaic; grid (batch, channel tiles of 128, chunks) with the chunk axis sequential ("arbitrary")
  and the carry in VMEM scratch. Blocks are (chunk, 128) with chunk a multiple of 16, which respects the
  (8, 128) float32 and (16, 128) bfloat16 tilings; the last chunk's block may run past the end of the
  sequence, and the kernels zero those rows.
- cuda: Triton; grid (batch, channel tiles of 64), each program loops over the chunks with the carry in
  registers and reads one position at a time. Triton wants power-of-two values, so the state is padded
  to a power of two (16 already is). The backward kernel keeps one chunk of recomputed states in a
  global-memory workspace, (batch, channel tiles, chunk, state, 64), which lives only during the kernel.
- cpu (and anything else): the TPU kernels in Pallas interpret mode, slow but exact.

The state is laid out (state, channels) so that channels fill the 128 lanes of a TPU vector register.
Channels are padded to a whole tile (no copy for the models' widths, all multiples of 128). Padding is
neutral: padded positions, channels and states have u = B = 0 (and A = 0), so the state they carry is
exactly zero and they add nothing to any gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.sharding import PartitionSpec as P

from shufflemamba_jax.parallel import sharding

TPU_CHANNEL_TILE = 128  # the lane width of a TPU vector register
GPU_CHANNEL_TILE = 64  # with state 16: 1024 carry elements, 8 per thread of 4 warps
MIN_CHUNK = 16  # the bf16 sublane tile on TPU: a (chunk, channels) bf16 block needs a multiple of 16 rows


def kernel_chunk(chunk_size: int) -> int:
  """The kernels' chunk length: chunk_size rounded up to a power of two, at least MIN_CHUNK."""
  return max(MIN_CHUNK, 1 << (max(chunk_size, 1) - 1).bit_length())


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _next_pow2(x: int) -> int:
  return 1 << (max(x, 1) - 1).bit_length()


# ---------------------------------------------------------------------------------------------------
# The math of one position, shared by both backends. Rows are (1, channels), columns (state, 1), the
# carry and A are (state, channels); everything float32.


def _softplus(x):
  # log1p(exp(x)) overflows for large x, where softplus(x) = x to float32 precision.
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _delta(raw, bias, softplus):
  """Returns (delta, d delta / d raw) for the raw delta row or tile."""
  x = raw if bias is None else raw + bias
  if not softplus:
    return x, None
  return _softplus(x), jax.nn.sigmoid(x)


def _silu_and_grad(z):
  s = jax.nn.sigmoid(z)
  return z * s, s * (1.0 + z * (1.0 - s))


def _forward_step(h, at, d, x, b, c):
  """h <- exp(d A) h + b x; returns (h, C.h as a row)."""
  h = jnp.exp(d * at) * h + b * x
  return h, jnp.sum(h * c, axis=0, keepdims=True)


def _backward_step(g, h, h_prev, at, d, x, u, dy, b, c):
  """One position of the adjoint recurrence.

  g is the adjoint carried in from the later positions (exp(d' A) * dh'), dy the cotangent of C.h.
  Returns (g for the earlier positions, d delta row, du row from the scan, dB column, dC column,
  this position's contribution to dA).
  """
  a = jnp.exp(d * at)
  dh = g + c * dy
  dc = jnp.sum(h * dy, axis=1, keepdims=True)
  db = jnp.sum(dh * x, axis=1, keepdims=True)
  dx = jnp.sum(dh * b, axis=0, keepdims=True)
  da = dh * h_prev * a  # the cotangent of d * A
  dd = jnp.sum(da * at, axis=0, keepdims=True) + dx * u
  return a * dh, dd, dx * d, db, dc, da * d


# ---------------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels: one program per (batch, channel tile, chunk), the chunk axis in order.


def _column(tile, t):
  """Column t of a (state, chunk) tile as (state, 1), by a masked lane reduction (no dynamic lane slice)."""
  lane = jax.lax.broadcasted_iota(jnp.int32, tile.shape, 1)
  return jnp.sum(jnp.where(lane == t, tile, 0.0), axis=1, keepdims=True)


def _unpack(refs, flags):
  """Splits refs into a dict by the names whose flag is set, in order."""
  out, refs = {}, list(refs)
  for name, present in flags:
    out[name] = refs.pop(0) if present else None
  return out, refs


def _rows_valid(k, *, chunk, num_chunks, length, chunk_reversed, shape):
  """Which rows of the (chunk, channels) block at grid step k lie before the end of the sequence."""
  c = num_chunks - 1 - k if chunk_reversed else k
  return c * chunk + jax.lax.broadcasted_iota(jnp.int32, shape, 0) < length


def _load_rows(ref, valid):
  """The block as float32, rows past the end zeroed (they hold whatever the padded block read)."""
  x = ref[...].astype(jnp.float32)
  return x if valid is None else jnp.where(valid, x, 0.0)


def _tpu_forward_kernel(*refs, chunk, num_chunks, length, reverse, softplus, has_d, has_z, has_bias):
  inputs, refs = _unpack(
    refs,
    [("u", True), ("delta", True), ("z", has_z), ("at", True), ("bias", has_bias), ("d", has_d), ("bt", True)]
    + [("ct", True)],
  )
  y_ref, start_ref, h_scr, d_scr, x_scr, y_scr = refs

  @pl.when(pl.program_id(2) == 0)
  def _():
    h_scr[...] = jnp.zeros_like(h_scr)

  start_ref[...] = h_scr[...]
  valid = None
  if length % chunk:  # zero u and delta past the end: those steps then leave a zero state zero
    valid = _rows_valid(
      pl.program_id(2), chunk=chunk, num_chunks=num_chunks, length=length, chunk_reversed=reverse, shape=d_scr.shape
    )
  u = _load_rows(inputs["u"], valid)
  bias = None if inputs["bias"] is None else inputs["bias"][...]
  d, _ = _delta(_load_rows(inputs["delta"], valid), bias, softplus)
  d_scr[...] = d
  x_scr[...] = d * u
  at, bt, ct = inputs["at"][...], inputs["bt"][...], inputs["ct"][...]

  def body(i, h):
    t = chunk - 1 - i if reverse else i
    h, y = _forward_step(h, at, d_scr[pl.ds(t, 1), :], x_scr[pl.ds(t, 1), :], _column(bt, t), _column(ct, t))
    y_scr[pl.ds(t, 1), :] = y
    return h

  h_scr[...] = jax.lax.fori_loop(0, chunk, body, h_scr[...])
  y = y_scr[...]
  if has_d:
    y = y + inputs["d"][...] * u
  if has_z:
    y = y * _silu_and_grad(inputs["z"][...].astype(jnp.float32))[0]
  y_ref[...] = y.astype(y_ref.dtype)


def _tpu_backward_kernel(*refs, chunk, num_chunks, length, reverse, softplus, has_d, has_z, has_bias):
  inputs, refs = _unpack(
    refs,
    [("u", True), ("delta", True), ("z", has_z), ("dout", True), ("at", True), ("bias", has_bias), ("d", has_d)]
    + [("bt", True), ("ct", True), ("start", True)],
  )
  grads, refs = _unpack(
    refs,
    [("u", True), ("delta", True), ("z", has_z), ("bt", True), ("ct", True), ("at", True), ("d", has_d)]
    + [("bias", has_bias)],
  )
  g_scr, hs_scr, u_scr, d_scr, x_scr, dy_scr, dd_scr, dx_scr = refs

  @pl.when(pl.program_id(2) == 0)
  def _():
    g_scr[...] = jnp.zeros_like(g_scr)
    for name in ("at", "d", "bias"):
      if grads[name] is not None:
        grads[name][...] = jnp.zeros_like(grads[name])

  valid = None
  if length % chunk:  # rows past the end: zero inputs and cotangents contribute exactly nothing
    valid = _rows_valid(
      pl.program_id(2), chunk=chunk, num_chunks=num_chunks, length=length, chunk_reversed=not reverse, shape=d_scr.shape
    )
  u = _load_rows(inputs["u"], valid)
  bias = None if inputs["bias"] is None else inputs["bias"][...]
  d, dsoftplus = _delta(_load_rows(inputs["delta"], valid), bias, softplus)
  dout = _load_rows(inputs["dout"], valid)
  if has_z:
    silu, dsilu = _silu_and_grad(_load_rows(inputs["z"], valid))
    dy = dout * silu
  else:
    dy = dout
  u_scr[...], d_scr[...], x_scr[...], dy_scr[...] = u, d, d * u, dy
  at, bt, ct, start = inputs["at"][...], inputs["bt"][...], inputs["ct"][...], inputs["start"][...]

  # Recompute the chunk's states from its start state, in the forward order.
  def recompute(i, h):
    t = chunk - 1 - i if reverse else i
    h, _ = _forward_step(h, at, d_scr[pl.ds(t, 1), :], x_scr[pl.ds(t, 1), :], _column(bt, t), _column(ct, t))
    hs_scr[t] = h
    return h

  jax.lax.fori_loop(0, chunk, recompute, start)

  # Then walk back through it, carrying the adjoint state.
  lane = jax.lax.broadcasted_iota(jnp.int32, bt.shape, 1)

  def backward(i, carry):
    g, dat, dbt, dct, ylin = carry
    t = i if reverse else chunk - 1 - i
    t_prev = t + 1 if reverse else t - 1  # the position scanned just before t
    first = t_prev == (chunk if reverse else -1)
    h_prev = jnp.where(first, start, hs_scr[jnp.clip(t_prev, 0, chunk - 1)])
    h = hs_scr[t]
    c = _column(ct, t)
    g, dd, dx, db, dc, dat_t = _backward_step(
      g,
      h,
      h_prev,
      at,
      d_scr[pl.ds(t, 1), :],
      x_scr[pl.ds(t, 1), :],
      u_scr[pl.ds(t, 1), :],
      dy_scr[pl.ds(t, 1), :],
      _column(bt, t),
      c,
    )
    dd_scr[pl.ds(t, 1), :] = dd
    dx_scr[pl.ds(t, 1), :] = dx
    # C.h of every position, for the gradient of the gate.
    ylin = jnp.where(jax.lax.broadcasted_iota(jnp.int32, ylin.shape, 0) == t, jnp.sum(h * c, axis=0), ylin)
    return g, dat + dat_t, jnp.where(lane == t, db, dbt), jnp.where(lane == t, dc, dct), ylin

  zeros = jnp.zeros_like
  g, dat, dbt, dct, ylin = jax.lax.fori_loop(
    0, chunk, backward, (g_scr[...], zeros(start), zeros(bt), zeros(ct), zeros(u))
  )
  g_scr[...] = g
  grads["at"][...] += dat
  grads["bt"][...] = dbt
  grads["ct"][...] = dct

  ddelta = dd_scr[...]
  if softplus:
    ddelta = ddelta * dsoftplus
  du = dx_scr[...]
  if has_d:
    du = du + dy * inputs["d"][...]
    grads["d"][...] += jnp.sum(dy * u, axis=0, keepdims=True)
    ylin = ylin + inputs["d"][...] * u
  if has_bias:
    grads["bias"][...] += jnp.sum(ddelta, axis=0, keepdims=True)
  if has_z:
    grads["z"][...] = (dout * ylin * dsilu).astype(grads["z"].dtype)
  grads["u"][...] = du.astype(grads["u"].dtype)
  grads["delta"][...] = ddelta.astype(grads["delta"].dtype)


def _tpu_layout(u, delta, z, A, B, C, D, delta_bias, chunk):
  """Pads channels to TPU_CHANNEL_TILE (no copy for the models' widths, all multiples of 128) and lays out
  B and C as (batch, num_chunks, state, chunk), padded with zeros. The length of u, delta and z is not
  padded: the last chunk's block runs past the end, and the kernels zero the rows beyond it."""
  batch, length, channels = u.shape
  num_chunks = -(-length // chunk)
  lp, ep = num_chunks * chunk, _round_up(channels, TPU_CHANNEL_TILE)
  state = sp = A.shape[1]

  def seq(x):
    return None if x is None else jnp.pad(x, ((0, 0), (0, 0), (0, ep - channels)))

  def vec(x):
    return None if x is None else jnp.pad(x, (0, ep - channels)).reshape(1, ep)

  def chunked_t(x):  # (batch, L, N) -> (batch, num_chunks, N, chunk)
    x = jnp.pad(x, ((0, 0), (0, lp - length), (0, sp - state)))
    return x.reshape(batch, num_chunks, chunk, sp).transpose(0, 1, 3, 2)

  at = jnp.pad(A.T, ((0, sp - state), (0, ep - channels)))
  return dict(
    u=seq(u), delta=seq(delta), z=seq(z), at=at, bias=vec(delta_bias), d=vec(D), bt=chunked_t(B), ct=chunked_t(C)
  )


def _tpu_specs(batch, num_chunks, state, ep, chunk, reverse_order):
  """Block specs over the grid (batch, channel tile, k), k visiting the chunks in the given order."""
  order = (lambda k: num_chunks - 1 - k) if reverse_order else (lambda k: k)
  tile = TPU_CHANNEL_TILE
  return dict(
    seq=pl.BlockSpec((None, chunk, tile), lambda b, e, k: (b, order(k), e)),
    at=pl.BlockSpec((state, tile), lambda b, e, k: (0, e)),
    vec=pl.BlockSpec((1, tile), lambda b, e, k: (0, e)),
    bc=pl.BlockSpec((None, None, state, chunk), lambda b, e, k: (b, order(k), 0, 0)),
    start=pl.BlockSpec((None, None, state, tile), lambda b, e, k: (b, order(k), 0, e)),
    dbc=pl.BlockSpec((None, None, None, state, chunk), lambda b, e, k: (b, e, order(k), 0, 0)),
    acc_at=pl.BlockSpec((None, state, tile), lambda b, e, k: (b, 0, e)),
    acc_vec=pl.BlockSpec((None, 1, tile), lambda b, e, k: (b, 0, e)),
  )


def _tpu_params(interpret):
  if interpret:
    return dict(interpret=True)
  return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")))


def _bind(kernel, optional, chunk, num_chunks, length, reverse, softplus, **more):
  """`kernel` with its static settings bound (every backend's kernels take the same ones);
  `optional` = (D, z, delta_bias), each None when absent."""
  has_d, has_z, has_bias = (x is not None for x in optional)
  static = dict(chunk=chunk, num_chunks=num_chunks, length=length, reverse=reverse, softplus=softplus)
  return functools.partial(kernel, has_d=has_d, has_z=has_z, has_bias=has_bias, **static, **more)


def _tpu_forward(u, delta, z, A, B, C, D, delta_bias, *, chunk, reverse, softplus, interpret):
  batch, length, channels = u.shape
  x = _tpu_layout(u, delta, z, A, B, C, D, delta_bias, chunk)
  ep = x["u"].shape[2]
  num_chunks, state = x["bt"].shape[1], A.shape[1]
  specs = _tpu_specs(batch, num_chunks, state, ep, chunk, reverse)
  names = [("u", "seq"), ("delta", "seq"), ("z", "seq"), ("at", "at"), ("bias", "vec"), ("d", "vec")]
  names += [("bt", "bc"), ("ct", "bc")]
  args = [(x[n], specs[s]) for n, s in names if x[n] is not None]
  kernel = _bind(_tpu_forward_kernel, (D, z, delta_bias), chunk, num_chunks, length, reverse, softplus)
  y, start = pl.pallas_call(
    kernel,
    grid=(batch, ep // TPU_CHANNEL_TILE, num_chunks),
    in_specs=[s for _, s in args],
    out_specs=[specs["seq"], specs["start"]],
    out_shape=[
      jax.ShapeDtypeStruct((batch, length, ep), u.dtype),
      jax.ShapeDtypeStruct((batch, num_chunks, state, ep), jnp.float32),
    ],
    scratch_shapes=[pltpu.VMEM((state, TPU_CHANNEL_TILE), jnp.float32)]
    + [pltpu.VMEM((chunk, TPU_CHANNEL_TILE), jnp.float32)] * 3,
    name="selective_scan_forward",
    **_tpu_params(interpret),
  )(*[a for a, _ in args])
  return y[:, :length, :channels], start[..., :channels]


def _tpu_backward(u, delta, z, A, B, C, D, delta_bias, start, dout, *, chunk, reverse, softplus, interpret):
  batch, length, channels = u.shape
  x = _tpu_layout(u, delta, z, A, B, C, D, delta_bias, chunk)
  ep = x["u"].shape[2]
  num_chunks, state, tiles = x["bt"].shape[1], A.shape[1], ep // TPU_CHANNEL_TILE
  lp = num_chunks * chunk
  x["dout"] = jnp.pad(dout, ((0, 0), (0, 0), (0, ep - channels)))
  x["start"] = jnp.pad(start, ((0, 0), (0, 0), (0, 0), (0, ep - channels)))
  # The backward kernel visits the chunks in the opposite order of the forward one.
  specs = _tpu_specs(batch, num_chunks, state, ep, chunk, not reverse)
  names = [("u", "seq"), ("delta", "seq"), ("z", "seq"), ("dout", "seq"), ("at", "at"), ("bias", "vec")]
  names += [("d", "vec"), ("bt", "bc"), ("ct", "bc"), ("start", "start")]
  args = [(x[n], specs[s]) for n, s in names if x[n] is not None]
  outs = [
    ("u", specs["seq"], (batch, length, ep), u.dtype),
    ("delta", specs["seq"], (batch, length, ep), delta.dtype),
    ("z", specs["seq"], (batch, length, ep), None if z is None else z.dtype),
    ("bt", specs["dbc"], (batch, tiles, num_chunks, state, chunk), jnp.float32),
    ("ct", specs["dbc"], (batch, tiles, num_chunks, state, chunk), jnp.float32),
    ("at", specs["acc_at"], (batch, state, ep), jnp.float32),
    ("d", specs["acc_vec"], (batch, 1, ep), jnp.float32),
    ("bias", specs["acc_vec"], (batch, 1, ep), jnp.float32),
  ]
  present = {"z": z is not None, "d": D is not None, "bias": delta_bias is not None}
  outs = [o for o in outs if present.get(o[0], True)]
  kernel = _bind(_tpu_backward_kernel, (D, z, delta_bias), chunk, num_chunks, length, reverse, softplus)
  tile = TPU_CHANNEL_TILE
  results = pl.pallas_call(
    kernel,
    grid=(batch, tiles, num_chunks),
    in_specs=[s for _, s in args],
    out_specs=[o[1] for o in outs],
    out_shape=[jax.ShapeDtypeStruct(o[2], o[3]) for o in outs],
    scratch_shapes=[pltpu.VMEM((state, tile), jnp.float32), pltpu.VMEM((chunk, state, tile), jnp.float32)]
    + [pltpu.VMEM((chunk, tile), jnp.float32)] * 6,
    name="selective_scan_backward",
    **_tpu_params(interpret),
  )(*[a for a, _ in args])
  g = dict(zip([o[0] for o in outs], results))

  def bc(x):  # (batch, tiles, num_chunks, N, chunk) partials -> (batch, L, N)
    x = x.sum(axis=1).transpose(0, 1, 3, 2).reshape(batch, lp, state)
    return x[:, :length]

  seq = lambda x: None if x is None else x[:, :length, :channels]
  vec = lambda x: None if x is None else x.sum(axis=(0, 1))[:channels]
  return (
    seq(g["u"]),
    seq(g["delta"]),
    seq(g.get("z")),
    g["at"].sum(axis=0)[:, :channels].T,
    bc(g["bt"]),
    bc(g["ct"]),
    vec(g.get("d")),
    vec(g.get("bias")),
  )


# ---------------------------------------------------------------------------------------------------
# GPU (Triton) kernels: one program per (batch, channel tile), looping over the chunks in order.


def _gpu_forward_kernel(*refs, chunk, num_chunks, length, reverse, softplus, has_d, has_z, has_bias):
  inputs, refs = _unpack(
    refs,
    [("u", True), ("delta", True), ("z", has_z), ("at", True), ("bias", has_bias), ("d", has_d), ("bt", True)]
    + [("ct", True)],
  )
  y_ref, start_ref = refs
  at = inputs["at"][...]
  bias = None if inputs["bias"] is None else inputs["bias"][...]

  def row(name, t):
    return inputs[name][pl.ds(t, 1), :].astype(jnp.float32)

  def chunk_body(k, h):
    c = num_chunks - 1 - k if reverse else k
    start_ref[c] = h
    n = jnp.minimum(chunk, length - c * chunk)  # the last chunk may be partial

    def step(i, h):
      t = c * chunk + (n - 1 - i if reverse else i)
      u = row("u", t)
      d, _ = _delta(row("delta", t), bias, softplus)
      h, y = _forward_step(h, at, d, d * u, inputs["bt"][:, pl.ds(t, 1)], inputs["ct"][:, pl.ds(t, 1)])
      if has_d:
        y = y + inputs["d"][...] * u
      if has_z:
        y = y * _silu_and_grad(row("z", t))[0]
      y_ref[pl.ds(t, 1), :] = y.astype(y_ref.dtype)
      return h

    return jax.lax.fori_loop(0, n, step, h)

  jax.lax.fori_loop(0, num_chunks, chunk_body, jnp.zeros(at.shape, jnp.float32))


def _gpu_backward_kernel(*refs, chunk, num_chunks, length, reverse, softplus, has_d, has_z, has_bias, interpret):
  inputs, refs = _unpack(
    refs,
    [("u", True), ("delta", True), ("z", has_z), ("dout", True), ("at", True), ("bias", has_bias), ("d", has_d)]
    + [("bt", True), ("ct", True), ("start", True)],
  )
  grads, refs = _unpack(
    refs,
    [("u", True), ("delta", True), ("z", has_z), ("bt", True), ("ct", True), ("at", True), ("d", has_d)]
    + [("bias", has_bias)],
  )
  (hs_ref,) = refs  # workspace in global memory: one chunk of states of this program
  at = inputs["at"][...]
  bias = None if inputs["bias"] is None else inputs["bias"][...]
  dvec = inputs["d"][...] if has_d else None

  def row(name, t):
    return inputs[name][pl.ds(t, 1), :].astype(jnp.float32)

  def chunk_body(k, carry):
    g, dat, dd_acc, dbias_acc = carry
    c = k if reverse else num_chunks - 1 - k
    start = inputs["start"][c]
    n = jnp.minimum(chunk, length - c * chunk)  # the last chunk may be partial

    def recompute(i, h):
      j = n - 1 - i if reverse else i
      t = c * chunk + j
      d, _ = _delta(row("delta", t), bias, softplus)
      h, _ = _forward_step(h, at, d, d * row("u", t), inputs["bt"][:, pl.ds(t, 1)], inputs["ct"][:, pl.ds(t, 1)])
      hs_ref[j] = h
      return h

    jax.lax.fori_loop(0, n, recompute, start)
    if not interpret:  # the states written above are read back by other threads
      pltriton.debug_barrier()

    def backward(i, carry):
      g, dat, dd_acc, dbias_acc = carry
      j = i if reverse else n - 1 - i
      t = c * chunk + j
      j_prev = j + 1 if reverse else j - 1
      first = j_prev == (n if reverse else -1)
      h_prev = jnp.where(first, start, hs_ref[jnp.clip(j_prev, 0, chunk - 1)])
      h = hs_ref[j]
      u = row("u", t)
      d, dsoftplus = _delta(row("delta", t), bias, softplus)
      dout = row("dout", t)
      b, cc = inputs["bt"][:, pl.ds(t, 1)], inputs["ct"][:, pl.ds(t, 1)]
      ylin = jnp.sum(h * cc, axis=0, keepdims=True)
      if has_z:
        silu, dsilu = _silu_and_grad(row("z", t))
        dy = dout * silu
      else:
        dy = dout
      g, dd, du, db, dc, dat_t = _backward_step(g, h, h_prev, at, d, d * u, u, dy, b, cc)
      if softplus:
        dd = dd * dsoftplus
      if has_d:
        du = du + dy * dvec
        dd_acc = dd_acc + dy * u
        ylin = ylin + dvec * u
      if has_z:
        grads["z"][pl.ds(t, 1), :] = (dout * ylin * dsilu).astype(grads["z"].dtype)
      grads["u"][pl.ds(t, 1), :] = du.astype(grads["u"].dtype)
      grads["delta"][pl.ds(t, 1), :] = dd.astype(grads["delta"].dtype)
      grads["bt"][:, pl.ds(t, 1)] = db
      grads["ct"][:, pl.ds(t, 1)] = dc
      return g, dat + dat_t, dd_acc, dbias_acc + dd

    carry = jax.lax.fori_loop(0, n, backward, (g, dat, dd_acc, dbias_acc))
    if not interpret:  # the next chunk overwrites the workspace
      pltriton.debug_barrier()
    return carry

  zero_row = jnp.zeros((1, at.shape[1]), jnp.float32)
  _, dat, dd_acc, dbias_acc = jax.lax.fori_loop(
    0, num_chunks, chunk_body, (jnp.zeros_like(at), jnp.zeros_like(at), zero_row, zero_row)
  )
  grads["at"][...] = dat
  if has_d:
    grads["d"][...] = dd_acc
  if has_bias:
    grads["bias"][...] = dbias_acc


def _gpu_layout(u, delta, z, A, B, C, D, delta_bias, chunk):
  """Pads the state to a power of two and channels to GPU_CHANNEL_TILE (no copy at the models' sizes); B and C
  as (batch, state, length). The length is not padded: the kernels visit only the real positions, one at a time."""
  batch, length, channels = u.shape
  ep = _round_up(channels, GPU_CHANNEL_TILE)
  state = A.shape[1]
  sp = _next_pow2(state)

  def seq(x):
    return None if x is None else jnp.pad(x, ((0, 0), (0, 0), (0, ep - channels)))

  def vec(x):
    return None if x is None else jnp.pad(x, (0, ep - channels)).reshape(1, ep)

  def transposed(x):  # (batch, L, N) -> (batch, N, L)
    return jnp.pad(x, ((0, 0), (0, 0), (0, sp - state))).transpose(0, 2, 1)

  at = jnp.pad(A.T, ((0, sp - state), (0, ep - channels)))
  return dict(
    u=seq(u), delta=seq(delta), z=seq(z), at=at, bias=vec(delta_bias), d=vec(D), bt=transposed(B), ct=transposed(C)
  )


def _gpu_specs(length, sp, num_chunks):
  tile = GPU_CHANNEL_TILE
  return dict(
    seq=pl.BlockSpec((None, length, tile), lambda b, e: (b, 0, e)),
    at=pl.BlockSpec((sp, tile), lambda b, e: (0, e)),
    vec=pl.BlockSpec((1, tile), lambda b, e: (0, e)),
    bc=pl.BlockSpec((None, sp, length), lambda b, e: (b, 0, 0)),
    start=pl.BlockSpec((None, num_chunks, sp, tile), lambda b, e: (b, 0, 0, e)),
    dbc=pl.BlockSpec((None, None, sp, length), lambda b, e: (b, e, 0, 0)),
    acc_at=pl.BlockSpec((None, sp, tile), lambda b, e: (b, 0, e)),
    acc_vec=pl.BlockSpec((None, 1, tile), lambda b, e: (b, 0, e)),
  )


def _gpu_params(interpret):
  return dict(interpret=True) if interpret else dict(compiler_params=pltriton.CompilerParams(num_warps=4))


def _gpu_forward(u, delta, z, A, B, C, D, delta_bias, *, chunk, reverse, softplus, interpret):
  batch, length, channels = u.shape
  x = _gpu_layout(u, delta, z, A, B, C, D, delta_bias, chunk)
  ep = x["u"].shape[2]
  sp, num_chunks = x["at"].shape[0], -(-length // chunk)
  specs = _gpu_specs(length, sp, num_chunks)
  names = [("u", "seq"), ("delta", "seq"), ("z", "seq"), ("at", "at"), ("bias", "vec"), ("d", "vec")]
  names += [("bt", "bc"), ("ct", "bc")]
  args = [(x[n], specs[s]) for n, s in names if x[n] is not None]
  kernel = _bind(_gpu_forward_kernel, (D, z, delta_bias), chunk, num_chunks, length, reverse, softplus)
  y, start = pl.pallas_call(
    kernel,
    grid=(batch, ep // GPU_CHANNEL_TILE),
    in_specs=[s for _, s in args],
    out_specs=[specs["seq"], specs["start"]],
    out_shape=[
      jax.ShapeDtypeStruct((batch, length, ep), u.dtype),
      jax.ShapeDtypeStruct((batch, num_chunks, sp, ep), jnp.float32),
    ],
    name="selective_scan_forward",
    **_gpu_params(interpret),
  )(*[a for a, _ in args])
  return y[:, :, :channels], start[:, :, : A.shape[1], :channels]


def _gpu_backward(u, delta, z, A, B, C, D, delta_bias, start, dout, *, chunk, reverse, softplus, interpret):
  batch, length, channels = u.shape
  x = _gpu_layout(u, delta, z, A, B, C, D, delta_bias, chunk)
  ep = x["u"].shape[2]
  sp, num_chunks, state, tiles = x["at"].shape[0], start.shape[1], A.shape[1], ep // GPU_CHANNEL_TILE
  x["dout"] = jnp.pad(dout, ((0, 0), (0, 0), (0, ep - channels)))
  x["start"] = jnp.pad(start, ((0, 0), (0, 0), (0, sp - state), (0, ep - channels)))
  specs = _gpu_specs(length, sp, num_chunks)
  names = [("u", "seq"), ("delta", "seq"), ("z", "seq"), ("dout", "seq"), ("at", "at"), ("bias", "vec")]
  names += [("d", "vec"), ("bt", "bc"), ("ct", "bc"), ("start", "start")]
  args = [(x[n], specs[s]) for n, s in names if x[n] is not None]
  outs = [
    ("u", specs["seq"], (batch, length, ep), u.dtype),
    ("delta", specs["seq"], (batch, length, ep), delta.dtype),
    ("z", specs["seq"], (batch, length, ep), None if z is None else z.dtype),
    ("bt", specs["dbc"], (batch, tiles, sp, length), jnp.float32),
    ("ct", specs["dbc"], (batch, tiles, sp, length), jnp.float32),
    ("at", specs["acc_at"], (batch, sp, ep), jnp.float32),
    ("d", specs["acc_vec"], (batch, 1, ep), jnp.float32),
    ("bias", specs["acc_vec"], (batch, 1, ep), jnp.float32),
  ]
  present = {"z": z is not None, "d": D is not None, "bias": delta_bias is not None}
  outs = [o for o in outs if present.get(o[0], True)]
  outs.append(
    (
      "workspace",
      pl.BlockSpec((None, None, chunk, sp, GPU_CHANNEL_TILE), lambda b, e: (b, e, 0, 0, 0)),
      (batch, tiles, chunk, sp, GPU_CHANNEL_TILE),
      jnp.float32,
    )
  )
  kernel = _bind(
    _gpu_backward_kernel, (D, z, delta_bias), chunk, num_chunks, length, reverse, softplus, interpret=interpret
  )
  results = pl.pallas_call(
    kernel,
    grid=(batch, tiles),
    in_specs=[s for _, s in args],
    out_specs=[o[1] for o in outs],
    out_shape=[jax.ShapeDtypeStruct(o[2], o[3]) for o in outs],
    name="selective_scan_backward",
    **_gpu_params(interpret),
  )(*[a for a, _ in args])
  g = dict(zip([o[0] for o in outs], results))
  seq = lambda x: None if x is None else x[:, :length, :channels]
  vec = lambda x: None if x is None else x.sum(axis=(0, 1))[:channels]
  bc = lambda x: x.sum(axis=1)[:, :state, :length].transpose(0, 2, 1)
  return (
    seq(g["u"]),
    seq(g["delta"]),
    seq(g.get("z")),
    g["at"].sum(axis=0)[:state, :channels].T,
    bc(g["bt"]),
    bc(g["ct"]),
    vec(g.get("d")),
    vec(g.get("bias")),
  )


# ---------------------------------------------------------------------------------------------------
# Dispatch and differentiation.

_FORWARD = {"tpu": _tpu_forward, "gpu": _gpu_forward}
_BACKWARD = {"tpu": _tpu_backward, "gpu": _gpu_backward}


def _by_platform(table, *args, **kwargs):
  """Lowers table's TPU kernel for tpu, its GPU kernel for cuda, and the TPU kernel interpreted elsewhere."""
  branch = lambda backend, interpret: lambda *a: table[backend](*a, **kwargs, interpret=interpret)
  return jax.lax.platform_dependent(
    *args, tpu=branch("tpu", False), cuda=branch("gpu", False), default=branch("tpu", True)
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _scan(u, delta, z, A, B, C, D, delta_bias, chunk, reverse, softplus, backend):
  return _scan_forward(u, delta, z, A, B, C, D, delta_bias, chunk, reverse, softplus, backend)[0]


def _scan_forward(u, delta, z, A, B, C, D, delta_bias, chunk, reverse, softplus, backend):
  kwargs = dict(chunk=chunk, reverse=reverse, softplus=softplus)
  args = (u, delta, z, A, B, C, D, delta_bias)
  if backend is None:
    y, start = _by_platform(_FORWARD, *args, **kwargs)
  else:  # a named backend, interpreted (tests of the GPU kernels' code on CPU)
    y, start = _FORWARD[backend](*args, **kwargs, interpret=True)
  return y, (u, delta, z, A, B, C, D, delta_bias, start)


def _scan_backward(chunk, reverse, softplus, backend, residuals, dout):
  kwargs = dict(chunk=chunk, reverse=reverse, softplus=softplus)
  if backend is None:
    return _by_platform(_BACKWARD, *residuals, dout, **kwargs)
  return _BACKWARD[backend](*residuals, dout, **kwargs, interpret=True)


_scan.defvjp(_scan_forward, _scan_backward)


def pallas_selective_scan(
  u,
  delta,
  A,
  B,
  C,
  D=None,
  z=None,
  delta_bias=None,
  delta_softplus=False,
  *,
  reverse=False,
  chunk_size=16,
  backend=None,
):
  """The selective scan of `ssm.selective_scan` as fused Pallas kernels, differentiable.

  u, delta, z: (batch, length, channels) in any float dtype (the kernels read them as they are and
  compute in float32); A: (channels, state); B, C: (batch, length, state); D, delta_bias: (channels,).
  Returns y, (batch, length, channels) in u's dtype. The kernels' chunk is `kernel_chunk(chunk_size)`.
  `backend` None picks the kernel by the platform lowered for; "tpu" or "gpu" interprets that one
  (for tests on CPU).
  """
  if backend not in (None, "tpu", "gpu"):
    raise ValueError(f"backend must be None, 'tpu' or 'gpu'; got {backend!r}")
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  args = dict(u=u, delta=delta, z=z, A=f32(A), B=f32(B), C=f32(C), D=f32(D), delta_bias=f32(delta_bias))
  settings = (kernel_chunk(chunk_size), reverse, bool(delta_softplus), backend)

  def run(**present):
    x = {name: present.get(name) for name in args}
    return _scan(x["u"], x["delta"], x["z"], x["A"], x["B"], x["C"], x["D"], x["delta_bias"], *settings)

  present = {name: x for name, x in args.items() if x is not None}
  if sharding.batch_mesh(u.shape[0]) is None:
    return run(**present)
  axes = sharding.BATCH_AXES
  # XLA cannot partition a kernel's custom call: it would gather the whole batch onto every device.
  # Each device scans its own part of the batch instead (check_vma off: pallas_call's outputs carry no
  # varying-axes types; the gradients of A, D and delta_bias are summed over the devices all the same).
  batch_args = {"u", "delta", "z", "B", "C"}
  specs = {name: P(axes) if name in batch_args else P() for name in present}
  return jax.shard_map(lambda kw: run(**kw), in_specs=(specs,), out_specs=P(axes), check_vma=False)(present)

"""HBM traffic and saved residuals of one selective scan (one layer, one direction), analytic; see BENCHMARKS.md.

python benchmarks/scan_memory.py                       # ShuffleMamba-B, 224 px, batch 256, bfloat16
python benchmarks/scan_memory.py --batch 128 --channels 384

The traffic is counted from what each path must move, not measured: no accelerator was at hand.
- floor: read u, delta, z, B, C once and write y once (backward: read them and dy once, write each
  gradient once);
- pallas: the TPU kernels' block specs (each block moved once per grid step, a block whose index does
  not change between steps moved once), plus the XLA ops around them (B and C laid out per chunk, the
  reductions of the per-tile dB/dC and per-batch dA/dD/d(delta_bias) partial sums);
- chunked: a lower bound for the XLA chunked scan: only the two float32 (batch, chunk, channels, state)
  results of each chunk's associative scan, written and read once; the forward pass once, the backward
  pass the rematerialized forward plus the cotangents of those two tensors (written and read once).
  Every level of the associative scan moves more; XLA's own cost analysis cannot be used because it
  counts a loop body once, whatever the trip count.
The residuals are those of the custom VJP or of JAX's autodiff, read from `jax.vjp` traced abstractly
(`jax.eval_shape`): nothing is computed, so full-size shapes run on any machine in seconds.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from shufflemamba_jax.models import pallas_scan
from shufflemamba_jax.models.ssm import selective_scan

GB = 1e9


def traffic(batch, length, channels, state, chunk, itemsize):
  """Bytes (forward, backward) per scan for the floor, the pallas TPU kernels and the chunked bound."""
  seq = batch * length * channels * itemsize  # one of u, delta, z, y, dy and their gradients
  bc = batch * length * state * itemsize  # B or C
  f32_state = batch * length * channels * state * 4  # one float32 (batch, length, channels, state)
  floor = (3 * seq + 2 * bc + seq, 4 * seq + 2 * bc + 3 * seq + 2 * bc)

  num_chunks = math.ceil(length / chunk)
  tiles = math.ceil(channels / pallas_scan.TPU_CHANNEL_TILE)
  channels_p = tiles * pallas_scan.TPU_CHANNEL_TILE
  bc_chunked = batch * num_chunks * state * chunk * 4  # B or C laid out (batch, chunks, state, chunk), float32
  layout = 2 * (bc + bc_chunked)  # read B and C, write them per chunk
  params = batch * (state + 2) * channels_p * 4  # A, D, delta_bias: once per (batch, channel tile)
  starts = batch * num_chunks * state * channels_p * 4
  forward = layout + 3 * seq + tiles * 2 * bc_chunked + params + seq + starts
  partials = 2 * 2 * tiles * bc_chunked + 2 * 2 * bc + 2 * batch * (state + 2) * channels_p * 4
  backward = layout + 4 * seq + tiles * 2 * bc_chunked + params + starts + 3 * seq + partials
  chunked = (2 * 2 * f32_state + floor[0], 2 * 2 * f32_state + 2 * 2 * f32_state + floor[1])
  return {"floor": floor, "pallas": (forward, backward), "chunked (lower bound)": chunked}


def residuals(batch, length, channels, state, method, chunk_size, dtype):
  """Bytes the scan's VJP keeps: (total, arrays with length, channels and state axes, other arrays with
  channels and state axes besides A: the pallas and chunked methods' per-chunk states, the associative
  scan's shorter levels)."""
  S = jax.ShapeDtypeStruct
  seq, bc, vec = S((batch, length, channels), dtype), S((batch, length, state), dtype), S((channels,), jnp.float32)
  args = [seq, seq, S((channels, state), jnp.float32), bc, bc, vec, seq, vec]

  def scan(u, delta, A, B, C, D, z, bias):
    return selective_scan(u, delta, A, B, C, D, z, bias, True, method=method, chunk_size=chunk_size)

  saved = jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(scan, *a)[1], *args))
  nbytes = lambda x: math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
  states = [x for x in saved if channels in x.shape and state in x.shape and x.ndim > 2]
  big = [x for x in states if length in x.shape]
  other = [x for x in states if length not in x.shape]
  return sum(map(nbytes, saved)), sum(map(nbytes, big)), sum(map(nbytes, other))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--length", type=int, default=197)
  parser.add_argument("--channels", type=int, default=1536, help="d_inner (2 x embed dim)")
  parser.add_argument("--state", type=int, default=16)
  parser.add_argument("--dtype", default="bfloat16")
  args = parser.parse_args()
  shape = (args.batch, args.length, args.channels, args.state)
  dtype = jnp.dtype(args.dtype)
  print(f"batch, length, channels, state = {shape}, {dtype.name} activations; GB = 1e9 bytes, per layer and direction")
  print("\n| path | chunk | forward GB | backward GB | total GB | x floor |")
  print("|---|---|---|---|---|---|")
  floor_total = sum(traffic(*shape, 16, dtype.itemsize)["floor"])
  rows = [("floor", 16, "-"), ("pallas", 16, 16), ("pallas", 64, 64), ("chunked (lower bound)", 16, "any")]
  for name, chunk, label in rows:
    fwd, bwd = traffic(*shape, chunk, dtype.itemsize)[name]
    row = f"| {name} | {label} | {fwd / GB:.2f} | {bwd / GB:.2f} | {(fwd + bwd) / GB:.2f} |"
    print(row + f" {(fwd + bwd) / floor_total:.1f} |")
  columns = ["method", "chunk", "residuals GB", "of which (.., length, channels, state) GB"]
  columns.append("of which other (.., channels, state) GB")
  print("\n| " + " | ".join(columns) + " |")
  print("|---|---|---|---|---|")
  for method, chunk in (("pallas", 16), ("pallas", 64), ("chunked", 16), ("sequential", 16), ("associative", 16)):
    total, big, other = residuals(*shape, method, chunk, dtype)
    label = chunk if method in ("pallas", "chunked") else "-"
    print(f"| {method} | {label} | {total / GB:.2f} | {big / GB:.2f} | {other / GB:.2f} |")


if __name__ == "__main__":
  main()

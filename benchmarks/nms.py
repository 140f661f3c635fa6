"""Time of the tiled NMS on this host's CPU, and its program compiled for real chips (BENCHMARKS.md).

  python benchmarks/nms.py                                  # N = 2000, 10000; tiles 256, 512; v5e:1x1
  python benchmarks/nms.py --n 10000 --tile_sizes 512 --targets v5e:1x1,v6e:1x1,h100
  python benchmarks/nms.py --labels 80 --n 80000 --pre_nms_top_k 4096 --max_output 100 --threshold 0.5
  python benchmarks/nms.py --max_output 0 --data chain     # every box kept or chained: the worst case

The boxes look like RPN proposals: jittered copies of 40 object boxes (16 to 400 px) in a 1333 x 800
image, uniform scores; or (--data chain) a row of boxes by decreasing score, each overlapping its
neighbours only (IoU 1/3 at threshold 0.3), so that each tile's fixed point takes a step per box. The
CPU time is the median of --repeat runs of the jitted function after its
compile; the time depends on the data (how many tiles run before max_output boxes are kept, how many
fixed-point steps each tile takes), so the kept count is printed with it. The chips' figures come from
compiling for their topology devices (shufflemamba_jax.parallel.targets, needs requirements-compile.txt):
whether the program compiles, and the compiler's memory analysis; nothing runs on them.
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from shufflemamba_jax.models.detection import nms as nms_lib
from shufflemamba_jax.parallel import targets

MIB = 2**20


def proposals(n: int, num_labels: int, seed: int = 0):
  """n RPN-like boxes (float32, clipped to 1333 x 800), scores in [0, 1) and labels in [0, num_labels)."""
  rng = np.random.default_rng(seed)
  wh = np.exp(rng.uniform(np.log(16), np.log(400), (40, 2)))
  xy = rng.uniform(0, 1, (40, 2)) * (np.array([1333, 800]) - wh)
  objects = np.concatenate([xy, xy + wh], axis=1)[rng.integers(0, 40, n)]
  scale = np.tile(objects[:, 2:] - objects[:, :2], 2)
  boxes = objects + rng.normal(0, 1, (n, 4)) * rng.uniform(0.02, 0.5, (n, 1)) * scale
  boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
  boxes = np.clip(boxes, 0, [1333, 800, 1333, 800]).astype(np.float32)
  return boxes, rng.uniform(0, 1, n).astype(np.float32), rng.integers(0, max(num_labels, 1), n).astype(np.int32)


def chain(n: int):
  """n boxes in a row, box k overlapping boxes k - 1 and k + 1 by a third, by decreasing score."""
  x = 5.0 * np.arange(n)
  boxes = np.stack([x, 0 * x, x + 10, 0 * x + 10], 1).astype(np.float32)
  return boxes, np.linspace(1, 0, n).astype(np.float32), np.zeros(n, np.int32)


def function(args, max_output: int, tile_size: int):
  """(boxes, scores, labels, valid) -> (indices, mask), for the flags' NMS (vmapped over images if --batch)."""

  def fn(boxes, scores, labels, valid):
    kwargs = dict(valid=valid, tile_size=tile_size, pre_nms_top_k=args.pre_nms_top_k)
    if args.labels:
      return nms_lib.batched_nms(boxes, scores, labels, args.threshold, max_output, **kwargs)
    return nms_lib.nms(boxes, scores, args.threshold, max_output, **kwargs)

  return jax.vmap(fn) if args.batch else fn


def cpu_time(args, n: int, max_output: int, tile_size: int) -> dict:
  boxes, scores, labels = chain(n) if args.data == "chain" else proposals(n, args.labels)
  inputs = (jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(labels), jnp.ones(n, bool))
  if args.batch:  # Each image its own boxes: the first one's, shifted.
    shifts = jnp.arange(args.batch)
    inputs = (inputs[0] + shifts[:, None, None], *(jnp.stack([x] * args.batch) for x in inputs[1:]))
  fn = jax.jit(function(args, max_output, tile_size))
  start = time.perf_counter()
  compiled = fn.lower(*inputs).compile()
  compile_s = time.perf_counter() - start
  _, mask = jax.block_until_ready(compiled(*inputs))
  times = []
  for _ in range(args.repeat):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - start)
  return {"compile_s": compile_s, "run_ms": 1e3 * float(np.median(times)), "kept": int(np.asarray(mask).sum())}


def chip_memory(args, name: str, n: int, max_output: int, tile_size: int) -> dict:
  target = targets.resolve(name)
  mesh = jax.sharding.Mesh(np.array(target.devices[:1]), ("d",))
  where = jax.sharding.NamedSharding(mesh, jax.P())
  S = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=where)
  batch = (args.batch,) if args.batch else ()
  shapes = [((n, 4), jnp.float32), ((n,), jnp.float32), ((n,), jnp.int32), ((n,), jnp.bool_)]
  shapes = [S(batch + shape, dtype) for shape, dtype in shapes]
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = (
      jax.jit(function(args, max_output, tile_size)).trace(*shapes).lower().compile(target.compiler_options or None)
    )
  memory = compiled.memory_analysis()
  return {
    "compile_s": time.perf_counter() - start,
    "temp_mib": memory.temp_size_in_bytes / MIB,
    "argument_mib": memory.argument_size_in_bytes / MIB,
    "output_mib": memory.output_size_in_bytes / MIB,
    "code_mib": memory.generated_code_size_in_bytes / MIB,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", default="2000,10000", help="box counts, comma separated")
  parser.add_argument("--tile_sizes", default="256,512")
  parser.add_argument("--threshold", type=float, default=0.7, help="IoU threshold (the RPN's 0.7)")
  parser.add_argument("--max_output", default="1000", help="comma separated; 1000: the RPN's max_per_img, 0: N")
  parser.add_argument("--data", choices=("rpn", "chain"), default="rpn")
  parser.add_argument("--labels", type=int, default=0, help="> 0: batched_nms over this many labels")
  parser.add_argument("--pre_nms_top_k", type=int, default=None)
  parser.add_argument("--batch", type=int, default=0, help="> 0: vmapped over this many images")
  parser.add_argument("--repeat", type=int, default=10)
  parser.add_argument("--targets", default="v5e:1x1", help="chips to compile for ('' for none)")
  args = parser.parse_args()
  # Nothing runs on an accelerator: the host's backend is the CPU, whatever it has.
  jax.config.update("jax_platforms", "cpu")

  kind = f"batched_nms over {args.labels} labels" if args.labels else "nms"
  batch = f", vmapped over {args.batch} images" if args.batch else ""
  print(f"{kind} of {args.data} boxes, IoU > {args.threshold}, pre_nms_top_k {args.pre_nms_top_k}{batch}")
  print(f"CPU: {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
  for n, max_output, tile_size in itertools.product(
    *(map(int, v.split(",")) for v in (args.n, args.max_output, args.tile_sizes))
  ):
    max_output = max_output or n
    cpu = cpu_time(args, n, max_output, tile_size)
    print(
      f"N={n:6d} max_output={max_output:5d} T={tile_size:4d} cpu: {cpu['run_ms']:8.2f} ms/run "
      f"(compile {cpu['compile_s']:.1f} s), kept {cpu['kept']}",
      flush=True,
    )
    for name in filter(None, args.targets.split(",")):
      try:
        chip = chip_memory(args, name, n, max_output, tile_size)
      except Exception as error:  # The compiler's refusal is the measurement.
        print(f"    {name}: does not compile: {type(error).__name__}: {str(error)[:300]}", flush=True)
        continue
      print(
        f"    {name}: compiles in {chip['compile_s']:.1f} s; temp {chip['temp_mib']:.2f} MiB, "
        f"arguments {chip['argument_mib']:.2f} MiB, outputs {chip['output_mib']:.3f} MiB, "
        f"code {chip['code_mib']:.2f} MiB",
        flush=True,
      )


if __name__ == "__main__":
  main()

"""Per-chip memory of the base Mask R-CNN and its parts, from the real chips' compilers (BENCHMARKS.md).

  python benchmarks/detection_memory.py                        # v5e:1x1 and h100, 1344x832, batch 1 and 2
  python benchmarks/detection_memory.py --parts deform --deform_sizes 1024x1024,1344x832 --json
  python benchmarks/detection_memory.py --parts detector --canvas 1344x1344 --targets h100 --out det.jsonl
  python benchmarks/detection_memory.py --parts detector --targets v5e:1x1 --batches 2 --dtype bfloat16
  python benchmarks/detection_memory.py --out det.jsonl --table_only

Each program is traced on abstract arrays (nothing is allocated) with a one-chip mesh on the target's
topology device (`shufflemamba_jax.parallel.targets`; needs requirements-compile.txt) and compiled by
that chip's compiler; a row is its memory analysis: arguments, temporaries, outputs, their total
(minus the bytes aliased to donated arguments) against what one program may use on the chip. Parts:

- deform: `MSDeformAttn` forward, and forward + gradient (its output and the vjp of an upstream
  cotangent w.r.t. its parameters, queries and features) at the base adapter's shapes (width 768, 12
  heads, 4 points, value ratio 0.5): the Injector (queries: the 1/16 tokens; features: c2..c4 at 1/8,
  1/16, 1/32) and the Extractor (queries: c, 21/4 times the tokens; features: the tokens, one level),
  at --deform_sizes.
- roi: `multi_level_roi_align` on the FPN maps (256 wide, strides 4 to 32), forward + gradient (its
  output and the vjp w.r.t. the maps), with the training step's RoIs: the box head's 512 per image at
  7x7, the mask head's 128 at 14x14 (the dense products of roi_align.py).
- backbone: the `VimAdapter` base backbone (ShuffleMamba-B, layernorm, drop path 0.3, remat and scan
  as the backbone config's defaults) forward + backward in training mode, the loss half the sum of
  squares of its four maps (the sum of BatchNorm outputs would have a zero gradient).
- detector: the whole `MaskRCNN` (80 classes, 100 gts, 112-pixel mask crops) training step: loss,
  gradients and an AdamW update, parameters, optimizer and BatchNorm state on the chip and donated;
  and `predict`. --dtype and --scan_method change the backbone's (and, for dtype, the heads') settings.

Canvases are WIDTHxHEIGHT: 1344x832 is mmdet's Resize(1333, 800) of a landscape image padded to 64.
FLOPs: XLA's cost analysis where the compiler gives one (TPU; a while loop's body, e.g. a stretch of
Vim blocks under lax.scan, counts once), and the dot and convolution FLOPs of the program's jaxpr
(scan bodies times their length, a while loop's or a Pallas kernel's body once; elementwise work and
gathers not counted).
"""

from __future__ import annotations

import os

# Nothing runs on an accelerator: the CPU is this host's backend, and the TPU and CUDA plugins must not
# start theirs when jax is imported (compiling for their topologies needs neither).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from shufflemamba_jax.models import adapter as adapter_lib  # noqa: E402
from shufflemamba_jax.models import variants  # noqa: E402
from shufflemamba_jax.models.deform_attn import MSDeformAttn  # noqa: E402
from shufflemamba_jax.models.detection import mask_rcnn, roi_align  # noqa: E402
from shufflemamba_jax.parallel import sharding, targets  # noqa: E402

GIB = 2**30
PARTS = ("deform", "roi", "backbone", "detector")
# The official detection adapter of ShuffleMamba-B (the Mask R-CNN configs).
ADAPTER = adapter_lib.AdapterConfig(deform_num_heads=12, deform_ratio=0.5)
OUT_INDICES = (5, 11, 17, 23)
# The TPU compiler's refusal: "... HLO temporaries (16.23G) exceeds available HBM (15.75G)".
_REFUSAL = re.compile(r"\(([\d.]+)([KMGT])\)\s+exceeds\s+available\s+HBM", re.I)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def backbone_config(width: int, height: int, **overrides):
  """ShuffleMamba-B as the detection backbone (overrides: dtype, scan_method, remat, ...)."""
  return variants.model_config(
    "shufflemamba_base",
    norm="layernorm",
    slws_max_prob=0.0,
    drop_path_rate=0.3,
    img_size=max(width, height),
    **overrides,
  )


def detector_config(width: int, height: int, **overrides) -> mask_rcnn.MaskRCNNConfig:
  """The COCO Mask R-CNN on it; a dtype override also sets the heads' compute dtype."""
  heads = {"dtype": overrides["dtype"]} if "dtype" in overrides else {}
  return mask_rcnn.MaskRCNNConfig(
    backbone=backbone_config(width, height, **overrides),
    adapter=ADAPTER,
    out_indices=OUT_INDICES,
    pos_embed_size=224,
    **heads,
  )


def parse_size(text: str) -> tuple[int, int]:
  width, height = (int(n) for n in text.lower().split("x"))
  return width, height


# ---- FLOPs of a jaxpr ------------------------------------------------------------------------------


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
  per_output = math.prod(rhs[d] for d in spec[1:])  # in features / groups times the window
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output


def jaxpr_flops(jaxpr) -> float:
  """Dot and convolution FLOPs of a (closed) jaxpr: scan bodies times their length, cond's largest
  branch, a while loop's body once."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(branch) for branch in eqn.params["branches"])
    else:
      inner = sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn.params))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def _sub_jaxprs(params: dict):
  """The jaxprs an equation's parameters hold (the bodies of scan, while, remat, pjit, custom rules)."""
  kinds = (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, kinds):
        yield item


# ---- compiling --------------------------------------------------------------------------------------


class Chip:
  """One chip of a target: its mesh, shardings and the compiler call."""

  def __init__(self, name: str):
    self.target = targets.resolve(name)
    self.mesh = sharding.create_mesh(data=1, fsdp=1, devices=self.target.devices[:1])
    self.replicated = sharding.replicated(self.mesh)
    self.batch = sharding.batch_sharding(self.mesh)

  def state(self, tree):
    """Abstract leaves of a tree (arrays or ShapeDtypeStructs), replicated on the chip."""
    return sharding.abstract(tree, self.replicated)

  def input(self, shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch)

  def key(self):
    return self.state(jax.eval_shape(lambda: jax.random.key(0)))

  def measure(self, fn, args, donate=()) -> dict:
    """fn compiled for the chip on args: memory analysis, FLOPs and wall times, or the refusal."""
    record = {"target": self.target.name, "capacity_bytes": self.target.device_memory_bytes}
    start = time.perf_counter()
    with jax.set_mesh(self.mesh):
      traced = jax.jit(fn, donate_argnums=donate).trace(*args)
      lowered = traced.lower()
    record["trace_s"] = round(time.perf_counter() - start, 1)
    record["dot_flops"] = jaxpr_flops(traced.jaxpr)
    start = time.perf_counter()
    try:
      compiled = lowered.compile(self.target.compiler_options or None)
    except Exception as error:  # The compiler's refusal is the measurement: RESOURCE_EXHAUSTED on TPU.
      message = str(error)
      if "RESOURCE_EXHAUSTED" not in message and "exceeds available" not in message.lower():
        raise
      match = _REFUSAL.search(message)
      needed = int(float(match[1]) * _UNITS[match[2].upper()]) if match else None
      record.update(compile_s=round(time.perf_counter() - start, 1), refused=True, needed_temp_bytes=needed)
      record["fits"] = False
      record["message"] = message[:500]
      return record
    record["compile_s"] = round(time.perf_counter() - start, 1)
    memory = compiled.memory_analysis()
    for part in ("argument", "temp", "output", "alias"):
      record[f"{part}_bytes"] = int(getattr(memory, f"{part}_size_in_bytes"))
    total = record["argument_bytes"] + record["temp_bytes"] + record["output_bytes"] - record["alias_bytes"]
    record["total_bytes"] = total
    record["fits"] = total <= self.target.device_memory_bytes
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
      analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    record["xla_flops"] = None if flops is None or flops < 0 else float(flops)
    return record


# ---- the programs -----------------------------------------------------------------------------------


def deform_programs(chip: Chip, width: int, height: int, batch: int):
  """(name, fn, args) of the Injector's and Extractor's MSDeformAttn, forward and forward + gradient."""
  dim = 768
  h, w = height // adapter_lib.PATCH_SIZE, width // adapter_lib.PATCH_SIZE
  level_shapes = ((2 * h, 2 * w), (h, w), (h // 2, w // 2))
  tokens, c = h * w, sum(a * b for a, b in level_shapes)
  cases = {"injector": (level_shapes, tokens, c, ((h, w),)), "extractor": (((h, w),), c, tokens, level_shapes)}
  settings = dict(n_heads=ADAPTER.deform_num_heads, n_points=ADAPTER.n_points, ratio=ADAPTER.deform_ratio)
  for name, (feature_shapes, queries, features, query_shapes) in cases.items():
    levels = len(feature_shapes)
    module = nnx.eval_shape(lambda levels=levels: MSDeformAttn(dim, levels, **settings, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(module)
    reference = adapter_lib.reference_points(query_shapes)  # A constant, as in the adapter.

    def forward(params, query, feat, graphdef=graphdef, reference=reference, shapes=feature_shapes):
      return nnx.merge(graphdef, params)(query, jnp.asarray(reference), feat, shapes)

    def gradient(params, query, feat, cotangent, forward=forward):
      out, vjp = jax.vjp(forward, params, query, feat)
      return out, vjp(cotangent)

    args = [chip.state(params), chip.input((batch, queries, dim)), chip.input((batch, features, dim))]
    yield f"{name} fwd", forward, args
    yield f"{name} fwd+grad", gradient, [*args, chip.input((batch, queries, dim))]


def roi_programs(chip: Chip, width: int, height: int, batch: int):
  """(name, fn, args) of the training step's two RoIAligns, forward + gradient w.r.t. the FPN maps."""
  config = mask_rcnn.MaskRCNNConfig()
  maps = [chip.input((batch, height // s, width // s, config.fpn_channels)) for s in mask_rcnn.ROI_STRIDES]
  for name, rois, size in (("box", config.rcnn_num, 7), ("mask", config.max_mask_rois, config.mask_size // 2)):

    def gradient(maps, boxes, valid, cotangent, size=size):
      pool = lambda maps: roi_align.multi_level_roi_align(maps, boxes, size, mask_rcnn.ROI_STRIDES, valid=valid)
      out, vjp = jax.vjp(pool, maps)
      return out, vjp(cotangent)

    args = [maps, chip.input((batch, rois, 4)), chip.input((batch, rois), jnp.bool_)]
    args.append(chip.input((batch, rois, size, size, config.fpn_channels)))
    yield f"{name} RoIAlign {rois}x{size}x{size} fwd+grad", gradient, args


def backbone_programs(chip: Chip, width: int, height: int, batch: int, overrides: dict):
  """(name, fn, args) of the VimAdapter's forward + backward in training mode."""
  config = backbone_config(width, height, **overrides)
  grid = (224 // config.patch_size,) * 2

  def build():
    return adapter_lib.VimAdapter(config, ADAPTER, pos_grid=grid, out_indices=OUT_INDICES, rngs=nnx.Rngs(0))

  graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)

  def loss_fn(params, rest, images, key):
    model = nnx.merge(graphdef, params, rest, copy=True)
    maps = model(images, train=True, key=key)
    loss = sum(0.5 * jnp.sum(jnp.square(m.astype(jnp.float32))) for m in maps)
    return loss, nnx.state(model, nnx.Not(nnx.Param))

  def step(params, rest, images, key):
    (_, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, images, key)
    return grads, rest

  args = [chip.state(params), chip.state(rest), chip.input((batch, height, width, 3)), chip.key()]
  yield "VimAdapter fwd+bwd", step, args


def detector_programs(chip: Chip, width: int, height: int, batch: int, overrides: dict, programs=("train", "predict")):
  """(name, fn, args, donate) of the Mask R-CNN's training step (AdamW) and its predict."""
  config = detector_config(width, height, **overrides)
  graphdef, params, rest = nnx.split(
    nnx.eval_shape(lambda: mask_rcnn.MaskRCNN(config, rngs=nnx.Rngs(0))), nnx.Param, ...
  )
  tx = optax.adamw(1e-4, weight_decay=0.05)
  images = chip.input((batch, height, width, 3))
  sizes = chip.input((batch, 2), jnp.int32)
  if "train" in programs:

    def loss_fn(params, rest, images, targets, key):
      model = nnx.merge(graphdef, params, rest, copy=True)
      loss, terms = model.loss(images, targets, key=key)
      return loss, (terms, nnx.state(model, nnx.Not(nnx.Param)))

    def train_step(params, rest, opt_state, images, targets, key):
      (loss, (terms, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, images, targets, key)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), rest, opt_state, loss, terms

    gts, crop = config.max_gt, config.mask_crop_size
    batch_targets = mask_rcnn.Targets(
      chip.input((batch, gts, 4)),
      chip.input((batch, gts), jnp.int32),
      chip.input((batch, gts), jnp.bool_),
      chip.input((batch, gts, crop, crop)),
      sizes,
    )
    opt_state = jax.eval_shape(tx.init, params)
    args = [chip.state(params), chip.state(rest), chip.state(opt_state), images, batch_targets, chip.key()]
    yield "Mask R-CNN train step (AdamW)", train_step, args, (0, 1, 2)
  if "predict" in programs:

    def predict(params, rest, images, sizes):
      return nnx.merge(graphdef, params, rest).predict(images, sizes)

    yield "Mask R-CNN predict", predict, [chip.state(params), chip.state(rest), images, sizes], ()


def measurements(args):
  """(part, canvas, batch, program generator) of the flags' programs, in order."""
  canvas = parse_size(args.canvas)
  batches = [int(b) for b in args.batches.split(",")]
  for part in args.parts.split(","):
    if part not in PARTS:
      raise SystemExit(f"--parts: {part!r} is not one of {PARTS}")
    sizes = [parse_size(s) for s in args.deform_sizes.split(",")] if part == "deform" else [canvas]
    for size in sizes:
      for batch in batches:
        yield part, size, batch


def run(args) -> list[dict]:
  records = []
  overrides = {"dtype": args.dtype} if args.dtype else {}
  if args.scan_method:
    overrides["scan_method"] = args.scan_method
  for name in args.targets.split(","):
    chip = Chip(name)
    for part, (width, height), batch in measurements(args):
      if part == "detector":
        programs = detector_programs(chip, width, height, batch, overrides, tuple(args.detector_programs.split(",")))
      elif part == "backbone":
        programs = ((*program, ()) for program in backbone_programs(chip, width, height, batch, overrides))
      else:
        builder = deform_programs if part == "deform" else roi_programs
        programs = ((*program, ()) for program in builder(chip, width, height, batch))
      for program, fn, fn_args, donate in programs:
        if args.only and not re.search(args.only, program):
          continue
        if overrides and part in ("backbone", "detector"):
          program += " (" + ", ".join(f"{v}" for v in overrides.values()) + ")"
        record = {"part": part, "program": program, "canvas": f"{width}x{height}", "batch": batch}
        print(f"compiling {program} on {name}, {width}x{height}, batch {batch} ...", file=sys.stderr, flush=True)
        record.update(chip.measure(fn, fn_args, donate))
        records.append(record)
        if args.out:
          with open(args.out, "a") as file:
            file.write(json.dumps(record) + "\n")
        print(json.dumps(record) if args.json else line(record), flush=True)
  return records


def _gib(record, key) -> str:
  return f"{record[key] / GIB:.2f}"


def _gflop(value) -> str:
  return "" if value is None else f"{value / 1e9:,.0f}"


def line(record: dict) -> str:
  where = f"{record['target']:8s} {record['canvas']:>9s} b{record['batch']}  {record['program']}"
  if record.get("refused"):
    needed = record.get("needed_temp_bytes")
    temps = f" (temporaries {needed / GIB:.2f} GiB)" if needed else ""
    return f"{where}: REFUSED by the compiler{temps}, compile {record['compile_s']} s"
  return (
    f"{where}: args {_gib(record, 'argument_bytes')} temp {_gib(record, 'temp_bytes')} out "
    f"{_gib(record, 'output_bytes')} total {_gib(record, 'total_bytes')} GiB of "
    f"{_gib(record, 'capacity_bytes')}, compile {record['compile_s']} s, XLA GFLOP {_gflop(record.get('xla_flops'))}, "
    f"dot GFLOP {_gflop(record['dot_flops'])}"
  )


def _cell(record: dict | None) -> tuple[str, str]:
  """(memory, compile seconds) cells of one target's record: total GiB (its temporaries), or the refusal."""
  if record is None:
    return "", ""
  if record.get("refused"):
    needed = record.get("needed_temp_bytes")
    return "refused" + (f" (temporaries {needed / GIB:.2f})" if needed else ""), f"{record['compile_s']:.0f}"
  memory = f"{_gib(record, 'total_bytes')} ({_gib(record, 'temp_bytes')})"
  if not record["fits"]:
    memory = f"**{memory}** over"
  return memory, f"{record['compile_s']:.0f}"


def table(records: list[dict]) -> str:
  """A markdown table: a row per program, canvas and batch (in the records' order), per target its total
  GiB per chip (temporaries) and compile seconds; a later record of the same program replaces one."""
  found, rows = {}, {}
  for r in records:
    row = (r["program"], r["canvas"], r["batch"])
    rows.setdefault(row, {})[r["target"]] = r
    found.setdefault(r["target"], r["capacity_bytes"])
  names = list(found)
  header = ["program", "canvas", "batch", "dot GFLOP", "XLA GFLOP (TPU)"]
  for name in names:
    header += [f"{name} GiB ({found[name] / GIB:.2f})", f"{name} compile s"]
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for (program, canvas, batch), by_target in rows.items():
    first = next(iter(by_target.values()))
    xla = next((_gflop(r.get("xla_flops")) for r in by_target.values() if r.get("xla_flops")), "")
    cells = [program, canvas, str(batch), _gflop(first["dot_flops"]), xla]
    for name in names:
      cells += _cell(by_target.get(name))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--targets", default="v5e:1x1,h100", help="chips to compile for, comma separated")
  parser.add_argument("--canvas", default="1344x832", help="WIDTHxHEIGHT, multiples of 64")
  parser.add_argument("--deform_sizes", default="1024x1024,1344x832", help="the deformable attention's images")
  parser.add_argument("--batches", default="1,2", help="images per chip, comma separated")
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma separated, of {','.join(PARTS)}")
  parser.add_argument("--detector_programs", default="train,predict")
  parser.add_argument("--dtype", help="backbone and heads' compute dtype (default: the configs' float32)")
  parser.add_argument("--scan_method", help="the Vim blocks' scan (default: the config's, chunked)")
  parser.add_argument("--only", help="a regular expression: measure the programs whose names match it")
  parser.add_argument("--json", action="store_true", help="one JSON line per compile instead of a text line")
  parser.add_argument("--out", help="JSON lines file the records are appended to")
  parser.add_argument("--table_only", action="store_true", help="print the table of --out and stop")
  args = parser.parse_args(argv)
  jax.config.update("jax_platforms", "cpu")
  if args.table_only:
    records = [json.loads(row) for row in pathlib.Path(args.out).read_text().splitlines() if row.strip()]
  else:
    records = run(args)
  print(table(records))


if __name__ == "__main__":
  main()

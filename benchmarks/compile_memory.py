"""Per-chip memory of the ImageNet recipes, from the real chips' compilers (BENCHMARKS.md).

Compiles each recipe's training step (`shufflemamba_jax.compile.check`, without the evaluation
step) for 8-chip targets with the recipe's own global batch, with each scan method, and records the
compiler's per-device memory; then searches the largest per-chip batch that fits one chip for the
given variants. Needs requirements-compile.txt. Appends one JSON line per compile to --out, so an
interrupted run keeps what it measured.

  python benchmarks/compile_memory.py --out=/tmp/memory.jsonl
  python benchmarks/compile_memory.py --out=/tmp/memory.jsonl --table_only
  python benchmarks/compile_memory.py --out=/tmp/max_batch.jsonl --max_batch
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

from shufflemamba_jax import compile as compile_lib
from shufflemamba_jax.training import config_files

CONFIG = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "imagenet.py")
RECIPES = (
  "vim_tiny",
  "vim_small",
  "shufflemamba_base",
  "shufflemamba_reg_base,stage=1",
  "shufflemamba_reg_base,stage=2",
  "shufflemamba_reg_base,stage=3",
)
TARGETS = ("v5e:2x4", "v5p:2x2x2", "v6e:2x4", "h100:8")
METHODS = ("chunked", "pallas")
GIB = 2**30


def recipe_config(recipe: str, **overrides):
  return config_files.override(config_files.get_config(CONFIG, recipe), overrides)


def measure(recipe: str, target: str, **overrides) -> dict:
  """compile.check's record of one recipe on one target (fits False and the compiler's figures if it
  refused the step)."""
  config = recipe_config(recipe, **overrides)
  start = time.perf_counter()
  try:
    record = compile_lib.check(config, target, evaluate=False)
  except compile_lib.DoesNotFit as refusal:
    record = {"target": target, "fits": False, "refused": True, "needed_temp_bytes": refusal.needed}
    record["device_memory_bytes"] = refusal.available
  record.update(recipe=recipe, overrides=overrides, wall_s=round(time.perf_counter() - start, 1))
  return record


def _append(path: pathlib.Path, record: dict) -> None:
  with path.open("a") as file:
    file.write(json.dumps(record) + "\n")
  print(json.dumps(record), flush=True)


def largest_batch(variant: str, target: str, out: pathlib.Path, low: int, high: int, step: int) -> int:
  """The largest per-chip batch, a multiple of `step` in [low, high), whose training step fits one
  chip, by bisection over compiles (the ShuffleMamba-B recipe with the variant swapped in, chunked
  scan, no micro-batches); `low` is checked first, `high` assumed not to fit."""

  def fits(batch: int) -> bool:
    overrides = {
      "model.variant": variant,
      "batch_size": batch,
      "eval_batch_size": batch,
      "aug.mixup_group_size": batch,
      "model.slws.group_size": batch,
      "mesh.data": 1,
      "model.scan_method": "chunked",
      "max_device_batch.v5e": None,
    }
    record = measure("shufflemamba_base", target, **overrides)
    record["search"] = variant
    _append(out, record)
    return record["fits"]

  if not fits(low):
    raise ValueError(f"{variant} on {target}: the lower bound {low} does not fit")
  low, high = low // step, high // step
  while high - low > 1:
    middle = (low + high) // 2
    if fits(middle * step):
      low = middle
    else:
      high = middle
  return low * step


def table(records: list[dict]) -> str:
  rows = {}
  for record in records:
    if "search" in record:
      continue
    method = record["overrides"].get("model.scan_method", "chunked")
    if record.get("refused"):
      needed = record["needed_temp_bytes"]
      cell = "refused" + ("" if needed is None else f" (temps {needed / GIB:.2f})")
    else:
      cell = f"{record['per_device_bytes'] / GIB:.2f}" + ("" if record["fits"] else " (over)")
      if record.get("grad_accum_steps", 1) > 1:
        cell += f", {record['grad_accum_steps']} micro"
    rows.setdefault(record["recipe"], {})[(record["target"], method)] = cell
  header = "| recipe (per-chip batch) | " + " | ".join(f"{t} {m}" for t in TARGETS for m in METHODS) + " |"
  lines = [header, "|---" * (1 + len(TARGETS) * len(METHODS)) + "|"]
  for recipe in RECIPES:
    if recipe in rows:
      batch = recipe_config(recipe).batch_size // 8
      cells = [rows[recipe].get((t, m), "") for t in TARGETS for m in METHODS]
      lines.append(f"| {recipe} ({batch}) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="JSON lines file, appended to.")
  parser.add_argument("--recipes", default=";".join(RECIPES), help="configs/imagenet.py arguments, ';'-separated.")
  parser.add_argument("--targets", default=",".join(TARGETS))
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--table_only", action="store_true", help="Print the table of --out and stop.")
  parser.add_argument("--max_batch", action="store_true", help="Search the largest per-chip batch instead.")
  parser.add_argument(
    "--search",
    default="shufflemamba_base:v5e:1x1:128:256:16;shufflemamba_base:h100:256:1024:32;"
    "shufflemamba_large:v5e:1x1:16:128:8;shufflemamba_large:h100:64:512:16",
    help="';'-separated variant:target:low:high:step (target may hold a colon).",
  )
  args = parser.parse_args(argv)
  jax.config.update("jax_platforms", "cpu")
  out = pathlib.Path(args.out)
  if args.max_batch:
    for search in args.search.split(";"):
      variant, *target, low, high, step = search.split(":")
      batch = largest_batch(variant, ":".join(target), out, int(low), int(high), int(step))
      print(f"largest per-chip batch {variant} {':'.join(target)}: {batch}", flush=True)
    return
  if not args.table_only:
    for recipe in args.recipes.split(";"):
      for target in args.targets.split(","):
        for method in args.methods.split(","):
          _append(out, measure(recipe, target, **{"model.scan_method": method}))
  records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
  print(table(records))


if __name__ == "__main__":
  sys.exit(main())

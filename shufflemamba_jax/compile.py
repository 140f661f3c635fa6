"""Fit-check: compiles a run's training and evaluation steps for a real chip, from any host.

  python -m shufflemamba_jax.compile --config=configs/imagenet.py:shufflemamba_base --target=v5e:2x4
  python -m shufflemamba_jax.compile --config=configs/imagenet.py:vim_tiny --target=h100:8 --json \
      --config.model.scan_method=pallas

The steps are the trainer's own (`trainer.initial_state_fn`, `trainer.train_step_of`, the task's
`trace_evaluation`) with the run's mesh (config.mesh) over the target's devices, its FSDP shardings,
global batch, gradient accumulation, remat and scan method. They are traced on abstract arrays and
compiled by the target's own compiler (libtpu's for TPU slices, XLA GPU with Triton and ptxas for
NVIDIA GPUs: `shufflemamba_jax.parallel.targets`), so a large model allocates nothing and no chip
is needed. What a device needs is the compiler's memory analysis: arguments + temporaries + outputs
- aliased (donated) bytes, per device. The evaluation runs while the train state stays alive, so its
figure adds the state's bytes (the parameters it reads are then counted twice: a bound).

Prints the per-device memory of each step and the device's capacity (the HBM the TPU compiler lets a
program use; a GPU's memory times JAX's preallocated fraction, 0.75 unless XLA_PYTHON_CLIENT_MEM_FRACTION
says otherwise).
`--json` prints one object: target, device_kind, num_devices, num_processes, per_device_bytes (the
larger step's), device_memory_bytes, fits, compile_s, flops (the train step's, where the compiler
counts them: TPU), and train / eval objects with each step's argument, temp, output, alias and
per-device bytes. Exit status: 0 fits; 3 does not fit (one line names the target, the bytes needed
and available, and the settings that lower it; the compiler's own message is logged); 1 a bad
setting or target; 2 a missing compiler (requirements-compile.txt).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags


def _define_flags() -> dict:
  """The command line's flags, defined when it runs: `check` is also imported beside
  `shufflemamba_jax.main` (the tests), whose --config flag has the same name."""
  return {
    "config": config_flags.DEFINE_config_file(
      "config", None, "Training config file, with its argument if any: configs/imagenet.py:vim_tiny.", lock_config=True
    ),
    "target": flags.DEFINE_string(
      "target", None, "Machine to compile for: v5e:2x4, v5p:2x2x2, v4:2x2x4, v6e:4x4, h100, h100:8, a100:8, ..."
    ),
    "json": flags.DEFINE_bool("json", False, "Print one JSON object instead of the table."),
    "eval": flags.DEFINE_bool("eval", True, "Also compile the evaluation step."),
  }


_FLAGS: dict = {}
EXIT_DOES_NOT_FIT = 3
EXIT_NO_COMPILER = 2
GIB = 2**30
# The TPU compiler's refusal: "... HLO temporaries (16.23G) exceeds available HBM (15.75G)".
_HBM_REFUSAL = re.compile(r"\(([\d.]+)([KMGT])\)\s+exceeds\s+available\s+HBM\s+\(([\d.]+)([KMGT])\)", re.I)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class DoesNotFit(Exception):
  """The target's compiler or its memory refuses a step."""

  def __init__(self, step: str, num_devices: int, needed: int | None, available: int, message: str):
    super().__init__(message)
    self.step, self.num_devices, self.needed, self.available = step, num_devices, needed, available


def _tree_bytes(tree) -> int:
  """Per-device bytes of a tree of sharded ShapeDtypeStructs (each device's shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * leaf.dtype.itemsize
  return total


def _memory(compiled) -> dict:
  memory = compiled.memory_analysis()
  parts = {f"{part}_bytes": int(getattr(memory, f"{part}_size_in_bytes")) for part in ("argument", "temp", "output")}
  parts["alias_bytes"] = int(memory.alias_size_in_bytes)
  parts["per_device_bytes"] = parts["argument_bytes"] + parts["temp_bytes"] + parts["output_bytes"]
  parts["per_device_bytes"] -= parts["alias_bytes"]
  return parts


def _flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return None if flops is None or flops < 0 else float(flops)


def _compile(step: str, traced, target) -> tuple[object, float]:
  start = time.perf_counter()
  try:
    compiled = traced.lower().compile(target.compiler_options or None)
  except Exception as error:  # The compiler's refusal: RESOURCE_EXHAUSTED on TPU.
    message = str(error)
    if "RESOURCE_EXHAUSTED" not in message and "exceeds available" not in message.lower():
      raise
    logging.error("The %s compiler refused the %s step:\n%s", target.name, step, message)
    match = _HBM_REFUSAL.search(message)
    needed = available = None
    if match:
      needed, available = (int(float(match[i]) * _UNITS[match[i + 1].upper()]) for i in (1, 3))
    raise DoesNotFit(step, target.num_devices, needed, available or target.device_memory_bytes, message) from None
  return compiled, time.perf_counter() - start


def check(config, target_name: str, evaluate: bool = True) -> dict:
  """Compiles `config`'s steps for the target `target_name`; the record that --json prints.

  Raises targets.TargetError (bad name, missing compiler), checks.SettingError (a setting that does
  not fit the run or the target's devices and processes), DoesNotFit (the compiler refused a step).
  """

  from shufflemamba_jax import checks  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.parallel import sharding, targets  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.training import trainer  # pylint: disable=g-import-not-at-top

  target = targets.resolve(target_name)
  trainer.Settings.from_config(config)
  # The processes of the target's hosts read the data: each must get whole batches and shards.
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % target.num_processes:
      raise checks.SettingError(f"config.{name}", config[name], f"must divide by the {target.num_processes} hosts")
  pipeline.num_data_shards(pipeline.settings(config), config.batch_size, target.num_processes)
  try:
    mesh = trainer.mesh_of(config, devices=target.devices)
    sharding.check_batch_divisible(config.batch_size, mesh, "config.batch_size")
  except ValueError as error:
    raise checks.SettingError("config.mesh", dict(config.mesh), f"on {target.name}: {error}") from None
  config = trainer.for_devices(config, mesh)
  settings = trainer.Settings.from_config(config)
  task = settings.task
  num_classes = len(pipeline.class_names(config.dataset))  # Known without the data.
  task.check_data(num_classes, config.dataset)
  model_config = task.model_config(num_classes)
  # The schedule's lengths change its values, not the program; the dataset's size is not needed.
  lengths = dict(epoch_steps=1, total_steps=10**9)
  tx, schedule = task.optimizer(settings.optimizer, batch_size=config.batch_size, **lengths)
  graphdef, rest, initial_state = trainer.initial_state_fn(config, task, model_config, tx)
  abstract_state = jax.eval_shape(initial_state)
  shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  state = sharding.abstract(abstract_state, shardings)
  train_step = trainer.train_step_of(config, settings, graphdef, rest, tx, schedule, num_classes, shardings, mesh)
  batch = sharding.abstract(task.batch_shapes(config, config.batch_size, "train"), sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):  # As the trainer calls it.
    traced = train_step.trace(state, batch)
  compiled, compile_s = _compile("train", traced, target)
  record = {
    "target": target.name,
    "platform": target.platform,
    "device_kind": target.device_kind,
    "num_devices": target.num_devices,
    "num_processes": target.num_processes,
    "mesh": dict(mesh.shape),
    "batch_size": config.batch_size,
    "batch_per_device": config.batch_size // mesh.size,
    "grad_accum_steps": config.grad_accum_steps,
    "scan_method": model_config_field(model_config, "scan_method"),
    "remat": model_config_field(model_config, "remat"),
    "train": _memory(compiled),
    "flops": _flops(compiled),
  }
  record["train"]["state_bytes"] = _tree_bytes(state)
  if evaluate:
    traced = task.trace_evaluation(
      config, graphdef, rest, num_classes, settings.input_transform, mesh, state["params"], state.get("model_state", {})
    )
    compiled, eval_s = _compile("eval", traced, target)
    compile_s += eval_s
    record["eval"] = _memory(compiled)
    record["eval"]["per_device_bytes"] += record["train"]["state_bytes"]  # The train state stays alive.
  steps = [record[step] for step in ("train", "eval") if step in record]
  record["per_device_bytes"] = max(step["per_device_bytes"] for step in steps)
  record["device_memory_bytes"] = target.device_memory_bytes
  record["fits"] = record["per_device_bytes"] <= target.device_memory_bytes
  record["compile_s"] = round(compile_s, 2)
  return record


def model_config_field(model_config, name: str):
  """A field of the run's backbone config (a segmenter's backbone, or the classifier itself)."""
  backbone = getattr(model_config, "backbone", model_config)
  return getattr(backbone, name, None)


def advice(config, num_devices: int) -> str:
  """The settings that lower a step's memory, given the run's current ones."""
  per_device = config.batch_size // num_devices
  knobs = [
    f"a smaller batch per device (config.batch_size={config.batch_size}, {per_device} per device on this target)",
    f"more micro-batches per step (config.grad_accum_steps={config.grad_accum_steps})",
  ]
  if config.model.remat is False:
    knobs.append("rematerialized blocks (config.model.remat=True)")
  if config.model.scan_method != "pallas":
    knobs.append("the fused scan kernels (config.model.scan_method=pallas)")
  if config.mesh.fsdp == 1 and num_devices > 1:
    knobs.append("parameters and optimizer state sharded over devices (config.mesh.fsdp)")
  return "; ".join(knobs)


def _table(record: dict) -> str:
  lines = [
    f"target {record['target']}: {record['num_devices']} x {record['device_kind']} "
    f"({record['num_processes']} hosts), mesh {record['mesh']}, {record['batch_per_device']} examples per device"
    f" in {record['grad_accum_steps']} micro-batch(es), scan {record['scan_method']}, remat {record['remat']}",
    f"{'step':<6} {'arguments':>10} {'temps':>10} {'outputs':>10} {'aliased':>10} {'total':>10}  (GiB per device)",
  ]
  for step in ("train", "eval"):
    if step in record:
      m = record[step]
      values = [m[f"{part}_bytes"] / GIB for part in ("argument", "temp", "output", "alias", "per_device")]
      lines.append(f"{step:<6} " + " ".join(f"{value:>10.3f}" for value in values))
  capacity = record["device_memory_bytes"] / GIB
  verdict = "fits" if record["fits"] else "does NOT fit"
  lines.append(f"device memory {capacity:.2f} GiB: {verdict}; compiled in {record['compile_s']} s")
  if "eval" in record:
    lines.append("(eval's total includes the train state, which stays alive while it runs)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, target = _FLAGS["config"].value, _FLAGS["target"].value
  if config is None or not target:
    raise app.UsageError("--config and --target are required, e.g. --config=configs/imagenet.py --target=v5e:2x4.")

  # Nothing runs here: the host's own backend is the CPU, whatever accelerators it has.
  jax.config.update("jax_platforms", "cpu")
  from shufflemamba_jax.checks import SettingError  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.parallel import targets  # pylint: disable=g-import-not-at-top

  record = None
  try:
    record = check(config, target, evaluate=_FLAGS["eval"].value)
  except SettingError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  except targets.TargetError as error:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_NO_COMPILER if "requirements-compile.txt" in str(error) else 1
  except DoesNotFit as refusal:
    needed = "more than is available" if refusal.needed is None else f"{refusal.needed / GIB:.2f} GiB"
    print(
      f"error: the {refusal.step} step does not fit {target}: it needs {needed} of temporaries per device, "
      f"{refusal.available / GIB:.2f} GiB available. Lower it with {advice(config, refusal.num_devices)}.",
      file=sys.stderr,
    )
    return EXIT_DOES_NOT_FIT
  print(json.dumps(record) if _FLAGS["json"].value else _table(record))
  if not record["fits"]:
    print(
      f"error: {record['target']} needs {record['per_device_bytes'] / GIB:.2f} GiB per device, "
      f"{record['device_memory_bytes'] / GIB:.2f} GiB available. "
      f"Lower it with {advice(config, record['num_devices'])}.",
      file=sys.stderr,
    )
    return EXIT_DOES_NOT_FIT
  return 0


def run():
  _FLAGS.update(_define_flags())
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()

"""The training loop of every task, and the evaluation of a saved checkpoint.

`train_and_evaluate(config, workdir)` = `setup` (the config's task, model, optimizer, mesh, the
train state restored or created sharded, jitted steps, data, metrics) + `train` (the steps, with
logging, `evaluate_run` of the model and its EMA, and asynchronous checkpoints). `evaluate(config,
path)` scores a checkpoint with the same `Evaluator`. Both start with `Settings.from_config`,
which checks everything before anything compiles; every error names its config field. What
differs between tasks is asked of the task (`tasks.base.Task`): this module names none.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.data import device, pipeline
from shufflemamba_jax.parallel import sharding
from shufflemamba_jax.training import metrics as metrics_lib
from shufflemamba_jax.training import optim, preemption, steps, tasks
from shufflemamba_jax.training.tasks import base
from shufflemamba_jax.weights import checkpoint as checkpoint_lib
from shufflemamba_jax.weights import params as params_lib


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a run is built from, each part checked by its own module when it is built."""

  task: base.Task
  optimizer: optim.OptimizerSettings
  input_transform: device.DeviceTransform  # Normalization and random erasing, on the device.

  @classmethod
  def from_config(cls, config) -> Settings:
    """Builds every part of a run from a training config; raises SettingError on a bad value."""
    loop = "batch_size eval_batch_size log_every_steps eval_every_steps checkpoint_every_steps grad_accum_steps"
    for name in loop.split():
      checks.integer(f"config.{name}", config[name])
    if config.total_steps is not None:
      checks.integer("config.total_steps", config.total_steps)
    elif not checks.number("config.num_epochs", config.num_epochs):
      raise checks.SettingError("config.num_epochs", config.num_epochs, "must be > 0 when total_steps is not set")
    if config.profile_steps is not None:
      if len(config.profile_steps) != 2 or not 0 <= config.profile_steps[0] < config.profile_steps[1]:
        raise checks.SettingError("config.profile_steps", config.profile_steps, "must be (first, last), first < last")
    checkpoint_lib.check_keep_policy(config.keep_checkpoints, config.keep_best_checkpoints)
    task = tasks.from_config(config)
    if config.keep_best_checkpoints:
      checks.one_of("config.best_metric", config.best_metric, base.best_metrics(task))
      if config.best_metric.startswith("ema_") and not config.ema_decay:
        raise checks.SettingError("config.best_metric", config.best_metric, "needs the EMA (config.ema_decay > 0)")
    data_settings = pipeline.settings(config)
    pipeline.num_data_shards(data_settings, config.batch_size, jax.process_count())
    return cls(task, optim.OptimizerSettings.from_config(config), data_settings["augmentation"].device_transform())


@dataclasses.dataclass
class Run:
  """A training run as `setup` builds it; `train` advances `state`."""

  config: Any
  task: base.Task
  mesh: jax.sharding.Mesh
  epoch_steps: int
  total_steps: int
  model_config: Any
  state: dict
  train_step: Any
  train_batches: Any  # Global batches on the mesh, from the run's next step on.
  evaluator: Evaluator
  checkpointer: checkpoint_lib.Checkpointer
  writer: metrics_lib.MetricWriter
  profile_dir: epath.Path

  def close(self) -> None:
    self.checkpointer.wait()
    self.checkpointer.close()
    self.writer.close()


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Scores parameter trees on the eval split: the task's `evaluation` totals, then its `reduce`."""

  task: base.Task
  totals: Any  # totals(params, model_state) -> {name: numpy array}, summed over every process.

  def run(self, trees: dict, model_state) -> tuple[dict, dict]:
    """({<prefix>_<metric>, num_examples}, {<prefix>_<detail>: per-class values}) of each
    parameter tree of `trees` ({prefix: params, or None to leave out})."""
    record, details = {}, {}
    for prefix, params in trees.items():
      if params is not None:
        totals = self.totals(params, model_state)
        scalars, per_class = self.task.reduce(totals)
        record.update({f"{prefix}_{name}": value for name, value in scalars.items()})
        details.update({f"{prefix}_{name}": value for name, value in per_class.items()})
        record["num_examples"] = int(totals["num_examples"])
    return record, details


def _evaluator(config, settings: Settings, graphdef, rest, num_classes: int, mesh, **dataset_options) -> Evaluator:
  task, transform = settings.task, settings.input_transform
  return Evaluator(task, task.evaluation(config, graphdef, rest, num_classes, transform, mesh, **dataset_options))


def for_devices(config, mesh):
  """`config` with grad_accum_steps raised where the mesh's chip computes at most
  config.max_device_batch examples at once (the same config when nothing changes)."""
  chip = sharding.chip_name(mesh.devices.flat[0].device_kind)
  limit = None if chip is None else config.max_device_batch[chip]
  steps = sharding.micro_batches(config.batch_size, mesh, limit, at_least=config.grad_accum_steps)
  if steps == config.grad_accum_steps:
    return config
  logging.info(
    "config.max_device_batch.%s=%d: %d micro-batches per step (config.grad_accum_steps=%d).",
    *(chip, limit, steps, config.grad_accum_steps),
  )
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.grad_accum_steps = steps
  return config


def mesh_of(config, devices=None):
  """The run's mesh (config.mesh) over `devices` (default: all), checked against the eval batch."""
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
  sharding.check_batch_divisible(config.eval_batch_size, mesh, "config.eval_batch_size")
  return mesh


def _raise_if_nonfinite(state, step: int):
  bad = int(jax.device_get(state["nonfinite_step"]))
  if bad >= 0:
    raise FloatingPointError(
      f"Non-finite (NaN/Inf) training loss at step {bad} (detected by step {step}); stopping. "
      "Lower the learning rate (config.lr) or enable clipping (config.grad_clip)."
    )


def initial_state_fn(config, task: base.Task, model_config, tx):
  """(graphdef, rest, initial_state): the model's static parts and the function that creates the
  train state at step 0 (`jax.eval_shape` of it is the state's shapes, without allocating it)."""
  graphdef, _, rest = steps.split_model(params_lib.abstract_model(model_config))

  def initial_state():
    _, params, model_state = steps.split_model(task.create_model(model_config, nnx.Rngs(config.seed)))
    return steps.init_train_state(params, tx, ema_decay=config.ema_decay, model_state=nnx.to_pure_dict(model_state))

  return graphdef, rest, initial_state


def train_step_of(config, settings: Settings, graphdef, rest, tx, schedule, num_classes: int, shardings, mesh):
  """The run's jitted train step (`Task.make_train_step` with the run's options)."""
  options = dict(num_classes=num_classes, seed=config.seed, input_transform=settings.input_transform)
  options.update(ema_decay=config.ema_decay, state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh))
  return settings.task.make_train_step(graphdef, rest, tx, schedule, **options)


def _restore_or_create(config, task: base.Task, model_config, tx, mesh, checkpointer):
  """(graphdef, rest, the train state's shardings, the train state): the latest checkpoint's, or a
  new one created already sharded (and warm-started from config.init_from)."""
  graphdef, rest, initial_state = initial_state_fn(config, task, model_config, tx)
  abstract_state = jax.eval_shape(initial_state)
  # Created, restored and updated already sharded: FSDP over the mesh, never whole on one device.
  shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  if checkpointer.latest_step() is None:
    state = jax.jit(initial_state, out_shardings=shardings)()
    if config.init_from:
      params = task.warm_start(config.init_from, state["params"], model_config)
      state["params"] = jax.device_put(params, shardings["params"])
      if state["ema"] is not None:
        state["ema"] = jax.tree.map(jnp.copy, state["params"])
    return graphdef, rest, shardings, state
  abstract_state = sharding.abstract(abstract_state, shardings)
  state, meta = checkpointer.restore(abstract_state)
  logging.info("Resumed from %s at step %d.", checkpointer.directory, int(state["step"]))
  if meta.get("process_count", jax.process_count()) != jax.process_count() and not config.data_shards:
    logging.warning(
      "The checkpoint was written by %d processes, this run has %d: with config.data_shards = 0 (one shard per "
      "process) the rest of this epoch sees other examples. Set config.data_shards to a fixed multiple of both "
      "to keep the data order.",
      meta["process_count"],
      jax.process_count(),
    )
  return graphdef, rest, shardings, state


def _run_length(config, num_train: int) -> tuple[int, int]:
  """(steps per epoch, total steps) of training on `num_train` examples."""
  if config.batch_size > num_train:
    examples = f"the {num_train} examples of {config.dataset}:{config.train_split}"
    raise checks.SettingError("config.batch_size", config.batch_size, f"exceeds {examples}")
  epoch_steps = num_train // config.batch_size  # The pipeline drops the remainder: static shapes.
  return epoch_steps, config.total_steps or math.ceil(config.num_epochs * epoch_steps)


def setup(config, workdir: str) -> Run:
  """Builds the run of `config` in `workdir`: the latest checkpoint there is resumed."""
  Settings.from_config(config)  # Every setting checked before the devices are asked for the mesh.
  mesh = mesh_of(config)
  sharding.check_batch_divisible(config.batch_size, mesh, "config.batch_size")
  config = for_devices(config, mesh)  # The chip's config.max_device_batch: more micro-batches.
  settings = Settings.from_config(config)
  task, workdir = settings.task, epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  info = pipeline.get_dataset_info(config.dataset, config.data_dir)
  epoch_steps, total_steps = _run_length(config, info.num_examples(config.train_split))
  task.check_data(info.num_classes, config.dataset)
  model_config = task.model_config(info.num_classes)
  tx, schedule = task.optimizer(
    settings.optimizer, batch_size=config.batch_size, epoch_steps=epoch_steps, total_steps=total_steps
  )
  checkpointer = checkpoint_lib.Checkpointer(
    checkpoint_lib.checkpoint_directory(workdir),
    keep=config.keep_checkpoints,
    keep_best=config.keep_best_checkpoints,
    best_metric=config.best_metric,
    save_every_steps=config.checkpoint_every_steps,
    async_save=config.async_checkpointing,
  )
  graphdef, rest, shardings, state = _restore_or_create(config, task, model_config, tx, mesh, checkpointer)
  logging.info(
    "Model %s (%s): %d parameters; %d steps (%d per epoch), global batch %d.",
    *(config.model.variant, task.name, sum(x.size for x in jax.tree.leaves(state["params"]))),
    *(total_steps, epoch_steps, config.batch_size),
  )
  train_step = train_step_of(config, settings, graphdef, rest, tx, schedule, info.num_classes, shardings, mesh)
  evaluator = _evaluator(config, settings, graphdef, rest, info.num_classes, mesh)
  batches = _train_batches(config, int(jax.device_get(state["step"])), mesh)
  writer = metrics_lib.MetricWriter(workdir)
  run = (config, task, mesh, epoch_steps, total_steps, model_config, state, train_step, batches, evaluator)
  return Run(*run, checkpointer, writer, workdir / "profile")


def _train_batches(config, start_step: int, mesh):
  """Global training batches from `start_step` on: the stream's fields the step reads (images and
  labels, or a detection batch's ground truth), two in flight ahead of the step."""
  process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
  stream = pipeline.create_train_dataset(config, global_batch_size=config.batch_size, start_step=start_step, **process)
  bookkeeping = ("example_id", "epoch")  # The stream's, not the step's.
  return sharding.prefetch_to_mesh(
    ({name: value for name, value in b.items() if name not in bookkeeping} for b in stream.as_numpy_iterator()), mesh
  )


def evaluate_run(run: Run, step: int) -> dict:
  """Evaluates the run's parameters and EMA at `step`; writes and returns the record."""
  trees = {"eval": run.state["params"], "ema_eval": run.state["ema"]}
  record, _ = run.evaluator.run(trees, run.state.get("model_state", {}))
  record = run.writer.write(step, record)
  logging.info("step %d: %s", step, record)
  return record


def save(run: Run, step: int, metrics: dict | None = None) -> None:
  """Starts saving the train state at `step` (with the evaluation record that ranks it)."""
  _raise_if_nonfinite(run.state, step)
  # The live state: Orbax copies it to host memory before `save` returns, so the next step may
  # donate its buffers (tests/test_checkpoint.py), and no device copy is needed.
  with jax.transfer_guard("allow"):  # Orbax's device-to-host copies are the point of a save.
    run.checkpointer.save(
      step,
      run.state,
      model=run.model_config,
      config=json.loads(run.config.to_json_best_effort()),
      meta={"process_count": jax.process_count()},
      metrics=metrics,
      force=True,
    )


class _Progress:
  """Train-metric windows: the mean of each metric since the last log, speed and input wait."""

  def __init__(self, run: Run, start_step: int):
    self.run, self.pending, self.bar = run, [], None
    if sys.stdout.isatty() and jax.process_index() == 0:
      import tqdm  # Only for interactive runs; logs stay clean otherwise.

      self.bar = tqdm.tqdm(total=run.total_steps, initial=start_step, dynamic_ncols=True)
    self.restart()

  def restart(self) -> None:
    """Keeps what happened until now (evaluation, saving) out of the speed."""
    self.start, self.steps, self.input_wait = time.perf_counter(), 0, 0.0

  def add(self, metrics, input_wait: float) -> None:
    self.pending.append(metrics)
    self.steps, self.input_wait = self.steps + 1, self.input_wait + input_wait
    if self.bar is not None:
      self.bar.update(1)

  def log(self, done: int) -> None:
    """Writes the window's record at step `done` (a log point) and starts the next window."""
    fetched = jax.device_get(self.pending)
    _raise_if_nonfinite(self.run.state, done)
    elapsed = time.perf_counter() - self.start
    record = {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}
    record.update(
      lr=float(fetched[-1]["lr"]),
      step_time_s=elapsed / self.steps,
      images_per_s=self.run.config.batch_size * self.steps / elapsed,
      input_wait_fraction=min(self.input_wait / elapsed, 1.0),
      epoch=done / self.run.epoch_steps,
    )
    record = self.run.writer.write(done, record)
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    else:
      logging.info("step %d/%d: %s", done, self.run.total_steps, record)
    self.pending = []
    self.restart()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _profile(run: Run, step: int, active: bool) -> bool:
  """Starts (at `first`) or stops (at `last`, or the run's end) the jax.profiler trace of
  config.profile_steps = (first, last) before training step `step`; whether it is tracing."""
  first, last = run.config.profile_steps or (-1, -1)
  if not active and step == first:
    jax.profiler.start_trace(str(run.profile_dir))
    return True
  if active and step >= min(last, run.total_steps):
    jax.profiler.stop_trace()
    logging.info("Profile of steps %d-%d written to %s.", first, step - 1, run.profile_dir)
    return False
  return active


def train(run: Run) -> dict:
  """Trains `run` to its last step (or a preemption notice); returns the last evaluation record.

  Implicit host-device transfers are errors inside the loop (jax.transfer_guard): on a pod they
  would be silent stalls.
  """
  config, start_step = run.config, int(jax.device_get(run.state["step"]))
  progress, watcher, last_eval = _Progress(run, start_step), preemption.PreemptionWatcher(), {}
  profiling = False
  try:
    with jax.transfer_guard("disallow"):
      for step in range(start_step, run.total_steps):
        profiling = _profile(run, step, profiling)
        wait_start = time.perf_counter()
        batch = next(run.train_batches)
        input_wait = time.perf_counter() - wait_start
        with jax.profiler.StepTraceAnnotation("train", step_num=step), jax.set_mesh(run.mesh):
          run.state, metrics = run.train_step(run.state, batch)
        progress.add(metrics, input_wait)
        done = step + 1
        is_last = done == run.total_steps
        if done % config.log_every_steps == 0 or is_last:
          progress.log(done)
        evaluated = done % config.eval_every_steps == 0 or is_last
        if evaluated:
          last_eval = evaluate_run(run, done)
        # The save policy (fixed interval, or the step all processes agreed on after a preemption
        # notice) is asked every step by every process; the last step, and every evaluation when
        # the best checkpoints are kept, are saved regardless.
        saved = run.checkpointer.should_save(done) or is_last or (evaluated and config.keep_best_checkpoints > 0)
        if saved:
          save(run, done, metrics=last_eval if evaluated else None)
        if evaluated or saved:
          progress.restart()
        if not is_last and watcher.should_stop(done):
          if not saved:
            save(run, done)
          run.checkpointer.wait()  # The process may be killed soon after: the save must be complete.
          logging.warning(
            "Stopped by %s after step %d; checkpoint saved in %s. Run the same command to resume.",
            watcher.signal_name,
            done,
            run.checkpointer.directory,
          )
          break
      profiling = _profile(run, run.total_steps, profiling)
    if start_step >= run.total_steps:
      logging.info("Already trained %d of %d steps; nothing to do.", start_step, run.total_steps)
  finally:
    if profiling:
      jax.profiler.stop_trace()
    watcher.close()
    progress.close()
  return last_eval


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the last eval.

  Writes WORKDIR/metrics.jsonl (train records: the task's metrics, images_per_s, step_time_s,
  input_wait_fraction (of the wall time waiting for data), epoch; eval records: eval_<metric>,
  ema_eval_<metric> with an EMA, num_examples), TensorBoard events and WORKDIR/checkpoints/.
  """
  run = setup(config, workdir)
  try:
    return train(run)
  finally:
    run.close()


def evaluate(
  config, path: str, split: str | None = None, image_size: int | None = None, results_dir: str | None = None
) -> dict:
  """Evaluates the checkpoint at `path` (a workdir, its checkpoints/, a step folder or converted
  weights), strictly: the model is built from `config`, and parameters that do not fit it are an
  error (a head or a position table is never re-initialized or resized on disk).

  Runs on the training mesh (config.mesh), the sums global. `image_size` (default
  config.image_size) other than the model's resizes the position embeddings on the fly. Returns and
  logs {step, split, image_size, eval_<metric> (and ema_eval_<metric> with an EMA), num_examples}
  and the task's per-class details; the scalars are appended to a training workdir's metrics.jsonl.
  """
  settings, split = Settings.from_config(config), split or config.eval_split
  image_size = int(image_size or config.image_size)
  mesh = mesh_of(config)
  info = pipeline.get_dataset_info(config.dataset, config.data_dir)
  graphdef, abstract_params, rest = steps.split_model(
    params_lib.abstract_model(settings.task.model_config(info.num_classes))
  )
  saved = checkpoint_lib.read_weights(path)

  def placed(abstract, tree, source):
    filled = params_lib.fill(abstract, params_lib.flatten(tree), source=source)
    return jax.device_put(filled, sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size))

  trees = {"eval": placed(abstract_params, saved.params, str(path))}
  trees["ema_eval"] = None if saved.ema is None else placed(abstract_params, saved.ema, f"{path} (EMA)")
  model_state = nnx.to_pure_dict(rest)
  if jax.tree.leaves(model_state):
    if saved.model_state is None:
      raise ValueError(f"{path} holds no model_state (non-parameter state), which this model needs.")
    model_state = placed(model_state, saved.model_state, f"{path} (model_state)")
  options = {"split": split, "image_size": image_size, **({"results_dir": results_dir} if results_dir else {})}
  evaluator = _evaluator(config, settings, graphdef, rest, info.num_classes, mesh, **options)
  record, details = evaluator.run(trees, model_state)
  record = {"split": split, "image_size": image_size, **record}
  workdir = saved.directory.parent
  if saved.directory.name == checkpoint_lib.CHECKPOINT_DIR and (workdir / metrics_lib.METRICS_FILE).exists():
    record = metrics_lib.MetricWriter(workdir, tensorboard=False).write(saved.step, record)
  else:
    record = {"step": saved.step, **record}
  record.update(details)  # Per-class values in the returned record and the log; metrics.jsonl holds scalars.
  logging.info("evaluate: %s", record)
  return record

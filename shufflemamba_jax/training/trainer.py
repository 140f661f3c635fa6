"""Training and evaluation of Vision Mamba / ShuffleMamba classifiers (SPEC §4) and UperNet segmenters.

`train_and_evaluate(config, workdir)` runs a whole experiment: model, data, the pure jitted
update step over the `nnx.split` state, periodic logging, evaluation of the model and its EMA,
asynchronous checkpoints and resumption from the latest one. `evaluate(config, path)` scores a
saved checkpoint on any split and resolution. Both start with `Settings.from_config`, which
builds and checks everything the run is made of before anything compiles; every error names
its config field.

A segmentation dataset (`config.dataset` in `pipeline.SEGMENTATION_DATASETS`) runs the same loop
with a UperNet on the configured backbone (`config.seg`): the train state also carries the
BatchNorm statistics, the learning rate follows mmseg's warmup + poly schedule, and evaluation
reports mIoU, mAcc and aAcc (`eval_miou`, `eval_macc`, `eval_aacc`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.data import device, pipeline
from shufflemamba_jax.models import upernet, variants, vim
from shufflemamba_jax.parallel import sharding
from shufflemamba_jax.training import metrics as metrics_lib
from shufflemamba_jax.training import mixup, optim, preemption, steps
from shufflemamba_jax.weights import checkpoint as checkpoint_lib
from shufflemamba_jax.weights import params as params_lib

# Model settings whose config field is not `model.<name>`.
_MODEL_CONFIG_FIELDS = {
  "img_size": "image_size",
  "variant": "model.variant",
  **{f"slws_{name}": f"model.slws.{name}" for name in ("max_prob", "schedule", "group_size")},
}


def model_config_from(config, num_classes: int | None = None) -> vim.VisionMambaConfig:
  """The VisionMambaConfig of `config.model` (None fields keep the variant's) at config.image_size.

  A bad value raises a SettingError naming the config field (e.g. config.model.slws.max_prob).
  """
  overrides = {
    name: value for name, value in config.model.items() if name not in ("variant", "slws") and value is not None
  }
  overrides.update({f"slws_{name}": value for name, value in config.model.slws.items() if value is not None})
  if num_classes is not None:
    overrides["num_classes"] = num_classes
  try:
    return variants.model_config(config.model.variant, img_size=config.image_size, **overrides)
  except checks.SettingError as error:
    field = _MODEL_CONFIG_FIELDS.get(error.setting, f"model.{error.setting}")
    raise checks.SettingError(f"config.{field}", error.value, error.requirement) from None


# UperNetConfig fields set by config.seg.<name>.
_SEGMENTER_FIELDS = ("out_indices", "channels", "pool_scales", "dropout", "aux_channels", "aux_level")


@dataclasses.dataclass(frozen=True)
class SegmentationSettings:
  """The segmentation part of a run (config.seg, configs/segmentation.py documents each field)."""

  segmenter: upernet.UperNetConfig  # For the variant's number of classes until the data is known.
  aux_weight: float
  class_weight: tuple[float, ...] | None  # One loss weight per class; None = all 1.
  warmup_steps: int
  warmup_factor: float
  poly_power: float
  eval_crop: tuple[int, int] | None  # Sliding-window evaluation; None = the whole image.
  eval_stride: tuple[int, int] | None

  @classmethod
  def from_config(cls, config, backbone: vim.VisionMambaConfig) -> SegmentationSettings:
    """Checks config.seg (and what segmentation needs of the rest of `config`)."""
    if "seg" not in config:
      raise checks.SettingError(
        "config.seg", None, f"is needed by the segmentation dataset {config.dataset!r} (see configs/segmentation.py)"
      )
    seg = config.seg
    fields = {name: seg[name] for name in _SEGMENTER_FIELDS}
    fields = {name: tuple(value) if isinstance(value, (list, tuple)) else value for name, value in fields.items()}
    try:
      segmenter = upernet.UperNetConfig(backbone=backbone, **fields)
    except checks.SettingError as error:
      prefix = "config.seg" if error.setting in _SEGMENTER_FIELDS else "config.model"
      raise checks.SettingError(f"{prefix}.{error.setting}", error.value, error.requirement) from None
    checks.number("config.seg.aux_weight", seg.aux_weight)
    class_weight = seg.class_weight
    if class_weight is not None:
      if not isinstance(class_weight, (list, tuple)) or not class_weight:
        raise checks.SettingError("config.seg.class_weight", class_weight, "must be one weight per class, or None")
      class_weight = tuple(checks.number("config.seg.class_weight", weight) for weight in class_weight)
    checks.integer("config.seg.warmup_steps", seg.warmup_steps, minimum=0)
    checks.number("config.seg.warmup_factor", seg.warmup_factor, 0.0, 1.0)
    checks.number("config.seg.poly_power", seg.poly_power)
    windows = {}
    for name in ("eval_crop", "eval_stride"):
      value = seg[name]
      if value is not None:
        if len(value) != 2:
          raise checks.SettingError(f"config.seg.{name}", value, "must be (height, width) or None")
        for side in value:
          checks.integer(f"config.seg.{name}", side)
        value = tuple(int(side) for side in value)
      windows[name] = value
    if windows["eval_stride"] is not None and windows["eval_crop"] is None:
      raise checks.SettingError("config.seg.eval_stride", seg.eval_stride, "needs config.seg.eval_crop")
    if windows["eval_crop"] is not None and any(side % (2 * backbone.patch_size) for side in windows["eval_crop"]):
      raise checks.SettingError(
        "config.seg.eval_crop", seg.eval_crop, f"must be multiples of {2 * backbone.patch_size} (2 x patch_size)"
      )
    return cls(
      segmenter=segmenter,
      aux_weight=float(seg.aux_weight),
      class_weight=class_weight,
      warmup_steps=int(seg.warmup_steps),
      warmup_factor=float(seg.warmup_factor),
      poly_power=float(seg.poly_power),
      **windows,
    )

  def check_classes(self, num_classes: int, dataset: str) -> None:
    """Raises a SettingError if class_weight does not give one weight to each of the dataset's classes."""
    if self.class_weight is not None and len(self.class_weight) != num_classes:
      raise checks.SettingError(
        "config.seg.class_weight",
        self.class_weight,
        f"must give one weight to each of the {num_classes} classes of {dataset}",
      )

  def schedule(self, optimizer: optim.OptimizerSettings, *, batch_size: int, total_steps: int) -> optax.Schedule:
    """mmseg's linear warmup from warmup_factor x peak, then poly decay to 0 at total_steps."""
    peak = optimizer.lr * batch_size / 512.0 if optimizer.lr_scale_batch else optimizer.lr
    try:
      return optim.warmup_poly_schedule(
        peak,
        warmup_steps=self.warmup_steps,
        warmup_factor=self.warmup_factor,
        total_steps=total_steps,
        power=self.poly_power,
      )
    except checks.SettingError as error:
      field = "config.seg.warmup_steps" if error.setting == "warmup_steps" else "config.total_steps"
      raise checks.SettingError(field, error.value, error.requirement) from None


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a run is built from, each part checked by its own module when it is built."""

  model: vim.VisionMambaConfig  # For the variant's number of classes until the data is known.
  optimizer: optim.OptimizerSettings
  mixup: mixup.MixupSettings
  input_transform: device.DeviceTransform  # Normalization and random erasing, on the device.
  segmentation: SegmentationSettings | None = None  # Set for a segmentation dataset.

  def model_config(self, num_classes: int) -> vim.VisionMambaConfig | upernet.UperNetConfig:
    """The model of the run for a dataset of `num_classes` classes: the classifier, or the segmenter."""
    if self.segmentation is None:
      return dataclasses.replace(self.model, num_classes=num_classes)
    return dataclasses.replace(self.segmentation.segmenter, num_classes=num_classes)

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
    if config.batch_size % config.grad_accum_steps:
      raise checks.SettingError(
        "config.grad_accum_steps", config.grad_accum_steps, f"must divide config.batch_size={config.batch_size}"
      )
    checkpoint_lib.check_keep_policy(config.keep_checkpoints, config.keep_best_checkpoints, config.best_metric)
    is_segmentation = config.dataset in pipeline.SEGMENTATION_DATASETS
    if config.keep_best_checkpoints:
      task_metrics = checkpoint_lib.SEGMENTATION_METRICS if is_segmentation else checkpoint_lib.CLASSIFICATION_METRICS
      checks.one_of("config.best_metric", config.best_metric, task_metrics)
    if config.keep_best_checkpoints and config.best_metric.startswith("ema_") and not config.ema_decay:
      raise checks.SettingError("config.best_metric", config.best_metric, "needs the EMA (config.ema_decay > 0)")
    if is_segmentation:
      # Nothing of the classification recipe that would be silently ignored.
      for name in ("mixup_alpha", "cutmix_alpha", "random_erasing_prob"):
        if config.aug[name]:
          raise checks.SettingError(f"config.aug.{name}", config.aug[name], "must be 0 for segmentation")
      if config.grad_accum_steps != 1:
        raise checks.SettingError("config.grad_accum_steps", config.grad_accum_steps, "must be 1 for segmentation")
      if config.aug.repeated_aug != 1:
        # The stream would put r copies of each example in a batch: 1/r of the data per step.
        raise checks.SettingError("config.aug.repeated_aug", config.aug.repeated_aug, "must be 1 for segmentation")
    data_settings = pipeline.settings(config)
    pipeline.num_data_shards(data_settings, config.batch_size, jax.process_count())
    mixup_settings = mixup.MixupSettings.from_config(config)
    mixup_settings.check_batch(config.batch_size)
    model = model_config_from(config)
    segmentation_settings = None
    if is_segmentation:
      segmentation_settings = SegmentationSettings.from_config(config, model)
      crop = data_settings["segmentation_augmentation"].crop_size
      if config.image_size != crop:
        raise checks.SettingError(
          "config.image_size", config.image_size, f"must equal the training crop, config.seg_aug.crop_size={crop}"
        )
    return cls(
      model=model,
      optimizer=optim.OptimizerSettings.from_config(config),
      mixup=mixup_settings,
      input_transform=data_settings["augmentation"].device_transform(),
      segmentation=segmentation_settings,
    )


def _raise_if_nonfinite(state, step: int):
  bad = int(jax.device_get(state["nonfinite_step"]))
  if bad >= 0:
    raise FloatingPointError(
      f"Non-finite (NaN/Inf) training loss at step {bad} (detected by step {step}); stopping. "
      "Lower the learning rate (config.lr) or enable clipping (config.grad_clip)."
    )


def init_params_from(path: str, params, config: vim.VisionMambaConfig, *, option: str = "config.init_from"):
  """`params` (a nested dict) holding the parameters saved at `path` (a workdir, a step folder or
  converted weights): position embeddings resized to `config`'s grid, and the head of `params`
  kept when the number of classes differs. Anything else that does not fit is one error naming
  `option`, the setting that gave `path`, and every difference."""
  source = f"{option}={path}"
  saved = checkpoint_lib.read_weights(path, ema=False)
  flat = params_lib.adapt(params_lib.flatten(saved.params), params, config, source=source)
  return params_lib.fill(params, flat, source=source)


def _evaluation_record(eval_step, trees: dict, dataset, mesh) -> dict:
  """{<prefix>_top1, _top5, _loss} of each parameter tree (None: left out) over the whole eval
  `dataset`, and num_examples, the examples scored by all processes together."""
  record = {}
  for prefix, params in trees.items():
    if params is not None:
      result = steps.run_evaluation(eval_step, params, dataset.as_numpy_iterator(), mesh)
      record.update({f"{prefix}_{name}": result[name] for name in ("top1", "top5", "loss")})
      record["num_examples"] = int(result["count"])
  return record


def _segmentation_record(eval_step, trees: dict, model_state, dataset, mesh, class_names=None) -> tuple[dict, dict]:
  """({<prefix>_miou, _macc, _aacc} of each parameter tree (None: left out) with the BatchNorm
  statistics `model_state`, over the whole eval `dataset`), {<prefix>_iou: {class: IoU}})."""
  record, per_class = {}, {}
  for prefix, params in trees.items():
    if params is not None:
      result = steps.run_segmentation_evaluation(
        eval_step, params, model_state, dataset.as_numpy_iterator(), mesh, class_names
      )
      record.update({f"{prefix}_{name.lower()}": result[name] for name in ("mIoU", "mAcc", "aAcc")})
      per_class[f"{prefix}_iou"] = result["IoU"]
  return record, per_class


def _segmentation_eval_step(settings: Settings, graphdef, num_classes: int):
  return steps.make_segmentation_eval_step(
    graphdef,
    num_classes,
    crop_size=settings.segmentation.eval_crop,
    stride=settings.segmentation.eval_stride,
    input_transform=settings.input_transform,
  )


def _abstract_split(model_config):
  """(graphdef, abstract params, abstract other state) of the run's model; nothing is computed."""
  return steps.split_model(params_lib.abstract_model(model_config))


def _warm_start(path: str, params, model_config):
  """`params` of a fresh model with the parameters saved at `path` (config.init_from): a
  classifier's whole tree (`init_params_from`), or a segmenter's backbone
  (`params_lib.segmenter_from_classifier`)."""
  if not isinstance(model_config, upernet.UperNetConfig):
    return init_params_from(path, params, model_config)
  saved = checkpoint_lib.read_weights(path, ema=False)
  if saved.is_segmenter:
    raise checks.SettingError(
      "config.init_from", path, "must be a classification checkpoint (a segmenter resumes from its own workdir)"
    )
  filled, _ = params_lib.segmenter_from_classifier(
    params_lib.flatten(saved.params), jax.device_get(params), model_config, source=f"config.init_from={path}"
  )
  return filled


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the last eval.

  Writes WORKDIR/metrics.jsonl (train records every log_every_steps: loss, train_top1, lr,
  grad_norm, images_per_s, step_time_s, input_wait_fraction (of the wall time spent waiting for
  the next batch), epoch; eval records: eval_top1, eval_top5, eval_loss and
  ema_eval_* when EMA is on), TensorBoard events and WORKDIR/checkpoints/. A segmentation run's
  train records have decode_loss, aux_loss and train_pixel_acc instead of train_top1, and its
  eval records eval_miou, eval_macc and eval_aacc (and ema_eval_*).
  """
  settings = Settings.from_config(config)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)

  # ---- Input and mesh --------------------------------------------------------------------
  info = pipeline.get_dataset_info(config.dataset, config.data_dir)
  num_train = info.num_examples(config.train_split)
  if config.batch_size > num_train:
    raise checks.SettingError(
      "config.batch_size",
      config.batch_size,
      f"exceeds the {num_train} examples of {config.dataset}:{config.train_split}",
    )
  epoch_steps = num_train // config.batch_size  # The pipeline drops the remainder: static shapes.
  total_steps = config.total_steps or math.ceil(config.num_epochs * epoch_steps)
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.check_batch_divisible(config.batch_size, mesh, "config.batch_size")
  sharding.check_batch_divisible(config.eval_batch_size, mesh, "config.eval_batch_size")
  settings.mixup.check_batch(config.batch_size, mesh.size)

  # ---- Model, optimizer and train state ----------------------------------------------------
  model_config = settings.model_config(info.num_classes)
  segmenting = settings.segmentation is not None
  if segmenting:
    settings.segmentation.check_classes(info.num_classes, config.dataset)
    schedule = settings.segmentation.schedule(settings.optimizer, batch_size=config.batch_size, total_steps=total_steps)
    tx = optim.create_optimizer(settings.optimizer, schedule, mask=optim.segmentation_weight_decay_mask)
  else:
    schedule = optim.learning_rate_schedule(
      settings.optimizer, batch_size=config.batch_size, steps_per_epoch=epoch_steps, total_steps=total_steps
    )
    tx = optim.create_optimizer(settings.optimizer, schedule)
  ema_decay = settings.optimizer.ema_decay

  def initial_state():
    if segmenting:
      model = upernet.UperNet(model_config, rngs=nnx.Rngs(config.seed))
      _, params, model_state = steps.split_model(model)
      return steps.init_segmentation_state(params, nnx.to_pure_dict(model_state), tx, ema_decay=ema_decay)
    _, params, _ = steps.split_model(vim.VisionMamba(model_config, rngs=nnx.Rngs(config.seed)))
    return steps.init_train_state(params, tx, ema_decay=ema_decay)

  graphdef, _, rest = _abstract_split(model_config)
  if jax.tree.leaves(rest) and not segmenting:
    raise NotImplementedError("The model has non-parameter state; the trainer carries params only.")
  abstract_state = jax.eval_shape(initial_state)
  # Created, restored and updated already sharded: FSDP over the mesh, never whole on one device.
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  abstract_state = jax.tree.map(
    lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where), abstract_state, state_shardings
  )

  # ---- Checkpoint: resume or start -------------------------------------------------------
  checkpointer = checkpoint_lib.Checkpointer(
    checkpoint_lib.checkpoint_directory(workdir),
    keep=config.keep_checkpoints,
    keep_best=config.keep_best_checkpoints,
    best_metric=config.best_metric,
    save_every_steps=config.checkpoint_every_steps,
    async_save=config.async_checkpointing,
  )
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(abstract_state)
    logging.info("Resumed from %s at step %d.", checkpointer.directory, int(state["step"]))
    saved_processes = meta.get("process_count", jax.process_count())
    if saved_processes != jax.process_count() and not config.data_shards:
      logging.warning(
        "The checkpoint was written by %d processes, this run has %d: with config.data_shards "
        "= 0 (one shard per process) the rest of this epoch sees other examples. Set "
        "config.data_shards to a fixed multiple of both to keep the data order.",
        saved_processes,
        jax.process_count(),
      )
  else:
    state = jax.jit(initial_state, out_shardings=state_shardings)()
    if config.init_from:
      state["params"] = jax.device_put(
        _warm_start(config.init_from, state["params"], model_config), state_shardings["params"]
      )
      if state["ema"] is not None:
        state["ema"] = jax.tree.map(jnp.copy, state["params"])
  start_step = int(jax.device_get(state["step"]))
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state["params"]))
  logging.info(
    "Model %s: %d parameters; %d steps (%d per epoch), global batch %d.",
    config.model.variant,
    num_params,
    total_steps,
    epoch_steps,
    config.batch_size,
  )

  # ---- Steps, data and metrics -----------------------------------------------------------
  batch_sharding = sharding.batch_sharding(mesh)
  if segmenting:
    train_step = steps.make_segmentation_train_step(
      graphdef,
      tx,
      schedule,
      seed=config.seed,
      aux_weight=settings.segmentation.aux_weight,
      class_weight=settings.segmentation.class_weight,
      input_transform=settings.input_transform,
      ema_decay=ema_decay,
      state_shardings=state_shardings,
      batch_sharding=batch_sharding,
    )
    eval_step = _segmentation_eval_step(settings, graphdef, info.num_classes)
  else:
    train_step = steps.make_train_step(
      graphdef,
      rest,
      tx,
      schedule,
      num_classes=info.num_classes,
      seed=config.seed,
      mixup_settings=settings.mixup,
      input_transform=settings.input_transform,
      grad_accum_steps=config.grad_accum_steps,
      ema_decay=ema_decay,
      state_shardings=state_shardings,
      batch_sharding=batch_sharding,
    )
    eval_step = steps.make_eval_step(graphdef, rest, settings.input_transform)
  process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
  train_stream = pipeline.create_train_dataset(
    config, global_batch_size=config.batch_size, start_step=start_step, **process
  ).as_numpy_iterator()
  # Uint8 images and labels only, two global batches in flight ahead of the step.
  train_batches = sharding.prefetch_to_mesh(({"image": b["image"], "label": b["label"]} for b in train_stream), mesh)
  eval_dataset = pipeline.create_eval_dataset(config, global_batch_size=config.eval_batch_size, **process)
  writer = metrics_lib.MetricWriter(workdir)
  config_json = json.loads(config.to_json_best_effort())

  def evaluate_now(step: int) -> dict:
    trees = {"eval": state["params"], "ema_eval": state["ema"]}
    if segmenting:
      record, _ = _segmentation_record(eval_step, trees, state["model_state"], eval_dataset, mesh)
    else:
      record = _evaluation_record(eval_step, trees, eval_dataset, mesh)
    record = writer.write(step, record)
    logging.info("step %d: %s", step, record)
    return record

  def save(step: int, metrics: dict | None = None):
    _raise_if_nonfinite(state, step)
    # The live state: Orbax copies it to host memory before `save` returns, so the next step
    # may donate its buffers (tests/test_checkpoint.py), and no device copy is needed.
    checkpointer.save(
      step,
      state,
      model=model_config,
      config=config_json,
      meta={"process_count": jax.process_count()},
      metrics=metrics,
      force=True,
    )

  # ---- Loop ------------------------------------------------------------------------------
  progress = None
  if sys.stdout.isatty() and jax.process_index() == 0:
    try:
      import tqdm  # Only for interactive runs; logs stay clean otherwise.

      progress = tqdm.tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)
    except ImportError:
      logging.info("tqdm is not installed: no progress bar.")
  last_eval: dict = {}
  pending_metrics = []
  window_start, window_steps, input_wait = time.perf_counter(), 0, 0.0
  watcher = preemption.PreemptionWatcher()
  try:
    for step in range(start_step, total_steps):
      wait_start = time.perf_counter()
      batch = next(train_batches)
      input_wait += time.perf_counter() - wait_start
      with jax.set_mesh(mesh):  # Activation sharding constraints refer to this mesh.
        state, step_metrics = train_step(state, batch)
      pending_metrics.append(step_metrics)
      window_steps += 1
      done = step + 1
      is_last = done == total_steps
      if progress is not None:
        progress.update(1)

      if done % config.log_every_steps == 0 or is_last:
        fetched = jax.device_get(pending_metrics)
        _raise_if_nonfinite(state, done)
        elapsed = time.perf_counter() - window_start
        record = {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}
        record.update(
          lr=float(fetched[-1]["lr"]),
          step_time_s=elapsed / window_steps,
          images_per_s=config.batch_size * window_steps / elapsed,
          input_wait_fraction=min(input_wait / elapsed, 1.0),
          epoch=done / epoch_steps,
        )
        record = writer.write(done, record)
        if progress is not None:
          progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        else:
          logging.info("step %d/%d: %s", done, total_steps, record)
        pending_metrics = []
        window_start, window_steps, input_wait = time.perf_counter(), 0, 0.0

      evaluated = done % config.eval_every_steps == 0 or is_last
      if evaluated:
        last_eval = evaluate_now(done)
      # The save policy (fixed interval, or the step all processes agreed on after a
      # preemption notice) is asked on every step by every process; the last step, and every
      # evaluation when the best checkpoints are kept, are saved regardless.
      saved = checkpointer.should_save(done) or is_last or (evaluated and config.keep_best_checkpoints > 0)
      if saved:
        save(done, metrics=last_eval if evaluated else None)
      if evaluated or saved:
        window_start, input_wait = time.perf_counter(), 0.0  # Keep evaluation and saving out of the speed.
      if not is_last and watcher.should_stop(done):
        if not saved:
          save(done)
        checkpointer.wait()  # The process may be killed soon after: the save must be complete.
        logging.warning(
          "Stopped by %s after step %d; checkpoint saved in %s. Run the same command to resume.",
          watcher.signal_name,
          done,
          checkpointer.directory,
        )
        break
    if start_step >= total_steps:
      logging.info("Already trained %d of %d steps; nothing to do.", start_step, total_steps)
  finally:
    watcher.close()
    if progress is not None:
      progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return last_eval


def evaluate(config, path: str, split: str | None = None, image_size: int | None = None) -> dict:
  """Evaluates the checkpoint at `path` (a workdir, its checkpoints/, a step folder or converted
  weights), strictly: the model is built from `config`, and parameters that do not fit it are an
  error (a head or a position table is never re-initialized or resized on disk).

  Runs on the training mesh (config.mesh): the batch is split over every device of every process
  and the sums are global. `image_size` (default config.image_size) other than the model's
  resizes the position embeddings on the fly. Returns and logs {step, split, image_size,
  eval_top1, eval_top5, eval_loss, and ema_eval_* when the checkpoint has an EMA, num_examples};
  a segmenter's record has eval_miou, eval_macc, eval_aacc and eval_iou ({class name: IoU}),
  and ema_eval_* likewise, at the evaluation scale of config.seg_aug (no `image_size`).
  When `path` is a training workdir the record is appended to its metrics.jsonl.
  """
  settings = Settings.from_config(config)
  split = split or config.eval_split
  segmenting = settings.segmentation is not None
  if segmenting and image_size is not None:
    raise checks.SettingError(
      "eval_image_size", image_size, "is for classifiers; a segmenter is evaluated at config.seg_aug.eval_scale"
    )
  image_size = image_size or config.image_size
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.check_batch_divisible(config.eval_batch_size, mesh, "config.eval_batch_size")
  info = pipeline.get_dataset_info(config.dataset, config.data_dir)
  graphdef, abstract_params, rest = _abstract_split(settings.model_config(info.num_classes))
  shardings = sharding.state_shardings(abstract_params, mesh, config.mesh.fsdp_min_size)
  saved = checkpoint_lib.read_weights(path)
  trees = {}
  for prefix, tree, source in (("eval", saved.params, str(path)), ("ema_eval", saved.ema, f"{path} (EMA)")):
    if tree is not None:
      trees[prefix] = jax.device_put(
        params_lib.fill(abstract_params, params_lib.flatten(tree), source=source), shardings
      )
  eval_dataset = pipeline.create_eval_dataset(
    config,
    split=split,
    global_batch_size=config.eval_batch_size,
    image_size=image_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  if segmenting:
    if saved.model_state is None:
      raise ValueError(f"{path} holds no BatchNorm statistics (model_state): it is not a segmenter's checkpoint.")
    abstract_state = nnx.to_pure_dict(rest)
    model_state = jax.device_put(
      params_lib.fill(abstract_state, params_lib.flatten(saved.model_state), source=f"{path} (model_state)"),
      sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size),
    )
    record = {"split": split}
    eval_step = _segmentation_eval_step(settings, graphdef, info.num_classes)
    metrics, per_class = _segmentation_record(
      eval_step, trees, model_state, eval_dataset, mesh, pipeline.class_names(config.dataset)
    )
    record.update(metrics)
  else:
    record = {"split": split, "image_size": int(image_size)}
    eval_step = steps.make_eval_step(graphdef, rest, settings.input_transform)
    record.update(_evaluation_record(eval_step, trees, eval_dataset, mesh))
    per_class = {}
  workdir = saved.directory.parent
  if saved.directory.name == checkpoint_lib.CHECKPOINT_DIR and (workdir / metrics_lib.METRICS_FILE).exists():
    record = metrics_lib.MetricWriter(workdir, tensorboard=False).write(saved.step, record)
  else:
    record = {"step": saved.step, **record}
  # Per-class IoU (NaN for a class absent from labels and predictions) in the returned record
  # and the log; metrics.jsonl holds scalars.
  record.update(per_class)
  logging.info("evaluate: %s", record)
  return record

"""What the training loop asks of a task (`Task`), and what every task shares.

A task owns its model (and warm start), the train state's extra collections, its loss and train
metrics, its evaluation (`evaluation`: the split's totals, summed over every process, then one
reduction of them) with its metric names, and what `predict` writes. Classification sums fixed-
shape global batches under `jit` (`batched_evaluation`); segmentation scores each process's
images at their own sizes and sums once at the end. The trainer knows none of them: it calls
these methods (big_vision's evaluators).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import optax
from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.data import device, pipeline
from shufflemamba_jax.models import variants, vim
from shufflemamba_jax.parallel import sharding
from shufflemamba_jax.training import optim, steps
from shufflemamba_jax.weights import checkpoint as checkpoint_lib
from shufflemamba_jax.weights import params as params_lib

# Prefixes of the evaluation records of the parameters and of their EMA.
EVAL_PREFIXES = ("eval", "ema_eval")
# Model settings whose config field is not `model.<name>`.
_MODEL_CONFIG_FIELDS = {
  "img_size": "image_size",
  "variant": "model.variant",
  **{f"slws_{name}": f"model.slws.{name}" for name in ("max_prob", "schedule", "group_size")},
}


class Task(Protocol):
  """One task of the training loop; `from_config(config)` builds it and checks its settings."""

  name: str
  ranking_metrics: tuple[str, ...]  # Evaluation metrics that can rank checkpoints (higher is better).

  def model_config(self, num_classes: int) -> Any: ...  # The run's model for a dataset of num_classes.

  def create_model(self, model_config, rngs: nnx.Rngs) -> nnx.Module: ...  # Its other state: `model_state`.

  def check_data(self, num_classes: int, dataset: str) -> None: ...  # A SettingError if a setting does not fit.

  def optimizer(
    self, settings: optim.OptimizerSettings, *, batch_size: int, epoch_steps: int, total_steps: int
  ) -> tuple[optax.GradientTransformation, optax.Schedule]: ...

  def warm_start(self, path: str, params: dict, model_config) -> dict: ...  # `params` filled from config.init_from.

  def make_train_step(self, graphdef, rest, tx, schedule, **options) -> Callable:
    """Jitted `train_step(state, batch) -> (state, metrics)`; options: num_classes, seed,
    input_transform, ema_decay, state_shardings, batch_sharding."""

  def evaluation(
    self, config, graphdef, rest, num_classes: int, transform: device.DeviceTransform, mesh, **options
  ) -> Callable[[Any, Any], dict]:
    """`totals(params, model_state) -> {name: numpy array, num_examples}`: the evaluation totals of
    the split (options: split, image_size; None = the config's; results_dir: where the task may
    write its evaluation's files, e.g. detection's COCO results, None = nowhere), summed over
    every process. Every
    process calls it (it may run collectives); params and model_state are sharded over `mesh`."""

  def reduce(self, totals: dict) -> tuple[dict, dict]: ...  # (scalar metrics, per-class details) of a split.

  def batch_shapes(self, config, global_batch: int, split: str) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch of `split` ("train" | "eval") as the input pipeline gives it to the steps."""

  def trace_evaluation(
    self, config, graphdef, rest, num_classes: int, transform: device.DeviceTransform, mesh, params, model_state
  ) -> jax.stages.Traced:
    """The program `evaluation` runs on each batch, traced on abstract `params` and `model_state`
    (ShapeDtypeStructs sharded over `mesh` as in the train state), for ahead-of-time compilation."""

  @staticmethod
  def predict(saved, paths: list[str], options) -> int: ...  # Writes predictions of `paths`; the exit code.


def batched_evaluation(sums: Callable, config, mesh, **options) -> Callable[[Any, Any], dict]:
  """`totals(params, model_state)` of `sums(params, model_state, batch) -> {name: array}` (traced
  under `jit`: a global batch's share of the totals; padding examples, mask 0, count for nothing)
  over the eval stream's global batches of config.eval_batch_size (`pipeline.create_eval_dataset`,
  each process reading its share; options: split, image_size), plus num_examples."""
  process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
  dataset = pipeline.create_eval_dataset(config, global_batch_size=config.eval_batch_size, **process, **options)
  eval_step = steps.make_eval_step(sums)

  def totals(params, model_state) -> dict:
    return steps.run_evaluation(eval_step, params, model_state, dataset.as_numpy_iterator(), mesh)

  return totals


def trace_batched_evaluation(task: Task, sums: Callable, config, mesh, params, model_state) -> jax.stages.Traced:
  """`batched_evaluation`'s step of `sums` traced on one abstract global batch of
  config.eval_batch_size (the task's `batch_shapes`), sharded over the mesh's batch axes."""
  batch = sharding.abstract(task.batch_shapes(config, config.eval_batch_size, "eval"), sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):  # As `steps.run_evaluation` calls it.
    return steps.make_eval_step(sums).trace(params, model_state, batch)


def backbone_from_classifier(path: str, params: dict, model_config, kind: str) -> dict:
  """A fresh segmenter's or detector's `params` (`kind` names it in the error) with the backbone
  of the classifier saved at config.init_from=`path` (`params_lib.segmenter_from_classifier`);
  a checkpoint of a segmenter or detector is refused: such a run resumes from its own workdir."""
  saved = checkpoint_lib.read_weights(path, ema=False)
  if saved.is_segmenter or saved.is_detector:
    raise checks.SettingError(
      "config.init_from", path, f"must be a classification checkpoint (a {kind} resumes from its own workdir)"
    )
  filled, _ = params_lib.segmenter_from_classifier(
    params_lib.flatten(saved.params), jax.device_get(params), model_config, source=f"config.init_from={path}"
  )
  return filled


def best_metrics(task: Task) -> tuple[str, ...]:
  """The record names of `task` that config.best_metric may take."""
  return tuple(f"{prefix}_{name}" for prefix in EVAL_PREFIXES for name in task.ranking_metrics)


def backbone_config(config, num_classes: int | None = None) -> vim.VisionMambaConfig:
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


def require_off(config, names: tuple[str, ...], task: str, value=0) -> None:
  """Raises a SettingError for the first dotted config field of `names` that is not `value`: a
  setting the task would otherwise ignore silently."""
  for name in names:
    current = config
    for part in name.split("."):
      current = current[part]
    if current != value:
      raise checks.SettingError(f"config.{name}", current, f"must be {value} for {task}")

"""Checkpoints: the one on-disk format of our weights, written by training and by `convert`.

WORKDIR/checkpoints/<step>/ is an Orbax `CheckpointManager` step with the items
  state   a pytree (StandardSave): "params", and in training runs "ema" (or None), "opt_state",
          "step" and "nonfinite_step"; a segmenter's also "model_state" (BatchNorm statistics);
  model   JSON, every VisionMambaConfig field (a segmenter: every UperNetConfig field, a
          detector: every MaskRCNNConfig field, the backbone's nested): rebuilds the model the
          parameters belong to;
  config  JSON, the training config (training runs only);
  meta    JSON, {"process_count": P} (training runs only).
`convert` writes a workdir with one step, 0, holding `state` ({"params"}) and `model`, so every
reader (`load_model`, evaluation, `init_from`, `predict`, the exporter) reads both kinds alike.

Saves are asynchronous and atomic: Orbax writes a temporary folder and renames it when the save
is complete, so a process killed mid-save leaves the previous checkpoint intact. The save policy
is Orbax's: `PreemptionCheckpointingPolicy` (all processes save at the step JAX's preemption
service agreed on) or `FixedIntervalPolicy(save_every_steps)`. The newest `keep` checkpoints are
kept, plus the `keep_best` with the highest `best_metric` among those saved with metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from shufflemamba_jax import checks
from shufflemamba_jax.models import adapter, upernet, vim
from shufflemamba_jax.models.detection import mask_rcnn
from shufflemamba_jax.weights import params as params_lib

CHECKPOINT_DIR = "checkpoints"
_JSON_ITEMS = ("model", "config", "meta")
_READ_ONLY = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)


def _absolute(path) -> epath.Path:
  # Orbax wants absolute paths; URLs (gs://...) already are.
  path = epath.Path(path)
  return path if path.is_absolute() else path.resolve()


def checkpoint_directory(workdir: str) -> epath.Path:
  return _absolute(workdir) / CHECKPOINT_DIR


def _handlers(state_handler=None) -> dict:
  return {
    "state": state_handler or ocp.StandardCheckpointHandler(),
    **{name: ocp.JsonCheckpointHandler() for name in _JSON_ITEMS},
  }


def check_keep_policy(keep: int, keep_best: int) -> None:
  """Validates what `Checkpointer` keeps, naming the training config's fields (the task checks
  config.best_metric, the name of one of its evaluation metrics)."""
  checks.integer("config.keep_checkpoints", keep)
  checks.integer("config.keep_best_checkpoints", keep_best, minimum=0)


def resolve(path: str) -> tuple[epath.Path, int | None]:
  """Maps a workdir, its checkpoints folder or one step folder to (checkpoints dir, step or None).

  None means "the latest step in that directory".
  """
  path = _absolute(path)
  if path.name.isdigit() and path.is_dir():
    return path.parent, int(path.name)
  if (path / CHECKPOINT_DIR).is_dir():
    return path / CHECKPOINT_DIR, None
  if path.name == CHECKPOINT_DIR and path.is_dir():
    return path, None
  raise FileNotFoundError(
    f"No checkpoint at {path}: expected a workdir containing {CHECKPOINT_DIR}/ (a training run "
    f"or weights written by shufflemamba_jax.convert), a {CHECKPOINT_DIR}/ folder or one of "
    "its numbered step folders."
  )


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for the items of the module docstring."""

  def __init__(
    self,
    directory,
    *,
    keep: int = 3,
    keep_best: int = 0,
    best_metric: str = "eval_top1",
    save_every_steps: int | None = None,
    async_save: bool = True,
    read_only: bool = False,
  ):
    """`keep`: newest checkpoints kept; `keep_best`: best by `best_metric` (higher is better)
    kept besides them; `save_every_steps`: the fixed interval of `should_save` (None: only
    preemption); `read_only`: open an existing directory for reading only."""
    check_keep_policy(keep, keep_best)
    save_policies = [checkpoint_managers.PreemptionCheckpointingPolicy()]
    if save_every_steps:
      save_policies.append(checkpoint_managers.FixedIntervalPolicy(save_every_steps))
    keep_policies = [checkpoint_managers.LatestN(n=keep)]
    best = {}
    if keep_best:
      metric = lambda metrics: float(metrics[best_metric])  # noqa: E731
      keep_policies.append(
        checkpoint_managers.BestN(get_metric_fn=metric, n=keep_best, keep_checkpoints_without_metrics=False)
      )
      # best_fn makes Orbax write the metrics next to the checkpoint, so that the ranking
      # survives a restart.
      best = {"best_fn": metric, "best_mode": "max"}
    if read_only:
      options = _READ_ONLY
    else:
      options = ocp.CheckpointManagerOptions(
        create=True,
        enable_async_checkpointing=async_save,
        save_decision_policy=checkpoint_managers.AnySavePolicy(save_policies),
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(keep_policies),
        **best,
      )
    self.directory = _absolute(directory)
    self.best_metric = best_metric if keep_best else None
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    """The save policy's decision for `step`; call it every step on every process."""
    return self.manager.should_save(step)

  def step(self, step: int | str | None = None) -> int:
    """A saved step: `step` itself, the latest for None, or for "best" the kept step with the
    highest evaluation metric stored with it (this manager's `best_metric`, else the run's)."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    if step is None:
      return steps[-1]
    if step == "best":
      metric = self.best_metric or (self.read_json("config", steps[-1]) or {}).get("best_metric", "eval_top1")
      ranked = {s: (self.manager.metrics(s) or {}).get(metric) for s in steps}
      ranked = {s: value for s, value in ranked.items() if value is not None}
      if not ranked:
        raise FileNotFoundError(
          f"No checkpoint in {self.directory} was saved with evaluation metrics (the run had "
          "config.keep_best_checkpoints = 0); ask for a step instead."
        )
      return max(ranked, key=ranked.get)
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint step {step} in {self.directory}; steps: {steps}")
    return step

  def save(
    self,
    step: int,
    state: Any,
    *,
    model: vim.VisionMambaConfig | upernet.UperNetConfig,
    config: dict | None = None,
    meta: dict | None = None,
    metrics: dict | None = None,
    force: bool = False,
  ) -> bool:
    """Starts saving (asynchronously); returns whether a save was started.

    Without `force`, the save policy decides. `metrics` (an evaluation record) ranks the
    checkpoint for keep_best; checkpoints saved without it are kept only as recent ones.
    """
    if metrics is not None and self.best_metric is not None and self.best_metric not in metrics:
      raise ValueError(
        f"config.best_metric={self.best_metric!r} is not an evaluation metric; evaluation reports {sorted(metrics)}."
      )
    items = {"state": ocp.args.StandardSave(state), "model": ocp.args.JsonSave(dataclasses.asdict(model))}
    items.update(
      {name: ocp.args.JsonSave(value) for name, value in (("config", config), ("meta", meta)) if value is not None}
    )
    # A failed asynchronous save surfaces in the next call: this save, `wait` or `close`.
    try:
      return self.manager.save(
        step, force=force, metrics=metrics if self.best_metric else None, args=ocp.args.Composite(**items)
      )
    except Exception as error:
      raise OSError(f"Could not save checkpoint step {step} in {self.directory}: {error}") from error

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` (None = latest) into the structure of `abstract_state`.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct (e.g. from jax.eval_shape); their
    shardings, if any, decide where the arrays land, whatever mesh saved them.
    """
    step = self.step(step)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored.state, self.read_json("meta", step) or {}

  def restore_parts(self, names=("params", "ema"), step: int | None = None) -> dict:
    """Only the top-level entries `names` of the saved state, as host NumPy arrays.

    For inference, evaluation and fine-tuning: the optimizer state (twice the parameters with
    AdamW) is never read. Entries the checkpoint lacks (or saved as None) are left out.
    """
    step = self.step(step)
    # The state was written through the PyTree handler (StandardSave wraps it); reading it
    # through that handler allows a partial restore.
    reader = ocp.CheckpointManager(
      self.directory, item_handlers=_handlers(ocp.PyTreeCheckpointHandler()), options=_READ_ONLY
    )
    try:
      saved = reader.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)
      target = {
        name: jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), saved[name])
        for name in names
        if saved.get(name) is not None
      }
      restored = reader.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
            item=target,
            partial_restore=True,
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
          )
        ),
      )
    finally:
      reader.close()
    return dict(restored.state)

  def read_json(self, item: str, step: int) -> dict | None:
    """The JSON item `item` ("model", "config" or "meta") of `step`, or None if it has none."""
    if not (self.directory / str(step) / item).exists():
      return None
    return dict(self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item])

  def wait(self):
    """Waits for the asynchronous save, if any; an error names the checkpoint folder."""
    self._named(self.manager.wait_until_finished)

  def close(self):
    """Finishes the asynchronous save, if any, and closes; an error names the checkpoint folder."""
    self._named(self.manager.close)

  def _named(self, finish):
    # A failed asynchronous save surfaces in whichever call comes next.
    try:
      finish()
    except Exception as error:
      raise OSError(f"Could not save a checkpoint in {self.directory}: {error}") from error


@dataclasses.dataclass(frozen=True)
class SavedWeights:
  """What a checkpoint holds for inference: parameters (nested dicts of numpy arrays) and more."""

  directory: epath.Path  # The checkpoints folder.
  step: int
  params: dict
  ema: dict | None
  model_config: vim.VisionMambaConfig | upernet.UperNetConfig
  run_config: dict  # The training config ({} for converted weights).
  model_state: dict | None = None  # A segmenter's BatchNorm statistics (nested dict), else None.

  @property
  def is_segmenter(self) -> bool:
    return isinstance(self.model_config, upernet.UperNetConfig)

  @property
  def is_detector(self) -> bool:
    return isinstance(self.model_config, mask_rcnn.MaskRCNNConfig)

  def model(self) -> vim.VisionMamba | upernet.UperNet:
    """The model holding the EMA parameters when they were read, else the parameters (and a
    segmenter's BatchNorm statistics)."""
    params = self.ema if self.ema is not None else self.params
    source = f"{self.directory}/{self.step}"
    return params_lib.model_with_params(self.model_config, params, self.model_state, source=source)


def model_config_from_json(model: dict) -> vim.VisionMambaConfig | upernet.UperNetConfig:
  """The model config saved as a checkpoint's `model` item: a segmenter's when it has a backbone."""
  if "backbone" not in model:
    return vim.VisionMambaConfig(**model)
  fields = {name: tuple(value) if isinstance(value, list) else value for name, value in model.items()}
  if "fpn_channels" in model:  # A detector.
    fields["backbone"] = None if model["backbone"] is None else vim.VisionMambaConfig(**model["backbone"])
    fields["adapter"] = None if model["adapter"] is None else adapter.AdapterConfig(**model["adapter"])
    return mask_rcnn.MaskRCNNConfig(**fields)
  if fields.get("adapter") is not None:
    fields["adapter"] = adapter.AdapterConfig(**fields["adapter"])
  return upernet.UperNetConfig(**dict(fields, backbone=vim.VisionMambaConfig(**model["backbone"])))


def read_weights(path: str, step: int | str | None = None, *, ema: bool = True) -> SavedWeights:
  """The parameters, the EMA (unless `ema` is False) and the configs saved at `path` (a workdir,
  its checkpoints/ or a step folder); `step` is a number, "best" or None (the step folder's,
  else the latest)."""
  directory, folder_step = resolve(path)
  with Checkpointer(directory, read_only=True) as checkpointer:
    step = checkpointer.step(step if step is not None else folder_step)
    parts = checkpointer.restore_parts(("params", "ema", "model_state") if ema else ("params", "model_state"), step)
    model = checkpointer.read_json("model", step)
    if model is None:
      raise FileNotFoundError(
        f"{directory}/{step} has no model item: it was not written by this "
        "version of shufflemamba_jax (train or convert again)."
      )
    return SavedWeights(
      directory,
      step,
      parts["params"],
      parts.get("ema"),
      model_config_from_json(model),
      checkpointer.read_json("config", step) or {},
      parts.get("model_state"),
    )


def load_model(path: str, step: int | str | None = None, ema: bool = True) -> vim.VisionMamba:
  """Returns the model saved at `path`, ready for `model(images)` (evaluation mode).

  Args:
    path: a training workdir, its checkpoints/ folder or a step folder, or a directory written
      by `python -m shufflemamba_jax.convert`.
    step: the checkpoint step (default: the latest), or "best": the kept step with the best
      evaluation by the run's `best_metric`.
    ema: use the EMA parameters when the checkpoint has them.
  """
  return read_weights(path, step, ema=ema).model()

"""Checkpoints of a training run with Orbax: state, run metadata and the config.

Layout: WORKDIR/checkpoints/<step>/{state, meta, config}. `state` is the train-state pytree
(params, optimizer state, EMA, step, rng key data); `meta` is JSON with the step and the data
position (how many batches the input pipeline has delivered, so a resumed run skips exactly
those); `config` is the run's config as JSON, for people and for `evaluate`.

Saves are asynchronous and atomic (Orbax writes a temporary folder and renames it when the
save is complete, so a process killed mid-save leaves the previous checkpoint intact). The save
policy is Orbax's: `PreemptionCheckpointingPolicy` (all processes save at the step JAX's
preemption service agreed on) or `FixedIntervalPolicy(save_every_steps)`. The newest `keep`
checkpoints are kept, plus the `keep_best` with the highest `best_metric` among those saved
with evaluation metrics.
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_DIR = 'checkpoints'
_ITEMS = ('state', 'meta', 'config')


def checkpoint_directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def resolve(path: str) -> tuple[str, int | None]:
  """Maps a workdir, its checkpoints folder or one step folder to (checkpoints dir, step or None).

  None means "the latest step in that directory".
  """
  path = os.path.abspath(path)
  base = os.path.basename(path.rstrip('/'))
  if base.isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(base)
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return os.path.join(path, CHECKPOINT_DIR), None
  if base == CHECKPOINT_DIR:
    return path, None
  raise FileNotFoundError(
      f'No checkpoint at {path}: expected a workdir containing {CHECKPOINT_DIR}/, '
      f'a {CHECKPOINT_DIR}/ folder or one of its numbered step folders.')


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for the train state of `train.py`."""

  def __init__(self, directory: str, *, keep: int = 3, keep_best: int = 0,
               best_metric: str = 'eval_top1', save_every_steps: int | None = None,
               async_save: bool = True):
    """`keep`: newest checkpoints kept; `keep_best`: best by `best_metric` (higher is better)
    kept besides them; `save_every_steps`: the fixed interval of `should_save` (None: only
    preemption)."""
    if keep < 1:
      raise ValueError(f'config.keep_checkpoints={keep}: at least the latest checkpoint is kept.')
    if keep_best < 0:
      raise ValueError(f'config.keep_best_checkpoints={keep_best} must be >= 0.')
    save_policies = [checkpoint_managers.PreemptionCheckpointingPolicy()]
    if save_every_steps:
      save_policies.append(checkpoint_managers.FixedIntervalPolicy(save_every_steps))
    keep_policies = [checkpoint_managers.LatestN(n=keep)]
    best = {}
    if keep_best:
      metric = lambda metrics: float(metrics[best_metric])  # noqa: E731
      keep_policies.append(checkpoint_managers.BestN(
          get_metric_fn=metric, n=keep_best, keep_checkpoints_without_metrics=False))
      # best_fn makes Orbax write the metrics next to the checkpoint, so that the ranking
      # survives a restart.
      best = {'best_fn': metric, 'best_mode': 'max'}
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save,
        save_decision_policy=checkpoint_managers.AnySavePolicy(save_policies),
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(keep_policies), **best)
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric if keep_best else None
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    """The save policy's decision for `step`; call it every step on every process."""
    return self.manager.should_save(step)

  def best_step(self) -> int:
    """The kept step with the highest evaluation metric stored with it.

    The metric is this manager's `best_metric`, else the run's own (its saved config).
    """
    latest = self.latest_step()
    if latest is None:
      raise FileNotFoundError(f'No checkpoint found in {self.directory}.')
    metric = self.best_metric or self.read_config(latest).get('best_metric', 'eval_top1')
    ranked = {step: self.manager.metrics(step) for step in self.all_steps()}
    ranked = {step: metrics[metric] for step, metrics in ranked.items()
              if metrics is not None and metric in metrics}
    if not ranked:
      raise FileNotFoundError(
          f'No checkpoint in {self.directory} was saved with evaluation metrics (the run had '
          'config.keep_best_checkpoints = 0); ask for a step instead.')
    return max(ranked, key=ranked.get)

  def save(self, step: int, state: Any, meta: dict, config: dict, force: bool = False,
           metrics: dict | None = None) -> bool:
    """Starts saving (asynchronously); returns whether a save was started.

    Without `force`, the save policy decides. `metrics` (an evaluation record) ranks the
    checkpoint for keep_best; checkpoints saved without it are kept only as recent ones.
    """
    if metrics is not None and self.best_metric is not None and self.best_metric not in metrics:
      raise ValueError(f'config.best_metric={self.best_metric!r} is not an evaluation metric; '
                       f'evaluation reports {sorted(metrics)}.')
    if self.best_metric is None:
      metrics = None  # Orbax stores metrics only when it ranks checkpoints.
    return self.manager.save(
        step, force=force, metrics=metrics,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta),
                                config=ocp.args.JsonSave(config)))

  def restore(self, abstract_state: Any, step: int | None = None):
    """Restores (state, meta) at `step` (None = latest) into the structure of `abstract_state`.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct (e.g. from nnx.eval_shape /
    jax.eval_shape); its shardings, if any, decide where the arrays land.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint found in {self.directory}.')
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def restore_raw(self, step: int | None = None):
    """Restores the saved state tree as it was written (no target structure), for init_from."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint found in {self.directory}.')
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored.state

  def restore_parts(self, names=('params', 'ema'), step: int | None = None) -> dict:
    """Only the top-level entries `names` of the saved state, as host NumPy arrays.

    For inference, evaluation and fine-tuning: the optimizer state (twice the parameters with
    AdamW) is never read. Entries the checkpoint lacks (or saved as None) are left out.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint found in {self.directory}.')
    # The state was written through the PyTree handler (StandardSave wraps it); reading it
    # through that handler allows a partial restore.
    reader = ocp.CheckpointManager(
        self.directory, item_handlers={'state': ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      saved = reader.item_metadata(step)['state']
      saved = getattr(saved, 'tree', saved)
      target = {name: jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
                                   saved[name])
                for name in names if saved.get(name) is not None}
      restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, partial_restore=True,
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target))))
    finally:
      reader.close()
    return dict(restored.state)

  def read_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for every array leaf of `tree`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
      tree)

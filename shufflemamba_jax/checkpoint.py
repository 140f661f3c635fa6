"""Checkpoints of a training run with Orbax: state, run metadata and the config.

Layout: WORKDIR/checkpoints/<step>/{state, meta, config}. `state` is the train-state pytree
(params, optimizer state, EMA, step, rng key data); `meta` is JSON with the step and the data
position (how many batches the input pipeline has delivered, so a resumed run skips exactly
those); `config` is the run's config as JSON, for people and for `evaluate`. Saves are
asynchronous; the newest `max_to_keep` checkpoints are kept.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

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

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               save_interval_steps: int = 1):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        save_interval_steps=save_interval_steps)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, config: dict, force: bool = False) -> bool:
    """Starts saving (asynchronously); returns whether a save was started."""
    return self.manager.save(
        step, force=force,
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

"""Initialising a model's parameters from a checkpoint: fine-tuning and multi-stage training.

`init_params_from(path, params, token_layout=..., grid=...)` fills a freshly initialised
parameter tree from a training run (a workdir, its checkpoints/ folder or one step folder) or
from converted official weights (`shufflemamba_jax.convert`). Two differences are expected and
bridged: another resolution (the position table is resized bicubically to the model's patch
grid) and another number of classes (the model's fresh head is kept). Anything else that does
not fit is an error listing every missing, unused and mis-shaped parameter at once, so that a
checkpoint of another architecture says exactly where it differs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shufflemamba_jax import checkpoint as checkpoint_lib
from shufflemamba_jax import convert
from shufflemamba_jax import tokens

_log = logging.getLogger('shufflemamba_jax.warm_start')
# Problems shown in an error before the rest are only counted: a wrong depth mis-shapes every
# layer parameter, and the first lines already tell the story.
_MAX_LISTED = 20


def read_params(path: str) -> dict:
  """The parameter tree saved at `path`: a training run (latest step unless a step folder is
  given) or a `convert.save_params` directory."""
  if convert.is_params_checkpoint(path):
    return convert.load_params(path)[0]
  directory, step = checkpoint_lib.resolve(path)
  source = checkpoint_lib.Checkpointer(directory, async_save=False)
  try:
    return source.restore_parts(('params',), step)['params']
  finally:
    source.close()


def init_params_from(path: str, params: Any, *, token_layout: str, grid: tuple[int, int],
                     option: str = 'config.init_from') -> Any:
  """`params` with the values saved at `path` (see `read_params` and `merge_params`).

  `option` names the setting that gave `path` in error messages.
  """
  return merge_params(read_params(path), params, token_layout=token_layout, grid=grid,
                      source=f'{option}={path}')


def merge_params(saved: Mapping, params: Any, *, token_layout: str, grid: tuple[int, int],
                 source: str = 'the checkpoint') -> Any:
  """The tree of `params` (structure and dtypes) holding the values of `saved`.

  `pos_embed` is resized from its saved square grid to `grid` (the model's patches under
  `token_layout`). A head with another number of outputs on the same input width keeps the
  value in `params`, the model's own fresh initialisation, as `convert` does for official
  weights. Every other difference is collected into one ValueError that starts with `source`.
  """
  saved_flat = {_name(path): value for path, value in _flatten(saved)}
  target_flat = {_name(path): value for path, value in _flatten(params)}
  new_head = _head_reinitialized(saved_flat, target_flat)
  if new_head:
    _log.warning('%s has a %d-class head: the head is re-initialized for %d classes.', source,
                 np.shape(saved_flat['head.kernel'])[-1], np.shape(target_flat['head.kernel'])[-1])

  missing, mismatched = [], []

  def take(path, target):
    name = _name(path)
    if name not in saved_flat:
      missing.append(f'missing from the checkpoint: {name} {tuple(target.shape)}')
      return target
    if new_head and name.startswith('head.'):
      return target
    value = saved_flat[name]
    saved_shape, target_shape = tuple(np.shape(value)), tuple(target.shape)
    if saved_shape != target_shape and name == 'pos_embed':
      value, why = _resized_pos_embed(value, target_shape, grid, token_layout)
      if why:
        mismatched.append(f'{name}: {saved_shape} in the checkpoint, {target_shape} in the model '
                          f'({why})')
        return target
      _log.info('%s: resized pos_embed %s -> %s.', source, saved_shape, target_shape)
    elif saved_shape != target_shape:
      mismatched.append(f'{name}: {saved_shape} in the checkpoint, {target_shape} in the model')
      return target
    return jnp.asarray(value, target.dtype)

  merged = jax.tree_util.tree_map_with_path(take, params)
  unused = [f'not in the model: {name} {tuple(np.shape(value))}'
            for name, value in saved_flat.items() if name not in target_flat]
  if missing or unused or mismatched:
    raise ValueError(_problems_message(source, mismatched, missing, unused))
  return merged


def _flatten(tree) -> list[tuple[Any, Any]]:
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def _name(path) -> str:
  """A dotted parameter name, e.g. layers.mixer.in_proj.kernel (the layer axis not expanded)."""
  return '.'.join(str(getattr(entry, 'key', getattr(entry, 'name', getattr(entry, 'idx', entry))))
                  for entry in path)


def _head_reinitialized(saved_flat: Mapping, target_flat: Mapping) -> bool:
  """Whether the saved head differs from the model's only in its number of classes."""
  names = ('head.kernel', 'head.bias')
  if not all(name in saved_flat and name in target_flat for name in names):
    return False
  saved_kernel, saved_bias = (tuple(np.shape(saved_flat[name])) for name in names)
  kernel = tuple(target_flat['head.kernel'].shape)
  return (len(saved_kernel) == len(kernel) == 2 and saved_kernel[0] == kernel[0]
          and saved_kernel[1] != kernel[1] and saved_bias == saved_kernel[1:])


def _resized_pos_embed(value, target_shape, grid, token_layout):
  """(resized table, None), or (None, why) when it cannot be resized to `target_shape`."""
  if np.ndim(value) != 2 or np.shape(value)[1] != target_shape[-1]:
    return None, 'another embedding width'
  try:
    resized = tokens.resize_pos_embed_table(jnp.asarray(value), grid, token_layout)
  except ValueError as error:
    return None, str(error)
  if tuple(resized.shape) != tuple(target_shape):
    # The model's table does not have the layout or grid it was described with.
    return None, f'resized to {tuple(resized.shape)} for the {grid} grid, {token_layout!r} layout'
  return resized, None


def _problems_message(source: str, mismatched: list, missing: list, unused: list) -> str:
  counts = [f'{len(items)} {what}' for items, what in (
      (mismatched, 'with another shape'), (missing, 'missing from the checkpoint'),
      (unused, 'not in the model')) if items]
  lines = [f'{source} does not fit the model ({", ".join(counts)}); was it trained with '
           'another model.variant, depth, embed_dim or other model setting?']
  problems = mismatched + missing + unused
  lines += [f'  {problem}' for problem in problems[:_MAX_LISTED]]
  if len(problems) > _MAX_LISTED:
    lines.append(f'  ... and {len(problems) - _MAX_LISTED} more')
  return '\n'.join(lines)

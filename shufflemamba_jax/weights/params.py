"""Parameters by name, and the one function that fills a model from them.

Names are the dotted paths of a model's `nnx.Param`s (`flax.traverse_util.flatten_dict` of
`nnx.to_pure_dict(nnx.state(model, nnx.Param))`): `patch_embed.kernel`, `head.bias`, and
`layers.mixer.in_proj.kernel` for the blocks, which are stacked on a leading (depth,) axis. A
mapping may also give the blocks one at a time, `layers.{i}.mixer.in_proj.kernel`, as PyTorch
state dicts do; `fill` stacks them.

Every reader of weights goes through `fill`: evaluation, `load_model`, warm start and the PyTorch
importer. It adapts nothing, so evaluation is strict. Fine-tuning's two expected differences,
another resolution and another number of classes, are bridged by `adapt`, which warm start and
the importer call first.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from shufflemamba_jax.models import adapter, tokens, upernet, vim
from shufflemamba_jax.models.detection import mask_rcnn

_log = logging.getLogger(__name__)
# Problems listed in an error before the rest are only counted: a wrong depth mis-shapes every
# block parameter, and the first lines already tell the story.
MAX_LISTED = 20


def flatten(tree: Mapping) -> dict[str, Any]:
  """A nested dict of arrays as {dotted name: array}."""
  return traverse_util.flatten_dict(dict(tree), sep=".")


def unflatten(flat: Mapping[str, Any]) -> dict:
  """The inverse of `flatten`."""
  return traverse_util.unflatten_dict(dict(flat), sep=".")


def abstract_model(config: vim.VisionMambaConfig | upernet.UperNetConfig) -> vim.VisionMamba | upernet.UperNet:
  """The model of `config` (a classifier, a segmenter for a UperNetConfig, a detector for a MaskRCNNConfig) with
  jax.ShapeDtypeStruct parameters and state; nothing is computed."""
  if isinstance(config, upernet.UperNetConfig):
    return nnx.eval_shape(lambda: upernet.UperNet(config, rngs=nnx.Rngs(0)))
  if isinstance(config, mask_rcnn.MaskRCNNConfig):
    return nnx.eval_shape(lambda: mask_rcnn.MaskRCNN(config, rngs=nnx.Rngs(0)))
  return nnx.eval_shape(lambda: vim.VisionMamba(config, rngs=nnx.Rngs(0)))


def param_tree(model: nnx.Module) -> dict:
  """The model's parameters as a nested dict of arrays (or of ShapeDtypeStructs)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def fill(
  target: Mapping,
  flat: Mapping[str, Any],
  *,
  source: str,
  describe: Callable[[str, tuple], tuple[str, tuple]] | None = None,
) -> dict:
  """The nested tree of `target` holding the values of `flat`, in the target's dtypes.

  Args:
    target: the model's parameters, a nested dict of arrays or jax.ShapeDtypeStructs.
    flat: {name: array} (see the module docstring); blocks whole or one at a time.
    source: where the values come from, named in the error (a path or a setting).
    describe: renders (name, shape) the way the source names and lays out its tensors (e.g. the
      PyTorch names and layouts), for the error message.

  Returns:
    A nested dict like `target` of numpy arrays (copies, never views of `flat`'s arrays).

  Raises:
    ValueError: one error naming every missing, unused and mis-shaped tensor.
  """
  describe = describe or (lambda name, shape: (name, tuple(shape)))
  unused = dict(flat)
  missing, mismatched, filled = [], [], {}
  for name, leaf in flatten(target).items():
    shape = tuple(leaf.shape)
    parts = name.split(".")
    if name in unused or vim.LAYERS not in parts:
      entries = [(name, shape, unused.pop(name, None))]
    else:  # A block parameter (of a classifier, or of a segmenter's `backbone`) given one block at a time.
      cut = parts.index(vim.LAYERS) + 1
      names = [".".join([*parts[:cut], str(i), *parts[cut:]]) for i in range(shape[0])]
      entries = [(block, shape[1:], unused.pop(block, None)) for block in names]
    values = []
    for entry, entry_shape, value in entries:
      if value is None:
        missing.append("missing from the checkpoint: {} {}".format(*describe(entry, entry_shape)))
      elif tuple(np.shape(value)) != entry_shape:
        saved_name, saved_shape = describe(entry, np.shape(value))
        mismatched.append(
          f"{saved_name}: {saved_shape} in the checkpoint, {describe(entry, entry_shape)[1]} in the model"
        )
      else:
        values.append(np.asarray(value))
    if len(values) == len(entries):
      filled[name] = np.array(values[0] if entries[0][0] == name else np.stack(values), leaf.dtype)
  extra = ["not in the model: {} {}".format(*describe(name, np.shape(value))) for name, value in unused.items()]
  if missing or mismatched or extra:
    counts = ", ".join(
      f"{len(items)} {what}"
      for items, what in (
        (mismatched, "with another shape"),
        (missing, "missing from the checkpoint"),
        (extra, "not in the model"),
      )
      if items
    )
    problems = mismatched + missing + extra
    lines = [
      f"{source} does not fit the model ({counts}); was it saved from another model "
      "(model.variant, depth, embed_dim, num_registers, ...)?"
    ]
    lines += [f"  {problem}" for problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
      lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    raise ValueError("\n".join(lines))
  return unflatten(filled)


def adapt(
  flat: Mapping[str, Any],
  target: Mapping,
  config: vim.VisionMambaConfig,
  *,
  source: str,
  resize_positions: bool = True,
  new_head: bool = True,
) -> dict[str, Any]:
  """`flat` (a copy) with fine-tuning's expected differences from `target` bridged.

  resize_positions: a `pos_embed` saved for another square patch grid is resized bicubically to
    `config.grid` (the extra-token slots are carried over).
  new_head: a head with another number of classes on the same features is replaced by the
    target's own, freshly initialized head (whose values must be concrete), with a warning.
  Any other difference is left for `fill` to report.
  """
  flat, target = dict(flat), flatten(target)
  saved, wanted = flat.get("pos_embed"), tuple(target["pos_embed"].shape)
  if resize_positions and saved is not None and np.ndim(saved) == 2 and np.shape(saved) != wanted:
    try:
      resized = tokens.resize_pos_embed_table(jnp.asarray(saved), config.grid, config.token_layout)
    except ValueError:
      resized = None  # Not a square grid: `fill` reports the shapes.
    if resized is not None and tuple(resized.shape) == wanted:
      _log.info(
        "%s: resized pos_embed %s -> %s for the %dx%d patch grid.", source, np.shape(saved), wanted, *config.grid
      )
      flat["pos_embed"] = np.asarray(resized)
  kernel, bias = flat.get("head.kernel"), flat.get("head.bias")
  fresh = target["head.kernel"].shape if "head.kernel" in target else None
  if (
    new_head
    and fresh is not None
    and kernel is not None
    and bias is not None
    and np.ndim(kernel) == 2
    and np.shape(kernel)[0] == fresh[0]
    and np.shape(kernel)[1] != fresh[1]
    and np.shape(bias) == np.shape(kernel)[1:]
  ):
    _log.warning(
      "%s has a %d-class head: the head is re-initialized for %d classes.", source, np.shape(kernel)[1], fresh[1]
    )
    flat["head.kernel"], flat["head.bias"] = target["head.kernel"], target["head.bias"]
  return flat


def segmenter_backbone_positions(pos_embed, classifier: vim.VisionMambaConfig, config: upernet.UperNetConfig):
  """A classifier's position table as a segmenter's: its patch rows on `config.pos_grid`.

  A table of s * s rows is patch-only (a register classifier's); one of s * s + 1 rows has a cls
  row at the index of the classifier's layout ("middle", else ShuffleMamba's head), which the
  reference segmentation backbone drops (`load_pretrained`). A table saved for another square
  grid is resized with torch's bicubic, which the reference would refuse. Returns (pos_grid rows
  x columns, D) float32, or `pos_embed` unchanged when its rows form no square grid (`fill` then
  reports the shapes).
  """
  rows = np.shape(pos_embed)[0] if np.ndim(pos_embed) == 2 else 0
  patches = np.asarray(pos_embed)
  side = math.isqrt(rows)
  if rows and side * side != rows:
    side = math.isqrt(rows - 1)
    if side * side != rows - 1:
      return pos_embed
    layout = "middle" if classifier.token_layout == "middle" else "head"
    patches, _ = tokens.split_position_table(patches, side * side, layout)
  if not side:
    return pos_embed
  return np.asarray(tokens.resize_patch_positions(jnp.asarray(patches, jnp.float32), (side, side), config.pos_grid))


def segmenter_from_classifier(
  flat: Mapping[str, Any], target: Mapping, config: upernet.UperNetConfig, *, source: str
) -> tuple[dict, list[str]]:
  """Warm start of a segmenter or a detector: a classifier's parameters as the backbone, the rest
  left fresh.

  As the reference's `load_state_dict(strict=False)`: the classifier's cls token, registers and
  head are left out (and its final norm under the adapter, which has none), the adapter's own
  parts start fresh, and where the norms differ (an RMSNorm classifier under the reference's
  LayerNorm segmentation backbones) the scales are taken and the biases stay at their
  initialization (zero), or are dropped the other way round.

  Args:
    flat: {name: array} of a VisionMamba classifier (see the module docstring); a cls row of
      its position table is found by `config.backbone.token_layout` (middle for Vim, else head).
    target: the segmenter's parameters (nested, concrete values).
    config: the segmenter's UperNetConfig or the detector's MaskRCNNConfig (its backbone, adapter
      and `pos_grid`); the position table becomes its `pos_grid`.
    source: where `flat` comes from, named in messages and errors.

  Returns:
    (a nested dict like `target`: the classifier's backbone under `backbone` and the target's
    own values elsewhere; the sorted names of the parameters left as initialized: the heads',
    the neck's, the adapter's and any norm bias). Both the fresh parts and the classifier's dropped parts are
    logged. Anything else that does not fit raises `fill`'s ValueError.
  """
  target = flatten(target)
  prefix = "backbone."
  backbone_target = {name[len(prefix) :]: v for name, v in target.items() if name.startswith(prefix)}
  adapter_target = {name: v for name, v in backbone_target.items() if name.split(".")[0] in adapter.ADAPTER_PARTS}
  backbone_target = {name: v for name, v in backbone_target.items() if name not in adapter_target}
  dropped = vim.UNUSED_BACKBONE_PARTS + (("norm_f",) if config.adapter is not None else ())
  unused = sorted(name for name in flat if name.split(".")[0] in dropped)
  norm_bias = lambda name: name.endswith(".bias") and name.split(".")[-2].startswith("norm")
  stacked = lambda name: re.sub(rf"^{vim.LAYERS}\.\d+\.", f"{vim.LAYERS}.", name)  # Blocks one at a time.
  unused += sorted(name for name in flat if norm_bias(name) and stacked(name) not in backbone_target)
  backbone = {name: value for name, value in flat.items() if name not in unused}
  if "pos_embed" in backbone:
    backbone["pos_embed"] = segmenter_backbone_positions(backbone["pos_embed"], config.backbone, config)
  fresh = sorted(name for name in target if not name.startswith(prefix)) + [prefix + name for name in adapter_target]
  for name in backbone_target:
    if norm_bias(name) and name not in {stacked(saved) for saved in backbone}:
      backbone[name] = np.asarray(backbone_target[name])
      fresh.append(prefix + name)
  filled = fill(unflatten(backbone_target), backbone, source=source)
  filled = {prefix + name: value for name, value in flatten(filled).items()}
  if unused:
    _log.info("%s: left out the classifier's %s.", source, ", ".join(unused))

  def part(name: str) -> str:
    # Heads and adapter parts by module, norm biases by name.
    names = name.split(".")
    if names[0] != "backbone":
      return names[0]
    return ".".join(names[:2]) if names[1] in adapter.ADAPTER_PARTS else name

  parts = ", ".join(sorted({part(name) for name in fresh}))
  _log.info("%s: initialized fresh (not in a classifier): %s.", source, parts)
  filled.update({prefix + name: np.asarray(value) for name, value in adapter_target.items()})
  filled.update({name: np.asarray(target[name]) for name in fresh if not name.startswith(prefix)})
  return unflatten(filled), sorted(fresh)


def model_with_params(
  config: vim.VisionMambaConfig | upernet.UperNetConfig,
  params: Mapping,
  model_state: Mapping | None = None,
  *,
  source: str = "the parameters",
  describe=None,
) -> vim.VisionMamba | upernet.UperNet:
  """The model of `config` holding `params` and, for a model with other state (a segmenter's
  BatchNorm statistics), `model_state` (nested or flat dicts), each filled strictly by `fill`.

  Skips the random initialization (for the full-size models tens of seconds of compilation on a
  CPU) by filling an abstract model.
  """
  model = abstract_model(config)
  parts = [(nnx.Param, params)]
  if jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))):
    if model_state is None:
      raise ValueError(f"{source} has no model_state (BatchNorm statistics), which this model needs.")
    parts.append((nnx.Not(nnx.Param), model_state))
  for selector, values in parts:
    if any(isinstance(value, Mapping) for value in values.values()):
      values = flatten(values)
    state = nnx.state(model, selector)
    filled = fill(nnx.to_pure_dict(state), values, source=source, describe=describe)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, filled))
    nnx.update(model, state)
  return model

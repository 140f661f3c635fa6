"""Anchors, their valid flags, box overlaps and the delta box coder of mmdet 3.3.0, with static shapes.

The references: mmdet's `AnchorGenerator` (`grid_priors`, `valid_flags`), `bbox_overlaps` (modes
'iou' and 'iof') and `DeltaXYWHBBoxCoder` (`bbox2delta`, `delta2bbox`). Boxes are (x1, y1, x2, y2)
float32 in input-image pixels; as in mmdet 3.x a box's width is x2 - x1 (no +1) and the anchors of a
feature cell are centred on the cell's top-left corner (`center_offset=0`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from shufflemamba_jax import checks

# mmdet's `wh_ratio_clip` default: decoded widths and heights stay within 1000/16 of the prior's.
WH_RATIO_CLIP = 16 / 1000


def _levels(feature_shapes, strides) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
  """The static (H, W) of every level and its integer stride, checked against each other."""
  if isinstance(feature_shapes, (str, bytes)) or not hasattr(feature_shapes, "__len__") or not len(feature_shapes):
    raise checks.SettingError("feature_shapes", feature_shapes, "must be a sequence of (H, W) pairs of Python ints")
  shapes = tuple(checks.size_pair("feature_shapes", pair) for pair in feature_shapes)
  if isinstance(strides, (str, bytes)) or not hasattr(strides, "__len__") or len(strides) != len(shapes):
    raise checks.SettingError("strides", strides, f"must give one integer stride per level ({len(shapes)} levels)")
  return shapes, tuple(checks.integer("strides", stride) for stride in strides)


def _positive_numbers(setting: str, values) -> np.ndarray:
  if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values):
    raise checks.SettingError(setting, values, "must be a non-empty sequence of positive numbers")
  for value in values:
    if checks.number(setting, value) <= 0:
      raise checks.SettingError(setting, values, "must be a non-empty sequence of positive numbers")
  # float32 as mmdet's torch.Tensor(ratios) and torch.Tensor(scales): the anchors then equal mmdet's bit for bit.
  return np.asarray(values, np.float32)


def num_base_anchors(scales: Sequence[float] = (8,), ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> int:
  """The number A of anchors at every feature cell: one per (ratio, scale) pair."""
  return len(_positive_numbers("scales", scales)) * len(_positive_numbers("ratios", ratios))


def base_anchors(
  base_size: int, scales: Sequence[float] = (8,), ratios: Sequence[float] = (0.5, 1.0, 2.0), center_offset: float = 0.0
) -> np.ndarray:
  """The A anchors of the feature cell at the origin, (A, 4) float32 numpy, mmdet's `gen_single_level_base_anchors`.

  Ratio-major, scale-minor order (mmdet's `scale_major=True`): anchor r * len(scales) + s has ratio
  r and scale s, height base * sqrt(ratio) * scale and width base / sqrt(ratio) * scale, centred on
  (center_offset * base, center_offset * base).
  """
  scales, ratios = _positive_numbers("scales", scales), _positive_numbers("ratios", ratios)
  center_offset = checks.number("center_offset", center_offset, 0.0, 1.0)
  # float32 step by step in mmdet's order, so that no anchor differs from mmdet's in the last bit.
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = (np.float32(base_size) * w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (np.float32(base_size) * h_ratios[:, None] * scales[None, :]).reshape(-1)
  center = np.float32(center_offset * base_size)
  half_w, half_h = np.float32(0.5) * ws, np.float32(0.5) * hs
  return np.stack([center - half_w, center - half_h, center + half_w, center + half_h], axis=-1)


def anchors(
  feature_shapes: Sequence[tuple[int, int]],
  strides: Sequence[int],
  scales: Sequence[float] = (8,),
  ratios: Sequence[float] = (0.5, 1.0, 2.0),
  center_offset: float = 0.0,
) -> np.ndarray:
  """The anchors of all levels, (sum_l H_l * W_l * A, 4) float32 numpy (a trace-time constant).

  mmdet's `AnchorGenerator(strides, ratios, scales).grid_priors(feature_shapes)` concatenated over the
  levels: the base sizes are the strides; within a level the cells run row-major (x fastest, then y)
  and each cell holds its A anchors in `base_anchors` order, shifted by (x * stride, y * stride).
  """
  shapes, strides = _levels(feature_shapes, strides)
  out = []
  for (height, width), stride in zip(shapes, strides):
    base = base_anchors(stride, scales, ratios, center_offset)
    shift_x = np.arange(width, dtype=np.float32) * np.float32(stride)
    shift_y = np.arange(height, dtype=np.float32) * np.float32(stride)
    xx, yy = np.tile(shift_x, height), np.repeat(shift_y, width)
    shifts = np.stack([xx, yy, xx, yy], axis=-1)
    out.append((base[None, :, :] + shifts[:, None, :]).reshape(-1, 4))
  return np.concatenate(out, axis=0)


def valid_flags(
  feature_shapes: Sequence[tuple[int, int]], strides: Sequence[int], num_base: int, pad_shape
) -> jax.Array:
  """Which anchors lie on the feature cells that cover an image's own padded extent, (N,) bool.

  mmdet's `AnchorGenerator.valid_flags`: the cell (y, x) of a level with stride s is valid when
  y < ceil(pad_h / s) and x < ceil(pad_w / s). `pad_shape` is the image's own (pad_h, pad_w), its
  resized size rounded up to the size divisor (32), not the batch's padded size: anchors on the batch
  padding beyond it are left out of the RPN's assignment and sampling (with `allowed_border=-1` these
  flags are the only anchors mmdet leaves out). `pad_shape` may be traced (two integers, int32);
  `num_base` is A.
  """
  shapes, strides = _levels(feature_shapes, strides)
  num_base = checks.integer("num_base", num_base)
  pad_shape = jnp.asarray(pad_shape)
  if pad_shape.shape != (2,) or not jnp.issubdtype(pad_shape.dtype, jnp.integer):
    raise checks.SettingError("pad_shape", pad_shape, "must be two integers, (pad_h, pad_w)")
  pad_shape = pad_shape.astype(jnp.int32)
  out = []
  for (height, width), stride in zip(shapes, strides):
    # Integer ceiling division: exact on every backend (a float division on TPU is not correctly rounded).
    valid_h, valid_w = (pad_shape[0] + stride - 1) // stride, (pad_shape[1] + stride - 1) // stride
    rows = np.repeat(np.arange(height, dtype=np.int32), width * num_base)
    cols = np.tile(np.repeat(np.arange(width, dtype=np.int32), num_base), height)
    out.append((rows < valid_h) & (cols < valid_w))
  return jnp.concatenate(out)


def _check_boxes(name: str, boxes: jax.Array) -> jax.Array:
  boxes = jnp.asarray(boxes)
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise checks.SettingError(f"{name}.shape", boxes.shape, "must end in 4, (x1, y1, x2, y2)")
  return boxes.astype(jnp.float32)


def _area(boxes: jax.Array) -> jax.Array:
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection(a: jax.Array, b: jax.Array) -> jax.Array:
  lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  return wh[..., 0] * wh[..., 1]


def box_iou(a: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Pairwise intersection over union, mmdet's `bbox_overlaps(a, b, mode='iou')`.

  a: (..., N, 4), b: (..., M, 4) -> (..., N, M) float32. Areas are (x2 - x1) * (y2 - y1) with no
  +1, the union is floored at `eps`, so degenerate (zero-area) boxes have IoU 0 with everything.
  """
  a, b = _check_boxes("a", a), _check_boxes("b", b)
  overlap = _intersection(a, b)
  union = _area(a)[..., :, None] + _area(b)[..., None, :] - overlap
  return overlap / jnp.maximum(union, eps)


def box_iof(a: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Pairwise intersection over the first box's area, mmdet's `bbox_overlaps(a, b, mode='iof')`.

  a: (..., N, 4), b: (..., M, 4) -> (..., N, M) float32, the area of `a` floored at `eps`.
  """
  a, b = _check_boxes("a", a), _check_boxes("b", b)
  return _intersection(a, b) / jnp.maximum(_area(a)[..., :, None], eps)


def _four(setting: str, values) -> tuple[float, ...]:
  if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != 4:
    raise checks.SettingError(setting, values, "must be four numbers, for (dx, dy, dw, dh)")
  return tuple(checks.number(setting, v, -math.inf) for v in values)


def encode_deltas(
  proposals: jax.Array,
  gt: jax.Array,
  means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
  stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> jax.Array:
  """The regression targets that take `proposals` to `gt`, mmdet's `bbox2delta` (DeltaXYWHBBoxCoder.encode).

  proposals, gt: (..., 4) of the same shape -> (..., 4) float32 (dx, dy, dw, dh):
  ((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph)), then minus `means`, over `stds`.
  The RPN codes with stds (1, 1, 1, 1), the box head with (0.1, 0.1, 0.2, 0.2).
  """
  proposals, gt = _check_boxes("proposals", proposals), _check_boxes("gt", gt)
  if proposals.shape != gt.shape:
    raise checks.SettingError("gt.shape", gt.shape, f"must equal proposals.shape {proposals.shape}")
  means, stds = jnp.asarray(_four("means", means), jnp.float32), jnp.asarray(_four("stds", stds), jnp.float32)
  pxy, pwh = (proposals[..., :2] + proposals[..., 2:]) * 0.5, proposals[..., 2:] - proposals[..., :2]
  gxy, gwh = (gt[..., :2] + gt[..., 2:]) * 0.5, gt[..., 2:] - gt[..., :2]
  deltas = jnp.concatenate([(gxy - pxy) / pwh, jnp.log(gwh / pwh)], axis=-1)
  return (deltas - means) / stds


def decode_deltas(
  rois: jax.Array,
  deltas: jax.Array,
  means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
  stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
  max_shape=None,
  wh_ratio_clip: float = WH_RATIO_CLIP,
  clip_border: bool = True,
  add_ctr_clamp: bool = False,
  ctr_clamp: float = 32,
) -> jax.Array:
  """The boxes that `deltas` make of `rois`, mmdet's `delta2bbox` (DeltaXYWHBBoxCoder.decode).

  rois: (..., 4); deltas: (..., 4 * C) (C = 1, or one box per class as the box head's) -> (..., 4 * C)
  float32. The deltas are de-normalised (times `stds`, plus `means`); dw, dh are clamped to
  +-|log(wh_ratio_clip)| (with `add_ctr_clamp`: the centre shift in pixels to +-ctr_clamp and dw, dh
  only from above); with `clip_border` and `max_shape` (h, w), which may be traced, x is clipped to
  [0, w] and y to [0, h].
  """
  rois, deltas = _check_boxes("rois", rois), jnp.asarray(deltas, jnp.float32)
  if deltas.ndim < 1 or deltas.shape[-1] % 4 or deltas.shape[-1] == 0:
    raise checks.SettingError("deltas.shape", deltas.shape, "must end in a positive multiple of 4")
  wh_ratio_clip = checks.number("wh_ratio_clip", wh_ratio_clip, 0.0, 1.0)
  if wh_ratio_clip == 0:
    raise checks.SettingError("wh_ratio_clip", wh_ratio_clip, "must be > 0")
  means, stds = jnp.asarray(_four("means", means), jnp.float32), jnp.asarray(_four("stds", stds), jnp.float32)
  classes = deltas.shape[-1] // 4
  d = deltas.reshape(*deltas.shape[:-1], classes, 4) * stds + means
  rois = rois[..., None, :]
  pxy, pwh = (rois[..., :2] + rois[..., 2:]) * 0.5, rois[..., 2:] - rois[..., :2]
  dxy_wh, dwh = pwh * d[..., :2], d[..., 2:]
  max_ratio = abs(math.log(wh_ratio_clip))
  if add_ctr_clamp:
    dxy_wh = jnp.clip(dxy_wh, -ctr_clamp, ctr_clamp)
    dwh = jnp.minimum(dwh, max_ratio)
  else:
    dwh = jnp.clip(dwh, -max_ratio, max_ratio)
  gxy, gwh = pxy + dxy_wh, pwh * jnp.exp(dwh)
  boxes = jnp.concatenate([gxy - gwh * 0.5, gxy + gwh * 0.5], axis=-1)
  if clip_border and max_shape is not None:
    max_shape = jnp.asarray(max_shape)
    if max_shape.shape != (2,):
      raise checks.SettingError("max_shape", max_shape, "must be two numbers, (h, w)")
    limit = jnp.stack([max_shape[1], max_shape[0], max_shape[1], max_shape[0]]).astype(jnp.float32)
    boxes = jnp.minimum(jnp.maximum(boxes, 0.0), limit)
  return boxes.reshape(deltas.shape)

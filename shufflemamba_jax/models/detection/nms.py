"""Non-maximum suppression with static shapes: torchvision's greedy NMS as tiled XLA code for TPU.

Greedy NMS (torchvision.ops.nms, mmcv.ops.nms with offset 0): visit the boxes by decreasing score;
a box is kept unless a KEPT box before it overlaps it with IoU > iou_threshold (strictly), where
IoU = inter / (area1 + area2 - inter) and area = (x2 - x1) * (y2 - y1) (no +1). A one-box-at-a-time
loop is a long chain of tiny dependent steps on a TPU, so the boxes are sorted once and cut into
tiles of `tile_size` (the design of TensorFlow's `non_max_suppression_padded`):

1. each tile is suppressed by the kept boxes of every earlier tile, one (tile, tile) IoU block per
   earlier tile (they are final by then);
2. the boxes left in the tile suppress each other: keep = alive & ~any_i(keep[i] & overlaps[i, j]
   for i before j), iterated from keep = alive until it stops changing. The greedy keep mask is the
   only fixed point of that map (box j's decision depends only on boxes before it), and the
   iteration reaches it: after n steps the first n boxes are right. So the result is exact; it
   takes as many steps as the longest chain of "A suppresses B, whose removal frees C" in the tile
   (up to tile_size; 1 to 5 on RPN-like proposals, benchmarks/nms.py).

The loop over tiles stops once max_output boxes are kept or the valid boxes run out: greedy NMS
decides a box from the boxes before it alone, so later tiles cannot change the first max_output.

Arithmetic: float32 coordinates, areas and IoU in the kernel's order of operations. An IoU within
float32 rounding of the threshold can fall either way between implementations: torchvision's CPU
kernel compares the float IoU with the double threshold, its GPU kernel and mmcv with a float one, and
XLA on TPU may not round its division correctly.

Order of equal scores: boxes with equal scores are visited lower input index first (a stable sort).
torchvision's and mmcv's CPU kernels sort with `scores.sort(descending=True)`, which does not
promise an order among equal scores (nor does the GPU kernel), so with ties they may keep a
different (equally valid) set; without ties the results are the same.

Results: `indices` (max_output,) int32 into the input, in the order torchvision returns them
(decreasing score), padded with -1 past the kept count, and `mask` (max_output,) bool, True where
`indices` holds a kept box. Gather with the mask: `boxes[indices]` reads the last box at a -1.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

DEFAULT_TILE_SIZE = 512


def nms(
  boxes,
  scores,
  iou_threshold,
  max_output: int,
  *,
  valid=None,
  tile_size: int = DEFAULT_TILE_SIZE,
  pre_nms_top_k: int | None = None,
):
  """torchvision.ops.nms(boxes, scores, iou_threshold)[:max_output], padded to max_output.

  boxes: (N, 4) float (x1, y1, x2, y2); scores: (N,) float; iou_threshold: a float (or a traced
  scalar); valid: optional (N,) bool, False for padding (never kept, never suppresses). Static:
  max_output, tile_size (boxes per suppression tile: 256 or 512 on TPU) and pre_nms_top_k (see
  below). Returns (indices (max_output,) int32, -1 past the kept count; mask (max_output,) bool).

  pre_nms_top_k: only the pre_nms_top_k best-scored valid boxes enter NMS (the cost is quadratic in
  the boxes that do). That is an approximation: exact when at most pre_nms_top_k boxes are valid,
  or when max_output boxes are kept from the top pre_nms_top_k (`mask.all()`), since greedy NMS
  decides each box from the higher-scored ones alone; otherwise boxes past the cut that the full
  NMS would keep are missing (never a box that it would not keep).
  """
  boxes, scores, valid = _check(boxes, scores, valid, None, max_output, tile_size, pre_nms_top_k)
  return _nms(boxes, scores, None, valid, iou_threshold, max_output, tile_size, pre_nms_top_k)


def batched_nms(
  boxes,
  scores,
  labels,
  iou_threshold,
  max_output: int,
  *,
  valid=None,
  tile_size: int = DEFAULT_TILE_SIZE,
  pre_nms_top_k: int | None = None,
):
  """torchvision.ops.batched_nms(boxes, scores, labels, iou_threshold)[:max_output]: NMS within each label.

  As `nms`, with labels (N,) int: a box only suppresses boxes of its own label; the kept boxes of
  all labels come out together by decreasing score. mmdet uses it with level ids as labels for the
  RPN's proposals (mmcv.ops.batched_nms) and with class ids for the detections (multiclass_nms).

  torchvision and mmcv separate the labels by shifting each box by label * (max coordinate + 1) and
  running one NMS; here the IoU test asks for equal labels instead. Both are the same per-label NMS
  for boxes with coordinates >= 0 (the shift only separates labels then); the mask also holds for
  negative coordinates, and has no float32 rounding of coordinates shifted by up to ~1e5. (mmcv runs
  one NMS per label from 10000 boxes on: the same result.)

  mmdet's test-time detections (1000 RoIs x 80 classes = 80000 candidates, valid = score > 0.05,
  max_output 100) want a pre_nms_top_k (a few thousand): the suppression's cost is quadratic in the
  boxes that enter it, while the sort of all N stays cheap.
  """
  boxes, scores, valid = _check(boxes, scores, valid, labels, max_output, tile_size, pre_nms_top_k)
  return _nms(boxes, scores, jnp.asarray(labels, jnp.int32), valid, iou_threshold, max_output, tile_size, pre_nms_top_k)


def _check(boxes, scores, valid, labels, max_output, tile_size, pre_nms_top_k):
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be (N, 4) (x1, y1, x2, y2), got shape {boxes.shape}")
  n = boxes.shape[0]
  if scores.shape != (n,):
    raise ValueError(f"scores must be (N,) = ({n},) like boxes, got shape {scores.shape}")
  if labels is not None and jnp.shape(labels) != (n,):
    raise ValueError(f"labels must be (N,) = ({n},) like boxes, got shape {jnp.shape(labels)}")
  if valid is None:
    valid = jnp.ones((n,), bool)
  valid = jnp.asarray(valid)
  if valid.shape != (n,) or valid.dtype != jnp.bool_:
    raise ValueError(f"valid must be a (N,) = ({n},) bool mask, got {valid.dtype} {valid.shape}")
  for name, value in (("max_output", max_output), ("tile_size", tile_size)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int (static), got {value!r}")
  if pre_nms_top_k is not None and (not isinstance(pre_nms_top_k, int) or pre_nms_top_k < 1):
    raise ValueError(f"pre_nms_top_k must be None or a positive int (static), got {pre_nms_top_k!r}")
  # Coordinates, areas and IoU in float32 (as torchvision's float kernels); scores keep their dtype.
  return boxes.astype(jnp.float32), scores, valid


def _nms(boxes, scores, labels, valid, iou_threshold, max_output, tile_size, pre_nms_top_k):
  n = boxes.shape[0]
  if n == 0:
    return jnp.full((max_output,), -1, jnp.int32), jnp.zeros((max_output,), bool)
  order = _score_order(scores, valid)
  m = n if pre_nms_top_k is None else min(n, pre_nms_top_k)
  order = order[:m]
  tile = min(tile_size, m)
  padded = -(-m // tile) * tile
  pad = lambda x, value: jnp.pad(x, [(0, padded - m)] + [(0, 0)] * (x.ndim - 1), constant_values=value)
  alive = pad(valid[order], False)
  sorted_boxes = pad(boxes[order], 0.0)
  sorted_labels = None if labels is None else pad(labels[order], 0)
  keep = _greedy_sorted(sorted_boxes, sorted_labels, alive, iou_threshold, max_output, tile)
  # The first max_output kept positions, in score order.
  (positions,) = jnp.nonzero(keep, size=max_output, fill_value=padded)
  mask = positions < padded
  indices = jnp.where(mask, pad(order, -1)[jnp.minimum(positions, padded - 1)], -1)
  return indices.astype(jnp.int32), mask


def _score_order(scores, valid):
  """The input indices by decreasing score, equal scores by increasing index, invalid boxes last.

  NaN scores come first among the valid boxes, as in torch's descending sort."""
  group = jnp.where(valid, jnp.where(jnp.isnan(scores), 0, 1), 2).astype(jnp.int32)
  index = lax.iota(jnp.int32, scores.shape[0])
  *_, order = lax.sort((group, -scores, index), num_keys=2, is_stable=True)
  return order


def _greedy_sorted(boxes, labels, alive, iou_threshold, max_output, tile):
  """The greedy keep mask (M,) of boxes (M, 4) sorted by decreasing score, M a multiple of tile.

  alive: (M,) bool, the boxes that may be kept (valid, score order: invalid ones last)."""
  num_tiles = boxes.shape[0] // tile
  coords = boxes.T.reshape(4, num_tiles, tile)  # (x1, y1, x2, y2), tile by tile
  areas = (coords[2] - coords[0]) * (coords[3] - coords[1])
  labels = None if labels is None else labels.reshape(num_tiles, tile)
  alive = alive.reshape(num_tiles, tile)
  num_alive = jnp.sum(alive, dtype=jnp.int32)
  threshold = jnp.asarray(iou_threshold, jnp.float32)

  def overlaps(s, t):
    """(tile, tile) bool: box i of tile s and box j of tile t have IoU > threshold (and one label).

    The arithmetic of torchvision's kernel, in its order: a NaN IoU (0 / 0, two empty boxes) is no overlap."""
    x1s, y1s, x2s, y2s = (c[s][:, None] for c in coords)
    x1t, y1t, x2t, y2t = (c[t][None, :] for c in coords)
    w = jnp.maximum(0.0, jnp.minimum(x2s, x2t) - jnp.maximum(x1s, x1t))
    h = jnp.maximum(0.0, jnp.minimum(y2s, y2t) - jnp.maximum(y1s, y1t))
    inter = w * h
    iou = inter / (areas[s][:, None] + areas[t][None, :] - inter)
    above = iou > threshold
    if labels is not None:
      above &= labels[s][:, None] == labels[t][None, :]
    return above

  before = lax.broadcasted_iota(jnp.int32, (tile, tile), 0) < lax.broadcasted_iota(jnp.int32, (tile, tile), 1)

  def tile_step(state):
    t, keep, count = state

    # Suppression by the kept boxes of the earlier tiles (final already), until nothing is left.
    def by_earlier(carry):
      s, left = carry
      return s + 1, left & ~jnp.any(overlaps(s, t) & keep[s][:, None], axis=0)

    _, left = lax.while_loop(lambda c: (c[0] < t) & jnp.any(c[1]), by_earlier, (jnp.int32(0), alive[t]))
    # Within the tile: iterate keep = left & ~(suppressed by a kept box before it) to its fixed point.
    inside = overlaps(t, t) & before

    def within(carry):
      kept, _ = carry
      new = left & ~jnp.any(inside & kept[:, None], axis=0)
      return new, jnp.any(new != kept)

    kept, _ = lax.while_loop(lambda c: c[1], within, (left, jnp.bool_(True)))
    return t + 1, keep.at[t].set(kept), count + jnp.sum(kept, dtype=jnp.int32)

  def more(state):
    t, _, count = state
    return (t < num_tiles) & (count < max_output) & (t * tile < num_alive)

  keep = jnp.zeros((num_tiles, tile), bool)
  _, keep, _ = lax.while_loop(more, tile_step, (jnp.int32(0), keep, jnp.int32(0)))
  return keep.reshape(-1)


__all__ = ["DEFAULT_TILE_SIZE", "batched_nms", "nms"]

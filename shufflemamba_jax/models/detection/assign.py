"""mmdet 3.3.0's MaxIoUAssigner and RandomSampler with static shapes, and the RPN's anchor targets.

Ground truth is padded to a fixed count G with a validity mask, and the priors (anchors, proposals)
carry one too; padded gts and invalid priors behave exactly as if mmdet had never seen them.

Assignment encoding (int32, one per prior): i >= 0 positive, matched to gt i (an index into the
padded gts); NEGATIVE (-1) background; IGNORED (-2) neither (an IoU between the two thresholds, or
an invalid prior). mmdet's `gt_inds` is i + 1, 0 and -1 respectively.

Crowd boxes (COCO `iscrowd`): mmdet 3.3's `PackDetInputs` moves them into `ignored_instances`, and
with the Mask R-CNN config's `ignore_iof_thr=-1` the assigners never look at those; give crowd gts
`gt_valid=False` here, which leaves them out just the same.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from shufflemamba_jax import checks
from shufflemamba_jax.models.detection.boxes import box_iou, encode_deltas

NEGATIVE = -1
IGNORED = -2


def _thresholds(neg_iou_thr) -> tuple[float, float]:
  """mmdet's `neg_iou_thr` as a [low, high) interval: a number t means [0, t)."""
  if isinstance(neg_iou_thr, (tuple, list)):
    if len(neg_iou_thr) != 2:
      raise checks.SettingError("neg_iou_thr", neg_iou_thr, "must be a number or a (low, high) pair")
    return tuple(checks.number("neg_iou_thr", t, 0.0, 1.0) for t in neg_iou_thr)
  return 0.0, checks.number("neg_iou_thr", neg_iou_thr, 0.0, 1.0)


def max_iou_assign(
  ious: jax.Array,
  gt_valid: jax.Array,
  prior_valid: jax.Array | None = None,
  *,
  pos_iou_thr: float,
  neg_iou_thr,
  min_pos_iou: float = 0.0,
  match_low_quality: bool = True,
  gt_max_assign_all: bool = True,
) -> jax.Array:
  """Each prior's gt, mmdet's `MaxIoUAssigner.assign_wrt_overlaps`, as (N,) int32 (see the module's encoding).

  ious: (G, N) float32, gt by prior (`box_iou(gt_boxes, priors)`); gt_valid: (G,) bool; prior_valid:
  (N,) bool or None (all valid). In mmdet's order: priors whose best IoU lies in [0, neg_iou_thr) (or
  [low, high) for a pair) are negative; those whose best IoU is >= pos_iou_thr go to their best gt
  (the first of equal ones); then, with `match_low_quality`, every gt whose best IoU is >= min_pos_iou
  takes the priors that reach that best IoU (all of them with `gt_max_assign_all`, else the first),
  later gts overriding earlier ones as mmdet's loop over the gts does. No valid gt: every valid prior
  is negative.
  """
  ious = jnp.asarray(ious, jnp.float32)
  if ious.ndim != 2:
    raise checks.SettingError("ious.shape", ious.shape, "must be (num_gts, num_priors)")
  num_gts, num_priors = ious.shape
  gt_valid = jnp.asarray(gt_valid, bool)
  if gt_valid.shape != (num_gts,):
    raise checks.SettingError("gt_valid.shape", gt_valid.shape, f"must be ({num_gts},), one per row of ious")
  if prior_valid is None:
    prior_valid = jnp.ones((num_priors,), bool)
  prior_valid = jnp.asarray(prior_valid, bool)
  if prior_valid.shape != (num_priors,):
    raise checks.SettingError("prior_valid.shape", prior_valid.shape, f"must be ({num_priors},), one per column")
  pos_iou_thr = checks.number("pos_iou_thr", pos_iou_thr, 0.0, 1.0)
  neg_low, neg_high = _thresholds(neg_iou_thr)
  min_pos_iou = checks.number("min_pos_iou", min_pos_iou, 0.0, 1.0)

  # -1 lies below every real IoU (>= 0): a padded gt or an invalid prior never wins a max, never ties
  # with a real best IoU and is never in [low, high).
  exists = gt_valid[:, None] & prior_valid[None, :]
  overlaps = jnp.where(exists, ious, -1.0)
  max_overlaps, argmax_overlaps = overlaps.max(axis=0), jnp.argmax(overlaps, axis=0).astype(jnp.int32)

  assigned = jnp.full((num_priors,), IGNORED, jnp.int32)
  assigned = jnp.where((max_overlaps >= neg_low) & (max_overlaps < neg_high), NEGATIVE, assigned)
  assigned = jnp.where(max_overlaps >= pos_iou_thr, argmax_overlaps, assigned)

  if match_low_quality:
    gt_max = overlaps.max(axis=1)
    takes = gt_valid & (gt_max >= min_pos_iou)
    if gt_max_assign_all:
      hit = exists & (overlaps == gt_max[:, None])
    else:
      hit = jnp.arange(num_priors)[None, :] == jnp.argmax(overlaps, axis=1)[:, None]
    hit = hit & takes[:, None]
    # mmdet loops over the gts in order, each overwriting: the last gt that hits a prior keeps it.
    last = jnp.max(jnp.where(hit, jnp.arange(num_gts, dtype=jnp.int32)[:, None], -1), axis=0)
    assigned = jnp.where(last >= 0, last, assigned)

  assigned = jnp.where(gt_valid.any(), assigned, NEGATIVE)
  return jnp.where(prior_valid, assigned, IGNORED)


def add_gt_as_proposals(
  proposals: jax.Array, assigned: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The gts prepended to the assigned proposals, as mmdet's sampler with `add_gt_as_proposals=True`.

  proposals: (P, 4), assigned: (P,) int32 from `max_iou_assign`, gt_boxes: (G, 4), gt_valid: (G,).
  Returns priors (G + P, 4) and their assignment (G + P,): gt i is a positive of itself, a padded gt
  is IGNORED. As in mmdet 3.3 (`BaseSampler.sample`, `AssignResult.add_gt_`) the gts join after the
  assignment, so they take part in neither the proposals' IoU maxima nor the low-quality matching.
  """
  gt_valid = jnp.asarray(gt_valid, bool)
  self_match = jnp.where(gt_valid, jnp.arange(gt_valid.shape[0], dtype=jnp.int32), IGNORED)
  priors = jnp.concatenate([jnp.asarray(gt_boxes, jnp.float32), jnp.asarray(proposals, jnp.float32)], axis=0)
  return priors, jnp.concatenate([self_match, jnp.asarray(assigned, jnp.int32)])


class Sample(NamedTuple):
  """A fixed-size random sample of priors.

  indices: (num,) int32 into the priors: the sampled positives in increasing order, then the sampled
  negatives in increasing order (mmdet's `pos_inds.unique()`, `neg_inds.unique()`), then padding
  (index 0); valid: (num,) bool, False on the padding; positive: (num,) bool, valid and positive;
  num_pos, num_neg: int32 scalars, the sampled counts.
  """

  indices: jax.Array
  valid: jax.Array
  positive: jax.Array
  num_pos: jax.Array
  num_neg: jax.Array


def random_sample(
  assigned: jax.Array, key: jax.Array, *, num: int, pos_fraction: float, neg_pos_ub: float = -1
) -> Sample:
  """mmdet's `RandomSampler.sample` without its gt proposals (see `add_gt_as_proposals`), static.

  assigned: (N,) int32 from `max_iou_assign`; key: a PRNG key. Takes up to int(num * pos_fraction)
  positives (assigned >= 0) uniformly at random, then up to num - (positives taken) negatives
  (NEGATIVE), fewer with `neg_pos_ub` >= 0 (at most int(neg_pos_ub * max(1, positives taken))).
  Each random choice is a top-k of keyed random 31-bit scores, a uniformly random subset as mmdet's
  `randperm(n)[:k]`, though not the same one. Returns a `Sample`.
  """
  num = checks.integer("num", num)
  pos_fraction = checks.number("pos_fraction", pos_fraction, 0.0, 1.0)
  if neg_pos_ub != -1:
    neg_pos_ub = checks.number("neg_pos_ub", neg_pos_ub)
  assigned = jnp.asarray(assigned, jnp.int32)
  if assigned.ndim != 1:
    raise checks.SettingError("assigned.shape", assigned.shape, "must be (num_priors,)")
  size = assigned.shape[0]
  expected_pos = int(num * pos_fraction)

  scores = (jax.random.bits(key, (size,), jnp.uint32) >> 1).astype(jnp.int32)

  def choose(mask, k):
    k = min(k, size)
    if k == 0:
      return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)
    values, idx = jax.lax.top_k(jnp.where(mask, scores, -1), k)
    return idx.astype(jnp.int32), values >= 0

  pos_idx, pos_ok = choose(assigned >= 0, expected_pos)
  num_pos = pos_ok.sum(dtype=jnp.int32)
  quota = num - num_pos
  if neg_pos_ub >= 0:
    quota = jnp.minimum(quota, jnp.floor(neg_pos_ub * jnp.maximum(num_pos, 1)).astype(jnp.int32))
  neg_idx, neg_ok = choose(assigned == NEGATIVE, num)
  neg_ok = neg_ok & (jnp.arange(neg_idx.shape[0]) < quota)
  num_neg = neg_ok.sum(dtype=jnp.int32)

  # One sort puts the positives, then the negatives, each in increasing index, then the padding.
  idx = jnp.concatenate([pos_idx, neg_idx])
  group = jnp.concatenate([jnp.where(pos_ok, 0, 2), jnp.where(neg_ok, 1, 2)])
  order = jnp.sort(group * size + jnp.where(group < 2, idx, 0))
  if order.shape[0] < num:
    order = jnp.concatenate([order, jnp.full((num - order.shape[0],), 2 * size, order.dtype)])
  order = order[:num]
  group = order // size
  return Sample(
    indices=jnp.where(group < 2, order % size, 0).astype(jnp.int32),
    valid=group < 2,
    positive=group == 0,
    num_pos=num_pos,
    num_neg=num_neg,
  )


class RoiSample(NamedTuple):
  """The second stage's sampled RoIs.

  rois: (num, 4) float32; indices: (num,) int32, the RoIs' places in [gts, proposals] (with
  `add_gt`, else in the proposals; below G: a gt itself); gt_index: (num,) int32, the matched gt of a
  positive, -1 elsewhere; positive, valid: (num,) bool; num_pos, num_neg: int32 scalars.
  """

  rois: jax.Array
  indices: jax.Array
  gt_index: jax.Array
  positive: jax.Array
  valid: jax.Array
  num_pos: jax.Array
  num_neg: jax.Array


def rcnn_sample(
  proposals: jax.Array,
  proposal_valid: jax.Array,
  gt_boxes: jax.Array,
  gt_valid: jax.Array,
  key: jax.Array,
  *,
  pos_iou_thr: float = 0.5,
  neg_iou_thr=0.5,
  min_pos_iou: float = 0.5,
  match_low_quality: bool = True,
  num: int = 512,
  pos_fraction: float = 0.25,
  neg_pos_ub: float = -1,
  add_gt: bool = True,
) -> RoiSample:
  """The RoIs of `StandardRoIHead.loss`: assign the proposals, add the gts, sample, static.

  proposals: (P, 4), proposal_valid: (P,) bool, gt_boxes: (G, 4), gt_valid: (G,) bool. Defaults are
  the Mask R-CNN config's `train_cfg.rcnn`. Returns a `RoiSample` of `num` RoIs in mmdet's order
  (positives then negatives, each by increasing index among [gts, proposals]).
  """
  gt_boxes, proposals = jnp.asarray(gt_boxes, jnp.float32), jnp.asarray(proposals, jnp.float32)
  assigned = max_iou_assign(
    box_iou(gt_boxes, proposals),
    gt_valid,
    proposal_valid,
    pos_iou_thr=pos_iou_thr,
    neg_iou_thr=neg_iou_thr,
    min_pos_iou=min_pos_iou,
    match_low_quality=match_low_quality,
  )
  priors = proposals
  if add_gt:
    priors, assigned = add_gt_as_proposals(proposals, assigned, gt_boxes, gt_valid)
  sample = random_sample(assigned, key, num=num, pos_fraction=pos_fraction, neg_pos_ub=neg_pos_ub)
  return RoiSample(
    rois=priors[sample.indices],
    indices=sample.indices,
    gt_index=jnp.where(sample.positive, assigned[sample.indices], -1),
    positive=sample.positive,
    valid=sample.valid,
    num_pos=sample.num_pos,
    num_neg=sample.num_neg,
  )


class RpnTargets(NamedTuple):
  """The RPN's per-anchor targets of one image, mmdet's `AnchorHead._get_targets_single` (unmapped).

  labels: (N,) int32, 1 at the sampled positives, 0 elsewhere (the objectness target of the sigmoid
  loss; mmdet's labels are 0 there and num_classes=1 elsewhere, the same target); label_weights:
  (N,) float32, 1 at the sampled anchors; bbox_targets: (N, 4) float32, the encoded deltas at the
  sampled positives, 0 elsewhere; bbox_weights: (N, 4) float32, 1 at the sampled positives;
  avg_factor: float32 scalar, max(1, sampled positives) + max(1, sampled negatives) (mmdet's
  `SamplingResult.avg_factor`). Both RPN losses are their weighted sums over the whole batch divided
  by the SUM over the batch's images of avg_factor.
  """

  labels: jax.Array
  label_weights: jax.Array
  bbox_targets: jax.Array
  bbox_weights: jax.Array
  avg_factor: jax.Array


def rpn_targets(
  anchors: jax.Array,
  anchor_valid: jax.Array,
  gt_boxes: jax.Array,
  gt_valid: jax.Array,
  key: jax.Array,
  *,
  pos_iou_thr: float = 0.7,
  neg_iou_thr=0.3,
  min_pos_iou: float = 0.3,
  match_low_quality: bool = True,
  num: int = 256,
  pos_fraction: float = 0.5,
  neg_pos_ub: float = -1,
  means=(0.0, 0.0, 0.0, 0.0),
  stds=(1.0, 1.0, 1.0, 1.0),
) -> RpnTargets:
  """The RPN's targets of one image (vmap over the batch), defaults from the Mask R-CNN config's `train_cfg.rpn`.

  anchors: (N, 4) (`boxes.anchors`); anchor_valid: (N,) bool (`boxes.valid_flags`; with
  `allowed_border=-1` nothing else is left out); gt_boxes: (G, 4) padded, gt_valid: (G,) bool;
  key: a PRNG key. Returns `RpnTargets`.
  """
  anchors, gt_boxes = jnp.asarray(anchors, jnp.float32), jnp.asarray(gt_boxes, jnp.float32)
  assigned = max_iou_assign(
    box_iou(gt_boxes, anchors),
    gt_valid,
    anchor_valid,
    pos_iou_thr=pos_iou_thr,
    neg_iou_thr=neg_iou_thr,
    min_pos_iou=min_pos_iou,
    match_low_quality=match_low_quality,
  )
  sample = random_sample(assigned, key, num=num, pos_fraction=pos_fraction, neg_pos_ub=neg_pos_ub)
  size = anchors.shape[0]
  # Padding slots scatter False onto anchor 0, which `.max` leaves as it is.
  sampled = jnp.zeros((size,), bool).at[sample.indices].max(sample.valid)
  positive = jnp.zeros((size,), bool).at[sample.indices].max(sample.positive)
  # The others are coded against themselves: no log(0) from a degenerate padded gt, even unused.
  matched = jnp.where(positive[:, None], gt_boxes[jnp.maximum(assigned, 0)], anchors)
  deltas = encode_deltas(anchors, matched, means, stds)
  bbox_weights = jnp.broadcast_to(positive[:, None], (size, 4)).astype(jnp.float32)
  return RpnTargets(
    labels=positive.astype(jnp.int32),
    label_weights=sampled.astype(jnp.float32),
    bbox_targets=jnp.where(positive[:, None], deltas, 0.0),
    bbox_weights=bbox_weights,
    avg_factor=(jnp.maximum(sample.num_pos, 1) + jnp.maximum(sample.num_neg, 1)).astype(jnp.float32),
  )

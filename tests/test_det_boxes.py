"""Anchors, overlaps, the delta coder, the MaxIoU assigner, the random sampler and the RPN targets
against float64 PyTorch transcriptions of mmdet 3.3.0 (tests/torch_reference.py) and hand-computed
cases: padded gts and invalid priors, ties, low-quality matches overwriting in gt order, no gt."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflemamba_jax.checks import SettingError
from shufflemamba_jax.models.detection import assign, boxes

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402

R2 = math.sqrt(2.0)


def random_boxes(rng, n, scale=50.0, grid=False):
  """(n, 4) boxes; on a coarse integer grid (many exact IoU ties) with `grid`; some degenerate."""
  if grid:
    xy = rng.integers(0, 6, (n, 2)).astype(np.float64) * 4
    wh = rng.integers(1, 5, (n, 2)).astype(np.float64) * 4
  else:
    xy = rng.uniform(0, scale, (n, 2))
    wh = rng.uniform(1, scale / 2, (n, 2))
  out = np.concatenate([xy, xy + wh], axis=1)
  if not grid and n >= 4:
    out[0, 2] = out[0, 0]  # zero width
    out[1, 2:] = out[1, :2]  # a point
  return out.astype(np.float32)


# ------------------------------------------------------------------------------------------ anchors


def test_anchors_written_out_by_hand():
  """Stride 4, a 2x2 map, scale 8, ratios (0.5, 1, 2): cells row-major (x fastest), the three
  anchors of a cell together, each centred on its cell's top-left corner (centre offset 0)."""
  half = {0.5: (16 * R2, 8 * R2), 1.0: (16.0, 16.0), 2.0: (8 * R2, 16 * R2)}  # (w/2, h/2): h/w = ratio
  expected = []
  for cy, cx in [(0, 0), (0, 4), (4, 0), (4, 4)]:
    for ratio in (0.5, 1.0, 2.0):
      hw, hh = half[ratio]
      expected.append([cx - hw, cy - hh, cx + hw, cy + hh])
  got = boxes.anchors([(2, 2)], [4])
  assert got.dtype == np.float32 and got.shape == (12, 4)
  np.testing.assert_allclose(got, np.array(expected), rtol=0, atol=2e-6)
  # e.g. the second cell's ratio-0.5 anchor, 45.25 wide and 22.63 high, centred on (4, 0):
  np.testing.assert_allclose(got[3], [4 - 22.627417, -11.3137085, 4 + 22.627417, 11.3137085], atol=1e-5)


@pytest.mark.parametrize(
  "scales,ratios,offset", [((8,), (0.5, 1.0, 2.0), 0.0), ((4, 6), (0.5, 2.0), 0.5), ((2, 3, 5), (1.0,), 0.25)]
)
def test_anchors_match_mmdet(scales, ratios, offset):
  shapes, strides = [(5, 7), (3, 4)], [8, 16]
  got = boxes.anchors(shapes, strides, scales, ratios, offset)
  want = ref.mmdet_anchors(shapes, strides, scales, ratios, offset).numpy()
  assert got.shape == want.shape == (len(scales) * len(ratios) * 47, 4)
  err = np.abs(got - want).max()
  assert err < 2e-5, err
  # Rounded step by step as mmdet's float32 arithmetic, they agree bit for bit.
  np.testing.assert_array_equal(got, ref.mmdet_anchors(shapes, strides, scales, ratios, offset, torch.float32).numpy())
  assert boxes.num_base_anchors(scales, ratios) == len(scales) * len(ratios)


def test_anchors_rpn_config_count():
  """The Mask R-CNN RPN at a 800 x 1344 padded input: 3 anchors on each cell of the five levels."""
  shapes = [(800 // s, 1344 // s) for s in (4, 8, 16, 32)] + [(13, 21)]
  got = boxes.anchors(shapes, [4, 8, 16, 32, 64])
  assert got.shape == (3 * sum(h * w for h, w in shapes), 4)
  # The last level's last anchor: ratio 2 at cell (x=20, y=12), 512/sqrt(2) wide, 512*sqrt(2) high.
  np.testing.assert_allclose(got[-1], [1280 - 128 * R2, 768 - 256 * R2, 1280 + 128 * R2, 768 + 256 * R2], rtol=1e-6)


def test_valid_flags_match_mmdet():
  shapes, strides = [(10, 12), (5, 6), (3, 3)], [4, 8, 16]
  flags = jax.jit(functools.partial(boxes.valid_flags, shapes, strides, 3))
  for pad in [(40, 48), (32, 20), (37, 9), (1, 48), (64, 64)]:
    got = np.asarray(flags(jnp.asarray(pad, jnp.int32)))
    want = ref.mmdet_valid_flags(shapes, strides, 3, pad).numpy()
    assert got.shape == want.shape and (got == want).all(), pad
  assert not np.asarray(flags(jnp.asarray((37, 9)))).all()
  with pytest.raises(SettingError, match="pad_shape"):
    boxes.valid_flags(shapes, strides, 3, (40.0, 48.0))


# ----------------------------------------------------------------------------------------- overlaps


def test_iou_and_iof_match_mmdet():
  rng = np.random.default_rng(0)
  a, b = random_boxes(rng, 17), random_boxes(rng, 13)
  b[3] = a[5]  # identical
  b[4] = [a[6, 0] + 1, a[6, 1] + 1, a[6, 2] - 1, a[6, 3] - 1]  # inside
  b[5] = [200, 200, 210, 210]  # disjoint
  b[6] = [0, 0, 0, 0]  # a padded gt: all zeros
  iou, iof = jax.jit(boxes.box_iou)(a, b), jax.jit(boxes.box_iof)(a, b)
  want_iou, want_iof = ref.mmdet_bbox_overlaps(a, b).numpy(), ref.mmdet_bbox_overlaps(a, b, "iof").numpy()
  assert iou.dtype == jnp.float32 and iou.shape == (17, 13)
  err_iou, err_iof = np.abs(np.asarray(iou) - want_iou).max(), np.abs(np.asarray(iof) - want_iof).max()
  assert err_iou < 1e-6 and err_iof < 1e-6, (err_iou, err_iof)
  assert iou[5, 3] == pytest.approx(1.0, abs=1e-6) and (np.asarray(iou)[:, 5:7] == 0).all()
  assert (np.asarray(iou)[:2] == 0).all()  # the degenerate boxes overlap nothing
  # Batched: a leading axis broadcasts.
  np.testing.assert_array_equal(boxes.box_iou(a[None], b[None])[0], iou)


# ------------------------------------------------------------------------------------------- coder


def test_encode_matches_mmdet_and_round_trips():
  rng = np.random.default_rng(1)
  props, gts = random_boxes(rng, 30)[2:], random_boxes(rng, 30)[2:]
  for means, stds in [((0, 0, 0, 0), (1, 1, 1, 1)), ((0.1, -0.2, 0.05, 0.0), (0.1, 0.1, 0.2, 0.2))]:
    got = jax.jit(boxes.encode_deltas, static_argnums=(2, 3))(props, gts, means, stds)
    want = ref.mmdet_bbox2delta(props, gts, means, stds).numpy()
    err = np.abs(np.asarray(got) - want).max()
    assert err < 2e-5, err
    back = boxes.decode_deltas(props, got, means, stds, wh_ratio_clip=1e-6)
    np.testing.assert_allclose(back, gts, rtol=0, atol=3e-4)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(),
    dict(max_shape=(40, 60)),
    dict(max_shape=(40, 60), clip_border=False),
    dict(means=(0.1, 0, -0.1, 0.2), stds=(0.1, 0.1, 0.2, 0.2), max_shape=(45, 30)),
    dict(add_ctr_clamp=True, ctr_clamp=5, max_shape=(40, 60)),
    dict(wh_ratio_clip=0.3),
  ],
)
def test_decode_matches_mmdet(kwargs):
  """3 classes of deltas, some beyond the dw/dh clamp (|d| up to 6 > log(1000/16) = 4.14)."""
  rng = np.random.default_rng(2)
  rois = random_boxes(rng, 12)[2:]
  deltas = rng.uniform(-6, 6, (10, 12)).astype(np.float32)
  deltas[:, :2] = rng.uniform(-1, 1, (10, 2))
  got = boxes.decode_deltas(
    rois,
    deltas,
    **{k: v for k, v in kwargs.items() if k != "max_shape"},
    max_shape=None if "max_shape" not in kwargs else jnp.asarray(kwargs["max_shape"]),
  )
  want = ref.mmdet_delta2bbox(rois, deltas, **kwargs).numpy()
  assert got.shape == (10, 12)
  err = np.abs(np.asarray(got) - want).max() / max(1.0, np.abs(want).max())
  assert err < 2e-6, err
  if kwargs.get("max_shape") and kwargs.get("clip_border", True):
    h, w = kwargs["max_shape"]
    assert (got[:, 0::2] >= 0).all() and (got[:, 0::2] <= w).all() and (got[:, 1::2] <= h).all()


# ---------------------------------------------------------------------------------------- assigner

RPN = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
RCNN = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5)


def run_assign(ious, gt_valid=None, prior_valid=None, **cfg):
  ious = np.asarray(ious, np.float32)
  gt_valid = np.ones(ious.shape[0], bool) if gt_valid is None else np.asarray(gt_valid)
  return np.asarray(jax.jit(functools.partial(assign.max_iou_assign, **cfg))(ious, gt_valid, prior_valid))


def to_mmdet(assigned, gt_valid):
  """Our encoding with padded gt indices -> mmdet's gt_inds over the valid gts only."""
  compact = np.cumsum(gt_valid) - 1
  return np.where(assigned >= 0, compact[np.maximum(assigned, 0)] + 1, np.where(assigned == -1, 0, -1))


def test_assign_by_hand_thresholds_ties_and_overwrites():
  ious = [
    # a0    a1    a2    a3    a4    a5
    [0.10, 0.40, 0.90, 0.40, 0.00, 0.35],  # gt0: best 0.9 at a2
    [0.20, 0.10, 0.80, 0.00, 0.25, 0.50],  # gt1: best 0.8 at a2 too
    [0.05, 0.00, 0.00, 0.20, 0.20, 0.00],  # gt2: best 0.2 < min_pos_iou 0.3 at a3, a4 (tie)
  ]
  got = run_assign(ious, **RPN)
  # a0: max 0.2 < 0.3 -> negative. a1: 0.4 in [0.3, 0.7) -> ignored. a2: >= 0.7 with gt0 (first), then
  # gt0's and gt1's low-quality matches both hit it and gt1, the later one, keeps it. a3: max 0.4 ->
  # ignored (gt2's 0.2 is below min_pos_iou). a4: max 0.25 -> negative. a5: 0.5 -> ignored.
  np.testing.assert_array_equal(got, [-1, -2, 1, -2, -1, -2])
  np.testing.assert_array_equal(
    to_mmdet(got, np.ones(3, bool)), ref.mmdet_assign_wrt_overlaps(torch.tensor(ious), **RPN)
  )
  # Without low-quality matching a2 keeps its best gt, gt0.
  np.testing.assert_array_equal(run_assign(ious, match_low_quality=False, **RPN), [-1, -2, 0, -2, -1, -2])

  # gt0's best IoU 0.4 is reached by a1 and a3: both become gt0's (gt_max_assign_all), else only a1.
  ious = [[0.10, 0.40, 0.20, 0.40], [0.00, 0.35, 0.60, 0.10]]
  np.testing.assert_array_equal(run_assign(ious, **RPN), [-1, 0, 1, 0])
  np.testing.assert_array_equal(run_assign(ious, gt_max_assign_all=False, **RPN), [-1, 0, 1, -2])
  # A neg_iou_thr pair (low, high): a0's 0.1 lies below low and is ignored.
  np.testing.assert_array_equal(run_assign(ious, **{**RPN, "neg_iou_thr": (0.15, 0.3)}), [-2, 0, 1, 0])


def test_assign_padded_gts_and_invalid_priors():
  # gt1 is padding (garbage IoUs, even 1.0): it neither matches nor changes the others.
  ious = [[0.10, 0.75, 0.20, 0.40, 0.0], [1.00, 1.00, 1.00, 1.00, 1.0], [0.00, 0.30, 0.35, 0.00, 0.1]]
  gt_valid = np.array([True, False, True])
  got = run_assign(ious, gt_valid, **RPN)
  np.testing.assert_array_equal(got, [-1, 0, 2, -2, -1])
  np.testing.assert_array_equal(
    to_mmdet(got, gt_valid), ref.mmdet_assign_wrt_overlaps(torch.tensor(ious)[[0, 2]], **RPN)
  )
  # a1 invalid (out of the image's valid flags): ignored, and gt0's best becomes a3's 0.4.
  prior_valid = np.array([True, False, True, True, True])
  np.testing.assert_array_equal(run_assign(ious, gt_valid, prior_valid, **RPN), [-1, -2, 2, 0, -1])
  # No valid gt: every valid prior is negative, whatever the IoUs of the padding.
  np.testing.assert_array_equal(run_assign(ious, np.zeros(3, bool), prior_valid, **RPN), [-1, -2, -1, -1, -1])
  np.testing.assert_array_equal(ref.mmdet_assign_wrt_overlaps(torch.zeros(0, 4), **RPN), [0, 0, 0, 0])


@pytest.mark.parametrize("cfg", [RPN, RCNN, dict(RPN, gt_max_assign_all=False), dict(RCNN, match_low_quality=False)])
def test_assign_random_matches_mmdet(cfg):
  """Random gts and priors (half on a coarse grid: many exact ties), padded gts and invalid priors
  interleaved; mmdet sees only the valid ones. One compiled shape for all cases."""
  fn = jax.jit(functools.partial(assign.max_iou_assign, **cfg))
  num_ties = 0
  for seed in range(12):
    rng = np.random.default_rng(seed)
    grid = seed % 2 == 0
    gts, priors = random_boxes(rng, 7, grid=grid), random_boxes(rng, 40, grid=grid)
    gt_valid = rng.random(7) < 0.7
    prior_valid = rng.random(40) < 0.85
    ious = np.asarray(boxes.box_iou(gts, priors))
    got = np.asarray(fn(ious, gt_valid, prior_valid))
    want = ref.mmdet_assign_wrt_overlaps(torch.tensor(ious[gt_valid][:, prior_valid]), **cfg).numpy()
    np.testing.assert_array_equal(to_mmdet(got, gt_valid)[prior_valid], want, err_msg=f"seed {seed}")
    assert (got[~prior_valid] == -2).all()
    valid_ious = ious[gt_valid][:, prior_valid]
    num_ties += int(((valid_ious == valid_ious.max(1, keepdims=True)).sum(1) > 1).sum())
  assert num_ties > 0  # the grid cases did exercise gt_max_assign_all's ties


# ----------------------------------------------------------------------------------------- sampler


def random_assignment(rng, n, num_pos, num_neg, num_gts=4):
  out = np.full(n, -2, np.int32)
  idx = rng.permutation(n)
  out[idx[:num_pos]] = rng.integers(0, num_gts, num_pos)
  out[idx[num_pos : num_pos + num_neg]] = -1
  return out


@pytest.mark.parametrize("num_pos,num_neg,ub", [(3, 100, -1), (40, 100, -1), (30, 5, -1), (0, 50, -1), (3, 100, 2)])
def test_sampler_counts_sets_and_order(num_pos, num_neg, ub):
  rng = np.random.default_rng(num_pos + num_neg)
  assigned = random_assignment(rng, 150, num_pos, num_neg)
  fn = jax.jit(functools.partial(assign.random_sample, num=32, pos_fraction=0.25, neg_pos_ub=ub))
  s = fn(assigned, jax.random.key(3))
  ref_pos, ref_neg = ref.mmdet_random_sample(torch.tensor(to_mmdet(assigned, np.ones(4, bool))), 32, 0.25, ub)
  idx, valid, positive = np.asarray(s.indices), np.asarray(s.valid), np.asarray(s.positive)
  assert int(s.num_pos) == len(ref_pos) == positive.sum() and int(s.num_neg) == len(ref_neg)
  assert valid.sum() == len(ref_pos) + len(ref_neg) and not valid[valid.sum() :].any()
  pos, neg = idx[positive], idx[valid & ~positive]
  assert (assigned[pos] >= 0).all() and (assigned[neg] == -1).all()
  assert (np.diff(pos) > 0).all() and (np.diff(neg) > 0).all()  # each in increasing order, as mmdet's unique()
  assert positive[: len(pos)].all()  # positives first
  assert len(pos) <= 8 and (num_neg < 24 or ub >= 0 or valid.all())
  # Deterministic per key, different for another key.
  s2 = fn(assigned, jax.random.key(3))
  np.testing.assert_array_equal(s2.indices, s.indices)
  if num_neg > 32:
    assert not np.array_equal(fn(assigned, jax.random.key(4)).indices, s.indices)


def test_sampler_is_uniform():
  """Over many keys every eligible positive (and negative) is taken about equally often."""
  rng = np.random.default_rng(5)
  assigned = random_assignment(rng, 60, 10, 30)
  keys = jax.random.split(jax.random.key(0), 3000)
  fn = jax.jit(jax.vmap(lambda k: assign.random_sample(assigned, k, num=12, pos_fraction=0.25)))
  s = fn(keys)
  idx, positive, valid = np.asarray(s.indices), np.asarray(s.positive), np.asarray(s.valid)
  pos_counts = np.bincount(idx[positive], minlength=60)[assigned >= 0] / 3000
  neg_counts = np.bincount(idx[valid & ~positive], minlength=60)[assigned == -1] / 3000
  # 3 of 10 positives (0.3 each), 9 of 30 negatives (0.3 each); binomial sd 0.0084.
  assert np.abs(pos_counts - 0.3).max() < 0.04, pos_counts
  assert np.abs(neg_counts - 0.3).max() < 0.04, neg_counts
  assert (np.asarray(s.num_pos) == 3).all() and (np.asarray(s.num_neg) == 9).all()


# ------------------------------------------------------------------------------------- RPN and RCNN


def test_rpn_targets_match_mmdet():
  shapes, strides = [(8, 10), (4, 5)], [4, 8]
  anchors = boxes.anchors(shapes, strides, scales=(4,))
  # Four gts about the anchors' sizes (12 positives: more than the sampler's 8), two padded slots.
  gts = np.array([[2, 3, 18, 17], [10, 6, 40, 22], [4, 4, 20, 36], [0, 0, 30, 24], [0] * 4, [0] * 4], np.float32)
  gt_valid = np.array([True, True, True, True, False, False])
  pad_shape = np.array([24, 36], np.int32)  # the batch padding beyond it holds invalid anchors

  @jax.jit
  def targets(key):
    valid = boxes.valid_flags(shapes, strides, 3, pad_shape)
    return valid, assign.rpn_targets(anchors, valid, gts, gt_valid, key, num=16, pos_fraction=0.5)

  for seed in range(3):
    valid, t = targets(jax.random.key(seed))
    sampled = np.nonzero(np.asarray(t.label_weights))[0]
    chosen = set(sampled.tolist())

    def choose(gallery, k, chosen=chosen):
      picked = [int(i) for i in gallery if int(i) in chosen]
      assert len(picked) == k, (len(picked), k)
      return torch.tensor(picked)

    labels, label_weights, bbox_targets, bbox_weights, avg = ref.mmdet_anchor_targets(
      anchors, np.array(valid), gts[:4], num=16, pos_fraction=0.5, choose=choose, iou_dtype=torch.float32
    )
    np.testing.assert_array_equal(t.labels, labels.numpy())
    np.testing.assert_array_equal(t.label_weights, label_weights.numpy())
    np.testing.assert_array_equal(t.bbox_weights, bbox_weights.numpy())
    err = np.abs(np.asarray(t.bbox_targets) - bbox_targets.numpy()).max()
    assert err < 2e-5, err
    assert float(t.avg_factor) == avg
  assert labels.sum() == 8 and label_weights.sum() == 16
  assert not np.asarray(t.label_weights)[~np.asarray(valid)].any()


def test_rcnn_sample_adds_gts_after_assignment():
  """Padded gts and proposals interleaved with real ones; mmdet sees [valid gts, valid proposals]."""
  rng = np.random.default_rng(8)
  gts = random_boxes(rng, 7, scale=40.0)[2:]
  gt_valid = np.array([True, False, True, True, False])
  proposals = random_boxes(rng, 50, scale=40.0)
  proposals[10] = gts[2]  # a proposal on a gt
  proposal_valid = rng.random(50) < 0.85
  fn = jax.jit(functools.partial(assign.rcnn_sample, num=24, pos_fraction=0.25))
  s = fn(proposals, proposal_valid, gts, gt_valid, jax.random.key(1))
  # mmdet: assign the valid proposals (float32 IoUs, as ours), then prepend the valid gts as positives of themselves.
  ious = ref.mmdet_bbox_overlaps(gts[gt_valid], proposals[proposal_valid], dtype=torch.float32).double()
  gt_inds = ref.mmdet_assign_wrt_overlaps(ious, **RCNN)
  gt_inds = torch.cat([torch.arange(1, 4), gt_inds]).numpy()
  ref_pos, ref_neg = ref.mmdet_random_sample(torch.tensor(gt_inds), 24, 0.25)
  assert int(s.num_pos) == len(ref_pos) and int(s.num_neg) == len(ref_neg)
  assert np.asarray(s.valid).all() and np.asarray(s.positive).sum() == len(ref_pos) <= 6

  # Our [padded gts, padded proposals] places -> mmdet's [valid gts, valid proposals] places.
  keep = np.concatenate([gt_valid, proposal_valid])
  assert keep[np.asarray(s.indices)].all()  # no padding sampled
  place = (np.cumsum(keep) - 1)[np.asarray(s.indices)]
  positive = np.asarray(s.positive)
  assert (gt_inds[place[positive]] > 0).all() and (gt_inds[place[~positive]] == 0).all()
  compact_gt = np.cumsum(gt_valid) - 1
  np.testing.assert_array_equal(compact_gt[np.asarray(s.gt_index)[positive]] + 1, gt_inds[place[positive]])
  assert (np.asarray(s.gt_index)[~positive] == -1).all()
  # mmdet's order: the positives by place, then the negatives by place.
  assert (
    (np.diff(place[positive]) > 0).all() and (np.diff(place[~positive]) > 0).all() and positive[: len(ref_pos)].all()
  )
  np.testing.assert_array_equal(s.rois, np.concatenate([gts, proposals])[np.asarray(s.indices)])
  # A gt in the sample is a positive of itself.
  is_gt = np.asarray(s.indices) < len(gts)
  assert is_gt.any()
  np.testing.assert_array_equal(np.asarray(s.gt_index)[is_gt], np.asarray(s.indices)[is_gt])


def test_bad_inputs_name_the_argument():
  with pytest.raises(SettingError, match="strides"):
    boxes.anchors([(2, 2), (1, 1)], [4])
  with pytest.raises(SettingError, match="ratios"):
    boxes.anchors([(2, 2)], [4], ratios=(0.5, -1.0))
  with pytest.raises(SettingError, match="gt.shape"):
    boxes.encode_deltas(np.zeros((3, 4)), np.zeros((2, 4)))
  with pytest.raises(SettingError, match="deltas.shape"):
    boxes.decode_deltas(np.zeros((3, 4)), np.zeros((3, 6)))
  with pytest.raises(SettingError, match="gt_valid.shape"):
    assign.max_iou_assign(np.zeros((3, 5)), np.ones(2, bool), pos_iou_thr=0.7, neg_iou_thr=0.3)
  with pytest.raises(SettingError, match="neg_iou_thr"):
    assign.max_iou_assign(np.zeros((3, 5)), np.ones(3, bool), pos_iou_thr=0.7, neg_iou_thr=(0.1, 0.2, 0.3))

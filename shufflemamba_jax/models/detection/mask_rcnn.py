"""Mask R-CNN (mmdet 3.3.0's `mask-rcnn_r50_fpn.py`, the shufflemamba adapter configs) with static shapes.

`MaskRCNN` is a backbone that returns four maps at strides 4 to 32 (the ViT-Adapter, or any
module passed in), the FPN, the RPN head and the box and mask heads. `model.loss(...)` is the
training loss of a batch (all five of mmdet's terms), `model.predict(...)` the test-time
detections; both trace to fixed shapes for a fixed canvas, so one compilation serves every batch.

Ground truth per image is padded to `max_gt` boxes with a validity mask (crowd regions are passed
as invalid: with `ignore_iof_thr=-1` mmdet's assigners never read them). Instance masks come as
box crops: each gt mask resampled (RoIAlign, aligned, adaptive sampling) to `mask_crop_size`
squared over its own box, on the host; the 28x28 targets of a positive RoI are then RoIAlign of
that crop at the RoI's box mapped into the crop, binarized at 0.5. mmdet samples the full-size
mask instead (`BitmapMasks.crop_and_resize`); a gt mask lies inside its box, so the crop loses
only resolution (`crop_masks`; tests/test_det_mask_rcnn.py measures the targets' agreement).

Where static shapes force an approximation of mmdet, it is named where it happens: proposals are
drawn from anchors over the image's own 32-padded extent (mmdet's come from the batch's padded
shape); the test-time per-class NMS sees the `test_pre_nms_top_k` best (RoI, class) candidates
above the score threshold (mmdet: all of them); the mask loss sees the first `max_mask_rois`
positives of each image (at most 512 x 0.25 = 128 exist, the default).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.models.adapter import AdapterConfig, VimAdapter
from shufflemamba_jax.models.detection import assign, boxes, heads, nms, roi_align
from shufflemamba_jax.models.vim import DTYPES, VisionMambaConfig
from shufflemamba_jax.parallel import sharding

RPN_STRIDES = (4, 8, 16, 32, 64)
ROI_STRIDES = (4, 8, 16, 32)
BOX_STDS = (0.1, 0.1, 0.2, 0.2)


@dataclasses.dataclass(frozen=True)
class MaskRCNNConfig:
  """Every setting of a `MaskRCNN`, with mmdet's Mask R-CNN 1x values as defaults.

  `backbone` (VisionMambaConfig) with `adapter`, `pos_embed_size` (the pretraining image size of
  its position table) and `out_indices` (the adapter's stretch ends; None: the last block of each
  quarter) build the ViT-Adapter backbone; None means one is passed to `MaskRCNN` (tests).
  `in_channels` are the backbone maps' widths. The rest are mmdet's config names: `rpn_*` its
  train_cfg.rpn and rpn_proposal, `rcnn_*` train_cfg.rcnn, `test_*` test_cfg.
  """

  num_classes: int = 80
  backbone: VisionMambaConfig | None = None
  adapter: AdapterConfig | None = None
  pos_embed_size: int = 224
  out_indices: tuple[int, ...] | None = None
  in_channels: tuple[int, ...] = (768, 768, 768, 768)
  fpn_channels: int = 256
  fpn_norm: bool = True  # The shufflemamba configs' `norm_cfg=dict(type='SyncBN')` on the FPN.
  fc_channels: int = 1024
  mask_channels: int = 256
  max_gt: int = 100
  mask_crop_size: int = 112
  anchor_scales: tuple[float, ...] = (8.0,)
  anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  rpn_pos_iou: float = 0.7
  rpn_neg_iou: float = 0.3
  rpn_min_pos_iou: float = 0.3
  rpn_num: int = 256
  rpn_pos_fraction: float = 0.5
  rpn_nms_pre: int = 2000
  rpn_max_proposals: int = 1000
  rpn_nms_iou: float = 0.7
  rcnn_pos_iou: float = 0.5
  rcnn_neg_iou: float = 0.5
  rcnn_min_pos_iou: float = 0.5
  rcnn_num: int = 512
  rcnn_pos_fraction: float = 0.25
  max_mask_rois: int = 128
  roi_sampling_ratio: int = 0  # 0: adaptive, ceil(roi / output) samples per bin (mmdet's).
  mask_size: int = 28
  test_nms_pre: int = 1000
  test_max_proposals: int = 1000
  test_score_thr: float = 0.05
  test_nms_iou: float = 0.5
  test_max_detections: int = 100
  test_pre_nms_top_k: int = 4096
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for name in (
      "num_classes fpn_channels fc_channels mask_channels max_gt mask_crop_size rpn_num rpn_nms_pre "
      "rpn_max_proposals rcnn_num max_mask_rois mask_size test_nms_pre test_max_proposals "
      "test_max_detections test_pre_nms_top_k pos_embed_size"
    ).split():
      checks.integer(name, getattr(self, name))
    checks.integer("roi_sampling_ratio", self.roi_sampling_ratio, minimum=0)
    for name in ("rpn_pos_iou", "rpn_neg_iou", "rpn_min_pos_iou", "rcnn_pos_iou", "rcnn_neg_iou", "rcnn_min_pos_iou"):
      checks.number(name, getattr(self, name), 0.0, 1.0)
    for name in ("rpn_pos_fraction", "rcnn_pos_fraction", "rpn_nms_iou", "test_score_thr", "test_nms_iou"):
      checks.number(name, getattr(self, name), 0.0, 1.0)
    if len(self.in_channels) != len(ROI_STRIDES):
      raise checks.SettingError("in_channels", self.in_channels, f"must give the {len(ROI_STRIDES)} maps' widths")
    if self.backbone is not None:
      if self.adapter is None:
        raise checks.SettingError("adapter", None, "must be set with a backbone (the detector's is the ViT-Adapter)")
      self.adapter.check_backbone(self.backbone, self.resolved_out_indices)
      if tuple(self.in_channels) != (self.backbone.embed_dim,) * 4:
        raise checks.SettingError(
          "in_channels", self.in_channels, f"must be the adapter's width {self.backbone.embed_dim} four times"
        )
    for name in ("dtype", "param_dtype"):
      checks.one_of(name, getattr(self, name), DTYPES)

  @property
  def resolved_out_indices(self) -> tuple[int, ...]:
    if self.out_indices is not None:
      return tuple(self.out_indices)
    depth = self.backbone.depth
    return tuple(round((k + 1) * depth / 4) - 1 for k in range(4))

  @property
  def pos_grid(self) -> tuple[int, int]:
    """The backbone's stored position table grid: pos_embed_size / patch_size a side."""
    return (self.pos_embed_size // self.backbone.patch_size,) * 2

  @property
  def num_anchors(self) -> int:
    return boxes.num_base_anchors(self.anchor_scales, self.anchor_ratios)


class Targets(NamedTuple):
  """The padded ground truth of a batch of B images on one canvas.

  boxes: (B, G, 4) float32 x1y1x2y2 canvas pixels; labels: (B, G) int32 in [0, num_classes);
  valid: (B, G) bool (False: padding, or a crowd region); masks: (B, G, S, S) the instance masks
  as box crops (`crop_masks`), any dtype, 1 inside; image_sizes: (B, 2) int32, each image's
  (height, width) on the canvas before padding (mmdet's `img_shape`).
  """

  boxes: jax.Array
  labels: jax.Array
  valid: jax.Array
  masks: jax.Array
  image_sizes: jax.Array


class Detections(NamedTuple):
  """Test-time results of B images: boxes (B, D, 4) float32 canvas pixels, scores (B, D), labels
  (B, D) int32, valid (B, D) bool (a prefix), masks (B, D, 28, 28) float32 probabilities over each
  box (`paste_masks` draws them on the image), D = test_max_detections."""

  boxes: jax.Array
  scores: jax.Array
  labels: jax.Array
  valid: jax.Array
  masks: jax.Array


def per_image(fn, *args):
  """`jax.vmap(fn)(*args)` over the leading (image) axis, each device on its own images.

  The per-image steps (assignment, sampling, top-k, NMS) sort and select along their own axes;
  XLA's partitioner gathers a batch-sharded top-k's whole batch onto every device, so under a
  batch mesh they run in `shard_map`: nothing of the batch crosses devices.
  """
  mesh = sharding.batch_mesh(args[0].shape[0])
  if mesh is None:
    return jax.vmap(fn)(*args)
  spec = jax.P(sharding.BATCH_AXES)
  local = jax.shard_map(jax.vmap(fn), mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)
  return local(*args)


class RoIHead(nnx.Module):
  """mmdet's StandardRoIHead's two heads (`roi_head.bbox_head`, `roi_head.mask_head`)."""

  def __init__(self, config: MaskRCNNConfig, *, rngs: nnx.Rngs):
    kwargs = dict(dtype=DTYPES[config.dtype], param_dtype=DTYPES[config.param_dtype], rngs=rngs)
    self.bbox_head = heads.Shared2FCBBoxHead(config.num_classes, config.fpn_channels, 7, config.fc_channels, **kwargs)
    self.mask_head = heads.FCNMaskHead(config.num_classes, config.fpn_channels, config.mask_channels, **kwargs)


class MaskRCNN(nnx.Module):
  """Mask R-CNN on a multi-scale backbone. Images are (B, H, W, 3), H and W multiples of 32 (as
  mmdet pads them; P6 halves P5 rounding up, as its stride-2 pooling does)."""

  def __init__(self, config: MaskRCNNConfig, *, rngs: nnx.Rngs, backbone: nnx.Module | None = None):
    self.config = config
    if backbone is None:
      if config.backbone is None:
        raise checks.SettingError("backbone", None, "give a backbone module or MaskRCNNConfig.backbone and adapter")
      backbone = VimAdapter(
        config.backbone, config.adapter, pos_grid=config.pos_grid, out_indices=config.resolved_out_indices, rngs=rngs
      )
    self.backbone = backbone
    kwargs = dict(dtype=DTYPES[config.dtype], param_dtype=DTYPES[config.param_dtype], rngs=rngs)
    self.neck = heads.FPN(config.in_channels, config.fpn_channels, norm=config.fpn_norm, **kwargs)
    self.rpn_head = heads.RPNHead(config.fpn_channels, config.num_anchors, **kwargs)
    self.roi_head = RoIHead(config, rngs=rngs)

  # ---- shared pieces ------------------------------------------------------------------------

  def levels(self, images: jax.Array, *, train: bool, key: jax.Array | None) -> list[jax.Array]:
    height, width = images.shape[1:3]
    if height % ROI_STRIDES[-1] or width % ROI_STRIDES[-1]:
      raise ValueError(f"images must be multiples of {ROI_STRIDES[-1]} pixels a side, got {height}x{width}")
    maps = self.backbone(images, train=train, key=key)
    return self.neck([m.astype(DTYPES[self.config.dtype]) for m in maps], train)

  def _anchors(self, levels: list[jax.Array]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    shapes = [tuple(level.shape[1:3]) for level in levels]
    return boxes.anchors(shapes, RPN_STRIDES, self.config.anchor_scales, self.config.anchor_ratios), shapes

  def _anchor_valid(self, shapes, image_sizes: jax.Array) -> jax.Array:
    # mmdet's valid flags: anchors over each image's own size padded to 32 (its pad_shape).
    padded = -(-image_sizes // 32) * 32

    def one(size):
      return boxes.valid_flags(shapes, RPN_STRIDES, self.config.num_anchors, size)

    return per_image(one, padded)

  def _proposals(self, logits, deltas, anchors, anchor_valid, image_sizes, shapes, nms_pre, max_out):
    """RPNHead.predict_by_feat per image: each level's nms_pre best anchors by score, decoded and
    clipped to the image, zero-size boxes dropped, NMS 0.7 over levels apart, max_out kept.
    Returns (boxes (B, max_out, 4), valid (B, max_out)), no gradient (mmdet detaches them)."""
    logits, deltas = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas)
    counts = [h * w * self.config.num_anchors for h, w in shapes]
    starts = np.cumsum([0] + counts[:-1])
    anchors = jnp.asarray(anchors)

    def one(logit, delta, valid, size):
      picked, level_ids = [], []
      for level, (start, count) in enumerate(zip(starts, counts)):
        scores = jnp.where(valid[start : start + count], logit[start : start + count], -jnp.inf)
        _, index = jax.lax.top_k(scores, min(nms_pre, count))
        picked.append(index + start)
        level_ids.append(jnp.full(index.shape, level, jnp.int32))
      picked, level_ids = jnp.concatenate(picked), jnp.concatenate(level_ids)
      scores = jax.nn.sigmoid(logit[picked])
      decoded = boxes.decode_deltas(anchors[picked], delta[picked], max_shape=size)
      ok = valid[picked] & (decoded[:, 2] > decoded[:, 0]) & (decoded[:, 3] > decoded[:, 1])
      keep, kept = nms.batched_nms(decoded, scores, level_ids, self.config.rpn_nms_iou, max_out, valid=ok)
      return decoded[jnp.maximum(keep, 0)], kept

    return per_image(one, logits, deltas, anchor_valid, image_sizes)

  def _pool(self, levels, rois, size, valid):
    return roi_align.multi_level_roi_align(
      levels[: len(ROI_STRIDES)], rois, size, ROI_STRIDES, self.config.roi_sampling_ratio, valid=valid
    )

  # ---- training -----------------------------------------------------------------------------

  def loss(self, images: jax.Array, targets: Targets, *, key: jax.Array) -> tuple[jax.Array, dict]:
    """The training loss of a batch: mmdet's loss_rpn_cls + loss_rpn_bbox + loss_cls + loss_bbox +
    loss_mask (each averaged as mmdet averages it over the batch), and the terms as a dict.

    Runs the backbone and FPN in training mode (drop path, batch statistics: the running ones
    update in place). key: one per step; the RPN's and RCNN's samplers and drop path draw from it.
    """
    config = self.config
    backbone_key, rpn_key, rcnn_key = jax.random.split(key, 3)
    levels = self.levels(images, train=True, key=backbone_key)
    batch = images.shape[0]
    anchors, shapes = self._anchors(levels)
    anchor_valid = self._anchor_valid(shapes, targets.image_sizes)
    logits, deltas = self.rpn_head(levels)

    def rpn_one(valid, gt_boxes, gt_valid, k):
      return assign.rpn_targets(
        jnp.asarray(anchors),
        valid,
        gt_boxes,
        gt_valid,
        k,
        pos_iou_thr=config.rpn_pos_iou,
        neg_iou_thr=config.rpn_neg_iou,
        min_pos_iou=config.rpn_min_pos_iou,
        num=config.rpn_num,
        pos_fraction=config.rpn_pos_fraction,
      )

    rpn = per_image(rpn_one, anchor_valid, targets.boxes, targets.valid, jax.random.split(rpn_key, batch))
    rpn_norm = jnp.maximum(jnp.sum(rpn.avg_factor), 1.0)
    bce = optax.sigmoid_binary_cross_entropy(logits, rpn.labels.astype(jnp.float32))
    loss_rpn_cls = jnp.sum(bce * rpn.label_weights) / rpn_norm
    loss_rpn_bbox = jnp.sum(jnp.abs(deltas - rpn.bbox_targets) * rpn.bbox_weights) / rpn_norm

    proposals, proposal_valid = self._proposals(
      logits, deltas, anchors, anchor_valid, targets.image_sizes, shapes, config.rpn_nms_pre, config.rpn_max_proposals
    )

    def rcnn_one(props, valid, gt_boxes, gt_valid, k):
      return assign.rcnn_sample(
        props,
        valid,
        gt_boxes,
        gt_valid,
        k,
        pos_iou_thr=config.rcnn_pos_iou,
        neg_iou_thr=config.rcnn_neg_iou,
        min_pos_iou=config.rcnn_min_pos_iou,
        num=config.rcnn_num,
        pos_fraction=config.rcnn_pos_fraction,
      )

    sample = per_image(
      rcnn_one, proposals, proposal_valid, targets.boxes, targets.valid, jax.random.split(rcnn_key, batch)
    )
    gt_index = jnp.maximum(sample.gt_index, 0)
    matched_boxes = jnp.take_along_axis(targets.boxes, gt_index[..., None], axis=1)
    matched_labels = jnp.take_along_axis(targets.labels, gt_index, axis=1)
    labels = jnp.where(sample.positive, matched_labels, config.num_classes)

    cls_logits, box_deltas = self.roi_head.bbox_head(self._pool(levels, sample.rois, 7, sample.valid))
    num_sampled = jnp.maximum(jnp.sum(sample.valid), 1)
    log_probs = jax.nn.log_softmax(cls_logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    loss_cls = -jnp.sum(jnp.where(sample.valid, picked, 0.0)) / num_sampled
    box_targets = boxes.encode_deltas(sample.rois, matched_boxes, stds=BOX_STDS)
    class_deltas = jnp.take_along_axis(
      box_deltas, jnp.minimum(labels, config.num_classes - 1)[..., None, None], axis=2
    )[..., 0, :]
    # mmdet divides the positives' L1 by the number of sampled RoIs (bbox_targets.size(0)).
    l1 = jnp.sum(jnp.abs(class_deltas - box_targets), axis=-1)
    loss_bbox = jnp.sum(jnp.where(sample.positive, l1, 0.0)) / num_sampled

    # Positives lead each sample (mmdet's order): the mask head sees the first max_mask_rois.
    k = min(config.max_mask_rois, config.rcnn_num)
    mask_rois, mask_valid = sample.rois[:, :k], sample.positive[:, :k]
    mask_logits = self.roi_head.mask_head(
      self._pool(levels, mask_rois, config.mask_size // 2, mask_valid).reshape(
        batch * k, *(config.mask_size // 2,) * 2, -1
      )
    ).reshape(batch, k, config.mask_size, config.mask_size, config.num_classes)
    mask_logits = jnp.take_along_axis(mask_logits, labels[:, :k, None, None, None], axis=-1)[..., 0]
    crops = jnp.take_along_axis(targets.masks, gt_index[:, :k, None, None], axis=1)
    mask_targets = per_image(
      lambda *a: mask_targets_from_crops(*a, config.mask_size), mask_rois, matched_boxes[:, :k], crops
    )
    bce = optax.sigmoid_binary_cross_entropy(mask_logits.astype(jnp.float32), mask_targets)
    pixels = jnp.maximum(jnp.sum(mask_valid) * config.mask_size**2, 1)
    loss_mask = jnp.sum(jnp.where(mask_valid[..., None, None], bce, 0.0)) / pixels

    terms = dict(
      loss_rpn_cls=loss_rpn_cls,
      loss_rpn_bbox=loss_rpn_bbox,
      loss_cls=loss_cls,
      loss_bbox=loss_bbox,
      loss_mask=loss_mask,
      num_pos=jnp.sum(sample.num_pos).astype(jnp.float32),
      rcnn_accuracy=jnp.sum((jnp.argmax(cls_logits, -1) == labels) & sample.valid) / num_sampled,
    )
    total = loss_rpn_cls + loss_rpn_bbox + loss_cls + loss_bbox + loss_mask
    return total, terms

  # ---- inference ----------------------------------------------------------------------------

  def predict(self, images: jax.Array, image_sizes: jax.Array) -> Detections:
    """Test-time detections (mmdet's test_cfg): proposals (nms_pre 1000, 1000 kept), per-class
    boxes with scores above 0.05, per-class NMS 0.5, the 100 best, and their 28x28 masks."""
    config = self.config
    levels = self.levels(images, train=False, key=None)
    batch = images.shape[0]
    anchors, shapes = self._anchors(levels)
    anchor_valid = self._anchor_valid(shapes, image_sizes)
    logits, deltas = self.rpn_head(levels)
    rois, roi_valid = self._proposals(
      logits, deltas, anchors, anchor_valid, image_sizes, shapes, config.test_nms_pre, config.test_max_proposals
    )
    cls_logits, box_deltas = self.roi_head.bbox_head(self._pool(levels, rois, 7, roi_valid))
    scores = jax.nn.softmax(cls_logits, axis=-1)[..., : config.num_classes]
    num_classes = config.num_classes

    def one(rois, roi_valid, scores, deltas, size):
      decoded = boxes.decode_deltas(rois[:, None, :], deltas, stds=BOX_STDS, max_shape=size)  # (R, C, 4)
      labels = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), scores.shape)
      ok = (scores > config.test_score_thr) & roi_valid[:, None]
      flat = lambda x: x.reshape(-1, *x.shape[2:])
      keep, kept = nms.batched_nms(
        flat(decoded),
        flat(scores),
        flat(labels),
        config.test_nms_iou,
        config.test_max_detections,
        valid=flat(ok),
        pre_nms_top_k=config.test_pre_nms_top_k,
      )
      index = jnp.maximum(keep, 0)
      return flat(decoded)[index], jnp.where(kept, flat(scores)[index], 0.0), flat(labels)[index], kept

    det_boxes, det_scores, det_labels, det_valid = per_image(one, rois, roi_valid, scores, box_deltas, image_sizes)
    d = config.test_max_detections
    mask_logits = self.roi_head.mask_head(
      self._pool(levels, det_boxes, config.mask_size // 2, det_valid).reshape(
        batch * d, *(config.mask_size // 2,) * 2, -1
      )
    ).reshape(batch, d, config.mask_size, config.mask_size, num_classes)
    masks = jax.nn.sigmoid(jnp.take_along_axis(mask_logits, det_labels[..., None, None, None], axis=-1)[..., 0])
    return Detections(det_boxes, det_scores, det_labels, det_valid, masks)


def crop_masks(masks: jax.Array, gt_boxes: jax.Array, size: int) -> jax.Array:
  """Instance masks (G, H, W) -> (G, size, size) float32 box crops: each mask RoIAligned (aligned,
  adaptive sampling, every sample exact) over its own box, as `MaskRCNN.loss` takes them."""
  height, width = masks.shape[1:]
  samples = (math.ceil(height / size), math.ceil(width / size))
  out = roi_align.roi_align(
    masks.astype(jnp.float32)[:, :, :, None],
    jnp.asarray(gt_boxes, jnp.float32)[:, None, :],
    size,
    spatial_scale=1.0,
    sampling_ratio=0,
    max_samples=samples,
  )
  return out[:, 0, :, :, 0]


def mask_targets_from_crops(rois: jax.Array, gt_boxes: jax.Array, crops: jax.Array, size: int) -> jax.Array:
  """The (R, size, size) float32 0/1 mask targets of RoIs (R, 4) from their gts' boxes (R, 4) and
  box crops (R, S, S): RoIAlign (aligned, adaptive) of each crop at the RoI mapped into the crop's
  frame, binarized at 0.5, as mmdet's `mask_target` does on the full mask."""
  crop = crops.shape[-1]
  scale = crop / jnp.maximum(gt_boxes[:, 2:] - gt_boxes[:, :2], 1e-6)  # (R, 2): x, y
  origin = gt_boxes[:, :2]
  mapped = jnp.concatenate([(rois[:, :2] - origin) * scale, (rois[:, 2:] - origin) * scale], axis=-1)
  resized = roi_align.roi_align(
    crops.astype(jnp.float32)[:, :, :, None], mapped[:, None, :], size, spatial_scale=1.0, sampling_ratio=0
  )
  return (resized[:, 0, :, :, 0] >= 0.5).astype(jnp.float32)


def paste_masks(masks: jax.Array, det_boxes: jax.Array, height: int, width: int, threshold: float = 0.5):
  """mmdet's `_do_paste_mask`: (D, m, m) box masks drawn on a (height, width) image, (D, H, W) bool.

  Each image pixel centre inside a box reads its mask bilinearly (grid_sample, align_corners False,
  zero outside), then thresholds.
  """
  m = masks.shape[-1]
  ys = jnp.arange(height, dtype=jnp.float32) + 0.5
  xs = jnp.arange(width, dtype=jnp.float32) + 0.5
  x0, y0, x1, y1 = (det_boxes[:, i, None] for i in range(4))
  # Normalised [-1, 1] over the box, then grid_sample's pixel coordinate in the m x m mask.
  gy = ((ys[None] - y0) / jnp.maximum(y1 - y0, 1e-6) * 2 - 1 + 1) * m / 2 - 0.5  # (D, H)
  gx = ((xs[None] - x0) / jnp.maximum(x1 - x0, 1e-6) * 2 - 1 + 1) * m / 2 - 0.5  # (D, W)

  def weights(g):
    # Bilinear weights of each coordinate on the m taps, zero outside the mask (padding zeros).
    taps = jnp.arange(m, dtype=jnp.float32)
    return jnp.maximum(0.0, 1.0 - jnp.abs(g[..., None] - taps))

  wy, wx = weights(gy), weights(gx)  # (D, H, m), (D, W, m)
  pasted = jnp.einsum("dhi,dij,dwj->dhw", wy, masks.astype(jnp.float32), wx)
  return pasted >= threshold

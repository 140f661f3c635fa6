"""mmdet's COCO instance-segmentation pipeline for one example, in TensorFlow ops, on fixed canvases.

mmdet 3.3.0's `coco_instance.py` train pipeline (the shufflemamba detection configs use it):
Resize(scale=(1333, 800), keep_ratio=True), RandomFlip(0.5), then its data preprocessor pads the
batch to a multiple of 32. Here every image goes on one fixed canvas (`canvas`, height x width,
multiples of 32) with its true size carried along (`image_size`), so that one compiled step serves
every batch: mmdet pads each batch to its largest image instead, and the padding tokens here pass
through the backbone's scan (they are zero after normalization, as mmdet's padding is).

The sizes are mmcv's: the scale factor min(1333 / long side, 800 / short side) and the new size
int(side * factor + 0.5), boxes scaled by new / old per axis (mmdet's `Resize._resize_bboxes`),
flipped as x -> width - x. The image's bilinear resize is TF's (half-pixel centres), cv2's
INTER_LINEAR in mmcv: at most a gray level apart, as in `segment_augment`.

Ground truth is padded to `max_gt` instances with a validity mask; crowd instances are kept but
invalid (mmdet moves them to `ignored_instances`, which its assigners do not read with
`ignore_iof_thr=-1`); instances past `max_gt` are dropped, crowds first. Instance masks become box
crops (`crop_size` squared over each instance's own box, sampled at the crop cells' centres from
the ORIGINAL mask, then flipped with the image), the form `MaskRCNN.loss` reads
(`models/detection/mask_rcnn.py`): a crop does not change when the image is resized.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from shufflemamba_jax import checks
from shufflemamba_jax.data import IMAGENET_MEAN


@dataclasses.dataclass(frozen=True)
class DetectionAugmentation:
  """Settings of the detection pipeline (config `det_aug.*`), with the COCO 1x recipe's values."""

  scale: tuple[int, int] = (1333, 800)  # (long side, short side) limits of the keep-ratio resize.
  canvas: tuple[int, int] = (1344, 1344)  # (height, width): multiples of 32 holding any resized image.
  hflip_prob: float = 0.5
  max_gt: int = 100
  crop_size: int = 112
  fill_color: tuple[int, int, int] = tuple(round(255 * m) for m in IMAGENET_MEAN)

  def __post_init__(self):
    field = lambda name: f"config.det_aug.{name}"
    checks.size_pair(field("scale"), self.scale)
    height, width = checks.size_pair(field("canvas"), self.canvas)
    if height % 32 or width % 32:
      raise checks.SettingError(field("canvas"), self.canvas, "must be multiples of 32 (the detector's coarsest map)")
    long_side, short_side = max(self.scale), min(self.scale)
    if max(height, width) < long_side or min(height, width) < short_side:
      raise checks.SettingError(
        field("canvas"), self.canvas, f"must hold any image resized to fit {self.scale} (long, short)"
      )
    checks.number(field("hflip_prob"), self.hflip_prob, 0.0, 1.0)
    checks.integer(field("max_gt"), self.max_gt)
    checks.integer(field("crop_size"), self.crop_size)


def rescale_size(height, width, scale: tuple[int, int]):
  """mmcv's `rescale_size` for keep_ratio: (new height, new width) int32 and the factor, float32
  in TF (mmcv computes the factor in float64; the sizes agree except at exact .5 ties)."""
  long_limit, short_limit = float(max(scale)), float(min(scale))
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  factor = tf.minimum(long_limit / tf.maximum(h, w), short_limit / tf.minimum(h, w))
  new_h = tf.cast(tf.floor(h * factor + 0.5), tf.int32)
  new_w = tf.cast(tf.floor(w * factor + 0.5), tf.int32)
  return new_h, new_w, factor


def crop_instance_masks(masks: tf.Tensor, boxes: tf.Tensor, size: int) -> tf.Tensor:
  """Instance masks (N, H, W) uint8 0/1 and their pixel boxes (N, 4) x1y1x2y2 -> (N, size, size)
  float32: each mask bilinearly sampled at the centres of a size x size grid of cells tiling its
  own box (pixel i covers [i, i + 1))."""
  height = tf.cast(tf.shape(masks)[1], tf.float32)
  width = tf.cast(tf.shape(masks)[2], tf.float32)
  x1, y1, x2, y2 = tf.unstack(boxes, axis=1)

  # tf.image.crop_and_resize samples y = y1n * (H - 1) + i * (y2n - y1n) * (H - 1) / (size - 1) in
  # pixel-index coordinates; these normalised corners put sample i at the centre of cell i.
  def corners(low, high, extent):
    step = (high - low) / size
    first = low + 0.5 * step - 0.5
    last = low + (size - 0.5) * step - 0.5
    return first / tf.maximum(extent - 1, 1.0), last / tf.maximum(extent - 1, 1.0)

  ny1, ny2 = corners(y1, y2, height)
  nx1, nx2 = corners(x1, x2, width)
  crop_boxes = tf.stack([ny1, nx1, ny2, nx2], axis=1)
  count = tf.shape(masks)[0]
  crops = tf.image.crop_and_resize(
    tf.cast(masks, tf.float32)[..., None], crop_boxes, tf.range(count), (size, size), method="bilinear"
  )
  return crops[..., 0]


def _resize(image, scale: tuple[int, int]):
  """mmdet's Resize(scale, keep_ratio=True) of an (H, W, 3) uint8 image: (resized uint8, its
  scale factor (2,) float32 new / old as (width, height), mmdet's `scale_factor`)."""
  shape = tf.shape(image)
  new_h, new_w, _ = rescale_size(shape[0], shape[1], scale)
  resized = tf.image.resize(image, (new_h, new_w), method="bilinear")
  resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  factor = tf.stack(
    [
      tf.cast(new_w, tf.float32) / tf.cast(shape[1], tf.float32),
      tf.cast(new_h, tf.float32) / tf.cast(shape[0], tf.float32),
    ]
  )
  return resized, factor


def _on_canvas(resized, aug: DetectionAugmentation):
  """The resized image at the top-left of the (ch, cw, 3) canvas, the rest `fill_color`."""
  canvas_h, canvas_w = aug.canvas
  new_h, new_w = tf.shape(resized)[0], tf.shape(resized)[1]
  padding = [[0, canvas_h - new_h], [0, canvas_w - new_w], [0, 0]]
  inside = tf.pad(tf.ones((new_h, new_w, 1), tf.bool), padding)
  canvas = tf.where(inside, tf.pad(resized, padding), tf.constant(aug.fill_color, tf.uint8))
  return tf.ensure_shape(canvas, (canvas_h, canvas_w, 3))


def eval_example(image, augmentation: DetectionAugmentation) -> dict:
  """One evaluation image: mmdet's test pipeline (Resize keeping the ratio, no flip) on the canvas.

  Returns {"image": canvas (ch, cw, 3) uint8; "image_size": (2,) int32 resized (height, width);
  "original_size": (2,) int32 (H, W)} (their ratio is mmdet's scale_factor, which
  `coco_eval.detections_to_coco` divides the boxes by).
  """
  resized, _ = _resize(image, augmentation.scale)
  return {
    "image": _on_canvas(resized, augmentation),
    "image_size": tf.shape(resized)[:2],
    "original_size": tf.shape(image)[:2],
  }


def train_example(image, boxes, labels, is_crowd, masks, seed, augmentation: DetectionAugmentation) -> dict:
  """One training example: mmdet's Resize + RandomFlip, on the canvas, ground truth padded.

  Args:
    image: (H, W, 3) uint8; boxes: (N, 4) float32 x1y1x2y2 in the image's pixels; labels: (N,)
      int; is_crowd: (N,) bool; masks: (N, H, W) uint8 0/1; seed: (2,) int for the flip.

  Returns:
    {"image": canvas (ch, cw, 3) uint8, the image top-left, the rest `fill_color`; "image_size":
    (2,) int32 resized (height, width); "boxes": (max_gt, 4) float32 canvas pixels; "labels":
    (max_gt,) int32; "valid": (max_gt,) bool (False: padding or crowd); "masks": (max_gt, crop,
    crop) uint8 0/1 box crops}.
  """
  aug = augmentation
  resized, scale = _resize(image, aug.scale)
  new_h, new_w = tf.shape(resized)[0], tf.shape(resized)[1]
  boxes = tf.cast(boxes, tf.float32)
  crops = crop_instance_masks(masks, boxes, aug.crop_size)
  boxes = boxes * tf.tile(scale, [2])[None]
  flip = tf.random.stateless_uniform((), seed) < aug.hflip_prob
  width = tf.cast(new_w, tf.float32)
  resized = tf.cond(flip, lambda: tf.reverse(resized, [1]), lambda: resized)
  boxes = tf.cond(
    flip, lambda: tf.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1), lambda: boxes
  )
  crops = tf.cond(flip, lambda: tf.reverse(crops, [2]), lambda: crops)
  canvas = _on_canvas(resized, aug)

  # Non-crowd instances first (stable), so that a cut at max_gt drops crowds first.
  order = tf.argsort(tf.cast(is_crowd, tf.int32), stable=True)
  keep = order[: aug.max_gt]
  count = tf.shape(keep)[0]
  pad = aug.max_gt - count
  gather = lambda x: tf.gather(x, keep)
  valid = tf.logical_not(tf.cast(gather(is_crowd), tf.bool))
  return {
    "image": canvas,
    "image_size": tf.stack([new_h, new_w]),
    "boxes": tf.pad(gather(boxes), [[0, pad], [0, 0]]),
    "labels": tf.pad(tf.cast(gather(labels), tf.int32), [[0, pad]]),
    "valid": tf.pad(valid, [[0, pad]]),
    "masks": tf.pad(tf.cast(gather(crops) >= 0.5, tf.uint8), [[0, pad], [0, 0], [0, 0]]),
  }

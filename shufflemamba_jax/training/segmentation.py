"""Semantic segmentation's loss and metrics: cross-entropy with an ignored label, and mIoU / mAcc /
aAcc from per-class areas summed over the whole dataset (mmseg's `intersect_and_union`).

The areas of a batch are computed inside the jitted evaluation step on the global (sharded)
batch, so they are already summed over every device of every process; the host adds the batches
up in int64 and divides once at the end, so a class's IoU is its total intersection over its
total union, not a mean of per-image ratios.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shufflemamba_jax.data import IGNORE_INDEX
from shufflemamba_jax.models import upernet

AREAS = ("area_intersect", "area_union", "area_pred_label", "area_label")


def cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  *,
  ignore_index: int = IGNORE_INDEX,
  avg_non_ignore: bool = False,
  class_weight: Sequence[float] | None = None,
) -> jax.Array:
  """Per-pixel softmax cross-entropy, the logits first resized (bilinear) to the labels' size.

  Args:
    logits: (batch, h, w, num_classes), any float dtype (computed in float32).
    labels: (batch, H, W) integers; `ignore_index` pixels (and any label outside the classes)
      add nothing.
    avg_non_ignore: False divides by every pixel (mmseg's CrossEntropyLoss default, which the
      reference recipe uses); True by the counted pixels only.
    class_weight: (num_classes,) weights, each pixel's loss multiplied by its label's weight
      before the division (mmseg's `class_weight`, which divides by the pixel count, not by the
      summed weights); None weighs every class 1.

  Returns:
    A float32 scalar.
  """
  logits = upernet.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
  num_classes = logits.shape[-1]
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  if class_weight is not None:
    if len(class_weight) != num_classes:
      raise ValueError(f"class_weight has {len(class_weight)} weights for {num_classes} classes")
    picked = picked * jnp.asarray(class_weight, jnp.float32)[safe_labels]
  total = -jnp.sum(jnp.where(valid, picked, 0.0))
  count = jnp.sum(valid) if avg_non_ignore else valid.size
  return total / jnp.maximum(count, 1)


def segmentation_loss(
  logits: jax.Array, aux_logits: jax.Array, labels: jax.Array, *, aux_weight: float = 0.4, **kwargs
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The decode head's cross-entropy plus `aux_weight` times the auxiliary head's.

  Returns (loss, {"decode_loss", "aux_loss"}), float32 scalars; `kwargs` go to `cross_entropy`.
  """
  decode_loss = cross_entropy(logits, labels, **kwargs)
  aux_loss = cross_entropy(aux_logits, labels, **kwargs)
  return decode_loss + aux_weight * aux_loss, {"decode_loss": decode_loss, "aux_loss": aux_loss}


def train_loss(
  graphdef,
  params,
  rest,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  aux_weight: float = 0.4,
  class_weight: Sequence[float] | None = None,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], object, jax.Array]]:
  """The training loss of a segmenter given as (graphdef, params, rest), for `jax.value_and_grad`.

  images: (batch, H, W, 3) normalized floats; labels: (batch, H, W) integers (255 ignored).
  BatchNorm runs on the batch's own statistics, which under `jit` with a sharded batch are
  those of the whole global batch, and updates its running averages. `class_weight` weighs both
  heads' losses (see `cross_entropy`).

  Returns (loss, ({"decode_loss", "aux_loss"}, the new non-parameter state (running
  statistics), decode logits)).
  """
  # A copy: the model's variables must be created inside this trace to be updated in it.
  model = nnx.merge(graphdef, params, rest, copy=True)
  logits, aux_logits = model.forward(images, train=True, key=key)
  loss, parts = segmentation_loss(logits, aux_logits, labels, aux_weight=aux_weight, class_weight=class_weight)
  return loss, (parts, nnx.state(model, nnx.Not(nnx.Param)), logits)


def predict_logits(
  model: upernet.UperNet,
  images: jax.Array,
  *,
  crop_size: tuple[int, int] | None = None,
  stride: tuple[int, int] | None = None,
) -> jax.Array:
  """Evaluation logits (batch, H, W, num_classes) float32 at the images' resolution: sliding
  windows of `crop_size` every `stride` (mmseg's "slide" mode) or, with crop_size None, the whole
  image at once ("whole" mode)."""
  whole = lambda x: upernet.segment_logits(model, x)
  if crop_size is None:
    return whole(images)
  return upernet.slide_inference(
    whole, images, crop_size=crop_size, stride=stride or crop_size, num_classes=model.config.num_classes
  )


def intersect_and_union(
  predictions: jax.Array,
  labels: jax.Array,
  num_classes: int,
  *,
  ignore_index: int = IGNORE_INDEX,
  mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Per-class pixel areas of a batch, mmseg's `intersect_and_union` summed over the batch.

  Args:
    predictions, labels: (batch, H, W) integers. Pixels labelled `ignore_index` (or outside
      [0, num_classes)) count nowhere.
    mask: (batch,) 1 for real examples and 0 for padding, or None.

  Returns:
    {"area_intersect", "area_union", "area_pred_label", "area_label"}: (num_classes,) int32.
  """
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  if mask is not None:
    valid = valid & (mask.reshape(-1, *([1] * (labels.ndim - 1))) > 0)
  # Uncounted pixels go to an extra bin, num_classes, which is cut off.
  outside = jnp.int32(num_classes)

  def histogram(values, where):
    return jnp.bincount(jnp.where(where, values, outside).reshape(-1), length=num_classes + 1)[:num_classes]

  predictions = jnp.clip(predictions.astype(jnp.int32), 0, num_classes - 1)
  labels = labels.astype(jnp.int32)
  area_intersect = histogram(labels, valid & (predictions == labels))
  area_pred_label = histogram(predictions, valid)
  area_label = histogram(labels, valid)
  return {
    "area_intersect": area_intersect,
    "area_union": area_pred_label + area_label - area_intersect,
    "area_pred_label": area_pred_label,
    "area_label": area_label,
  }


class AreaTotals:
  """Host-side int64 running sums of `intersect_and_union` areas over an evaluation."""

  def __init__(self, num_classes: int):
    self.totals = {name: np.zeros(num_classes, np.int64) for name in AREAS}

  def add(self, areas: Mapping[str, jax.Array]) -> None:
    for name in AREAS:
      self.totals[name] += np.asarray(jax.device_get(areas[name]), np.int64)


def segmentation_metrics(totals: Mapping[str, np.ndarray], class_names: Sequence[str] | None = None) -> dict:
  """mIoU, mAcc and aAcc (fractions in [0, 1]) and per-class IoU / accuracy from summed areas.

  A class absent from both labels and predictions has IoU NaN, one absent from the labels has
  accuracy NaN; the means skip NaNs (mmseg's `nanmean`).

  Returns:
    {"mIoU", "mAcc", "aAcc": floats, "IoU", "Acc": {class name: float}} (names default to "0",
    "1", ...).
  """
  intersect = np.asarray(totals["area_intersect"], np.float64)
  union = np.asarray(totals["area_union"], np.float64)
  label = np.asarray(totals["area_label"], np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = intersect / union
    accuracy = intersect / label
  names = list(class_names) if class_names is not None else [str(c) for c in range(len(iou))]
  if len(names) != len(iou):
    raise ValueError(f"{len(names)} class names for {len(iou)} classes")
  nan_mean = lambda x: float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")
  return {
    "mIoU": nan_mean(iou),
    "mAcc": nan_mean(accuracy),
    "aAcc": float(intersect.sum() / label.sum()) if label.sum() else float("nan"),
    "IoU": dict(zip(names, map(float, iou))),
    "Acc": dict(zip(names, map(float, accuracy))),
  }


def label_colors(num_classes: int) -> np.ndarray:
  """A distinct color per class, (num_classes, 3) uint8: the PASCAL VOC palette (class index
  bits spread over the high bits of R, G and B), whose first colors are far apart."""
  colors = np.zeros((num_classes, 3), np.uint8)
  for index in range(num_classes):
    value, shift = index + 1, 7  # + 1: class 0 is not black, which marks ignored pixels.
    while value:
      for channel in range(3):
        colors[index, channel] |= ((value >> channel) & 1) << shift
      value >>= 3
      shift -= 1
  return colors


def colorize(labels: np.ndarray, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """A label map (H, W) of class indices -> (H, W, 3) uint8 RGB; `ignore_index` pixels are black."""
  labels = np.asarray(labels)
  image = label_colors(num_classes)[np.clip(labels, 0, num_classes - 1)]
  image[labels == ignore_index] = 0
  return image

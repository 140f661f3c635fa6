"""Semantic segmentation: a UperNet on a Vim backbone with mmseg's ADE20K recipe.

The train state carries the BatchNorm statistics (`model_state`); mmseg's warmup + poly
schedule; cross-entropy with an ignored label (decode + auxiliary head). Evaluation sums per-class
areas (mmseg's `intersect_and_union`) over the split and divides once, so a class's IoU is its
total intersection over its total union. `predict` writes colour-coded label maps.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.data import IGNORE_INDEX, device, pipeline
from shufflemamba_jax.models import upernet
from shufflemamba_jax.training import optim, steps
from shufflemamba_jax.training.tasks import base
from shufflemamba_jax.weights import checkpoint as checkpoint_lib
from shufflemamba_jax.weights import params as params_lib

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
    class_weight: (num_classes,) weights, each pixel's loss multiplied by its label's weight,
      and the sum divided by the pixels' summed weights (mmseg 1.x's `class_weight`, PyTorch's
      weighted mean). mmseg 1.2.2 fails on ignored pixels there (issue #3734); here they weigh 1
      in the divisor without avg_non_ignore, as without class weights, and 0 with it. None
      weighs every class 1.

  Returns:
    A float32 scalar.
  """
  logits = upernet.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
  num_classes = logits.shape[-1]
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  count = jnp.sum(valid) if avg_non_ignore else valid.size
  if class_weight is not None:
    if len(class_weight) != num_classes:
      raise ValueError(f"class_weight has {len(class_weight)} weights for {num_classes} classes")
    weights = jnp.where(valid, jnp.asarray(class_weight, jnp.float32)[safe_labels], 0.0)
    picked, count = picked * weights, jnp.sum(weights) + (0 if avg_non_ignore else jnp.sum(~valid))
  total = -jnp.sum(jnp.where(valid, picked, 0.0))
  return total / jnp.maximum(count, jnp.finfo(jnp.float32).tiny)


# UperNetConfig fields set by config.seg.<name>.
_SEGMENTER_FIELDS = (
  "out_indices",
  "pos_embed_size",
  "neck",
  "channels",
  "pool_scales",
  "dropout",
  "aux_channels",
  "aux_level",
)


@dataclasses.dataclass(frozen=True)
class SegmentationTask:
  """The segmentation part of a run (config.seg, configs/segmentation.py documents each field)."""

  segmenter: upernet.UperNetConfig  # For the variant's number of classes until the data is known.
  dataset: str
  aux_weight: float
  class_weight: tuple[float, ...] | None  # One loss weight per class; None = all 1.
  warmup_steps: int
  warmup_factor: float
  poly_power: float
  eval_crop: tuple[int, int] | None  # Sliding-window evaluation; None = the whole image.
  eval_stride: tuple[int, int] | None

  name = "segmentation"
  ranking_metrics = ("miou", "macc", "aacc")

  @classmethod
  def from_config(cls, config) -> SegmentationTask:
    """Checks config.seg (and what segmentation needs of the rest of `config`)."""
    if "seg" not in config:
      raise checks.SettingError(
        "config.seg", None, f"is needed by the segmentation dataset {config.dataset!r} (see configs/segmentation.py)"
      )
    # Nothing of the classification recipe that would be silently ignored; repeated_aug r would
    # put r copies of each example in a batch: 1/r of the data per step.
    base.require_off(config, ("aug.mixup_alpha", "aug.cutmix_alpha", "aug.random_erasing_prob"), cls.name)
    base.require_off(config, ("grad_accum_steps", "aug.repeated_aug"), cls.name, value=1)
    crop = config.seg_aug.crop_size
    if config.image_size != crop:
      raise checks.SettingError(
        "config.image_size", config.image_size, f"must equal the training crop, config.seg_aug.crop_size={crop}"
      )
    seg, backbone = config.seg, base.backbone_config(config)
    fields = {name: seg[name] for name in _SEGMENTER_FIELDS}
    fields = {name: tuple(value) if isinstance(value, (list, tuple)) else value for name, value in fields.items()}
    try:
      segmenter = upernet.UperNetConfig(backbone=backbone, **fields)
    except checks.SettingError as error:
      prefix = "config.seg" if error.setting in _SEGMENTER_FIELDS else "config.model"
      raise checks.SettingError(f"{prefix}.{error.setting}", error.value, error.requirement) from None
    checks.number("config.seg.aux_weight", seg.aux_weight)
    class_weight = seg.class_weight
    if class_weight is not None:
      if not isinstance(class_weight, (list, tuple)) or not class_weight:
        raise checks.SettingError("config.seg.class_weight", class_weight, "must be one weight per class, or None")
      class_weight = tuple(checks.number("config.seg.class_weight", weight) for weight in class_weight)
    checks.integer("config.seg.warmup_steps", seg.warmup_steps, minimum=0)
    checks.number("config.seg.warmup_factor", seg.warmup_factor, 0.0, 1.0)
    checks.number("config.seg.poly_power", seg.poly_power)
    pair = lambda name: None if seg[name] is None else checks.size_pair(f"config.seg.{name}", seg[name])
    windows = {name: pair(name) for name in ("eval_crop", "eval_stride")}
    if windows["eval_stride"] is not None and windows["eval_crop"] is None:
      raise checks.SettingError("config.seg.eval_stride", seg.eval_stride, "needs config.seg.eval_crop")
    if windows["eval_crop"] is not None and min(windows["eval_crop"]) < backbone.patch_size:
      raise checks.SettingError(
        "config.seg.eval_crop", seg.eval_crop, f"must be at least one patch ({backbone.patch_size} pixels) a side"
      )
    pyramid = segmenter.neck == "simple_pyramid"
    if (
      pyramid
      and windows["eval_crop"] is not None
      and any(side % (2 * backbone.patch_size) for side in windows["eval_crop"])
    ):
      raise checks.SettingError(
        "config.seg.eval_crop",
        seg.eval_crop,
        f"must be multiples of {2 * backbone.patch_size} (2 x patch_size) for the simple pyramid",
      )
    scalars = {name: float(seg[name]) for name in ("aux_weight", "warmup_factor", "poly_power")}
    return cls(
      segmenter, config.dataset, class_weight=class_weight, warmup_steps=seg.warmup_steps, **scalars, **windows
    )

  def model_config(self, num_classes: int) -> upernet.UperNetConfig:
    return dataclasses.replace(self.segmenter, num_classes=num_classes)

  def create_model(self, model_config, rngs: nnx.Rngs) -> upernet.UperNet:
    return upernet.UperNet(model_config, rngs=rngs)

  def check_data(self, num_classes: int, dataset: str) -> None:
    """Raises a SettingError if class_weight does not give one weight to each of the dataset's classes."""
    if self.class_weight is not None and len(self.class_weight) != num_classes:
      raise checks.SettingError(
        "config.seg.class_weight",
        self.class_weight,
        f"must give one weight to each of the {num_classes} classes of {dataset}",
      )

  def optimizer(self, settings: optim.OptimizerSettings, *, batch_size: int, epoch_steps: int, total_steps: int):
    """AdamW with the recipe's decay mask; mmseg's linear warmup from warmup_factor x peak, then
    poly decay to 0 at total_steps."""
    del epoch_steps
    try:
      schedule = optim.warmup_poly_schedule(
        settings.peak_lr(batch_size),
        warmup_steps=self.warmup_steps,
        warmup_factor=self.warmup_factor,
        total_steps=total_steps,
        power=self.poly_power,
      )
    except checks.SettingError as error:
      field = "config.seg.warmup_steps" if error.setting == "warmup_steps" else "config.total_steps"
      raise checks.SettingError(field, error.value, error.requirement) from None
    return optim.create_optimizer(settings, schedule, mask=optim.segmentation_weight_decay_mask), schedule

  def warm_start(self, path: str, params: dict, model_config) -> dict:
    """The backbone of a fresh segmenter's `params` from a classifier saved at `path`."""
    saved = checkpoint_lib.read_weights(path, ema=False)
    if saved.is_segmenter:
      raise checks.SettingError(
        "config.init_from", path, "must be a classification checkpoint (a segmenter resumes from its own workdir)"
      )
    filled, _ = params_lib.segmenter_from_classifier(
      params_lib.flatten(saved.params), jax.device_get(params), model_config, source=f"config.init_from={path}"
    )
    return filled

  def make_train_step(self, graphdef, rest, tx, schedule, *, num_classes: int, **common):
    del rest, num_classes  # The BatchNorm statistics travel in the train state.
    return make_train_step(graphdef, tx, schedule, aux_weight=self.aux_weight, class_weight=self.class_weight, **common)

  def eval_sums(self, graphdef, rest, num_classes: int, transform: device.DeviceTransform):
    del rest  # The statistics are the train state's model_state.

    def sums(params, model_state, batch):
      """`intersect_and_union` of the global batch: the areas of the evaluation logits."""
      model = nnx.merge(graphdef, params, model_state)
      images = transform(batch["image"])
      logits = predict_logits(model, images, crop_size=self.eval_crop, stride=self.eval_stride)
      return intersect_and_union(jnp.argmax(logits, axis=-1), batch["label"], num_classes, mask=batch["mask"])

    return sums

  def reduce(self, totals: dict) -> tuple[dict, dict]:
    """{miou, macc, aacc} and {iou: {class name: IoU}} (NaN for a class absent from labels and
    predictions)."""
    result = segmentation_metrics(totals, pipeline.class_names(self.dataset))
    return {name.lower(): result[name] for name in ("mIoU", "mAcc", "aAcc")}, {"iou": result["IoU"]}

  @staticmethod
  def predict(saved, paths: list[str], options) -> int:
    if not options.output_dir:
      raise ValueError(f"{saved.directory} holds a segmenter: --output-dir names where its label maps go")
    return segment_images(saved, paths, options.output_dir)


def make_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  schedule: Callable,
  *,
  seed: int,
  aux_weight: float = 0.4,
  class_weight: tuple[float, ...] | None = None,
  input_transform: device.DeviceTransform = device.IMAGENET,
  ema_decay: float = 0.0,
  donate: bool = True,
  state_shardings=None,
  batch_sharding=None,
):
  """Returns `train_step(state, batch) -> (state, metrics)` for a segmenter, one jitted function.

  batch: {"image": (batch, H, W, 3) uint8, "label": (batch, H, W) integers, 255 ignored}
  (global batch on the leading axis), normalized by `input_transform` on the device. BatchNorm
  uses the statistics of the whole global batch (`jit` over the sharded batch), and its running
  averages go to state["model_state"]. `class_weight` (one weight per class, or None) weighs each pixel's loss by
  its label (`segmentation.cross_entropy`). metrics: float32 scalars loss (decode + aux_weight x
  aux), decode_loss, aux_loss, train_pixel_acc (decode head, non-ignored pixels), grad_norm, lr.
  """

  def loss_fn(params, model_state, images, labels, key):
    # A copy: the model's variables must be created inside this trace to be updated in it.
    model = nnx.merge(graphdef, params, model_state, copy=True)
    logits, aux_logits = model.forward(images, train=True, key=key)
    parts = {
      name: cross_entropy(x, labels, class_weight=class_weight)
      for name, x in (("decode_loss", logits), ("aux_loss", aux_logits))
    }
    loss = parts["decode_loss"] + aux_weight * parts["aux_loss"]
    return loss, (parts, nnx.state(model, nnx.Not(nnx.Param)), logits)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    step = state["step"]
    model_key = jax.random.fold_in(jax.random.key(seed), step)
    images = input_transform(batch["image"])
    labels = batch["label"].astype(jnp.int32)
    (loss, (parts, model_state, logits)), grads = grad_fn(
      state["params"], state["model_state"], images, labels, model_key
    )
    new_params, opt_state, ema, nonfinite_step = steps.apply_gradients(state, grads, loss, tx, ema_decay)
    new_state = dict(
      state,
      step=step + 1,
      params=new_params,
      model_state=nnx.to_pure_dict(model_state),
      opt_state=opt_state,
      ema=ema,
      nonfinite_step=nonfinite_step,
    )
    predictions = jnp.argmax(upernet.resize_bilinear(logits, labels.shape[1:3]), axis=-1)
    valid = labels != IGNORE_INDEX
    metrics = {
      "loss": loss,
      **parts,
      "train_pixel_acc": jnp.sum((predictions == labels) & valid) / jnp.maximum(jnp.sum(valid), 1),
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(step),
    }
    return new_state, metrics

  return steps.jit_train_step(train_step, donate, state_shardings, batch_sharding)


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
    predictions, labels: (batch, H, W) integers. Pixels labelled `ignore_index` count nowhere;
      a label outside [0, num_classes) counts only its pixel's prediction (mmseg's IoUMetric).
    mask: (batch,) 1 for real examples and 0 for padding, or None.

  Returns:
    {"area_intersect", "area_union", "area_pred_label", "area_label"}: (num_classes,) int32.
  """
  # As mmseg's IoUMetric: only `ignore_index` pixels are masked, so a label outside the classes
  # still counts its pixel's prediction (torch.histc drops the label itself).
  counted = labels != ignore_index
  if mask is not None:
    counted = counted & (mask.reshape(-1, *([1] * (labels.ndim - 1))) > 0)
  valid = counted & (labels >= 0) & (labels < num_classes)
  # Uncounted pixels go to an extra bin, num_classes, which is cut off.
  outside = jnp.int32(num_classes)

  def histogram(values, where):
    return jnp.bincount(jnp.where(where, values, outside).reshape(-1), length=num_classes + 1)[:num_classes]

  predictions = jnp.clip(predictions.astype(jnp.int32), 0, num_classes - 1)
  labels = labels.astype(jnp.int32)
  area_intersect = histogram(labels, valid & (predictions == labels))
  area_pred_label = histogram(predictions, counted)
  area_label = histogram(labels, valid)
  return {
    "area_intersect": area_intersect,
    "area_union": area_pred_label + area_label - area_intersect,
    "area_pred_label": area_pred_label,
    "area_label": area_label,
  }


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


# ---- predict ------------------------------------------------------------------------------


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


class Segmenter:
  """Label maps of a UperNet for single uint8 images, as evaluation computes them: one compilation
  for the padded evaluation canvas, and one small one per original image size."""

  def __init__(self, model, transform: device.DeviceTransform, crop_size=None, stride=None):
    self.graphdef, self.state = nnx.split(model)

    def logits(state, image):
      model = nnx.merge(self.graphdef, state)
      return predict_logits(model, transform(image[None]), crop_size=crop_size, stride=stride)[0]

    def labels(logits, size):
      return jnp.argmax(upernet.resize_bilinear(logits[None], size)[0], axis=-1)

    self.logits = jax.jit(logits)
    self.labels = jax.jit(labels, static_argnums=1)

  def __call__(self, canvas: np.ndarray, resized: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """canvas: uint8 (H, W, 3) padded evaluation input whose top-left `resized` (height, width) is
    the image; returns int32 (size) class indices at the original `size` (height, width)."""
    logits = self.logits(self.state, canvas)[: resized[0], : resized[1]]
    return np.asarray(self.labels(logits, tuple(size)))


def segment_images(saved, paths: list[str], output_dir: str) -> int:
  """Writes OUTPUT_DIR/<name>.png, the colour-coded label map of each image; returns the exit code."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for reading images)

  from shufflemamba_jax.data import segment_augment  # pylint: disable=g-import-not-at-top

  run_config = saved.run_config
  seg_aug = {k: tuple(v) if isinstance(v, list) else v for k, v in run_config.get("seg_aug", {}).items()}
  settings = segment_augment.SegmentationAugmentation(**seg_aug)
  seg = run_config.get("seg", {})
  windows = [tuple(seg[name]) if seg.get(name) else None for name in ("eval_crop", "eval_stride")]
  transform = device.DeviceTransform.of_run(run_config)
  model = saved.model()
  segmenter = Segmenter(model, transform, *windows)
  num_classes = model.config.num_classes
  output = epath.Path(output_dir)
  output.mkdir(parents=True, exist_ok=True)
  unreadable = []
  for path in paths:
    try:
      image = tf.io.decode_image(epath.Path(path).read_bytes(), channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
      unreadable.append(path)
      continue
    size = tuple(int(side) for side in image.shape[:2])
    # A blank label map marks where the resized image lies on the padded canvas.
    canvas, mask = segment_augment.eval_pair(image, tf.zeros(size, tf.uint8), settings)
    mask = mask.numpy() != IGNORE_INDEX
    resized = (int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum()))
    labels = segmenter(canvas.numpy(), resized, size)
    target = output / (epath.Path(path).stem + ".png")
    target.write_bytes(tf.io.encode_png(colorize(labels, num_classes)).numpy())
    print(f"{path} -> {target}")
  for path in unreadable:
    print(f"error: cannot read image {path}", file=sys.stderr)
  return 1 if unreadable else 0

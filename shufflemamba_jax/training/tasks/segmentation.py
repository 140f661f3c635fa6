"""Semantic segmentation: a UperNet on a Vim backbone with mmseg's ADE20K recipe.

The train state carries the BatchNorm statistics (`model_state`); mmseg's warmup + poly
schedule; cross-entropy with an ignored label (decode + auxiliary head). Evaluation is mmseg's
(`ImageSegmenter`, `evaluate_split`): each image resized keeping its ratio, unpadded, slid over
by clamped windows (or whole), the logits resized to the original size and scored against the
original label map, optionally with test-time augmentation; the per-class areas (mmseg's
`intersect_and_union`) are summed over the split and divided once, so a class's IoU is its
total intersection over its total union. `predict` writes colour-coded label maps.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.data import IGNORE_INDEX, device, pipeline
from shufflemamba_jax.models import adapter as adapter_lib
from shufflemamba_jax.models import tokens, upernet
from shufflemamba_jax.models.adapter import AdapterConfig
from shufflemamba_jax.parallel import sharding
from shufflemamba_jax.training import optim, steps
from shufflemamba_jax.training.tasks import base

AREAS = ("area_intersect", "area_union", "area_pred_label", "area_label")
# The reference tta_pipeline's `img_ratios` (mmseg's configs/_base_/datasets/ade20k.py).
TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


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
  logits = tokens.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
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
  tta: bool  # mmseg's test-time augmentation: TTA_RATIOS x (no flip, horizontal flip).
  layer_decay: float = 0.0  # The layer-decay constructor's rate; 0 = the recipe's optimizer.

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
    adapter_fields = {field.name for field in dataclasses.fields(AdapterConfig)}
    if not isinstance(seg.adapter.enabled, bool):
      raise checks.SettingError("config.seg.adapter.enabled", seg.adapter.enabled, "must be True or False")
    try:
      adapter = AdapterConfig(**{name: seg.adapter[name] for name in adapter_fields}) if seg.adapter.enabled else None
      segmenter = upernet.UperNetConfig(backbone=backbone, adapter=adapter, **fields)
    except checks.SettingError as error:
      if error.setting in adapter_fields:
        prefix = "config.seg.adapter"
      else:
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
    if (
      segmenter.adapter is not None
      and windows["eval_crop"] is not None
      and any(side % adapter_lib.STRIDES[-1] for side in windows["eval_crop"])
    ):
      raise checks.SettingError(
        "config.seg.eval_crop", seg.eval_crop, f"must be multiples of {adapter_lib.STRIDES[-1]} for the adapter"
      )
    if not isinstance(seg.tta, bool):
      raise checks.SettingError("config.seg.tta", seg.tta, "must be True (mmseg's 6 ratios x 2 flips) or False")
    if seg.layer_decay:
      checks.number("config.seg.layer_decay", seg.layer_decay, 0.0, 1.0)
    scalars = {name: float(seg[name]) for name in ("aux_weight", "warmup_factor", "poly_power", "layer_decay")}
    return cls(
      segmenter,
      config.dataset,
      class_weight=class_weight,
      warmup_steps=seg.warmup_steps,
      tta=seg.tta,
      **scalars,
      **windows,
    )

  @property
  def tta_ratios(self) -> tuple[float, ...] | None:
    """The resize ratios of the evaluation views: TTA_RATIOS with TTA, else None (one view)."""
    return TTA_RATIOS if self.tta else None

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
    if not self.layer_decay:
      return optim.create_optimizer(settings, schedule, mask=optim.segmentation_weight_decay_mask), schedule
    # The layer-decay constructor replaces the recipe's decay rule with its own (see optim).
    return optim.layer_decay_optimizer(settings, schedule, self.layer_decay, self.segmenter.backbone.depth), schedule

  def warm_start(self, path: str, params: dict, model_config) -> dict:
    """The backbone of a fresh segmenter's `params` from a classifier saved at `path`."""
    return base.backbone_from_classifier(path, params, model_config, "segmenter")

  def make_train_step(self, graphdef, rest, tx, schedule, *, num_classes: int, **common):
    del rest, num_classes  # The BatchNorm statistics travel in the train state.
    return make_train_step(graphdef, tx, schedule, aux_weight=self.aux_weight, class_weight=self.class_weight, **common)

  def evaluation(self, config, graphdef, rest, num_classes: int, transform: device.DeviceTransform, mesh, **options):
    """`totals(params, model_state)`: mmseg's evaluation of the split (`evaluate_split`), each
    process scoring its own share image by image, the areas summed over the processes once.

    options: split (default config.eval_split) and image_size, which must be None or
    config.image_size (a label map is evaluated at config.seg_aug.eval_scale).
    """
    del rest  # The statistics are the train state's model_state.
    options.pop("results_dir", None)  # Its numbers are the record: no files to write.
    image_size = options.pop("image_size", None)
    if image_size is not None and image_size != config.image_size:
      raise checks.SettingError(
        "eval_image_size", image_size, "is for classification; a label map is evaluated at config.seg_aug.eval_scale"
      )
    process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    dataset = pipeline.create_segmentation_eval_dataset(config, ratios=self.tta_ratios, **process, **options)
    local_mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("batch",))
    window_fn = model_window_fn(graphdef, transform)
    max_batch = max(config.eval_batch_size // jax.process_count(), 1)

    def totals(params, model_state) -> dict:
      state = local_replica({"params": params, "model_state": model_state}, mesh, local_mesh)
      segmenter = ImageSegmenter(
        functools.partial(window_fn, state["params"], state["model_state"]),
        num_classes,
        crop_size=self.eval_crop,
        stride=self.eval_stride,
        tta=self.tta,
        mesh=local_mesh,
      )
      return sum_over_processes(evaluate_split(segmenter, dataset.as_numpy_iterator(), max_batch=max_batch))

    return totals

  def batch_shapes(self, config, global_batch: int, split: str) -> dict[str, jax.ShapeDtypeStruct]:
    """Training: uint8 crops (batch, crop, crop, 3) and uint8 label maps (batch, crop, crop).
    Evaluation cuts windows of each image instead: `trace_evaluation`."""
    if split != "train":
      raise ValueError(f"a segmentation evaluation batch is a batch of windows (trace_evaluation), not {split!r}")
    crop = config.seg_aug.crop_size
    return {
      "image": jax.ShapeDtypeStruct((global_batch, crop, crop, 3), jnp.uint8),
      "label": jax.ShapeDtypeStruct((global_batch, crop, crop), jnp.uint8),
    }

  def trace_evaluation(self, config, graphdef, rest, num_classes, transform, mesh, params, model_state):
    """The model on one window per device of the first process (`evaluation` scores each
    process's images on its own devices, with the parameters replicated there): eval_crop
    windows, or whole images of config.image_size a side in whole mode (they vary with the image)."""
    del rest, num_classes
    local = [device for device in mesh.devices.flat if device.process_index == mesh.devices.flat[0].process_index]
    local_mesh = jax.sharding.Mesh(np.asarray(local), ("batch",))
    state = sharding.abstract((params, model_state), jax.sharding.NamedSharding(local_mesh, jax.P()))
    height, width = self.eval_crop or (config.image_size, config.image_size)
    windows = jax.ShapeDtypeStruct(
      (len(local), height, width, 3), jnp.uint8, sharding=jax.sharding.NamedSharding(local_mesh, jax.P("batch"))
    )
    return model_window_fn(graphdef, transform).trace(*state, windows)

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
    predictions = jnp.argmax(tokens.resize_bilinear(logits, labels.shape[1:3]), axis=-1)
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


def model_window_fn(graphdef, transform: device.DeviceTransform) -> Callable:
  """`window_fn(*state, windows)`, jitted: uint8 windows (n, h, w, 3) -> logits (n, h, w,
  num_classes) float32 of the model `nnx.merge(graphdef, *state)` (`upernet.segment_logits`: the
  coarse logits resized to each window's full size). It compiles once per window shape."""

  def window_fn(*args):
    *state, windows = args
    return upernet.segment_logits(nnx.merge(graphdef, *state), transform(windows))

  return jax.jit(window_fn)


def local_replica(tree, mesh: jax.sharding.Mesh, local_mesh: jax.sharding.Mesh):
  """`tree` (arrays sharded over `mesh`, e.g. FSDP parameters) whole on every device of
  `local_mesh` (this process's devices): one all-gather that every process runs, after which each
  process evaluates its images alone, with no collective per image."""
  replicated = jax.jit(lambda x: x, out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(tree)
  local = jax.tree.map(lambda x: x.addressable_data(0), replicated)
  return jax.device_put(local, jax.sharding.NamedSharding(local_mesh, jax.P()))


@functools.partial(jax.jit, static_argnames=("count", "size", "window", "starts", "original", "flip", "softmax"))
def _view_scores(window_logits, *, count, size, window, starts, original, flip, softmax):
  """One view's scores at the original size (mmseg's slide merge + `postprocess_result`)."""
  logits = upernet.merge_windows(window_logits[:count], size, window, list(starts))
  if flip:
    # Back to the image's orientation before resizing, as mmseg. A gather, not `[:, :, ::-1]`:
    # XLA's CPU simplifier aborts on that reverse here ("Invalid binary instruction opcode map").
    logits = jnp.take(logits, np.arange(size[1] - 1, -1, -1), axis=2)
  logits = tokens.resize_bilinear(logits, original)
  return jax.nn.softmax(logits, axis=-1) if softmax else logits


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _areas(scores, labels, num_classes):
  return intersect_and_union(jnp.argmax(scores, axis=-1), labels, num_classes)


class ImageSegmenter:
  """mmseg's inference of whole images at any size (EncoderDecoder.slide_inference or whole mode,
  then `postprocess_result`), and with `tta` its SegTTAModel.

  window_fn: uint8 windows (n, h, w, 3) on the device -> float32 logits (n, h, w, num_classes)
  at the windows' own size (`model_window_fn`, or any function: tests pass stubs). It compiles
  per window shape: in slide mode every window of an image whose sides reach the crop is the
  crop, so ADE20K's images share one shape; merging the windows and resizing to the original
  size compile once per (view size, original size), without the model. Windows are cut on the
  host (numpy slices) and, with `mesh` (this process's devices, axis "batch"), split over its
  devices (padded with blank windows to a multiple of them: in evaluation each window is
  computed alone, BatchNorm included, so padding changes nothing).
  """

  def __init__(
    self,
    window_fn: Callable[[jax.Array], jax.Array],
    num_classes: int,
    *,
    crop_size: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    tta: bool = False,
    mesh: jax.sharding.Mesh | None = None,
  ):
    self.window_fn, self.num_classes = window_fn, num_classes
    self.crop_size, self.stride, self.tta = crop_size, stride, tta
    self.devices = 1 if mesh is None else mesh.size
    self.sharding = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.P("batch"))
    self.replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.P())

  def scores(self, views: Sequence[np.ndarray], original: tuple[int, int]) -> jax.Array:
    """Per-pixel scores (batch, *original, num_classes) float32 of a batch of images of one size.

    views: uint8 (batch, h_v, w_v, 3) each, the images resized (one view, or one per TTA ratio).
    Without TTA: the logits of the one view (windows averaged), resized bilinearly
    (align_corners=False) to `original`. With TTA: every view and its horizontal flip, each one's
    logits flipped back, resized to `original` and softmaxed, averaged (SegTTAModel.merge_preds;
    views in its order, ratio outer and flip inner). argmax gives the prediction either way.
    """
    total, parts = None, 0
    for view in views:
      size = tuple(view.shape[1:3])
      window, starts = upernet.window_boxes(size, self.crop_size, self.stride)
      for flip in (False, True) if self.tta else (False,):
        windows = upernet.cut_windows(view[:, :, ::-1] if flip else view, window, starts)
        count = windows.shape[0]
        padding = -count % self.devices
        if padding:
          windows = np.concatenate([windows, np.zeros((padding, *windows.shape[1:]), windows.dtype)])
        logits = self.window_fn(jax.device_put(np.ascontiguousarray(windows), self.sharding))
        part = _view_scores(
          logits,
          count=count,
          size=size,
          window=window,
          starts=tuple(starts),
          original=tuple(original),
          flip=flip,
          softmax=self.tta,
        )
        total, parts = (part if total is None else total + part), parts + 1
    return total / parts if self.tta else total

  def areas(self, scores: jax.Array, labels: np.ndarray) -> dict[str, jax.Array]:
    """`intersect_and_union` of argmax(scores) against uint8 labels (batch, *original) (255 ignored)."""
    return _areas(scores, jax.device_put(labels, self.replicated), self.num_classes)


def evaluate_split(segmenter: ImageSegmenter, examples: Iterable[dict], *, max_batch: int = 1) -> dict:
  """The areas of `examples` (create_segmentation_eval_dataset's elements), summed on the host.

  Each real (mask 1) example is scored at its original label size; consecutive examples whose
  views and labels have the same shapes go through together, up to `max_batch` (the embedded
  digits_seg set: all 400 at once), which computes the same areas as one at a time. Returns
  {area_*: (num_classes,) int64, num_examples: int64}.
  """
  totals = {name: np.zeros(segmenter.num_classes, np.int64) for name in AREAS}
  pending, group, group_key = [], [], None
  num_examples = 0

  def collect(limit: int):
    # Fetched in arrears, so the device keeps working while the host reads the next images.
    while len(pending) > limit:
      for name, value in jax.device_get(pending.pop(0)).items():
        totals[name] += np.asarray(value, np.int64)

  def flush():
    views = [np.stack([example["views"][v] for example in group]) for v in range(len(group[0]["views"]))]
    labels = np.stack([example["label"] for example in group])
    pending.append(segmenter.areas(segmenter.scores(views, labels.shape[1:3]), labels))
    collect(8)

  for example in examples:
    if not example["mask"]:
      continue  # An undecodable image: counted nowhere.
    key = (tuple(view.shape for view in example["views"]), example["label"].shape)
    if group and (key != group_key or len(group) == max_batch):
      flush()
      group = []
    group.append(example)
    group_key = key
    num_examples += 1
  if group:
    flush()
  collect(0)
  return {**totals, "num_examples": np.int64(num_examples)}


def sum_over_processes(totals: dict) -> dict:
  """`totals` (int64 numpy arrays of this process) summed over every process, once per evaluation.

  JAX runs with 32-bit integers here, so each int64 travels as two int32 halves (bits 24 and up,
  and the low 24 bits) and is put back together on the host: exact below 2**55.
  """
  if jax.process_count() == 1:
    return totals
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  halves = {name: (np.asarray(value) >> 24, np.asarray(value) & (2**24 - 1)) for name, value in totals.items()}
  halves = {name: (high.astype(np.int32), low.astype(np.int32)) for name, (high, low) in halves.items()}
  gathered = multihost_utils.process_allgather(halves)
  return {
    name: (np.sum(np.asarray(high, np.int64), axis=0) << 24) + np.sum(np.asarray(low, np.int64), axis=0)
    for name, (high, low) in gathered.items()
  }


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


def segment_images(saved, paths: list[str], output_dir: str) -> int:
  """Writes OUTPUT_DIR/<name>.png, the colour-coded label map of each image at its own size, as
  evaluation predicts it (the run's eval_scale, windows and TTA); returns the exit code."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for reading images)

  from shufflemamba_jax.data import segment_augment  # pylint: disable=g-import-not-at-top

  run_config = saved.run_config
  # Only the fields that exist today: a run saved before seg_aug.eval_canvas was removed names it.
  known = {field.name for field in dataclasses.fields(segment_augment.SegmentationAugmentation)}
  seg_aug = {k: tuple(v) if isinstance(v, list) else v for k, v in run_config.get("seg_aug", {}).items() if k in known}
  settings = segment_augment.SegmentationAugmentation(**seg_aug)
  seg = run_config.get("seg", {})
  crop_size, stride = [tuple(seg[name]) if seg.get(name) else None for name in ("eval_crop", "eval_stride")]
  tta = bool(seg.get("tta", False))
  model = saved.model()
  graphdef, state = nnx.split(model)
  window_fn = functools.partial(model_window_fn(graphdef, device.DeviceTransform.of_run(run_config)), state)
  num_classes = model.config.num_classes
  segmenter = ImageSegmenter(window_fn, num_classes, crop_size=crop_size, stride=stride, tta=tta)
  ratios = TTA_RATIOS if tta else None
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
    views = [view.numpy()[None] for view in segment_augment.eval_views(image, settings.eval_scale, ratios)]
    labels = np.asarray(jnp.argmax(segmenter.scores(views, size), axis=-1))[0]
    target = output / (epath.Path(path).stem + ".png")
    target.write_bytes(tf.io.encode_png(colorize(labels, num_classes)).numpy())
    print(f"{path} -> {target}")
  for path in unreadable:
    print(f"error: cannot read image {path}", file=sys.stderr)
  return 1 if unreadable else 0

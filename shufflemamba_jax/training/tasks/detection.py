"""Object detection and instance segmentation: Mask R-CNN on a ShuffleMamba ViT-Adapter backbone.

mmdet 3.3.0's Mask R-CNN 1x as the reference's detection configs run it (configs/detection.py,
configs/coco.py). The train state carries the BatchNorm statistics (`model_state`: the adapter's
SyncBNs and the FPN's); the loss is `MaskRCNN.loss` (mmdet's five terms); the learning rate is
mmengine's LinearLR warmup then MultiStepLR by epoch, with layer decay. Evaluation is mmdet's
CocoMetric (`training/coco_eval.py`): every process predicts its share of the split in fixed-shape
batches on the canvas, the detections are rescaled to each original image and its masks pasted
there, every process's results are gathered and process 0 runs COCOeval once (box and mask AP),
the numbers going to every process. `predict` draws each image's detections (boxes, class names,
scores, mask overlays) and writes the COCO result JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.data import detect_augment, device, pipeline
from shufflemamba_jax.models.adapter import AdapterConfig
from shufflemamba_jax.models.detection import mask_rcnn
from shufflemamba_jax.parallel import sharding
from shufflemamba_jax.training import coco_eval, optim, steps
from shufflemamba_jax.training.tasks import base

_LOGGER = logging.getLogger(__name__)

# MaskRCNNConfig fields set by config.det.<name> (the rest come from config.model and det_aug).
_DETECTOR_FIELDS = tuple(
  field.name
  for field in dataclasses.fields(mask_rcnn.MaskRCNNConfig)
  if field.name not in ("num_classes", "backbone", "adapter", "in_channels", "max_gt", "mask_crop_size")
  and field.name not in ("dtype", "param_dtype")
)
# The evaluation's metric names: COCOeval's 12 numbers per IoU type, lower case (bbox_map, ...).
METRICS = tuple(name.lower() for iou_type in coco_eval.IOU_TYPES for name in coco_eval.stat_names(iou_type))
_TARGET_FIELDS = ("boxes", "labels", "valid", "masks", "image_sizes")


def targets_of(batch: dict) -> mask_rcnn.Targets:
  """The padded ground truth of a training batch (the detection stream's fields)."""
  return mask_rcnn.Targets(
    boxes=batch["boxes"].astype(jnp.float32),
    labels=batch["labels"].astype(jnp.int32),
    valid=batch["valid"].astype(bool),
    masks=batch["masks"],
    image_sizes=batch["image_size"].astype(jnp.int32),
  )


@dataclasses.dataclass(frozen=True)
class DetectionTask:
  """The detection part of a run (config.det and config.det_aug; configs/detection.py documents
  each field)."""

  detector: mask_rcnn.MaskRCNNConfig  # For the variant's number of classes until the data is known.
  dataset: str
  augmentation: detect_augment.DetectionAugmentation
  warmup_steps: int
  warmup_factor: float
  lr_epochs: tuple[int, ...]
  lr_decay: float
  layer_decay: float

  name = "detection"
  ranking_metrics = METRICS

  @classmethod
  def from_config(cls, config) -> DetectionTask:
    """Checks config.det and config.det_aug (and what detection needs of the rest of `config`)."""
    for block in ("det", "det_aug"):
      if block not in config:
        raise checks.SettingError(
          f"config.{block}", None, f"is needed by the detection dataset {config.dataset!r} (see configs/detection.py)"
        )
    checks.one_of("config.dataset", config.dataset, pipeline.DETECTION_DATASETS)
    base.require_off(config, ("aug.mixup_alpha", "aug.cutmix_alpha", "aug.random_erasing_prob"), cls.name)
    base.require_off(config, ("grad_accum_steps", "aug.repeated_aug"), cls.name, value=1)
    augmentation = pipeline.settings(config)["detection_augmentation"]
    det, backbone = config.det, base.backbone_config(config)
    fields = {name: det[name] for name in _DETECTOR_FIELDS}
    fields = {name: tuple(value) if isinstance(value, (list, tuple)) else value for name, value in fields.items()}
    adapter_fields = {field.name for field in dataclasses.fields(AdapterConfig)}
    unknown = sorted(set(det.adapter) - adapter_fields)
    if unknown:
      raise checks.SettingError(f"config.det.adapter.{unknown[0]}", det.adapter[unknown[0]], "is not a setting")
    try:
      adapter = AdapterConfig(**dict(det.adapter))
      detector = mask_rcnn.MaskRCNNConfig(
        backbone=backbone,
        adapter=adapter,
        in_channels=(backbone.embed_dim,) * 4,
        max_gt=augmentation.max_gt,
        mask_crop_size=augmentation.crop_size,
        dtype=backbone.dtype,
        param_dtype=backbone.param_dtype,
        **fields,
      )
    except checks.SettingError as error:
      if error.setting in adapter_fields:
        prefix = "config.det.adapter"
      else:
        prefix = "config.det" if error.setting in _DETECTOR_FIELDS else "config.model"
      raise checks.SettingError(f"{prefix}.{error.setting}", error.value, error.requirement) from None
    checks.integer("config.det.warmup_steps", det.warmup_steps, minimum=0)
    checks.number("config.det.warmup_factor", det.warmup_factor, 0.0, 1.0)
    lr_epochs = det.lr_epochs
    if not isinstance(lr_epochs, (list, tuple)):
      raise checks.SettingError("config.det.lr_epochs", lr_epochs, "must be a tuple of epochs, e.g. (8, 11)")
    lr_epochs = tuple(checks.integer("config.det.lr_epochs", epoch) for epoch in lr_epochs)
    if list(lr_epochs) != sorted(set(lr_epochs)):
      raise checks.SettingError("config.det.lr_epochs", det.lr_epochs, "must be increasing")
    checks.number("config.det.lr_decay", det.lr_decay, 0.0, 1.0)
    if det.layer_decay:
      checks.number("config.det.layer_decay", det.layer_decay, 0.0, 1.0)
    return cls(
      detector,
      config.dataset,
      augmentation,
      warmup_steps=det.warmup_steps,
      warmup_factor=float(det.warmup_factor),
      lr_epochs=lr_epochs,
      lr_decay=float(det.lr_decay),
      layer_decay=float(det.layer_decay),
    )

  def model_config(self, num_classes: int) -> mask_rcnn.MaskRCNNConfig:
    return dataclasses.replace(self.detector, num_classes=num_classes)

  def create_model(self, model_config, rngs: nnx.Rngs) -> mask_rcnn.MaskRCNN:
    return mask_rcnn.MaskRCNN(model_config, rngs=rngs)

  def check_data(self, num_classes: int, dataset: str) -> None:
    del num_classes, dataset  # Any number of classes fits the heads.

  def optimizer(self, settings: optim.OptimizerSettings, *, batch_size: int, epoch_steps: int, total_steps: int):
    """AdamW; mmengine's LinearLR from warmup_factor x peak over warmup_steps iterations, times
    lr_decay at each epoch of lr_epochs (MultiStepLR by epoch: epoch_steps iterations each); the
    layer-decay constructor's rates and weight-decay rule when layer_decay is set."""
    del total_steps
    schedule = optim.warmup_multistep_schedule(
      settings.peak_lr(batch_size),
      warmup_steps=self.warmup_steps,
      warmup_factor=self.warmup_factor,
      boundaries=tuple(epoch * epoch_steps for epoch in self.lr_epochs),
      decay=self.lr_decay,
    )
    if not self.layer_decay:
      return optim.create_optimizer(settings, schedule, mask=optim.layer_decay_weight_decay_mask), schedule
    return optim.layer_decay_optimizer(settings, schedule, self.layer_decay, self.detector.backbone.depth), schedule

  def warm_start(self, path: str, params: dict, model_config) -> dict:
    """The Vim blocks of a fresh detector's `params` from a classifier saved at `path` (the
    reference's `load_from` of a classification checkpoint; the adapter, FPN and heads fresh)."""
    return base.backbone_from_classifier(path, params, model_config, "detector")

  def make_train_step(self, graphdef, rest, tx, schedule, *, num_classes: int, **common):
    del rest, num_classes  # The BatchNorm statistics travel in the train state.
    return make_train_step(graphdef, tx, schedule, **common)

  def evaluation(self, config, graphdef, rest, num_classes: int, transform: device.DeviceTransform, mesh, **options):
    """`totals(params, model_state)`: COCO box and mask AP of the split (mmdet's CocoMetric).

    options: split (default config.eval_split), image_size (must be None: images are resized by
    config.det_aug.scale) and results_dir (evaluate mode: where process 0 writes the COCO result
    JSON and the metrics, `coco_eval.write_results`; None writes nothing).
    """
    del rest
    image_size = options.pop("image_size", None)
    if image_size is not None and image_size != config.image_size:
      raise checks.SettingError(
        "eval_image_size", image_size, "is for classification; detection images are resized by config.det_aug.scale"
      )
    split = options.pop("split", None) or config.eval_split
    results_dir = options.pop("results_dir", None)
    if options:
      raise TypeError(f"unknown evaluation options {sorted(options)}")
    process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    dataset = pipeline.create_detection_eval_dataset(
      config, split=split, global_batch_size=config.eval_batch_size, **process
    )
    predict_fn = predict_step(graphdef, transform)
    ids = category_ids(config.dataset, num_classes)
    ground_truth = {}  # Built once, on process 0, at the first evaluation.

    def totals(params, model_state) -> dict:
      local_results, num_examples = [], 0
      for batch in dataset.as_numpy_iterator():
        inputs = sharding.global_batch({"image": batch["image"], "image_size": batch["image_size"]}, mesh)
        with jax.set_mesh(mesh):
          detections = predict_fn(params, model_state, inputs)
        rows = jax.tree.map(lambda x: np.asarray(local_rows(x, mesh)), detections._asdict())
        real = batch["mask"] > 0
        num_examples += int(real.sum())
        local_results += coco_eval.detections_to_coco(
          batch["image_id"][real],
          rows["boxes"][real],
          rows["scores"][real],
          rows["labels"][real],
          rows["valid"][real],
          rows["masks"][real],
          ids,
          original_sizes=batch["original_size"][real],
          image_sizes=batch["image_size"][real],
        )
      results = coco_eval.gather_results(local_results)
      num_examples = int(sum_over_processes(np.int64(num_examples)))
      stats = np.zeros(len(METRICS), np.float64)
      if jax.process_index() == 0:
        if "gt" not in ground_truth:
          from shufflemamba_jax.data import detection_features  # pylint: disable=g-import-not-at-top

          builder = pipeline.get_builder(config.dataset, config.data_dir)
          ground_truth["gt"] = coco_eval.load_ground_truth(detection_features.coco_ground_truth(builder, split))
        metrics = coco_eval.evaluate(ground_truth["gt"], results)
        stats = np.asarray([metrics[name] for name in _stat_names()], np.float64)
        if results_dir is not None:
          coco_eval.write_results(results_dir, split, results, metrics)
      stats = broadcast_from_first(stats)
      return {"stats": stats, "num_examples": np.int64(num_examples)}

    return totals

  def reduce(self, totals: dict) -> tuple[dict, dict]:
    """The 24 COCO numbers by name (bbox_map, bbox_map_50, ..., segm_ar_l); no per-class details."""
    return {name: float(value) for name, value in zip(METRICS, totals["stats"], strict=True)}, {}

  def batch_shapes(self, config, global_batch: int, split: str) -> dict[str, jax.ShapeDtypeStruct]:
    """Training: uint8 canvases, their image sizes and the padded ground truth (the detection
    stream's fields); evaluation: the canvases and image sizes `predict` reads."""
    aug = self.augmentation
    height, width = aug.canvas
    shapes = {
      "image": jax.ShapeDtypeStruct((global_batch, height, width, 3), jnp.uint8),
      "image_size": jax.ShapeDtypeStruct((global_batch, 2), jnp.int32),
    }
    if split == "eval":
      return shapes
    if split != "train":
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    gts = aug.max_gt
    return {
      **shapes,
      "boxes": jax.ShapeDtypeStruct((global_batch, gts, 4), jnp.float32),
      "labels": jax.ShapeDtypeStruct((global_batch, gts), jnp.int32),
      "valid": jax.ShapeDtypeStruct((global_batch, gts), jnp.bool_),
      "masks": jax.ShapeDtypeStruct((global_batch, gts, aug.crop_size, aug.crop_size), jnp.uint8),
    }

  def trace_evaluation(self, config, graphdef, rest, num_classes, transform, mesh, params, model_state):
    """`predict` on one global batch of config.eval_batch_size canvases, sharded over the mesh."""
    del rest, num_classes
    batch = sharding.abstract(self.batch_shapes(config, config.eval_batch_size, "eval"), sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
      return predict_step(graphdef, transform).trace(params, model_state, batch)

  @staticmethod
  def predict(saved, paths: list[str], options) -> int:
    if not options.output_dir:
      raise ValueError(f"{saved.directory} holds a detector: --output-dir names where its drawings go")
    return detect_images(saved, paths, options.output_dir, batch_size=options.batch_size)


def _stat_names() -> tuple[str, ...]:
  return tuple(name for iou_type in coco_eval.IOU_TYPES for name in coco_eval.stat_names(iou_type))


def category_ids(dataset: str, num_classes: int) -> tuple[int, ...]:
  """The COCO category id of each label: COCO's own ids (`data.coco.CATEGORY_IDS`) for COCO,
  label + 1 for the others (`detection_features.category_id`, as their `coco_ground_truth` writes)."""
  if dataset == "coco":
    from shufflemamba_jax.data import coco  # pylint: disable=g-import-not-at-top

    return coco.CATEGORY_IDS
  return tuple(range(1, num_classes + 1))


def local_rows(x: jax.Array, mesh) -> jax.Array:
  """This process's rows of a batch-sharded global array (its own local batch, in order)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return multihost_utils.global_array_to_host_local_array(x, mesh, jax.P(sharding.BATCH_AXES))


def sum_over_processes(value: np.ndarray) -> np.ndarray:
  """An int64 count summed over every process (a collective: every process calls it)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.sum(np.asarray(multihost_utils.process_allgather(np.int32(value)), np.int64))


def broadcast_from_first(value: np.ndarray) -> np.ndarray:
  """Process 0's float64 array on every process (the metrics it computed alone). float64 travels
  as its bytes: JAX runs with 32-bit floats here."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  raw = np.frombuffer(np.ascontiguousarray(value, np.float64).tobytes(), np.uint8)
  raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
  return np.frombuffer(raw.astype(np.uint8).tobytes(), np.float64).copy()


def predict_step(graphdef, transform: device.DeviceTransform):
  """Jitted `predict(params, model_state, batch) -> mask_rcnn.Detections` of {"image" uint8
  canvases (B, H, W, 3), "image_size" int32 (B, 2)}, normalized by `transform` on the device."""

  def predict(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    return model.predict(transform(batch["image"]), batch["image_size"].astype(jnp.int32))

  return jax.jit(predict)


def make_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  schedule,
  *,
  seed: int,
  input_transform: device.DeviceTransform = device.IMAGENET,
  ema_decay: float = 0.0,
  donate: bool = True,
  state_shardings=None,
  batch_sharding=None,
):
  """Returns `train_step(state, batch) -> (state, metrics)` for a detector, one jitted function.

  batch: the detection stream's fields (`DetectionTask.batch_shapes("train")`: uint8 canvases,
  image sizes, padded boxes, labels, validity and box-crop masks), global batch on the leading
  axis, the images normalized by `input_transform` on the device. BatchNorm uses the statistics of
  the whole global batch; its running averages go to state["model_state"]. metrics: float32
  scalars loss (the sum of mmdet's five terms), loss_rpn_cls, loss_rpn_bbox, loss_cls, loss_bbox,
  loss_mask, grad_norm, lr.
  """

  def loss_fn(params, model_state, images, targets, key):
    # A copy: the model's variables must be created inside this trace to be updated in it.
    model = nnx.merge(graphdef, params, model_state, copy=True)
    loss, terms = model.loss(images, targets, key=key)
    return loss, (terms, nnx.state(model, nnx.Not(nnx.Param)))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.key(seed), step)
    (loss, (terms, model_state)), grads = grad_fn(
      state["params"], state["model_state"], input_transform(batch["image"]), targets_of(batch), key
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
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads), "lr": schedule(step)}
    return new_state, metrics

  return steps.jit_train_step(train_step, donate, state_shardings, batch_sharding)


# ---- predict ------------------------------------------------------------------------------


def detect_images(saved, paths: list[str], output_dir: str, *, batch_size: int = 8) -> int:
  """Writes OUTPUT_DIR/<name>.png (each image with its detections drawn: `drawing.draw_detections`)
  and OUTPUT_DIR/detections.json (COCO-style results: file_name, category_id (the dataset's:
  COCO's ids for COCO), label, category_name, bbox [x, y, w, h], score, RLE segmentation, in each
  image's own pixels), as evaluation predicts them
  (the run's det_aug scale and canvas); returns the exit code (1 if an image could not be read)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for reading images)
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top

  from shufflemamba_jax.training.tasks import drawing  # pylint: disable=g-import-not-at-top

  run_config = saved.run_config
  known = {field.name for field in dataclasses.fields(detect_augment.DetectionAugmentation)}
  det_aug = {k: tuple(v) if isinstance(v, list) else v for k, v in run_config.get("det_aug", {}).items() if k in known}
  aug = detect_augment.DetectionAugmentation(**det_aug)
  model = saved.model()
  graphdef, params, model_state = steps.split_model(model)
  predict_fn = predict_step(graphdef, device.DeviceTransform.of_run(run_config))
  num_classes = model.config.num_classes
  try:
    names = pipeline.class_names(run_config.get("dataset", "coco"))
  except Exception:  # Names are a convenience: fall back to indices.
    names = ()
  if len(names) != num_classes:
    names = tuple(str(index) for index in range(num_classes))
  ids = category_ids(run_config.get("dataset", "coco"), num_classes)
  output = epath.Path(output_dir)
  output.mkdir(parents=True, exist_ok=True)
  unreadable, results = [], []

  def flush(group):
    views = [detect_augment.eval_example(tf.constant(image), aug) for _, image in group]
    batch = {key: np.stack([view[key].numpy() for view in views]) for key in ("image", "image_size")}
    padding = -len(group) % batch_size  # One compiled shape.
    batch = {key: np.concatenate([value, np.repeat(value[-1:], padding, 0)]) for key, value in batch.items()}
    detections = jax.tree.map(np.asarray, predict_fn(params, nnx.to_pure_dict(model_state), batch)._asdict())
    for row, (path, image) in enumerate(group):
      original = np.asarray(image.shape[:2])
      # Category ids = labels here; the JSON gets the dataset's ids below.
      found = coco_eval.detections_to_coco(
        [0],
        *(detections[key][row : row + 1] for key in ("boxes", "scores", "labels", "valid", "masks")),
        list(range(num_classes)),
        original_sizes=original[None],
        image_sizes=batch["image_size"][row : row + 1],
      )
      boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in found)], np.float32).reshape(-1, 4)
      masks = np.stack([mask_utils.decode(r["segmentation"]).astype(bool) for r in found]) if found else None
      drawn = drawing.draw_detections(
        image,
        boxes,
        np.asarray([r["category_id"] for r in found], np.int64),
        np.asarray([r["score"] for r in found], np.float32),
        masks,
        names,
      )
      target = output / (epath.Path(path).stem + ".png")
      target.write_bytes(tf.io.encode_png(drawn).numpy())
      print(f"{path} -> {target} ({len(found)} detections)")
      for r in found:
        del r["image_id"]  # Files, not dataset images: file_name names them.
        label = r["category_id"]
        r.update(category_id=ids[label], label=label, category_name=names[label])
        results.append({"file_name": str(path), **r})

  group = []
  for path in paths:
    try:
      image = tf.io.decode_image(epath.Path(path).read_bytes(), channels=3, expand_animations=False).numpy()
    except tf.errors.InvalidArgumentError:
      unreadable.append(path)
      continue
    group.append((path, image))
    if len(group) == batch_size:
      flush(group)
      group = []
  if group:
    flush(group)
  (output / "detections.json").write_text(json.dumps(results))
  print(f"{len(results)} detections -> {output / 'detections.json'}")
  for path in unreadable:
    print(f"error: cannot read image {path}", file=sys.stderr)
  return 1 if unreadable else 0

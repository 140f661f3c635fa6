"""tf.data input pipelines over TFDS (classification, label maps, instances) with exact, seeded resume.

`settings(config)` checks the pipeline's config fields, `prepare` builds a dataset with TFDS's
own builder (`python -m shufflemamba_jax.prepare`), `create_train_dataset` and
`create_eval_dataset` stream local batches
(`create_segmentation_eval_dataset` one example at a time for label maps,
`create_detection_eval_dataset` fixed batches of canvases for instances).

Training order. The split is cut into V = `data_shards` contiguous shards
(`tfds.even_splits(split, V)[v]`; the default 0 means V = process_count, one shard per process).
Each shard is an independent stream: its records are cut into chunks (its part of each TFRecord
file, or at most `records_per_chunk` consecutive records); every epoch the chunks are permuted
with a NumPy generator seeded by (seed, epoch, shard) and grouped into windows of about
`shuffle_buffer` examples; a window is read whole and permuted with a stateless TF shuffle seeded
by (seed, epoch, shard, window). Every example's augmentation seed is
(fold_in(seed, epoch, shard) xor its position in the shard's epoch), planned per window.
Each epoch has `num_train_examples // global_batch_size` steps, and a shard delivers
G / V examples per step (G = global batch size); the leftover examples of the epoch are dropped
(different ones every epoch).

Global batch b is the concatenation of the b-th sub-batches of shards 0, 1, ..., V - 1. Process
k of P reads shards [k V / P, (k + 1) V / P) and yields their sub-batches concatenated in order,
i.e. exactly rows [k G / P, (k + 1) G / P) of the global batch. So the stream is a pure function
of (seed, epoch, V): for a fixed `data_shards` the global batches are the same for every process
count P dividing V (V must be a multiple of P, and G divisible by V). A run restarted at
`start_step` rebuilds the same plans and every shard skips only inside one window (no decoding
of skipped records), continuing the exact same stream, with any such P. With data_shards=0 the
stream depends on P (V = P); set data_shards (e.g. to the largest process count expected) to
make it independent of P.

Repeated augmentation (DeiT's RASampler, `repeated_aug = r > 1`): in every window the first
ceil(n / r) permuted examples are each emitted r times in a row (each copy augmented with its
own seed), cut to n, so an epoch keeps its length and sees about 1 / r of the data, r times.

Undecodable images: no Python runs per image. Every TFRecord file a stream reads is checked
once (`decodable`: at `prepare`, or by the first stream that reads it; the result is stored next
to the dataset), and a stream looks the records up in graph. A window replaces an undecodable
image by another one of the same window of its shard (the next, or one that repeated
augmentation drops), so positions never shift and resume stays exact; an undecodable evaluation
image gets mask 0. Each is named in a warning when the stream is created.

Memory: every shard holds a window of `shuffle_buffer` encoded images (whole files: up to one
file more; 16,384 ImageNet JPEGs are about 1.8 GB) and prefetches the next one, so a process
holds V / P windows (plus their prefetches): lower `shuffle_buffer` about P / V-fold when V > P.

TensorFlow is kept off the accelerators (`tf.config.set_visible_devices([], "GPU")`).
"""

import dataclasses
import logging
import math
import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from shufflemamba_jax import checks
from shufflemamba_jax.data import augment, decodable, detect_augment, segment_augment

_LOGGER = logging.getLogger(__name__)

DATASETS = ("digits", "imagenet2012", "digits_seg", "ade20k", "digits_det", "coco")
# Datasets of label maps (semantic segmentation): label is an image, 255 = ignored.
SEGMENTATION_DATASETS = ("digits_seg", "ade20k")
# Datasets of instances (boxes, classes, masks; data/detection_features.py).
DETECTION_DATASETS = ("digits_det", "coco")
# Built on first use: they need no download.
EMBEDDED_DATASETS = ("digits", "digits_seg", "digits_det")


def _hide_accelerators_from_tensorflow():
  """Stops TF from reserving GPU memory that JAX needs; a no-op once TF has initialized devices."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass


_hide_accelerators_from_tensorflow()


# ---------------------------------------------------------------------------------------------
# Settings: a ConfigDict (configs/default.py field names) and/or keyword overrides.
# ---------------------------------------------------------------------------------------------

# Top-level config fields the pipeline reads, with their values when no config is given.
_FIELDS = {
  "dataset": "digits",
  "data_dir": None,
  "train_split": "train",
  "eval_split": "validation",
  "image_size": 224,
  "shuffle_buffer": 16_384,
  "data_shards": 0,
  "seed": 0,
}
# Fields under config.aug: the training augmentation's, and these two.
_AUG_FIELDS = {"repeated_aug": 1, "eval_crop_ratio": 0.875, **dataclasses.asdict(augment.TrainAugmentation())}


def settings(config=None, **overrides) -> dict[str, Any]:
  """The pipeline's settings: defaults < `config` < keyword `overrides`, checked.

  config: an ml_collections config with configs/default.py's field names, or None.
  overrides: any setting by its config name (without `aug.`), `records_per_chunk` (records
    per chunk of the shuffle plan, 0: a file's part whole; tests shrink it), `seg_aug` (a dict of
    segment_augment.SegmentationAugmentation fields, over `config.seg_aug`) or `det_aug` (of
    detect_augment.DetectionAugmentation fields, over `config.det_aug`).
  A bad value raises a SettingError naming the config field. The result also holds the checked
  `augmentation` (augment.TrainAugmentation), `segmentation_augmentation`
  (segment_augment.SegmentationAugmentation, read by the segmentation datasets) and
  `detection_augmentation` (detect_augment.DetectionAugmentation, by the detection datasets).
  """
  values = {**_FIELDS, **_AUG_FIELDS, "records_per_chunk": 0, "seg_aug": {}, "det_aug": {}}
  unknown = sorted(set(overrides) - set(values))
  if unknown:  # Like any unknown keyword argument.
    raise TypeError(f"Unknown input pipeline setting(s) {unknown}; known: {sorted(values)}")
  if config is not None:
    values.update({name: config[name] for name in _FIELDS if name in config})
    values.update({name: config.aug[name] for name in _AUG_FIELDS if "aug" in config and name in config.aug})
  seg_aug = dict(config.seg_aug) if config is not None and "seg_aug" in config else {}
  seg_aug.update(overrides.pop("seg_aug", {}))
  det_aug = dict(config.det_aug) if config is not None and "det_aug" in config else {}
  det_aug.update(overrides.pop("det_aug", {}))
  values.update(overrides)
  checks.one_of("config.dataset", values["dataset"], DATASETS)
  unknown = sorted(set(seg_aug) - {f.name for f in dataclasses.fields(segment_augment.SegmentationAugmentation)})
  if unknown:
    raise checks.SettingError(f"config.seg_aug.{unknown[0]}", seg_aug[unknown[0]], "is not a setting")
  values["seg_aug"] = seg_aug
  unknown = sorted(set(det_aug) - {f.name for f in dataclasses.fields(detect_augment.DetectionAugmentation)})
  if unknown:
    raise checks.SettingError(f"config.det_aug.{unknown[0]}", det_aug[unknown[0]], "is not a setting")
  values["det_aug"] = det_aug
  values["detection_augmentation"] = detect_augment.DetectionAugmentation(
    **{name: tuple(value) if isinstance(value, (list, tuple)) else value for name, value in det_aug.items()}
  )
  values["segmentation_augmentation"] = segment_augment.SegmentationAugmentation(
    **{name: tuple(value) if isinstance(value, (list, tuple)) else value for name, value in seg_aug.items()}
  )
  for name in ("image_size", "shuffle_buffer"):
    checks.integer(f"config.{name}", values[name])
  for name in ("data_shards", "seed"):
    checks.integer(f"config.{name}", values[name], minimum=0)
  checks.integer("records_per_chunk", values["records_per_chunk"], minimum=0)
  checks.integer("config.aug.repeated_aug", values["repeated_aug"])
  if checks.number("config.aug.eval_crop_ratio", values["eval_crop_ratio"], 0.0, 1.0) == 0:
    raise checks.SettingError("config.aug.eval_crop_ratio", values["eval_crop_ratio"], "must be > 0")
  augmentation = {name: values[name] for name in dataclasses.asdict(augment.TrainAugmentation())}
  values["augmentation"] = augment.TrainAugmentation(
    **dict(augmentation, mean=tuple(map(float, values["mean"])), std=tuple(map(float, values["std"])))
  )
  return values


# ---------------------------------------------------------------------------------------------
# Builders and dataset info.
# ---------------------------------------------------------------------------------------------


IMAGENET_TARS = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}


def check_imagenet_manual_dir(manual_dir: str | None) -> None:
  """Raises FileNotFoundError naming every ImageNet tar missing from `manual_dir`."""
  if not manual_dir:
    raise FileNotFoundError(
      "--manual_dir is required for imagenet2012: a folder holding "
      + " and ".join(IMAGENET_TARS.values())
      + " (download them from https://image-net.org)."
    )
  missing = [
    f"{name} ({split} split) -> put it at {epath.Path(manual_dir) / name}"
    for split, name in IMAGENET_TARS.items()
    if not (epath.Path(manual_dir) / name).is_file()
  ]
  if missing:
    raise FileNotFoundError(
      "Missing ImageNet archive(s) in --manual_dir: "
      + "; ".join(missing)
      + ". Download them from https://image-net.org (registration required)."
    )


def _builder(dataset: str, data_dir: str | None):
  checks.one_of("config.dataset", dataset, DATASETS)
  if dataset == "digits":
    from shufflemamba_jax.data import digits  # noqa: F401  (registers the builder)
  elif dataset == "digits_seg":
    from shufflemamba_jax.data import digits_seg  # noqa: F401
  elif dataset == "digits_det":
    from shufflemamba_jax.data import digits_det  # noqa: F401
  elif dataset == "ade20k":
    from shufflemamba_jax.data import ade20k  # noqa: F401
  elif dataset == "coco":
    from shufflemamba_jax.data import coco  # pylint: disable=g-import-not-at-top

    return tfds.builder(coco.TFDS_NAME, data_dir=data_dir)  # TFDS's own (box-only) builder holds "coco".
  return tfds.builder(dataset, data_dir=data_dir)


def prepare(dataset: str, data_dir: str | None = None, manual_dir: str | None = None, compute_stats: bool = True):
  """Builds `dataset` into `data_dir` with TFDS's own builder and returns the builder.

  `digits` and `digits_seg` need nothing; `imagenet2012` reads ILSVRC2012_img_train.tar and
  ILSVRC2012_img_val.tar (from https://image-net.org, after registering) in `manual_dir`,
  `ade20k` ADEChallengeData2016.zip and `coco` the three COCO 2017 zips (data/coco.py); each is
  checked first so that a missing archive is named with where to put it.
  """
  if dataset == "imagenet2012":
    check_imagenet_manual_dir(manual_dir)  # Before TFDS, whose own error is less specific.
  elif dataset == "ade20k":
    from shufflemamba_jax.data import ade20k  # pylint: disable=g-import-not-at-top

    ade20k.check_manual_dir(manual_dir)
  elif dataset == "coco":
    from shufflemamba_jax.data import coco  # pylint: disable=g-import-not-at-top

    coco.check_manual_dir(manual_dir)
  builder = _builder(dataset, data_dir)
  stats = tfds.download.ComputeStatsMode.AUTO if compute_stats else tfds.download.ComputeStatsMode.SKIP
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, compute_stats=stats))
  decodable.check_splits(builder)  # Once, here, so that no stream needs to.
  return builder


def get_builder(dataset: str, data_dir: str | None = None):
  """Returns the prepared TFDS builder of `dataset` in `data_dir`.

  `digits` and `digits_seg` are built on first use (they need no download); `imagenet2012` and
  `ade20k` must have been prepared with `python -m shufflemamba_jax.prepare --dataset=... ` first.
  """
  builder = _builder(dataset, data_dir)
  if builder.is_prepared():
    return builder
  if dataset in EMBEDDED_DATASETS:
    return prepare(dataset, data_dir)
  archives = {"ade20k": "DIR_WITH_ADECHALLENGEDATA2016_ZIP", "coco": "DIR_WITH_COCO_2017_ZIPS"}.get(
    dataset, "DIR_WITH_ILSVRC2012_TARS"
  )
  raise FileNotFoundError(
    f"TFDS dataset {dataset!r} is not prepared in data_dir={builder.data_dir_root!r}. Run: "
    f"python -m shufflemamba_jax.prepare --dataset={dataset} --data_dir={builder.data_dir_root}"
    f" --manual_dir={archives}"
  )


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What training needs to know of a prepared dataset before reading it."""

  num_classes: int
  splits: Any  # tfds SplitDict: splits[name].num_examples, also for slices such as "train[:99%]".

  def num_examples(self, split: str) -> int:
    """Examples in `split`, a split name or a TFDS slice of one."""
    return self.splits[split].num_examples


def get_dataset_info(dataset: str, data_dir: str | None = None) -> DatasetInfo:
  """Number of classes and the splits of a prepared TFDS dataset."""
  builder = get_builder(dataset, data_dir)
  features = builder.info.features
  label = features["label"] if "label" in features else features["objects"]["label"]  # Detection: per object.
  # A label map's classes are its module's NUM_CLASSES; a class label knows its own.
  num_classes = label.num_classes if hasattr(label, "num_classes") else _segmentation_module(dataset).NUM_CLASSES
  return DatasetInfo(num_classes=num_classes, splits=builder.info.splits)


def _segmentation_module(dataset: str):
  checks.one_of("config.dataset", dataset, SEGMENTATION_DATASETS)
  if dataset == "ade20k":
    from shufflemamba_jax.data import ade20k  # pylint: disable=g-import-not-at-top

    return ade20k
  from shufflemamba_jax.data import digits_seg  # pylint: disable=g-import-not-at-top

  return digits_seg


def class_names(dataset: str) -> tuple[str, ...]:
  """The class names of a dataset, in label order (TFDS's, or a label-map dataset's own)."""
  if dataset in SEGMENTATION_DATASETS:
    return tuple(_segmentation_module(dataset).CLASS_NAMES)
  features = _builder(dataset, None).info.features
  return tuple((features["label"] if "label" in features else features["objects"]["label"]).names)


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")


def _process_split(split: str, process_index: int, process_count: int):
  _check_process(process_index, process_count)
  return tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}.")
  return global_batch_size // process_count


def _example_id(example) -> tf.Tensor:
  """int64 id: the dataset's own `id` (or detection's `image/id`) feature, else a stable 63-bit
  fingerprint of the file name."""
  for name in ("id", "image/id"):
    if name in example:
      return tf.cast(example[name], tf.int64)
  return tf.strings.to_hash_bucket_fast(example["file_name"], 2**63 - 1)


def eval_image(image_bytes, image_size: int, crop_ratio: float):
  """The evaluation transform of one encoded image, shared by evaluation and `predict`.

  Decodes (in graph: the bytes must decode, see `decodable`), resizes the shorter side to
  floor(size / crop_ratio) and center-crops. Returns uint8 (image_size, image_size, 3).
  """
  image = decodable.decode_window(image_bytes, decodable.full_window)
  return augment.to_uint8(augment.eval_resize_and_center_crop(image, image_size, crop_ratio))


# ---------------------------------------------------------------------------------------------
# Training stream.
# ---------------------------------------------------------------------------------------------


def _take(instruction) -> int:
  """The number of records a TFDS file instruction reads (its `take` may be None or -1: the rest)."""
  take = instruction.take
  return instruction.examples_in_shard - instruction.skip if take is None or take < 0 else take


def _files(file_instructions) -> dict[str, int]:
  """{path: number of records in the file} of TFDS file instructions, for `decodable.Lookup`."""
  return {os.fspath(instruction.filename): instruction.examples_in_shard for instruction in file_instructions}


_EXAMPLES_PER_CALL = 256  # A window's examples are cut in blocks: tf.data's per-call cost is paid per block.


def _keyed_records(path, position, skip, take):
  """(record, file position, record index) of records [skip, skip + take) of a file.

  Zipped, not mapped: tf.data then calls no function per record.
  """
  return tf.data.Dataset.zip(
    tf.data.TFRecordDataset(path).skip(skip).take(take),
    tf.data.Dataset.from_tensors(position).repeat(),
    tf.data.Dataset.range(skip, skip + take),
  )


def _chunks(file_instructions, records_per_chunk: int):
  """Cuts a shard of the split into (file, skip, take) chunks of at most `records_per_chunk` records.

  0 (the default) keeps each file's part whole. A TFRecord file cannot seek: a chunk that starts
  at record s reads and drops the s records before it, so k chunks of a file cost about k / 2
  reads of it per epoch. TFDS shuffles the records across files when it prepares a dataset, so a
  window of whole files is already a random sample of the split.
  """
  chunks = []
  for instruction in file_instructions:
    take = _take(instruction)
    size = records_per_chunk or take
    for start in range(0, take, size):
      chunks.append((os.fspath(instruction.filename), instruction.skip + start, min(size, take - start)))
  return chunks


@dataclasses.dataclass(frozen=True)
class _Window:
  files: list[str]
  skips: list[int]
  takes: list[int]
  epoch: int
  index: int
  start: int  # Position in the epoch of the window's first example.
  offset: int  # First example of the window to emit (non-zero only when resuming).
  count: int  # Number of examples to emit.


def plan_epoch(
  chunks, epoch: int, seed: int, shard: int, shuffle_buffer: int, examples_per_epoch: int, start_position: int = 0
) -> list[_Window]:
  """The windows of one epoch of one data shard, as a pure function of its arguments.

  Chunks are permuted by (seed, epoch, shard) and grouped greedily into windows of at
  least `shuffle_buffer` examples; the epoch stops after `examples_per_epoch` examples, and
  windows before `start_position` are left out (the one containing it starts at an offset).
  """
  order = np.random.default_rng([seed, epoch, shard]).permutation(len(chunks))
  groups, current, size = [], [], 0
  for chunk_index in order:
    current.append(chunks[chunk_index])
    size += chunks[chunk_index][2]
    if size >= shuffle_buffer:
      groups.append(current)
      current, size = [], 0
  if current:
    groups.append(current)
  windows, start = [], 0
  for index, group in enumerate(groups):
    if start >= examples_per_epoch:
      break
    size = sum(take for _, _, take in group)
    count = min(size, examples_per_epoch - start)
    if start + count > start_position:
      offset = max(0, start_position - start)
      windows.append(
        _Window(
          files=[f for f, _, _ in group],
          skips=[s for _, s, _ in group],
          takes=[t for _, _, t in group],
          epoch=epoch,
          index=index,
          start=start,
          offset=offset,
          count=count - offset,
        )
      )
    start += size
  return windows


def _fold(seed_pair, *values):
  for value in values:
    seed_pair = tf.random.experimental.stateless_fold_in(seed_pair, tf.cast(value, tf.int64))
  return seed_pair


def num_data_shards(values: dict[str, Any], global_batch_size: int, process_count: int) -> int:
  """The number V of training data shards (`data_shards` of `settings()`, 0 = one per process)."""
  shards = values["data_shards"] or process_count
  if shards % process_count:
    raise checks.SettingError("config.data_shards", shards, f"must be a multiple of the {process_count} processes")
  if global_batch_size % shards:
    raise checks.SettingError("config.data_shards", shards, f"must divide the global batch {global_batch_size}")
  return shards


def create_train_dataset(
  config=None,
  *,
  global_batch_size: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  **overrides,
):
  """Infinite training stream of local batches, a pure function of (seed, epoch, start_step).

  The split is cut into V = `data_shards` shards (0: V = process_count), each an independent
  stream (see the module docstring) delivering global_batch_size / V examples per step; global
  batch b is shard 0's b-th sub-batch, then shard 1's, ... Process k of P yields shards
  [k V / P, (k + 1) V / P), i.e. rows [k G / P, (k + 1) G / P) of the global batch, so for a
  fixed V the global stream is the same for every process count dividing V.

  Args:
    config: ml_collections.ConfigDict with the data fields of configs/default.py (dataset,
      data_dir, train_split, image_size, shuffle_buffer, data_shards, seed, aug.*), or None.
    global_batch_size: batch size over all processes; each process yields a 1 / process_count
      share of it. Must be divisible by V.
    start_step: global step to resume at; the stream continues exactly where a run started at
      step 0 (with the same V, any process count) was after `start_step` batches.
    process_index, process_count: this process and the number of processes (jax.process_*);
      V must be a multiple of process_count.
    **overrides: any setting by its config name (e.g. dataset="digits", image_size=16,
      repeated_aug=1, randaugment_num_ops=0, records_per_chunk=64, data_shards=8), taking precedence
      over `config`.

  Returns:
    tf.data.Dataset of dicts: image uint8 (local_batch, S, S, 3), label int32 (local_batch,),
    example_id int64 (local_batch,), epoch int64 (local_batch,). Normalization and random
    erasing follow on the device (`settings(...)["augmentation"].device_transform()`).
    Segmentation datasets (SEGMENTATION_DATASETS) go through `segment_augment` with
    `config.seg_aug` instead: image uint8 (local_batch, C, C, 3) and label uint8
    (local_batch, C, C) (255 = ignored), C = seg_aug.crop_size. Detection datasets
    (DETECTION_DATASETS) go through `detect_augment.train_example` with `config.det_aug`: image
    uint8 (local_batch, ch, cw, 3) canvases, image_size int32 (local_batch, 2), boxes float32
    (local_batch, G, 4), labels int32 and valid bool (local_batch, G), masks uint8 (local_batch,
    G, S, S) box crops (G = det_aug.max_gt, S = det_aug.crop_size); an image without instances is
    never drawn (mmdet's filter_empty_gt: another image of its window takes its place).
  """
  values = settings(config, **overrides)
  local_batch = _local_batch_size(global_batch_size, process_count)
  _check_process(process_index, process_count)
  num_shards = num_data_shards(values, global_batch_size, process_count)
  shard_batch = global_batch_size // num_shards  # Examples per step of one shard.
  shards_per_process = num_shards // process_count
  local_shards = range(process_index * shards_per_process, (process_index + 1) * shards_per_process)
  builder = get_builder(values["dataset"], values["data_dir"])
  split = values["train_split"]
  num_examples = builder.info.splits[split].num_examples
  steps_per_epoch = num_examples // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(
      f"global_batch_size={global_batch_size} exceeds the {num_examples} examples of {values['dataset']}:{split}."
    )
  examples_per_epoch = steps_per_epoch * shard_batch  # Of one shard.
  seed, shuffle_buffer, repeats = values["seed"], values["shuffle_buffer"], values["repeated_aug"]
  start_epoch, start_batch = divmod(int(start_step), steps_per_epoch)
  int_spec = tf.TensorSpec([], tf.int64)
  detection = values["dataset"] in DETECTION_DATASETS

  def read_window(files, positions, skips, takes, epoch, index, start, offset, count):
    records = tf.data.Dataset.from_tensor_slices((files, positions, skips, takes)).interleave(
      _keyed_records, cycle_length=16, block_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    records, record_positions, record_indices = records.batch(2**31 - 1).get_single_element()
    skipped = lookup.contains(decodable.key(record_positions, record_indices))
    if detection:
      # mmdet's filter_empty_gt: an image without instances is replaced as an undecodable one is.
      skipped = skipped | (num_instances(records) == 0)
    return records, skipped, epoch, index, start, offset, count

  def shard_stream(shard: int):
    """Element stream of one shard: undecoded records with their epoch and shard position."""
    chunks = _chunks(builder.info.splits[shard_splits[shard]].file_instructions, values["records_per_chunk"])

    def windows():
      epoch, start_position = start_epoch, start_batch * shard_batch
      while True:
        for window in plan_epoch(chunks, epoch, seed, shard, shuffle_buffer, examples_per_epoch, start_position):
          yield (
            window.files,
            [lookup.positions[path] for path in window.files],
            window.skips,
            window.takes,
            window.epoch,
            window.index,
            window.start,
            window.offset,
            window.count,
          )
        epoch, start_position = epoch + 1, 0

    plan = tf.data.Dataset.from_generator(
      windows,
      output_signature=(
        tf.TensorSpec([None], tf.string),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None], tf.int64),
        int_spec,
        int_spec,
        int_spec,
        int_spec,
        int_spec,
      ),
    )

    def expand_window(records, undecodable, epoch, index, start, offset, count):
      """The window's examples, planned as vectors once per window: nothing runs per example here."""
      size = tf.shape(records, out_type=tf.int64)[0]
      window_seed = _fold(tf.constant([seed, 1], tf.int64), epoch, shard, index)
      permutation = tf.cast(tf.argsort(tf.random.stateless_uniform([size], window_seed)), tf.int64)
      unique = (size + repeats - 1) // repeats
      backup_shift = tf.where(unique < size, unique, 1)
      positions = tf.range(offset, offset + count)
      source = positions // repeats  # Each copy's original in the permuted window.
      # An undecodable image's substitute, from the same window: one that repeated augmentation
      # drops, else the next.
      primary = tf.gather(permutation, source)
      backup = tf.gather(permutation, (source + backup_shift) % size)
      chosen = tf.where(tf.gather(undecodable, primary), backup, primary)
      # Both undecodable is vanishingly rare; the example is then dropped (and the rest of this
      # process's stream shifts by one).
      kept = tf.logical_not(tf.gather(undecodable, chosen))
      chosen, positions = tf.boolean_mask(chosen, kept), tf.boolean_mask(start + positions, kept)
      # Each example's augmentation seed: (key of (seed, epoch, shard)) ^ (position in the shard's
      # epoch), one vector op per block. Stateless ops scramble their seed through Philox first,
      # so neighbouring seeds give unrelated streams.
      key = _fold(tf.constant([seed, 0], tf.int64), epoch, shard)

      def block(first):
        """The records of examples [first, first + _EXAMPLES_PER_CALL): one call per block."""
        indices = chosen[first : first + _EXAMPLES_PER_CALL]
        block_positions = positions[first : first + _EXAMPLES_PER_CALL]
        return {
          "record": tf.gather(records, indices),
          "seed": tf.stack([tf.bitwise.bitwise_xor(key[0], block_positions), tf.fill(tf.shape(indices), key[1])], 1),
          "epoch": tf.fill(tf.shape(indices), epoch),
        }

      return tf.data.Dataset.range(0, tf.size(chosen, out_type=tf.int64), _EXAMPLES_PER_CALL).map(block).unbatch()

    return plan.map(read_window).prefetch(1).flat_map(expand_window)

  shard_splits = {shard: tfds.even_splits(split, n=num_shards, drop_remainder=False)[shard] for shard in local_shards}
  instructions = [i for shard in local_shards for i in builder.info.splits[shard_splits[shard]].file_instructions]
  lookup = decodable.Lookup(builder, _files(instructions))
  lookup.warn("is replaced by another image of its window in training")

  features = builder.info.features
  decoders = {"image": tfds.decode.SkipDecoding()}
  aug = values["augmentation"]
  image_size = int(values["image_size"])

  if aug.inception_crop:
    area_range = (aug.crop_area_min, 1.0)
    ratio_range = (aug.crop_ratio_min, aug.crop_ratio_max)
  else:
    area_range = ratio_range = None

  def decode_and_augment(element):
    crop_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(element["seed"], 2))

    def window_fn(shape):
      if area_range is None:
        return decodable.full_window(shape)
      return augment.random_crop_window(shape, crop_seed, area_range, ratio_range)

    example = features.deserialize_example(element["record"], decoders=decoders)
    image = decodable.decode_window(example["image"], window_fn)
    return {
      "image": augment.augment_train_image(image, augment_seed, aug, image_size),
      "label": tf.cast(example["label"], tf.int32),
      "example_id": _example_id(example),
      "epoch": element["epoch"],
    }

  seg_aug = values["segmentation_augmentation"]
  pair_decoders = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}

  def decode_and_augment_pair(element):
    """Segmentation: the (image, label map) pair through segment_augment."""
    example = features.deserialize_example(element["record"], decoders=pair_decoders)
    image = decodable.decode_window(example["image"], decodable.full_window)
    label = tf.io.decode_png(example["label"], channels=1)[..., 0]
    image, label = segment_augment.augment_train_pair(image, label, element["seed"], seg_aug)
    return {"image": image, "label": label, "example_id": _example_id(example), "epoch": element["epoch"]}

  det_aug = values["detection_augmentation"]

  def decode_and_augment_instances(element):
    """Detection: the image and its instances through detect_augment (canvas, padded ground truth)."""
    example = features.deserialize_example(element["record"], decoders=_INSTANCE_DECODERS)
    image = decodable.decode_window(example["image"], decodable.full_window)
    objects = example["objects"]
    masks = decode_instance_masks(objects["mask"], tf.shape(image)[:2])
    instances = (objects["bbox"], objects["label"], objects["is_crowd"], masks)
    example_out = detect_augment.train_example(image, *instances, element["seed"], det_aug)
    return {**example_out, "example_id": _example_id(example), "epoch": element["epoch"]}

  if detection:
    example_fn = decode_and_augment_instances
  elif values["dataset"] in SEGMENTATION_DATASETS:
    example_fn = decode_and_augment_pair
  else:
    example_fn = decode_and_augment
  streams = [shard_stream(shard) for shard in local_shards]
  if len(streams) == 1:
    dataset = streams[0]
  else:
    # shard_batch elements of each local shard in turn: one local batch per round.
    pattern = np.repeat(np.arange(len(streams), dtype=np.int64), shard_batch)
    choices = tf.data.Dataset.from_tensor_slices(pattern).repeat()
    dataset = tf.data.Dataset.choose_from_datasets(streams, choices)
  dataset = dataset.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(local_batch, drop_remainder=True)
  return dataset.with_options(_options()).prefetch(tf.data.AUTOTUNE)


# The instance features read undecoded: the image as bytes (decodable), each mask as PNG bytes.
_INSTANCE_DECODERS = {"image": tfds.decode.SkipDecoding(), "objects": {"mask": tfds.decode.SkipDecoding()}}


def num_instances(records: tf.Tensor) -> tf.Tensor:
  """The instance count (int64) of each serialized detection example of `records` (a string
  vector), read from its labels alone: one vectorized parse, no image decoded."""
  labels = tf.io.parse_example(records, {"objects/label": tf.io.RaggedFeature(tf.int64)})["objects/label"]
  return labels.row_lengths()


def decode_instance_masks(pngs: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """PNG instance masks (N,) string -> (N, H, W) uint8 at the image's `size` (H, W) (N may be 0)."""
  masks = tf.map_fn(
    lambda png: tf.io.decode_png(png, channels=1)[..., 0],
    pngs,
    fn_output_signature=tf.TensorSpec([None, None], tf.uint8),
  )
  return tf.reshape(masks, tf.concat([[-1], size], 0))


def _options():
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


# ---------------------------------------------------------------------------------------------
# Evaluation stream.
# ---------------------------------------------------------------------------------------------


def _split_examples(builder, process_split: str, decoders, padding_example: dict, preprocess, warning: str):
  """The examples of `process_split` in file order (as TFDS reads them with shuffle_files=False),
  each `preprocess(example)`, an undecodable image (see `decodable`) never decoded but replaced by
  `padding_example` (mask 0) under its own id."""
  instructions = builder.info.splits[process_split].file_instructions
  lookup = decodable.Lookup(builder, _files(instructions))
  lookup.warn(warning)
  features = builder.info.features

  def keyed_example(record, position, index):
    example = features.deserialize_example(record, decoders=decoders)
    return tf.cond(
      lookup.contains(decodable.key(position, index)),
      lambda: {**padding_example, "example_id": _example_id(example)},
      lambda: preprocess(example),
    )

  dataset = tf.data.Dataset.from_tensor_slices(
    (
      tf.constant([os.fspath(instruction.filename) for instruction in instructions], tf.string),
      np.asarray([lookup.positions[os.fspath(instruction.filename)] for instruction in instructions], np.int64),
      np.asarray([instruction.skip for instruction in instructions], np.int64),
      np.asarray([_take(instruction) for instruction in instructions], np.int64),
    )
  ).flat_map(_keyed_records)
  return dataset.map(keyed_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _padded_batches(dataset, padding_example: dict, padding: int, local_batch: int):
  """`dataset` followed by `padding` copies of `padding_example` (mask 0), in local batches."""
  dataset = dataset.concatenate(tf.data.Dataset.from_tensors(padding_example).repeat(padding))
  return dataset.batch(local_batch, drop_remainder=True).with_options(_options()).prefetch(tf.data.AUTOTUNE)


def create_eval_dataset(
  config=None,
  *,
  split: str | None = None,
  global_batch_size: int,
  image_size: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  **overrides,
):
  """Finite evaluation stream of local batches covering `split` once, padded with mask 0.

  Every process yields the same number of batches, ceil(ceil(N / process_count) / local_batch),
  so multi-host evaluation steps stay in lockstep; the padding (and any undecodable image, see
  `decodable`) has mask 0. Classification datasets only: label maps are evaluated image by image
  at their own sizes (`create_segmentation_eval_dataset`).

  Returns:
    tf.data.Dataset of dicts: image uint8 (local_batch, S, S, 3) (S = image_size or
    config.image_size; normalized on the device), label int32, mask float32 (1 real, 0 padding),
    example_id int64 (-1 for padding), each (local_batch,).
  """
  values = settings(config, **overrides)
  if values["dataset"] in SEGMENTATION_DATASETS:
    raise ValueError(f"{values['dataset']} holds label maps: its evaluation stream is create_segmentation_eval_dataset")
  if values["dataset"] in DETECTION_DATASETS:
    raise ValueError(f"{values['dataset']} holds instances: its evaluation stream is create_detection_eval_dataset")
  split = split or values["eval_split"]
  image_size = int(image_size or values["image_size"])
  local_batch = _local_batch_size(global_batch_size, process_count)
  builder = get_builder(values["dataset"], values["data_dir"])
  num_examples = builder.info.splits[split].num_examples
  num_batches = math.ceil(math.ceil(num_examples / process_count) / local_batch)
  process_split = _process_split(split, process_index, process_count)
  local_examples = builder.info.splits[process_split].num_examples
  crop_ratio = values["eval_crop_ratio"]

  def preprocess(example):
    return {
      "image": eval_image(example["image"], image_size, crop_ratio),
      "label": tf.cast(example["label"], tf.int32),
      "mask": tf.constant(1.0, tf.float32),
      "example_id": _example_id(example),
    }

  padding_example = {
    "image": tf.zeros([image_size, image_size, 3], tf.uint8),
    "label": tf.constant(0, tf.int32),
    "mask": tf.constant(0.0, tf.float32),
    "example_id": tf.constant(-1, tf.int64),
  }
  decoders = {"image": tfds.decode.SkipDecoding()}
  dataset = _split_examples(builder, process_split, decoders, padding_example, preprocess, "has mask 0 in evaluation")
  return _padded_batches(dataset, padding_example, num_batches * local_batch - local_examples, local_batch)


def create_segmentation_eval_dataset(
  config=None,
  *,
  split: str | None = None,
  ratios: tuple[float, ...] | None = None,
  process_index: int = 0,
  process_count: int = 1,
  **overrides,
):
  """Finite evaluation stream of one label-map dataset's `split`: this process's share, one
  example per element (images differ in size; mmseg evaluates with batch size 1).

  Process k of P reads `tfds.even_splits(split, P)[k]`, so the processes together read the split
  once; they need not stay in lockstep (their totals are summed once at the end). The image is
  resized as mmseg's test pipeline (or its tta_pipeline, `ratios` not None) resizes it,
  `segment_augment.eval_views` with config.seg_aug.eval_scale, and never padded; the label map
  keeps its original size, where predictions are scored. An undecodable image (see `decodable`)
  gives an element with mask 0 and empty (0 x 0) views and label.

  Returns:
    tf.data.Dataset of dicts: views, a tuple of uint8 (h_i, w_i, 3) images (one, or one per
    ratio); label uint8 (H, W), the original map (255 = ignored); mask float32 () (1 real, 0
    undecodable); example_id int64 ().
  """
  values = settings(config, **overrides)
  checks.one_of("config.dataset", values["dataset"], SEGMENTATION_DATASETS)
  split = split or values["eval_split"]
  builder = get_builder(values["dataset"], values["data_dir"])
  process_split = _process_split(split, process_index, process_count)
  scale = tuple(values["segmentation_augmentation"].eval_scale)
  ratios = None if ratios is None else tuple(float(ratio) for ratio in ratios)
  num_views = 1 if ratios is None else len(ratios)

  def preprocess(example):
    image = decodable.decode_window(example["image"], decodable.full_window)
    return {
      "views": segment_augment.eval_views(image, scale, ratios),
      "label": tf.io.decode_png(example["label"], channels=1)[..., 0],
      "mask": tf.constant(1.0, tf.float32),
      "example_id": _example_id(example),
    }

  padding_example = {
    "views": tuple(tf.zeros([0, 0, 3], tf.uint8) for _ in range(num_views)),
    "label": tf.zeros([0, 0], tf.uint8),
    "mask": tf.constant(0.0, tf.float32),
    "example_id": tf.constant(-1, tf.int64),
  }
  decoders = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
  dataset = _split_examples(builder, process_split, decoders, padding_example, preprocess, "has mask 0 in evaluation")
  return dataset.with_options(_options()).prefetch(tf.data.AUTOTUNE)


def create_detection_eval_dataset(
  config=None,
  *,
  split: str | None = None,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  **overrides,
):
  """Finite evaluation stream of a detection dataset's `split`: fixed-shape local batches of
  canvases, this process's share, padded with mask 0 so that every process yields the same
  number of batches, ceil(ceil(N / process_count) / local_batch) (the batches run in lockstep
  through one jitted `predict` over the global mesh).

  Each image goes through mmdet's test pipeline (`detect_augment.eval_example`: resized to fit
  config.det_aug.scale keeping its ratio, on the det_aug.canvas). An undecodable image (see
  `decodable`) gets mask 0.

  Returns:
    tf.data.Dataset of dicts: image uint8 (local_batch, ch, cw, 3); image_size int32
    (local_batch, 2) resized (height, width); original_size int32 (local_batch, 2); image_id int64 (the dataset's
    image/id, -1 for padding); mask float32 (1 real, 0 padding); example_id int64.
  """
  values = settings(config, **overrides)
  checks.one_of("config.dataset", values["dataset"], DETECTION_DATASETS)
  split = split or values["eval_split"]
  local_batch = _local_batch_size(global_batch_size, process_count)
  builder = get_builder(values["dataset"], values["data_dir"])
  num_examples = builder.info.splits[split].num_examples
  num_batches = math.ceil(math.ceil(num_examples / process_count) / local_batch)
  process_split = _process_split(split, process_index, process_count)
  local_examples = builder.info.splits[process_split].num_examples
  aug = values["detection_augmentation"]
  canvas_h, canvas_w = aug.canvas

  def preprocess(example):
    image = decodable.decode_window(example["image"], decodable.full_window)
    return {
      **detect_augment.eval_example(image, aug),
      "image_id": tf.cast(example["image/id"], tf.int64),
      "mask": tf.constant(1.0, tf.float32),
      "example_id": _example_id(example),
    }

  padding_example = {
    "image": tf.zeros([canvas_h, canvas_w, 3], tf.uint8),
    "image_size": tf.constant([canvas_h, canvas_w], tf.int32),
    "original_size": tf.constant([canvas_h, canvas_w], tf.int32),
    "image_id": tf.constant(-1, tf.int64),
    "mask": tf.constant(0.0, tf.float32),
    "example_id": tf.constant(-1, tf.int64),
  }
  dataset = _split_examples(builder, process_split, _INSTANCE_DECODERS, padding_example, preprocess, "is not evaluated")
  return _padded_batches(dataset, padding_example, num_batches * local_batch - local_examples, local_batch)

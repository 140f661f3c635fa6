"""Which records of a prepared TFDS dataset cannot be decoded, found once and looked up in graph.

The training and evaluation streams decode with TensorFlow's C++ ops only: a `tf.py_function`
that catches decode errors would hold Python's GIL for every image, which caps a pod host's
input rate whatever its core count. Instead, every TFRecord file a stream reads is checked
once, with the very decode the streams use (`decode_image`, and `tf.io.decode_png` of label
maps), in a parallel tf.data pass that drops failing records (`ignore_errors`). The result is
stored next to the dataset, `<builder.data_dir>/undecodable/<file>.json`, so the check runs on
`prepare` or on the first stream that reads the file, and never again. A stream turns it into a
sorted int64 table of (file position << 32 | record index) keys, looked up with
`tf.searchsorted` per window or per record.

TFDS's own `imagenet2012` builder re-encodes the CMYK and PNG files it knows while preparing;
TensorFlow decodes CMYK JPEGs and PNGs anyway, so what is left to catch is truncated or
corrupt bytes.
"""

import concurrent.futures
import json
import logging
import os
import uuid

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from shufflemamba_jax.data import augment

_LOGGER = logging.getLogger(__name__)

FOLDER = "undecodable"
_FORMAT = 1  # Version of the stored JSON; another version is checked again.
_IO_THREADS = 32  # Reads of small files on a bucket are latency-bound: overlap them.
_ERRORS = (tf.errors.OpError, ValueError)


def is_jpeg(image_bytes: tf.Tensor) -> tf.Tensor:
  """bool: the bytes start with a JPEG SOI marker (in graph)."""
  return tf.equal(tf.strings.substr(image_bytes, 0, 3), b"\xff\xd8\xff")


def decode_window(image_bytes: tf.Tensor, window_fn) -> tf.Tensor:
  """uint8 (h, w, 3): the window `window_fn(int32 (3,) shape)` = (top, left, height, width).

  A JPEG decodes only the window (`decode_and_crop_jpeg`, after a header parse); PNG, GIF and
  BMP decode whole and are sliced. In graph, with no error handling: a stream decodes only
  records this module has checked.
  """

  def jpeg():
    window = tf.cast(window_fn(tf.image.extract_jpeg_shape(image_bytes)), tf.int32)
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = augment.decode_image(image_bytes)
    top, left, height, width = tf.unstack(tf.cast(window_fn(tf.shape(image)), tf.int32))
    return image[top : top + height, left : left + width]

  image = tf.cond(is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def full_window(shape: tf.Tensor) -> tf.Tensor:
  """The window of the whole image, for `decode_window`."""
  return tf.stack([0, 0, shape[0], shape[1]])


def decode_error(image_bytes: bytes, label_bytes: bytes | None = None) -> str | None:
  """Why the bytes cannot be decoded as the streams decode them (eagerly), or None."""
  try:
    augment.decode_image(image_bytes)
    if label_bytes is not None:
      tf.io.decode_png(label_bytes, channels=1)
  except _ERRORS as error:
    return str(error).splitlines()[0].split("}}")[-1].strip() or type(error).__name__
  return None


def _decoders(features) -> dict:
  # The encoded bytes of the images (and of label maps, which are images too), as the streams read them.
  # Detection sets have no top-level label: their masks are written by our builders, not read from files.
  names = [name for name in ("image", "label") if name in features and isinstance(features[name], tfds.features.Image)]
  return {name: tfds.decode.SkipDecoding() for name in names}


def _check_files(builder, files: dict[str, int]) -> dict[str, list[dict]]:
  """{basename: [{"index", "file_name", "reason"}]} of the files {path: number of records}."""
  features = builder.info.features
  decoders = _decoders(features)
  paths = sorted(files)

  def check(position, index, record):
    example = features.deserialize_example(record, decoders=decoders)
    # The sizes are returned, not just depended on: tf.data prunes ops whose results are unused.
    size = tf.size(augment.decode_image(example["image"]))
    if "label" in decoders:
      size += tf.size(tf.io.decode_png(example["label"], channels=1))
    return position * 2**32 + index, size

  def records(position, path):
    return tf.data.TFRecordDataset(path).enumerate().map(lambda index, record: (position, index, record))

  dataset = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
  dataset = dataset.interleave(records, cycle_length=8, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  dataset = dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors()
  options = tf.data.Options()
  options.deterministic = False
  batches = dataset.batch(4096).with_options(options).as_numpy_iterator()
  decoded = np.concatenate([np.zeros([0], np.int64), *(keys for keys, _ in batches)])
  found = {path: [] for path in paths}
  for position, path in enumerate(paths):
    good = decoded[(decoded >> 32) == position] & (2**32 - 1)
    for index in sorted(set(range(files[path])) - set(good.tolist())):
      found[path].append(_describe(builder, decoders, path, index))
  return {os.path.basename(path): found[path] for path in paths}


def _describe(builder, decoders, path: str, index: int) -> dict:
  """The file name and the decode error of one failing record, read again eagerly (rare)."""
  try:
    record = next(iter(tf.data.TFRecordDataset(path).skip(index).take(1)))
    example = builder.info.features.deserialize_example(record, decoders=decoders)
    names = [example[key] for key in ("file_name", "image/filename") if key in example]  # coco: image/filename.
    name = names[0].numpy().decode("utf-8", "replace") if names else f"#{index}"
    label = example["label"].numpy() if "label" in decoders else None
    return {"index": index, "file_name": name, "reason": decode_error(example["image"].numpy(), label)}
  except _ERRORS as error:
    return {"index": index, "file_name": f"#{index}", "reason": f"unreadable record: {error}".splitlines()[0]}


def _load(path: epath.Path) -> list[dict] | None:
  try:
    stored = json.loads(path.read_text())
  except (OSError, ValueError, tf.errors.OpError):
    return None  # Missing, unreadable or half-written by a process that died: checked again.
  return stored["records"] if isinstance(stored, dict) and stored.get("format") == _FORMAT else None


def _store(folder: epath.Path, basename: str, records: list[dict]) -> None:
  target = folder / f"{basename}.json"
  # Written whole under a unique name, then renamed: processes checking the same file concurrently
  # (a file on a shard boundary) write the same content, and a reader never sees half a file.
  temporary = folder / f".{basename}.{uuid.uuid4().hex}.tmp"
  temporary.write_text(json.dumps({"format": _FORMAT, "records": records}))
  temporary.replace(target)


def undecodable_records(builder, files: dict[str, int]) -> dict[str, list[dict]]:
  """{basename: failing records} of the TFRecord files {path: number of records} of `builder`.

  Stored results are read (in parallel threads); the other files are checked in one parallel
  tf.data pass and their results stored. A dataset folder that cannot be written to (a shared,
  read-only bucket) costs a warning and a check in every process that reads it.
  """
  folder = epath.Path(builder.data_dir) / FOLDER
  with concurrent.futures.ThreadPoolExecutor(_IO_THREADS) as pool:
    stored = dict(zip(files, pool.map(lambda path: _load(folder / f"{os.path.basename(path)}.json"), files)))
  missing = {path: count for path, count in files.items() if stored[path] is None}
  if not missing:
    return {os.path.basename(path): records for path, records in stored.items()}
  _LOGGER.info("Checking that the %d records of %d TFRecord file(s) decode.", sum(missing.values()), len(missing))
  checked = _check_files(builder, missing)
  try:
    folder.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(_IO_THREADS) as pool:
      list(pool.map(lambda item: _store(folder, *item), checked.items()))
  except (OSError, tf.errors.OpError) as error:
    _LOGGER.warning("Cannot store the decode check in %s (%s): it runs again next time.", folder, error)
  return {**{os.path.basename(path): records for path, records in stored.items() if records is not None}, **checked}


def check_splits(builder) -> int:
  """Checks every file of every split of a prepared dataset (at `prepare` time); returns the failures."""
  files = {}
  for split in builder.info.splits.values():
    for instruction in split.file_instructions:
      files[os.fspath(instruction.filename)] = instruction.examples_in_shard
  found = undecodable_records(builder, files)
  for basename, records in sorted(found.items()):
    for record in records:
      _warn(basename, record, "will be replaced in training and masked in evaluation")
  return sum(map(len, found.values()))


def _warn(basename: str, record: dict, consequence: str) -> None:
  _LOGGER.warning(
    "Undecodable image %r (record %d of %s: %s) %s.",
    record["file_name"],
    record["index"],
    basename,
    record["reason"],
    consequence,
  )


def key(position, index):
  """int64 key of record `index` of the file at `position` in a `Lookup`'s file order (in graph)."""
  return tf.cast(position, tf.int64) * 2**32 + tf.cast(index, tf.int64)


class Lookup:
  """The undecodable records of the files a stream reads, as an in-graph membership test.

  files: the stream's TFRecord files {path: number of records}; a record is keyed by its file's
  position in that order (an int64 the stream carries with each chunk) and its index in the file.
  """

  def __init__(self, builder, files: dict[str, int]):
    self.positions = {path: position for position, path in enumerate(files)}
    found = undecodable_records(builder, files)
    self.records = [(path, record) for path in files for record in found[os.path.basename(path)]]
    keys = [int(key(self.positions[path], record["index"])) for path, record in self.records]
    # A -1 sentinel first: never a key, and the table is never empty.
    self._keys = np.sort(np.asarray([-1, *keys], np.int64))

  def warn(self, consequence: str) -> None:
    """Names every undecodable image of the stream in the log, once, with what happens to it."""
    for path, record in self.records:
      _warn(os.path.basename(path), record, consequence)

  def contains(self, keys: tf.Tensor) -> tf.Tensor:
    """bool, the shape of `keys` (int64, from `key`): which records are undecodable."""
    table = tf.constant(self._keys)
    flat = tf.reshape(keys, [-1])
    found = tf.gather(table, tf.minimum(tf.searchsorted(table, flat), len(self._keys) - 1))
    return tf.reshape(tf.equal(found, flat), tf.shape(keys))

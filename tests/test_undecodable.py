"""Undecodable images without Python per image: found once, stored, looked up in graph.

The tiny ImageNet of data_fixtures holds a corrupt JPEG, a truncated JPEG, a PNG and a CMYK JPEG
among its 12 training images, each under a .JPEG name as in the real archive.
"""

import io
import json
import logging
import pathlib
import shutil
import tarfile
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from tensorflow.core.framework import graph_pb2  # pylint: disable=g-import-not-at-top

from shufflemamba_jax.data import augment, decodable, pipeline  # pylint: disable=g-import-not-at-top

from data_fixtures import CMYK_TRAIN_IMAGE, CORRUPT_TRAIN_IMAGE, PNG_TRAIN_IMAGE, TRUNCATED_TRAIN_IMAGE  # pylint: disable=g-import-not-at-top

UNDECODABLE = (CORRUPT_TRAIN_IMAGE, TRUNCATED_TRAIN_IMAGE)
IMAGE_SIZE = 24


def _stream(data_dir, start_step=0, **overrides):
  return pipeline.create_train_dataset(
    global_batch_size=4,
    start_step=start_step,
    dataset="imagenet2012",
    data_dir=data_dir,
    image_size=IMAGE_SIZE,
    **overrides,
  )


def _batches(dataset, count):
  return [{k: v.numpy() for k, v in batch.items()} for batch in dataset.take(count)]


def _name_of(file_labels):
  by_id = {int(tf.strings.to_hash_bucket_fast(name, 2**63 - 1)): name for name in file_labels}
  return lambda example_id: by_id[int(example_id)]


def _train_bytes(data_dir, name):
  """The bytes of a training image in the manual tars (a tar of tars, one per synset)."""
  with tarfile.open(f"{data_dir}/../manual/ILSVRC2012_img_train.tar") as train:
    with tarfile.open(fileobj=train.extractfile(f"{name.split('_')[0]}.tar")) as synset:
      return synset.extractfile(name).read()


def _python_ops(dataset) -> list[str]:
  graph = graph_pb2.GraphDef()
  graph.ParseFromString(dataset._as_serialized_graph().numpy())  # pylint: disable=protected-access
  ops = [node.op for node in graph.node] + [node.op for f in graph.library.function for node in f.node_def]
  return sorted(op for op in ops if "PyFunc" in op)


def test_the_check_finds_the_undecodable_images_and_stores_them(imagenet_data):
  data_dir, _ = imagenet_data
  builder = pipeline.get_builder("imagenet2012", data_dir)
  stored = {
    path.name: json.loads(path.read_text())
    for path in (pathlib.Path(builder.data_dir) / decodable.FOLDER).glob("*.json")
  }
  assert sorted(stored) == [
    "imagenet2012-train.tfrecord-00000-of-00001.json",
    "imagenet2012-validation.tfrecord-00000-of-00001.json",
  ]
  train = stored["imagenet2012-train.tfrecord-00000-of-00001.json"]["records"]
  assert sorted(record["file_name"] for record in train) == sorted(UNDECODABLE)
  assert all("JPEG" in record["reason"] or "jpeg" in record["reason"] for record in train), train
  assert stored["imagenet2012-validation.tfrecord-00000-of-00001.json"]["records"] == []
  # The indices point at those records.
  records = list(
    tf.data.TFRecordDataset(str(pathlib.Path(builder.data_dir) / "imagenet2012-train.tfrecord-00000-of-00001"))
  )
  for record in train:
    skip = {"image": tfds.decode.SkipDecoding()}
    example = builder.info.features.deserialize_example(records[record["index"]], decoders=skip)
    assert example["file_name"].numpy().decode() == record["file_name"]


def test_no_python_runs_per_image(imagenet_data):
  data_dir, _ = imagenet_data
  # The window plan is the one Python generator (3 PyFuncs: init, next, finalize), called once
  # per window of thousands of images; nothing per image.
  assert _python_ops(_stream(data_dir)) == ["PyFunc"] * 3
  assert _python_ops(_stream(data_dir, data_shards=2)) == ["PyFunc"] * 6  # One plan per local shard.
  evaluation = pipeline.create_eval_dataset(
    global_batch_size=4, dataset="imagenet2012", data_dir=data_dir, image_size=IMAGE_SIZE
  )
  assert _python_ops(evaluation) == []


def test_undecodable_images_are_replaced_and_named_and_resume_stays_exact(imagenet_data, caplog):
  data_dir, file_labels = imagenet_data
  name_of = _name_of(file_labels)
  caplog.set_level(logging.WARNING)
  # 12 images, 3 steps of 4 per epoch: three epochs, each meeting both undecodable images.
  full = _batches(_stream(data_dir), 9)
  messages = [record.getMessage() for record in caplog.records]
  for name in UNDECODABLE:
    assert any(name in message and "replaced" in message for message in messages), (name, messages)
  names = [name_of(i) for batch in full for i in batch["example_id"]]
  assert len(names) == 36 and not set(names) & set(UNDECODABLE)
  assert {PNG_TRAIN_IMAGE, CMYK_TRAIN_IMAGE} <= set(names)
  for epoch in range(3):  # Each epoch: the 10 decodable images, two of them twice (the substitutes).
    assert set(names[12 * epoch : 12 * epoch + 12]) == set(file_labels) - set(UNDECODABLE) - {
      name for name in file_labels if name.startswith("ILSVRC2012_val")
    }
  for start_step in (2, 4):  # Mid-epoch, before and after substitutions.
    resumed = _batches(_stream(data_dir, start_step), 9 - start_step)
    for expected, got in zip(full[start_step:], resumed):
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key} at step {start_step}")


def test_png_and_cmyk_images_decode_correctly_in_training_and_evaluation(imagenet_data):
  data_dir, file_labels = imagenet_data
  name_of = _name_of(file_labels)
  evaluated = _batches(
    pipeline.create_eval_dataset(
      global_batch_size=4,
      split="train",
      dataset="imagenet2012",
      data_dir=data_dir,
      image_size=IMAGE_SIZE,
      eval_crop_ratio=1.0,
    ),
    3,
  )
  rows = {
    name_of(i): (image, mask)
    for batch in evaluated
    for i, image, mask in zip(batch["example_id"], batch["image"], batch["mask"])
  }
  assert len(rows) == 12
  for name in UNDECODABLE:
    assert rows[name][1] == 0 and not rows[name][0].any()  # Masked, never decoded.
  from PIL import Image  # pylint: disable=g-import-not-at-top

  for name, tolerance in ((PNG_TRAIN_IMAGE, 0.0), (CMYK_TRAIN_IMAGE, 2.0)):
    data = _train_bytes(data_dir, name)
    assert data[:3] != b"\xff\xd8\xff" if name == PNG_TRAIN_IMAGE else Image.open(io.BytesIO(data)).mode == "CMYK"
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    expected = augment.to_uint8(augment.eval_resize_and_center_crop(tf.constant(pixels), IMAGE_SIZE, 1.0)).numpy()
    image, mask = rows[name]
    assert mask == 1
    # PNG is lossless; Pillow and libjpeg turn CMYK into RGB with slightly different rounding.
    assert np.abs(image.astype(int) - expected).mean() <= tolerance, name
  # In training, the crop window of the PNG is cut from its pixels like a JPEG's.
  window_fn = lambda shape: tf.constant([3, 5, 20, 17])  # noqa: E731
  png = _train_bytes(data_dir, PNG_TRAIN_IMAGE)
  np.testing.assert_array_equal(
    decodable.decode_window(png, window_fn).numpy(), np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[3:23, 5:22]
  )


def test_the_stored_check_is_reused_and_a_missing_one_is_redone(imagenet_data, tmp_path, monkeypatch, caplog):
  data_dir, _ = imagenet_data
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir, copy)
  folder = copy / "imagenet2012" / "5.1.0" / decodable.FOLDER
  expected = json.loads((folder / "imagenet2012-train.tfrecord-00000-of-00001.json").read_text())
  # Stored: no file is checked again.
  checked, original = [], decodable._check_files  # pylint: disable=protected-access

  def check_files(builder, files):
    checked.append(files)
    return original(builder, files)

  monkeypatch.setattr(decodable, "_check_files", check_files)
  _stream(str(copy))
  assert checked == []
  # Missing or half-written: checked again, and stored again.
  (folder / "imagenet2012-train.tfrecord-00000-of-00001.json").write_text('{"format": 1, "rec')
  (folder / "imagenet2012-validation.tfrecord-00000-of-00001.json").unlink()
  pipeline.create_eval_dataset(global_batch_size=4, dataset="imagenet2012", data_dir=str(copy), image_size=8)
  _stream(str(copy))
  assert [sorted(p.rsplit("/", 1)[-1] for p in files) for files in checked] == [
    ["imagenet2012-validation.tfrecord-00000-of-00001"],
    ["imagenet2012-train.tfrecord-00000-of-00001"],
  ]
  assert json.loads((folder / "imagenet2012-train.tfrecord-00000-of-00001.json").read_text()) == expected
  assert not list(folder.glob("*.tmp"))
  # A folder that cannot be written to: a warning naming it, and the stream still works.
  (folder / "imagenet2012-train.tfrecord-00000-of-00001.json").unlink()

  def refuse(*args):
    raise PermissionError("read-only bucket")

  monkeypatch.setattr(decodable, "_store", refuse)
  caplog.set_level(logging.WARNING)
  batch = _batches(_stream(str(copy)), 1)[0]
  assert batch["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert any(str(folder) in r.getMessage() and "read-only" in r.getMessage() for r in caplog.records)


def test_the_benchmark_times_python_callbacks_and_the_stream_has_almost_none(digits_data_dir):
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(__file__).parent.parent / "benchmarks" / "input_pipeline.py"
  spec = importlib.util.spec_from_file_location("input_pipeline_benchmark", path)
  benchmark = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(benchmark)

  def slow(x):
    time.sleep(0.002)
    return x

  originals = (tf.py_function, tf.data.Dataset.from_generator)
  with benchmark.PythonCallbacks() as callbacks:
    dataset = tf.data.Dataset.range(20).map(lambda x: tf.py_function(slow, [x], tf.int64))
  assert (tf.py_function, tf.data.Dataset.from_generator) == originals  # Restored on exit.
  assert len(list(dataset)) == 20
  assert 0.04 <= callbacks.seconds < 1.0  # 20 calls of 2 ms each, timed.
  # The project's stream: only the window plan calls Python, once per window of hundreds.
  with benchmark.PythonCallbacks() as callbacks:
    stream = pipeline.create_train_dataset(
      global_batch_size=64, data_dir=digits_data_dir, dataset="digits", image_size=8
    )
  images = sum(len(batch["label"]) for batch in stream.take(30).as_numpy_iterator())
  assert 0 < callbacks.seconds / images * 1e6 < 20, callbacks.seconds  # The goal: at most 20 us per image.

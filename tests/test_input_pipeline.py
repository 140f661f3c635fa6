"""Input pipeline: TFDS builders, seeded order, exact resume, process slices, data shards,
eval padding."""

import logging

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
ml_collections = pytest.importorskip("ml_collections")

from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

from data_fixtures import CORRUPT_TRAIN_IMAGE, TRUNCATED_TRAIN_IMAGE  # pylint: disable=g-import-not-at-top

# Cheap settings for order tests: no decoding-heavy augmentation, several windows per epoch
# (1437 examples, windows of >= 300 in chunks of 64) so that resume starts mid-window.
FAST = dict(
  dataset="digits",
  image_size=8,
  inception_crop=False,
  randaugment_num_ops=0,
  random_erasing_prob=0.0,
  repeated_aug=1,
  shuffle_buffer=300,
  records_per_chunk=64,
)
BATCH = 64
STEPS_PER_EPOCH = 1437 // BATCH  # 22


def _batches(dataset, count):
  return [{k: v.numpy() for k, v in batch.items()} for batch in dataset.take(count)]


def _ids(batches):
  return np.concatenate([b["example_id"] for b in batches])


@pytest.fixture(scope="module")
def recorded_stream(digits_data_dir):
  """Two epochs (44 batches) of the seed-0 digits stream, from step 0."""
  dataset = pipeline.create_train_dataset(global_batch_size=BATCH, data_dir=digits_data_dir, seed=0, **FAST)
  return _batches(dataset, 2 * STEPS_PER_EPOCH)


def test_digits_builds_offline_with_a_fixed_split(digits_data_dir):
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  info = pipeline.get_dataset_info("digits", digits_data_dir)
  assert (info.num_classes, info.num_examples("train"), info.num_examples("validation")) == (10, 1437, 360)
  assert info.num_examples("train[:50%]") == 718  # A slice counts as TFDS cuts it (rounded down).
  builder = pipeline.get_builder("digits", digits_data_dir)
  target = load_digits().target
  ids = {}
  for split in ("train", "validation"):
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    ids[split] = {int(e["id"]) for e in examples}
    for e in examples[:50]:
      assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8
      assert np.array_equal(e["image"][..., 0], e["image"][..., 2]) and e["image"].max() > 200
      assert e["label"] == target[e["id"]] and e["file_name"].decode() == f"digit_{e['id']:04d}.png"
  assert not ids["train"] & ids["validation"]
  assert ids["train"] | ids["validation"] == set(range(1797))


def test_train_order_is_a_function_of_seed_and_epoch(digits_data_dir, recorded_stream):
  epoch0, epoch1 = recorded_stream[:STEPS_PER_EPOCH], recorded_stream[STEPS_PER_EPOCH:]
  for batch in recorded_stream:
    assert batch["image"].shape == (BATCH, 8, 8, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["example_id"].dtype == np.int64
  assert {int(b["epoch"][0]) for b in epoch0} == {0} and {int(b["epoch"][0]) for b in epoch1} == {1}
  ids0, ids1 = _ids(epoch0), _ids(epoch1)
  # Without repeated augmentation an epoch holds distinct examples: 22 * 64 of the 1437.
  assert len(set(ids0)) == len(ids0) == STEPS_PER_EPOCH * BATCH
  assert len(set(ids1)) == len(ids1)
  assert np.mean(ids0 == ids1) < 0.05  # A new order every epoch.
  again = _batches(
    pipeline.create_train_dataset(global_batch_size=BATCH, data_dir=digits_data_dir, seed=0, **FAST),
    STEPS_PER_EPOCH + 2,
  )
  np.testing.assert_array_equal(_ids(again), _ids(recorded_stream[: STEPS_PER_EPOCH + 2]))
  np.testing.assert_array_equal(again[-1]["image"], recorded_stream[STEPS_PER_EPOCH + 1]["image"])
  other_seed = _batches(
    pipeline.create_train_dataset(global_batch_size=BATCH, data_dir=digits_data_dir, seed=1, **FAST), 2
  )
  assert np.mean(_ids(other_seed) == _ids(recorded_stream[:2])) < 0.05


@pytest.mark.parametrize("start_step", [9, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 13])
def test_start_step_resumes_the_exact_stream(digits_data_dir, recorded_stream, start_step):
  resumed = _batches(
    pipeline.create_train_dataset(
      global_batch_size=BATCH, start_step=start_step, data_dir=digits_data_dir, seed=0, **FAST
    ),
    3,
  )
  for got, want in zip(resumed, recorded_stream[start_step : start_step + 3]):
    np.testing.assert_array_equal(got["example_id"], want["example_id"])
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(got["image"], want["image"])  # Augmentation seeds too.


def test_process_slices_are_disjoint_and_cover_the_split(digits_data_dir):
  process_count, global_batch = 3, 48
  local_epoch = (1437 // global_batch) * (global_batch // process_count)
  train_ids, eval_ids, eval_batches = [], [], []
  for process in range(process_count):
    stream = _batches(
      pipeline.create_train_dataset(
        global_batch_size=global_batch,
        process_index=process,
        process_count=process_count,
        data_dir=digits_data_dir,
        **FAST,
      ),
      1437 // global_batch,
    )
    assert stream[0]["image"].shape[0] == global_batch // process_count  # Local batch.
    ids = _ids(stream)
    assert len(set(ids)) == len(ids) == local_epoch
    train_ids.append(set(ids))
    batches = _batches(
      pipeline.create_eval_dataset(
        global_batch_size=30, process_index=process, process_count=process_count, data_dir=digits_data_dir, **FAST
      ),
      100,
    )
    eval_batches.append(len(batches))
    real = np.concatenate([b["mask"] for b in batches]) > 0
    eval_ids.append(_ids(batches)[real])
  for a in range(process_count):
    for b in range(a + 1, process_count):
      assert not train_ids[a] & train_ids[b]
      assert not set(eval_ids[a]) & set(eval_ids[b])
  all_eval = np.concatenate(eval_ids)
  assert len(all_eval) == len(set(all_eval)) == 360  # Evaluation covers the split once.
  assert len(set(eval_batches)) == 1  # Every process runs the same number of eval steps.


def _global_batches(digits_data_dir, count, process_count, **settings):
  """The first `count` global batches: the local batches of all processes concatenated."""
  local = [
    _batches(
      pipeline.create_train_dataset(
        global_batch_size=BATCH,
        process_index=process,
        process_count=process_count,
        data_dir=digits_data_dir,
        **settings,
      ),
      count,
    )
    for process in range(process_count)
  ]
  for batch in local[0]:
    assert batch["example_id"].shape == (BATCH // process_count,)
  return [{key: np.concatenate([stream[i][key] for stream in local]) for key in local[0][i]} for i in range(count)]


def _assert_same_batches(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])  # Ids, labels, epochs and images, bitwise.


def _shard_ids(digits_data_dir, num_shards):
  builder = pipeline.get_builder("digits", digits_data_dir)
  return [
    {
      int(e["id"])
      for e in tfds.as_numpy(builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()}))
    }
    for split in tfds.even_splits("train", num_shards)
  ]


def test_data_shards_make_the_stream_independent_of_the_process_count(digits_data_dir):
  # Windows of 48 examples per shard, 16 per step: batches 0-3 cross a window boundary.
  settings = dict(FAST, shuffle_buffer=40, records_per_chunk=16, random_erasing_prob=0.5, data_shards=4)
  single = _global_batches(digits_data_dir, 4, 1, **settings)
  ids = _ids(single)
  assert len(set(ids)) == len(ids) == 4 * BATCH
  shard_ids = _shard_ids(digits_data_dir, 4)
  for batch in single:  # Global batch = shard 0's sub-batch, then shard 1's, ...
    for shard, rows in enumerate(np.split(batch["example_id"], 4)):
      assert set(rows.tolist()) <= shard_ids[shard]
  for process_count in (2, 4):
    _assert_same_batches(_global_batches(digits_data_dir, 4, process_count, **settings), single)


def test_data_shards_resume_with_another_process_count(digits_data_dir):
  settings = dict(FAST, random_erasing_prob=0.5, data_shards=2)
  epoch = _global_batches(digits_data_dir, STEPS_PER_EPOCH, 1, **settings)
  ids = _ids(epoch)
  assert len(set(ids)) == len(ids) == STEPS_PER_EPOCH * BATCH  # No example twice in an epoch.
  start_step = 13
  builder = pipeline.get_builder("digits", digits_data_dir)
  for shard_split in tfds.even_splits("train", 2):  # Step 13 is inside a window of each shard.
    chunks = pipeline._chunks(  # pylint: disable=protected-access
      builder.info.splits[shard_split].file_instructions, FAST["records_per_chunk"]
    )
    windows = pipeline.plan_epoch(
      chunks, 0, 0, 0, FAST["shuffle_buffer"], STEPS_PER_EPOCH * BATCH // 2, start_position=start_step * BATCH // 2
    )
    assert windows[0].index > 0 and windows[0].offset > 0
  for process_count in (2, 1):
    resumed = _global_batches(digits_data_dir, 3, process_count, start_step=start_step, **settings)
    _assert_same_batches(resumed, epoch[start_step : start_step + 3])


def test_data_shards_equal_to_the_process_count_is_the_default_stream(digits_data_dir):
  for process in range(2):
    default, explicit = (
      _batches(
        pipeline.create_train_dataset(
          global_batch_size=BATCH,
          process_index=process,
          process_count=2,
          data_dir=digits_data_dir,
          data_shards=shards,
          **FAST,
        ),
        3,
      )
      for shards in (0, 2)
    )
    _assert_same_batches(explicit, default)


def test_invalid_data_shards_are_rejected_naming_the_setting(digits_data_dir):
  with pytest.raises(ValueError, match=r"config\.data_shards=-1"):
    pipeline.create_train_dataset(global_batch_size=BATCH, data_dir=digits_data_dir, data_shards=-1, **FAST)
  config = ml_collections.ConfigDict({"data_shards": 3, "data_dir": digits_data_dir})
  with pytest.raises(ValueError, match=r"config\.data_shards=3: must be a multiple of the 2 processes"):
    pipeline.create_train_dataset(config, global_batch_size=BATCH, process_count=2, **FAST)
  with pytest.raises(ValueError, match=r"config\.data_shards=3: must divide the global batch 64"):
    pipeline.create_train_dataset(global_batch_size=BATCH, data_dir=digits_data_dir, data_shards=3, **FAST)


def test_repeated_augmentation_keeps_epoch_length(digits_data_dir):
  settings = dict(FAST, repeated_aug=3, shuffle_buffer=2048, random_erasing_prob=1.0)
  stream = _batches(
    pipeline.create_train_dataset(global_batch_size=BATCH, data_dir=digits_data_dir, **settings), STEPS_PER_EPOCH
  )
  ids = _ids(stream)
  images = np.concatenate([b["image"] for b in stream])
  assert len(ids) == STEPS_PER_EPOCH * BATCH
  triples = ids[: len(ids) // 3 * 3].reshape(-1, 3)
  assert np.all(triples == triples[:, :1])  # Each image thrice in a row ...
  assert len(set(ids)) == len(triples) + (len(ids) % 3 > 0)  # ... so a third of the images.
  copies = images[: len(triples) * 3].reshape(len(triples), 3, -1)
  assert np.mean(np.any(copies[:, 0] != copies[:, 1], axis=-1)) > 0.9  # Augmented separately.


def test_eval_batches_are_padded_with_mask(digits_data_dir):
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  batches = _batches(
    pipeline.create_eval_dataset(
      global_batch_size=BATCH, data_dir=digits_data_dir, image_size=16, eval_crop_ratio=1.0, dataset="digits"
    ),
    100,
  )
  assert len(batches) == 6  # ceil(360 / 64)
  mask = np.concatenate([b["mask"] for b in batches])
  ids, labels = _ids(batches), np.concatenate([b["label"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  assert images.shape == (6 * BATCH, 16, 16, 3) and images.dtype == np.uint8 and mask.dtype == np.float32
  assert mask.sum() == 360 and np.all(mask[:360] == 1) and np.all(mask[360:] == 0)
  assert np.all(ids[360:] == -1) and np.all(images[360:] == 0)
  np.testing.assert_array_equal(labels[:360], load_digits().target[ids[:360]])


def test_config_dict_fields_drive_the_pipeline(digits_data_dir):
  config = ml_collections.ConfigDict(
    {
      "dataset": "digits",
      "data_dir": digits_data_dir,
      "train_split": "train",
      "eval_split": "validation",
      "image_size": 12,
      "shuffle_buffer": 512,
      "seed": 5,
      "aug": {
        "inception_crop": False,
        "randaugment_num_ops": 0,
        "repeated_aug": 1,
        "random_erasing_prob": 0.0,
        "eval_crop_ratio": 1.0,
      },
    }
  )
  batch = _batches(pipeline.create_eval_dataset(config, global_batch_size=8), 1)[0]
  assert batch["image"].shape == (8, 12, 12, 3)
  batch = _batches(pipeline.create_eval_dataset(config, global_batch_size=8, image_size=20), 1)[0]
  assert batch["image"].shape == (8, 20, 20, 3)
  with pytest.raises(TypeError, match="shufle_buffer"):
    pipeline.create_train_dataset(config, global_batch_size=8, shufle_buffer=4)


def test_imagenet2012_builder_on_tiny_ilsvrc_tars(imagenet_data, caplog):
  data_dir, file_labels = imagenet_data
  info = pipeline.get_dataset_info("imagenet2012", data_dir)
  assert (info.num_classes, info.num_examples("train"), info.num_examples("validation")) == (1000, 12, 6)
  names = tfds.builder("imagenet2012", data_dir=data_dir).info.features["label"].names
  names_by_id = {int(tf.strings.to_hash_bucket_fast(name, 2**63 - 1)): name for name in file_labels}
  caplog.set_level(logging.WARNING, logger=pipeline.__name__)
  # DeiT defaults (inception crop, RandAugment, erasing); 12 // 4 = 3 steps cover the split.
  stream = _batches(
    pipeline.create_train_dataset(global_batch_size=4, dataset="imagenet2012", data_dir=data_dir, image_size=24), 6
  )
  for batch in stream:
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    for example_id, label in zip(batch["example_id"], batch["label"]):
      name = names_by_id[int(example_id)]
      assert name not in (CORRUPT_TRAIN_IMAGE, TRUNCATED_TRAIN_IMAGE) and names[label] == file_labels[name]
  # The undecodable JPEGs were named in a warning and replaced, not a crash.
  for name in (CORRUPT_TRAIN_IMAGE, TRUNCATED_TRAIN_IMAGE):
    assert any(name in record.getMessage() for record in caplog.records), name
  evaluated = _batches(
    pipeline.create_eval_dataset(global_batch_size=4, dataset="imagenet2012", data_dir=data_dir, image_size=24), 10
  )
  assert len(evaluated) == 2 and evaluated[0]["image"].shape == (4, 24, 24, 3)
  mask = np.concatenate([b["mask"] for b in evaluated])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 1, 0, 0])
  for example_id, label in zip(_ids(evaluated)[:6], np.concatenate([b["label"] for b in evaluated])):
    name = names_by_id[int(example_id)]
    assert name.startswith("ILSVRC2012_val_") and names[label] == file_labels[name]


def test_missing_imagenet_tar_error_names_the_file(tmp_path):
  (tmp_path / "ILSVRC2012_img_train.tar").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_val.tar") as error:
    pipeline.prepare("imagenet2012", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path))
  assert str(tmp_path / "ILSVRC2012_img_val.tar") in str(error.value)
  assert "ILSVRC2012_img_train.tar" not in str(error.value)
  with pytest.raises(FileNotFoundError, match="manual_dir"):
    pipeline.check_imagenet_manual_dir(None)
  with pytest.raises(FileNotFoundError, match="shufflemamba_jax.prepare --dataset=imagenet2012"):
    pipeline.get_dataset_info("imagenet2012", str(tmp_path / "empty"))

"""The `coco` builder (shufflemamba_jax/data/coco.py) on tiny archives in COCO 2017's real layout.

The real builder runs through `pipeline.prepare`; what it stored is read back with TFDS and
compared with the zips' bytes, COCO's JSON and pycocotools' own annToMask.
"""

import zipfile

import numpy as np
import pytest
import synthetic_coco
import tensorflow_datasets as tfds
from etils import epath
from pycocotools.coco import COCO

from shufflemamba_jax.data import coco, detection_features, pipeline

# (image id, annotation index in its image) of the annotations mmdet drops: a box 0.4 px wide,
# a category outside the 80, a box off the image, and one of zero area.
DROPPED = {(9, 3), (25, 2), (25, 3), (285, 0)}
# The instance without a valid polygon (one part of 4 coordinates): kept, ignored, empty mask.
NO_VALID_POLYGON = (9, 4)


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
  """(data_dir, manual_dir, {split: instances JSON}, {split: [examples]}) of the tiny COCO, prepared."""
  root = tmp_path_factory.mktemp("coco")
  data = synthetic_coco.write_coco_zips(str(root / "manual"))
  builder = pipeline.prepare("coco", data_dir=str(root / "tfds"), manual_dir=str(root / "manual"), compute_stats=False)
  decoders = {"image": tfds.decode.SkipDecoding()}
  examples = {
    split: sorted(tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders)), key=lambda e: e["image/id"])
    for split in ("train", "validation")
  }
  return str(root / "tfds"), str(root / "manual"), data, examples


def _coco_api(data: dict) -> COCO:
  api = COCO()
  api.dataset = data
  api.createIndex()
  return api


def test_constants_are_coco_80():
  assert len(coco.CATEGORY_IDS) == len(coco.CLASS_NAMES) == coco.NUM_CLASSES == 80
  assert list(coco.CATEGORY_IDS) == sorted(set(coco.CATEGORY_IDS)) and coco.CATEGORY_IDS[-1] == 90
  # The 10 ids of COCO's 91 that the annotation files never use.
  assert sorted(set(range(1, 91)) - set(coco.CATEGORY_IDS)) == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
  assert coco.CLASS_NAMES[coco.LABELS[44]] == "bottle" and coco.CLASS_NAMES[coco.LABELS[90]] == "toothbrush"


def test_images_ids_and_file_names(coco_data):
  _, manual_dir, data, examples = coco_data
  for split, archive, folder in (("train", "train2017.zip", "train2017"), ("validation", "val2017.zip", "val2017")):
    assert [e["image/id"] for e in examples[split]] == sorted(image["id"] for image in data[split]["images"])
    with (epath.Path(manual_dir) / archive).open("rb") as file, zipfile.ZipFile(file) as zipped:
      for example in examples[split]:
        name = example["image/filename"].decode()
        assert name == f"{example['image/id']:012d}.jpg"
        assert example["image"] == zipped.read(f"{folder}/{name}")  # The JPEG as it is, not re-encoded.


def test_objects_match_coco_json_and_pycocotools(coco_data):
  _, _, data, examples = coco_data
  checked = 0
  for split in ("train", "validation"):
    api = _coco_api(data[split])
    for example in examples[split]:
      image_id = int(example["image/id"])
      image = api.imgs[image_id]
      kept = [(k, a) for k, a in enumerate(api.imgToAnns[image_id]) if (image_id, k) not in DROPPED]
      objects = example["objects"]
      assert len(objects["label"]) == len(kept), image_id
      for j, (k, annotation) in enumerate(kept):
        x, y, w, h = annotation["bbox"]
        np.testing.assert_array_equal(objects["bbox"][j], np.float32([x, y, x + w, y + h]))
        assert objects["label"][j] == coco.CATEGORY_IDS.index(annotation["category_id"])
        assert objects["area"][j] == np.float32(annotation["area"])
        mask = objects["mask"][j]
        assert mask.dtype == np.uint8 and mask.shape == (image["height"], image["width"], 1)
        if (image_id, k) == NO_VALID_POLYGON:  # mmdet ignores it; pycocotools would read the part as a box.
          assert objects["is_crowd"][j] and not mask.any()
          continue
        assert objects["is_crowd"][j] == bool(annotation["iscrowd"])
        expected = api.annToMask(annotation)
        assert expected.any()
        np.testing.assert_array_equal(mask[..., 0], expected)
        checked += 1
  assert checked == 7  # 3 polygons, a 3-part polygon, a compressed RLE, 2 crowds (uncompressed and compressed RLE).


def test_kinds_covered_and_degenerate_dropped(coco_data):
  """The tiny set holds what it claims, and the builder keeps images whose annotations all dropped."""
  _, _, data, examples = coco_data
  train = {e["image/id"]: e["objects"] for e in examples["train"]}
  assert [len(train[i]["label"]) for i in (9, 25, 30)] == [4, 2, 0]
  # Labels 0 (person), 79 (toothbrush), 39 (bottle), and the ignored one, 0 (person), in the JSON's order.
  assert train[9]["label"].tolist() == [0, 79, 39, 0] and train[9]["is_crowd"].tolist() == [False] * 3 + [True]
  assert train[25]["label"].tolist() == [0, 16] and train[25]["is_crowd"].tolist() == [True, False]
  assert len(data["train"]["annotations"][1]["segmentation"]) == 3  # Multi-part polygon.
  assert isinstance(data["train"]["annotations"][5]["segmentation"]["counts"], list)  # Uncompressed RLE crowd.
  validation = {e["image/id"]: e["objects"] for e in examples["validation"]}
  assert validation[139]["is_crowd"].tolist() == [False, True] and len(validation[285]["label"]) == 0


def test_metadata_and_pipeline_name(coco_data):
  data_dir, *_ = coco_data
  builder = pipeline.get_builder("coco", data_dir)
  assert builder.name == coco.TFDS_NAME == "coco_instances"
  assert list(builder.info.metadata["category_ids"]) == list(coco.CATEGORY_IDS)
  assert builder.info.features["objects"]["label"].names == list(coco.CLASS_NAMES)
  assert {name: split.num_examples for name, split in builder.info.splits.items()} == {"train": 3, "validation": 2}


def test_keep_annotation_is_mmdet_rule():
  """mmdet's CocoDataset.parse_data_info, on hand-made cases of a 10 x 20 (h x w) image."""
  base = {"bbox": [2.0, 3.0, 4.0, 5.0], "area": 10.0, "category_id": 1}
  assert coco.keep_annotation(base, 10, 20)
  assert not coco.keep_annotation({**base, "ignore": 1}, 10, 20)
  assert not coco.keep_annotation({**base, "bbox": [2.0, 3.0, 0.9, 5.0]}, 10, 20)  # w < 1.
  assert not coco.keep_annotation({**base, "bbox": [2.0, 3.0, 4.0, 0.5]}, 10, 20)  # h < 1.
  assert not coco.keep_annotation({**base, "area": 0.0}, 10, 20)
  assert not coco.keep_annotation({**base, "bbox": [20.0, 3.0, 4.0, 5.0]}, 10, 20)  # Right of the image.
  assert coco.keep_annotation({**base, "bbox": [19.5, -2.0, 4.0, 5.0]}, 10, 20)  # Overlaps it.
  assert not coco.keep_annotation({**base, "category_id": 12}, 10, 20)


def test_missing_archive_is_named(tmp_path):
  manual = tmp_path / "manual"
  synthetic_coco.write_coco_zips(str(manual))
  (manual / "val2017.zip").unlink()
  with pytest.raises(FileNotFoundError, match=r"val2017\.zip") as error:
    pipeline.prepare("coco", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual), compute_stats=False)
  assert "train2017.zip" not in str(error.value)
  with pytest.raises(FileNotFoundError, match="--manual_dir is required for coco"):
    coco.check_manual_dir(None)


def test_category_of_another_name_is_refused():
  with pytest.raises(ValueError, match="category id 44 is named 'cup'"):
    coco._check_categories([{"id": 1, "name": "person"}, {"id": 44, "name": "cup"}], "instances.json")  # pylint: disable=protected-access


def test_missing_image_in_zip_is_named(tmp_path):
  manual = epath.Path(tmp_path / "manual")
  synthetic_coco.write_coco_zips(str(manual))
  with (manual / "val2017.zip").open("wb") as file, zipfile.ZipFile(file, "w") as zipped:
    zipped.writestr("val2017/000000000139.jpg", b"\xff\xd8\xff")  # 000000000285.jpg left out.
  with pytest.raises(FileNotFoundError, match=r"val2017\.zip holds no val2017/000000000285\.jpg \(image id 285"):
    pipeline.prepare("coco", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual), compute_stats=False)


def test_coco_ground_truth_reads_the_pixel_boxes(coco_data):
  """The shared `coco_ground_truth` turns the stored x1y1x2y2 back into the JSON's [x, y, w, h]."""
  data_dir, _, data, _ = coco_data
  truth = detection_features.coco_ground_truth(pipeline.get_builder("coco", data_dir), "validation")
  api = _coco_api(data["validation"])
  checked = 0
  for image in truth["images"]:  # In the order TFDS stored them; an image's annotations in the JSON's.
    boxes = [a["bbox"] for a in truth["annotations"] if a["image_id"] == image["id"]]
    kept = [a["bbox"] for k, a in enumerate(api.imgToAnns[image["id"]]) if (image["id"], k) not in DROPPED]
    assert len(boxes) == len(kept)
    np.testing.assert_allclose(np.reshape(boxes, (-1, 4)), np.reshape(kept, (-1, 4)), rtol=1e-6, atol=1e-4)
    checked += len(boxes)
  assert checked == len(truth["annotations"]) > 0


DET_AUG = dict(scale=(96, 64), canvas=(96, 96), max_gt=3, crop_size=16)


def test_train_stream_skips_images_without_instances_and_pads_ground_truth(coco_data):
  """mmdet's filter_empty_gt: image 30 (no annotation) is never drawn, another image of its
  window takes its place; each example is the detection task's training batch row, crowds are
  kept invalid, and 4 instances are cut to max_gt=3, the crowd first."""
  from shufflemamba_jax.training.tasks import detection  # pylint: disable=g-import-not-at-top

  data_dir, _, data, examples = coco_data
  stream = pipeline.create_train_dataset(
    dataset="coco", data_dir=data_dir, global_batch_size=3, shuffle_buffer=3, det_aug=DET_AUG
  )
  batches = list(stream.take(6).as_numpy_iterator())
  ids = np.concatenate([b["example_id"] for b in batches])
  assert set(ids.tolist()) == {9, 25}  # Six epochs of three examples: 30 replaced every time.
  task_shapes = {
    name: (shape.shape[1:], shape.dtype)
    for name, shape in detection.DetectionTask.batch_shapes(_det_task(), None, 3, "train").items()
  }
  for batch in batches:
    step_fields = {name: (value.shape[1:], value.dtype) for name, value in batch.items() if name in task_shapes}
    assert step_fields == task_shapes
  row = {name: value[list(ids[:3]).index(9)] for name, value in batches[0].items()}
  # Image 9: 3 valid instances, the 4th (its ignored polygon, a crowd) cut at max_gt.
  assert row["valid"].tolist() == [True, True, True] and row["labels"].tolist() == [0, 79, 39]
  np.testing.assert_array_equal(row["image_size"], [64, 85])  # (48, 64) resized to fit (96, 64): x4/3.
  x, y, w, h = data["train"]["annotations"][0]["bbox"]
  scale = np.float32([85 / 64, 64 / 48] * 2)
  expected = np.float32([x, y, x + w, y + h]) * scale
  flipped = np.float32([85 - expected[2], expected[1], 85 - expected[0], expected[3]])
  assert np.allclose(row["boxes"][0], expected, atol=1e-3) or np.allclose(row["boxes"][0], flipped, atol=1e-3)
  assert row["masks"][0].any() and set(np.unique(row["masks"])) <= {0, 1}


def _det_task():
  """A DetectionTask whose augmentation is DET_AUG (batch_shapes reads only that)."""
  from shufflemamba_jax.data import detect_augment  # pylint: disable=g-import-not-at-top

  return type("Task", (), {"augmentation": detect_augment.DetectionAugmentation(**DET_AUG)})()


def test_eval_stream_keeps_every_image_with_its_id_and_sizes(coco_data):
  """Every validation image (285 has no instance left), resized as mmdet's test pipeline on the
  canvas, with its COCO id and original size; padding to the batch has mask 0."""
  data_dir, _, data, _ = coco_data
  stream = pipeline.create_detection_eval_dataset(
    dataset="coco", data_dir=data_dir, global_batch_size=4, det_aug=DET_AUG
  )
  (batch,) = list(stream.as_numpy_iterator())
  assert batch["image"].shape == (4, 96, 96, 3) and batch["mask"].tolist() == [1, 1, 0, 0]
  sizes = {image["id"]: (image["height"], image["width"]) for image in data["validation"]["images"]}
  for row in range(2):
    image_id = int(batch["image_id"][row])
    assert tuple(batch["original_size"][row]) == sizes[image_id]
    height, width = sizes[image_id]
    factor = min(96 / max(height, width), 64 / min(height, width))
    assert tuple(batch["image_size"][row]) == (int(height * factor + 0.5), int(width * factor + 0.5))
  assert sorted(batch["image_id"][:2].tolist()) == [139, 285] and batch["image_id"][2:].tolist() == [-1, -1]
  with pytest.raises(ValueError, match="create_detection_eval_dataset"):
    pipeline.create_eval_dataset(dataset="coco", data_dir=data_dir, global_batch_size=4)

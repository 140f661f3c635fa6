"""The embedded detection set `digits_det`: canvases drawn as documented (checked on hand-placed
digits), the real TFDS builder's output (deterministic, shapes, boxes = tight boxes of the masks,
visible masks disjoint, overlaps and scales present), and its COCO ground truth read back by
pycocotools (annToMask, toBbox, and COCOeval scoring the ground truth itself as detections at AP 1)."""

import contextlib
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from pycocotools import coco, cocoeval
from pycocotools import mask as mask_utils

from shufflemamba_jax.data import coco as coco_builder
from shufflemamba_jax.data import detection_features, digits, digits_det, digits_seg, pipeline

STROKE_GREY = 64  # round(STROKE_LEVEL 4 * 255 / 16): the darkest stroke pixel on a canvas.


class ScriptedRng:
  """Stands in for np.random.Generator in `digits_det.canvas`, returning scripted draws in order."""

  def __init__(self, *draws):
    self.draws = list(draws)

  def integers(self, low, high, size=None):
    value = self.draws.pop(0)
    if size is None:
      assert low <= value < high
      return value
    corners = np.zeros(size, np.int64)
    corners[: len(value)] = value  # The scripted tries first; the rest repeat (0, 0).
    corners[len(value) :] = value[-1]
    assert (corners >= low).all() and (corners < high).all()
    return corners

  def choice(self, pool):
    value = self.draws.pop(0)
    assert value in pool
    return value


def _strokes(gray, index, top, left):
  """Digit `index` at 16x16 (each source pixel 2x2, as np.kron draws it) on an empty canvas."""
  canvas = np.zeros((digits_det.CANVAS, digits_det.CANVAS), bool)
  canvas[top : top + 16, left : left + 16] = np.kron(gray[index] >= 4, np.ones((2, 2), bool))
  return canvas


def _grey(gray, index, top, left):
  canvas = np.zeros((digits_det.CANVAS, digits_det.CANVAS), np.int64)
  canvas[top : top + 16, left : left + 16] = np.round(np.kron(gray[index], np.ones((2, 2))) * 255 / 16)
  return canvas


def test_upscale_is_nearest_neighbour():
  source = np.arange(64).reshape(8, 8)
  np.testing.assert_array_equal(digits_seg.upscale(source, 16), np.kron(source, np.ones((2, 2), np.int64)))
  rows = [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7]  # floor(i * 8 / 12), by hand.
  np.testing.assert_array_equal(digits_seg.upscale(source, 12), source[rows][:, rows])


def test_later_strokes_hide_earlier_ones():
  gray, labels = digits_seg.load_gray_digits()
  first, second = 0, 1  # A 0 and a 1, the second drawn over the first's lower right.
  rng = ScriptedRng(2, 16, first, [[0, 0]], 16, second, [[6, 6]])
  image, masks, classes, strokes = digits_det.canvas(rng, gray, labels, np.arange(10))
  below, above = _strokes(gray, first, 0, 0), _strokes(gray, second, 6, 6)
  assert 0 < (below & above).sum() <= below.sum() / 2  # Overlapping, half visible: placed at the first try.
  np.testing.assert_array_equal(masks, [below & ~above, above])
  np.testing.assert_array_equal(classes, labels[[first, second]])
  np.testing.assert_array_equal(strokes, [below.sum(), above.sum()])
  # Strokes opaque; the fainter pixels of the digit on top only brighten what is below.
  grey_below, grey_above = _grey(gray, first, 0, 0), _grey(gray, second, 6, 6)
  np.testing.assert_array_equal(image[..., 0], np.where(above, grey_above, np.maximum(grey_below, grey_above)))
  assert (image == image[..., :1]).all()
  np.testing.assert_array_equal(masks.any(axis=0), image[..., 0] >= STROKE_GREY)


def test_a_digit_that_would_hide_half_of_another_moves_or_is_left_out():
  gray, labels = digits_seg.load_gray_digits()
  # Exactly over the first digit (hides all of it): rejected; the next try, far away, is taken.
  rng = ScriptedRng(2, 16, 0, [[0, 0]], 16, 0, [[0, 0], [40, 40]])
  _, masks, _, _ = digits_det.canvas(rng, gray, labels, np.arange(10))
  np.testing.assert_array_equal(masks, [_strokes(gray, 0, 0, 0), _strokes(gray, 0, 40, 40)])
  # No try fits: the digit is not drawn at all.
  rng = ScriptedRng(2, 16, 0, [[0, 0]], 16, 0, [[0, 0]])
  image, masks, classes, _ = digits_det.canvas(rng, gray, labels, np.arange(10))
  assert masks.shape == (1, 64, 64) and classes.tolist() == [0]
  np.testing.assert_array_equal(image[..., 0], _grey(gray, 0, 0, 0))


def _files(data_dir):
  folder = epath.Path(data_dir) / "digits_det" / "1.0.0"
  return {path.name: path.read_bytes() for path in folder.glob("*.tfrecord*")}


def test_mask_box_is_pixel_x1y1x2y2_in_edges():
  mask = np.zeros((10, 12), bool)
  mask[2:5, 3:9] = True  # Rows 2..4, columns 3..8.
  box = detection_features.mask_box(mask)
  assert box.dtype == np.float32
  np.testing.assert_array_equal(box, [3, 2, 9, 5])  # [x, y, w, h] = [3, 2, 6, 3], as COCO's toBbox.
  np.testing.assert_array_equal(mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask, np.uint8))), [3, 2, 6, 3])
  with pytest.raises(ValueError, match="empty"):
    detection_features.mask_box(np.zeros((4, 4), bool))


def test_one_feature_format_for_digits_det_and_coco(tmp_path):
  digits_features = detection_features.detection_features(digits_det.CLASS_NAMES, (64, 64))
  coco_features = coco_builder.CocoInstances(data_dir=str(tmp_path)).info.features
  shared = detection_features.detection_features(coco_builder.CLASS_NAMES, image_format="jpeg", with_filename=True)
  assert coco_features.to_json() == shared.to_json()
  assert set(coco_features.keys()) - set(digits_features.keys()) == {"image/filename"}
  for features in (digits_features, coco_features):
    bbox = features["objects"]["bbox"]
    assert isinstance(bbox, tfds.features.Tensor) and bbox.shape == (4,) and bbox.dtype == np.float32
  assert coco_features["image"].encoding_format == "jpeg" and digits_features["image"].encoding_format == "png"


@pytest.fixture(scope="module")
def validation(digits_det_data_dir):
  builder = pipeline.get_builder("digits_det", digits_det_data_dir)
  examples = tfds.as_numpy(builder.as_dataset(split="validation", shuffle_files=False))
  return builder, sorted(examples, key=lambda example: example["image/id"])  # TFDS stores them shuffled.


def test_builds_are_identical(digits_det_data_dir, tmp_path):
  pipeline.prepare("digits_det", data_dir=str(tmp_path), compute_stats=False)
  first, second = _files(digits_det_data_dir), _files(tmp_path)
  assert sorted(first) == ["digits_det-train.tfrecord-00000-of-00001", "digits_det-validation.tfrecord-00000-of-00001"]
  assert first == second


def test_examples(digits_det_data_dir, validation):
  builder, examples = validation
  info = pipeline.get_dataset_info("digits_det", digits_det_data_dir)
  assert info.num_classes == 10 and info.num_examples("train") == 2000 and info.num_examples("validation") == 400
  assert pipeline.class_names("digits_det") == tuple("0123456789")
  assert [e["image/id"] for e in examples] == list(range(400))
  counts, labels, sides, occluded = [], [], [], 0
  for example in examples:
    image, objects = example["image"], example["objects"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and (image == image[..., :1]).all()
    masks = objects["mask"][..., 0]
    assert masks.shape[1:] == (64, 64) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert (masks.sum(axis=0) <= 1).all()  # Visible parts: disjoint, and together the bright pixels.
    np.testing.assert_array_equal(masks.any(axis=0), image[..., 0] >= STROKE_GREY)
    assert objects["label"].dtype == np.int64 and (0 <= objects["label"]).all() and (objects["label"] < 10).all()
    assert not objects["is_crowd"].any()
    np.testing.assert_array_equal(objects["area"], masks.sum(axis=(1, 2)).astype(np.float32))
    for mask, bbox in zip(masks, objects["bbox"], strict=True):
      ys, xs = np.nonzero(mask)
      assert bbox.dtype == np.float32  # Pixel x1y1x2y2, edges: the mask spans columns x1..x2 - 1.
      np.testing.assert_array_equal(bbox, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
      sides.append(max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()))
    counts.append(len(masks))
    labels.extend(objects["label"])
  # The builder's canvases are digits_det.canvas's, drawn from the validation digits and seed.
  gray, classes = digits_seg.load_gray_digits()
  rng = np.random.default_rng(digits_det.SEEDS["validation"])
  pool = digits.digits_split_indices()[1]
  for example in examples:
    _, masks, _, strokes = digits_det.canvas(rng, gray, classes, pool)
    np.testing.assert_array_equal(example["objects"]["mask"][..., 0], masks)
    visible = masks.sum(axis=(1, 2))
    assert (visible >= strokes / 2).all()
    occluded += (visible < strokes).sum()
  counts = np.array(counts)
  assert counts.min() >= 2 and counts.max() == 5 and 3.3 < counts.mean() < 3.7
  assert set(labels) == set(range(10))
  assert 0.3 < occluded / counts.sum() < 0.7  # Overlaps are common, not universal.
  assert min(sides) <= 12 and max(sides) >= 36  # The longer side of the tight boxes: several scales.
  assert builder.info.features["objects"]["label"].names == list("0123456789")


# pycocotools 2.0.11's decode under NumPy 2 (annToMask): harmless, its result is checked.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_ground_truth_reads_back_in_pycocotools(validation, tmp_path):
  builder, examples = validation
  truth = detection_features.coco_ground_truth(builder, "validation")
  path = tmp_path / "instances_validation.json"
  detection_features.write_coco_ground_truth(path, truth)
  with contextlib.redirect_stdout(io.StringIO()):
    ground = coco.COCO(str(path))
  assert sorted(ground.getImgIds()) == list(range(400))
  assert [c["id"] for c in ground.loadCats(ground.getCatIds())] == list(range(1, 11))
  assert ground.imgs[0] == {"id": 0, "width": 64, "height": 64}
  for example in examples:
    annotations = ground.loadAnns(ground.getAnnIds(imgIds=int(example["image/id"])))
    objects = example["objects"]
    assert len(annotations) == len(objects["label"])
    for annotation, mask, label in zip(annotations, objects["mask"][..., 0], objects["label"], strict=True):
      np.testing.assert_array_equal(ground.annToMask(annotation), mask)
      assert annotation["category_id"] == label + 1 and annotation["iscrowd"] == 0
      assert annotation["area"] == mask.sum() == mask_utils.area(ground.annToRLE(annotation))
      np.testing.assert_array_equal(annotation["bbox"], mask_utils.toBbox(ground.annToRLE(annotation)))
  # The ground truth itself, as detections, scores AP 1 for boxes and masks: the ids agree throughout.
  detections = [{**a, "score": 1.0} for a in truth["annotations"]]
  for iou_type in ("bbox", "segm"):
    with contextlib.redirect_stdout(io.StringIO()):
      evaluation = cocoeval.COCOeval(ground, ground.loadRes(detections), iou_type)
      evaluation.evaluate()
      evaluation.accumulate()
      evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_coco_ground_truth_from_examples_needs_class_names(validation):
  _, examples = validation
  truth = detection_features.coco_ground_truth(examples[:3], class_names=digits_det.CLASS_NAMES)
  assert [image["id"] for image in truth["images"]] == [0, 1, 2]
  assert [a["id"] for a in truth["annotations"]] == list(range(1, len(truth["annotations"]) + 1))
  with pytest.raises(ValueError, match="class_names"):
    detection_features.coco_ground_truth(examples[:3])
  with pytest.raises(ValueError, match="split"):
    detection_features.coco_ground_truth(validation[0])

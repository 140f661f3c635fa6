"""COCO evaluation against pycocotools' COCOeval run by hand, and result dicts against hand values."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from shufflemamba_jax.models.detection import mask_rcnn
from shufflemamba_jax.training import coco_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORY_IDS = (1, 3, 7)  # Non-contiguous, as COCO's 80 of 1..90 are.
# (id, height, width) of 3 images of different sizes.
IMAGES = ((11, 120, 160), (22, 240, 320), (33, 90, 150))


def rectangle(x, y, w, h):
  return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def uncompressed_rle(mask):
  """COCO's crowd format: column-major run lengths starting with a run of zeros."""
  flat = np.asarray(mask, np.uint8).ravel(order="F")
  change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
  counts = np.diff(np.concatenate([[0], change]))
  return {"counts": [int(c) for c in counts], "size": list(mask.shape)}


def ground_truth():
  """3 images, categories 1/3/7, small (< 32^2), medium and large (> 96^2) objects, one crowd."""
  images = [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i, h, w in IMAGES]
  objects = [
    # (image, category, polygon)
    (11, 1, rectangle(10, 10, 20, 18)),  # small: 360
    (11, 3, rectangle(50, 30, 60, 50)),  # medium: 3000
    (11, 7, [[100, 20, 150, 20, 150, 110, 100, 60]]),  # medium, a quadrilateral
    (22, 1, rectangle(20, 20, 150, 120)),  # large: 18000
    (22, 7, rectangle(200, 150, 25, 20)),  # small: 500
    (22, 3, [[180, 10, 300, 10, 240, 120]]),  # large triangle: 6600 -> medium
    (33, 1, rectangle(5, 5, 40, 40)),  # medium: 1600
    (33, 7, rectangle(60, 10, 12, 10)),  # small: 120
  ]
  annotations = []
  heights = {i: h for i, h, _ in IMAGES}
  widths = {i: w for i, _, w in IMAGES}
  for n, (image, category, polygon) in enumerate(objects):
    rle = mask_utils.merge(mask_utils.frPyObjects(polygon, heights[image], widths[image]))
    annotations.append(
      {
        "id": n + 1,
        "image_id": image,
        "category_id": category,
        "segmentation": polygon,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
      }
    )
  crowd = np.zeros((240, 320), np.uint8)
  crowd[160:230, 20:140] = 1
  crowd[200:230, 140:170] = 1
  rle = mask_utils.encode(np.asfortranarray(crowd))
  annotations.append(
    {
      "id": len(annotations) + 1,
      "image_id": 22,
      "category_id": 3,
      "segmentation": uncompressed_rle(crowd),
      "area": float(mask_utils.area(rle)),
      "bbox": [float(v) for v in mask_utils.toBbox(rle)],
      "iscrowd": 1,
    }
  )
  categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in CATEGORY_IDS]
  return {"images": images, "annotations": annotations, "categories": categories}


def box_mask(kind):
  """28x28 box-mask probabilities of a few shapes."""
  mask = np.full((28, 28), 0.9, np.float32)
  if kind == "left":
    mask[:, 14:] = 0.1
  elif kind == "ring":
    mask[8:20, 8:20] = 0.2
  elif kind == "corner":
    mask[:10, :10] = 0.0
  elif kind == "dot":  # A mask much smaller than its box: small by mask area, medium by box area.
    mask[:] = 0.0
    mask[10:18, 10:18] = 0.9
  return mask


def predictions():
  """Model-like detections of the 3 images on canvases of different scales -> result dicts.

  Per image: (label, original-pixel box, score, mask kind). True positives at various IoUs,
  a wrong class, false positives, and a detection on the crowd region (image 22).
  """
  per_image = {
    11: [
      (0, [11, 9, 31, 29], 0.95, "full"),  # TP (small), high IoU
      (1, [55, 35, 110, 80], 0.9, "ring"),  # medium, IoU ~0.8
      (2, [100, 20, 150, 110], 0.6, "left"),  # quadrilateral: IoU of box ~0.8, mask lower
      (1, [10, 10, 30, 28], 0.3, "full"),  # wrong class on the small object
      (0, [120, 90, 158, 118], 0.5, "corner"),  # false positive
    ],
    22: [
      (0, [25, 25, 165, 140], 0.88, "full"),  # large TP, IoU ~0.84
      (0, [0, 0, 120, 100], 0.7, "full"),  # poor overlap with the large object
      (2, [200, 150, 225, 170], 0.8, "corner"),  # small TP
      (1, [180, 10, 300, 120], 0.75, "left"),  # triangle's box
      (1, [30, 165, 130, 225], 0.99, "full"),  # on the crowd region: ignored, not a false positive
      (1, [250, 180, 310, 235], 0.2, "ring"),  # false positive
    ],
    33: [
      (0, [6, 4, 44, 46], 0.55, "full"),  # medium TP
      (2, [58, 9, 70, 21], 0.45, "full"),  # small TP, IoU ~0.7
      (2, [100, 50, 140, 85], 0.4, "ring"),  # false positive
      (2, [90, 40, 130, 80], 0.85, "dot"),  # false positive, its area depends on the IoU type
    ],
  }
  # Canvas scales (h, w) of each image, as a keep-ratio resize rounds them.
  scales = {11: 2.0, 22: 0.5, 33: 1.37}
  results = []
  for image, h, w in IMAGES:
    detections = per_image[image]
    image_size = np.array([round(h * scales[image]), round(w * scales[image])])
    factor = image_size / np.array([h, w])  # (y, x)
    original = np.array([d[1] for d in detections], np.float32)
    canvas = original * np.array([factor[1], factor[0], factor[1], factor[0]], np.float32)
    d = len(detections) + 2  # Two padding detections after the valid prefix.
    pad = lambda x, value: np.concatenate([x, np.full((2, *x.shape[1:]), value, x.dtype)])
    results += coco_eval.detections_to_coco(
      [image],
      pad(canvas, 1.0)[None],
      pad(np.array([x[2] for x in detections], np.float32), 0.0)[None],
      pad(np.array([x[0] for x in detections], np.int32), 0)[None],
      (np.arange(d) < len(detections))[None],
      pad(np.stack([box_mask(x[3]) for x in detections]), 0.0)[None],
      CATEGORY_IDS,
      original_sizes=np.array([[h, w]]),
      image_sizes=image_size[None],
    )
  return results


def direct_cocoeval(gt_file, result_file, iou_type, max_dets=None):
  """COCOeval as its README runs it, on JSON files; 'segm' drops each result's box (mmdet)."""
  gt = COCO(gt_file)
  with open(result_file) as f:
    loaded = json.load(f)
  if iou_type == "segm":
    for x in loaded:
      x.pop("bbox")
  evaluator = COCOeval(gt, gt.loadRes(loaded), iou_type)
  if max_dets is not None:
    evaluator.params.maxDets = list(max_dets)
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  return evaluator.stats


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """The ground truth JSON, the results, their metrics and their written files."""
  root = tmp_path_factory.mktemp("coco")
  gt = ground_truth()
  gt_file = root / "instances.json"
  gt_file.write_text(json.dumps(gt))
  results = predictions()
  metrics = coco_eval.evaluate(str(gt_file), results)
  paths = coco_eval.write_results(root / "workdir", "val", results, metrics)
  return gt, gt_file, results, metrics, paths


def test_evaluate_equals_cocoeval_on_the_written_files(written):
  gt, gt_file, results, metrics, paths = written
  assert len(results) == 15
  for iou_type in ("bbox", "segm"):
    stats = direct_cocoeval(str(gt_file), str(paths[iou_type]), iou_type)
    names = coco_eval.stat_names(iou_type)
    assert names[:6] == tuple(f"{iou_type}_{n}" for n in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"))
    assert [metrics[name] for name in names] == [float(s) for s in stats], iou_type
    # Non-trivial: every area range has ground truth, and the numbers are neither 0 nor 1.
    assert all(0.0 < metrics[name] < 1.0 for name in names), {n: metrics[n] for n in names}
  # Box and mask numbers differ (masks are not their boxes).
  assert metrics["bbox_mAP"] != metrics["segm_mAP"]
  # The same from a COCO object and from the annotation dict; mmdet's maxDets (100, 300, 1000) too.
  assert coco_eval.evaluate(gt, results) == metrics
  mmdet_like = coco_eval.evaluate(COCO(str(gt_file)), results, ("bbox",), max_dets=(100, 300, 1000))
  stats = direct_cocoeval(str(gt_file), str(paths["bbox"]), "bbox", max_dets=(100, 300, 1000))
  assert list(mmdet_like) == list(coco_eval.stat_names("bbox", (100, 300, 1000)))
  assert list(mmdet_like.values()) == [float(s) for s in stats]
  assert "bbox_AR_1000" in mmdet_like and mmdet_like["bbox_mAP"] == metrics["bbox_mAP"]  # <= 100 per image


def test_crowd_detection_is_ignored_not_a_false_positive(written):
  gt, _, results, metrics, _ = written
  on_crowd = [r for r in results if r["image_id"] == 22 and r["score"] == pytest.approx(0.99)]
  assert len(on_crowd) == 1
  others = [r for r in results if r is not on_crowd[0]]
  without = coco_eval.evaluate(gt, others)
  names = [n for n in coco_eval.stat_names("bbox") + coco_eval.stat_names("segm") if not n.endswith("_AR_1")]
  assert [without[name] for name in names] == [metrics[name] for name in names]
  # Ignored, it still takes its image's one slot of maxDets 1 (COCOeval keeps the best-scored first).
  assert without["bbox_AR_1"] > metrics["bbox_AR_1"]
  # The same detection anywhere else is the best-scored false positive of its class.
  moved = dict(on_crowd[0], image_id=33)
  moved.pop("segmentation")
  elsewhere = coco_eval.evaluate(gt, [*others, moved], ("bbox",))
  assert elsewhere["bbox_mAP"] < metrics["bbox_mAP"]


def test_written_files_round_trip(written):
  _, _, results, metrics, paths = written
  assert sorted(paths) == ["bbox", "metrics", "segm"]
  assert paths["bbox"].name == "coco_results_val.bbox.json"
  bbox = json.loads(paths["bbox"].read_text())
  assert bbox == [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
  assert json.loads(paths["segm"].read_text()) == results
  assert json.loads(paths["metrics"].read_text()) == metrics


def test_detections_to_coco_rescales_maps_categories_and_pastes_masks():
  # Original 100 x 200 (h, w) image on a 200 x 300 canvas: scale 2 in y, 1.5 in x.
  boxes = np.array([[[30, 20, 90, 80], [30, 20, 90, 80], [270, 160, 320, 230], [0, 0, 5, 5]]], np.float32)
  masks = np.stack([np.ones((28, 28)), box_mask("left") > 0.5, np.ones((28, 28)), np.ones((28, 28))])[None]
  results = coco_eval.detections_to_coco(
    [7],
    boxes,
    np.array([[0.9, 0.8, 0.7, 0.6]], np.float32),
    np.array([[0, 2, 1, 0]]),
    np.array([[True, True, True, False]]),
    masks,
    CATEGORY_IDS,
    original_sizes=np.array([[100, 200]]),
    image_sizes=np.array([[200, 300]]),
  )
  assert len(results) == 3  # The invalid 4th is left out.
  assert [r["category_id"] for r in results] == [1, 7, 3]
  assert [r["image_id"] for r in results] == [7, 7, 7]
  assert results[0]["score"] == pytest.approx(0.9) and isinstance(results[0]["score"], float)
  # Canvas [30, 20, 90, 80] / (1.5, 2) = [20, 10, 60, 40] -> xywh [20, 10, 40, 30].
  np.testing.assert_allclose(results[0]["bbox"], [20, 10, 40, 30], rtol=1e-6)
  # [270, 160, 320, 230] / (1.5, 2) = [180, 80, 213.3, 115] -> clipped to [180, 80, 200, 100].
  np.testing.assert_allclose(results[2]["bbox"], [180, 80, 20, 20], rtol=1e-6)
  decoded = [mask_utils.decode(r["segmentation"]) for r in results]
  assert all(r["segmentation"]["size"] == [100, 200] and isinstance(r["segmentation"]["counts"], str) for r in results)
  expected = np.zeros((3, 100, 200), np.uint8)
  expected[0, 10:40, 20:60] = 1  # A full mask covers exactly the pixels whose centres are in the box.
  expected[1, 10:40, 20:40] = 1  # The left half: centres x < 40.
  expected[2, 80:100, 180:200] = 1
  np.testing.assert_array_equal(np.stack(decoded), expected)
  json.dumps(results)  # Python types only.


def test_paste_mask_equals_the_models_paste_masks():
  rng = np.random.default_rng(0)
  height, width = 37, 53
  masks = rng.random((12, 28, 28)).astype(np.float32)
  corners = rng.uniform([-5, -5], [width, height], (12, 2))
  sizes = rng.uniform(0.5, 40, (12, 2))
  boxes = np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)
  expected = np.asarray(mask_rcnn.paste_masks(jnp.asarray(masks), jnp.asarray(boxes), height, width))
  ours = np.stack([coco_eval.paste_mask(m, b, height, width) for m, b in zip(masks, boxes)])
  assert expected.sum() > 1000
  # float32 rounding may put a probability on the other side of 0.5 at a rare pixel.
  assert np.sum(ours != expected) <= 2


def test_encode_region_equals_pycocotools_encode_of_the_whole_mask():
  rng = np.random.default_rng(1)
  height, width = 23, 31
  cases = [
    (np.zeros((0, 0), bool), 0, 0),  # Nothing drawn.
    (np.ones((height, width), bool), 0, 0),  # Everything: a single run of ones.
    (np.ones((height, 5), bool), 0, 7),  # Whole columns: runs join across columns.
    (np.ones((4, 6), bool), height - 4, width - 6),  # Up to the last pixel.
    (np.ones((3, 3), bool), 0, 0),  # From the first pixel (the zeros' run is empty).
  ]
  for _ in range(40):
    rows, cols = rng.integers(1, height + 1), rng.integers(1, width + 1)
    top, left = rng.integers(0, height - rows + 1), rng.integers(0, width - cols + 1)
    cases.append((rng.random((rows, cols)) < rng.uniform(0.1, 0.95), top, left))
  for region, top, left in cases:
    whole = np.zeros((height, width), np.uint8)
    whole[top : top + region.shape[0], left : left + region.shape[1]] = region
    expected = mask_utils.encode(np.asfortranarray(whole))
    ours = coco_eval.encode_region(region, int(top), int(left), height, width)
    assert ours == {"size": [height, width], "counts": expected["counts"].decode()}


def test_no_detections_gives_cocoevals_numbers():
  gt = ground_truth()
  metrics = coco_eval.evaluate(gt, [])
  assert len(metrics) == 24 and all(value == 0.0 for value in metrics.values())
  # Only a large object: the small and medium ranges have no ground truth, -1.
  only_large = dict(gt, annotations=[a for a in gt["annotations"] if a["area"] > 96**2])
  metrics = coco_eval.evaluate(only_large, [], ("bbox",))
  assert metrics["bbox_mAP_s"] == metrics["bbox_mAP_m"] == -1.0
  assert metrics["bbox_mAP"] == metrics["bbox_mAP_l"] == 0.0
  with pytest.raises(ValueError, match="'segm' needs masks"):
    coco_eval.evaluate(gt, [{"image_id": 11, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])


def test_gather_results_single_process_and_chunked(monkeypatch):
  results = predictions()
  assert coco_eval.gather_results(results) is results
  # Two processes with the same results, simulated: the chunked byte path puts them back exactly.
  from jax.experimental import multihost_utils

  monkeypatch.setattr(coco_eval.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, x]))
  assert coco_eval.gather_results(results, chunk_bytes=1000) == results + results
  assert coco_eval.gather_results([], chunk_bytes=1000) == []


TWO_PROCESSES = """
import json, sys
import jax
jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=int(sys.argv[1]))
from shufflemamba_jax.training import coco_eval
rank = jax.process_index()
local = [{{"image_id": rank, "category_id": 1, "bbox": [0.1 * k, 0, 1, 1], "score": 1 / 3}}
         for k in range(3 + 500 * rank)]
print(json.dumps(coco_eval.gather_results(local, chunk_bytes=4096)))
"""


@pytest.mark.slow
def test_gather_results_two_processes(tmp_path):
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  script = tmp_path / "gather.py"
  script.write_text(textwrap.dedent(TWO_PROCESSES.format(port=port)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  workers = [
    subprocess.Popen(
      [sys.executable, str(script), str(rank)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    for rank in range(2)
  ]
  outputs = [worker.communicate(timeout=300) for worker in workers]
  expected = [
    {"image_id": rank, "category_id": 1, "bbox": [0.1 * k, 0, 1, 1], "score": 1 / 3}
    for rank in range(2)
    for k in range(3 + 500 * rank)
  ]
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == 0, err.decode()[-3000:]
    assert json.loads(out.decode().strip().splitlines()[-1]) == expected

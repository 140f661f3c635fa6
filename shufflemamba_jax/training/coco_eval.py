"""COCO box and mask evaluation, as mmdet's CocoMetric does it, with pycocotools.

The pieces, in the order an evaluation uses them:

* `detections_to_coco`: a batch of the model's detections (canvas pixels, 28x28 box masks) ->
  COCO result dicts in ORIGINAL image pixels. mmdet's order: the boxes (already clipped to the
  resized image by the model) are divided by the resize scale factor, then the box masks are
  pasted on the original (h, w) image (`paste_mask`, mmdet's `_do_paste_mask`) and thresholded
  at 0.5, then run-length encoded (mmdet's `encode_mask_results`).
* `gather_results`: every process's result dicts, concatenated, on every process.
* `evaluate`: pycocotools' COCOeval per IoU type as mmdet's `CocoMetric.compute_metrics` runs it
  (loadRes, catIds and imgIds of the ground truth, the 'bbox' key dropped for 'segm' so that a
  detection's area is its mask's, evaluate / accumulate / summarize), the 12 `stats` by name.
* `write_results`: the result JSON files (mmdet's `format_only` layout) and the metrics JSON.

Deliberate difference from mmdet: mmdet's CocoMetric sets `params.maxDets` to its proposal numbers
(100, 300, 1000) for every IoU type; here it is COCO's own (1, 10, 100) by default (`max_dets`).
The AP numbers are the same whenever an image has at most 100 detections (the model keeps
`test_max_detections` = 100); the AR numbers are then AR@1/10/100 instead of AR@100/300/1000.
mmdet also rounds the numbers to 3 decimals; here they are COCOeval's floats, unrounded.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

_LOGGER = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
# The largest piece of serialized results one `process_allgather` moves (bounds device memory).
GATHER_CHUNK_BYTES = 1 << 26


def stat_names(iou_type: str, max_dets: Sequence[int] = (1, 10, 100)) -> tuple[str, ...]:
  """The names of COCOeval's 12 `stats`, in their order, e.g. `bbox_mAP`, ..., `bbox_AR_100`,
  `bbox_AR_s` (the area ranges' AR at the last of `max_dets`). The AP names are mmdet's."""
  ap = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
  ar = tuple(f"AR_{n}" for n in max_dets) + ("AR_s", "AR_m", "AR_l")
  return tuple(f"{iou_type}_{name}" for name in ap + ar)


# ---- detections -> COCO result dicts -------------------------------------------------------------


def _paste_region(mask: np.ndarray, box: np.ndarray, height: int, width: int, threshold: float):
  """`paste_mask`'s result where it can be non-zero: (region (h', w') bool, top, left)."""
  mask = np.asarray(mask, np.float32)
  m = mask.shape[-1]
  if mask.shape != (m, m):
    raise ValueError(f"paste_mask: a mask must be square (m, m), got shape {mask.shape}.")
  x0, y0, x1, y1 = (np.float32(v) for v in box)
  box_w, box_h = max(x1 - x0, np.float32(1e-6)), max(y1 - y0, np.float32(1e-6))
  # Bilinear reads reach one mask cell beyond the box; mmdet's skip_empty region is the box +- 1.
  cell_w, cell_h = float(box_w) / m, float(box_h) / m
  left, right = max(math.floor(x0 - cell_w) - 1, 0), min(math.ceil(x1 + cell_w) + 1, width)
  top, bottom = max(math.floor(y0 - cell_h) - 1, 0), min(math.ceil(y1 + cell_h) + 1, height)
  if right <= left or bottom <= top:
    return np.zeros((0, 0), bool), 0, 0
  half = np.float32(m / 2)

  def taps(start, stop, low, size):
    # Each pixel centre's grid_sample coordinate in the mask -> its two taps (indices into the
    # mask padded by 2 zeros a side: zero padding) and the second tap's weight. Gathers, not a
    # weight-matrix product: BLAS threads cost more than the work at these sizes.
    centres = np.arange(start, stop, dtype=np.float32) + np.float32(0.5)
    grid = ((centres - low) / size * np.float32(2) - np.float32(1) + np.float32(1)) * half - np.float32(0.5)
    floor = np.floor(grid)
    return np.clip(floor, -2, m).astype(np.int64) + 2, grid - floor

  padded = np.zeros((m + 4, m + 4), np.float32)
  padded[2:-2, 2:-2] = mask
  iy, fy = taps(top, bottom, y0, box_h)
  ix, fx = taps(left, right, x0, box_w)
  rows = padded[iy] * (np.float32(1) - fy)[:, None] + padded[iy + 1] * fy[:, None]  # (h', m + 4)
  values = rows[:, ix] * (np.float32(1) - fx) + rows[:, ix + 1] * fx  # (h', w')
  return values >= threshold, top, left


def paste_mask(mask: np.ndarray, box: np.ndarray, height: int, width: int, threshold: float = 0.5) -> np.ndarray:
  """One (m, m) box mask of probabilities drawn on a (height, width) image: (height, width) bool.

  mmdet's `_do_paste_mask` (the arithmetic of `models.detection.mask_rcnn.paste_masks`, in float32
  numpy): each pixel centre reads the mask bilinearly over the box `x0, y0, x1, y1` (grid_sample,
  align_corners False, zeros outside), then `>= threshold`. Only the pixels within one mask cell
  of the box can be non-zero, so only those are computed (mmdet's `skip_empty`).
  """
  region, top, left = _paste_region(mask, box, height, width, threshold)
  out = np.zeros((height, width), bool)
  out[top : top + region.shape[0], left : left + region.shape[1]] = region
  return out


def encode_region(region: np.ndarray, top: int, left: int, height: int, width: int) -> dict:
  """COCO compressed RLE {"size": [height, width], "counts": str} of a (height, width) mask that
  is `region` (h', w') bool at (top, left) and zero elsewhere: pycocotools' `encode` of the whole
  mask, without drawing it (a whole image per detection is most of the cost on COCO)."""
  total = height * width
  rows, cols = region.shape
  padded = np.zeros((cols, rows + 2), np.int8)  # Column-major (COCO's order), a zero row at each end.
  padded[:, 1:-1] = region.T
  steps = np.diff(padded, axis=1)
  col, row = np.nonzero(steps)  # Column-major order: the runs' starts and ends alternate.
  flat = (left + col) * height + top + row
  starts, ends = flat[0::2], flat[1::2]  # First pixel of each run of ones, one past its last.
  # A run to the bottom of one column and one from the top of the next are one run.
  joined = starts[1:] == ends[:-1]
  starts = np.concatenate([starts[:1], starts[1:][~joined]])
  ends = np.concatenate([ends[:-1][~joined], ends[-1:]])
  # Alternating zeros / ones run lengths, starting with zeros; no empty run at the end.
  counts = np.diff(np.concatenate([[0], np.stack([starts, ends], axis=1).ravel(), [total]]))
  if counts.size > 1 and counts[-1] == 0:
    counts = counts[:-1]
  rle = mask_utils.frPyObjects({"counts": counts.tolist(), "size": [height, width]}, height, width)
  return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def detections_to_coco(
  image_ids: Sequence[int] | np.ndarray,
  boxes: np.ndarray,
  scores: np.ndarray,
  labels: np.ndarray,
  valid: np.ndarray,
  masks: np.ndarray | None,
  category_ids: Sequence[int],
  *,
  original_sizes: np.ndarray,
  image_sizes: np.ndarray | None = None,
  mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
  """A batch of B images' detections -> COCO result dicts in ORIGINAL image pixels.

  Args:
    image_ids: (B,) the COCO image ids. Images of a padded batch must be left out by the caller.
    boxes: (B, D, 4) float x1y1x2y2 in canvas pixels (`Detections.boxes`).
    scores: (B, D) float; labels: (B, D) int 0..C-1; valid: (B, D) bool, the real detections.
    masks: (B, D, m, m) float box-mask probabilities (`Detections.masks`), or None for boxes only.
    category_ids: (C,) the COCO category id of each label (mmdet's `cat_ids`).
    original_sizes: (B, 2) int (h, w) of each image as the annotations know it.
    image_sizes: (B, 2) int (h, w) of each image resized on the canvas (the model's `image_sizes`),
      or None for images not resized. The scale factor is image_sizes / original_sizes per axis,
      as mmdet's Resize records it (new_w / w, new_h / h).
    mask_threshold: mmdet's `mask_thr_binary`.

  Returns:
    One dict per valid detection: "image_id" (int), "category_id" (int), "bbox" [x, y, w, h]
    (floats, original pixels, clipped to the image), "score" (float) and, with masks,
    "segmentation" (compressed RLE at the original size, counts as str). Python types only: the
    list is JSON-serializable (`gather_results`, `write_results`).
  """
  image_ids = np.asarray(image_ids)
  boxes = np.asarray(boxes, np.float32)
  scores, labels, valid = np.asarray(scores), np.asarray(labels), np.asarray(valid, bool)
  original_sizes = np.asarray(original_sizes)
  batch = image_ids.shape[0]
  if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
    raise ValueError(f"detections_to_coco: boxes must be (B={batch}, D, 4), got {boxes.shape}.")
  for name, value in (("scores", scores), ("labels", labels), ("valid", valid)):
    if value.shape != boxes.shape[:2]:
      raise ValueError(f"detections_to_coco: {name} must be {boxes.shape[:2]} like boxes, got {value.shape}.")
  if original_sizes.shape != (batch, 2):
    raise ValueError(f"detections_to_coco: original_sizes must be (B={batch}, 2) (h, w), got {original_sizes.shape}.")
  if masks is not None:
    masks = np.asarray(masks, np.float32)
    if masks.ndim != 4 or masks.shape[:2] != boxes.shape[:2] or masks.shape[2] != masks.shape[3]:
      raise ValueError(
        f"detections_to_coco: masks must be (B, D, m, m) with (B, D) = {boxes.shape[:2]}, got {masks.shape}."
      )
  num_classes = len(category_ids)
  used = labels[valid]
  if used.size and (used.min() < 0 or used.max() >= num_classes):
    raise ValueError(
      f"detections_to_coco: labels must be in [0, {num_classes}) (len(category_ids)), got {used.min()}..{used.max()}."
    )
  if image_sizes is None:
    scales = np.ones((batch, 2), np.float32)
  else:
    image_sizes = np.asarray(image_sizes)
    if image_sizes.shape != (batch, 2):
      raise ValueError(f"detections_to_coco: image_sizes must be (B={batch}, 2) (h, w), got {image_sizes.shape}.")
    scales = image_sizes.astype(np.float32) / original_sizes.astype(np.float32)

  results = []
  for i in range(batch):
    height, width = int(original_sizes[i, 0]), int(original_sizes[i, 1])
    keep = np.nonzero(valid[i])[0]
    scale_y, scale_x = scales[i]
    # mmdet: bboxes / scale_factor (w, h, w, h); the canvas boxes were clipped to the resized image.
    rescaled = boxes[i, keep] / np.array([scale_x, scale_y, scale_x, scale_y], np.float32)
    rescaled = np.clip(rescaled, 0, np.array([width, height, width, height], np.float32))
    segmentations = None
    if masks is not None:
      segmentations = [
        encode_region(*_paste_region(masks[i, d], box, height, width, mask_threshold), height, width)
        for d, box in zip(keep, rescaled)
      ]
    for n, d in enumerate(keep):
      x0, y0, x1, y1 = (float(v) for v in rescaled[n])
      result = {
        "image_id": int(image_ids[i]),
        "category_id": int(category_ids[int(labels[i, d])]),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "score": float(scores[i, d]),
      }
      if segmentations is not None:
        result["segmentation"] = segmentations[n]
      results.append(result)
  return results


# ---- multi-process gather ----------------------------------------------------------------------


def gather_results(local_results: list[dict], *, chunk_bytes: int = GATHER_CHUNK_BYTES) -> list[dict]:
  """Every process's result dicts, concatenated in process order, returned on EVERY process.

  Single-process: `local_results` itself. Otherwise each process's list travels as JSON bytes (a
  uint8 array, zero-padded to the longest, `chunk_bytes` at a time) through
  `jax.experimental.multihost_utils.process_allgather`; JSON keeps Python floats exactly, so the
  gathered dicts equal the local ones. A collective: every process must call it. Evaluate on
  process 0 only (`evaluate` is plain CPU work) unless every process needs the numbers.
  """
  if jax.process_count() == 1:
    return local_results
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  payload = np.frombuffer(json.dumps(local_results).encode("utf-8"), np.uint8)
  if payload.size >= 2**31:
    raise ValueError(f"gather_results: {payload.size} bytes of results on process {jax.process_index()} (2 GiB max).")
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(payload.size))).reshape(-1)
  longest = int(lengths.max())
  chunk = max(1, min(chunk_bytes, longest))
  pieces = []
  for start in range(0, longest, chunk):
    buffer = np.zeros(chunk, np.uint8)
    part = payload[start : start + chunk]
    buffer[: part.size] = part
    pieces.append(np.asarray(multihost_utils.process_allgather(buffer)))  # (P, chunk)
  everything = np.concatenate(pieces, axis=1) if pieces else np.zeros((lengths.size, 0), np.uint8)
  gathered = []
  for rank, length in enumerate(lengths):
    gathered.extend(json.loads(everything[rank, : int(length)].tobytes().decode("utf-8")))
  return gathered


# ---- evaluation --------------------------------------------------------------------------------


def load_ground_truth(ground_truth: COCO | Mapping | str | epath.PathLike) -> COCO:
  """A pycocotools COCO from a COCO object (returned as is), an annotation dict, or a JSON path
  (read through etils.epath, so gs:// works)."""
  if isinstance(ground_truth, COCO):
    return ground_truth
  if isinstance(ground_truth, Mapping):
    dataset = copy.deepcopy(dict(ground_truth))
  else:
    path = epath.Path(ground_truth)
    if not path.exists():
      raise FileNotFoundError(f"COCO ground truth: no file {path}.")
    dataset = json.loads(path.read_text())
  missing = [key for key in ("images", "annotations", "categories") if key not in dataset]
  if missing:
    source = "dict" if isinstance(ground_truth, Mapping) else epath.Path(ground_truth)
    raise ValueError(f"COCO ground truth ({source}): no {missing}.")
  coco = COCO()
  coco.dataset = dataset
  with _logged_stdout():
    coco.createIndex()
  return coco


@contextlib.contextmanager
def _logged_stdout():
  """pycocotools prints its progress and summary; they go to this module's logger instead."""
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    yield
  if text.getvalue().strip():
    _LOGGER.info("%s", text.getvalue().rstrip())


def _empty_results(gt: COCO) -> COCO:
  """A result COCO with no detections (pycocotools' loadRes fails on an empty list)."""
  res = COCO()
  res.dataset = {"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"])}
  res.dataset["annotations"] = []
  with _logged_stdout():
    res.createIndex()
  return res


def evaluate(
  ground_truth: COCO | Mapping | str | epath.PathLike,
  results: Sequence[Mapping[str, Any]],
  iou_types: Sequence[str] = IOU_TYPES,
  *,
  max_dets: Sequence[int] = (1, 10, 100),
) -> dict[str, float]:
  """COCOeval's 12 numbers per IoU type, named by `stat_names` (`bbox_mAP`, ..., `segm_AR_l`).

  As mmdet's `CocoMetric.compute_metrics`: `params.catIds` = every ground-truth category (sorted
  ids), `params.imgIds` = every ground-truth image, useCats on, evaluate / accumulate / summarize;
  for 'segm' each result's 'bbox' is dropped before `loadRes` so that its area is its mask's (the
  small / medium / large split). `results`: `detections_to_coco` dicts (not modified); 'segm'
  needs their "segmentation". No detections at all: COCOeval's numbers for an empty result set
  (0 where a range has ground truth, -1 where none), where mmdet logs an error and returns none.
  `max_dets`: COCOeval's `params.maxDets` (see the module docstring for mmdet's).
  """
  gt = load_ground_truth(ground_truth)
  metrics = {}
  for iou_type in iou_types:
    if iou_type not in IOU_TYPES:
      raise ValueError(f"evaluate: iou_types must be among {IOU_TYPES}, got {iou_type!r}.")
    if iou_type == "segm":
      missing = sum("segmentation" not in r for r in results)
      if missing:
        raise ValueError(f"evaluate: 'segm' needs masks; {missing} of {len(results)} results have no 'segmentation'.")
      # loadRes adds keys to its dicts: give it copies, without 'bbox' (area from the mask).
      predictions = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    else:
      predictions = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    if predictions:
      with _logged_stdout():
        detected = gt.loadRes(predictions)
    else:
      _LOGGER.warning("COCO %s evaluation: no detections at all.", iou_type)
      detected = _empty_results(gt)
    coco_eval = COCOeval(gt, detected, iou_type)
    coco_eval.params.catIds = gt.getCatIds()
    coco_eval.params.imgIds = gt.getImgIds()
    coco_eval.params.maxDets = list(max_dets)
    with _logged_stdout():
      coco_eval.evaluate()
      coco_eval.accumulate()
      coco_eval.summarize()
    metrics.update({name: float(value) for name, value in zip(stat_names(iou_type, max_dets), coco_eval.stats)})
  return metrics


# ---- files -------------------------------------------------------------------------------------


def write_results(
  workdir: str | epath.PathLike, name: str, results: Sequence[Mapping[str, Any]], metrics: Mapping[str, float]
) -> dict[str, epath.Path]:
  """Writes `<workdir>/coco_results_<name>.bbox.json` (no masks), `.segm.json` (when the results
  have masks; with their boxes, as mmdet's `format_only` writes them, ready for the COCO server)
  and `coco_metrics_<name>.json`, through etils.epath (gs:// works). Call it on process 0.

  Returns the paths written, keyed "bbox", "segm", "metrics".
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  paths = {"bbox": workdir / f"coco_results_{name}.bbox.json"}
  paths["bbox"].write_text(json.dumps([{k: v for k, v in r.items() if k != "segmentation"} for r in results]))
  if results and all("segmentation" in r for r in results):
    paths["segm"] = workdir / f"coco_results_{name}.segm.json"
    paths["segm"].write_text(json.dumps(list(results)))
  paths["metrics"] = workdir / f"coco_metrics_{name}.json"
  paths["metrics"].write_text(json.dumps(dict(metrics), indent=1, sort_keys=True))
  return paths

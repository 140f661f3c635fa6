"""The features of the detection datasets (`digits_det`, COCO) and their COCO-format ground truth.

Every detection builder declares `detection_features(class_names, ...)`, so that one input pipeline
and one evaluation serve them all. An example:

  image:           (H, W, 3) uint8, PNG (digits_det) or JPEG (COCO, its bytes as in the archive).
  image/id:        int64, the image's id (COCO's own ids for COCO, the canvas index for digits_det).
  image/filename:  Text, the image's file name (COCO only: `with_filename=True`).
  objects:         a Sequence, one entry per instance:
    bbox:      float32 (4,) PIXEL [x1, y1, x2, y2] = COCO's [x, y, x + w, y + h] (mmdet's boxes, and
               the model's `Targets.boxes` before resizing), in pixel EDGES: a mask whose pixels span
               columns x0..x1 - 1 and rows y0..y1 - 1 has the box [x0, y0, x1, y1], as COCO's
               [x, y, w, h] (w = x1 - x0) reads it. Not TFDS's normalized BBoxFeature, which rejects
               COCO's boxes that pass the image border by a fraction of a pixel.
    label:     ClassLabel, 0 .. len(class_names) - 1.
    is_crowd:  bool (COCO's iscrowd: a crowd region is ignored by training and matched loosely by
               COCOeval).
    area:      float32, the instance's mask area in pixels (COCO's `area`, which COCOeval's
               small/medium/large ranges read).
    mask:      PNG, (H, W, 1) uint8, 1 on the instance, 0 elsewhere.

`coco_ground_truth` turns a split back into the COCO annotation format that pycocotools' COCO and
COCOeval read. Its category ids are the labels plus one (COCO's ids start at 1); detections must be
converted with `category_id` the same way.
"""

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath


def detection_features(
  class_names: Sequence[str],
  image_size: tuple[int, int] | None = None,
  *,
  image_format: str = "png",
  with_filename: bool = False,
):
  """The tfds FeaturesDict of a detection dataset (see the module docstring).

  class_names: the names of labels 0, 1, ...; image_size: (H, W) when every image has that size
  (digits_det's canvases), None for images of any size (COCO); image_format: the images' encoding,
  "png" or "jpeg"; with_filename: whether examples carry `image/filename`.
  """
  height, width = image_size if image_size is not None else (None, None)
  features = {
    "image": tfds.features.Image(shape=(height, width, 3), encoding_format=image_format),
    "image/id": np.int64,
  }
  if with_filename:
    features["image/filename"] = tfds.features.Text()
  features["objects"] = tfds.features.Sequence(
    {
      "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
      "label": tfds.features.ClassLabel(names=list(class_names)),
      "is_crowd": np.bool_,
      "area": np.float32,
      "mask": tfds.features.Image(shape=(height, width, 1), encoding_format="png"),
    }
  )
  return tfds.features.FeaturesDict(features)


def mask_box(mask: np.ndarray) -> np.ndarray:
  """The tight box of a non-empty (H, W) mask as `objects/bbox` holds it: float32 [x0, y0, x1, y1] in
  pixel edges, so that columns x0..x1 - 1 and rows y0..y1 - 1 hold all its pixels."""
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  if rows.size == 0:
    raise ValueError("mask_box: the mask is empty.")
  return np.asarray([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def category_id(label: int) -> int:
  """The COCO category id of a class label in `coco_ground_truth`: label + 1."""
  return int(label) + 1


def coco_ground_truth(source, split: str | None = None, class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """A split in COCO's annotation format (a dict that json.dumps writes as an instances file).

  source: a prepared tfds builder of detection_features (with `split`, e.g. "validation"), or an
    iterable of its decoded examples as numpy (tfds.as_numpy), with `class_names`.
  Returns {"images": [{id, width, height}], "categories": [{id, name}], "annotations": [{id, image_id,
  category_id, bbox [x, y, w, h] pixels, area, iscrowd, segmentation (compressed RLE, counts as str)}]}.
  Annotation ids run 1, 2, ... (COCOeval takes id 0 for "unmatched"); category ids are label + 1.
  """
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top

  if hasattr(source, "as_dataset"):
    if split is None:
      raise ValueError("coco_ground_truth: pass the split to read from the builder, e.g. split='validation'.")
    class_names = source.info.features["objects"]["label"].names
    examples: Iterable[dict] = tfds.as_numpy(source.as_dataset(split=split, shuffle_files=False))
  elif class_names is None:
    raise ValueError("coco_ground_truth: examples need their class_names (a builder carries its own).")
  else:
    examples = source
  images, annotations = [], []
  for example in examples:
    image_id = int(example["image/id"])
    height, width = (int(n) for n in example["image"].shape[:2])
    images.append({"id": image_id, "width": width, "height": height})
    objects = example["objects"]
    for bbox, label, crowd, area, mask in zip(
      objects["bbox"], objects["label"], objects["is_crowd"], objects["area"], objects["mask"], strict=True
    ):
      x1, y1, x2, y2 = (float(v) for v in bbox)
      rle = mask_utils.encode(np.asfortranarray(mask[..., 0].astype(np.uint8)))
      annotations.append(
        {
          "id": len(annotations) + 1,
          "image_id": image_id,
          "category_id": category_id(label),
          "bbox": [x1, y1, x2 - x1, y2 - y1],
          "area": float(area),
          "iscrowd": int(bool(crowd)),
          "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
        }
      )
  categories = [{"id": category_id(label), "name": name} for label, name in enumerate(class_names)]
  return {"images": images, "categories": categories, "annotations": annotations}


def write_coco_ground_truth(path, ground_truth: dict[str, Any]) -> None:
  """Writes `coco_ground_truth`'s dict as a JSON file that pycocotools.coco.COCO(path) loads."""
  epath.Path(path).write_text(json.dumps(ground_truth))

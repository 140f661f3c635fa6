"""Tiny COCO 2017 archives in the real layout, for the `coco` builder (shufflemamba_jax/data/coco.py).

`write_coco_zips(manual_dir)` writes train2017.zip, val2017.zip and annotations_trainval2017.zip
with a few random JPEGs of different sizes and annotations of every kind COCO has: polygons
(one and several parts), compressed RLE, uncompressed-RLE crowds, and ones mmdet drops
(a box under 1 pixel wide, zero area, a box off the image, a category outside the 80) or
ignores (a polygon without a valid part).
"""

import io
import json
import zipfile

import numpy as np
from etils import epath
from PIL import Image
from pycocotools import mask as mask_utils

# (category id, name): real COCO ids and names, and 12 ("street sign", in COCO's paper's 91 but
# not among the 80 of the annotation files), whose annotations the builder drops.
CATEGORIES = ((1, "person"), (18, "dog"), (44, "bottle"), (90, "toothbrush"), (12, "street sign"))


def _uncompressed_rle(mask: np.ndarray) -> dict:
  """COCO's uncompressed RLE of a (h, w) mask: run lengths in column-major order, zeros first."""
  flat = np.asfortranarray(mask).ravel(order="F").astype(np.int64)
  changes = np.flatnonzero(np.diff(flat)) + 1
  runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
  if flat[0] == 1:
    runs = [0, *runs]
  return {"counts": runs, "size": list(mask.shape)}


def _compressed_rle(mask: np.ndarray) -> dict:
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"counts": rle["counts"].decode("ascii"), "size": list(rle["size"])}


def _blob(rng, height: int, width: int) -> np.ndarray:
  """A random filled ellipse (uint8 {0, 1}, (height, width))."""
  cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
  ry, rx = rng.uniform(0.15, 0.3) * height, rng.uniform(0.15, 0.3) * width
  y, x = np.mgrid[:height, :width]
  return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.uint8)


def _box_of(mask: np.ndarray) -> list[float]:
  ys, xs = np.nonzero(mask)
  return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _polygon(rng, cx, cy, radius, points=7) -> list[float]:
  angles = np.sort(rng.uniform(0, 2 * np.pi, points))
  radii = rng.uniform(0.5, 1.0, points) * radius
  return np.round(np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).ravel(), 2).tolist()


def _annotation(annotations, image_id, category_id, segmentation, bbox=None, area=None, iscrowd=0, **extra):
  """Appends one annotation; bbox and area default to the ones of its decoded mask (as COCO's are)."""
  image = extra.pop("image")
  if bbox is not None and area is not None:
    rle = None  # Given: the segmentation may be one pycocotools cannot read (a part of 4 coordinates).
  elif isinstance(segmentation, list):
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, image["height"], image["width"]))
  elif isinstance(segmentation["counts"], list):
    rle = mask_utils.frPyObjects(segmentation, image["height"], image["width"])
  else:
    rle = segmentation
  bbox = [round(float(v), 2) for v in mask_utils.toBbox(rle)] if bbox is None else bbox
  area = float(mask_utils.area(rle)) if area is None else area
  annotations.append(
    {
      "id": len(annotations) + 1000 * image_id,
      "image_id": image_id,
      "category_id": category_id,
      "segmentation": segmentation,
      "area": area,
      "bbox": bbox,
      "iscrowd": iscrowd,
      **extra,
    }
  )


def write_coco_zips(manual_dir: str, seed: int = 0) -> dict[str, dict]:
  """Writes the three COCO 2017 zips into `manual_dir`; returns {split: the instances JSON written}.

  train: image 9 (48 x 64) with a polygon, a 3-part polygon, a compressed-RLE instance, a box
    0.5 pixel wide (dropped) and a polygon of one 4-coordinate part (no valid part: ignored);
    image 25 (60 x 40) with an uncompressed-RLE crowd, a polygon, a category-12 annotation and a
    box off the image (both dropped); image 30 (33 x 50) with no annotation.
  validation: image 139 (40 x 56) with a polygon and a compressed-RLE crowd; image 285 (36 x 36)
    whose only annotation has zero area (dropped).
  """
  rng = np.random.default_rng(seed)
  root = epath.Path(manual_dir)
  root.mkdir(parents=True, exist_ok=True)
  categories = [{"id": i, "name": name, "supercategory": "thing"} for i, name in CATEGORIES]
  sizes = {"train": {9: (48, 64), 25: (60, 40), 30: (33, 50)}, "validation": {139: (40, 56), 285: (36, 36)}}
  data = {}
  for split, images_sizes in sizes.items():
    images = [
      {"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w, "license": 1}
      for i, (h, w) in images_sizes.items()
    ]
    by_id = {image["id"]: image for image in images}
    annotations = []
    if split == "train":
      image = by_id[9]
      _annotation(annotations, 9, 1, [_polygon(rng, 20, 20, 12)], image=image)
      parts = [_polygon(rng, 12, 36, 6, 5), _polygon(rng, 45, 12, 8, 6), _polygon(rng, 50, 38, 7, 4)]
      _annotation(annotations, 9, 90, parts, image=image)
      _annotation(annotations, 9, 44, _compressed_rle(_blob(rng, 48, 64)), image=image)
      _annotation(
        annotations, 9, 18, [[30, 10, 30.4, 10, 30.4, 30, 30, 30]], bbox=[30.0, 10.0, 0.4, 20.0], area=8.0, image=image
      )  # 0.4 px wide: dropped.
      _annotation(annotations, 9, 1, [[5, 5, 15, 15]], bbox=[5.0, 5.0, 10.0, 10.0], area=50.0, image=image)
      image = by_id[25]
      crowd = _blob(rng, 60, 40)
      _annotation(annotations, 25, 1, _uncompressed_rle(crowd), bbox=_box_of(crowd), iscrowd=1, image=image)
      _annotation(annotations, 25, 18, [_polygon(rng, 20, 40, 15, 9)], image=image)
      _annotation(annotations, 25, 12, [_polygon(rng, 20, 20, 8)], image=image)  # Not one of the 80.
      _annotation(annotations, 25, 44, [[50, 70, 55, 70, 55, 75]], bbox=[50.0, 70.0, 5.0, 5.0], area=12.5, image=image)
    else:
      image = by_id[139]
      _annotation(annotations, 139, 18, [_polygon(rng, 28, 20, 14, 8)], image=image)
      crowd = _blob(rng, 40, 56)
      _annotation(annotations, 139, 1, _compressed_rle(crowd), iscrowd=1, image=image)
      _annotation(annotations, 285, 44, [[3, 3, 9, 3, 9, 3]], bbox=[3.0, 3.0, 6.0, 1.0], area=0.0, image=by_id[285])
    data[split] = {"info": {"year": 2017}, "images": images, "annotations": annotations, "categories": categories}
    archive, folder = ("train2017.zip", "train2017") if split == "train" else ("val2017.zip", "val2017")
    with (root / archive).open("wb") as file, zipfile.ZipFile(file, "w") as zipped:
      for image in images:
        pixels = rng.integers(0, 256, (image["height"], image["width"], 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        zipped.writestr(f"{folder}/{image['file_name']}", buffer.getvalue())
  with (root / "annotations_trainval2017.zip").open("wb") as file, zipfile.ZipFile(file, "w") as zipped:
    for split, member in (("train", "instances_train2017.json"), ("validation", "instances_val2017.json")):
      zipped.writestr(f"annotations/{member}", json.dumps(data[split]))
  return data

"""The `coco` dataset: COCO 2017 instances (boxes, classes and instance masks) as a TFDS builder.

TFDS's own `coco/2017` has no instance masks and downloads itself; this builder reads the
official archives placed in the manual folder, through zipfile, without extracting them:
`train2017.zip` (`train2017/*.jpg`), `val2017.zip` (`val2017/*.jpg`) and
`annotations_trainval2017.zip` (`annotations/instances_{train,val}2017.json`), from
https://cocodataset.org. Its TFDS name is `coco_instances` (TFDS's own builder holds `coco`);
`python -m shufflemamba_jax.prepare --dataset=coco --manual_dir=DIR` builds it, and the input
pipeline's `config.dataset = "coco"` reads it.

What one example holds (splits `train`, 118,287 images, and `validation`, 5,000), the features
of `detection_features.detection_features(CLASS_NAMES, image_format="jpeg", with_filename=True)`,
the ones `digits_det` declares too:
  image: the JPEG bytes as they are in the zip (never re-encoded).
  image/id: int64, the COCO image id (results JSON for COCOeval); image/filename: its file name.
  objects: one entry per kept annotation, in the JSON's order:
    bbox: float32 (4,) PIXEL x1, y1, x2, y2 = COCO's [x, y, x + w, y + h] (mmdet's boxes, and
      the model's `Targets.boxes` before resizing), as detection_features describes.
    label: 0..79, the index of the category id in CATEGORY_IDS (mmdet's cat2label).
    is_crowd: bool, instances to ignore in matching: COCO's iscrowd, or (mmdet's
      LoadAnnotations) a polygon annotation without any valid polygon (>= 3 points).
    area: float32, COCO's area (of the mask, not the box).
    mask: the instance's uint8 {0, 1} (height, width, 1) mask at full image size, PNG-encoded
      so that the streams decode it with tf.io.decode_png: pycocotools' annToMask
      (frPyObjects + merge + decode) of its polygons, uncompressed or compressed RLE.

Where each of mmdet's filters happens:
  Builder, both splits (mmdet's CocoDataset.parse_data_info drops these in train and test mode
  alike; COCOeval reads the JSON itself): annotations flagged `ignore`, boxes that do not meet
  the image, boxes with w < 1 or h < 1, area <= 0, and categories outside the 80 are dropped.
  Input stream, train only (mmdet's filter_data with the coco_instance config's
  `filter_cfg=dict(filter_empty_gt=True, min_size=32)`): images without objects, or with a side
  under 32 pixels. The builder keeps every image: validation needs them all. mmdet's
  filter_empty_gt also keeps an image whose every annotation was dropped above (its cat_img_map
  counts them); the build logs how many such images a split has.
Crowd instances are kept and flagged; the stream marks them not valid (`Targets.valid`).

Size: every mask is a full-size PNG, mostly zeros: on 640 x 480 images about 0.5 KB for a small
object, 0.7 KB medium and 1.7 KB large (0.9 KB on COCO's mix), so COCO's ~860k train instances
add under 1 GB to the ~19 GB of JPEGs. Building reads the annotations JSON whole (448 MB for
train: a few GB of Python objects) and rasterizes and encodes the masks in threads, about 3.5 ms
of CPU per instance (~50 CPU minutes for train).
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import logging
import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from pycocotools import mask as mask_utils

from shufflemamba_jax.data import detection_features

_LOGGER = logging.getLogger(__name__)

TFDS_NAME = "coco_instances"
ANNOTATIONS_ARCHIVE = "annotations_trainval2017.zip"
# split: (images archive, folder of its JPEGs, annotations member of ANNOTATIONS_ARCHIVE).
SPLITS = {
  "train": ("train2017.zip", "train2017", "annotations/instances_train2017.json"),
  "validation": ("val2017.zip", "val2017", "annotations/instances_val2017.json"),
}
ARCHIVES = (SPLITS["train"][0], SPLITS["validation"][0], ANNOTATIONS_ARCHIVE)
NUM_CLASSES = 80
# COCO's 80 category ids (1..90 with gaps) in id order; label k is CATEGORY_IDS[k] in results.
CATEGORY_IDS = (
  1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
  33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
  60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip
# Their names, as in the annotation files (mmdet's CocoDataset.METAINFO classes).
CLASS_NAMES = (
  "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
  "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
  "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
  "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
  "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
  "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
  "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
  "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
  "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
LABELS = {category_id: label for label, category_id in enumerate(CATEGORY_IDS)}
_WHERE = "https://cocodataset.org/#download (2017 Train images, 2017 Val images, 2017 Train/Val annotations)"
_LOOKAHEAD = 256  # Images whose masks are in flight in the threads: bounds the memory of a build.


def check_manual_dir(manual_dir: str | None) -> dict[str, epath.Path]:
  """{archive name: path} of the three COCO zips in `manual_dir`, or a FileNotFoundError naming the missing."""
  if not manual_dir:
    raise FileNotFoundError(f"--manual_dir is required for coco: a folder holding {', '.join(ARCHIVES)} ({_WHERE}).")
  paths = {name: epath.Path(manual_dir) / name for name in ARCHIVES}
  missing = [f"{name} -> put it at {path}" for name, path in paths.items() if not path.is_file()]
  if missing:
    raise FileNotFoundError(f"Missing COCO archive(s) in --manual_dir: {'; '.join(missing)} (download from {_WHERE}).")
  return paths


def keep_annotation(annotation: dict, height: int, width: int) -> bool:
  """Whether mmdet's CocoDataset.parse_data_info keeps the annotation of an image of height x width."""
  if annotation.get("ignore", False):
    return False
  x1, y1, w, h = annotation["bbox"]
  inter_w = max(0, min(x1 + w, width) - max(x1, 0))
  inter_h = max(0, min(y1 + h, height) - max(y1, 0))
  if inter_w * inter_h == 0 or annotation["area"] <= 0 or w < 1 or h < 1:
    return False
  return annotation["category_id"] in LABELS


def instance_mask(segmentation, height: int, width: int) -> np.ndarray | None:
  """uint8 {0, 1} (height, width) mask of a COCO segmentation, or None when it has no valid polygon.

  Polygons (a list of [x0, y0, x1, y1, ...] parts) are rasterized and merged, uncompressed RLE
  ({"counts": [...], "size": [h, w]}) converted and compressed RLE decoded, as pycocotools'
  annToMask. As mmdet's LoadAnnotations, polygon parts with an odd number or fewer than 6
  coordinates are left out (pycocotools would read a first part of 4 as a box).
  """
  if isinstance(segmentation, list):
    parts = [part for part in segmentation if len(part) % 2 == 0 and len(part) >= 6]
    if not parts:
      return None
    rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
  elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    if list(segmentation["size"]) != [height, width]:
      raise ValueError(f"RLE of size {segmentation['size']} on an image of {height} x {width}")
    counts = segmentation["counts"]
    rle = mask_utils.frPyObjects(segmentation, height, width) if isinstance(counts, list) else segmentation
  else:
    return None
  return mask_utils.decode(rle)


def encode_png(mask: np.ndarray) -> bytes:
  """PNG bytes of a uint8 (height, width) mask: 8-bit grayscale, decoded by tf.io.decode_png as (h, w, 1)."""
  buffer = io.BytesIO()
  # zlib level 6: on 640 x 480 masks 0.9 KB and 3.5 ms per COCO-like instance, against 2.1 KB and
  # 1.9 ms at level 1; the masks are read every epoch, built once (in threads).
  Image.fromarray(np.ascontiguousarray(mask, np.uint8), mode="L").save(buffer, format="PNG", compress_level=6)
  return buffer.getvalue()


def image_objects(annotations: list[dict], height: int, width: int) -> dict[str, list]:
  """The `objects` feature of an image of height x width: its kept annotations, masks as PNG bytes."""
  objects = {"bbox": [], "label": [], "is_crowd": [], "area": [], "mask": []}
  for annotation in annotations:
    if not keep_annotation(annotation, height, width):
      continue
    mask = instance_mask(annotation.get("segmentation"), height, width)
    x1, y1, w, h = annotation["bbox"]
    objects["bbox"].append(np.asarray([x1, y1, x1 + w, y1 + h], np.float32))
    objects["label"].append(LABELS[annotation["category_id"]])
    objects["is_crowd"].append(bool(annotation.get("iscrowd", 0)) or mask is None)
    objects["area"].append(np.float32(annotation["area"]))
    objects["mask"].append(encode_png(np.zeros((height, width), np.uint8) if mask is None else mask))
  return objects


def _read_annotations(archive: epath.Path, member: str) -> dict:
  with archive.open("rb") as file, zipfile.ZipFile(file) as zipped:
    if member not in zipped.namelist():
      raise FileNotFoundError(f"{archive} holds no {member}")
    with zipped.open(member) as stream:
      return json.load(stream)


def _check_categories(categories: list[dict], where: str) -> None:
  """The file's categories must be COCO's: an id of the 80 under another name is a different label set."""
  for category in categories:
    label = LABELS.get(category["id"])
    if label is not None and category["name"] != CLASS_NAMES[label]:
      raise ValueError(
        f"{where}: category id {category['id']} is named {category['name']!r}, not COCO's {CLASS_NAMES[label]!r}"
      )


class CocoInstances(tfds.core.GeneratorBasedBuilder):
  """COCO 2017 instances: boxes, 80 classes and instance masks; train 118,287 and validation 5,000 images."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "COCO 2017 instances with PNG instance masks; mmdet's degenerate annotations dropped."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place {', '.join(ARCHIVES)} (from {_WHERE}) in manual_dir."

  def _info(self):
    return self.dataset_info_from_configs(
      description="COCO 2017 object instances with masks (pixel x1y1x2y2 boxes, labels 0..79 = CATEGORY_IDS).",
      features=detection_features.detection_features(CLASS_NAMES, image_format="jpeg", with_filename=True),
      homepage="https://cocodataset.org",
      metadata=tfds.core.MetadataDict(category_ids=list(CATEGORY_IDS)),
    )

  def _split_generators(self, dl_manager):
    paths = check_manual_dir(dl_manager.manual_dir)
    return {
      split: self._generate_examples(paths[archive], folder, paths[ANNOTATIONS_ARCHIVE], member)
      for split, (archive, folder, member) in SPLITS.items()
    }

  def _generate_examples(self, archive: epath.Path, folder: str, annotations_archive: epath.Path, member: str):
    data = _read_annotations(annotations_archive, member)
    _check_categories(data["categories"], f"{annotations_archive}:{member}")
    per_image = collections.defaultdict(list)
    for annotation in data["annotations"]:
      per_image[annotation["image_id"]].append(annotation)
    images = sorted(data["images"], key=lambda image: image["id"])
    del data
    counts = collections.Counter()
    with (
      archive.open("rb") as file,
      zipfile.ZipFile(file) as zipped,
      concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool,
    ):
      names = set(zipped.namelist())
      pending = collections.deque()

      def example(image, future):
        objects = future.result()
        counts["instances"] += len(objects["label"])
        counts["max_instances"] = max(counts["max_instances"], len(objects["label"]))
        if per_image[image["id"]] and not objects["label"]:
          counts["all_dropped"] += 1
        name = f"{folder}/{image['file_name']}"
        if name not in names:
          raise FileNotFoundError(f"{archive} holds no {name} (image id {image['id']} of {member})")
        features = {"image": zipped.read(name), "image/id": image["id"], "image/filename": image["file_name"]}
        return image["id"], {**features, "objects": objects}

      # Masks are decoded and encoded in threads (PNG encoding releases the GIL), the zip read here.
      for image in images:
        pending.append((image, pool.submit(image_objects, per_image[image["id"]], image["height"], image["width"])))
        if len(pending) > _LOOKAHEAD:
          yield example(*pending.popleft())
      while pending:
        yield example(*pending.popleft())
    _LOGGER.info(
      "%s: %d images, %d instances kept (at most %d in one image); %d images had only dropped annotations.",
      member,
      len(images),
      counts["instances"],
      counts["max_instances"],
      counts["all_dropped"],
    )

"""The `ade20k` tfds dataset: the 150-class MIT scene-parsing benchmark (ADEChallengeData2016).

TFDS's own `scene_parse150` reads the instance-track annotations; this builder reads the
semantic release, `ADEChallengeData2016.zip` (http://data.csail.mit.edu/places/ADEchallenge/),
placed in the manual folder, with `images/{training,validation}/*.jpg` and
`annotations/{training,validation}/*.png` (one class index per pixel, 0 = "other"). Labels are
stored reduced by one, as mmseg's `reduce_zero_label`: 0 becomes 255 (ignored) and classes
1..150 become 0..149. The JPEGs are stored as they are. Importing this module registers the
builder; prepare it with `python -m shufflemamba_jax.prepare --dataset=ade20k --manual_dir=DIR`.
"""

from __future__ import annotations

import zipfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from shufflemamba_jax.data import IGNORE_INDEX

ARCHIVE = "ADEChallengeData2016.zip"
ROOT = "ADEChallengeData2016"
SPLITS = {"train": "training", "validation": "validation"}
NUM_CLASSES = 150
# The 150 classes in label order (mmseg's ADE20KDataset.METAINFO, first name of each).
CLASS_NAMES = (
  "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
  "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
  "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
  "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
  "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
  "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
  "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
  "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
  "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
  "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
  "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
  "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
  "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
  "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
  "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
  "glass", "clock", "flag",
)  # fmt: skip


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """ADE20K's 0..150 label map -> 0..149 with 255 for "other" (uint8, same shape)."""
  label = label.astype(np.int32)
  return np.where(label == 0, IGNORE_INDEX, label - 1).astype(np.uint8)


def check_manual_dir(manual_dir: str | None) -> epath.Path:
  """The archive's path in `manual_dir`, or a FileNotFoundError saying what to put where."""
  where = "https://ade20k.csail.mit.edu (the SceneParsing ADEChallengeData2016 release)"
  if not manual_dir:
    raise FileNotFoundError(f"--manual_dir is required for ade20k: a folder holding {ARCHIVE} (from {where}).")
  path = epath.Path(manual_dir) / ARCHIVE
  if not path.is_file():
    raise FileNotFoundError(f"Missing {ARCHIVE} in --manual_dir: put it at {path} (download it from {where}).")
  return path


class Ade20k(tfds.core.GeneratorBasedBuilder):
  """ADE20K scene parsing, 150 classes: train 20,210 and validation 2,000 images."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "ADEChallengeData2016, labels reduced by one (0 -> 255 ignored)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place {ARCHIVE} (from http://data.csail.mit.edu/places/ADEchallenge/) in manual_dir."

  def _info(self):
    return self.dataset_info_from_configs(
      description="ADE20K scene parsing (ADEChallengeData2016): 150 classes, 255 = unlabelled.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "file_name": tfds.features.Text(),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://ade20k.csail.mit.edu",
    )

  def _split_generators(self, dl_manager):
    archive = check_manual_dir(dl_manager.manual_dir)
    return {split: self._generate_examples(archive, folder) for split, folder in SPLITS.items()}

  def _generate_examples(self, archive: epath.Path, folder: str):
    with archive.open("rb") as file, zipfile.ZipFile(file) as zipped:
      names = set(zipped.namelist())
      images = sorted(n for n in names if n.startswith(f"{ROOT}/images/{folder}/") and n.endswith(".jpg"))
      if not images:
        raise FileNotFoundError(f"{archive} holds no {ROOT}/images/{folder}/*.jpg")
      for image_name in images:
        stem = image_name.rsplit("/", 1)[1][: -len(".jpg")]
        label_name = f"{ROOT}/annotations/{folder}/{stem}.png"
        if label_name not in names:
          raise FileNotFoundError(f"{archive} has {image_name} but not its annotation {label_name}")
        label = tf.io.decode_png(zipped.read(label_name), channels=1).numpy()
        yield (stem, {"image": zipped.read(image_name), "label": reduce_zero_label(label), "file_name": f"{stem}.jpg"})

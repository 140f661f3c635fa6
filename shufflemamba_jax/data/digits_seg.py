"""The `digits_seg` tfds dataset: scikit-learn's handwritten digits laid out on canvases, offline.

The embedded default for semantic segmentation, as `digits` is for classification: each
CANVAS x CANVAS image holds 1 to 3 digits, each upscaled SCALE times (nearest) and placed at a
random position without overlapping the others. A pixel of a digit's stroke (gray level at least
STROKE_LEVEL of 16) is labelled with that digit's class (0-9), every other pixel with
BACKGROUND (10). Training canvases use only the digits of `digits`' training split, validation
canvases only its validation digits, and everything is drawn from fixed seeds, so every machine
builds the same dataset. Importing this module registers the builder.
"""

import numpy as np
import tensorflow_datasets as tfds

from shufflemamba_jax.data import digits

CANVAS = 64
SCALE = 3  # 8x8 digits become 24x24.
MAX_DIGITS = 3
STROKE_LEVEL = 4  # Of the 0..16 gray levels: fainter pixels are background.
BACKGROUND = 10
NUM_CLASSES = 11
CLASS_NAMES = tuple(str(d) for d in range(10)) + ("background",)
NUM_CANVASES = {"train": 2000, "validation": 400}
SEEDS = {"train": 1, "validation": 2}


def canvas(rng: np.random.Generator, gray: np.ndarray, labels: np.ndarray, pool: np.ndarray):
  """One example: (image uint8 (CANVAS, CANVAS, 3), label uint8 (CANVAS, CANVAS)).

  gray: (N, 8, 8) 0..16 digit images; labels: (N,) their classes; pool: the indices to draw from.
  """
  size = 8 * SCALE
  image = np.zeros((CANVAS, CANVAS), np.uint8)
  label = np.full((CANVAS, CANVAS), BACKGROUND, np.uint8)
  taken = np.zeros((CANVAS, CANVAS), bool)
  for _ in range(int(rng.integers(1, MAX_DIGITS + 1))):
    index = int(rng.choice(pool))
    for _attempt in range(50):  # Rejection sampling of a free spot; a crowded canvas keeps fewer digits.
      top, left = rng.integers(0, CANVAS - size + 1, 2)
      if not taken[top : top + size, left : left + size].any():
        break
    else:
      continue
    taken[top : top + size, left : left + size] = True
    digit = np.kron(gray[index], np.ones((SCALE, SCALE), gray.dtype))
    image[top : top + size, left : left + size] = np.round(digit * (255.0 / 16.0)).astype(np.uint8)
    stroke = digit >= STROKE_LEVEL
    label[top : top + size, left : left + size][stroke] = labels[index]
  return np.repeat(image[..., None], 3, axis=-1), label


def load_gray_digits():
  """(gray (1797, 8, 8) 0..16 int, labels (1797,) int) from scikit-learn."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  loaded = load_digits()
  return loaded.images.astype(np.int64), loaded.target.astype(np.int64)


class DigitsSeg(tfds.core.GeneratorBasedBuilder):
  """Canvases of 1-3 upscaled scikit-learn digits with per-pixel labels (train 2000, validation 400)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "64x64 canvases, 1-3 digits at 3x, 11 classes (10 = background)."}

  def _info(self):
    return self.dataset_info_from_configs(
      description=(
        "Semantic segmentation on scikit-learn's bundled 8x8 handwritten digits: 64x64 canvases of "
        "1-3 non-overlapping 24x24 digits; stroke pixels labelled 0-9, background 10."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(CANVAS, CANVAS, 3), encoding_format="png"),
          "label": tfds.features.Image(shape=(CANVAS, CANVAS, 1), encoding_format="png"),
          "file_name": tfds.features.Text(),
          "id": np.int64,
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn: nothing to download.
    train, validation = digits.digits_split_indices()
    return {
      "train": self._generate_examples("train", train),
      "validation": self._generate_examples("validation", validation),
    }

  def _generate_examples(self, split, pool):
    gray, labels = load_gray_digits()
    rng = np.random.default_rng(SEEDS[split])
    for index in range(NUM_CANVASES[split]):
      image, label = canvas(rng, gray, labels, pool)
      file_name = f"{split}_{index:05d}.png"
      yield file_name, {"image": image, "label": label[..., None], "file_name": file_name, "id": index}

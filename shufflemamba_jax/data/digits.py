"""The `digits` tfds dataset: scikit-learn's 1,797 real 8x8 handwritten digits, offline.

A small real image-classification set that needs no download, so the whole training stack
(tfds reading, augmentation, resume) runs in tests and on a laptop. Importing this module
registers the builder, after which `tfds.builder("digits", data_dir=...)` works.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TRAIN_EXAMPLES = 1437  # int(0.8 * 1797); the other 360 form the validation split.
IMAGE_SIZE = 32
SPLIT_SEED = 0


def digits_split_indices():
  """Returns (train, validation) index arrays into `sklearn.datasets.load_digits()`.

  A fixed seeded permutation, so every machine builds the same 1437/360 split.
  """
  order = np.random.default_rng(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return np.sort(order[:NUM_TRAIN_EXAMPLES]), np.sort(order[NUM_TRAIN_EXAMPLES:])


def digits_images_uint8():
  """Returns (images uint8 (1797, 32, 32, 3), labels int64 (1797,)) from scikit-learn.

  The 0..16 gray levels are scaled to 0..255 and each pixel is repeated 4x4 (nearest
  upsampling keeps the strokes sharp); the three RGB channels are identical.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
  factor = IMAGE_SIZE // gray.shape[1]
  gray = np.repeat(np.repeat(gray, factor, axis=1), factor, axis=2)
  return np.repeat(gray[..., None], 3, axis=-1), digits.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits as 32x32 RGB PNGs (train 1437, validation 360)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: seeded 80/20 split, nearest upsampling to 32x32."}

  def _info(self):
    return self.dataset_info_from_configs(
      description=(
        "The 1,797 8x8 handwritten digit images bundled with scikit-learn (UCI optdigits "
        "test set), upsampled to 32x32 RGB."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(num_classes=10),
          "file_name": tfds.features.Text(),
          "id": np.int64,
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn: nothing to download.
    train, validation = digits_split_indices()
    return {"train": self._generate_examples(train), "validation": self._generate_examples(validation)}

  def _generate_examples(self, indices):
    images, labels = digits_images_uint8()
    for index in indices:
      index = int(index)
      file_name = f"digit_{index:04d}.png"
      yield (file_name, {"image": images[index], "label": int(labels[index]), "file_name": file_name, "id": index})

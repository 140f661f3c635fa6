"""Test data for the input pipeline: tiny ILSVRC2012-format tars (`data.synthetic`) and prepared TFDS datasets.

A pytest plugin of conftest.py. Preparing a dataset costs seconds, so each is built once per
session, when a test first asks for it.
"""

import contextlib
import socket

import numpy as np
import pytest

# Training images that are not plain RGB JPEGs, as a few of ImageNet's are. The pipeline must
# replace the undecodable ones (naming them) and decode the others.
CORRUPT_TRAIN_IMAGE = "n01443537_2.JPEG"  # A valid start, garbage after.
TRUNCATED_TRAIN_IMAGE = "n01443537_3.JPEG"
PNG_TRAIN_IMAGE = "n01440764_1.JPEG"
CMYK_TRAIN_IMAGE = "n01484850_2.JPEG"
SPECIAL_TRAIN_IMAGES = {
  CORRUPT_TRAIN_IMAGE: "corrupt",
  TRUNCATED_TRAIN_IMAGE: "truncated",
  PNG_TRAIN_IMAGE: "png",
  CMYK_TRAIN_IMAGE: "cmyk",
}


@contextlib.contextmanager
def _no_network():
  """Makes any socket connection fail, proving that a build works offline."""

  def refuse(*args, **kwargs):
    raise OSError(f"network access attempted during an offline build: {args}")

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket.socket, "connect_ex", refuse)
    yield


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """A TFDS data_dir with `digits` prepared (offline)."""
  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("digits")
  with _no_network():
    pipeline.prepare("digits", data_dir=str(root), compute_stats=False)
  return str(root)


@pytest.fixture(scope="session")
def imagenet_data(tmp_path_factory):
  """(data_dir, {file_name: synset}): TFDS's real imagenet2012 builder run on tiny tars."""
  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  import synthetic_imagenet  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("imagenet2012")
  # 3 classes x 4 training images and 6 validation images of 40-89 pixels a side.
  labels = synthetic_imagenet.write_imagenet_tars(str(root / "manual"), special=SPECIAL_TRAIN_IMAGES)
  pipeline.prepare("imagenet2012", data_dir=str(root / "tfds"), manual_dir=str(root / "manual"), compute_stats=False)
  return str(root / "tfds"), labels


def write_ade20k_zip(manual_dir: str, seed: int = 0, validation_sizes=None) -> dict[str, np.ndarray]:
  """Writes ADEChallengeData2016.zip in the real layout; returns {split/stem: 0..150 label map}.

  Every image is split into vertical bands, one class each (0 included, the "other" class); the
  image's gray level in a band is 1.5 x its class, so a decoded image shows its label map.
  validation_sizes: the (height, width) of each validation image; None = two of random sizes.
  """
  import zipfile  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  epath.Path(manual_dir).mkdir(parents=True, exist_ok=True)
  labels = {}
  with (epath.Path(manual_dir) / "ADEChallengeData2016.zip").open("wb") as file, zipfile.ZipFile(file, "w") as archive:
    counts = {"training": 3, "validation": 2 if validation_sizes is None else len(validation_sizes)}
    for folder, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
      for k in range(1, counts[folder] + 1):
        stem = f"{prefix}_{k:08d}"
        height, width = int(rng.integers(40, 70)), int(rng.integers(40, 70))
        if folder == "validation" and validation_sizes is not None:
          height, width = validation_sizes[k - 1]
        classes = rng.choice(151, 3, replace=False)
        classes[0] = 0 if k == 1 else classes[0]  # Some "other" pixels to be ignored.
        label = np.repeat(classes, -(-width // 3))[:width][None, :].repeat(height, 0).astype(np.uint8)
        image = np.repeat(np.round(label * 1.5).astype(np.uint8)[..., None], 3, axis=-1)
        archive.writestr(
          f"ADEChallengeData2016/images/{folder}/{stem}.jpg", tf.io.encode_jpeg(image, quality=95).numpy()
        )
        archive.writestr(
          f"ADEChallengeData2016/annotations/{folder}/{stem}.png", tf.io.encode_png(label[..., None]).numpy()
        )
        labels[f"{folder}/{stem}"] = label
  return labels


@pytest.fixture(scope="session")
def digits_seg_data_dir(tmp_path_factory):
  """A TFDS data_dir with `digits_seg` prepared (offline)."""
  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("digits_seg")
  with _no_network():
    pipeline.prepare("digits_seg", data_dir=str(root), compute_stats=False)
  return str(root)


@pytest.fixture(scope="session")
def digits_det_data_dir(tmp_path_factory):
  """A TFDS data_dir with `digits_det` prepared (offline)."""
  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("digits_det")
  with _no_network():
    pipeline.prepare("digits_det", data_dir=str(root), compute_stats=False)
  return str(root)

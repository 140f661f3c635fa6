"""Test data for the input pipeline: tiny ILSVRC2012-format tars and prepared TFDS datasets.

A pytest plugin of conftest.py. Preparing a dataset costs seconds, so each is built once per
session, when a test first asks for it.
"""

import contextlib
import io
import os
import socket
import tarfile

import numpy as np
import pytest

# Real ImageNet synsets (first lines of TFDS's imagenet2012 labels.txt).
TRAIN_SYNSETS = ("n01440764", "n01443537", "n01484850")
TRAIN_IMAGES_PER_CLASS = 4
NUM_VAL_IMAGES = 6
# One training JPEG with a valid start and garbage after: the pipeline must skip it, naming it.
CORRUPT_TRAIN_IMAGE = "n01443537_2.JPEG"


def jpeg_bytes(rng: np.random.Generator, height: int, width: int) -> bytes:
  """A random smooth RGB JPEG of the given size."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
  image = tf.image.resize(coarse[None], (height, width), method="bilinear")[0]
  return tf.io.encode_jpeg(tf.cast(image, tf.uint8), quality=90).numpy()


def corrupt_jpeg_bytes(rng: np.random.Generator) -> bytes:
  """A JPEG header followed by garbage: the header parses, decoding fails."""
  valid = jpeg_bytes(rng, 40, 48)
  return valid[:200] + bytes(rng.integers(0, 256, 300, dtype=np.uint8))


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def validation_labels(count: int) -> list[str]:
  """Synsets of ILSVRC2012_val_00000001.. from TFDS's bundled validation label file."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
  with open(os.fspath(path)) as f:
    return f.read().split()[:count]


def write_imagenet_tars(manual_dir: str, seed: int = 0) -> dict[str, str]:
  """Writes ILSVRC2012_img_{train,val}.tar in the real layout; returns {file_name: synset}.

  Train: one tar per synset holding <synset>_<k>.JPEG. Validation: ILSVRC2012_val_<8 digits>.JPEG
  at the top level, labelled by TFDS from its bundled label file (sorted file names).
  """
  rng = np.random.default_rng(seed)
  os.makedirs(manual_dir, exist_ok=True)
  labels = {}
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train_tar:
    for synset in TRAIN_SYNSETS:
      buffer = io.BytesIO()
      with tarfile.open(fileobj=buffer, mode="w") as class_tar:
        for k in range(TRAIN_IMAGES_PER_CLASS):
          name = f"{synset}_{k}.JPEG"
          data = (
            corrupt_jpeg_bytes(rng)
            if name == CORRUPT_TRAIN_IMAGE
            else jpeg_bytes(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90)))
          )
          _add_file(class_tar, name, data)
          labels[name] = synset
      _add_file(train_tar, f"{synset}.tar", buffer.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val_tar:
    for k, synset in enumerate(validation_labels(NUM_VAL_IMAGES), start=1):
      name = f"ILSVRC2012_val_{k:08d}.JPEG"
      _add_file(val_tar, name, jpeg_bytes(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90))))
      labels[name] = synset
  return labels


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

  root = tmp_path_factory.mktemp("imagenet2012")
  labels = write_imagenet_tars(str(root / "manual"))
  pipeline.prepare("imagenet2012", data_dir=str(root / "tfds"), manual_dir=str(root / "manual"), compute_stats=False)
  return str(root / "tfds"), labels


def write_ade20k_zip(manual_dir: str, seed: int = 0) -> dict[str, np.ndarray]:
  """Writes ADEChallengeData2016.zip in the real layout; returns {split/stem: 0..150 label map}.

  Every image is split into vertical bands, one class each (0 included, the "other" class); the
  image's gray level in a band is 1.5 x its class, so a decoded image shows its label map.
  """
  import zipfile  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  os.makedirs(manual_dir, exist_ok=True)
  labels = {}
  with zipfile.ZipFile(os.path.join(manual_dir, "ADEChallengeData2016.zip"), "w") as archive:
    for folder, prefix, count in (("training", "ADE_train", 3), ("validation", "ADE_val", 2)):
      for k in range(1, count + 1):
        stem = f"{prefix}_{k:08d}"
        height, width = int(rng.integers(40, 70)), int(rng.integers(40, 70))
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

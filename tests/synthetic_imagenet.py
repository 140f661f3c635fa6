"""Synthetic ImageNet archives in the real ILSVRC2012 layout, made offline (test fixture code).

The tests prepare tiny ones with TFDS's real `imagenet2012` builder, and the input benchmark
(benchmarks/input_pipeline.py) larger ones of ImageNet-like size, so both exercise exactly the
code path of the real dataset without downloading it.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VALIDATION_TAR = "ILSVRC2012_img_val.tar"


def synsets(count: int) -> list[str]:
  """The first `count` ImageNet synsets, in TFDS's label order."""
  return epath.Path(tfds.core.tfds_path("datasets/imagenet2012/labels.txt")).read_text().split()[:count]


def validation_labels(count: int) -> list[str]:
  """Synsets of ILSVRC2012_val_00000001.. from TFDS's bundled validation label file."""
  path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
  return epath.Path(path).read_text().split()[:count]


def jpeg_bytes(rng: np.random.Generator, height: int, width: int, textured: bool = False) -> bytes:
  """A random RGB JPEG: smooth color fields, plus fine noise when `textured`.

  The noise gives the file an ImageNet-like size (about 100 KB at 500x375, quality 90), so
  decoding costs what it costs on real photos.
  """
  coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
  image = tf.image.resize(coarse[None], (height, width), method="bilinear")[0]
  if textured:
    image += rng.normal(0.0, 24.0, (height, width, 3)).astype(np.float32)
  image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  return tf.io.encode_jpeg(image, quality=90).numpy()


def corrupt_jpeg_bytes(rng: np.random.Generator) -> bytes:
  """A JPEG header followed by garbage: the header parses, decoding fails."""
  valid = jpeg_bytes(rng, 40, 48)
  return valid[:200] + bytes(rng.integers(0, 256, 300, dtype=np.uint8))


def truncated_jpeg_bytes(rng: np.random.Generator) -> bytes:
  """A valid JPEG cut off half way: the header parses, the scan data ends early."""
  valid = jpeg_bytes(rng, 40, 48)
  return valid[: len(valid) // 2]


def png_bytes(rng: np.random.Generator, height: int, width: int) -> bytes:
  """A random RGB PNG under a .JPEG name, as a few real ImageNet files are."""
  return tf.io.encode_png(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).numpy()


def cmyk_jpeg_bytes(rng: np.random.Generator, height: int, width: int) -> bytes:
  """A random CMYK JPEG (written by Pillow), as a few real ImageNet files are."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "CMYK").save(buffer, "JPEG", quality=95)
  return buffer.getvalue()


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_imagenet_tars(
  manual_dir: str,
  *,
  classes: int = 3,
  images_per_class: int = 4,
  num_validation: int = 6,
  size_range: tuple[int, int] = (40, 90),
  fixed_size: tuple[int, int] | None = None,
  textured: bool = False,
  special: dict[str, str] | None = None,
  seed: int = 0,
) -> dict[str, str]:
  """Writes ILSVRC2012_img_{train,val}.tar in the real layout; returns {file_name: synset}.

  Train: one tar per synset (the first `classes`) holding <synset>_<k>.JPEG. Validation:
  ILSVRC2012_val_<8 digits>.JPEG at the top level, labelled by TFDS from its bundled label file.
  Images are (height, width) = `fixed_size`, or each side uniform in `size_range`. `special` maps
  file names to what they hold instead of an RGB JPEG: "corrupt" (a valid header, then garbage),
  "truncated" (half a JPEG), "png" or "cmyk" (a CMYK JPEG).
  """
  special = special or {}
  rng = np.random.default_rng(seed)
  manual = epath.Path(manual_dir)
  manual.mkdir(parents=True, exist_ok=True)

  def image(name: str) -> bytes:
    kind = special.get(name, "rgb")
    if kind == "corrupt":
      return corrupt_jpeg_bytes(rng)
    if kind == "truncated":
      return truncated_jpeg_bytes(rng)
    height, width = fixed_size or (int(rng.integers(*size_range)), int(rng.integers(*size_range)))
    writers = {"rgb": lambda: jpeg_bytes(rng, height, width, textured), "png": lambda: png_bytes(rng, height, width)}
    writers["cmyk"] = lambda: cmyk_jpeg_bytes(rng, height, width)
    return writers[kind]()

  labels = {}
  with (manual / TRAIN_TAR).open("wb") as file, tarfile.open(fileobj=file, mode="w") as train_tar:
    for synset in synsets(classes):
      buffer = io.BytesIO()
      with tarfile.open(fileobj=buffer, mode="w") as class_tar:
        for k in range(images_per_class):
          name = f"{synset}_{k}.JPEG"
          _add_file(class_tar, name, image(name))
          labels[name] = synset
      _add_file(train_tar, f"{synset}.tar", buffer.getvalue())
  with (manual / VALIDATION_TAR).open("wb") as file, tarfile.open(fileobj=file, mode="w") as val_tar:
    for k, synset in enumerate(validation_labels(num_validation), start=1):
      name = f"ILSVRC2012_val_{k:08d}.JPEG"
      _add_file(val_tar, name, image(name))
      labels[name] = synset
  return labels

"""Prepares a TFDS dataset for training: `digits` (offline) or `imagenet2012` (from the tars).

  python -m shufflemamba_jax.prepare --dataset=imagenet2012 \
      --manual_dir=/data/imagenet_tars --data_dir=/data/tfds
  python -m shufflemamba_jax.prepare --dataset=digits --data_dir=/data/tfds

imagenet2012 runs TFDS's own builder on ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
(from https://image-net.org, after registering) placed in --manual_dir; the tars are checked
here first so that a missing one is named with where to put it.
"""

import os

from absl import app
from absl import flags

IMAGENET_TARS = {
    "train": "ILSVRC2012_img_train.tar",
    "validation": "ILSVRC2012_img_val.tar",
}

_DATASET = flags.DEFINE_enum("dataset", "digits", ["digits", "imagenet2012"], "TFDS dataset to build.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir to write to (None: TFDS default).")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "imagenet2012 only: folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar.")


def check_imagenet_manual_dir(manual_dir: str | None) -> None:
  """Raises FileNotFoundError naming every ImageNet tar missing from `manual_dir`."""
  if not manual_dir:
    raise FileNotFoundError(
        "--manual_dir is required for imagenet2012: a folder holding "
        + " and ".join(IMAGENET_TARS.values()) + " (download them from https://image-net.org).")
  missing = [
      f"{name} ({split} split) -> put it at {os.path.join(manual_dir, name)}"
      for split, name in IMAGENET_TARS.items()
      if not os.path.isfile(os.path.join(manual_dir, name))
  ]
  if missing:
    raise FileNotFoundError(
        "Missing ImageNet archive(s) in --manual_dir: " + "; ".join(missing)
        + ". Download them from https://image-net.org (registration required).")


def prepare(dataset: str, data_dir: str | None = None, manual_dir: str | None = None,
            compute_stats: bool = True):
  """Builds `dataset` into `data_dir` with TFDS's download_and_prepare and returns the builder."""
  if dataset == "imagenet2012":
    check_imagenet_manual_dir(manual_dir)  # Before TFDS, whose own error is less specific.
  elif dataset != "digits":
    raise ValueError(f"--dataset={dataset!r}: expected digits or imagenet2012.")
  # TF reads and writes files only; keep it off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass
  if dataset == "digits":
    from shufflemamba_jax import digits_dataset  # pylint: disable=g-import-not-at-top,unused-import
  builder = tfds.builder(dataset, data_dir=data_dir)
  stats = (tfds.download.ComputeStatsMode.AUTO if compute_stats
           else tfds.download.ComputeStatsMode.SKIP)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, compute_stats=stats))
  return builder


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    builder = prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value)
  except FileNotFoundError as error:
    raise SystemExit(f"error: {error}") from None
  for name, split in builder.info.splits.items():
    print(f"{_DATASET.value}:{name}: {split.num_examples} examples in {builder.data_dir}")


if __name__ == "__main__":
  app.run(main)

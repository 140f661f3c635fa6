"""Command line: prepares a TFDS dataset for training: `digits` and `digits_seg` (offline),
`imagenet2012`, `ade20k` or `coco`.

  python -m shufflemamba_jax.prepare --dataset=imagenet2012 \
      --manual_dir=/data/imagenet_tars --data_dir=/data/tfds
  python -m shufflemamba_jax.prepare --dataset=ade20k --manual_dir=/data/ade --data_dir=/data/tfds
  python -m shufflemamba_jax.prepare --dataset=coco --manual_dir=/data/coco_zips --data_dir=/data/tfds
  python -m shufflemamba_jax.prepare --dataset=digits --data_dir=/data/tfds

imagenet2012 runs TFDS's own builder on ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
(from https://image-net.org, after registering) placed in --manual_dir; ade20k runs ours
(shufflemamba_jax/data/ade20k.py) on ADEChallengeData2016.zip placed there, and coco ours
(shufflemamba_jax/data/coco.py) on COCO 2017's train2017.zip, val2017.zip and
annotations_trainval2017.zip. Every image is then decoded once, in parallel, and the ones that
fail are named in the log and listed in `<data_dir>/<dataset>/<version>/undecodable/`, where
the input streams look them up instead of catching decode errors per image
(shufflemamba_jax/data/decodable.py).
"""

from absl import app, flags

_DATASET = flags.DEFINE_enum(
  "dataset",
  "digits",
  ["digits", "imagenet2012", "digits_seg", "ade20k", "digits_det", "coco"],
  "TFDS dataset to build.",
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir to write to (None: TFDS default).")
_MANUAL_DIR = flags.DEFINE_string(
  "manual_dir",
  None,
  "imagenet2012: folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; ade20k: folder with "
  "ADEChallengeData2016.zip; coco: folder with train2017.zip, val2017.zip and annotations_trainval2017.zip.",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  try:
    builder = pipeline.prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value)
  except FileNotFoundError as error:
    raise SystemExit(f"error: {error}") from None
  for name, split in builder.info.splits.items():
    print(f"{_DATASET.value}:{name}: {split.num_examples} examples in {builder.data_dir}")


if __name__ == "__main__":
  app.run(main)

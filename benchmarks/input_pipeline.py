"""Input-pipeline benchmark: how many images per second one and two host cores feed training.

  python benchmarks/input_pipeline.py --images=1000 --batch_size=64 --batches=20 [--json]

1. Writes `--images` ImageNet-like JPEGs (500x375, textured to about 100 KB each, as real
   photos are) in the real ILSVRC2012 tar layout, and prepares them with TFDS's own
   `imagenet2012` builder (once per `--workdir`).
2. Times the training stream at 224 px with the full augmentation of
   `configs/imagenet.py:shufflemamba_base`, pinned to 1 and then 2 cores (`taskset`), for
   - the project's stream (`pipeline.create_train_dataset`: exact resume, corrupt-image
     handling, uint8 batches), and
   - a bare in-graph reference of the same ops: `builder.as_dataset(...).map(decode_and_random_crop
     + the same augmentation, AUTOTUNE).batch()`.
3. Reports images/s, the ratios project / reference, the 1 -> 2 core scaling of the project's
   stream, and the host-to-device bytes of one step for uint8 batches against normalized float32
   ones. With `--json` the last line of output is one JSON object with the keys project_1core,
   project_2core, reference_1core, reference_2core, ratio_1core, ratio_2core, scaling,
   h2d_bytes_per_step and h2d_bytes_per_step_float32.

Each measurement runs in its own process, so that the core pinning holds for every thread
TensorFlow starts; the first `--warmup` batches (pipeline start-up, autotuning) are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from etils import epath

CONFIG = "configs/imagenet.py"
VARIANT = "shufflemamba_base"
IMAGE_SIZE = 224
CLASSES = 10


def _config(data_dir: str, num_images: int):
  from shufflemamba_jax.training import config_files  # pylint: disable=g-import-not-at-top

  root = epath.Path(__file__).parent.parent
  config = config_files.get_config(str(root / CONFIG), VARIANT)
  config.data_dir = data_dir
  config.image_size = IMAGE_SIZE
  config.shuffle_buffer = num_images  # The whole set in one window, as on ImageNet's 16k.
  return config


def prepare(workdir: epath.Path, num_images: int) -> str:
  """The TFDS data_dir holding `num_images` synthetic ImageNet-like training images."""
  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  # The tests' archive writer: fixture code, kept out of the package.
  sys.path.insert(0, str(epath.Path(__file__).parent.parent / "tests"))
  import synthetic_imagenet  # pylint: disable=g-import-not-at-top

  data_dir = workdir / f"tfds_{num_images}"
  marker = data_dir / "prepared"
  if not marker.exists():
    manual = workdir / f"manual_{num_images}"
    synthetic_imagenet.write_imagenet_tars(
      str(manual),
      classes=CLASSES,
      images_per_class=-(-num_images // CLASSES),
      num_validation=CLASSES,
      fixed_size=(375, 500),
      textured=True,
    )
    pipeline.prepare("imagenet2012", data_dir=str(data_dir), manual_dir=str(manual), compute_stats=False)
    marker.write_text("ok")
  return str(data_dir)


def _project_stream(data_dir: str, num_images: int, batch_size: int):
  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  config = _config(data_dir, num_images)
  return pipeline.create_train_dataset(config, global_batch_size=batch_size).as_numpy_iterator()


def _reference_stream(data_dir: str, num_images: int, batch_size: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from shufflemamba_jax.data import augment, pipeline  # pylint: disable=g-import-not-at-top

  aug = pipeline.settings(_config(data_dir, num_images))["augmentation"]
  builder = pipeline.get_builder("imagenet2012", data_dir)

  def decode_and_augment(index, example):
    seed = tf.stack([tf.constant(0, tf.int64), index])
    crop_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.image.extract_jpeg_shape(example["image"])
    window = augment.random_crop_window(
      shape, crop_seed, (aug.crop_area_min, 1.0), (aug.crop_ratio_min, aug.crop_ratio_max)
    )
    image = tf.image.decode_and_crop_jpeg(example["image"], window, channels=3)
    return {"image": augment.augment_train_image(image, augment_seed, aug, IMAGE_SIZE), "label": example["label"]}

  dataset = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()}).repeat()
  dataset = dataset.enumerate().map(decode_and_augment, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def measure(kind: str, data_dir: str, num_images: int, batch_size: int, batches: int, warmup: int) -> dict:
  """Images/s of one stream in this process, and the bytes of one of its batches."""
  make = _project_stream if kind == "project" else _reference_stream
  stream = make(data_dir, num_images, batch_size)
  for _ in range(warmup):
    next(stream)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(stream)
  elapsed = time.perf_counter() - start
  image, label = batch["image"], batch["label"]
  return {
    "images_per_s": batches * batch_size / elapsed,
    "h2d_bytes_per_step": image.nbytes + label.nbytes,
    "h2d_bytes_per_step_float32": image.size * 4 + label.nbytes,
    "image_dtype": str(image.dtype),
  }


def _measure_pinned(kind: str, cores: int, args) -> dict:
  command = ["taskset", "-c", ",".join(map(str, range(cores))), sys.executable, __file__, f"--measure={kind}"]
  command += [
    f"--workdir={args.workdir}",
    f"--images={args.images}",
    f"--batch_size={args.batch_size}",
    f"--batches={args.batches}",
    f"--warmup={args.warmup}",
  ]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(epath.Path(__file__).parent.parent))
  result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=1000, help="synthetic training images")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
  parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
  parser.add_argument("--workdir", default=None, help="where the data is written (default: a temporary folder)")
  parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
  parser.add_argument("--measure", choices=("project", "reference"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for name in ("images", "batch_size", "batches"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be positive")
  if args.batch_size > args.images:
    parser.error(f"--batch_size={args.batch_size} exceeds --images={args.images}")
  if args.workdir is None:
    args.workdir = tempfile.mkdtemp(prefix="input_benchmark_")
  workdir = epath.Path(args.workdir)
  if args.measure:
    data_dir = prepare(workdir, args.images)
    print(json.dumps(measure(args.measure, data_dir, args.images, args.batch_size, args.batches, args.warmup)))
    return 0

  start = time.perf_counter()
  prepare(workdir, args.images)
  print(f"prepared {args.images} images of 500x375 in {workdir} ({time.perf_counter() - start:.0f} s)", flush=True)
  results, record = {}, {}
  for cores in (1, 2):
    for kind in ("project", "reference"):
      results[kind, cores] = _measure_pinned(kind, cores, args)
      record[f"{kind}_{cores}core"] = round(results[kind, cores]["images_per_s"], 1)
      print(f"{kind:>9}, {cores} core(s): {record[f'{kind}_{cores}core']:7.1f} images/s", flush=True)
    record[f"ratio_{cores}core"] = round(record[f"project_{cores}core"] / record[f"reference_{cores}core"], 3)
  record["scaling"] = round(record["project_2core"] / record["project_1core"], 3)
  project = results["project", 1]
  record.update(
    h2d_bytes_per_step=project["h2d_bytes_per_step"],
    h2d_bytes_per_step_float32=project["h2d_bytes_per_step_float32"],
    image_dtype=project["image_dtype"],
    images=args.images,
    batch_size=args.batch_size,
    batches=args.batches,
  )
  print(
    f"project / reference: {record['ratio_1core']:.2f}x (1 core), {record['ratio_2core']:.2f}x (2 cores); "
    f"project 1 -> 2 cores: {record['scaling']:.2f}x"
  )
  print(
    f"host-to-device bytes per step: {record['h2d_bytes_per_step']:,} ({record['image_dtype']} images), "
    f"{record['h2d_bytes_per_step_float32']:,} as normalized float32"
  )
  if args.json:
    print(json.dumps(record))
  return 0


if __name__ == "__main__":
  sys.exit(main())

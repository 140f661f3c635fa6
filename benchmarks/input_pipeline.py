"""Input-pipeline benchmark: how many images per second one and two host cores feed training.

  python benchmarks/input_pipeline.py --images=1000 --batch_size=64 --batches=20 [--cores=1,2] [--json]

1. Writes `--images` ImageNet-like JPEGs (500x375, textured to about 100 KB each, as real
   photos are) in the real ILSVRC2012 tar layout, and prepares them with TFDS's own
   `imagenet2012` builder (once per `--workdir`).
2. Times the training stream at 224 px with the full augmentation of
   `configs/imagenet.py:shufflemamba_base`, pinned to each of `--cores` (`taskset`), for
   - the project's stream (`pipeline.create_train_dataset`: exact resume, corrupt-image
     handling, uint8 batches), and
   - a bare in-graph reference of the same ops: `builder.as_dataset(...).map(decode_and_random_crop
     + the same augmentation, AUTOTUNE).batch()`.
3. Reports images/s, the ratios project / reference, how each stream scales from the first core
   count to the others, the Python time per image, and the host-to-device bytes of one step for
   uint8 batches against normalized float32 ones. With `--json` the last line of output is one
   JSON object with the keys project_<N>core, reference_<N>core and ratio_<N>core for each N of
   `--cores`; scaling (the project's, 1 -> 2 cores), reference_scaling and scaling_vs_reference
   (their quotient), and scaling_<A>to<N> / reference_scaling_<A>to<N> from the first count A;
   python_us_per_image and reference_python_us_per_image; h2d_bytes_per_step and
   h2d_bytes_per_step_float32.

Python time per image: the wall time spent inside the Python callables that tf.data calls back
(`tf.py_function`, `tf.numpy_function`, `Dataset.from_generator`), wrapped with a timer while the
stream is built, over the timed images; the largest over the core counts. Python holds the GIL
there, so 1e6 / python_us_per_image images/s is the host's ceiling whatever its core count. It is
an upper bound: eager TF ops called inside a callback release the GIL while they run.

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
import threading
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


class PythonCallbacks:
  """Times every Python callable that the tf.data streams built inside `with` will call back."""

  def __init__(self):
    self.seconds = 0.0
    self._lock = threading.Lock()

  def _add(self, seconds: float) -> None:
    with self._lock:  # Callbacks run on tf.data's worker threads.
      self.seconds += seconds

  def wrap(self, function):
    def timed(*args, **kwargs):
      start = time.perf_counter()
      try:
        return function(*args, **kwargs)
      finally:
        self._add(time.perf_counter() - start)

    return timed

  def wrap_generator(self, generator):
    def timed(*args):
      iterator = iter(self.wrap(generator)(*args))
      while True:
        start = time.perf_counter()
        try:
          item = next(iterator)
        except StopIteration:
          return
        finally:
          self._add(time.perf_counter() - start)
        yield item

    return timed

  def __enter__(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    dataset = tf.data.Dataset
    self._saved = (tf.py_function, tf.numpy_function, dataset.from_generator)
    py_function, numpy_function, from_generator = self._saved
    tf.py_function = lambda func, *args, **kwargs: py_function(self.wrap(func), *args, **kwargs)
    tf.numpy_function = lambda func, *args, **kwargs: numpy_function(self.wrap(func), *args, **kwargs)
    dataset.from_generator = staticmethod(
      lambda generator, *args, **kwargs: from_generator(self.wrap_generator(generator), *args, **kwargs)
    )
    return self

  def __exit__(self, *exc):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.py_function, tf.numpy_function, from_generator = self._saved
    tf.data.Dataset.from_generator = staticmethod(from_generator)


def measure(kind: str, data_dir: str, num_images: int, batch_size: int, batches: int, warmup: int) -> dict:
  """Images/s of one stream in this process, its Python time per image, and the bytes of a batch."""
  make = _project_stream if kind == "project" else _reference_stream
  with PythonCallbacks() as callbacks:
    stream = make(data_dir, num_images, batch_size)
  for _ in range(warmup):
    next(stream)
  start, python_start = time.perf_counter(), callbacks.seconds
  for _ in range(batches):
    batch = next(stream)
  elapsed = time.perf_counter() - start
  image, label = batch["image"], batch["label"]
  return {
    "images_per_s": batches * batch_size / elapsed,
    "python_us_per_image": (callbacks.seconds - python_start) / (batches * batch_size) * 1e6,
    "h2d_bytes_per_step": image.nbytes + label.nbytes,
    "h2d_bytes_per_step_float32": image.size * 4 + label.nbytes,
    "image_dtype": str(image.dtype),
  }


def _measure_pinned(kind: str, cores: int, args) -> dict:
  allowed = sorted(os.sched_getaffinity(0))[:cores]
  command = ["taskset", "-c", ",".join(map(str, allowed)), sys.executable, __file__, f"--measure={kind}"]
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
  parser.add_argument("--cores", default="1,2", help="comma-separated core counts to pin each measurement to")
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
  try:
    cores = [int(count) for count in args.cores.split(",")]
  except ValueError:
    cores = []
  available = len(os.sched_getaffinity(0))
  if not cores or len(set(cores)) != len(cores) or not all(1 <= count <= available for count in cores):
    parser.error(f"--cores={args.cores!r} must be distinct core counts between 1 and the {available} available")

  start = time.perf_counter()
  prepare(workdir, args.images)
  print(f"prepared {args.images} images of 500x375 in {workdir} ({time.perf_counter() - start:.0f} s)", flush=True)
  results, record = {}, {}
  for count in cores:
    for kind in ("project", "reference"):
      results[kind, count] = _measure_pinned(kind, count, args)
      record[f"{kind}_{count}core"] = round(results[kind, count]["images_per_s"], 1)
      print(
        f"{kind:>9}, {count} core(s): {record[f'{kind}_{count}core']:7.1f} images/s, "
        f"{results[kind, count]['python_us_per_image']:.1f} us of Python per image",
        flush=True,
      )
    record[f"ratio_{count}core"] = round(record[f"project_{count}core"] / record[f"reference_{count}core"], 3)
  first = cores[0]
  for count in cores[1:]:
    for kind, prefix in (("project", ""), ("reference", "reference_")):
      scaling = record[f"{kind}_{count}core"] / record[f"{kind}_{first}core"]
      record[f"{prefix}scaling_{first}to{count}"] = round(scaling, 3)
  if {1, 2} <= set(cores):
    record["scaling"] = round(record["project_2core"] / record["project_1core"], 3)
    record["reference_scaling"] = round(record["reference_2core"] / record["reference_1core"], 3)
    record["scaling_vs_reference"] = round(record["scaling"] / record["reference_scaling"], 3)
  for kind, prefix in (("project", ""), ("reference", "reference_")):
    record[f"{prefix}python_us_per_image"] = round(max(results[kind, n]["python_us_per_image"] for n in cores), 2)
  project = results["project", first]
  record.update(
    h2d_bytes_per_step=project["h2d_bytes_per_step"],
    h2d_bytes_per_step_float32=project["h2d_bytes_per_step_float32"],
    image_dtype=project["image_dtype"],
    images=args.images,
    batch_size=args.batch_size,
    batches=args.batches,
  )
  ratios = ", ".join(f"{record[f'ratio_{count}core']:.2f}x ({count} core(s))" for count in cores)
  print(f"project / reference: {ratios}")
  if "scaling" in record:
    print(
      f"1 -> 2 cores: project {record['scaling']:.2f}x, reference {record['reference_scaling']:.2f}x "
      f"({record['scaling_vs_reference']:.2f} of the reference's scaling)"
    )
  python_us = record["python_us_per_image"]
  ceiling = f"{1e6 / python_us:,.0f} images/s" if python_us else "none"
  print(f"Python per image: {python_us:.2f} us (GIL ceiling per host: {ceiling})")
  print(
    f"host-to-device bytes per step: {record['h2d_bytes_per_step']:,} ({record['image_dtype']} images), "
    f"{record['h2d_bytes_per_step_float32']:,} as normalized float32"
  )
  if args.json:
    print(json.dumps(record))
  return 0


if __name__ == "__main__":
  sys.exit(main())

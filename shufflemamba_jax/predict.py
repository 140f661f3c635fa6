"""Command line: classifies image files with a trained or converted model.

  python -m shufflemamba_jax.predict --checkpoint=WORKDIR [--step=N|best] [--no-ema] cat.jpg dog.png FOLDER/

`--checkpoint` is a training workdir (or its checkpoints/ folder, or one step folder) or a
directory written by `shufflemamba_jax.convert`. Images (files, or every image in a folder) are
preprocessed by the evaluation transform itself (`pipeline.eval_image`: bicubic resize for the
run's crop ratio, center crop) and normalized on the device, as in evaluation, so a served model
sees exactly the pixels it was scored on. They go through the model in batches of one shape:
one compilation per image size.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np
from etils import epath
from flax import nnx

from shufflemamba_jax.data import IMAGENET_MEAN, IMAGENET_STD, device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_PROGRESS_ABOVE = 8  # Images; fewer finish before a progress bar would say anything.


def _step(text: str) -> int | str:
  if text == "best":
    return text
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'--step={text!r}: a step number or "best"') from None


def image_paths(inputs: list[str]) -> list[str]:
  """The files named in `inputs`, a folder standing for its image files (sorted by name)."""
  paths = []
  for name in inputs:
    path = epath.Path(name)
    if path.is_dir():
      found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
      if not found:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {name}")
      paths.extend(found)
    elif path.is_file():
      paths.append(name)
    else:
      raise FileNotFoundError(f"no such image file or folder: {name}")
  return paths


def image_batches(paths: list[str], image_size: int, crop_ratio: float = 0.875, batch_size: int = 32):
  """Yields (uint8 (batch, image_size, image_size, 3), bool (batch,) ok) batches of the files.

  Each image goes through evaluation's own transform; one that fails to decode has ok False (and
  a warning naming it). Every batch has min(batch_size, len(paths)) rows: the last is padded.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for reading images)

  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  def encoded():
    for path in paths:
      yield epath.Path(path).read_bytes(), path

  signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.string))
  dataset = tf.data.Dataset.from_generator(encoded, output_signature=signature)
  dataset = dataset.map(lambda data, name: pipeline.eval_image(data, name, image_size, crop_ratio))
  batch_size = min(batch_size, len(paths))
  for images, ok in dataset.batch(batch_size).prefetch(1).as_numpy_iterator():
    padding = batch_size - len(images)
    yield np.pad(images, [(0, padding), (0, 0), (0, 0), (0, 0)]), np.pad(ok, [(0, padding)])


class Predictor:
  """Class probabilities of uint8 image batches, jitted once per input shape.

  The weights are an argument of the jitted function, not constants baked into it, so calls
  with new images (of a shape seen before) reuse the compiled program.
  """

  def __init__(self, model, transform: device.DeviceTransform = device.IMAGENET, top_k: int = 5):
    self.graphdef, self.state = nnx.split(model)
    self.top_k = min(top_k, model.config.num_classes)

    def probabilities(state, images):
      logits = nnx.merge(self.graphdef, state)(transform(images))
      return jax.lax.top_k(jax.nn.softmax(logits.astype(np.float32), axis=-1), self.top_k)

    self.function = jax.jit(probabilities)

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (batch, H, W, 3) -> top-k (probabilities float32, class indices int32), each (batch, k)."""
    top_probs, top_indices = self.function(self.state, images)
    return np.asarray(top_probs), np.asarray(top_indices)


def class_names(dataset: str | None, num_classes: int) -> list[str]:
  """Human-readable class names of a tfds dataset when TFDS knows them, else the indices."""
  if dataset:
    try:
      import tensorflow_datasets as tfds

      if dataset == "digits":
        from shufflemamba_jax.data import digits  # noqa: F401  (registers the builder)
      names = tfds.builder(dataset).info.features["label"].names
      if len(names) == num_classes:
        return list(names)
    except Exception:  # Names are a convenience: fall back to indices.
      pass
  return [str(index) for index in range(num_classes)]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Classify image files with a trained model.")
  parser.add_argument("--checkpoint", required=True, help="training workdir, checkpoint folder or converted weights")
  parser.add_argument("--step", type=_step, default=None, help='checkpoint step, or "best" (default: latest)')
  parser.add_argument("--no-ema", action="store_true", help="use the raw parameters, not the EMA")
  parser.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
  parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
  parser.add_argument("--top-k", type=int, default=5)
  parser.add_argument("--json", action="store_true", help="print one JSON object per image")
  parser.add_argument("images", nargs="+", help="image files, or folders of them")
  args = parser.parse_args(argv)
  if args.batch_size < 1 or args.top_k < 1:
    parser.error("--batch-size and --top-k must be positive")
  from shufflemamba_jax import weights  # pylint: disable=g-import-not-at-top

  try:
    paths = image_paths(args.images)
    saved = weights.read_weights(args.checkpoint, args.step, ema=not args.no_ema)
    model, run_config = saved.model(), saved.run_config
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  size = args.image_size or model.config.img_size
  aug = run_config.get("aug", {})
  transform = device.DeviceTransform(tuple(aug.get("mean", IMAGENET_MEAN)), tuple(aug.get("std", IMAGENET_STD)))
  predictor = Predictor(model, transform, args.top_k)
  names = class_names(run_config.get("dataset", "imagenet2012"), model.config.num_classes)
  progress = None
  if len(paths) > _PROGRESS_ABOVE:
    import tqdm  # pylint: disable=g-import-not-at-top

    progress = tqdm.tqdm(total=len(paths), unit="image", file=sys.stderr)
  unreadable = []
  batches = image_batches(paths, size, aug.get("eval_crop_ratio", 0.875), args.batch_size)
  remaining = iter(paths)
  for images, ok in batches:
    probs, indices = predictor(images)
    for row_probs, row_indices, row_ok, path in zip(probs, indices, ok, remaining):
      if not row_ok:
        unreadable.append(path)
        continue
      top = [{"class": names[i], "index": int(i), "probability": float(p)} for p, i in zip(row_probs, row_indices)]
      if args.json:
        print(json.dumps({"image": path, "top": top}))
      else:
        print(path)
        for entry in top:
          print(f"  {entry['probability']:7.2%}  {entry['class']} ({entry['index']})")
    if progress is not None:
      progress.update(int(min(len(images), progress.total - progress.n)))
  if progress is not None:
    progress.close()
  for path in unreadable:
    print(f"error: cannot read image {path}", file=sys.stderr)
  return 1 if unreadable else 0


if __name__ == "__main__":
  sys.exit(main())

"""Command line: classifies image files with a trained or converted model, or segments them.

  python -m shufflemamba_jax.predict --checkpoint=WORKDIR [--step=N|best] [--no-ema] cat.jpg dog.png FOLDER/
  python -m shufflemamba_jax.predict --checkpoint=SEG_WORKDIR --output-dir=OUT scene.jpg FOLDER/

`--checkpoint` is a training workdir (or its checkpoints/ folder, or one step folder) or a
directory written by `shufflemamba_jax.convert`. Images (files, or every image in a folder) are
preprocessed by the evaluation transform itself (`pipeline.eval_image`: bicubic resize for the
run's crop ratio, center crop) and normalized on the device, as in evaluation, so a served model
sees exactly the pixels it was scored on. They go through the model in batches of one shape:
one compilation per image size.

A segmentation checkpoint (a UperNet) writes OUT/<image name>.png instead: the predicted label
map at the image's own size, colour-coded (`training.segmentation.colorize`, one VOC palette
colour per class). Images go through evaluation's transform (`segment_augment.eval_pair`: resize
to the run's seg_aug.eval_scale, pad to its eval_canvas), then the run's sliding windows (or the
whole image), and the logits of the resized image are resized back (bilinear) before the argmax.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np
from etils import epath
from flax import nnx

from shufflemamba_jax.data import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, device

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


class Segmenter:
  """Label maps of a UperNet for single uint8 images, as evaluation computes them: one compilation
  for the padded evaluation canvas, and one small one per original image size."""

  def __init__(self, model, transform: device.DeviceTransform, crop_size=None, stride=None):
    from shufflemamba_jax.training import segmentation  # pylint: disable=g-import-not-at-top

    self.graphdef, self.state = nnx.split(model)

    def logits(state, image):
      model = nnx.merge(self.graphdef, state)
      return segmentation.predict_logits(model, transform(image[None]), crop_size=crop_size, stride=stride)[0]

    def labels(logits, size):
      from shufflemamba_jax.models import upernet  # pylint: disable=g-import-not-at-top

      return jax.numpy.argmax(upernet.resize_bilinear(logits[None], size)[0], axis=-1)

    self.logits = jax.jit(logits)
    self.labels = jax.jit(labels, static_argnums=1)

  def __call__(self, canvas: np.ndarray, resized: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """canvas: uint8 (H, W, 3) padded evaluation input whose top-left `resized` (height, width) is
    the image; returns int32 (size) class indices at the original `size` (height, width)."""
    logits = self.logits(self.state, canvas)[: resized[0], : resized[1]]
    return np.asarray(self.labels(logits, tuple(size)))


def _segment_images(saved, paths: list[str], output_dir: str) -> int:
  """Writes OUTPUT_DIR/<name>.png, the colour-coded label map of each image; returns the exit code."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for reading images)

  from shufflemamba_jax.data import segment_augment  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.training import segmentation  # pylint: disable=g-import-not-at-top

  run_config = saved.run_config
  seg_aug = {k: tuple(v) if isinstance(v, list) else v for k, v in run_config.get("seg_aug", {}).items()}
  settings = segment_augment.SegmentationAugmentation(**seg_aug)
  seg = run_config.get("seg", {})
  windows = [tuple(seg[name]) if seg.get(name) else None for name in ("eval_crop", "eval_stride")]
  aug = run_config.get("aug", {})
  transform = device.DeviceTransform(tuple(aug.get("mean", IMAGENET_MEAN)), tuple(aug.get("std", IMAGENET_STD)))
  model = saved.model()
  segmenter = Segmenter(model, transform, *windows)
  num_classes = model.config.num_classes
  output = epath.Path(output_dir)
  output.mkdir(parents=True, exist_ok=True)
  unreadable = []
  for path in paths:
    try:
      image = tf.io.decode_image(epath.Path(path).read_bytes(), channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
      unreadable.append(path)
      continue
    size = tuple(int(side) for side in image.shape[:2])
    # A blank label map marks where the resized image lies on the padded canvas.
    canvas, mask = segment_augment.eval_pair(image, tf.zeros(size, tf.uint8), settings)
    mask = mask.numpy() != IGNORE_INDEX
    resized = (int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum()))
    labels = segmenter(canvas.numpy(), resized, size)
    target = output / (epath.Path(path).stem + ".png")
    target.write_bytes(tf.io.encode_png(segmentation.colorize(labels, num_classes)).numpy())
    print(f"{path} -> {target}")
  for path in unreadable:
    print(f"error: cannot read image {path}", file=sys.stderr)
  return 1 if unreadable else 0


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
  parser.add_argument("--output-dir", default=None, help="segmentation checkpoints: folder of the label-map PNGs")
  parser.add_argument("images", nargs="+", help="image files, or folders of them")
  args = parser.parse_args(argv)
  if args.batch_size < 1 or args.top_k < 1:
    parser.error("--batch-size and --top-k must be positive")
  from shufflemamba_jax import weights  # pylint: disable=g-import-not-at-top

  try:
    paths = image_paths(args.images)
    saved = weights.read_weights(args.checkpoint, args.step, ema=not args.no_ema)
    if saved.is_segmenter:
      if not args.output_dir:
        raise ValueError(f"{args.checkpoint} is a segmenter: --output-dir names where its label maps go")
      return _segment_images(saved, paths, args.output_dir)
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

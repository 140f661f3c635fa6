"""Command line: classifies image files with a trained or converted model.

  python -m shufflemamba_jax.predict --checkpoint=WORKDIR [--step=N|best] [--no-ema] cat.jpg dog.png

`--checkpoint` is a training workdir (or its checkpoints/ folder, or one step folder) or a
directory written by `shufflemamba_jax.convert`. Images are preprocessed as in evaluation
(bicubic resize for a 0.875 crop ratio, center crop, ImageNet normalization).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from shufflemamba_jax.data import IMAGENET_MEAN, IMAGENET_STD


def _step(text: str) -> int | str:
  if text == "best":
    return text
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'--step={text!r}: a step number or "best"') from None


def preprocess(path: str, image_size: int, crop_ratio: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """Reads an image file into a normalized float32 (image_size, image_size, 3) array."""
  from PIL import Image, UnidentifiedImageError

  try:
    with epath.Path(path).open("rb") as file, Image.open(file) as image:
      image = image.convert("RGB")
  except (OSError, UnidentifiedImageError) as error:
    raise ValueError(f"cannot read image {path}: {error}") from None
  resize = int(math.floor(image_size / crop_ratio))
  width, height = image.size
  scale = resize / min(width, height)
  image = image.resize((max(resize, round(width * scale)), max(resize, round(height * scale))), Image.BICUBIC)
  width, height = image.size
  left, top = (width - image_size) // 2, (height - image_size) // 2
  image = image.crop((left, top, left + image_size, top + image_size))
  array = np.asarray(image, np.float32) / 255.0
  return (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


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


def predict(model, images: np.ndarray, top_k: int = 5):
  """Top-k (probabilities, class indices) for a (batch, H, W, 3) float32 array."""
  probs = jax.jit(lambda x: jax.nn.softmax(model(x), axis=-1))(jnp.asarray(images))
  top_probs, top_indices = jax.lax.top_k(probs, min(top_k, probs.shape[-1]))
  return np.asarray(top_probs), np.asarray(top_indices)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Classify image files with a trained model.")
  parser.add_argument("--checkpoint", required=True, help="training workdir, checkpoint folder or converted weights")
  parser.add_argument("--step", type=_step, default=None, help='checkpoint step, or "best" (default: latest)')
  parser.add_argument("--no-ema", action="store_true", help="use the raw parameters, not the EMA")
  parser.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
  parser.add_argument("--top-k", type=int, default=5)
  parser.add_argument("--json", action="store_true", help="print one JSON object per image")
  parser.add_argument("images", nargs="+")
  args = parser.parse_args(argv)
  from shufflemamba_jax import weights  # pylint: disable=g-import-not-at-top

  try:
    saved = weights.read_weights(args.checkpoint, args.step, ema=not args.no_ema)
    model, run_config = saved.model(), saved.run_config
    size = args.image_size or model.config.img_size
    aug = run_config.get("aug", {})
    batch = np.stack(
      [
        preprocess(
          path, size, aug.get("eval_crop_ratio", 0.875), aug.get("mean", IMAGENET_MEAN), aug.get("std", IMAGENET_STD)
        )
        for path in args.images
      ]
    )
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  names = class_names(run_config.get("dataset", "imagenet2012"), model.config.num_classes)
  probs, indices = predict(model, batch, args.top_k)
  for path, row_probs, row_indices in zip(args.images, probs, indices):
    top = [{"class": names[i], "index": int(i), "probability": float(p)} for p, i in zip(row_probs, row_indices)]
    if args.json:
      print(json.dumps({"image": path, "top": top}))
    else:
      print(path)
      for entry in top:
        print(f"  {entry['probability']:7.2%}  {entry['class']} ({entry['index']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())

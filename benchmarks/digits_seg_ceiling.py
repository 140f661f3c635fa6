"""The best validation mIoU that logits at the patch grid can reach on digits_seg label maps.

The reference segmenter predicts at the patch grid (1/16 of the image for 16-pixel patches, 1/4
of a 32x32 digits_seg canvas for its 4x4 patches) and resizes the logits bilinearly. This scores
the best such prediction computable from the labels alone, each patch's exact class proportions
resized bilinearly, against the labels, for several ways of labelling a digit:

  strokes        gray level >= STROKE_LEVEL (digits_seg version 2)
  faint strokes  gray level >= 1
  grown strokes  strokes grown by one source pixel (version 3, the current builder)
  squares        the digit's whole 16x16 square

  python benchmarks/digits_seg_ceiling.py [--patch_size=4]

Validation canvases drawn as the builder draws them (its seed, pool and placement).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from shufflemamba_jax.data import digits, digits_seg

LABELINGS = {
  "strokes": lambda gray: gray >= digits_seg.STROKE_LEVEL,
  "faint strokes": lambda gray: gray >= 1,
  "grown strokes": lambda gray: digits_seg.grow(gray >= digits_seg.STROKE_LEVEL),
  "squares": lambda gray: np.ones(gray.shape, bool),
}


def label_maps(region) -> np.ndarray:
  """The validation split's (N, CANVAS, CANVAS) label maps with digit regions from `region`."""
  gray, classes = digits_seg.load_gray_digits()
  _, pool = digits.digits_split_indices()
  rng = np.random.default_rng(digits_seg.SEEDS["validation"])
  size, maps = 8 * digits_seg.SCALE, []
  for _ in range(digits_seg.NUM_CANVASES["validation"]):
    label = np.full((digits_seg.CANVAS,) * 2, digits_seg.BACKGROUND, np.uint8)
    count = int(rng.integers(1, digits_seg.MAX_DIGITS + 1))
    for top, left in digits_seg.place(rng, count, size):
      index = int(rng.choice(pool))
      mask = np.kron(region(gray[index]), np.ones((digits_seg.SCALE,) * 2, bool))
      label[top : top + size, left : left + size][mask] = classes[index]
    maps.append(label)
  return np.stack(maps)


def mean_iou(predictions: np.ndarray, labels: np.ndarray) -> float:
  ious = []
  for c in range(digits_seg.NUM_CLASSES):
    union = np.sum((predictions == c) | (labels == c))
    if union:
      ious.append(np.sum((predictions == c) & (labels == c)) / union)
  return float(np.mean(ious))


def ceiling(labels: np.ndarray, patch: int) -> float:
  """mIoU of each patch's class proportions resized bilinearly (half-pixel centres) to the canvas."""
  n, side = labels.shape[0], labels.shape[1]
  grid = side // patch
  proportions = np.eye(digits_seg.NUM_CLASSES)[labels].reshape(n, grid, patch, grid, patch, -1).mean((2, 4))
  resized = jax.image.resize(jnp.asarray(proportions), (n, side, side, digits_seg.NUM_CLASSES), "bilinear")
  return mean_iou(np.asarray(resized).argmax(-1), labels)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--patch_size", type=int, default=4)
  args = parser.parse_args()
  for name, region in LABELINGS.items():
    labels = label_maps(region)
    share = float(np.mean(labels == digits_seg.BACKGROUND))
    print(f"{name:14s} background {share:.1%}  ceiling mIoU {ceiling(labels, args.patch_size):.1%}")


if __name__ == "__main__":
  main()

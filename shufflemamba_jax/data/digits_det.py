"""The `digits_det` tfds dataset: scikit-learn's handwritten digits as overlapping instances, offline.

The embedded default for detection and instance segmentation, as `digits_seg` is for semantic
segmentation: each CANVAS x CANVAS grey image holds MIN_DIGITS to MAX_DIGITS digits (as many as
fit, see below), each resized to a random side of MIN_SIZE to MAX_SIZE pixels (nearest neighbour,
`digits_seg.upscale`) at a random position, drawn one after another. A digit's STROKES are its
pixels of grey level at least STROKE_LEVEL (of 0..16, digits_seg's threshold); a later digit's
strokes are drawn over the earlier ones (opaque), its fainter pixels only brighten the canvas
(maximum), so they hide nothing. An instance's mask is its VISIBLE strokes: its strokes minus those
of the later digits, as COCO's instance masks are the visible part of an object, so the masks are
disjoint and together are exactly the canvas pixels of grey at least STROKE_LEVEL. Its box is the
tight box of that mask in pixels, [x1, y1, x2, y2] with pixel edges (`detection_features.mask_box`, the
box format COCO's builder stores too), its area the mask's pixel count, its label the digit (0-9).

Occlusion is bounded: a digit is placed at the first of PLACEMENT_TRIES uniform positions where
every digit keeps at least MIN_VISIBLE_FRACTION of its strokes visible, and is left out (not drawn)
when none does, so every stroke on a canvas belongs to a recognizable, annotated instance. Training
canvases use only the digits of `digits`' training split, validation canvases only its validation
digits, and everything is drawn from fixed seeds, so every machine builds the same dataset.
Importing this module registers the builder.

The canvas is 64 x 64: the detector pads images to multiples of 32 (its coarsest level, P5, has
stride 32), 32 x 32 has no room for several digits at several scales, and 64 x 64 holds up to five
12-40 pixel digits while costing a quarter of a 128 x 128 canvas, so a tiny Mask R-CNN learns it on
a laptop's CPU in minutes.
"""

import numpy as np
import tensorflow_datasets as tfds

from shufflemamba_jax.data import detection_features, digits, digits_seg

CANVAS = 64
MIN_DIGITS, MAX_DIGITS = 2, 5  # Digits drawn per canvas (fewer when one finds no place).
MIN_SIZE, MAX_SIZE = 12, 40  # Side of a resized digit in pixels, uniform (its strokes' box is smaller).
STROKE_LEVEL = digits_seg.STROKE_LEVEL  # Grey levels (of 0..16) from which a pixel is a stroke.
MIN_VISIBLE_FRACTION = 0.5  # Of each digit's stroke pixels that stay visible on its canvas.
PLACEMENT_TRIES = 100  # Uniform positions tried per digit before it is left out.
CLASS_NAMES = tuple(str(d) for d in range(10))
NUM_CLASSES = len(CLASS_NAMES)
NUM_CANVASES = {"train": 2000, "validation": 400}
SEEDS = {"train": 1, "validation": 2}


def canvas(rng: np.random.Generator, gray: np.ndarray, labels: np.ndarray, pool: np.ndarray):
  """One canvas: (image uint8 (CANVAS, CANVAS, 3), masks bool (K, CANVAS, CANVAS), classes int64 (K,),
  strokes int64 (K,)).

  gray: (N, 8, 8) 0..16 digit images; labels: (N,) their classes; pool: the indices to draw from.
  The K instances are in drawing order (later ones on top); masks are their visible strokes, strokes
  the pixel counts of their whole strokes (a mask smaller than that is occluded).
  """
  image = np.zeros((CANVAS, CANVAS), np.uint8)
  owner = np.full((CANVAS, CANVAS), -1, np.int64)  # Which instance's stroke shows at each pixel.
  strokes, classes = [], []  # Per instance: its stroke pixel count; its class.
  for _ in range(int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))):
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    index = int(rng.choice(pool))
    digit = digits_seg.upscale(gray[index], size)
    stroke = digit >= STROKE_LEVEL
    corners = rng.integers(0, CANVAS - size + 1, (PLACEMENT_TRIES, 2))
    corner = _first_fit(corners, size, stroke, owner, np.asarray(strokes, np.int64))
    if corner is None:
      continue
    window = np.s_[corner[0] : corner[0] + size, corner[1] : corner[1] + size]
    level = np.round(digit * (255.0 / 16.0)).astype(np.uint8)
    image[window] = np.where(stroke, level, np.maximum(image[window], level))
    owner[window][stroke] = len(classes)
    strokes.append(int(stroke.sum()))
    classes.append(int(labels[index]))
  masks = owner[None] == np.arange(len(classes))[:, None, None]
  return np.repeat(image[..., None], 3, axis=-1), masks, np.asarray(classes, np.int64), np.asarray(strokes, np.int64)


def _first_fit(corners: np.ndarray, size: int, stroke: np.ndarray, owner: np.ndarray, strokes: np.ndarray):
  """The first (top, left) of `corners` where drawing `stroke` leaves every earlier instance at least
  MIN_VISIBLE_FRACTION of its `strokes` visible, or None."""
  if strokes.size == 0:
    return corners[0]
  visible = np.bincount(owner[owner >= 0], minlength=strokes.size)
  for top, left in corners:
    covered = owner[top : top + size, left : left + size][stroke]
    hidden = np.bincount(covered[covered >= 0], minlength=strokes.size)
    if np.all(visible - hidden >= MIN_VISIBLE_FRACTION * strokes):
      return top, left
  return None


class DigitsDet(tfds.core.GeneratorBasedBuilder):
  """64x64 canvases of 2-5 scikit-learn digits at 12-40 pixels, overlapping, with instance masks
  (train 2000, validation 400)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 2-5 digits of 12-40 px, each at least half visible."}

  def _info(self):
    return self.dataset_info_from_configs(
      description=(
        "Detection and instance segmentation on scikit-learn's bundled 8x8 handwritten digits: 64x64 "
        "canvases of 2-5 digits resized to 12-40 pixels, later digits over earlier ones; each instance's "
        "mask is its visible strokes, its box that mask's tight box (pixel x1y1x2y2), its label the digit 0-9."
      ),
      features=detection_features.detection_features(CLASS_NAMES, (CANVAS, CANVAS)),
      homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn: nothing to download.
    train, validation = digits.digits_split_indices()
    return {
      "train": self._generate_examples("train", train),
      "validation": self._generate_examples("validation", validation),
    }

  def _generate_examples(self, split, pool):
    gray, labels = digits_seg.load_gray_digits()
    rng = np.random.default_rng(SEEDS[split])
    for index in range(NUM_CANVASES[split]):
      image, masks, classes, _ = canvas(rng, gray, labels, pool)
      objects = {
        "bbox": np.reshape([detection_features.mask_box(m) for m in masks], (-1, 4)).astype(np.float32),
        "label": classes,
        "is_crowd": np.zeros(len(classes), bool),
        "area": masks.sum(axis=(1, 2)).astype(np.float32),
        "mask": masks[..., None].astype(np.uint8),
      }
      yield f"{split}_{index:05d}", {"image": image, "image/id": index, "objects": objects}

"""draw_detections: masks blended by alpha in their class colours, box outlines and captions of the
class colour inside the image, the highest score on top, the input untouched, bad input named."""

import numpy as np
import pytest

from shufflemamba_jax.training.tasks import drawing, segmentation

NAMES = ("person", "car", "dog")
COLORS = segmentation.label_colors(len(NAMES))
GRAY = 100


def _image(height=160, width=160):
  return np.full((height, width, 3), GRAY, np.uint8)


def _mask(height, width, top, left, bottom, right):
  mask = np.zeros((height, width), bool)
  mask[top:bottom, left:right] = True
  return mask


def _is_color(pixels, color):
  return np.all(pixels == color, axis=-1)


def test_mask_box_and_background():
  image = _image()
  boxes = np.array([[40.0, 60.0, 120.0, 140.0]])
  masks = _mask(160, 160, 60, 40, 140, 120)[None]
  out = drawing.draw_detections(image, boxes, np.array([0]), np.array([0.97]), masks, NAMES, mask_alpha=0.25)
  assert out.shape == image.shape and out.dtype == np.uint8
  # Inside the mask, away from the outline and the caption: 100 * 0.75 + colour * 0.25, exactly.
  expected = (GRAY * 3 + COLORS[0].astype(int)) // 4
  np.testing.assert_array_equal(out[80:130, 50:110], np.broadcast_to(expected, (50, 60, 3)))
  # The outline is 2 px on a 160 px image, of the class colour, inside the box's pixels 40..119, 60..139.
  assert _is_color(out[139, 45:115], COLORS[0]).all() and _is_color(out[138, 45:115], COLORS[0]).all()
  assert _is_color(out[70:130, 118:120], COLORS[0]).all() and _is_color(out[70:130, 40:42], COLORS[0]).all()
  assert not _is_color(out[137, 45:115], COLORS[0]).any()
  # Far from the instance (below the box, right of it) nothing changes.
  np.testing.assert_array_equal(out[141:], image[141:])
  np.testing.assert_array_equal(out[:, 121:], image[:, 121:])


def test_thin_outline_on_small_images():
  image = _image(64, 64)
  box = np.array([[10.0, 30.0, 50.0, 60.0]])
  out = drawing.draw_detections(image, box, np.array([1]), np.array([0.5]), None, NAMES)
  assert _is_color(out[59, 15:45], COLORS[1]).all()
  np.testing.assert_array_equal(out[58, 15:45], image[58, 15:45])  # 1 px, and no mask drawn.


def test_no_detections_returns_a_copy():
  image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  empty = np.zeros((0, 4))
  out = drawing.draw_detections(image, empty, np.zeros(0, int), np.zeros(0), np.zeros((0, 40, 50), bool), NAMES)
  np.testing.assert_array_equal(out, image)
  assert out is not image and not np.shares_memory(out, image)


def test_caption_above_the_box_when_there_is_room():
  image = _image()
  box = np.array([[40.0, 60.0, 120.0, 140.0]])
  out = drawing.draw_detections(image, box, np.array([2]), np.array([0.9]), None, NAMES)
  above = out[:60]
  colored = _is_color(above, COLORS[2])
  assert colored.any()
  rows, cols = np.nonzero(np.any(above != GRAY, axis=-1))
  # A single band of text height right above the box, starting at its left edge.
  assert rows.min() >= 60 - 20 and rows.max() == 59 and cols.min() == 40
  # The caption's text contrasts: white or black pixels, not the background.
  text = np.all(above == 0, axis=-1) | np.all(above == 255, axis=-1)
  assert text.any()


def test_caption_inside_the_image_at_the_top_and_right_edges():
  image = _image(100, 100)
  # The box touches the top edge and is too narrow for its caption near the right edge.
  boxes = np.array([[85.0, 0.0, 100.0, 50.0]])
  out = drawing.draw_detections(image, boxes, np.array([0]), np.array([0.97]), None, NAMES)
  changed = np.any(out != GRAY, axis=-1)
  colored = _is_color(out, COLORS[0])
  # The caption lies in the box's top rows, shifted left of the box to end at the image's right edge.
  assert colored[2:12, :85].any() and colored[2:12, 99].all()
  rows, cols = np.nonzero(changed)
  assert rows.max() <= 49 and cols.max() <= 99
  assert not changed[20:, :85].any()  # Nothing beyond the caption band and the box.


def test_highest_score_drawn_last_wins_overlaps():
  image = _image()
  masks = np.stack([_mask(160, 160, 20, 20, 100, 100), _mask(160, 160, 60, 60, 140, 140)])
  boxes = np.array([[20.0, 20.0, 100.0, 100.0], [60.0, 60.0, 140.0, 140.0]])
  labels = np.array([0, 1])
  for scores, top in ((np.array([0.9, 0.3]), 0), (np.array([0.3, 0.9]), 1)):
    out = drawing.draw_detections(image, boxes, labels, scores, masks, NAMES, mask_alpha=1.0)
    assert _is_color(out[75:90, 75:90], COLORS[top]).all()
  # With alpha 0.5 the lower instance blends first, the higher one over it.
  out = drawing.draw_detections(image, boxes, labels, np.array([0.3, 0.9]), masks, NAMES, mask_alpha=0.5)
  lower = np.round(GRAY * 0.5 + COLORS[0] * 0.5)
  np.testing.assert_array_equal(out[80, 80], np.round(lower * 0.5 + COLORS[1] * 0.5))


def test_input_not_modified():
  image = _image()
  args = (np.array([[10.0, 30.0, 90.0, 90.0]]), np.array([1]), np.array([0.8]), _mask(160, 160, 30, 10, 90, 90)[None])
  copies = [image.copy()] + [array.copy() for array in args]
  out = drawing.draw_detections(image, *args, NAMES)
  assert not np.array_equal(out, image)
  for before, after in zip(copies, (image, *args)):
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(
  ("name", "change"),
  [
    ("image", {"image": np.zeros((32, 32), np.uint8)}),
    ("image", {"image": np.zeros((32, 32, 3), np.float32)}),
    ("boxes", {"boxes": np.zeros((1, 3))}),
    ("boxes", {"boxes": np.array([[0.0, 0.0, np.nan, 4.0]])}),
    ("labels", {"labels": np.array([0, 1])}),
    ("labels", {"labels": np.array([3])}),
    ("labels", {"labels": np.array([-1])}),
    ("labels", {"labels": np.array([0.0])}),
    ("scores", {"scores": np.zeros(2)}),
    ("masks", {"masks": np.zeros((1, 32, 31), bool)}),
    ("masks", {"masks": np.zeros((1, 32, 32), np.uint8)}),
    ("mask_alpha", {"mask_alpha": 1.5}),
  ],
)
def test_bad_input_raises_naming_the_argument(name, change):
  args = {
    "image": np.zeros((32, 32, 3), np.uint8),
    "boxes": np.array([[2.0, 2.0, 20.0, 20.0]]),
    "labels": np.array([0]),
    "scores": np.array([0.5]),
    "masks": np.zeros((1, 32, 32), bool),
    "class_names": NAMES,
  }
  args.update(change)
  with pytest.raises(ValueError, match=name):
    drawing.draw_detections(**args)

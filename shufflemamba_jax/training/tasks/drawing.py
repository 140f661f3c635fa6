"""Detections drawn over their image: each instance's mask tinted in its class colour, its box outlined
and captioned "name score", for looking at a detector's predictions (the caller writes the PNGs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shufflemamba_jax.training.tasks.segmentation import label_colors

# Images smaller than this on a side get 1 px box outlines: 2 px would hide small objects.
_THIN_LINE_BELOW = 128
_CAPTION_PAD = 1  # Pixels of the caption's colour around its text on each side.


def _bitmap_font() -> ImageFont.ImageFont:
  """PIL's default bitmap font. Since Pillow 10.1 `load_default()` returns an antialiased TrueType
  font where FreeType is built in; the bitmap one draws the same crisp pixels on every host."""
  if hasattr(ImageFont, "load_default_imagefont"):
    return ImageFont.load_default_imagefont()
  return ImageFont.load_default()


def _text_color(color: np.ndarray) -> tuple[int, int, int]:
  """Black or white, whichever has the higher WCAG contrast ratio with `color`, (3,) uint8 RGB."""
  srgb = color.astype(np.float64) / 255.0
  linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
  luminance = float(linear @ np.array([0.2126, 0.7152, 0.0722]))
  # Contrast against black is (L + 0.05) / 0.05, against white 1.05 / (L + 0.05).
  return (0, 0, 0) if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else (255, 255, 255)


def _validate(image, boxes, labels, scores, masks, num_classes: int, mask_alpha: float) -> None:
  """Raises a ValueError naming the first argument whose shape, dtype or values do not fit."""
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be (H, W, 3) uint8 RGB, not {image.shape} {image.dtype}")
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"boxes must be (N, 4) x1, y1, x2, y2, not {boxes.shape}")
  if not np.all(np.isfinite(boxes)):
    raise ValueError("boxes must be finite")
  num = boxes.shape[0]
  if labels.shape != (num,) or not (np.issubdtype(labels.dtype, np.integer) or num == 0):
    raise ValueError(f"labels must be ({num},) integers like boxes, not {labels.shape} {labels.dtype}")
  if num and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}) (len(class_names)), got {labels.min()}..{labels.max()}")
  if scores.shape != (num,):
    raise ValueError(f"scores must be ({num},) like boxes, not {scores.shape}")
  if masks is not None and (masks.shape != (num, *image.shape[:2]) or masks.dtype != np.bool_):
    raise ValueError(f"masks must be ({num}, {image.shape[0]}, {image.shape[1]}) bool, not {masks.shape} {masks.dtype}")
  if not 0.0 <= mask_alpha <= 1.0:
    raise ValueError(f"mask_alpha must lie in [0, 1], not {mask_alpha}")


def _pixel_box(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int] | None:
  """The inclusive pixel rectangle (left, top, right, bottom) of a box x1, y1, x2, y2 whose x2, y2 are
  exclusive edges, at least one pixel and clipped to the image; None when it lies outside."""
  left, top, right, bottom = (int(np.floor(value + 0.5)) for value in box)
  right, bottom = max(right - 1, left), max(bottom - 1, top)
  if right < 0 or bottom < 0 or left >= width or top >= height:
    return None
  return max(left, 0), max(top, 0), min(right, width - 1), min(bottom, height - 1)


def draw_detections(
  image: np.ndarray,
  boxes: np.ndarray,
  labels: np.ndarray,
  scores: np.ndarray,
  masks: np.ndarray | None,
  class_names: Sequence[str],
  *,
  mask_alpha: float = 0.5,
) -> np.ndarray:
  """Draws N detections over a copy of `image`: masks blended in their class colours (of
  `segmentation.label_colors`), then box outlines and "name score" captions above the boxes.

  Instances are drawn in ascending score order, so where they overlap the highest score is on top.
  All masks are drawn before any box so that no mask tints another instance's outline or caption.

  Args:
    image: (H, W, 3) uint8 RGB; not modified.
    boxes: (N, 4) float x1, y1, x2, y2 in the image's pixels (x2, y2 exclusive edges).
    labels: (N,) integer indices into `class_names`.
    scores: (N,) float, captioned with two decimals.
    masks: (N, H, W) bool, or None to draw boxes only.
    class_names: a name per class; their number sets the palette.
    mask_alpha: the class colour's weight in a masked pixel, in [0, 1].

  Returns:
    A new (H, W, 3) uint8 RGB image.

  Raises:
    ValueError: naming the argument whose shape, dtype or values do not fit.
  """
  image, boxes, labels, scores = (np.asarray(array) for array in (image, boxes, labels, scores))
  masks = None if masks is None else np.asarray(masks)
  _validate(image, boxes, labels, scores, masks, len(class_names), mask_alpha)
  if boxes.shape[0] == 0:
    return image.copy()
  height, width = image.shape[:2]
  colors = label_colors(len(class_names))
  order = np.argsort(scores, kind="stable")

  canvas = image.copy()
  if masks is not None:
    for index in order:
      mask, color = masks[index], colors[labels[index]].astype(np.float32)
      blended = canvas[mask].astype(np.float32) * (1.0 - mask_alpha) + color * mask_alpha
      canvas[mask] = np.clip(np.round(blended), 0, 255).astype(np.uint8)

  picture = Image.fromarray(canvas)
  draw = ImageDraw.Draw(picture)
  font = _bitmap_font()
  line_width = 1 if min(height, width) < _THIN_LINE_BELOW else 2
  for index in order:
    rect = _pixel_box(boxes[index], height, width)
    if rect is None:
      continue
    left, top, right, bottom = rect
    color = tuple(int(channel) for channel in colors[labels[index]])
    draw.rectangle(rect, outline=color, width=line_width)

    caption = f"{class_names[labels[index]]} {float(scores[index]):.2f}"
    text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), caption, font=font)
    caption_width = text_right - text_left + 2 * _CAPTION_PAD
    caption_height = text_bottom - text_top + 2 * _CAPTION_PAD
    # Above the box where there is room, else just inside its top; shifted left to end inside the image.
    caption_top = top - caption_height if top >= caption_height else top
    caption_left = max(min(left, width - caption_width), 0)
    draw.rectangle(
      (caption_left, caption_top, caption_left + caption_width - 1, caption_top + caption_height - 1), fill=color
    )
    draw.text(
      (caption_left + _CAPTION_PAD - text_left, caption_top + _CAPTION_PAD - text_top),
      caption,
      fill=_text_color(colors[labels[index]]),
      font=font,
    )
  return np.array(picture)

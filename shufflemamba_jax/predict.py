"""Command line: classifies image files with a trained or converted model, segments them, or
detects the objects in them.

  python -m shufflemamba_jax.predict --checkpoint=WORKDIR [--step=N|best] [--no-ema] cat.jpg dog.png FOLDER/
  python -m shufflemamba_jax.predict --checkpoint=SEG_WORKDIR --output-dir=OUT scene.jpg FOLDER/

`--checkpoint` is a training workdir (or its checkpoints/ folder, or one step folder) or a
directory written by `shufflemamba_jax.convert`; images are files, or folders standing for every
image in them. The task of the saved model writes the predictions (`training/tasks/`): a
classifier prints the top-k classes of each image, preprocessed by evaluation's own transform; a
segmenter writes OUT/<image name>.png, the colour-coded label map at the image's own size; a
detector writes OUT/<image name>.png, the image with its boxes, class names, scores and masks
drawn, and OUT/detections.json (`--batch-size` images per forward pass).
"""

from __future__ import annotations

import argparse
import sys

from etils import epath

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


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


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Classify image files with a trained model.")
  parser.add_argument("--checkpoint", required=True, help="training workdir, checkpoint folder or converted weights")
  parser.add_argument("--step", type=_step, default=None, help='checkpoint step, or "best" (default: latest)')
  parser.add_argument("--no-ema", action="store_true", help="use the raw parameters, not the EMA")
  parser.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
  parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
  parser.add_argument("--top-k", type=int, default=5)
  parser.add_argument("--json", action="store_true", help="print one JSON object per image")
  parser.add_argument(
    "--output-dir",
    default=None,
    help="segmentation checkpoints: folder of the label-map PNGs; detection: of the drawings and detections.json",
  )
  parser.add_argument("images", nargs="+", help="image files, or folders of them")
  args = parser.parse_args(argv)
  if args.batch_size < 1 or args.top_k < 1:
    parser.error("--batch-size and --top-k must be positive")
  from shufflemamba_jax.training import tasks  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.weights import checkpoint  # pylint: disable=g-import-not-at-top

  try:
    paths = image_paths(args.images)
    saved = checkpoint.read_weights(args.checkpoint, args.step, ema=not args.no_ema)
    return tasks.of_saved(saved).predict(saved, paths, args)
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())

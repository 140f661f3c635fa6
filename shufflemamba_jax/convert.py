"""Command line: imports the official PyTorch Vim / Mamba-Reg / ShuffleMamba weights, and exports ours.

  python -m shufflemamba_jax.convert --from-pytorch vim_t_midclstok_76p1acc.pth \
      --variant vim_tiny --out /ckpt/vim_tiny [--img-size 256] [--num-classes 100] [--set depth=12 ...]
  python -m shufflemamba_jax.convert --to-pytorch /ckpt/vim_tiny --out vim_tiny.safetensors

An import writes OUT as a workdir with one checkpoint, step 0 (see `weights.checkpoint`), which
`load_model`, `predict --checkpoint`, `--config.init_from` and evaluation read like a training
run. An export reads any of our checkpoints (a converted directory or a training run; its
parameters, or its EMA with --ema) and writes .pth, .safetensors or .npz.
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys

_log = logging.getLogger("shufflemamba_jax.convert")


def import_checkpoint(args) -> None:
  from shufflemamba_jax import models  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.weights import checkpoint, pytorch  # pylint: disable=g-import-not-at-top

  overrides = {
    name: value for name, value in (("img_size", args.img_size), ("num_classes", args.num_classes)) if value is not None
  }
  config = models.model_config(args.variant, **dict(args.set), **overrides)
  state_dict = pytorch.read_state_dict(
    args.from_pytorch, checkpoint_key=args.checkpoint_key, allow_pickle=args.allow_pickle
  )
  params = pytorch.import_params(
    state_dict,
    config,
    source=args.from_pytorch,
    resize_positions="img_size" in overrides,
    new_head_seed=args.seed if "num_classes" in overrides else None,
  )
  with checkpoint.Checkpointer(checkpoint.checkpoint_directory(args.out), async_save=False) as saver:
    if saver.latest_step() is not None:
      raise FileExistsError(f"{args.out} already holds a checkpoint; choose an empty --out")
    saver.save(0, {"params": params}, model=config, force=True)
  _log.info("Wrote %s (variant %s, settings %s, overrides %s).", args.out, args.variant, dict(args.set), overrides)


def _setting(text: str) -> tuple[str, object]:
  """NAME=VALUE with VALUE a Python literal (4, 0.1, True) or else a string."""
  name, equals, value = text.partition("=")
  if not equals or not name:
    raise argparse.ArgumentTypeError(f"--set {text!r}: expected NAME=VALUE, e.g. depth=12")
  try:
    return name, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return name, value


def export_checkpoint(args) -> None:
  from shufflemamba_jax.weights import checkpoint, pytorch  # pylint: disable=g-import-not-at-top

  saved = checkpoint.read_weights(args.to_pytorch, args.step, ema=args.ema)
  state_dict = pytorch.export_state_dict(saved.ema if saved.ema is not None else saved.params)
  pytorch.write_state_dict(args.out, state_dict)
  _log.info("Wrote %d tensors of step %d to %s.", len(state_dict), saved.step, args.out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m shufflemamba_jax.convert",
    description="Convert official PyTorch Vim / Mamba-Reg / ShuffleMamba weights to and from "
    "shufflemamba_jax checkpoints.",
  )
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument(
    "--from-pytorch", metavar="CKPT", help="official state dict (.pth, .safetensors or .npz) to import"
  )
  direction.add_argument(
    "--to-pytorch", metavar="DIR", help="our checkpoint (converted weights or a training workdir) to export"
  )
  parser.add_argument("--out", required=True, help="import: new directory; export: .pth, .safetensors or .npz file")
  parser.add_argument("--variant", help="model variant (import only), e.g. vim_tiny")
  parser.add_argument(
    "--set",
    type=_setting,
    action="append",
    default=[],
    metavar="NAME=VALUE",
    help="a model setting of the checkpoint's own architecture (repeatable), e.g. depth=12 for a "
    "model trained at another size than the variant's",
  )
  parser.add_argument("--img-size", type=int, help="input resolution; position embeddings are resized")
  parser.add_argument("--num-classes", type=int, help="classes; a different head is re-initialized")
  parser.add_argument("--seed", type=int, default=0, help="seed of a re-initialized head")
  parser.add_argument("--checkpoint-key", help="entry holding the state dict (default: auto)")
  parser.add_argument(
    "--allow-pickle", action="store_true", help="unpickle arbitrary objects in a .pth file (trusted files only)"
  )
  parser.add_argument("--step", type=int, default=None, help="export: the checkpoint step (default: the latest)")
  parser.add_argument("--ema", action="store_true", help="export: the EMA parameters of a training run")
  args = parser.parse_args(argv)
  if not _log.handlers:  # Our messages only; Orbax's INFO chatter stays off.
    _log.addHandler(logging.StreamHandler())
    _log.setLevel(logging.INFO)
    _log.propagate = False
  if args.from_pytorch and not args.variant:
    parser.error("--from-pytorch needs --variant (e.g. vim_tiny)")
  try:
    if args.from_pytorch:
      import_checkpoint(args)
    else:
      export_checkpoint(args)
  except (ValueError, KeyError, OSError, ImportError) as error:
    parser.exit(1, f"error: {error}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Command line: imports the official PyTorch Vim / Mamba-Reg / ShuffleMamba weights, and exports ours.

  python -m shufflemamba_jax.convert --from-pytorch vim_t_midclstok_76p1acc.pth \
      --variant vim_tiny --out /ckpt/vim_tiny [--img-size 256] [--num-classes 100] [--set depth=12 ...]
  python -m shufflemamba_jax.convert --to-pytorch /ckpt/vim_tiny --out vim_tiny.safetensors
  python -m shufflemamba_jax.convert --from-pytorch upernet_shufflemamba_base.pth --out /ckpt/seg \
      [--set out_indices=(5,11,17,23) --set pool_scales=(1,2,3,6)]

An mmseg EncoderDecoder checkpoint of the reference's UperNet (`backbone.*`, `decode_head.*`,
`auxiliary_head.*`, BatchNorm statistics included; official .pth files wrap it under
"state_dict") is recognized as a segmenter: its sizes come from its tensors (width, depth,
LayerNorm or RMSNorm, position grid, classes, head widths) and other settings from --set; it is
written as a segmentation workdir evaluated as the reference's test_cfg (slide, 512 / 341), and
--to-pytorch of a segmenter writes that layout back, loadable with strict=True. A segmenter whose
backbone is the ViT-Adapter (`MM_VSSM_ADT`, `backbone.spm.*`, `backbone.interactions.*`) is
recognized too: its adapter sizes come from its tensors (--set n_points=... if not 4). So is the
official mmdet Mask R-CNN with the adapter (`backbone.*`, `neck.*`, `rpn_head.*`, `roi_head.*`,
BatchNorm statistics included): sizes from its tensors, written as a detector workdir
(`models.detection.MaskRCNN`), and written back in that layout.

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


# A converted reference segmenter evaluates as the reference's test_cfg does: slide mode, 512
# windows every 341 pixels (the run config `predict` and evaluation read).
SEGMENTER_RUN_CONFIG = {"seg": {"eval_crop": [512, 512], "eval_stride": [341, 341]}}


def import_checkpoint(args, parser) -> None:
  from shufflemamba_jax import models  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.weights import checkpoint, mmdet, mmseg, pytorch  # pylint: disable=g-import-not-at-top

  state_dict = pytorch.read_state_dict(
    args.from_pytorch, checkpoint_key=args.checkpoint_key, allow_pickle=args.allow_pickle
  )
  if mmdet.is_detector_state_dict(state_dict):
    if args.variant or args.img_size or args.num_classes:
      raise ValueError(
        f"{args.from_pytorch} is an mmdet detector: its sizes come from its tensors; "
        "give other settings with --set NAME=VALUE (not --variant, --img-size, --num-classes)"
      )
    config = mmdet.detector_config(state_dict, dict(args.set))
    params, model_state = mmdet.import_detector(state_dict, config, source=args.from_pytorch)
    _save(checkpoint, args.out, {"params": params, "model_state": model_state}, config)
    _log.info("Wrote %s (an mmdet Mask R-CNN with the adapter, settings %s).", args.out, dict(args.set))
    return
  if mmseg.is_segmenter_state_dict(state_dict):
    if args.variant or args.img_size or args.num_classes:
      raise ValueError(
        f"{args.from_pytorch} is an mmseg segmenter: its sizes come from its tensors; "
        "give other settings with --set NAME=VALUE (not --variant, --img-size, --num-classes)"
      )
    config = mmseg.segmenter_config(state_dict, dict(args.set))
    params, model_state = mmseg.import_segmenter(state_dict, config, source=args.from_pytorch)
    state = {"params": params, "model_state": model_state}
    _save(checkpoint, args.out, state, config, run_config=SEGMENTER_RUN_CONFIG)
    _log.info("Wrote %s (an mmseg UperNet segmenter, settings %s).", args.out, dict(args.set))
    return
  if not args.variant:
    parser.error("--from-pytorch of a classifier needs --variant (e.g. vim_tiny)")
  overrides = {
    name: value for name, value in (("img_size", args.img_size), ("num_classes", args.num_classes)) if value is not None
  }
  config = models.model_config(args.variant, **dict(args.set), **overrides)
  params = pytorch.import_params(
    state_dict,
    config,
    source=args.from_pytorch,
    resize_positions="img_size" in overrides,
    new_head_seed=args.seed if "num_classes" in overrides else None,
  )
  _save(checkpoint, args.out, {"params": params}, config)
  _log.info("Wrote %s (variant %s, settings %s, overrides %s).", args.out, args.variant, dict(args.set), overrides)


def _save(checkpoint, out: str, state: dict, config, run_config: dict | None = None) -> None:
  with checkpoint.Checkpointer(checkpoint.checkpoint_directory(out), async_save=False) as saver:
    if saver.latest_step() is not None:
      raise FileExistsError(f"{out} already holds a checkpoint; choose an empty --out")
    saver.save(0, state, model=config, config=run_config, force=True)


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
  from shufflemamba_jax.weights import checkpoint, mmdet, mmseg, pytorch  # pylint: disable=g-import-not-at-top

  saved = checkpoint.read_weights(args.to_pytorch, args.step, ema=args.ema)
  params = saved.ema if saved.ema is not None else saved.params
  if saved.is_detector:
    state_dict = mmdet.export_detector(params, saved.model_state)
  elif saved.is_segmenter:
    state_dict = mmseg.export_segmenter(params, saved.model_state, pool_scales=saved.model_config.pool_scales)
  else:
    state_dict = pytorch.export_state_dict(params)
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
  parser.add_argument("--variant", help="model variant (classifier import only), e.g. vim_tiny")
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
  try:
    if args.from_pytorch:
      import_checkpoint(args, parser)
    else:
      export_checkpoint(args)
  except (ValueError, KeyError, OSError, ImportError) as error:
    parser.exit(1, f"error: {error}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

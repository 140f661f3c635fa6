"""ADE20K semantic segmentation recipes: UperNet on ShuffleMamba / ShuffleMamba-Reg backbones.

The reference recipe (mmsegmentation configs `upernet_shufflemamba_8xb2-160k_ade20k-512x512_*`):
AdamW with lr 6e-5 (B, M) or 3e-5 (L, Reg-L), betas (0.9, 0.999), weight decay 0.01 (none for
position embeddings, class token, norms, A_log and D); gradient clipping at global norm 3 (L) or
5 (Reg-L), none for B and M; linear warmup over 1500 iterations from 1e-6 of the peak, then poly
(power 1) decay to 0 at 160k iterations; global batch 16 of 512x512 crops; drop path 0.2 (B, L)
or 0.3 (M, Reg-L), SLWS off; the backbone initialized from a
classification checkpoint (ours or converted official weights) with its position table resized to
the 32x32 grid; evaluation as mmseg's: each image resized to fit (2048, 512) keeping its ratio
(unpadded), 512 windows every 341 pixels clamped to it, the logits resized to the original size
and scored against the original label map (--config.seg.tta=True: the 6-ratio x flip
test-time augmentation).

Run (ADE20K prepared by `python -m shufflemamba_jax.prepare ade20k --manual_dir=...` first; the
classifier from configs/imagenet.py or `python -m shufflemamba_jax.convert`):

  python -m shufflemamba_jax.main --config=configs/ade20k.py:shufflemamba_base --workdir=DIR \
      --config.init_from=CLASSIFIER_WORKDIR --config.data_dir=TFDS_DIR
  python -m shufflemamba_jax.main --config=configs/ade20k.py:shufflemamba_base --workdir=DIR \
      --mode=evaluate

Expected result: not measured here (no ADE20K run has been made with this code). init_from must
be set on the command line: a segmenter trained from a random backbone is not the recipe.

Where the reference configs differ from the variants named here (read from
huangzizheng01/ShuffleMamba, segmentation/configs/shufflemamba, 2026-11-25): its "base" backbone
carries 12 register tokens (cls_reduce 4), the ShuffleMamba-Reg-B layout (use
--config.model.variant=shufflemamba_reg_base with a Reg-B classifier for that), and its "large"
config builds depth 40 where the shufflemamba_large classifier has 48 (out_indices scale with
the depth either way).
"""

from shufflemamba_jax.training import config_files

# variant: (peak learning rate, drop path rate, gradient clipping norm or None), each from the
# variant's reference config.
_RECIPES = {
  "shufflemamba_base": (6e-5, 0.2, None),
  "shufflemamba_middle": (6e-5, 0.3, None),
  "shufflemamba_large": (3e-5, 0.2, 3.0),
  "shufflemamba_reg_large": (3e-5, 0.3, 5.0),
}


def get_config(arg: str | None = None):
  """`arg` = a variant of _RECIPES (default shufflemamba_base)."""
  variant = (arg or "shufflemamba_base").strip()
  if variant not in _RECIPES:
    raise ValueError(f"configs/ade20k.py: unknown variant {variant!r}; choose one of {tuple(_RECIPES)}.")
  lr, drop_path, grad_clip = _RECIPES[variant]
  config = config_files.get_config(config_files.sibling(__file__, "segmentation.py"))
  config.dataset = "ade20k"
  config.image_size = 512
  config.batch_size = 16  # 8 GPUs x 2 in the reference.
  config.eval_batch_size = 8  # Up to 8 consecutive images of one size evaluated together.
  config.total_steps = 160_000
  config.num_epochs = 0  # total_steps decides.
  config.log_every_steps = 50
  config.eval_every_steps = 16_000
  config.checkpoint_every_steps = 4000
  config.keep_checkpoints = 2
  config.shuffle_buffer = 4096

  config.model.variant = variant
  config.model.dtype = "bfloat16"
  config.model.drop_path_rate = drop_path
  config.model.slws.max_prob = 0.0  # SLWS off for dense prediction.

  config.lr = lr
  config.b1, config.b2 = 0.9, 0.999
  config.weight_decay = 0.01
  config.grad_clip = grad_clip
  config.ema_decay = 0.0
  return config

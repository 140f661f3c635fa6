"""ADE20K semantic segmentation recipes: the official UperNet-ShuffleMamba configs.

Each variant is the reference config of that name (huangzizheng01/ShuffleMamba,
segmentation/configs/shufflemamba/, read 2026-12-03):

  variant                 config file (upernet_*_8xb2-160k_ade20k-512x512_*) width depth norm lr   drop path clip
  shufflemamba_base       upernet_shufflemamba_..._base.py                    768  24   LN   6e-5 0.2       -
  shufflemamba_middle     upernet_videomamba_..._middle.py                    576  32   LN   6e-5 0.3       -
  shufflemamba_large      upernet_videomamba_..._large.py                    1024  40   LN   3e-5 0.2       3
  shufflemamba_reg_large  upernet_shufflemamba_..._large_reg.py              1024  48   RMS  3e-5 0.3       5
  shufflemamba_base_adapter upernet_shufflemamba_..._base_adapter.py          768  24   LN   6e-5 0.2       -

(LN: LayerNorm, RMS: RMSNorm.)

The adapter variant's backbone is the ViT-Adapter around the blocks (`MM_VSSM_ADT`,
shufflemamba_jax.models.adapter): spatial prior module of width 64, deformable attention with 12
heads, 4 points and value ratio 0.5, ConvFFN ratio 0.25, stretches ending at out_indices [5, 11,
17, 23] (its interaction_indexes), two extra extractors; its four maps (strides 4 to 32, each
with its SyncBN) go to the same UPerHead and FCNHead. Its optimizer is the others' (the
layer-decay constructor is commented out there; the same custom_keys, which now also spare the
adapter's query_norm / feat_norm / ffn_norm and norm1..norm4 from decay). Its `fp16 = dict(...)`
line is a leftover of mmseg 0.x that mmengine's runner does not read: it trains in float32 too.

Common to all: the backbone scans patch tokens only (its `num_cls_tokens` and `cls_reduce` are
accepted and ignored by `Backbone_VideoMamba`) with the 224-pixel pretraining position table
resized every call; out_indices the last block of each quarter; no neck; UPerHead (512 channels,
pool scales 1, 2, 3, 6) and FCNHead (256 channels, in_index 3, loss weight 0.4) with SyncBN and
dropout 0.1; AdamW betas (0.9, 0.999), weight decay 0.01 except names containing .pos_embed,
.cls_token, norm, .A_log or .D (mmengine's substring match: A_b_log and the heads' BatchNorms,
named `bn` there, do decay); linear warmup over 1500 iterations from 1e-6 of the peak, then poly
(power 1) to 0 at 160k; global batch 16 (8 GPUs x 2) of 512x512 crops; float32 (no --amp); SLWS
off (shuffle_rate 0); evaluation as mmseg's: each image resized to fit (2048, 512) keeping its
ratio (unpadded), 512 windows every 341 pixels clamped to it, the logits resized to the original
size and scored against the original label map (--config.seg.tta=True: the 6-ratio x flip
test-time augmentation). `--config.model.dtype=bfloat16` is a documented option, not the recipe.

Run (ADE20K prepared by `python -m shufflemamba_jax.prepare ade20k --manual_dir=...` first; the
classifier from configs/imagenet.py or `python -m shufflemamba_jax.convert`):

  python -m shufflemamba_jax.main --config=configs/ade20k.py:shufflemamba_base --workdir=DIR \
      --config.init_from=CLASSIFIER_WORKDIR --config.data_dir=TFDS_DIR
  python -m shufflemamba_jax.main --config=configs/ade20k.py:shufflemamba_base --workdir=DIR \
      --mode=evaluate

Expected result: not measured here (no ADE20K run has been made with this code). init_from must
be set on the command line: a segmenter trained from a random backbone is not the recipe. The
warm start takes what the reference's `load_state_dict(strict=False)` takes: an RMSNorm
classifier under a LayerNorm backbone gives its norm scales, the biases start at zero; the
classifier's cls token, registers and head are left out. The large config's depth 40 differs
from the 48-block shufflemamba_large classifier: warm start from a 40-block classifier (or
set --config.model.depth).
"""

from shufflemamba_jax.training import config_files

# variant: (peak learning rate, drop path rate, gradient clipping norm or None, depth, norm), each
# from the variant's reference config (the table above).
_RECIPES = {
  "shufflemamba_base": (6e-5, 0.2, None, 24, "layernorm"),
  "shufflemamba_middle": (6e-5, 0.3, None, 32, "layernorm"),
  "shufflemamba_large": (3e-5, 0.2, 3.0, 40, "layernorm"),
  "shufflemamba_reg_large": (3e-5, 0.3, 5.0, 48, "rmsnorm"),
  "shufflemamba_base_adapter": (6e-5, 0.2, None, 24, "layernorm"),
}
# Adapter variants: (backbone variant, deformable attention heads), from their reference configs.
_ADAPTERS = {"shufflemamba_base_adapter": ("shufflemamba_base", 12)}


def get_config(arg: str | None = None):
  """`arg` = a variant of _RECIPES (default shufflemamba_base)."""
  variant = (arg or "shufflemamba_base").strip()
  if variant not in _RECIPES:
    raise ValueError(f"configs/ade20k.py: unknown variant {variant!r}; choose one of {tuple(_RECIPES)}.")
  lr, drop_path, grad_clip, depth, norm = _RECIPES[variant]
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
  if variant in _ADAPTERS:
    config.model.variant, config.seg.adapter.deform_num_heads = _ADAPTERS[variant]
    config.seg.adapter.enabled = True
    config.seg.adapter.deform_ratio = 0.5
    config.seg.adapter.conv_inplane = 64
  config.model.dtype = "float32"  # The reference trains without --amp.
  config.model.depth = depth
  config.model.norm = norm
  config.model.drop_path_rate = drop_path
  config.model.slws.max_prob = 0.0  # SLWS off for dense prediction.

  config.lr = lr
  config.b1, config.b2 = 0.9, 0.999
  config.weight_decay = 0.01
  config.grad_clip = grad_clip
  config.ema_decay = 0.0
  return config

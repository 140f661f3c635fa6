"""COCO instance segmentation recipes: the official Mask R-CNN 1x ShuffleMamba ViT-Adapter configs.

Each variant is the reference config of that name (huangzizheng01/ShuffleMamba,
detection/configs/shufflemamba/mask_rcnn_shufflemamba_reg_fpn_coco_*_adapter.py, read 2026-12-03);
base, middle and large are the only three there:

  variant              config file      width depth drop path heads interaction_indexes ends  num_layers
  shufflemamba_base    ..._base_adapter    768   24       0.3    12  [5, 11, 17, 23]                24
  shufflemamba_middle  ..._middle_adapter  576   32       0.4    12  [7, 15, 23, 31]                32
  shufflemamba_large   ..._large_adapter  1024   48       0.5    16  [11, 23, 35, 47]               48

(heads: deform_num_heads; num_layers: the layer-decay constructor's, the depth.) Despite the
`_reg_` in the names, every backbone is `MM_VSSM_ADT` (the repository's `Mamba_Adapter` around
`Backbone_VideoMamba`): LayerNorm (rms_norm=False), no registers, patch 16, the 224-pixel
position table resized every call (img_size and pretrain_size 224), shuffle_rate 0 (SLWS off),
drop_rate 0, residual_in_fp32, norm_f deleted. Width and depth are those of the classifier
variants of the same names (shufflemamba_jax.VARIANTS).

Common to all (the variant file, then template.py, then mmdet 3.3.0's _base_ files it lists):
  adapter (variant file and Mamba_Adapter's defaults): conv_inplane 64, n_points 4, cffn_ratio
    0.25, deform_ratio 0.5, with_cffn, add_mamba_feature and use_extra_extractor on,
    init_values_inject 0 (not set by the configs), with_cp off; the Extractors' drop path the
    backbone's full rate; the four outputs each through a SyncBatchNorm.
  detector (mask-rcnn_r50_fpn.py): FPN 256 channels, 5 outputs, with SyncBN (the variant file's
    norm_cfg; mmdet's default FPN has no norm); anchors scale 8, ratios 0.5 / 1 / 2, strides 4 to
    64; RPN 256 samples at 0.5 positive (IoU 0.7 / 0.3), 2000 -> 1000 proposals at NMS 0.7 in
    training, 1000 -> 1000 in test; RoI heads 512 samples at 0.25 positive (IoU 0.5), 7x7 box and
    14x14 mask RoIAlign (sampling_ratio 0), 2 shared fc of 1024, 4 mask convs of 256, 28x28 mask
    targets; test score 0.05, NMS 0.5, 100 detections. configs/detection.py holds these.
  data (coco_instance.py): Resize to fit (1333, 800) keeping the ratio, flip 0.5, nothing else
    (no multi-scale training, no crop, no photometric distortion); batches of one aspect-ratio
    group padded to multiples of 32 (ours: one 1344 x 1344 canvas, README); train images with no
    object or a side under 32 left out (filter_empty_gt, min_size 32: 117,266 of 118,287); the
    mmdet mean / std (ImageNet's, RGB); evaluation bbox and segm mAP (CocoMetric) at the same scale.
  optimizer (variant file): AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05 under
    `MyLayerDecayOptimizerConstructor` (rate 0.9, num_layers the depth: block i x 0.9**(depth - i),
    patch_embed / pos_embed x 0.9**(depth + 1), the rest, adapter included, x 1). That constructor
    replaces mmengine's add_params, so the configs' custom_keys (.pos_embed, norm, .A_log, .D) are
    never read: 1-D parameters and biases do not decay, pos_embed, level_embed and A_log do
    (shufflemamba_jax.training.optim.layer_decay_decays). No gradient clipping; no fp16 (an
    OptimWrapper, not AmpOptimWrapper; tools/train.py's --amp is not in the documented runs).
  schedule (template.py over schedule_1x.py): 12 epochs; LinearLR from 0.001 of the lr over the
    first 1000 iterations (template.py; schedule_1x.py's 500 is overridden), MultiStepLR x 0.1 at
    epochs 8 and 11; evaluation and a checkpoint every epoch (default_runtime.py: all kept).
  batch: 2 per GPU (template.py) on 8 GPUs (the README: "all the models are training with 8 GPUs
    by default"; tools/dist_train.sh takes the count), 16 in all; auto_scale_lr off (base 16).
  weights: the backbone's `pretrained='your_model_path'` (a placeholder; its load_pretrained reads
    the checkpoint's "model" entry with strict=False, drops a class-token position, and on any
    error prints and goes on from random weights); load_from None. The README lists the trained
    models as not yet released, and gives no COCO results.

Ours, not the reference's: an epoch is the train split's 118,287 images // 16 = 7392 steps
(the stream drops the 1,021 filtered images but the step count is the split's: about 0.9% more
steps than mmdet's 7330 per epoch), so the milestones fall at steps 59,136 and 81,312 of 88,704.
Checkpoints every epoch, the last 2 kept plus the best by eval_bbox_map. Evaluation batches of 8
(mmdet: 1 per GPU on 8).

Run (COCO prepared by `python -m shufflemamba_jax.prepare --dataset=coco --manual_dir=...`
first; the classifier from configs/imagenet.py or `python -m shufflemamba_jax.convert`):

  python -m shufflemamba_jax.main --config=configs/coco.py:shufflemamba_base --workdir=DIR \\
      --config.init_from=CLASSIFIER_WORKDIR --config.data_dir=TFDS_DIR

Expected result: not measured here (no COCO run has been made with this code, and the reference
publishes none). init_from must be set on the command line: a detector trained from a random
backbone is not the recipe (the reference's placeholder path silently is one).
"""

from shufflemamba_jax.training import config_files

# variant: (drop path rate, deformable attention heads, interaction_indexes ends), each from the
# variant's reference config (the table above). Width and depth are the variant's own.
_RECIPES = {
  "shufflemamba_base": (0.3, 12, (5, 11, 17, 23)),
  "shufflemamba_middle": (0.4, 12, (7, 15, 23, 31)),
  "shufflemamba_large": (0.5, 16, (11, 23, 35, 47)),
}
TRAIN_IMAGES = 118_287  # The coco builder's train split (every image; coco_instance.py's ann_file).
BATCH_SIZE = 16  # 8 GPUs x 2 (template.py, README).


def get_config(arg: str | None = None):
  """`arg` = a variant of _RECIPES (default shufflemamba_base)."""
  variant = (arg or "shufflemamba_base").strip()
  if variant not in _RECIPES:
    raise ValueError(f"configs/coco.py: unknown variant {variant!r}; choose one of {tuple(_RECIPES)}.")
  drop_path, heads, out_indices = _RECIPES[variant]
  config = config_files.get_config(config_files.sibling(__file__, "detection.py"))
  config.dataset = "coco"
  config.batch_size = BATCH_SIZE
  config.eval_batch_size = 8  # mmdet: 1 per GPU on 8.
  config.num_epochs = 12  # schedule_1x.py / template.py max_epochs.
  config.total_steps = None  # The trainer derives it: 12 x 7392.
  config.log_every_steps = 50  # default_runtime.py's LoggerHook interval.
  epoch_steps = TRAIN_IMAGES // BATCH_SIZE  # 7392, as the trainer counts an epoch.
  config.eval_every_steps = epoch_steps  # val_interval=1 (epochs).
  config.checkpoint_every_steps = epoch_steps  # CheckpointHook interval=1 (epochs).
  config.keep_checkpoints = 2  # Ours (mmdet keeps all).
  config.best_metric = "eval_bbox_map"
  config.shuffle_buffer = 4096  # Ours: examples carry their PNG masks.

  config.model.variant = variant  # embed_dim and depth: the variant's (the table above).
  config.model.patch_size = 16
  config.model.norm = "layernorm"  # rms_norm=False.
  config.model.drop_path_rate = drop_path
  config.model.dtype = "float32"  # OptimWrapper, no AmpOptimWrapper.
  config.model.slws.max_prob = 0.0  # shuffle_rate=0.; the adapter refuses SLWS.

  config.det.out_indices = out_indices  # The interaction_indexes stretches' last blocks.
  config.det.pos_embed_size = 224  # img_size=(224, 224), pretrain_size 224.
  config.det.adapter.conv_inplane = 64
  config.det.adapter.n_points = 4
  config.det.adapter.deform_num_heads = heads
  config.det.adapter.deform_ratio = 0.5
  config.det.adapter.cffn_ratio = 0.25
  config.det.adapter.init_values = 0.0  # Mamba_Adapter's init_values_inject default.
  config.det.adapter.add_mamba_feature = True
  config.det.adapter.use_extra_extractor = True

  config.lr = 1e-4
  config.b1, config.b2 = 0.9, 0.999
  config.eps = 1e-8  # torch.optim.AdamW's default.
  config.weight_decay = 0.05
  config.grad_clip = None
  config.ema_decay = 0.0
  config.det.layer_decay = 0.9  # layer_decay_rate; num_layers = the depth.
  config.det.warmup_steps = 1000  # template.py's LinearLR end (schedule_1x.py: 500).
  config.det.warmup_factor = 0.001
  config.det.lr_epochs = (8, 11)
  config.det.lr_decay = 0.1
  # Workdir of the ImageNet classifier of the same variant; must be set on the command line.
  config.init_from = None
  return config

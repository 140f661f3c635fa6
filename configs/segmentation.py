"""Shared defaults of the semantic segmentation configs (UperNet on a Vim / ShuffleMamba backbone).

Not a runnable experiment by itself: `configs/ade20k.py` and `configs/digits_seg.py` start from
`get_config()` here. It is configs/default.py (run, model, optimizer and mesh fields keep their
meaning there) plus two blocks, `seg` (the segmenter and its schedule) and `seg_aug` (the
label-map augmentation), with the values of the reference recipe
(`upernet_shufflemamba_8xb2-160k_ade20k-512x512_*`). What segmentation does not use of
default.py: the classification augmentation (`aug.*` other than mean and std; mixup, cutmix and
random erasing must be 0, repeated_aug 1), warmup_epochs, warmup_lr, min_lr and grad_accum_steps
(must be 1).
"""

import ml_collections
from ml_collections import config_dict

from shufflemamba_jax.training import config_files


def get_config():
  """Returns the locked ConfigDict: default.py's fields plus `seg` and `seg_aug`."""
  config = config_files.get_config(config_files.sibling(__file__, "default.py"))
  config.unlock()
  config.dataset = "ade20k"
  config.image_size = 512  # The backbone's grid: must equal seg_aug.crop_size.
  config.best_metric = "eval_miou"  # "eval_miou" | "eval_macc" | "eval_aacc" | "ema_eval_*".
  config.lr_scale_batch = False  # The learning rate is the peak itself.
  config.aug.mixup_alpha = 0.0
  config.aug.cutmix_alpha = 0.0
  config.aug.random_erasing_prob = 0.0
  config.aug.repeated_aug = 1  # default.py's 3 (DeiT) would repeat each example 3 times in a batch.

  # ---- Segmenter and schedule (shufflemamba_jax.models.upernet, training.trainer) ------------
  config.seg = ml_collections.ConfigDict()
  # Blocks whose outputs feed the heads; None = the last of each quarter of the depth ([5, 11,
  # 17, 23] for depth 24). Each is the block's mixer output; the last block's is norm_f(residual
  # + output), as in the reference backbone.
  config.seg.out_indices = config_dict.placeholder(tuple)
  # Image size (pixels, square) of the backbone's stored position table: the pretraining
  # resolution (224: 14x14 for 16-pixel patches), resized on every call to the grid seen.
  config.seg.pos_embed_size = 224
  # "none" (the reference): the four patch-grid maps go straight to the heads; "simple_pyramid"
  # (opt-in, not the reference): BEiT's 4x / 2x / 1x / 1/2x deconvolution pyramid first.
  config.seg.neck = "none"
  # The ViT-Adapter backbone (shufflemamba_jax.models.adapter, the reference's *_adapter.py
  # configs): off = the plain backbone above. Its stretches of blocks end at out_indices; its four
  # maps sit at strides 4, 8, 16, 32; images and eval_crop must be multiples of 32; patch_size 16.
  config.seg.adapter = ml_collections.ConfigDict()
  config.seg.adapter.enabled = False
  config.seg.adapter.conv_inplane = 64  # Spatial prior module width (c1; c2 2x, c3 and c4 4x).
  config.seg.adapter.n_points = 4  # Deformable attention: points per head and level,
  config.seg.adapter.deform_num_heads = 12  # heads (base and middle 12, large 16),
  config.seg.adapter.deform_ratio = 0.5  # and value width as a fraction of the embedding width.
  config.seg.adapter.init_values = 0.0  # The Injectors' gamma at initialization.
  config.seg.adapter.cffn_ratio = 0.25  # ConvFFN hidden width as a fraction of the embedding width.
  config.seg.adapter.add_mamba_feature = True  # Add each stretch's token map to its output level.
  config.seg.adapter.use_extra_extractor = True  # Two extra Extractors after the last stretch.
  config.seg.adapter.norm_momentum = 0.9  # Its BatchNorms (Flax's convention: PyTorch's 0.1).
  config.seg.adapter.norm_eps = 1e-5
  config.seg.channels = 512  # UperNet decode head width.
  config.seg.pool_scales = (1, 2, 3, 6)  # Pyramid pooling bins on the coarsest level.
  config.seg.dropout = 0.1  # Channel dropout before the classifiers.
  config.seg.aux_channels = 256  # FCN auxiliary head width.
  config.seg.aux_level = 3  # Map the auxiliary head reads (the reference's in_index=3).
  config.seg.aux_weight = 0.4  # Loss weight of the auxiliary head.
  # Per-class loss weights of both heads (mmseg's CrossEntropyLoss class_weight), one per class;
  # None = all 1, as in the ADE20K recipe.
  config.seg.class_weight = config_dict.placeholder(tuple)
  # Learning rate: linear from warmup_factor x lr over warmup_steps, then poly(power) to 0 at the
  # last step (mmseg's LinearLR + PolyLR).
  config.seg.warmup_steps = 1500
  config.seg.warmup_factor = 1e-6
  config.seg.poly_power = 1.0
  # Layer-wise learning-rate decay (BEiT's LayerDecayOptimizerConstructor, as the reference's
  # detection recipes): block i's rate x layer_decay**(depth - i), the embeddings' **(depth + 1),
  # the rest x 1, and its own weight-decay rule (only 1-D parameters and biases are spared) in
  # place of the custom_keys above. 0 = off, as every ADE20K recipe (commented out there).
  config.seg.layer_decay = 0.0
  # Evaluation (mmseg's test_cfg): sliding windows of eval_crop (height, width) every eval_stride,
  # clamped to the image (a side under the crop gives a smaller window), overlaps averaged;
  # eval_crop None = the whole image in one pass. Logits are then resized to the original size
  # and scored against the original label map.
  # Typed references, so that a config setting None (whole mode) still takes a pair on the
  # command line (--config.seg.eval_crop="(32, 32)").
  config.seg.eval_crop = config_dict.FieldReference((512, 512), field_type=tuple)
  config.seg.eval_stride = config_dict.FieldReference((341, 341), field_type=tuple)
  # Test-time augmentation (mmseg's tta_pipeline + SegTTAModel): True = the original image resized
  # by each ratio 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 (of its own size, keeping the ratio), each with
  # and without a horizontal flip; the 12 softmaxes, flipped back and resized to the original
  # size, are averaged. False = one view at seg_aug.eval_scale.
  config.seg.tta = False

  # ---- Label-map augmentation (shufflemamba_jax.data.segment_augment) ------------------------
  config.seg_aug = ml_collections.ConfigDict()
  config.seg_aug.scale = (2048, 512)  # (long, short) side before the random ratio.
  config.seg_aug.ratio_range = (0.5, 2.0)
  config.seg_aug.crop_size = 512  # Training crop (square); padded with label 255 if smaller.
  config.seg_aug.cat_max_ratio = 0.75  # Largest share of one class in a crop (10 tries).
  config.seg_aug.hflip_prob = 0.5
  config.seg_aug.photometric = True  # Brightness, contrast, saturation and hue distortion.
  # Evaluation: the image resized to fit eval_scale (long, short) keeping its ratio, never padded
  # (mmseg's test pipeline `Resize(scale=(2048, 512), keep_ratio=True)`); images are evaluated
  # one by one at their own sizes (same-sized neighbours together, up to eval_batch_size).
  config.seg_aug.eval_scale = (2048, 512)
  config.lock()
  return config

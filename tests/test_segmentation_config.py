"""Segmentation configs: every ADE20K variant and the embedded default build their Settings, and
bad segmentation values raise a SettingError naming the config field. Also the COCO detection
configs' values (parsed only: nothing of the detection task is built here)."""

import os

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import shufflemamba_jax as smj
from shufflemamba_jax.models import SettingError, upernet
from shufflemamba_jax.training import config_files, trainer

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
ADE20K_VARIANTS = ("shufflemamba_base", "shufflemamba_reg_large", "shufflemamba_middle", "shufflemamba_large")


def _parse(config, *args):
  """Parses a command line like main's (locked config) with fresh flags; returns the config."""
  argv = ["prog", f"--config={os.path.join(CONFIGS, config)}", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("variant", ADE20K_VARIANTS)
def test_ade20k_variant_builds_the_reference_recipe(variant):
  config = _parse(f"ade20k.py:{variant}")
  settings = trainer.Settings.from_config(config)
  segmenter = settings.task.segmenter
  assert segmenter.backbone.img_size == 512 and segmenter.backbone.slws_max_prob == 0.0
  assert segmenter.resolved_out_indices == upernet.default_out_indices(segmenter.backbone.depth)
  assert (segmenter.channels, segmenter.aux_channels, segmenter.pool_scales) == (512, 256, (1, 2, 3, 6))
  assert settings.optimizer.lr == (3e-5 if "large" in variant else 6e-5)
  assert (settings.optimizer.b1, settings.optimizer.b2, settings.optimizer.weight_decay) == (0.9, 0.999, 0.01)
  assert not settings.optimizer.lr_scale_batch
  assert config.batch_size == 16 and config.total_steps == 160_000
  drop_path, grad_clip = {
    "shufflemamba_base": (0.2, None),
    "shufflemamba_middle": (0.3, None),
    "shufflemamba_large": (0.2, 3.0),
    "shufflemamba_reg_large": (0.3, 5.0),
  }[variant]
  assert segmenter.backbone.drop_path_rate == drop_path and settings.optimizer.grad_clip == grad_clip
  # The reference configs' backbones: float32, LayerNorm but for reg_large, the large one 40 deep.
  depth, norm = {
    "shufflemamba_base": (24, "layernorm"),
    "shufflemamba_middle": (32, "layernorm"),
    "shufflemamba_large": (40, "layernorm"),
    "shufflemamba_reg_large": (48, "rmsnorm"),
  }[variant]
  assert (segmenter.backbone.depth, segmenter.backbone.norm, segmenter.backbone.dtype) == (depth, norm, "float32")
  assert (segmenter.neck, segmenter.pos_grid) == ("none", (14, 14))
  assert config.aug.repeated_aug == 1  # Every example of a batch is a different image.
  seg = settings.task
  assert (seg.warmup_steps, seg.warmup_factor, seg.poly_power, seg.aux_weight) == (1500, 1e-6, 1.0, 0.4)
  assert (seg.eval_crop, seg.eval_stride) == ((512, 512), (341, 341))
  _, schedule = seg.optimizer(
    settings.optimizer, batch_size=config.batch_size, epoch_steps=1, total_steps=config.total_steps
  )
  assert float(schedule(0)) == pytest.approx(settings.optimizer.lr * 1e-6)
  assert float(schedule(1500)) == pytest.approx(settings.optimizer.lr)
  assert float(schedule(160_000)) == 0.0
  assert config.best_metric == "eval_miou"


def test_digits_seg_config_builds():
  settings = trainer.Settings.from_config(_parse("digits_seg.py"))
  assert settings.task.segmenter.backbone.patch_size == 4
  assert settings.task.class_weight == (1.0,) * 10 + (0.1,)  # Background (10) weighs less.
  settings.task.check_data(11, "digits_seg")


def test_class_weight_is_one_weight_per_class():
  """None (the ADE20K recipe) weighs every class 1; a count that is not the dataset's number of
  classes is a SettingError naming the field, the count and the dataset."""
  assert trainer.Settings.from_config(_parse("ade20k.py:shufflemamba_base")).task.class_weight is None
  settings = trainer.Settings.from_config(_parse("digits_seg.py", "--config.seg.class_weight=(1.0,2.0)"))
  assert settings.task.class_weight == (1.0, 2.0)
  with pytest.raises(SettingError, match=r"config\.seg\.class_weight.*each of the 11 classes of digits_seg"):
    settings.task.check_data(11, "digits_seg")


@pytest.mark.parametrize(
  "field, value, words",
  [
    ("seg.channels", 0, "config.seg.channels"),
    ("seg.out_indices", (0, 1, 2, 9), "config.seg.out_indices"),
    ("seg.aux_level", 4, "config.seg.aux_level"),
    ("seg.warmup_factor", 2.0, "config.seg.warmup_factor"),
    ("seg.eval_crop", (3, 3), "config.seg.eval_crop"),  # Smaller than a 4-pixel patch.
    ("seg.neck", "fpn", "config.seg.neck"),
    ("seg.pos_embed_size", 30, "config.seg.pos_embed_size"),  # Not a whole number of 4-pixel patches.
    ("image_size", 64, "config.image_size"),  # Not the training crop (32).
    ("aug.mixup_alpha", 0.8, "config.aug.mixup_alpha"),
    ("grad_accum_steps", 2, "config.grad_accum_steps"),
    ("aug.repeated_aug", 3, "config.aug.repeated_aug"),
    ("best_metric", "eval_top1", "config.best_metric"),
    ("seg_aug.crop_size", 0, "config.seg_aug.crop_size"),
    ("seg.class_weight", (1.0, -0.5), "config.seg.class_weight"),
    ("seg.class_weight", (), "config.seg.class_weight"),
  ],
)
def test_bad_segmentation_values_name_their_field(field, value, words):
  config = _parse("digits_seg.py")
  node, _, name = field.rpartition(".")
  (config[node] if node else config)[name] = value
  with pytest.raises(SettingError, match=words.replace(".", r"\.")):
    trainer.Settings.from_config(config)


def test_classification_rejects_segmentation_metrics():
  config = _parse("digits.py", "--config.best_metric=eval_miou")
  with pytest.raises(SettingError, match=r"config\.best_metric"):
    trainer.Settings.from_config(config)


def test_whole_mode_configs_take_windows_on_the_command_line():
  """digits_seg evaluates whole canvases (eval_crop None); the field still takes a pair."""
  assert _parse("digits_seg.py").seg.eval_crop is None
  config = _parse("digits_seg.py", "--config.seg.eval_crop=(32, 32)", "--config.seg.eval_stride=(16, 16)")
  settings = trainer.Settings.from_config(config)
  assert (settings.task.eval_crop, settings.task.eval_stride) == ((32, 32), (16, 16))


# The reference's detection/configs/shufflemamba/mask_rcnn_shufflemamba_reg_fpn_coco_{variant}_adapter.py:
# embed_dim, depth, drop_path_rate, deform_num_heads, interaction_indexes ends (= out_indices), and
# paramwise_cfg num_layers (the depth).
COCO_OFFICIAL = {
  "shufflemamba_base": (768, 24, 0.3, 12, (5, 11, 17, 23)),
  "shufflemamba_middle": (576, 32, 0.4, 12, (7, 15, 23, 31)),
  "shufflemamba_large": (1024, 48, 0.5, 16, (11, 23, 35, 47)),
}


@pytest.mark.parametrize("variant", tuple(COCO_OFFICIAL))
def test_coco_variant_is_the_reference_config(variant):
  config = _parse(f"coco.py:{variant}")
  embed_dim, depth, drop_path, heads, out_indices = COCO_OFFICIAL[variant]
  # The backbone (the variant file): width and depth through the variant, LayerNorm (rms_norm=False),
  # patch 16, shuffle_rate 0, float32 (OptimWrapper, not AmpOptimWrapper).
  model = config.model
  assert smj.VARIANTS[model.variant]["embed_dim"] == embed_dim and smj.VARIANTS[model.variant]["depth"] == depth
  assert model.embed_dim is None and model.depth is None
  assert (model.patch_size, model.norm, model.drop_path_rate, model.dtype) == (16, "layernorm", drop_path, "float32")
  assert model.slws.max_prob == 0.0
  assert config.det.out_indices == out_indices and config.det.pos_embed_size == 224
  adapter = config.det.adapter
  assert (adapter.conv_inplane, adapter.n_points, adapter.deform_num_heads) == (64, 4, heads)
  assert (adapter.deform_ratio, adapter.cffn_ratio, adapter.init_values) == (0.5, 0.25, 0.0)
  assert adapter.add_mamba_feature and adapter.use_extra_extractor
  # The optimizer (the variant file): AdamW, layer decay 0.9; no clipping.
  assert (config.lr, config.b1, config.b2, config.eps, config.weight_decay) == (1e-4, 0.9, 0.999, 1e-8, 0.05)
  assert not config.lr_scale_batch and config.grad_clip is None and config.ema_decay == 0.0
  assert config.det.layer_decay == 0.9
  # The schedule (template.py over schedule_1x.py): 12 epochs, LinearLR(0.001, end=1000), MultiStepLR.
  assert (config.num_epochs, config.total_steps) == (12, None)
  assert (config.det.warmup_steps, config.det.warmup_factor) == (1000, 0.001)
  assert (config.det.lr_epochs, config.det.lr_decay) == ((8, 11), 0.1)
  # 8 GPUs x 2 (template.py, README); evaluation and checkpoints every epoch of 118,287 // 16 steps.
  assert config.batch_size == 16 and config.eval_batch_size == 8
  assert config.eval_every_steps == config.checkpoint_every_steps == 7392
  assert config.best_metric == "eval_bbox_map" and config.init_from is None
  assert (config.dataset, config.task) == ("coco", "detection")
  assert (config.train_split, config.eval_split) == ("train", "validation")
  # The detector (mask-rcnn_r50_fpn.py, FPN norm from the variant file) and the data (coco_instance.py).
  det = config.det
  assert (det.fpn_channels, det.fpn_norm, det.fc_channels, det.mask_channels) == (256, True, 1024, 256)
  assert (det.anchor_scales, det.anchor_ratios) == ((8.0,), (0.5, 1.0, 2.0))
  assert (det.rpn_pos_iou, det.rpn_neg_iou, det.rpn_min_pos_iou, det.rpn_num, det.rpn_pos_fraction) == (
    0.7, 0.3, 0.3, 256, 0.5
  )  # fmt: skip
  assert (det.rpn_nms_pre, det.rpn_max_proposals, det.rpn_nms_iou) == (2000, 1000, 0.7)
  assert (det.rcnn_pos_iou, det.rcnn_neg_iou, det.rcnn_min_pos_iou, det.rcnn_num, det.rcnn_pos_fraction) == (
    0.5, 0.5, 0.5, 512, 0.25
  )  # fmt: skip
  assert (det.roi_sampling_ratio, det.mask_size) == (0, 28)
  assert (det.test_nms_pre, det.test_max_proposals, det.test_score_thr, det.test_nms_iou) == (1000, 1000, 0.05, 0.5)
  assert det.test_max_detections == 100
  assert (config.det_aug.scale, config.det_aug.hflip_prob) == ((1333, 800), 0.5)
  np.testing.assert_allclose(np.array(config.aug.mean) * 255, [123.675, 116.28, 103.53], rtol=1e-6)
  np.testing.assert_allclose(np.array(config.aug.std) * 255, [58.395, 57.12, 57.375], rtol=1e-6)
  assert (config.aug.mixup_alpha, config.aug.cutmix_alpha, config.aug.random_erasing_prob) == (0.0, 0.0, 0.0)
  assert config.aug.repeated_aug == 1


def test_coco_config_takes_command_line_overrides():
  config = _parse(
    "coco.py:shufflemamba_middle",
    "--config.init_from=/tmp/classifier",
    "--config.lr=2e-4",
    "--config.det.layer_decay=0.8",
    "--config.det.lr_epochs=(16, 22)",
    "--config.det.adapter.deform_num_heads=6",
    "--config.model.dtype=bfloat16",
    "--config.total_steps=100",
  )
  assert config.init_from == "/tmp/classifier" and config.lr == 2e-4 and config.det.layer_decay == 0.8
  assert config.det.lr_epochs == (16, 22) and config.det.adapter.deform_num_heads == 6
  assert config.model.dtype == "bfloat16" and config.total_steps == 100
  assert config.model.drop_path_rate == 0.4  # The rest is the variant's.
  with pytest.raises(AttributeError):
    _parse("coco.py:shufflemamba_base", "--config.det.layer_decay_rate=0.8")  # Locked: no new fields.
  with pytest.raises(ValueError, match="unknown variant 'shufflemamba_reg_large'"):
    config_files.get_config(os.path.join(CONFIGS, "coco.py"), "shufflemamba_reg_large")

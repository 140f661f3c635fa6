"""The embedded detection default: a small Mask R-CNN on a ShuffleMamba ViT-Adapter, on digits.

  python -m shufflemamba_jax.main --config=configs/digits_det.py --workdir=/tmp/digits_det

Measured (2026-12-06 12:22 UTC, seed 0, the 2-core CPU machine, the dataset built by the run in a
fresh --config.data_dir, `/usr/bin/time -v`): on the 400 validation canvases box AP50 0.839 (AP
0.527) and mask AP50 0.706 (AP 0.372) after 2000 steps, 9 min 36 s wall time from start to exit
(building the dataset, compilation and the final evaluation included; about 0.25 s per step, 17 s
for the evaluation). The same run with nothing else touching the cores took 8 min 56 s, with the
same numbers (a run is deterministic given its seed). The goal is box AP50 >= 0.80 and mask AP50
>= 0.70 within 10 minutes. EXPERIMENTS.md has the runs that led here.

The digits_det set (2000 train / 400 validation 64x64 canvases of 2-5 of scikit-learn's digits at
12-40 pixels, overlapping, each instance's box and mask its visible strokes; 10 classes; built on
first use, no download) is trained and evaluated on whole canvases (no resize, no flip: mirrored
digits are other digits). The backbone is the adapter on a width-48, depth-4 Vim (16-pixel
patches: a 4x4 token grid, the spatial prior module's maps at strides 4 to 32 carry the detail),
with narrow FPN and heads; anchors of 4 x stride (16 pixels at P2: 8 x stride would not reach the
smallest digits); fewer proposals, RoIs and detections than COCO's, for canvases with at most 5
instances.
"""

from shufflemamba_jax.training import config_files


def get_config(arg: str | None = None):
  """The digits_det config; `arg` is unused (kept for a uniform `file.py:arg` interface)."""
  del arg
  config = config_files.get_config(config_files.sibling(__file__, "detection.py"))
  config.dataset = "digits_det"
  config.image_size = 96  # The canvas side the backbone sees (det_aug.canvas).
  config.shuffle_buffer = 2000  # The whole train split.
  config.seed = 0

  config.batch_size = 8
  config.eval_batch_size = 200  # Two batches of the 400 validation canvases.
  config.num_epochs = 0  # total_steps decides.
  config.total_steps = 2000  # 8 epochs of the 2000 training canvases.
  config.log_every_steps = 100
  config.eval_every_steps = 2000  # Once, at the end: an evaluation costs about 20 s.
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.best_metric = "eval_bbox_map_50"

  config.model.variant = "shufflemamba_tiny"
  config.model.patch_size = 16
  config.model.embed_dim = 48
  config.model.depth = 4
  config.model.d_state = 8
  config.model.dtype = "float32"  # bfloat16 is emulated (slow) on CPUs.
  config.model.scan_method = "sequential"
  config.model.remat = False
  config.model.drop_path_rate = 0.0
  config.model.slws.max_prob = 0.0  # The adapter never shuffles.

  config.det.adapter.conv_inplane = 16
  config.det.adapter.deform_num_heads = 6
  config.det.adapter.use_extra_extractor = False
  config.det.pos_embed_size = 96  # Trained from scratch at 96 px: the table is the 6x6 grid itself.
  config.det.fpn_channels = 32
  config.det.fc_channels = 128
  config.det.mask_channels = 32
  config.det.anchor_scales = (4.0,)
  config.det.rpn_num = 128
  config.det.rpn_nms_pre = 500
  config.det.rpn_max_proposals = 100
  config.det.rcnn_num = 32
  config.det.max_mask_rois = 8
  config.det.roi_sampling_ratio = 2
  config.det.test_nms_pre = 500
  config.det.test_max_proposals = 100
  config.det.test_max_detections = 20
  config.det.test_pre_nms_top_k = 512
  config.det.warmup_steps = 100
  config.det.warmup_factor = 0.01
  config.det.lr_epochs = (7,)  # 250 steps an epoch: x0.1 for the last 250 steps.
  config.det.layer_decay = 0.0  # From scratch: no pretrained blocks to protect.

  # Each 64x64 canvas resized to 96x96 (mmdet's keep-ratio Resize, bilinear): the smallest digits'
  # strokes are 1-2 pixels wide, and the mask head sees them through stride-4 features (EXPERIMENTS.md).
  config.det_aug.scale = (96, 96)
  config.det_aug.canvas = (96, 96)
  config.det_aug.hflip_prob = 0.0
  config.det_aug.max_gt = 8
  config.det_aug.crop_size = 28

  config.lr = 1e-3
  config.weight_decay = 0.05
  config.grad_clip = 5.0
  return config

"""Shared defaults of the detection configs (Mask R-CNN on a ShuffleMamba ViT-Adapter backbone).

Not a runnable experiment by itself: `configs/coco.py` and `configs/digits_det.py` start from
`get_config()` here. It is configs/default.py (run, model, optimizer and mesh fields keep their
meaning there) plus two blocks, `det` (the detector and its schedule) and `det_aug` (the
detection pipeline), with the values of mmdet 3.3.0's Mask R-CNN 1x
(`configs/_base_/models/mask-rcnn_r50_fpn.py`, `schedules/schedule_1x.py`,
`datasets/coco_instance.py`) as the reference's `detection/configs/shufflemamba/*_adapter.py`
configs use it. What detection does not use of default.py: the classification augmentation
(`aug.*` other than mean and std; mixup, cutmix and random erasing must be 0, repeated_aug 1),
warmup_epochs, warmup_lr, min_lr, image_size (the canvas is det_aug.canvas) and
grad_accum_steps (must be 1).
"""

import ml_collections
from ml_collections import config_dict

from shufflemamba_jax.training import config_files


def get_config():
  """Returns the locked ConfigDict: default.py's fields plus `det` and `det_aug`."""
  config = config_files.get_config(config_files.sibling(__file__, "default.py"))
  config.unlock()
  config.dataset = "coco"
  config.task = "detection"
  config.best_metric = "eval_bbox_map"  # "eval_bbox_map" | "eval_segm_map" | "eval_bbox_map_50" | ...
  config.lr_scale_batch = False  # The learning rate is the peak itself.
  config.aug.mixup_alpha = 0.0
  config.aug.cutmix_alpha = 0.0
  config.aug.random_erasing_prob = 0.0
  config.aug.repeated_aug = 1

  # ---- Detector (shufflemamba_jax.models.detection.mask_rcnn.MaskRCNNConfig) -----------------
  config.det = ml_collections.ConfigDict()
  # The backbone is always the ViT-Adapter (patch_size 16, SLWS off): config.model gives its Vim,
  # these its adapter (see configs/segmentation.py's seg.adapter for each field).
  config.det.adapter = ml_collections.ConfigDict()
  config.det.adapter.conv_inplane = 64
  config.det.adapter.n_points = 4
  config.det.adapter.deform_num_heads = 12
  config.det.adapter.deform_ratio = 0.5
  config.det.adapter.init_values = 0.0
  config.det.adapter.cffn_ratio = 0.25
  config.det.adapter.add_mamba_feature = True
  config.det.adapter.use_extra_extractor = True
  config.det.adapter.norm_momentum = 0.9
  config.det.adapter.norm_eps = 1e-5
  # The adapter's stretches end at these blocks; None = the last of each quarter of the depth.
  config.det.out_indices = config_dict.placeholder(tuple)
  config.det.pos_embed_size = 224  # The pretraining image size of the backbone's position table.
  # The rest are MaskRCNNConfig's fields, named as mmdet's config (rpn_*: train_cfg.rpn and
  # rpn_proposal; rcnn_*: train_cfg.rcnn; test_*: test_cfg), with mask-rcnn_r50_fpn.py's values.
  config.det.fpn_channels = 256
  config.det.fpn_norm = True  # SyncBN in the FPN convs (the shufflemamba configs' norm_cfg).
  config.det.fc_channels = 1024
  config.det.mask_channels = 256
  config.det.anchor_scales = (8.0,)
  config.det.anchor_ratios = (0.5, 1.0, 2.0)
  config.det.rpn_pos_iou = 0.7
  config.det.rpn_neg_iou = 0.3
  config.det.rpn_min_pos_iou = 0.3
  config.det.rpn_num = 256
  config.det.rpn_pos_fraction = 0.5
  config.det.rpn_nms_pre = 2000
  config.det.rpn_max_proposals = 1000
  config.det.rpn_nms_iou = 0.7
  config.det.rcnn_pos_iou = 0.5
  config.det.rcnn_neg_iou = 0.5
  config.det.rcnn_min_pos_iou = 0.5
  config.det.rcnn_num = 512
  config.det.rcnn_pos_fraction = 0.25
  config.det.max_mask_rois = 128  # Positives that get a mask loss per image (at most 512 x 0.25 exist).
  config.det.roi_sampling_ratio = 0  # RoIAlign samples per bin; 0 = adaptive (mmdet's).
  config.det.mask_size = 28
  config.det.test_nms_pre = 1000
  config.det.test_max_proposals = 1000
  config.det.test_score_thr = 0.05
  config.det.test_nms_iou = 0.5
  config.det.test_max_detections = 100
  # Static shapes: the per-class test NMS sees this many best (RoI, class) candidates (mmdet: all
  # above test_score_thr; README says what it changes).
  config.det.test_pre_nms_top_k = 4096
  # Learning rate (schedule_1x.py): linear from warmup_factor x lr over warmup_steps iterations,
  # then x lr_decay at each epoch of lr_epochs (mmengine's LinearLR + MultiStepLR, by epoch).
  config.det.warmup_steps = 1000
  config.det.warmup_factor = 0.001
  config.det.lr_epochs = (8, 11)
  config.det.lr_decay = 0.1
  # Layer-wise learning-rate decay (the reference's LayerDecayOptimizerConstructor, 0 = off):
  # block i's rate x layer_decay**(depth - i), the embeddings' **(depth + 1), the rest x 1.
  config.det.layer_decay = 0.9

  # ---- Pipeline (shufflemamba_jax.data.detect_augment.DetectionAugmentation) -----------------
  config.det_aug = ml_collections.ConfigDict()
  config.det_aug.scale = (1333, 800)  # Resize keeping the ratio to fit (long, short) sides.
  # Every image on one (height, width) canvas, multiples of 32, true size carried along (mmdet
  # pads each batch to its largest image instead; README).
  config.det_aug.canvas = (1344, 1344)
  config.det_aug.hflip_prob = 0.5
  config.det_aug.max_gt = 100  # Ground truth padded (or cut, crowds first) to this many per image.
  config.det_aug.crop_size = 112  # Instance masks as box crops of this side (mask targets: README).
  config.lock()
  return config

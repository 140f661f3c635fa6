"""Mask R-CNN (mmdet 3.3.0's `mask-rcnn_r50_fpn` 1x) in JAX with static shapes, for TPU.

Every shape is fixed at trace time: ground truth padded to a fixed count with a validity mask,
fixed proposal, RoI and detection counts, random sampling as top-k of keyed random scores.
"""

"""Input: tf.data pipelines over TFDS (`imagenet2012`, the embedded `digits`) delivering uint8
batches, the DeiT augmentations in TensorFlow ops on the host (`augment`), normalization and
random erasing in jnp on the device (`device`), and dataset preparation. Imports TensorFlow
lazily: this file holds only the constants that configs and the predict command share with the
pipeline."""

# Per-channel normalization of [0, 1] RGB pixels (the ImageNet statistics every recipe uses).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The label of pixels that count for nothing (outside the classes, padding): mmseg's ignore_index.
IGNORE_INDEX = 255

"""UperNet semantic segmentation on a Vim / ShuffleMamba backbone, as a Flax NNX module.

The reference (huangzizheng01/ShuffleMamba: `models_openmm.py::Backbone_VideoMamba` and the
`upernet_*_8xb2-160k_ade20k-512x512_*` configs, `neck=None`): the backbone scans patch tokens only
(no cls token, no registers), with the pretraining position table (14x14 for 224 px) resized on
every call to the grid it sees, bicubic as torch computes it. At each `out_indices` block but the
last, the map is that block's mixer output (no residual added, no norm); at the last block of the
stack it is `norm_f(residual + drop_path(hidden))`. The four maps stay at the patch grid (1/16 of
the image) and go straight into the UperNet decode head (pyramid pooling on the last, then an
FPN); an FCN auxiliary head reads the fourth (`in_index=3`). The BEiT-style simple pyramid (1/4 to
1/32) is kept as an opt-in `neck="simple_pyramid"`; the reference has none. BatchNorm uses the
plain statistics of the batch it sees: under `jit` with a sharded batch that is the whole global
batch, i.e. PyTorch's SyncBatchNorm. Convolution weights follow mmcv's ConvModule init (Kaiming
normal, fan out), the classifiers mmseg's (normal 0.01); other layers keep Flax's defaults.

`slide_inference` is the evaluation-time tiling of large images into overlapping crops.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.models import tokens
from shufflemamba_jax.models.adapter import AdapterConfig, VimAdapter
from shufflemamba_jax.models.vim import DTYPES, VisionMamba, VisionMambaConfig

NUM_LEVELS = 4
NECKS = ("none", "simple_pyramid")


def default_out_indices(depth: int) -> tuple[int, ...]:
  """Blocks read by the pyramid: the last of each quarter, [5, 11, 17, 23] for depth 24."""
  return tuple(round((level + 1) * depth / NUM_LEVELS) - 1 for level in range(NUM_LEVELS))


@dataclasses.dataclass(frozen=True)
class UperNetConfig:
  """Every setting of a `UperNet` segmenter; a bad value raises a SettingError naming it.

  `backbone` is the VisionMambaConfig of the backbone (its num_classes, token_layout and
  num_registers are unused: the backbone scans patches only); `pos_embed_size` is the image size
  (pixels, square) of the stored position table, the pretraining resolution (224: a 14x14 table
  for 16-pixel patches), resized on every call to the grid seen; `out_indices` None means
  `default_out_indices(backbone.depth)`; `neck` "none" (the reference) feeds the four patch-grid
  maps to the heads, "simple_pyramid" turns them into 4x, 2x, 1x and 1/2x the grid first;
  `aux_level` is the map (0-3) the auxiliary head reads, 3 as in the reference (`in_index=3`);
  `adapter` set makes the backbone the ViT-Adapter (`models.adapter`, the reference's
  `*_adapter.py` configs), whose four maps sit at strides 4 to 32 and whose stretches of blocks
  end at `out_indices`.
  """

  backbone: VisionMambaConfig
  num_classes: int = 150
  pos_embed_size: int = 224
  neck: str = "none"
  out_indices: tuple[int, ...] | None = None
  channels: int = 512
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  dropout: float = 0.1
  aux_channels: int = 256
  aux_level: int = 3
  norm_momentum: float = 0.9  # Flax's convention: PyTorch's BatchNorm momentum 0.1.
  norm_eps: float = 1e-5
  adapter: AdapterConfig | None = None

  def __post_init__(self):
    if not isinstance(self.backbone, VisionMambaConfig):
      raise checks.SettingError("backbone", self.backbone, "must be a VisionMambaConfig")
    for name in ("num_classes", "channels", "aux_channels", "pos_embed_size"):
      checks.integer(name, getattr(self, name))
    if self.pos_embed_size % self.backbone.patch_size:
      raise checks.SettingError(
        "pos_embed_size", self.pos_embed_size, f"must be divisible by patch_size {self.backbone.patch_size}"
      )
    checks.one_of("neck", self.neck, NECKS)
    indices = self.resolved_out_indices
    depth = self.backbone.depth
    if (
      len(indices) != NUM_LEVELS
      or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in indices)
      or list(indices) != sorted(set(indices))
      or indices[0] < 0
      or indices[-1] >= depth
    ):
      raise checks.SettingError(
        "out_indices", self.out_indices, f"must be {NUM_LEVELS} increasing block indices in [0, {depth})"
      )
    if not self.pool_scales:
      raise checks.SettingError("pool_scales", self.pool_scales, "must name at least one scale")
    for scale in self.pool_scales:
      checks.integer("pool_scales", scale)
    checks.number("dropout", self.dropout, 0.0, 1.0, high_open=True)
    checks.integer("aux_level", self.aux_level, minimum=0)
    if self.aux_level >= NUM_LEVELS:
      raise checks.SettingError("aux_level", self.aux_level, f"must be a pyramid level in [0, {NUM_LEVELS})")
    checks.number("norm_momentum", self.norm_momentum, 0.0, 1.0)
    checks.number("norm_eps", self.norm_eps, 0.0)
    if self.adapter is not None:
      if not isinstance(self.adapter, AdapterConfig):
        raise checks.SettingError("adapter", self.adapter, "must be an AdapterConfig or None")
      if self.neck != "none":
        raise checks.SettingError("neck", self.neck, "must be 'none' with the adapter (its maps are multi-scale)")
      self.adapter.check_backbone(self.backbone, indices)
    if self.neck == "simple_pyramid" and self.backbone.patch_size % 4:
      # The simple pyramid upsamples the patch grid 4x for its finest level.
      raise checks.SettingError("patch_size", self.backbone.patch_size, "the simple pyramid needs a multiple of 4")

  @property
  def pos_grid(self) -> tuple[int, int]:
    """The stored position table's patch grid, (rows, columns)."""
    return (self.pos_embed_size // self.backbone.patch_size,) * 2

  @property
  def resolved_out_indices(self) -> tuple[int, ...]:
    if self.out_indices is None:
      return default_out_indices(self.backbone.depth)
    return tuple(self.out_indices)


def _kaiming_fan_out():
  # mmcv's ConvModule init: kaiming_normal_(mode="fan_out", nonlinearity="relu"); JAX truncates at 2 sigma.
  return nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvNormReLU(nnx.Module):
  """mmcv's ConvModule: conv (no bias) -> BatchNorm -> ReLU, 'same' padding, (B, H, W, C_in) -> C_out."""

  def __init__(self, in_features: int, out_features: int, kernel: int, config: UperNetConfig, *, rngs: nnx.Rngs):
    dtype = DTYPES[config.backbone.dtype]
    param_dtype = DTYPES[config.backbone.param_dtype]
    self.conv = nnx.Conv(
      in_features,
      out_features,
      kernel_size=(kernel, kernel),
      padding="SAME",
      use_bias=False,
      kernel_init=_kaiming_fan_out(),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.norm = _batch_norm(out_features, config, rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return jax.nn.relu(self.norm(self.conv(x), use_running_average=not train)).astype(self.conv.dtype)


def _batch_norm(features: int, config: UperNetConfig, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # Statistics in float32 whatever the compute dtype.
  return nnx.BatchNorm(
    features,
    momentum=config.norm_momentum,
    epsilon=config.norm_eps,
    dtype=jnp.float32,
    param_dtype=DTYPES[config.backbone.param_dtype],
    rngs=rngs,
  )


def _classifier(in_features: int, config: UperNetConfig, rngs: nnx.Rngs) -> nnx.Conv:
  """mmseg's conv_seg: a 1x1 conv with bias to num_classes, normal(0.01) init, float32 logits."""
  return nnx.Conv(
    in_features,
    config.num_classes,
    kernel_size=(1, 1),
    kernel_init=nnx.initializers.normal(0.01),
    dtype=jnp.float32,
    param_dtype=DTYPES[config.backbone.param_dtype],
    rngs=rngs,
  )


def _adaptive_pool_matrix(length: int, bins: int) -> np.ndarray:
  """(bins, length) averaging weights of PyTorch's adaptive average pooling along one axis."""
  matrix = np.zeros((bins, length), np.float32)
  for i in range(bins):
    start, end = (i * length) // bins, math.ceil((i + 1) * length / bins)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_average_pool(x: jax.Array, bins: int) -> jax.Array:
  """PyTorch's AdaptiveAvgPool2d(bins) on (batch, H, W, C) -> (batch, bins, bins, C), float32."""
  rows = jnp.asarray(_adaptive_pool_matrix(x.shape[1], bins))
  cols = jnp.asarray(_adaptive_pool_matrix(x.shape[2], bins))
  return jnp.einsum("ih,bhwc,jw->bijc", rows, x.astype(jnp.float32), cols)


class SimplePyramid(nnx.Module):
  """Four patch-grid maps (batch, h, w, D) -> maps of 4x, 2x, 1x and 1/2x the grid, D channels.

  With 16-pixel patches: 1/16 maps to 1/4, 1/8, 1/16 and 1/32 of the image (ViT / BEiT UperNet).

  1/4: transposed conv (stride 2) -> BatchNorm -> GELU -> transposed conv (stride 2); 1/8: one
  transposed conv; 1/16: identity; 1/32: 2x2 max pool.
  """

  def __init__(self, config: UperNetConfig, *, rngs: nnx.Rngs):
    dim = config.backbone.embed_dim
    kwargs = dict(
      kernel_size=(2, 2),
      strides=(2, 2),
      padding="VALID",
      dtype=DTYPES[config.backbone.dtype],
      param_dtype=DTYPES[config.backbone.param_dtype],
      rngs=rngs,
    )
    self.up4_first = nnx.ConvTranspose(dim, dim, **kwargs)
    self.up4_norm = _batch_norm(dim, config, rngs)
    self.up4_second = nnx.ConvTranspose(dim, dim, **kwargs)
    self.up8 = nnx.ConvTranspose(dim, dim, **kwargs)

  def __call__(self, maps: list[jax.Array], train: bool) -> list[jax.Array]:
    dtype = self.up8.dtype
    quarter = self.up4_norm(self.up4_first(maps[0]), use_running_average=not train)
    quarter = self.up4_second(jax.nn.gelu(quarter, approximate=False).astype(dtype))
    eighth = self.up8(maps[1])
    thirty_second = nnx.max_pool(maps[3], window_shape=(2, 2), strides=(2, 2))
    return [quarter, eighth, maps[2], thirty_second]


class UperHead(nnx.Module):
  """mmseg's UPerHead: pyramid pooling on the last level, lateral 1x1 convs, a top-down FPN,
  3x3 convs, all levels upsampled to the first and fused; then dropout and the classifier.

  Levels (batch, h_i, w_i, D) -> logits (batch, h_0, w_0, num_classes) float32.
  """

  def __init__(self, config: UperNetConfig, *, rngs: nnx.Rngs):
    dim, channels = config.backbone.embed_dim, config.channels
    self.config = config
    # Named attributes, not lists: parameter names stay dotted strings (`decode_head.pool6.conv.kernel`).
    for scale in config.pool_scales:
      setattr(self, f"pool{scale}", ConvNormReLU(dim, channels, 1, config, rngs=rngs))
    self.pool_bottleneck = ConvNormReLU(dim + len(config.pool_scales) * channels, channels, 3, config, rngs=rngs)
    for level in range(NUM_LEVELS - 1):
      setattr(self, f"lateral{level}", ConvNormReLU(dim, channels, 1, config, rngs=rngs))
      setattr(self, f"fpn{level}", ConvNormReLU(channels, channels, 3, config, rngs=rngs))
    self.fpn_bottleneck = ConvNormReLU(NUM_LEVELS * channels, channels, 3, config, rngs=rngs)
    # PyTorch's Dropout2d: whole channels of a sample; the key comes at call time (None = eval), so no RngStream state.
    self.dropout = nnx.Dropout(config.dropout, broadcast_dims=(1, 2))
    self.classifier = _classifier(channels, config, rngs)

  def __call__(self, levels: list[jax.Array], *, train: bool, key: jax.Array | None) -> jax.Array:
    last = levels[-1]
    size = last.shape[1:3]
    pooled = [
      tokens.resize_bilinear(
        getattr(self, f"pool{scale}")(adaptive_average_pool(last, scale).astype(last.dtype), train), size
      )
      for scale in self.config.pool_scales
    ]
    laterals = [getattr(self, f"lateral{i}")(level, train) for i, level in enumerate(levels[:-1])]
    laterals.append(self.pool_bottleneck(jnp.concatenate([last, *pooled], axis=-1), train))
    for i in range(NUM_LEVELS - 1, 0, -1):  # Top-down: each level adds the coarser one, upsampled.
      laterals[i - 1] = laterals[i - 1] + tokens.resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outputs = [getattr(self, f"fpn{i}")(lateral, train) for i, lateral in enumerate(laterals[:-1])] + [laterals[-1]]
    finest = outputs[0].shape[1:3]
    fused = self.fpn_bottleneck(jnp.concatenate([tokens.resize_bilinear(x, finest) for x in outputs], axis=-1), train)
    return self.classifier(self.dropout(fused, deterministic=key is None, rngs=key))


class FCNHead(nnx.Module):
  """mmseg's FCNHead with one conv: 3x3 ConvModule -> dropout -> classifier, (batch, h, w, D) -> logits."""

  def __init__(self, config: UperNetConfig, *, rngs: nnx.Rngs):
    self.conv = ConvNormReLU(config.backbone.embed_dim, config.aux_channels, 3, config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout, broadcast_dims=(1, 2))  # As UperHead's.
    self.classifier = _classifier(config.aux_channels, config, rngs)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None) -> jax.Array:
    return self.classifier(self.dropout(self.conv(x, train), deterministic=key is None, rngs=key))


class UperNet(nnx.Module):
  """A Vim / ShuffleMamba backbone (patch tokens only), a UperNet decode head and an FCN
  auxiliary head, as the reference builds them (optionally with the simple-pyramid neck).

  `model(images)` with images (batch, H, W, 3), any float dtype and any size of at least one
  patch (the patch convolution floors, as the reference's does: a 500-pixel side gives 31
  patches), returns float32 logits (batch, H // p, W // p, num_classes), p the patch size (4x
  finer with the simple pyramid); `segment_logits` resizes them to the image.
  `model.forward(images, train=True, key=k)` returns (logits, auxiliary logits) with drop path,
  dropout and batch statistics on (the running statistics update in place). Parameters live
  under `backbone` (named as in the classifier, so classification checkpoints load into it; its
  `pos_embed` is the patch-only (pos_grid rows x columns, D) table), `pyramid` (opt-in),
  `decode_head` and `aux_head`.
  """

  def __init__(self, config: UperNetConfig, *, rngs: nnx.Rngs):
    self.config = config
    if config.adapter is not None:
      self.backbone = VimAdapter(
        config.backbone, config.adapter, pos_grid=config.pos_grid, out_indices=config.resolved_out_indices, rngs=rngs
      )
    else:
      self.backbone = VisionMamba(config.backbone, rngs=rngs)
      self.backbone.strip_to_patches(config.pos_grid, rngs)
    if config.neck == "simple_pyramid":
      self.pyramid = SimplePyramid(config, rngs=rngs)
    self.decode_head = UperHead(config, rngs=rngs)
    self.aux_head = FCNHead(config, rngs=rngs)

  def features(self, images: jax.Array, *, train: bool = False, key: jax.Array | None = None) -> list[jax.Array]:
    """The four backbone maps, 4 x (batch, H // p, W // p, D) float32, as the reference reads them.

    At an `out_indices` block before the last of the stack: the block's mixer output (no
    residual, no norm); at the last block: `norm_f(residual + drop_path(mixer output))`.
    """
    if self.config.adapter is not None:
      return self.backbone(images, train=train, key=key)
    depth = self.config.backbone.depth
    sequence, grid = self.backbone.embed_patches(images, self.config.pos_grid)
    stops = tuple(index + 1 for index in self.config.resolved_out_indices)
    streams = self.backbone.run_layers(sequence, stops, train=train, key=key)
    maps = []
    for stop, (hidden, residual) in zip(stops, streams):
      tapped = self.backbone.final_norm(hidden, residual, train=train, key=key) if stop == depth else hidden
      maps.append(tapped.astype(jnp.float32).reshape(tapped.shape[0], *grid, tapped.shape[-1]))
    return maps

  def _levels(self, images: jax.Array, train: bool, key: jax.Array | None) -> list[jax.Array]:
    dtype = DTYPES[self.config.backbone.dtype]
    maps = [x.astype(dtype) for x in self.features(images, train=train, key=key)]
    if self.config.neck == "simple_pyramid":
      stride = 2 * self.config.backbone.patch_size  # The coarsest level's.
      if images.shape[1] % stride or images.shape[2] % stride:
        raise ValueError(
          f"image size {images.shape[1]}x{images.shape[2]} is not a multiple of {stride}, which the simple "
          "pyramid's 1/2-grid level needs"
        )
      return self.pyramid(maps, train)
    return maps

  def forward(
    self, images: jax.Array, *, train: bool = False, key: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """(decode head logits, auxiliary head logits at map `aux_level`), both float32."""
    if train and key is None:
      raise ValueError("training mode needs a PRNG key: model.forward(images, train=True, key=...)")
    backbone_key = jax.random.fold_in(key, 0) if train else None
    levels = self._levels(images, train, backbone_key)
    decode_key = jax.random.fold_in(key, 1) if train else None
    aux_key = jax.random.fold_in(key, 2) if train else None
    logits = self.decode_head(levels, train=train, key=decode_key)
    aux_logits = self.aux_head(levels[self.config.aux_level], train=train, key=aux_key)
    return logits, aux_logits

  def __call__(self, images: jax.Array) -> jax.Array:
    """Evaluation logits (batch, H // p, W // p, num_classes) float32; the auxiliary head is skipped."""
    return self.decode_head(self._levels(images, False, None), train=False, key=None)


def segment_logits(model: UperNet, images: jax.Array) -> jax.Array:
  """Whole-image inference: logits (batch, H, W, num_classes) float32 at the images' resolution.

  `model(images)` gives logits on a coarser grid (the patch grid's, floored for a side that is not
  a multiple of the patch size, as the official patch convolution does); they are resized
  bilinearly (align_corners=False) to the full (H, W), as mmseg's `encode_decode` resizes to the
  window's own size.
  """
  return tokens.resize_bilinear(model(images), images.shape[1:3])


def window_starts(length: int, crop: int, stride: int) -> list[int]:
  """Start offsets of mmseg's sliding windows along one axis, in its loop order.

  A transcription of EncoderDecoder.slide_inference: grids = max(length - crop + stride - 1, 0)
  // stride + 1; window i ends at min(i * stride + crop, length) and starts `crop` before that
  end, clamped at 0. Every window is min(crop, length) long; the last one ends flush with the end.
  """
  count = max(length - crop + stride - 1, 0) // stride + 1
  return [max(min(i * stride + crop, length) - crop, 0) for i in range(count)]


def window_boxes(
  size: tuple[int, int], crop_size: tuple[int, int] | None, stride: tuple[int, int] | None
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
  """((window height, window width), [(top, left), ...]) of mmseg's slide mode over an image of
  `size` (height, width), rows outer and columns inner as its loop; the windows are clamped to the
  image (a side under the crop gives a smaller window). crop_size None ("whole" mode) is one
  window, the image itself; stride None is the crop."""
  height, width = size
  if crop_size is None:
    return (height, width), [(0, 0)]
  stride = stride or crop_size
  tops = window_starts(height, crop_size[0], stride[0])
  lefts = window_starts(width, crop_size[1], stride[1])
  return (min(crop_size[0], height), min(crop_size[1], width)), [(top, left) for top in tops for left in lefts]


def cut_windows(images, window: tuple[int, int], starts: list[tuple[int, int]]):
  """(batch, H, W, ...) -> (len(starts) * batch, *window, ...): window-major (all images' first
  window, then all their second, ...); numpy or JAX arrays."""
  stack = np.concatenate if isinstance(images, np.ndarray) else jnp.concatenate
  return stack([images[:, top : top + window[0], left : left + window[1]] for top, left in starts], axis=0)


def merge_windows(
  window_logits: jax.Array, size: tuple[int, int], window: tuple[int, int], starts: list[tuple[int, int]]
) -> jax.Array:
  """mmseg's slide merge: window logits (len(starts) * batch, *window, C) in `cut_windows` order,
  summed into place on a (batch, *size, C) float32 canvas and divided by each pixel's window count."""
  num_classes = window_logits.shape[-1]
  per_window = window_logits.astype(jnp.float32).reshape(len(starts), -1, *window, num_classes)
  total = jnp.zeros((per_window.shape[1], *size, num_classes), jnp.float32)
  count = np.zeros(size, np.float32)
  for index, (top, left) in enumerate(starts):
    total = total.at[:, top : top + window[0], left : left + window[1]].add(per_window[index])
    count[top : top + window[0], left : left + window[1]] += 1
  return total / jnp.asarray(count)[None, :, :, None]


def slide_inference(
  logits_fn: Callable[[jax.Array], jax.Array],
  images: jax.Array,
  *,
  crop_size: tuple[int, int],
  stride: tuple[int, int],
  num_classes: int,
) -> jax.Array:
  """Sliding-window inference (mmseg's `slide_inference`): logits averaged where windows overlap.

  Args:
    logits_fn: (n, h, w, 3) -> (n, h, w, num_classes) logits at the input resolution (e.g.
      `functools.partial(segment_logits, model)`); called once on every window of every image,
      stacked on the batch axis.
    images: (batch, H, W, 3). Sizes are static: windows are fixed slices (`window_boxes`).
    crop_size, stride: (height, width) of the windows and of their steps; a side shorter than
      the crop gives windows of that side.

  Returns:
    (batch, H, W, num_classes) float32.
  """
  size = tuple(images.shape[1:3])
  window, starts = window_boxes(size, crop_size, stride)
  window_logits = logits_fn(cut_windows(images, window, starts))
  if window_logits.shape[-1] != num_classes:
    raise ValueError(f"logits_fn gave {window_logits.shape[-1]} classes, not num_classes={num_classes}")
  return merge_windows(window_logits, size, window, starts)


@nnx.jit(static_argnums=0)
def _build(config: UperNetConfig, rngs: nnx.Rngs) -> UperNet:
  return UperNet(config, rngs=rngs)


def create_segmenter(config: UperNetConfig, *, rngs: nnx.Rngs) -> UperNet:
  """Builds a `UperNet` in one compiled initializer (like `create_model`)."""
  return _build(config, rngs)

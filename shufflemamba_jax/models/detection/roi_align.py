"""RoIAlign (torchvision / mmcv, `aligned=True`, average pooling) and mmdet's multi-level RoI extractor,
with static shapes for TPU.

The reference semantics are the C++/CUDA kernels of `torchvision.ops.roi_align` and mmcv's `RoIAlign`
(`pool_mode="avg"`): box corners times `spatial_scale`, minus 0.5 when `aligned`; each of the
`out_h x out_w` bins averages a `grid_h x grid_w` grid of bilinear samples (`grid = sampling_ratio`, or
adaptively `ceil(roi_size / out_size)` per axis); a sample with y < -1, y > H, x < -1 or x > W is 0,
coordinates below 0 read row/column 0 and those at or past the last pixel read the last one.

Design: separable weights and two matrix products, no gathers. A sample's bilinear weight on pixel
(h, w) is `a(y, h) * a(x, w)` with `a(t, k) = max(0, 1 - |clip(t, 0, L - 1) - k|)`, and its
out-of-map test is `valid(y) * valid(x)`; the bin average divides by `grid_h * grid_w`. So the whole
RoIAlign of RoI r factors exactly into a row matrix and a column matrix, each summing its samples:

  Wy[r, i, h] = sum_s valid(y_ris) a(y_ris, h) / grid_h,   Wx[r, j, w] likewise,
  out[r, i, j, c] = sum_h sum_w Wy[r, i, h] Wx[r, j, w] F[h, w, c]

computed as `T = Wy @ F` over rows (one (R * out_h, H) x (H, W * C) product on the MXU), then a small
batched product with Wx (or columns first when that intermediate is smaller). Trade-off: the first
product costs 2 R out_h H W C FLOPs (every RoI against the whole map) and its intermediate holds
R out_h W C float32 values, where a gather kernel reads only R out_h out_w grid^2 4 C values. XLA's
cost analysis of `multi_level_roi_align` on a 1344x800 canvas, C = 256, float32, per image: box head
(R = 512, out 7) 169 GFLOP forward, 338 with the backward, 2.1 GB of temporaries; mask head (R = 128,
out 14) 87 / 174 GFLOP, 1.1 GB; bf16 features with split weights (below) twice the FLOPs in bf16
passes and 1.65 times the temporaries. But the gather form's cost grows with the adaptive grid (a
whole-width box on P2 needs 48 x 48 samples per bin), so exact adaptive sampling is only affordable
here, where the samples cost R out H grid elementwise operations to build the weights and nothing in
the products; and TPUs run dense products far better than large gathers. If the intermediate's
memory matters, RoIs can go through the products in chunks (`lax.map`) at the same FLOPs.

Adaptive sampling (`sampling_ratio=0`) with static shapes: every RoI evaluates `max_samples` sample
slots per bin and axis, those past its own `ceil(roi_size / out_size)` weighted 0, divided by its own
count. The one approximation: an axis needing more than `max_samples` is sampled with `max_samples`
evenly spaced points instead (as if `sampling_ratio` were `max_samples` on that axis). The default,
`ceil(H / out_h)` rows and `ceil(W / out_w)` columns, is exact for every box inside the feature map's
extent (roi size <= H in feature pixels), so only boxes reaching past the map are approximated.
`ceil(roi_size / out_size)` is computed exactly (XLA turns the division by a constant into a product
with its rounded reciprocal, which puts a RoI of exactly k * out pixels at k + 1 samples).

Rounding: a sample exactly on the -1 or H (W) edge of the zero rule is decided by the last bit of its
position, as it is between torchvision's own CPU and CUDA kernels (FMA contraction); boxes clipped to
the image, as mmdet's proposals and targets are, never reach those edges.

Coordinates and weights are float32 (float64 for float64 features). Low-precision features (bf16)
enter the big product in their own dtype with the weights split into a bf16 high part and a bf16 low
part (two MXU passes, weights kept to ~16 bits), accumulated in float32; float32 features use
`Precision.HIGHEST`. Outputs have the features' dtype. Boxes get no gradient (as in torchvision and
mmcv); features get the exact gradient of this linear map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from shufflemamba_jax import checks

_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(setting: str, value) -> tuple[int, int]:
  """An int or an (h, w) pair of ints >= 1 as (h, w)."""
  if isinstance(value, (int,)) and not isinstance(value, bool):
    value = (value, value)
  return checks.size_pair(setting, value)


def _coordinate_dtype(features: jax.Array):
  """float32, or float64 for float64 features (the float64 tests check the exact semantics)."""
  return jnp.float64 if features.dtype == jnp.float64 else jnp.float32


def _ceil_div(size: jax.Array, out: int) -> jax.Array:
  """ceil(size / out) exactly, as a float.

  XLA compiles `size / out` as `size * (1 / out)` (and TPUs divide approximately), so a RoI of exactly
  k * out pixels, common with integer boxes (a 56-pixel box on P2 is 14 = 2 * 7), would get
  ceil(k + 1 ulp) = k + 1 samples. k * out and (k - 1) * out are exact products of small integers.
  """
  grid = jnp.ceil(size / out)
  grid = jnp.where((grid - 1.0) * out >= size, grid - 1.0, grid)
  return jnp.where(grid * out < size, grid + 1.0, grid)


def _axis_weights(
  start: jax.Array, size: jax.Array, out: int, length: int, sampling_ratio: int, max_samples: int
) -> jax.Array:
  """The (..., out, length) interpolation weights of one axis: bins, samples, validity and average.

  start, size: (...,) the RoI's first coordinate and extent along the axis, in feature pixels.
  """
  dtype = start.dtype
  bin_size = size / out
  if sampling_ratio > 0:
    slots = sampling_ratio
    grid = jnp.full_like(size, sampling_ratio)
  else:
    slots = max_samples
    # Beyond `max_samples` the axis is sampled with `max_samples` points: the documented approximation.
    grid = jnp.minimum(_ceil_div(size, out), max_samples)
  divisor = jnp.maximum(grid, 1.0)  # a RoI with no samples (grid <= 0) pools to 0, as in the kernels
  bins = jnp.arange(out, dtype=dtype)[:, None]  # (out, 1)
  slot = jnp.arange(slots, dtype=dtype)  # (slots,)
  # The kernels' order of operations: start + bin * bin_size + (slot + 0.5) * bin_size / grid.
  t = (
    start[..., None, None]
    + bins * bin_size[..., None, None]
    + (slot + 0.5) * bin_size[..., None, None] / divisor[..., None, None]
  )  # (..., out, slots)
  used = (slot < grid[..., None, None]) & (t >= -1.0) & (t <= length)
  t = jnp.clip(t, 0.0, length - 1)
  pixel = jnp.arange(length, dtype=dtype)
  tent = jnp.maximum(0.0, 1.0 - jnp.abs(t[..., None] - pixel))  # (..., out, slots, length)
  weights = jnp.sum(jnp.where(used[..., None], tent, 0.0), axis=-2)
  return weights / divisor[..., None, None]


def _roi_weights(
  boxes: jax.Array,
  height: int,
  width: int,
  output_size: tuple[int, int],
  spatial_scale: float,
  sampling_ratio: int,
  aligned: bool,
  max_samples: tuple[int, int],
) -> tuple[jax.Array, jax.Array]:
  """Row weights (N, R, out_h, H) and column weights (N, R, out_w, W) of boxes (N, R, 4) in x1y1x2y2."""
  offset = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = (boxes[..., k] * spatial_scale - offset for k in range(4))
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:  # the legacy mode forces malformed RoIs to 1x1
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
  wy = _axis_weights(y1, roi_h, output_size[0], height, sampling_ratio, max_samples[0])
  wx = _axis_weights(x1, roi_w, output_size[1], width, sampling_ratio, max_samples[1])
  return wy, wx


def _pool(features: jax.Array, wy: jax.Array, wx: jax.Array, split_weights: bool = True) -> jax.Array:
  """sum_h sum_w wy[n, r, i, h] wx[n, r, j, w] features[n, h, w, c] in float32: (N, R, out_h, out_w, C)."""
  _, height, width, _ = features.shape
  out_h, out_w = wy.shape[-2], wx.shape[-2]
  rows_first = out_h * width <= out_w * height  # the smaller intermediate
  first, second = (wy, wx) if rows_first else (wx, wy)
  spec = "nrih,nhwc->nriwc" if rows_first else "nrjw,nhwc->nrjhc"
  if features.dtype in (jnp.float32, jnp.float64):
    partial = jnp.einsum(spec, first, features, precision=_HIGHEST)
  elif not split_weights:
    partial = jnp.einsum(spec, first.astype(features.dtype), features, preferred_element_type=jnp.float32)
  else:
    # Low-precision features: weights as high + low parts in the features' dtype, one product of both.
    high = first.astype(features.dtype)
    low = (first - high.astype(first.dtype)).astype(features.dtype)
    both = jnp.einsum(spec, jnp.concatenate([high, low], 2), features, preferred_element_type=jnp.float32)
    partial = both[:, :, : first.shape[2]] + both[:, :, first.shape[2] :]
  if rows_first:
    return jnp.einsum("nrjw,nriwc->nrijc", second.astype(partial.dtype), partial, precision=_HIGHEST)
  return jnp.einsum("nrih,nrjhc->nrijc", second.astype(partial.dtype), partial, precision=_HIGHEST)


def _check_inputs(features: jax.Array, boxes: jax.Array, setting: str = "features") -> None:
  if features.ndim != 4:
    raise ValueError(f"{setting} must be (N, H, W, C), got shape {features.shape}")
  if not jnp.issubdtype(features.dtype, jnp.floating):
    raise ValueError(f"{setting} must be floating, got {features.dtype}")
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
    raise ValueError(f"boxes must be (N={features.shape[0]}, R, 4) x1y1x2y2, got shape {boxes.shape}")


def _max_samples(max_samples, height: int, width: int, output_size: tuple[int, int]) -> tuple[int, int]:
  """The sample slots per bin along (rows, columns): exact for boxes within the map by default."""
  if max_samples is None:
    return math.ceil(height / output_size[0]), math.ceil(width / output_size[1])
  return _pair("max_samples", max_samples)


def _sampling_ratio(sampling_ratio) -> int:
  if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
    raise checks.SettingError("sampling_ratio", sampling_ratio, "must be an int (> 0 fixed, <= 0 adaptive)")
  return max(sampling_ratio, 0)


def roi_align(
  features: jax.Array,
  boxes: jax.Array,
  output_size: int | tuple[int, int],
  *,
  spatial_scale: float,
  sampling_ratio: int,
  aligned: bool = True,
  max_samples: int | tuple[int, int] | None = None,
  split_weights: bool = True,
) -> jax.Array:
  """RoIAlign with average pooling, equal to `torchvision.ops.roi_align` (and mmcv's `RoIAlign`).

  features: (N, H, W, C) channels last, any float dtype; boxes: (N, R, 4) x1y1x2y2 in the input image's
  pixels, a fixed count R per image (the form of the Mask R-CNN's sampled RoIs; a batch index as
  torchvision's (K, 5) rois carry is implied by the leading axis). One image may also be given as
  features (H, W, C) with boxes (R, 4). Returns (N, R, out_h, out_w, C) (or (R, out_h, out_w, C)) in
  the features' dtype. `spatial_scale` maps box pixels to feature pixels (1 / stride);
  `sampling_ratio` > 0 samples that many points per bin and axis, <= 0 adaptively
  `ceil(roi / out)` of them, at most `max_samples` (rows, columns; an int for both; default
  `ceil(H / out_h)`, `ceil(W / out_w)`, exact for every box within the map). `split_weights`
  (low-precision features only): True multiplies them by the weights' bf16 high and low parts (two
  MXU passes, weights exact to ~2^-17), False by the weights rounded to the features' dtype (one
  pass, half the FLOPs and intermediate memory, ~2^-9 relative error per weight). All arguments but
  `features` and `boxes` are static.
  """
  if features.ndim == 3 and boxes.ndim == 2:
    return roi_align(
      features[None],
      boxes[None],
      output_size,
      spatial_scale=spatial_scale,
      sampling_ratio=sampling_ratio,
      aligned=aligned,
      max_samples=max_samples,
      split_weights=split_weights,
    )[0]
  _check_inputs(features, boxes)
  output_size = _pair("output_size", output_size)
  spatial_scale = checks.number("spatial_scale", spatial_scale, 0.0)
  if spatial_scale == 0.0:
    raise checks.SettingError("spatial_scale", spatial_scale, "must be > 0")
  sampling_ratio = _sampling_ratio(sampling_ratio)
  _, height, width, _ = features.shape
  slots = _max_samples(max_samples, height, width, output_size)
  boxes = jax.lax.stop_gradient(boxes.astype(_coordinate_dtype(features)))
  wy, wx = _roi_weights(boxes, height, width, output_size, spatial_scale, sampling_ratio, aligned, slots)
  return _pool(features, wy, wx, split_weights).astype(features.dtype)


def map_roi_levels(boxes: jax.Array, num_levels: int, finest_scale: float = 56) -> jax.Array:
  """mmdet's `SingleRoIExtractor.map_roi_levels`: the FPN level (int32, boxes' leading shape) of each box.

  boxes: (..., 4) x1y1x2y2 (mmdet's rois (K, 5) less their batch-index column). With scale =
  sqrt(w * h), level = floor(log2(scale / finest_scale + 1e-6)) clipped to [0, num_levels - 1]: below
  2 * finest_scale level 0, below 4 * finest_scale level 1, and so on. Computed in float32; a box of
  negative area (mmdet: NaN, undefined level) maps to level 0.
  """
  num_levels = checks.integer("num_levels", num_levels)
  finest_scale = checks.number("finest_scale", finest_scale, 0.0)
  if boxes.shape[-1:] != (4,):
    raise ValueError(f"boxes must be (..., 4) x1y1x2y2, got shape {boxes.shape}")
  boxes = boxes.astype(jnp.promote_types(boxes.dtype, jnp.float32))
  area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  scale = jnp.sqrt(jnp.maximum(area, 0.0))
  level = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
  return jnp.clip(level, 0, num_levels - 1).astype(jnp.int32)


def multi_level_roi_align(
  feature_levels: Sequence[jax.Array],
  boxes: jax.Array,
  output_size: int | tuple[int, int],
  strides: Sequence[int],
  sampling_ratio: int = 0,
  *,
  finest_scale: float = 56,
  aligned: bool = True,
  max_samples: int | tuple[int, int] | None = None,
  valid: jax.Array | None = None,
  split_weights: bool = True,
) -> jax.Array:
  """mmdet's `SingleRoIExtractor` forward: each RoI aligned on the FPN level `map_roi_levels` picks.

  feature_levels: L maps (N, H_l, W_l, C), finest first, with `strides` (e.g. [4, 8, 16, 32]; the
  level's `spatial_scale` is 1 / stride); boxes: (N, R, 4) x1y1x2y2 image pixels; valid: optional
  (N, R) bool, False RoIs pool to zeros. Returns (N, R, out_h, out_w, C) in the features' dtype.
  mask R-CNN: output 7 (box head) or 14 (mask head), sampling_ratio 0, aligned, finest_scale 56.
  `max_samples` (see `roi_align`) defaults per level to `ceil(H_l / out_h)`, `ceil(W_l / out_w)`:
  on a 1344x1344 canvas 48, 24, 12, 6 on P2-P5 at out 7 (24, 12, 6, 3 at 14). The level rule does not
  lower them: it bounds the area, and a 1344x9 box (scale 110) goes to P2. `split_weights` as in
  `roi_align`.

  Static shapes: every RoI is aligned on every level with its weights zeroed on all but its own (and
  on all for invalid RoIs), and the levels' float32 results are summed. That is not L times the work
  of one level: the products cost R out H_l W_l C, so all four FPN levels together cost 1.33 times
  the finest one alone, which RoIs of any size may land on. Picking the level by a mask of the
  weights needs no gather or select of the (L, N, R, out, out, C) results, and sends each RoI's
  gradient to its level only.
  """
  if isinstance(feature_levels, jax.Array) or not len(feature_levels):
    raise ValueError("feature_levels must be a non-empty sequence of (N, H_l, W_l, C) maps")
  strides = tuple(checks.integer("strides", s) for s in strides)
  if len(strides) != len(feature_levels):
    raise checks.SettingError("strides", strides, f"must give one stride per level ({len(feature_levels)})")
  for k, level in enumerate(feature_levels):
    _check_inputs(level, boxes, f"feature_levels[{k}]")
  first = feature_levels[0]
  if any(f.shape[::3] != first.shape[::3] or f.dtype != first.dtype for f in feature_levels):
    raise ValueError(f"feature_levels must share N, C and dtype, got {[(f.shape, f.dtype) for f in feature_levels]}")
  if valid is not None and valid.shape != boxes.shape[:2]:
    raise ValueError(f"valid must be (N, R) = {boxes.shape[:2]}, got shape {valid.shape}")
  output_size = _pair("output_size", output_size)
  sampling_ratio = _sampling_ratio(sampling_ratio)
  boxes = jax.lax.stop_gradient(boxes.astype(_coordinate_dtype(first)))
  levels = map_roi_levels(boxes, len(feature_levels), finest_scale)
  total = None
  for k, (features, stride) in enumerate(zip(feature_levels, strides, strict=True)):
    _, height, width, _ = features.shape
    slots = _max_samples(max_samples, height, width, output_size)
    wy, wx = _roi_weights(boxes, height, width, output_size, 1.0 / stride, sampling_ratio, aligned, slots)
    chosen = levels == k if valid is None else (levels == k) & valid
    pooled = _pool(features, jnp.where(chosen[..., None, None], wy, 0.0), wx, split_weights)
    total = pooled if total is None else total + pooled
  return total.astype(first.dtype)

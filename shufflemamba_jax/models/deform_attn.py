"""Multi-scale deformable attention (Deformable DETR), the op and its Flax NNX module.

The reference: Deformable DETR's `ms_deform_attn_core_pytorch` (bilinear `grid_sample` of every
feature level, zero padding, `align_corners=False`, weighted by the attention) and `MSDeformAttn`
with ViT-Adapter's `ratio` (the value width is `int(d_model * ratio)`), which the official
ShuffleMamba detection adapter's Injector and Extractor use. Parameter names mirror the official
module so that weights map one to one (`<name>.weight` (out, in) <-> `<name>.kernel` (in, out)).

Written for TPU: the levels are flattened and stacked along one axis, so every sample of every
level, point and bilinear corner is read by ONE gather (indices clamped into their level, corners
outside it weighted zero) and summed by one weighted contraction; all shapes are static.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shufflemamba_jax import checks

# The four bilinear neighbours of a sample, (row, column) offsets from its top-left one.
_CORNER_DY = np.array([False, False, True, True])
_CORNER_DX = np.array([False, True, False, True])


def _spatial_shapes(
  spatial_shapes, length: int | None = None, levels: int | None = None
) -> tuple[tuple[int, int], ...]:
  """`spatial_shapes` as a tuple of static (H, W) pairs, checked against the value length and level count."""
  if isinstance(spatial_shapes, (str, bytes)) or not hasattr(spatial_shapes, "__len__") or not len(spatial_shapes):
    raise checks.SettingError("spatial_shapes", spatial_shapes, "must be a sequence of (H, W) pairs of Python ints")
  shapes = tuple(checks.size_pair("spatial_shapes", pair) for pair in spatial_shapes)
  if levels is not None and len(shapes) != levels:
    raise checks.SettingError("spatial_shapes", shapes, f"must give {levels} levels, one per level of the sampling")
  if length is not None and sum(h * w for h, w in shapes) != length:
    raise checks.SettingError(
      "spatial_shapes", shapes, f"its levels hold {sum(h * w for h, w in shapes)} positions, the value has {length}"
    )
  return shapes


def ms_deform_attn(
  value: jax.Array,
  spatial_shapes: Sequence[tuple[int, int]],
  sampling_locations: jax.Array,
  attention_weights: jax.Array,
) -> jax.Array:
  """Attention-weighted sum of bilinear samples of multi-level feature maps.

  value: (N, S, M, D), the levels flattened row-major and stacked in order, S = sum of H_l * W_l;
  spatial_shapes: the L static (H_l, W_l) pairs (Python ints); sampling_locations:
  (N, Lq, M, L, P, 2), normalised (x, y), [0, 1] spanning each map's outer pixel edges (points may
  fall outside); attention_weights: (N, Lq, M, L, P). Returns (N, Lq, M * D).

  Each sample is `grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`: pixel
  coordinates x = loc_x * W - 0.5, y = loc_y * H - 0.5, the four integer neighbours weighted
  bilinearly, neighbours outside the map contributing zero. Math in the promoted dtype of the
  inputs: bfloat16 locations lose sub-pixel precision on large maps (MSDeformAttn uses float32).
  """
  if value.ndim != 4:
    raise ValueError(f"value must be (N, S, M, D), got shape {value.shape}")
  n, s, m, d = value.shape
  if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
    raise ValueError(f"sampling_locations must be (N, Lq, M, L, P, 2), got shape {sampling_locations.shape}")
  _, lq, _, levels, points, _ = sampling_locations.shape
  if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m:
    raise ValueError(
      f"sampling_locations {sampling_locations.shape} must have the batch N={n} and heads M={m} of value {value.shape}"
    )
  if attention_weights.shape != sampling_locations.shape[:-1]:
    raise ValueError(
      f"attention_weights must be (N, Lq, M, L, P) = {sampling_locations.shape[:-1]}, got {attention_weights.shape}"
    )
  shapes = _spatial_shapes(spatial_shapes, s, levels)
  dtype = jnp.result_type(value, sampling_locations, attention_weights)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"ms_deform_attn needs floating inputs, got {dtype}")

  # Static per-level constants, shaped (L, 1, 1) to broadcast against (..., L, P, corner).
  heights = np.array([h for h, _ in shapes], np.int32)[:, None, None]
  widths = np.array([w for _, w in shapes], np.int32)[:, None, None]
  starts = np.cumsum([0] + [h * w for h, w in shapes[:-1]], dtype=np.int32)[:, None, None]

  # Heads lead the sampling arrays (N, M, Lq, L, P) so that the gather's indices and weights come
  # out in the (N, M, K) layout it batches over, without moving the larger gathered tensor.
  locations = jnp.moveaxis(sampling_locations, 2, 1).astype(dtype)
  x = locations[..., 0, None] * widths.astype(dtype) - 0.5  # (N, M, Lq, L, P, 1)
  y = locations[..., 1, None] * heights.astype(dtype) - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  cx, cy = x0 + _CORNER_DX, y0 + _CORNER_DY  # (N, M, Lq, L, P, 4)
  bilinear = jnp.where(_CORNER_DX, fx, 1 - fx) * jnp.where(_CORNER_DY, fy, 1 - fy)
  inside = (cx >= 0) & (cx <= widths - 1) & (cy >= 0) & (cy <= heights - 1)
  # Bilinear and attention weights combined first: the sum over levels, points and corners is one
  # contraction. Corners outside their map are clamped to a valid index (any) and weighted zero.
  weights = jnp.where(inside, bilinear, 0) * jnp.moveaxis(attention_weights, 2, 1).astype(dtype)[..., None]
  # Clamped while still floating, so that far-away points cannot overflow the integer conversion.
  rows = jnp.clip(cy, 0, heights - 1).astype(jnp.int32)
  cols = jnp.clip(cx, 0, widths - 1).astype(jnp.int32)
  index = (starts + rows * widths + cols).reshape(n, m, lq * levels * points * 4)

  # (N, M, S, D): each gathered slice is one contiguous D-vector; batched over N and M.
  table = jnp.moveaxis(value, 2, 1).astype(dtype)
  sampled = jnp.take_along_axis(table, index[..., None], axis=2, mode="promise_in_bounds")
  sampled = sampled.reshape(n, m, lq, levels * points * 4, d)
  weights = weights.reshape(n, m, lq, levels * points * 4)
  # HIGHEST: a float32 sum must not be cut to bfloat16 passes on TPU's matrix unit.
  out = jnp.einsum("nmqkd,nmqk->nqmd", sampled, weights, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(n, lq, m * d)


def _sampling_offsets_bias(n_heads: int, n_levels: int, n_points: int):
  """The official initial sampling offsets: head h points along angle 2*pi*h/M (the direction
  scaled so that its larger coordinate is +-1), point p at (p + 1) times that, on every level."""

  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = jnp.arange(n_heads, dtype=jnp.float32) * (2.0 * math.pi / n_heads)
    grid = jnp.stack([jnp.cos(thetas), jnp.sin(thetas)], -1)
    grid = grid / jnp.abs(grid).max(-1, keepdims=True)
    scale = jnp.arange(1, n_points + 1, dtype=jnp.float32)[:, None]
    grid = jnp.broadcast_to(grid[:, None, None, :] * scale, (n_heads, n_levels, n_points, 2))
    return grid.reshape(shape).astype(dtype)

  return init


class MSDeformAttn(nnx.Module):
  """Multi-scale deformable attention: each query attends to n_points bilinear samples per head
  and level, around its reference point at learned offsets, with learned softmax weights.

  Arguments as the official module (ViT-Adapter's `ratio` included). The projections compute in
  `dtype`; the sampling and softmax in at least float32, as the official op runs in float32 under
  autocast (`custom_fwd(cast_inputs=torch.float32)`). Parameters are `param_dtype`.
  """

  def __init__(
    self,
    d_model: int = 256,
    n_levels: int = 4,
    n_heads: int = 8,
    n_points: int = 4,
    ratio: float = 1.0,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    for name, setting in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
      checks.integer(name, setting)
    checks.number("ratio", ratio)
    if d_model % n_heads:  # As the official module.
      raise checks.SettingError("n_heads", n_heads, f"must divide d_model={d_model}")
    value_dim = int(d_model * ratio)
    if value_dim < 1 or value_dim % n_heads:
      raise checks.SettingError(
        "ratio", ratio, f"int(d_model * ratio) = {value_dim} must be a positive multiple of n_heads={n_heads}"
      )
    self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
    self.ratio, self.value_dim = ratio, value_dim
    self.dtype = dtype
    self.attn_dtype = jnp.promote_types(dtype, jnp.float32)
    zeros = nnx.initializers.zeros_init()
    linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    samples = n_heads * n_levels * n_points
    self.sampling_offsets = nnx.Linear(
      d_model, samples * 2, kernel_init=zeros, bias_init=_sampling_offsets_bias(n_heads, n_levels, n_points), **linear
    )
    self.attention_weights = nnx.Linear(d_model, samples, kernel_init=zeros, bias_init=zeros, **linear)
    # Flax's kernel is (in, out), so its fan axes are PyTorch's xavier_uniform_ ones.
    xavier = nnx.initializers.xavier_uniform()
    self.value_proj = nnx.Linear(d_model, value_dim, kernel_init=xavier, bias_init=zeros, **linear)
    self.output_proj = nnx.Linear(value_dim, d_model, kernel_init=xavier, bias_init=zeros, **linear)

  def __call__(
    self,
    query: jax.Array,
    reference_points: jax.Array,
    input_flatten: jax.Array,
    spatial_shapes: Sequence[tuple[int, int]],
    input_padding_mask: jax.Array | None = None,
  ) -> jax.Array:
    """query (N, Lq, C); reference_points (N, Lq, L, 2) normalised (x, y), N and L may be 1 to
    broadcast (ViT-Adapter passes (1, Lq, 1, 2)); input_flatten (N, S, C), the L levels of the
    static `spatial_shapes` (H_l, W_l) flattened and stacked; input_padding_mask (N, S) bool, True
    at padding, whose values are zeroed. Returns (N, Lq, C) in `dtype`.

    The official level start index argument is computed from `spatial_shapes` here; the
    4-coordinate reference box form is not supported (ViT-Adapter does not use it).
    """
    heads, levels, points = self.n_heads, self.n_levels, self.n_points
    if query.ndim != 3 or query.shape[-1] != self.d_model:
      raise ValueError(f"query must be (N, Lq, d_model={self.d_model}), got shape {query.shape}")
    n, lq, _ = query.shape
    if input_flatten.ndim != 3 or input_flatten.shape[0] != n or input_flatten.shape[-1] != self.d_model:
      raise ValueError(f"input_flatten must be (N={n}, S, d_model={self.d_model}), got shape {input_flatten.shape}")
    s = input_flatten.shape[1]
    shapes = _spatial_shapes(spatial_shapes, s, levels)
    if reference_points.ndim == 4 and reference_points.shape[-1] == 4:
      raise ValueError("reference_points: the 4-coordinate (box) form is not supported, give (x, y) points")
    if (
      reference_points.ndim != 4
      or reference_points.shape[-1] != 2
      or reference_points.shape[0] not in (1, n)
      or reference_points.shape[1] != lq
      or reference_points.shape[2] not in (1, levels)
    ):
      raise ValueError(f"reference_points must be (N or 1, Lq={lq}, L={levels} or 1, 2), got {reference_points.shape}")
    if input_padding_mask is not None and input_padding_mask.shape != (n, s):
      raise ValueError(f"input_padding_mask must be (N, S) = {(n, s)}, got {input_padding_mask.shape}")

    value = self.value_proj(input_flatten)
    if input_padding_mask is not None:
      value = jnp.where(input_padding_mask[..., None], 0, value)
    value = value.reshape(n, s, heads, self.value_dim // heads).astype(self.attn_dtype)
    offsets = self.sampling_offsets(query).reshape(n, lq, heads, levels, points, 2).astype(self.attn_dtype)
    logits = self.attention_weights(query).reshape(n, lq, heads, levels * points).astype(self.attn_dtype)
    weights = jax.nn.softmax(logits, axis=-1).reshape(n, lq, heads, levels, points)
    # Offsets are in pixels of their level: (W_l, H_l) per level, shaped (L, 1, 2) against (L, P, 2).
    normalizer = jnp.asarray([[w, h] for h, w in shapes], self.attn_dtype)[:, None, :]
    reference = reference_points.astype(self.attn_dtype)[:, :, None, :, None, :]
    locations = reference + offsets / normalizer
    out = ms_deform_attn(value, shapes, locations, weights)
    return self.output_proj(out.astype(self.dtype))

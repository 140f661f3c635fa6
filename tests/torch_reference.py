"""An independent float64 PyTorch forward pass of Vim / ShuffleMamba / Mamba-Reg, for parity tests.

Written from SPEC.md sections 2-3 alone (not from our JAX code), so that agreement with it checks
both the JAX model and the weight converter. It reads a state dict with the OFFICIAL PyTorch names
of SPEC section 5 and takes NCHW images, like the official models; everything else (width, depth,
d_state, dt_rank, norm kind, registers, neck) is inferred from the tensor shapes. Evaluation mode
only: no drop path, no shuffle, no dropout.

`ms_deform_attn` and `ms_deform_attn_module` transcribe Deformable DETR's multi-scale deformable
attention (`ms_deform_attn_core_pytorch`, level by level through `grid_sample`) and the forward of
its `MSDeformAttn` module with ViT-Adapter's `ratio`, from the official PyTorch code's maths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOKEN_LAYOUTS = ("middle", "head", "registers")


def selective_scan(u, delta, A, B, C, D, z, delta_bias):
  """The selective scan of SPEC section 3, one time step after another.

  u, delta, z: (batch, length, channels); A: (channels, state); B, C: (batch, length, state);
  D, delta_bias: (channels,). Returns (batch, length, channels).
  """
  delta = F.softplus(delta + delta_bias)
  batch, length, channels = u.shape
  h = u.new_zeros(batch, channels, A.shape[1])
  ys = []
  for l in range(length):
    dA = torch.exp(delta[:, l, :, None] * A)
    dBu = delta[:, l, :, None] * B[:, l, None, :] * u[:, l, :, None]
    h = dA * h + dBu
    ys.append((h * C[:, l, None, :]).sum(-1) + D * u[:, l])
  y = torch.stack(ys, dim=1)
  return y * F.silu(z)


def causal_depthwise_conv1d(x, weight, bias):
  """Depthwise causal convolution: x (batch, length, channels); weight (channels, 1, width)."""
  width = weight.shape[-1]
  out = F.conv1d(x.transpose(1, 2), weight, bias, padding=width - 1, groups=x.shape[-1])
  return out[..., : x.shape[1]].transpose(1, 2)


def _direction(x, z, sd, prefix, suffix):
  """One scan direction with parameters `conv1d{suffix}`, `x_proj{suffix}`, ... ."""
  A_log = sd[f"{prefix}A_b_log" if suffix else f"{prefix}A_log"]
  D = sd[f"{prefix}D{suffix}"]
  x = F.silu(causal_depthwise_conv1d(x, sd[f"{prefix}conv1d{suffix}.weight"], sd[f"{prefix}conv1d{suffix}.bias"]))
  rank = sd[f"{prefix}dt_proj{suffix}.weight"].shape[1]
  state = A_log.shape[1]
  dt, B, C = torch.split(x @ sd[f"{prefix}x_proj{suffix}.weight"].T, [rank, state, state], dim=-1)
  delta = dt @ sd[f"{prefix}dt_proj{suffix}.weight"].T
  return selective_scan(x, delta, -torch.exp(A_log), B, C, D, z, sd[f"{prefix}dt_proj{suffix}.bias"])


def bidirectional_mixer(hidden, sd, prefix):
  """The "v2" bidirectional Mamba mixer: hidden (batch, length, width) -> same shape."""
  xz = hidden @ sd[f"{prefix}in_proj.weight"].T
  x, z = xz.chunk(2, dim=-1)
  y_forward = _direction(x, z, sd, prefix, "")
  y_backward = _direction(x.flip(1), z.flip(1), sd, prefix, "_b").flip(1)
  return ((y_forward + y_backward) / 2) @ sd[f"{prefix}out_proj.weight"].T


def norm(x, sd, prefix, eps):
  """RMSNorm (weight only) or LayerNorm (weight and bias), chosen by the presence of a bias."""
  weight = sd[f"{prefix}weight"]
  if f"{prefix}bias" in sd:
    return F.layer_norm(x, weight.shape, weight, sd[f"{prefix}bias"], eps)
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def register_positions(num_patches, num_registers):
  """Sequence indices of the registers: each of num_registers groups of patches is followed by one."""
  group = num_patches // (num_registers + 1)
  return [r * (group + 1) + group for r in range(num_registers)]


def embed_tokens(images, sd, token_layout):
  """Patch embedding, extra tokens and position embeddings: returns (tokens, readout indices)."""
  patches = F.conv2d(
    images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=sd["patch_embed.proj.weight"].shape[-1]
  )
  patches = patches.flatten(2).transpose(1, 2)  # raster order
  batch, num_patches, _ = patches.shape
  cls = sd["cls_token"].expand(batch, -1, -1)
  if token_layout == "middle":
    middle = num_patches // 2
    tokens = torch.cat([patches[:, :middle], cls, patches[:, middle:]], dim=1)
    return tokens + sd["pos_embed"], [middle]
  if token_layout == "head":
    return torch.cat([cls, patches], dim=1) + sd["pos_embed"], [0]
  if token_layout == "registers":
    patches = patches + sd["pos_embed"]
    registers = cls + sd["pos_embed_cls"]
    num_registers = registers.shape[1]
    group = num_patches // (num_registers + 1)
    pieces = []
    for r in range(num_registers):
      pieces += [patches[:, r * group : (r + 1) * group], registers[:, r : r + 1]]
    pieces.append(patches[:, num_registers * group :])
    return torch.cat(pieces, dim=1), register_positions(num_patches, num_registers)
  raise ValueError(f"token_layout must be one of {TOKEN_LAYOUTS}, got {token_layout!r}")


def forward(state_dict, images, token_layout, eps=1e-5):
  """Class logits (batch, classes) float64 for NCHW images, from official-named weights."""
  sd = {name: torch.as_tensor(value).double() for name, value in state_dict.items()}
  images = torch.as_tensor(images).double()
  depth = len([name for name in sd if name.startswith("layers.") and name.endswith(".norm.weight")])
  hidden, readout = embed_tokens(images, sd, token_layout)
  residual = None
  for i in range(depth):
    residual = hidden if residual is None else residual + hidden
    hidden = bidirectional_mixer(norm(residual, sd, f"layers.{i}.norm.", eps), sd, f"layers.{i}.mixer.")
  hidden = norm(residual + hidden, sd, "norm_f.", eps)
  features = hidden[:, readout]  # (batch, extra tokens, width)
  if "neck.weight" in sd:
    features = norm((features @ sd["neck.weight"].T).flatten(1), sd, "norm_neck.", eps)
  else:
    features = features.flatten(1)
  return features @ sd["head.weight"].T + sd["head.bias"]


def bicubic_resize(grid, size):
  """(1, C, h, w) -> (1, C, *size): the reference's position-table resize (models_openmm.resize_pos_embed)."""
  if tuple(grid.shape[-2:]) == tuple(size):
    return grid
  return F.interpolate(grid, size=size, mode="bicubic", align_corners=False)


def segmentation_backbone(state_dict, images, out_indices, pos_grid, eps=1e-5):
  """The reference segmentation backbone (`Backbone_VideoMamba.forward`, evaluation mode).

  Patch tokens only; the (1, h*w, D) `pos_embed` of the `pos_grid` (h, w) is resized bicubically
  to the grid seen; at each block of `out_indices` but the last of the stack the map is the
  block's mixer output, at the last `norm_f(residual + hidden)`. Returns one (batch, D, h', w')
  float64 map per index, for NCHW float64 images (any size: the patch conv floors).
  """
  sd = {name: torch.as_tensor(value).double() for name, value in state_dict.items()}
  images = torch.as_tensor(images).double()
  depth = len([name for name in sd if name.startswith("layers.") and name.endswith(".norm.weight")])
  proj = sd["patch_embed.proj.weight"]
  patches = F.conv2d(images, proj, sd["patch_embed.proj.bias"], stride=proj.shape[-1])
  batch, width, rows, cols = patches.shape
  table = sd["pos_embed"].reshape(1, *pos_grid, width).permute(0, 3, 1, 2)
  positions = bicubic_resize(table, (rows, cols)).flatten(2).transpose(1, 2)
  hidden = patches.flatten(2).transpose(1, 2) + positions
  residual, maps = None, []
  for i in range(depth):
    residual = hidden if residual is None else residual + hidden
    hidden = bidirectional_mixer(norm(residual, sd, f"layers.{i}.norm.", eps), sd, f"layers.{i}.mixer.")
    if i == depth - 1:
      hidden = norm(residual + hidden, sd, "norm_f.", eps)
    if i in out_indices:
      maps.append(hidden.transpose(1, 2).reshape(batch, width, rows, cols))
  return maps


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
  """Multi-scale deformable attention by `grid_sample`, one level at a time.

  value (N, S, M, D), levels stacked row-major; spatial_shapes [(H, W), ...]; sampling_locations
  (N, Lq, M, L, P, 2) normalised (x, y); attention_weights (N, Lq, M, L, P). Returns (N, Lq, M*D).
  """
  batch, _, heads, depth = value.shape
  _, queries, _, levels, points, _ = sampling_locations.shape
  maps = torch.split(value, [h * w for h, w in spatial_shapes], dim=1)
  samples = []
  for level, (h, w) in enumerate(spatial_shapes):
    # (N, H*W, M, D) -> (N*M, D, H, W): one image per batch element and head.
    image = maps[level].permute(0, 2, 3, 1).reshape(batch * heads, depth, h, w)
    # grid_sample's grid spans [-1, 1] between the outer pixel edges (align_corners=False).
    grid = (2 * sampling_locations[:, :, :, level] - 1).transpose(1, 2).reshape(batch * heads, queries, points, 2)
    sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    samples.append(sampled.reshape(batch, heads, depth, queries, points))
  samples = torch.stack(samples, dim=-2)  # (N, M, D, Lq, L, P)
  out = torch.einsum("nmdqlp,nqmlp->nqmd", samples, attention_weights)
  return out.reshape(batch, queries, heads * depth)


def ms_deform_attn_module(
  state_dict, query, reference_points, input_flatten, spatial_shapes, n_heads, n_points, input_padding_mask=None
):
  """The forward of the official `MSDeformAttn` (ViT-Adapter's, with `ratio`) in float64.

  state_dict holds the official names (`value_proj.weight` (out, in), `value_proj.bias`, ... for
  value_proj, sampling_offsets, attention_weights, output_proj); query (N, Lq, C);
  reference_points (N, Lq, L, 2) normalised (x, y), or broadcastable to it; input_flatten (N, S, C);
  input_padding_mask (N, S) bool, True at padding. Returns (N, Lq, C).
  """
  sd = {name: torch.as_tensor(v).double() for name, v in state_dict.items()}
  query, input_flatten = torch.as_tensor(query).double(), torch.as_tensor(input_flatten).double()
  reference_points = torch.as_tensor(reference_points).double()

  def linear(name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

  batch, queries, _ = query.shape
  length = input_flatten.shape[1]
  levels = len(spatial_shapes)
  value = linear("value_proj", input_flatten)
  if input_padding_mask is not None:
    value = value.masked_fill(torch.as_tensor(input_padding_mask)[..., None], 0.0)
  value = value.reshape(batch, length, n_heads, -1)
  offsets = linear("sampling_offsets", query).reshape(batch, queries, n_heads, levels, n_points, 2)
  logits = linear("attention_weights", query).reshape(batch, queries, n_heads, levels * n_points)
  weights = torch.softmax(logits, dim=-1).reshape(batch, queries, n_heads, levels, n_points)
  # An offset of one is one pixel of its level: divided by (W_l, H_l).
  normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float64)
  locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
  return linear("output_proj", ms_deform_attn(value, spatial_shapes, locations, weights))

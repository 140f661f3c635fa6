"""An independent float64 PyTorch forward pass of Vim / ShuffleMamba / Mamba-Reg, for parity tests.

Written from SPEC.md sections 2-3 alone (not from our JAX code), so that agreement with it checks
both the JAX model and the weight converter. It reads a state dict with the OFFICIAL PyTorch names
of SPEC section 5 and takes NCHW images, like the official models; everything else (width, depth,
d_state, dt_rank, norm kind, registers, neck) is inferred from the tensor shapes. Evaluation mode
only: no drop path, no shuffle, no dropout.

`ms_deform_attn` and `ms_deform_attn_module` transcribe Deformable DETR's multi-scale deformable
attention (`ms_deform_attn_core_pytorch`, level by level through `grid_sample`) and the forward of
its `MSDeformAttn` module with ViT-Adapter's `ratio`, from the official PyTorch code's maths.
`adapter_backbone` transcribes the reference's detection backbone (`Mamba_Adapter.forward`: the
spatial prior module, injectors, extractors and ConvFFNs of ViT-Adapter around the Mamba blocks).
"""

from __future__ import annotations

import math

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
  state_dict,
  query,
  reference_points,
  input_flatten,
  spatial_shapes,
  n_heads,
  n_points,
  input_padding_mask=None,
  prefix="",
  ratio=None,
):
  """The forward of the official `MSDeformAttn` (ViT-Adapter's, with `ratio`) in float64.

  state_dict holds the official names (`value_proj.weight` (out, in), `value_proj.bias`, ... for
  value_proj, sampling_offsets, attention_weights, output_proj); query (N, Lq, C);
  reference_points (N, Lq, L, 2) normalised (x, y), or broadcastable to it; input_flatten (N, S, C);
  input_padding_mask (N, S) bool, True at padding; prefix: the module's name in state_dict (e.g.
  `interactions.0.injector.attn.`); ratio: if given, checked against the value_proj width
  int(C * ratio) (otherwise that width is taken from the weights). Returns (N, Lq, C).
  """
  sd = {name: torch.as_tensor(v).double() for name, v in state_dict.items()}
  query, input_flatten = torch.as_tensor(query).double(), torch.as_tensor(input_flatten).double()
  reference_points = torch.as_tensor(reference_points).double()

  def linear(name, x):
    return x @ sd[f"{prefix}{name}.weight"].T + sd[f"{prefix}{name}.bias"]

  batch, queries, d_model = query.shape
  if ratio is not None and sd[f"{prefix}value_proj.weight"].shape[0] != int(d_model * ratio):
    raise ValueError(
      f"value_proj is {tuple(sd[f'{prefix}value_proj.weight'].shape)}, want int({d_model} * {ratio}) rows"
    )
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


def batch_norm(x, sd, prefix, eps=1e-5):
  """Evaluation-mode (Sync)BatchNorm of an NCHW map: running statistics, affine weight and bias."""
  mean, var = sd[f"{prefix}running_mean"], sd[f"{prefix}running_var"]
  return F.batch_norm(x, mean, var, sd[f"{prefix}weight"], sd[f"{prefix}bias"], training=False, eps=eps)


def spatial_prior(images, sd, prefix="spm."):
  """ViT-Adapter's `SpatialPriorModule` in evaluation mode: c1 (B, D, H/4, W/4) NCHW and c2, c3, c4
  as (B, h*w, D) tokens at strides 8, 16, 32."""

  def conv_bn_relu(x, conv, bn, stride):
    x = F.conv2d(x, sd[f"{prefix}{conv}.weight"], None, stride=stride, padding=1)  # 3x3, no bias
    return F.relu(batch_norm(x, sd, f"{prefix}{bn}."))

  c1 = conv_bn_relu(images, "stem.0", "stem.1", 2)
  c1 = conv_bn_relu(c1, "stem.3", "stem.4", 1)
  c1 = conv_bn_relu(c1, "stem.6", "stem.7", 1)
  c1 = F.max_pool2d(c1, kernel_size=3, stride=2, padding=1)
  c2 = conv_bn_relu(c1, "conv2.0", "conv2.1", 2)
  c3 = conv_bn_relu(c2, "conv3.0", "conv3.1", 2)
  c4 = conv_bn_relu(c3, "conv4.0", "conv4.1", 2)
  c1, c2, c3, c4 = (
    F.conv2d(c, sd[f"{prefix}fc{k}.weight"], sd[f"{prefix}fc{k}.bias"]) for k, c in enumerate((c1, c2, c3, c4), 1)
  )
  return (c1, *(c.flatten(2).transpose(1, 2) for c in (c2, c3, c4)))


def adapter_reference_points(shapes):
  """ViT-Adapter's `get_reference_points`: the pixel centres of each (h, w) level, normalised (x, y),
  levels stacked row-major, as (1, sum h*w, 1, 2). Computed in float32 like the reference (which
  builds them in float32 whatever the model's dtype), then widened to float64."""
  points = []
  for h, w in shapes:
    ref_y, ref_x = torch.meshgrid(
      torch.linspace(0.5, h - 0.5, h, dtype=torch.float32),
      torch.linspace(0.5, w - 0.5, w, dtype=torch.float32),
      indexing="ij",
    )
    points.append(torch.stack((ref_x.reshape(-1)[None] / w, ref_y.reshape(-1)[None] / h), -1))
  return torch.cat(points, 1)[:, :, None].double()


def conv_ffn(x, sd, prefix, rows, cols):
  """ViT-Adapter's `ConvFFN` on the (B, N, D) concatenated c2/c3/c4 tokens: fc1, the shared 3x3
  depthwise conv of `DWConv` applied to each level's map separately, exact GELU, fc2. The maps are
  cut as the reference does: n = N // 21, levels of 16n, 4n and the rest tokens, viewed as
  (2*rows, 2*cols), (rows, cols) and (rows // 2, cols // 2) with (rows, cols) the patch grid."""
  x = x @ sd[f"{prefix}fc1.weight"].T + sd[f"{prefix}fc1.bias"]
  batch, length, channels = x.shape
  n = length // 21
  pieces = (x[:, : 16 * n], x[:, 16 * n : 20 * n], x[:, 20 * n :])
  sizes = ((rows * 2, cols * 2), (rows, cols), (rows // 2, cols // 2))
  weight, bias = sd[f"{prefix}dwconv.dwconv.weight"], sd[f"{prefix}dwconv.dwconv.bias"]
  maps = []
  for piece, (h, w) in zip(pieces, sizes):
    grid = piece.transpose(1, 2).reshape(batch, channels, h, w)
    maps.append(F.conv2d(grid, weight, bias, stride=1, padding=1, groups=channels).flatten(2).transpose(1, 2))
  x = F.gelu(torch.cat(maps, dim=1))
  return x @ sd[f"{prefix}fc2.weight"].T + sd[f"{prefix}fc2.bias"]


def adapter_backbone(
  state_dict,
  images,
  interaction_indexes,
  pos_grid,
  deform_heads,
  n_points=4,
  deform_ratio=0.5,
  add_mamba_feature=True,
  eps=1e-5,
):
  """The reference detection backbone (`Mamba_Adapter.forward`, ViT-Adapter around the Mamba
  blocks) in evaluation mode, float64.

  state_dict: the official names of `Mamba_Adapter.state_dict()` without the `backbone.` prefix;
  images (B, 3, H, W) NCHW with H and W multiples of 32; interaction_indexes [[first, last], ...]
  the blocks of each interaction stage; pos_grid (rows, cols) of the stored patch-only `pos_embed`;
  eps: the blocks' norm epsilon (the adapter's LayerNorms use 1e-6, its BatchNorms 1e-5). No SLWS
  (the adapter calls its blocks directly), no drop path, no final `norm_f` (the adapter deletes it).
  Returns [f1, f2, f3, f4]: (B, D, H/s, W/s) float64 maps at strides s = 4, 8, 16, 32.
  """
  sd = {name: torch.as_tensor(value).double() for name, value in state_dict.items()}
  images = torch.as_tensor(images).double()
  height, width = images.shape[-2:]

  # deform_inputs: the injector's queries are the patch tokens (stride 16) reading c2, c3, c4; the
  # extractors' queries are c2, c3, c4 reading the patch tokens.
  c_shapes = [(height // 8, width // 8), (height // 16, width // 16), (height // 32, width // 32)]
  x_shapes = [(height // 16, width // 16)]
  inject_points, extract_points = adapter_reference_points(x_shapes), adapter_reference_points(c_shapes)

  def attention(prefix, query, points, feat, shapes):
    query, feat = norm(query, sd, f"{prefix}query_norm.", 1e-6), norm(feat, sd, f"{prefix}feat_norm.", 1e-6)
    return ms_deform_attn_module(
      sd, query, points, feat, shapes, deform_heads, n_points, prefix=f"{prefix}attn.", ratio=deform_ratio
    )

  def extractor(prefix, c, x, rows, cols):
    c = c + attention(prefix, c, extract_points, x, x_shapes)
    if f"{prefix}ffn.fc1.weight" in sd:  # with_cffn
      c = c + conv_ffn(norm(c, sd, f"{prefix}ffn_norm.", 1e-6), sd, f"{prefix}ffn.", rows, cols)
    return c

  c1, c2, c3, c4 = spatial_prior(images, sd)
  level_embed = sd["level_embed"]
  c2, c3, c4 = c2 + level_embed[0], c3 + level_embed[1], c4 + level_embed[2]
  c = torch.cat([c2, c3, c4], dim=1)

  proj = sd["patch_embed.proj.weight"]
  patches = F.conv2d(images, proj, sd["patch_embed.proj.bias"], stride=proj.shape[-1])
  batch, dim, rows, cols = patches.shape
  table = sd["pos_embed"].reshape(1, *pos_grid, dim).permute(0, 3, 1, 2)
  x = patches.flatten(2).transpose(1, 2) + bicubic_resize(table, (rows, cols)).flatten(2).transpose(1, 2)

  outs, residual = [], None
  for k, indexes in enumerate(interaction_indexes):
    prefix = f"interactions.{k}."
    x = x + sd[f"{prefix}injector.gamma"] * attention(f"{prefix}injector.", x, inject_points, c, c_shapes)
    for i in range(indexes[0], indexes[-1] + 1):
      residual = x if residual is None else residual + x
      x = bidirectional_mixer(norm(residual, sd, f"layers.{i}.norm.", eps), sd, f"layers.{i}.mixer.")
    c = extractor(f"{prefix}extractor.", c, x, rows, cols)
    e = 0
    while f"{prefix}extra_extractors.{e}.query_norm.weight" in sd:
      c = extractor(f"{prefix}extra_extractors.{e}.", c, x, rows, cols)
      e += 1
    outs.append(x.transpose(1, 2).reshape(batch, dim, rows, cols))

  c2, c3, c4 = torch.split(c, [c2.shape[1], c3.shape[1], c4.shape[1]], dim=1)
  c2 = c2.transpose(1, 2).reshape(batch, dim, rows * 2, cols * 2)
  c3 = c3.transpose(1, 2).reshape(batch, dim, rows, cols)
  c4 = c4.transpose(1, 2).reshape(batch, dim, rows // 2, cols // 2)
  c1 = F.conv_transpose2d(c2, sd["up.weight"], sd["up.bias"], stride=2) + c1

  if add_mamba_feature:
    x1, x2, x3, x4 = outs
    x1 = F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False)
    x2 = F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
    x4 = F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)
    c1, c2, c3, c4 = c1 + x1, c2 + x2, c3 + x3, c4 + x4

  return [batch_norm(f, sd, f"norm{k}.") for k, f in enumerate((c1, c2, c3, c4), 1)]


# ==================================================================================================
# mmdet 3.3.0 box utilities (Mask R-CNN): anchors, overlaps, the delta coder, the MaxIoU assigner
# and the anchor head's per-image targets. Transcribed in float64 from mmdet's AnchorGenerator,
# bbox_overlaps, DeltaXYWHBBoxCoder (bbox2delta / delta2bbox), MaxIoUAssigner.assign_wrt_overlaps,
# RandomSampler and AnchorHead._get_targets_single; one box after another where mmdet loops.
# ==================================================================================================


def mmdet_anchors(feature_shapes, strides, scales=(8,), ratios=(0.5, 1.0, 2.0), center_offset=0.0, dtype=torch.float64):
  """AnchorGenerator(strides, ratios, scales).grid_priors(feature_shapes), levels concatenated: (N, 4).

  With dtype=torch.float32 every step rounds as in mmdet (whose ratios, scales and anchors are float32).
  """
  scales = torch.tensor(scales, dtype=dtype)
  ratios = torch.tensor(ratios, dtype=dtype)
  levels = []
  for (height, width), stride in zip(feature_shapes, strides):
    center = center_offset * stride
    ratio_h = ratios.sqrt()
    ratio_w = 1.0 / ratio_h
    # Ratio-major, scale-minor (scale_major=True).
    ws = (stride * ratio_w[:, None] * scales[None, :]).reshape(-1)
    hs = (stride * ratio_h[:, None] * scales[None, :]).reshape(-1)
    cell = torch.stack([center - ws / 2, center - hs / 2, center + ws / 2, center + hs / 2], dim=1)
    rows = []
    for y in range(height):  # row after row, x fastest, the A anchors of a cell together
      for x in range(width):
        rows.append(cell + torch.tensor([x * stride, y * stride, x * stride, y * stride], dtype=dtype))
    levels.append(torch.cat(rows))
  return torch.cat(levels)


def mmdet_valid_flags(feature_shapes, strides, num_base, pad_shape):
  """AnchorGenerator.valid_flags: the cells within ceil(pad / stride) of the origin, per anchor."""
  flags = []
  for (height, width), stride in zip(feature_shapes, strides):
    valid_h = min(math.ceil(pad_shape[0] / stride), height)
    valid_w = min(math.ceil(pad_shape[1] / stride), width)
    for y in range(height):
      for x in range(width):
        flags += [y < valid_h and x < valid_w] * num_base
  return torch.tensor(flags)


def mmdet_bbox_overlaps(boxes1, boxes2, mode="iou", eps=1e-6, dtype=torch.float64):
  """bbox_overlaps(boxes1, boxes2, mode) for 'iou' and 'iof': (N, M), in `dtype` (mmdet's is float32)."""
  boxes1, boxes2 = torch.as_tensor(boxes1).to(dtype), torch.as_tensor(boxes2).to(dtype)
  out = boxes1.new_zeros(len(boxes1), len(boxes2))
  for i, a in enumerate(boxes1):
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    for j, b in enumerate(boxes2):
      w = (torch.min(a[2], b[2]) - torch.max(a[0], b[0])).clamp(min=0)
      h = (torch.min(a[3], b[3]) - torch.max(a[1], b[1])).clamp(min=0)
      inter = w * h
      denom = area_a + (b[2] - b[0]) * (b[3] - b[1]) - inter if mode == "iou" else area_a
      out[i, j] = inter / max(denom, eps)
  return out


def mmdet_bbox2delta(proposals, gt, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0)):
  """DeltaXYWHBBoxCoder.encode: (N, 4) proposals and gts -> (N, 4) normalised deltas."""
  p, g = torch.as_tensor(proposals).double(), torch.as_tensor(gt).double()
  pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
  gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
  dx = ((g[:, 0] + g[:, 2]) / 2 - (p[:, 0] + p[:, 2]) / 2) / pw
  dy = ((g[:, 1] + g[:, 3]) / 2 - (p[:, 1] + p[:, 3]) / 2) / ph
  deltas = torch.stack([dx, dy, torch.log(gw / pw), torch.log(gh / ph)], dim=1)
  return (deltas - torch.tensor(means).double()) / torch.tensor(stds).double()


def mmdet_delta2bbox(
  rois,
  deltas,
  means=(0.0, 0.0, 0.0, 0.0),
  stds=(1.0, 1.0, 1.0, 1.0),
  max_shape=None,
  wh_ratio_clip=16 / 1000,
  clip_border=True,
  add_ctr_clamp=False,
  ctr_clamp=32,
):
  """DeltaXYWHBBoxCoder.decode (delta2bbox): rois (N, 4), deltas (N, 4 * C) -> boxes (N, 4 * C)."""
  rois, deltas = torch.as_tensor(rois).double(), torch.as_tensor(deltas).double()
  n, classes = deltas.shape[0], deltas.shape[1] // 4
  d = deltas.reshape(n, classes, 4) * torch.tensor(stds).double() + torch.tensor(means).double()
  out = deltas.new_zeros(n, classes, 4)
  limit = abs(math.log(wh_ratio_clip))
  for i in range(n):
    x1, y1, x2, y2 = rois[i]
    pw, ph = x2 - x1, y2 - y1
    px, py = (x1 + x2) / 2, (y1 + y2) / 2
    for c in range(classes):
      dx, dy, dw, dh = d[i, c]
      shift_x, shift_y = pw * dx, ph * dy
      if add_ctr_clamp:
        shift_x, shift_y = shift_x.clamp(-ctr_clamp, ctr_clamp), shift_y.clamp(-ctr_clamp, ctr_clamp)
        dw, dh = dw.clamp(max=limit), dh.clamp(max=limit)
      else:
        dw, dh = dw.clamp(-limit, limit), dh.clamp(-limit, limit)
      w, h = pw * torch.exp(dw), ph * torch.exp(dh)
      cx, cy = px + shift_x, py + shift_y
      box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
      if clip_border and max_shape is not None:
        box[0::2] = box[0::2].clamp(0, max_shape[1])
        box[1::2] = box[1::2].clamp(0, max_shape[0])
      out[i, c] = box
  return out.reshape(n, classes * 4)


def mmdet_assign_wrt_overlaps(
  overlaps, pos_iou_thr, neg_iou_thr, min_pos_iou=0.0, gt_max_assign_all=True, match_low_quality=True
):
  """MaxIoUAssigner.assign_wrt_overlaps on (K gts, N priors): mmdet's gt_inds (i + 1 / 0 neg / -1 ignore)."""
  overlaps = torch.as_tensor(overlaps).double()
  num_gts, num_priors = overlaps.shape
  gt_inds = torch.full((num_priors,), -1, dtype=torch.long)
  if num_gts == 0:
    return gt_inds.fill_(0)
  best, best_gt = overlaps.max(dim=0)
  gt_best, gt_best_prior = overlaps.max(dim=1)
  low, high = neg_iou_thr if isinstance(neg_iou_thr, tuple) else (0.0, neg_iou_thr)
  gt_inds[(best >= low) & (best < high)] = 0
  positive = best >= pos_iou_thr
  gt_inds[positive] = best_gt[positive] + 1
  if match_low_quality:
    for i in range(num_gts):
      if gt_best[i] >= min_pos_iou:
        if gt_max_assign_all:
          gt_inds[overlaps[i] == gt_best[i]] = i + 1
        else:
          gt_inds[gt_best_prior[i]] = i + 1
  return gt_inds


def mmdet_random_sample(gt_inds, num, pos_fraction, neg_pos_ub=-1, choose=None):
  """RandomSampler.sample on mmdet's gt_inds: (sorted positive indices, sorted negative indices).

  `choose(gallery, k)` picks k of the gallery's indices (default: torch.randperm, as mmdet).
  """
  if choose is None:
    choose = lambda gallery, k: gallery[torch.randperm(len(gallery))[:k]]
  pos = torch.nonzero(gt_inds > 0).flatten()
  expected_pos = int(num * pos_fraction)
  if len(pos) > expected_pos:
    pos = choose(pos, expected_pos)
  pos = pos.unique()
  expected_neg = num - len(pos)
  if neg_pos_ub >= 0:
    expected_neg = min(expected_neg, int(neg_pos_ub * max(1, len(pos))))
  neg = torch.nonzero(gt_inds == 0).flatten()
  if len(neg) > expected_neg:
    neg = choose(neg, expected_neg)
  return pos, neg.unique()


def mmdet_anchor_targets(
  anchors,
  valid_flags,
  gt_bboxes,
  *,
  pos_iou_thr=0.7,
  neg_iou_thr=0.3,
  min_pos_iou=0.3,
  num=256,
  pos_fraction=0.5,
  means=(0.0, 0.0, 0.0, 0.0),
  stds=(1.0, 1.0, 1.0, 1.0),
  choose=None,
  iou_dtype=torch.float64,
):
  """AnchorHead._get_targets_single of the RPN (allowed_border=-1, pos_weight=-1, one class), unmapped.

  Returns (labels as 1 positive / 0 else, label_weights, bbox_targets, bbox_weights, avg_factor);
  `choose(gallery, k)` picks from galleries of indices into ALL anchors (see mmdet_random_sample).
  `iou_dtype=torch.float32` computes the IoUs as mmdet does, with its exact ties (anchors of
  irrational size tie in float32 where their float64 IoUs differ in the last bits).
  """
  anchors, gt_bboxes = torch.as_tensor(anchors).double(), torch.as_tensor(gt_bboxes).double()
  inside = torch.nonzero(torch.as_tensor(valid_flags)).flatten()
  kept = anchors[inside]
  gt_inds = mmdet_assign_wrt_overlaps(
    mmdet_bbox_overlaps(gt_bboxes, kept, dtype=iou_dtype).reshape(len(gt_bboxes), len(kept)).double(),
    pos_iou_thr,
    neg_iou_thr,
    min_pos_iou,
  )
  pick = None if choose is None else (lambda gallery, k: _to_kept(choose(inside[gallery], k), inside))
  pos, neg = mmdet_random_sample(gt_inds, num, pos_fraction, choose=pick)
  n = len(anchors)
  labels, label_weights = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.float64)
  targets, target_weights = torch.zeros(n, 4, dtype=torch.float64), torch.zeros(n, 4, dtype=torch.float64)
  if len(pos):
    targets[inside[pos]] = mmdet_bbox2delta(kept[pos], gt_bboxes[gt_inds[pos] - 1], means, stds)
    target_weights[inside[pos]] = 1.0
    labels[inside[pos]] = 1
    label_weights[inside[pos]] = 1.0
  label_weights[inside[neg]] = 1.0
  avg_factor = max(len(pos), 1) + max(len(neg), 1)
  return labels, label_weights, targets, target_weights, avg_factor


def _to_kept(full_indices, inside):
  """Positions in `inside` (the kept anchors' indices) of the given anchor indices."""
  lookup = {int(v): k for k, v in enumerate(inside)}
  return torch.tensor([lookup[int(v)] for v in full_indices], dtype=torch.long)


# ======================================================================================================
# Non-maximum suppression (torchvision.ops.nms / batched_nms), for the detection tests.
#
# A float64 transcription of the greedy sweep of torchvision's CPU kernel (not shipped in the Python
# sources: sort the scores descending, then for each box still standing suppress every later box with
# IoU > iou_threshold) and of batched_nms's coordinate trick (boxes shifted by label * (max coordinate
# + 1), one NMS). Equal scores: a stable sort (lower index first) where torchvision's sort is unstable.
# ======================================================================================================


def nms(boxes, scores, iou_threshold):
  """Indices (int64) of the boxes that greedy NMS keeps, by decreasing score.

  boxes: (N, 4) (x1, y1, x2, y2); scores: (N,). IoU = inter / (area1 + area2 - inter),
  area = (x2 - x1) * (y2 - y1); a box is dropped when a kept higher-scored box has IoU > iou_threshold."""
  boxes, scores = boxes.to(torch.float64), scores.to(torch.float64)
  order = torch.sort(scores, descending=True, stable=True).indices.tolist()
  x1, y1, x2, y2 = (boxes[:, k].tolist() for k in range(4))
  area = [(x2[i] - x1[i]) * (y2[i] - y1[i]) for i in range(len(order))]
  suppressed = [False] * len(order)
  kept = []
  for rank, i in enumerate(order):
    if suppressed[i]:
      continue
    kept.append(i)
    for j in order[rank + 1 :]:
      if suppressed[j]:
        continue
      w = max(0.0, min(x2[i], x2[j]) - max(x1[i], x1[j]))
      h = max(0.0, min(y2[i], y2[j]) - max(y1[i], y1[j]))
      inter = w * h
      union = area[i] + area[j] - inter
      # IEEE division as in the kernel: 0 / 0 (two empty boxes) is NaN, and NaN > threshold is false.
      iou = inter / union if union != 0 else (float("inf") if inter > 0 else float("nan"))
      if iou > iou_threshold:
        suppressed[j] = True
  return torch.tensor(kept, dtype=torch.int64)


def batched_nms(boxes, scores, labels, iou_threshold):
  """Indices (int64) that per-label NMS keeps, by decreasing score: torchvision's coordinate trick
  (every box shifted by label * (largest coordinate + 1), so that labels never overlap, then one NMS)."""
  boxes = boxes.to(torch.float64)
  if boxes.numel() == 0:
    return torch.empty((0,), dtype=torch.int64)
  offsets = labels.to(torch.float64) * (boxes.max() + 1.0)
  return nms(boxes + offsets[:, None], scores, iou_threshold)


# ----------------------------------------------------------------------------------------------------
# RoIAlign and mmdet's multi-level RoI extractor (Mask R-CNN, issue 23).
#
# `roi_align` follows the per-sample rules of the C++/CUDA RoIAlign kernels of torchvision and mmcv
# (average pooling): unlike torchvision's pure-torch `_roi_align`, which omits it, a sample outside
# [-1, H] x [-1, W] reads 0. Every sample is interpolated from its four corners by indexing, with no
# factorisation, so that it checks the separable form of shufflemamba_jax.models.detection.roi_align.
# `map_roi_levels` and `single_roi_extractor` restate mmdet 3.3.0's SingleRoIExtractor.
# ----------------------------------------------------------------------------------------------------


def _bilinear_samples(image, y, x):
  """image (C, H, W); y, x: broadcastable coordinate tensors. The kernels' bilinear_interpolate, (C, *shape)."""
  _, height, width = image.shape
  y, x = torch.broadcast_tensors(y, x)
  inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
  y, x = y.clamp(min=0.0), x.clamp(min=0.0)
  y0, x0 = y.floor().long(), x.floor().long()
  y_last, x_last = y0 >= height - 1, x0 >= width - 1
  y0, x0 = torch.where(y_last, height - 1, y0), torch.where(x_last, width - 1, x0)
  y1, x1 = torch.where(y_last, y0, y0 + 1), torch.where(x_last, x0, x0 + 1)
  y, x = torch.where(y_last, y0.to(y.dtype), y), torch.where(x_last, x0.to(x.dtype), x)
  ly, lx = y - y0, x - x0
  hy, hx = 1.0 - ly, 1.0 - lx
  value = (
    hy * hx * image[:, y0, x0] + hy * lx * image[:, y0, x1] + ly * hx * image[:, y1, x0] + ly * lx * image[:, y1, x1]
  )
  return torch.where(inside, value, torch.zeros((), dtype=value.dtype))


def roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=True):
  """RoIAlign, average mode. features (N, C, H, W); rois (K, 5) rows (batch index, x1, y1, x2, y2).

  Returns (K, C, out_h, out_w). sampling_ratio > 0: that many samples per bin and axis; <= 0:
  ceil(roi_size / out_size) per axis. Differentiable in `features`.
  """
  out_h, out_w = output_size
  offset = 0.5 if aligned else 0.0
  pooled = []
  for roi in rois:
    image = features[int(roi[0])]
    x1, y1, x2, y2 = (roi[1:] * spatial_scale - offset).unbind()
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
      roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(float(roi_h) / out_h)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(float(roi_w) / out_w)
    if grid_h <= 0 or grid_w <= 0:  # the kernels' loops run no sample
      pooled.append(image.new_zeros(image.shape[0], out_h, out_w))
      continue
    iy = torch.arange(grid_h, dtype=features.dtype)
    ix = torch.arange(grid_w, dtype=features.dtype)
    ph = torch.arange(out_h, dtype=features.dtype)
    pw = torch.arange(out_w, dtype=features.dtype)
    ys = y1 + ph[:, None] * bin_h + (iy + 0.5) * bin_h / grid_h  # (out_h, grid_h)
    xs = x1 + pw[:, None] * bin_w + (ix + 0.5) * bin_w / grid_w  # (out_w, grid_w)
    samples = _bilinear_samples(image, ys[:, :, None, None], xs[None, None])  # (C, out_h, grid_h, out_w, grid_w)
    pooled.append(samples.sum((2, 4)) / max(grid_h * grid_w, 1))
  return torch.stack(pooled)


def map_roi_levels(rois, num_levels, finest_scale=56):
  """mmdet's SingleRoIExtractor.map_roi_levels: rois (K, 5) -> level (K,) long."""
  scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
  level = torch.floor(torch.log2(scale / finest_scale + 1e-6))
  return level.clamp(min=0, max=num_levels - 1).long()


def single_roi_extractor(feats, rois, output_size, strides, sampling_ratio=0, finest_scale=56, aligned=True):
  """mmdet's SingleRoIExtractor.forward with RoIAlign layers: feats, one (N, C, H_l, W_l) per stride."""
  levels = map_roi_levels(rois, len(feats), finest_scale)
  out = feats[0].new_zeros(len(rois), feats[0].shape[1], *output_size)
  for k, (level_feats, stride) in enumerate(zip(feats, strides)):
    chosen = torch.nonzero(levels == k).squeeze(1)
    if len(chosen):
      out[chosen] = roi_align(level_feats, rois[chosen], output_size, 1.0 / stride, sampling_ratio, aligned)
  return out


# ---- mmdet's mask pasting (FCNMaskHead._do_paste_mask) ------------------------------------------


def paste_masks(masks, boxes, height, width, threshold=0.5):
  """(D, m, m) box masks drawn on a (height, width) image as mmdet's `_do_paste_mask` draws them:
  each pixel centre mapped to [-1, 1] over its box and read with `grid_sample` (bilinear,
  align_corners=False, zero padding), then thresholded. float64; returns (D, H, W) bool."""
  masks = torch.as_tensor(masks, dtype=torch.float64)
  boxes = torch.as_tensor(boxes, dtype=torch.float64)
  x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
  img_y = torch.arange(height, dtype=torch.float64) + 0.5
  img_x = torch.arange(width, dtype=torch.float64) + 0.5
  img_y = (img_y - y0) / (y1 - y0) * 2 - 1  # (D, H)
  img_x = (img_x - x0) / (x1 - x0) * 2 - 1  # (D, W)
  n = masks.shape[0]
  gx = img_x[:, None, :].expand(n, height, width)
  gy = img_y[:, :, None].expand(n, height, width)
  grid = torch.stack([gx, gy], dim=3)
  pasted = F.grid_sample(masks[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
  return pasted[:, 0] >= threshold

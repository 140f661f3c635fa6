"""The ViT-Adapter around the Vim blocks: the official detection and segmentation backbone.

The reference is huangzizheng01/ShuffleMamba's `models_openmm.py::Mamba_Adapter` (registered as
`MM_VSSM_ADT`) with `adapter_modules.py`, ViT-Adapter's design on the Vim blocks:

- a spatial prior module (SPM): a BatchNorm conv stem giving c1..c4 at strides 4, 8, 16 and 32,
  each projected to the embedding width; c2..c4 get a learned level embedding and are flattened
  into one sequence `c`;
- the patch tokens (patch convolution plus the pretraining position table, resized bicubically
  to the grid on every call; no cls token, no registers) run through the blocks in four
  stretches. Before each, an Injector (deformable attention from the tokens to c2..c4, scaled by
  a learned `gamma` that starts at 0) writes into the tokens; after each, an Extractor
  (deformable attention from c to the tokens, then a ConvFFN) writes into `c`; the last stretch
  has two extra Extractors;
- the outputs: c2..c4 back as maps, c1 plus a 2x transposed conv of c2, plus each stretch's
  last mixer output (not the residual sum; no final norm) resized bilinearly to the level's
  stride, each through its own BatchNorm.

Quirks kept: SLWS never runs (the adapter never calls the shuffle; a backbone configured to
shuffle is refused); the Extractors' drop path is the backbone's full `drop_path_rate`; the
stretches' residual stream carries across the Injectors. Parameter names mirror the official
module's (`spm.stem.0`, `interactions.3.extra_extractors.1.ffn.dwconv.dwconv`, ...), so weights
map one to one (`weights.pytorch`). BatchNorm uses the statistics of the batch it sees, which
under `jit` with a sharded batch is the global batch: PyTorch's SyncBatchNorm.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.models import tokens
from shufflemamba_jax.models.deform_attn import MSDeformAttn
from shufflemamba_jax.models.vim import DTYPES, VisionMamba, VisionMambaConfig, _drop_path

# The adapter's strides: c1..c4 at 4, 8, 16, 32; the tokens at 16, which the patch size must be.
STRIDES = (4, 8, 16, 32)
PATCH_SIZE = 16
NUM_INTERACTIONS = 4
# Its LayerNorms (Injector, Extractor): `partial(nn.LayerNorm, eps=1e-6)`.
LAYER_NORM_EPS = 1e-6
# What the adapter adds to the Vim backbone (a classifier has none of it: fresh at warm start);
# it deletes the classifier's final norm `norm_f`.
ADAPTER_PARTS = ("level_embed", "spm", "interactions", "up", "norm1", "norm2", "norm3", "norm4")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """The adapter's own settings, with `Mamba_Adapter`'s defaults (the recipes set heads and ratio).

  conv_inplane: the SPM stem width (c1; c2 is 2x, c3 and c4 4x). n_points, deform_num_heads,
  deform_ratio: the deformable attention's points per head and level, heads, and value width as a
  fraction of the embedding width. init_values: gamma's start. cffn_ratio: the ConvFFN's hidden
  width as a fraction of the embedding width. add_mamba_feature: add the stretches' token maps to
  the outputs. use_extra_extractor: the last interaction's two extra Extractors. norm_momentum,
  norm_eps: the BatchNorms' (Flax's momentum convention: PyTorch's 0.1 is 0.9).
  """

  conv_inplane: int = 64
  n_points: int = 4
  deform_num_heads: int = 6
  init_values: float = 0.0
  cffn_ratio: float = 0.25
  deform_ratio: float = 1.0
  add_mamba_feature: bool = True
  use_extra_extractor: bool = True
  norm_momentum: float = 0.9
  norm_eps: float = 1e-5

  def __post_init__(self):
    for name in ("conv_inplane", "n_points", "deform_num_heads"):
      checks.integer(name, getattr(self, name))
    checks.number("init_values", self.init_values, -math.inf)
    for name in ("cffn_ratio", "deform_ratio"):
      checks.number(name, getattr(self, name))
    for name in ("add_mamba_feature", "use_extra_extractor"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise checks.SettingError(name, getattr(self, name), "must be True or False")
    checks.number("norm_momentum", self.norm_momentum, 0.0, 1.0)
    checks.number("norm_eps", self.norm_eps, 0.0)

  def check_backbone(self, backbone: VisionMambaConfig, out_indices: tuple[int, ...]) -> None:
    """Raises a SettingError for a backbone or stretch ends the adapter cannot run."""
    if backbone.patch_size != PATCH_SIZE:
      raise checks.SettingError(
        "patch_size", backbone.patch_size, f"must be {PATCH_SIZE} for the adapter (its tokens sit at stride 16)"
      )
    if backbone.slws_max_prob:
      raise checks.SettingError(
        "slws_max_prob", backbone.slws_max_prob, "must be 0: the adapter never shuffles (as the official Mamba_Adapter)"
      )
    if len(out_indices) != NUM_INTERACTIONS or out_indices[-1] != backbone.depth - 1:
      raise checks.SettingError(
        "out_indices",
        out_indices,
        f"must end the adapter's {NUM_INTERACTIONS} stretches of blocks, the last at block {backbone.depth - 1}",
      )
    width = backbone.embed_dim
    if width % self.deform_num_heads or int(width * self.deform_ratio) % self.deform_num_heads:
      raise checks.SettingError(
        "deform_num_heads",
        self.deform_num_heads,
        f"must divide embed_dim={width} and int(embed_dim * deform_ratio)={int(width * self.deform_ratio)}",
      )
    if int(width * self.cffn_ratio) < 1:
      raise checks.SettingError("cffn_ratio", self.cffn_ratio, f"gives no hidden width at embed_dim={width}")


def interaction_spans(out_indices: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """The official `interaction_indexes` ([first, last] block of each stretch) of stretch ends."""
  starts = (0,) + tuple(index + 1 for index in out_indices[:-1])
  return tuple(zip(starts, out_indices))


def reference_points(shapes: tuple[tuple[int, int], ...]) -> np.ndarray:
  """(1, sum of h * w, 1, 2) float32: each level's pixel centres, normalised (x, y), stacked."""
  points = []
  for h, w in shapes:
    y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    points.append(np.stack([x.ravel(), y.ravel()], -1))
  return np.concatenate(points).astype(np.float32)[None, :, None]


def _normal(std: float):
  return nnx.initializers.normal(std)


def _conv_init(kernel: tuple[int, int], out_channels: int, groups: int = 1):
  # The official _init_weights: normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out // groups.
  return _normal(math.sqrt(2.0 / (kernel[0] * kernel[1] * out_channels // groups)))


def _batch_norm(features: int, config: AdapterConfig, param_dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(
    features,
    momentum=config.norm_momentum,
    epsilon=config.norm_eps,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    rngs=rngs,
  )


def _layer_norm(features: int, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=LAYER_NORM_EPS, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


class SpatialPriorModule(nnx.Module):
  """The conv stem: images (B, H, W, 3) -> c1 (B, H/4, W/4, D) and c2, c3, c4 flattened (B, n, D)."""

  def __init__(self, inplanes: int, width: int, config: AdapterConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    def conv(cin, cout, kernel, stride, bias):
      return nnx.Conv(
        cin,
        cout,
        kernel_size=(kernel, kernel),
        strides=stride,
        padding=((kernel // 2, kernel // 2),) * 2,
        use_bias=bias,
        kernel_init=_conv_init((kernel, kernel), cout),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )

    bn = lambda features: _batch_norm(features, config, param_dtype, rngs)
    # Keys are the official nn.Sequential indices (ReLUs and the max pool hold no weights).
    self.stem = nnx.Dict(
      {
        "0": conv(3, inplanes, 3, 2, False),
        "1": bn(inplanes),
        "3": conv(inplanes, inplanes, 3, 1, False),
        "4": bn(inplanes),
        "6": conv(inplanes, inplanes, 3, 1, False),
        "7": bn(inplanes),
      }
    )
    self.conv2 = nnx.Dict({"0": conv(inplanes, 2 * inplanes, 3, 2, False), "1": bn(2 * inplanes)})
    self.conv3 = nnx.Dict({"0": conv(2 * inplanes, 4 * inplanes, 3, 2, False), "1": bn(4 * inplanes)})
    self.conv4 = nnx.Dict({"0": conv(4 * inplanes, 4 * inplanes, 3, 2, False), "1": bn(4 * inplanes)})
    for index, cin in enumerate((inplanes, 2 * inplanes, 4 * inplanes, 4 * inplanes), start=1):
      setattr(self, f"fc{index}", conv(cin, width, 1, 1, True))

  def __call__(self, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    def conv_bn_relu(x, conv, norm):
      return jax.nn.relu(norm(conv(x), use_running_average=not train)).astype(conv.dtype)

    x = images
    for conv, norm in (("0", "1"), ("3", "4"), ("6", "7")):
      x = conv_bn_relu(x, self.stem[conv], self.stem[norm])
    # MaxPool2d(3, stride 2, padding 1): the padding never wins the max.
    c1 = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
    c2 = conv_bn_relu(c1, self.conv2["0"], self.conv2["1"])
    c3 = conv_bn_relu(c2, self.conv3["0"], self.conv3["1"])
    c4 = conv_bn_relu(c3, self.conv4["0"], self.conv4["1"])
    maps = [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]
    flat = [m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps[1:]]
    return maps[0], *flat


class DWConv(nnx.Module):
  """The ConvFFN's 3x3 depthwise conv, run on each of c's three maps separately (same weights)."""

  def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dwconv = nnx.Conv(
      dim,
      dim,
      kernel_size=(3, 3),
      padding=((1, 1), (1, 1)),
      feature_group_count=dim,
      kernel_init=_conv_init((3, 3), dim, groups=dim),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """x (B, 21 h w / 4, C): the (2h, 2w), (h, w) and (h/2, w/2) maps of `c`, (h, w) the token grid."""
    h, w = grid
    shapes = ((2 * h, 2 * w), (h, w), (h // 2, w // 2))
    sizes = [a * b for a, b in shapes]
    parts = jnp.split(x, np.cumsum(sizes)[:-1], axis=1)
    out = [self.dwconv(part.reshape(x.shape[0], a, b, x.shape[-1])) for part, (a, b) in zip(parts, shapes)]
    return jnp.concatenate([o.reshape(x.shape[0], -1, x.shape[-1]) for o in out], axis=1)


class ConvFFN(nnx.Module):
  """fc1 -> DWConv -> GELU -> fc2 (dropout 0, as every recipe)."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = dict(kernel_init=_normal(0.02), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = nnx.Linear(dim, hidden, **linear)
    self.dwconv = DWConv(hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, **linear)

  def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.dwconv(self.fc1(x), grid), approximate=False))


class Injector(nnx.Module):
  """tokens + gamma * deformable attention (tokens -> c2, c3, c4)."""

  def __init__(self, dim: int, config: AdapterConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.query_norm = _layer_norm(dim, param_dtype, rngs)
    self.feat_norm = _layer_norm(dim, param_dtype, rngs)
    self.attn = MSDeformAttn(
      dim,
      n_levels=3,
      n_heads=config.deform_num_heads,
      n_points=config.n_points,
      ratio=config.deform_ratio,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.gamma = nnx.Param(jnp.full((dim,), config.init_values, param_dtype))

  def __call__(self, query, reference, feat, shapes):
    attn = self.attn(self.query_norm(query), reference, self.feat_norm(feat), shapes)
    return (query + self.gamma[...] * attn.astype(jnp.float32)).astype(query.dtype)


class Extractor(nnx.Module):
  """c + deformable attention (c -> tokens), then c + drop_path(ConvFFN(norm(c)))."""

  def __init__(self, dim: int, config: AdapterConfig, drop_path: float, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.query_norm = _layer_norm(dim, param_dtype, rngs)
    self.feat_norm = _layer_norm(dim, param_dtype, rngs)
    self.attn = MSDeformAttn(
      dim,
      n_levels=1,
      n_heads=config.deform_num_heads,
      n_points=config.n_points,
      ratio=config.deform_ratio,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.ffn = ConvFFN(dim, int(dim * config.cffn_ratio), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ffn_norm = _layer_norm(dim, param_dtype, rngs)
    self.drop_path = drop_path

  def __call__(self, query, reference, feat, grid, *, key: jax.Array | None):
    """query: c (B, 21 h w / 4, D) float32; feat: the tokens (B, h w, D); key None: no drop path."""
    attn = self.attn(self.query_norm(query), reference, self.feat_norm(feat), (grid,))
    query = query + attn.astype(jnp.float32)
    ffn = self.ffn(self.ffn_norm(query), grid)
    if key is not None and self.drop_path > 0:
      ffn = _drop_path(ffn, self.drop_path, key)
    return query + ffn.astype(jnp.float32)


class InteractionBlock(nnx.Module):
  """One Injector, (the stretch of blocks, run by the backbone), one Extractor (+ 2 extra)."""

  def __init__(
    self, dim: int, config: AdapterConfig, drop_path: float, extra: bool, *, dtype, param_dtype, rngs: nnx.Rngs
  ):
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.injector = Injector(dim, config, **kwargs)
    self.extractor = Extractor(dim, config, drop_path, **kwargs)
    if extra:
      self.extra_extractors = nnx.Dict({str(i): Extractor(dim, config, drop_path, **kwargs) for i in range(2)})

  def extractors(self) -> list[Extractor]:
    extra = getattr(self, "extra_extractors", None)
    return [self.extractor] + ([extra[str(i)] for i in range(len(extra))] if extra is not None else [])


class UpConv(nnx.Module):
  """ConvTranspose2d(kernel 2, stride 2): each input pixel paints its own 2x2 output block.

  Written as one contraction rather than `nnx.ConvTranspose`, whose kernel flip convention would
  have to be matched to PyTorch's; kernel (2, 2, in, out) is `weight.permute(2, 3, 0, 1)`.
  """

  def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_conv_init((2, 2), dim)(rngs.params(), (2, 2, dim, dim), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    kernel = self.kernel[...].astype(self.dtype)
    out = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(self.dtype), kernel)
    return out.reshape(b, 2 * h, 2 * w, -1) + self.bias[...].astype(self.dtype)


class VimAdapter(VisionMamba):
  """The official `Mamba_Adapter`: a patch-only Vim backbone with the ViT-Adapter around it.

  `model(images, train=False)` with images (batch, H, W, 3), H and W multiples of 32, returns the
  four float32 maps (batch, H/s, W/s, D) at strides 4, 8, 16, 32. `train=True` needs `key` and
  turns on drop path (blocks and Extractors) and batch statistics (the running ones update in
  place). The Vim blocks and embeddings keep the classifier's names (`patch_embed`, `pos_embed`
  the patch-only (pos_grid rows x columns, D) table, `layers`), so classification checkpoints
  warm-start them; the rest is `level_embed`, `spm`, `interactions`, `up`, `norm1`..`norm4`.
  """

  def __init__(
    self,
    config: VisionMambaConfig,
    adapter: AdapterConfig,
    *,
    pos_grid: tuple[int, int],
    out_indices: tuple[int, ...],
    rngs: nnx.Rngs,
  ):
    adapter.check_backbone(config, tuple(out_indices))
    super().__init__(config, rngs=rngs)
    self.strip_to_patches(pos_grid, rngs)
    del self.norm_f  # The official adapter deletes it: no final norm.
    self.adapter = adapter
    self.pos_grid = tuple(pos_grid)
    self.spans = interaction_spans(tuple(out_indices))
    dim, dtype, param_dtype = config.embed_dim, DTYPES[config.dtype], DTYPES[config.param_dtype]
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.level_embed = nnx.Param(_normal(1.0)(rngs.params(), (3, dim), param_dtype))
    self.spm = SpatialPriorModule(adapter.conv_inplane, dim, adapter, **kwargs)
    last = len(self.spans) - 1
    self.interactions = nnx.Dict(
      {
        str(k): InteractionBlock(
          dim, adapter, config.drop_path_rate, adapter.use_extra_extractor and k == last, **kwargs
        )
        for k in range(len(self.spans))
      }
    )
    self.up = UpConv(dim, **kwargs)
    for index in range(1, 5):
      setattr(self, f"norm{index}", _batch_norm(dim, adapter, param_dtype, rngs))

  def __call__(self, images: jax.Array, *, train: bool = False, key: jax.Array | None = None) -> list[jax.Array]:
    if train and key is None:
      raise ValueError("training mode needs a PRNG key: model(images, train=True, key=jax.random.key(...))")
    height, width = images.shape[1:3]
    if images.ndim != 4 or height % STRIDES[-1] or width % STRIDES[-1]:
      raise ValueError(
        f"the adapter backbone needs images (batch, H, W, 3) with H and W multiples of {STRIDES[-1]}, got "
        f"shape {images.shape} (pad them, as mmdet's and mmseg's pipelines do)"
      )
    h, w = height // PATCH_SIZE, width // PATCH_SIZE
    level_shapes = ((2 * h, 2 * w), (h, w), (h // 2, w // 2))
    token_reference = jnp.asarray(reference_points(((h, w),)))
    level_reference = jnp.asarray(reference_points(level_shapes))
    block_key = jax.random.fold_in(key, 0) if train else None
    extractor_key = jax.random.fold_in(key, 1) if train else None

    c1, c2, c3, c4 = self.spm(images.astype(DTYPES[self.config.dtype]), train)
    level_embed = self.level_embed[...].astype(jnp.float32)
    c = jnp.concatenate([c2 + level_embed[0], c3 + level_embed[1], c4 + level_embed[2]], axis=1)
    c = c.astype(jnp.float32)
    x, _ = self.embed_patches(images, self.pos_grid)
    residual, stage_maps = None, []
    for k, (first, last) in enumerate(self.spans):
      block = self.interactions[str(k)]
      x = block.injector(x, token_reference, c, level_shapes)
      ((x, residual),) = self.run_layers(x, (last + 1,), train=train, key=block_key, start=first, residual=residual)
      for j, extractor in enumerate(block.extractors()):
        drop_key = jax.random.fold_in(extractor_key, 3 * k + j) if train else None
        c = extractor(c, level_reference, x, (h, w), key=drop_key)
      stage_maps.append(x.astype(jnp.float32).reshape(x.shape[0], h, w, -1))

    parts = jnp.split(c, np.cumsum([a * b for a, b in level_shapes])[:-1], axis=1)
    c2, c3, c4 = (part.reshape(c.shape[0], a, b, -1) for part, (a, b) in zip(parts, level_shapes))
    c1 = self.up(c2).astype(jnp.float32) + c1.astype(jnp.float32)
    levels = [c1, c2, c3, c4]
    if self.adapter.add_mamba_feature:
      levels = [level + tokens.resize_bilinear(m, level.shape[1:3]) for level, m in zip(levels, stage_maps)]
    norms = (self.norm1, self.norm2, self.norm3, self.norm4)
    return [norm(level, use_running_average=not train) for norm, level in zip(norms, levels)]

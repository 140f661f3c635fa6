"""Vision Mamba (Vim) backbone with the stochastic layer-wise shuffle, as a Flax NNX module.

Patch embedding, extra tokens (cls in the middle, cls at the head, or registers), learned
position embeddings, a stack of pre-norm bidirectional Mamba blocks with a float32 residual
stream, and a classification head. The blocks' parameters are stacked on a leading axis and run
under `jax.lax.scan`, so a 48-layer model compiles as fast as a 1-layer one.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.models import slws, ssm, tokens
from shufflemamba_jax.models.mamba import BiMamba, uniform_init
from shufflemamba_jax.parallel import sharding

NORMS = ("rmsnorm", "layernorm")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The stacked blocks: every parameter under this attribute has a leading (depth,) axis.
LAYERS = "layers"
# The classifier's parts that the reference's dense-prediction backbones (`Backbone_VideoMamba`,
# `Mamba_Adapter`) do not have: they scan patch tokens only (a classifier's values for them are
# left out at warm start).
UNUSED_BACKBONE_PARTS = ("head", "neck", "norm_neck", "cls_token", "pos_embed_cls")


@dataclasses.dataclass(frozen=True)
class VisionMambaConfig:
  """Every setting of a Vim / ShuffleMamba / ShuffleMamba-Reg model (see SPEC §2).

  A bad value raises a `checks.SettingError` that names the field. `shuffle_probs`, derived from
  the slws_* fields, is each layer's SLWS probability, (depth,) Python floats.
  """

  img_size: int = 224
  patch_size: int = 16
  num_classes: int = 1000
  embed_dim: int = 192
  depth: int = 24
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | None = None  # None: ceil(embed_dim / 16)
  token_layout: str = "head"  # "middle" (Vim), "head" (ShuffleMamba), "registers" (Mamba-Reg)
  num_registers: int = 0
  cls_reduce: int = 1  # registers: neck width embed_dim // cls_reduce; 1 means no neck
  norm: str = "rmsnorm"
  norm_eps: float = 1e-5
  drop_path_rate: float = 0.0
  slws_max_prob: float = 0.0
  slws_schedule: str = "linear"
  slws_group_size: int = 256
  scan_method: str = ssm.DEFAULT_SCAN_METHOD
  chunk_size: int = ssm.DEFAULT_CHUNK_SIZE
  # Rematerializes each block in the backward pass: without it the backward pass keeps every
  # layer's activations, which is what limits the batch on accelerators (BENCHMARKS.md).
  remat: bool = True
  remat_policy: str = "nothing_saveable"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    positive = "img_size patch_size num_classes embed_dim depth d_state d_conv expand cls_reduce chunk_size"
    for name in [*positive.split(), "slws_group_size"]:
      checks.integer(name, getattr(self, name))
    if self.img_size % self.patch_size:
      raise checks.SettingError("img_size", self.img_size, f"must be divisible by patch_size {self.patch_size}")
    if self.dt_rank is not None:
      checks.integer("dt_rank", self.dt_rank)
    checks.one_of("token_layout", self.token_layout, tokens.TOKEN_LAYOUTS)
    checks.integer("num_registers", self.num_registers, minimum=0)
    if self.token_layout == "registers":
      checks.integer("num_registers", self.num_registers)
      if self.embed_dim % self.cls_reduce:
        raise checks.SettingError("cls_reduce", self.cls_reduce, f"must divide embed_dim {self.embed_dim}")
      tokens.extra_token_indices(self.num_patches, "registers", self.num_registers)
    elif self.num_registers:
      raise checks.SettingError(
        "num_registers", self.num_registers, f"needs token_layout 'registers', not {self.token_layout!r}"
      )
    checks.one_of("norm", self.norm, NORMS)
    checks.number("drop_path_rate", self.drop_path_rate, 0.0, 1.0, high_open=True)
    # An attribute, not a field: asdict (saved in checkpoints), == and hash ignore it.
    probs = slws.layer_shuffle_probabilities(self.depth, self.slws_max_prob, self.slws_schedule)
    object.__setattr__(self, "shuffle_probs", tuple(map(float, probs)))
    checks.one_of("scan_method", self.scan_method, ssm.SCAN_METHODS)
    if not isinstance(self.remat, (bool, np.bool_)):
      raise checks.SettingError("remat", self.remat, "must be True or False")
    checks.one_of("remat_policy", self.remat_policy, REMAT_POLICIES)
    checks.one_of("dtype", self.dtype, DTYPES)
    checks.one_of("param_dtype", self.param_dtype, DTYPES)

  @property
  def grid(self) -> tuple[int, int]:
    return (self.img_size // self.patch_size,) * 2

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def num_extra_tokens(self) -> int:
    return tokens.num_extra_tokens(self.token_layout, self.num_registers)

  @property
  def has_neck(self) -> bool:
    return self.token_layout == "registers" and self.cls_reduce > 1

  @property
  def head_features(self) -> int:
    """Width of the head's input: D, or the registers' (reduced) features concatenated."""
    if self.token_layout != "registers":
      return self.embed_dim
    return self.num_extra_tokens * (self.embed_dim // self.cls_reduce)


def classification_head(config: VisionMambaConfig, rngs: nnx.Rngs) -> nnx.Linear:
  """The freshly initialized head, (head_features -> num_classes), float32 (SPEC §2: normal 0.02)."""
  return nnx.Linear(
    config.head_features,
    config.num_classes,
    kernel_init=nnx.initializers.normal(0.02),
    dtype=jnp.float32,
    param_dtype=DTYPES[config.param_dtype],
    rngs=rngs,
  )


def _norm(config: VisionMambaConfig, dim: int, rngs: nnx.Rngs) -> nnx.Module:
  # Norms run in float32: the residual stream they read is float32.
  kwargs = dict(epsilon=config.norm_eps, dtype=jnp.float32, param_dtype=DTYPES[config.param_dtype], rngs=rngs)
  return nnx.RMSNorm(dim, **kwargs) if config.norm == "rmsnorm" else nnx.LayerNorm(dim, **kwargs)


class Block(nnx.Module):
  """Pre-norm residual block: `hidden = Mixer(Norm(residual))`; the residual add happens outside."""

  def __init__(self, config: VisionMambaConfig, *, rngs: nnx.Rngs):
    self.norm = _norm(config, config.embed_dim, rngs)
    self.mixer = BiMamba(
      config.embed_dim,
      d_state=config.d_state,
      d_conv=config.d_conv,
      expand=config.expand,
      dt_rank=config.dt_rank,
      num_layers=config.depth,
      scan_method=config.scan_method,
      chunk_size=config.chunk_size,
      dtype=DTYPES[config.dtype],
      param_dtype=DTYPES[config.param_dtype],
      rngs=rngs,
    )


def _drop_path(x: jax.Array, rate, key: jax.Array) -> jax.Array:
  """Per-sample stochastic depth: zeroes whole samples with probability `rate`, rescales the rest."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class VisionMamba(nnx.Module):
  """Vim / ShuffleMamba / ShuffleMamba-Reg image classifier.

  Call as `model(images, train=False)` with images (batch, height, width, 3), any float dtype;
  returns float32 logits (batch, num_classes). `train=True` needs `key` (a `jax.random.key`, one
  per step) and turns on drop path and SLWS.
  """

  def __init__(self, config: VisionMambaConfig, *, rngs: nnx.Rngs):
    self.config = config
    dim, dtype, param_dtype = config.embed_dim, DTYPES[config.dtype], DTYPES[config.param_dtype]
    # The reference's trunc_normal_(std=0.02) truncates at +-2 absolute, i.e. at 100 standard
    # deviations: it is a plain normal.
    normal = nnx.initializers.normal(0.02)
    self.patch_embed = nnx.Conv(
      3,
      dim,
      kernel_size=(config.patch_size,) * 2,
      strides=(config.patch_size,) * 2,
      padding="VALID",
      kernel_init=nnx.initializers.lecun_normal(),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    n_extra = config.num_extra_tokens
    self.cls_token = nnx.Param(normal(rngs.params(), (n_extra, dim), param_dtype))
    if config.token_layout == "registers":
      self.pos_embed = nnx.Param(normal(rngs.params(), (config.num_patches, dim), param_dtype))
      self.pos_embed_cls = nnx.Param(normal(rngs.params(), (n_extra, dim), param_dtype))
    else:
      self.pos_embed = nnx.Param(normal(rngs.params(), (config.num_patches + 1, dim), param_dtype))

    @nnx.split_rngs(splits=config.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(layer_rngs):
      return Block(config, rngs=layer_rngs)

    self.layers = make_layers(rngs)
    self.norm_f = _norm(config, dim, rngs)
    if config.has_neck:
      self.neck = nnx.Linear(
        dim,
        dim // config.cls_reduce,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=uniform_init(1 / math.sqrt(dim)),
        rngs=rngs,
      )
      self.norm_neck = nnx.RMSNorm(
        config.head_features, epsilon=config.norm_eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
      )
    self.head = classification_head(config, rngs)
    # Per-layer schedules are static tuples (not arrays), so they are no part of the model state.
    rates = np.linspace(0.0, config.drop_path_rate, config.depth)
    # The reference drops block i-1's output inside block i with rate [0] + rates; the last
    # block's output is dropped at the final add with the full rate.
    self.block_drop_rates = tuple(map(float, np.concatenate([[0.0], rates[:-1]])))

  def position_table(self, grid: tuple[int, int]) -> jax.Array:
    """The (length, D) position embedding in sequence order for a patch grid (resized if needed)."""
    config = self.config
    if config.token_layout == "registers":
      patch_pos = tokens.resize_patch_positions(self.pos_embed[...], config.grid, grid)
      return tokens.insert_extra_tokens(patch_pos[None], self.pos_embed_cls[...][None], "registers")[0]
    return tokens.resize_position_embedding(
      self.pos_embed[...], old_grid=config.grid, new_grid=grid, token_layout=config.token_layout
    )

  def embed(self, images: jax.Array) -> jax.Array:
    """Images (batch, H, W, 3) -> token sequence (batch, length, D) with positions added."""
    config = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (batch, height, width, 3), got shape {images.shape}")
    height, width = images.shape[1:3]
    if height % config.patch_size or width % config.patch_size:
      raise ValueError(f"image size {height}x{width} is not divisible by patch_size {config.patch_size}")
    grid = (height // config.patch_size, width // config.patch_size)
    patches = self.patch_embed(images.astype(DTYPES[config.dtype]))
    patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])  # raster order
    extras = jnp.broadcast_to(self.cls_token[...], (patches.shape[0],) + self.cls_token.shape)
    sequence = tokens.insert_extra_tokens(patches, extras.astype(patches.dtype), config.token_layout)
    return (sequence + self.position_table(grid).astype(sequence.dtype)).astype(DTYPES[config.dtype])

  def strip_to_patches(self, pos_grid: tuple[int, int], rngs: nnx.Rngs) -> None:
    """Makes this classifier the reference's patch-only dense-prediction backbone, in place.

    Deletes UNUSED_BACKBONE_PARTS and puts a fresh patch-only `pos_embed` (rows x columns of
    `pos_grid`, D) in place of the cls-layout table; `embed_patches` then reads it.
    """
    for name in UNUSED_BACKBONE_PARTS + ("pos_embed",):
      if hasattr(self, name):
        delattr(self, name)
    config = self.config
    shape = (pos_grid[0] * pos_grid[1], config.embed_dim)
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shape, DTYPES[config.param_dtype]))

  def embed_patches(self, images: jax.Array, pos_grid: tuple[int, int]) -> tuple[jax.Array, tuple[int, int]]:
    """Images (batch, H, W, 3) -> (patch tokens (batch, h * w, D) with positions added, (h, w)).

    For a `strip_to_patches` backbone: the patch convolution floors, as the reference's does (a
    500-pixel side gives 31 patches), and the `pos_grid` table is resized bicubically to the grid
    seen on every call (the reference's `resize_pos_embed`).
    """
    config = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (batch, height, width, 3), got shape {images.shape}")
    if images.shape[1] < config.patch_size or images.shape[2] < config.patch_size:
      raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is smaller than a {config.patch_size} patch")
    patches = self.patch_embed(images.astype(DTYPES[config.dtype]))
    grid = tuple(patches.shape[1:3])
    positions = tokens.resize_patch_positions(self.pos_embed[...], pos_grid, grid)
    sequence = patches.reshape(patches.shape[0], -1, patches.shape[-1]) + positions.astype(patches.dtype)
    return sequence.astype(DTYPES[config.dtype]), grid

  def __call__(self, images: jax.Array, *, train: bool = False, key: jax.Array | None = None) -> jax.Array:
    ((hidden, residual),) = self.run_blocks(images, (self.config.depth,), train=train, key=key)
    return self.classify(self.final_norm(hidden, residual, train=train, key=key))

  def final_norm(
    self, hidden: jax.Array, residual: jax.Array, *, train: bool = False, key: jax.Array | None = None
  ) -> jax.Array:
    """`norm_f(residual + drop_path(hidden))` after the last block, float32 (batch, length, D).

    The last block's output is dropped with the full drop-path rate (the reference's
    `self.drop_path`); `key` is the one given to `run_blocks`.
    """
    config = self.config
    if train and config.drop_path_rate > 0:
      drop_key = jax.random.fold_in(key, 1)
      hidden = _drop_path(hidden, config.drop_path_rate, jax.random.fold_in(drop_key, config.depth))
    return self.norm_f(residual + hidden.astype(jnp.float32))

  def run_blocks(
    self, images: jax.Array, stops: tuple[int, ...], *, train: bool = False, key: jax.Array | None = None
  ) -> list[tuple[jax.Array, jax.Array]]:
    """Embeds `images` and runs the blocks: `run_layers(self.embed(images), ...)`."""
    return self.run_layers(self.embed(images), stops, train=train, key=key)

  def run_layers(
    self,
    sequence: jax.Array,
    stops: tuple[int, ...],
    *,
    train: bool = False,
    key: jax.Array | None = None,
    start: int = 0,
    residual: jax.Array | None = None,
  ) -> list[tuple[jax.Array, jax.Array]]:
    """Runs the blocks on a token sequence, returning the two streams after each of `stops`.

    Args:
      sequence: (batch, length, D) embedded tokens, positions added (`embed`), compute dtype;
        from `start` > 0 on, the previous block's output (possibly changed, as the adapter's
        injector does).
      stops: increasing block counts in (start, depth]; (depth,) runs the whole stack.
      train, key: as for `__call__` (drop path and SLWS, keyed by block index, so the result
        does not depend on `stops` or `start`).
      start: the first block to run.
      residual: the float32 residual stream block `start - 1` read; None (zeros) for start 0.

    Returns:
      For each stop n, (hidden, residual): block n - 1's output (batch, length, D) in the
      compute dtype, and the float32 residual stream that block read, (batch, length, D). Their
      sum is the token stream after n blocks. Each stretch of blocks between stops is one
      `lax.scan` over its slice of the stacked parameters.
    """
    config = self.config
    stops = tuple(int(stop) for stop in stops)
    if not stops or list(stops) != sorted(set(stops)) or stops[0] <= start or stops[-1] > config.depth:
      raise ValueError(f"stops must be increasing block counts in [{start + 1}, {config.depth}], got {stops}")
    if (residual is None) != (start == 0):
      raise ValueError(f"run_layers from block {start} needs the residual stream of block {start - 1} (only)")
    if train and key is None:
      raise ValueError("training mode needs a PRNG key: model(images, train=True, key=jax.random.key(...))")
    hidden = sharding.constrain_batch(sequence)
    batch, length, _ = hidden.shape
    drop_path = train and config.drop_path_rate > 0
    shuffle = train and config.slws_max_prob > 0
    shuffle_key = jax.random.fold_in(key, 0) if train else None
    drop_key = jax.random.fold_in(key, 1) if train else None
    layer_graph, layer_state = nnx.split(self.layers)

    def block_step(carry, xs):
      hidden, residual = carry
      state, index, prob, drop_rate = xs
      block = nnx.merge(layer_graph, state)
      if drop_path:
        hidden = _drop_path(hidden, drop_rate, jax.random.fold_in(drop_key, index))
      residual = residual + hidden.astype(jnp.float32)
      mixer_in = block.norm(residual).astype(hidden.dtype)
      # Shuffling both streams and restoring both outputs equals shuffling only the mixer's
      # input: the norm, the residual add and drop path act token by token, and gathers are exact.
      if shuffle:
        order = slws.sample_token_permutations(
          jax.random.fold_in(shuffle_key, index), batch, length, prob, config.slws_group_size
        )
        mixer_in = slws.permute_tokens(mixer_in, order)
      out = block.mixer(mixer_in)
      if shuffle:
        out = slws.restore_tokens(out, order)
      out = sharding.constrain_batch(out.astype(hidden.dtype))
      return (out, sharding.constrain_batch(residual)), None

    if config.remat:
      block_step = jax.checkpoint(block_step, policy=REMAT_POLICIES[config.remat_policy], prevent_cse=False)
    xs = (
      layer_state,
      jnp.arange(config.depth),
      jnp.asarray(config.shuffle_probs, jnp.float32),
      jnp.asarray(self.block_drop_rates, jnp.float32),
    )
    carry = (hidden, jnp.zeros(hidden.shape, jnp.float32) if residual is None else residual.astype(jnp.float32))
    outputs = []
    for stop in stops:
      stretch = xs if (start, stop) == (0, config.depth) else jax.tree.map(operator.itemgetter(slice(start, stop)), xs)
      carry, _ = jax.lax.scan(block_step, carry, stretch)
      outputs.append(carry)
      start = stop
    return outputs

  def classify(self, features: jax.Array) -> jax.Array:
    """Final-normed tokens (batch, length, D) -> float32 logits (batch, num_classes)."""
    config = self.config
    num_patches = features.shape[1] - config.num_extra_tokens
    extra_positions = tokens.extra_token_indices(num_patches, config.token_layout, config.num_registers)
    # Pinned to the batch axes: otherwise XLA may lay the gather's gradient out along the width
    # (to meet the FSDP-sharded head) and move the batch between devices to get there.
    extras = sharding.constrain_batch(jnp.take(features, extra_positions, axis=1))  # (batch, n_extra, D)
    if config.has_neck:
      extras = self.norm_neck(self.neck(extras).reshape(extras.shape[0], -1).astype(jnp.float32))
    else:
      extras = extras.reshape(extras.shape[0], -1)
    return self.head(extras.astype(jnp.float32))

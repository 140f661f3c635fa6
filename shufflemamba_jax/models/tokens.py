"""Token layouts of the Vim family and their position embeddings.

Vim puts one cls token in the middle of the patch sequence, ShuffleMamba at its head, and
Mamba-Reg spreads registers evenly through it. A layout is a fixed index map, so inserting and
reading the extra tokens are gathers with static indices, and resizing a position table for
another resolution resizes only the patch slots. The resizes are PyTorch's `interpolate`
(bicubic for position tables, bilinear for feature maps), so that ports match the reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from shufflemamba_jax import checks

TOKEN_LAYOUTS = ("middle", "head", "registers")


def num_extra_tokens(token_layout: str, num_registers: int) -> int:
  """Returns how many non-patch tokens a layout adds (1 cls token, or the registers)."""
  checks.one_of("token_layout", token_layout, TOKEN_LAYOUTS)
  return num_registers if token_layout == "registers" else 1


def extra_token_indices(num_patches: int, token_layout: str, num_registers: int = 0) -> np.ndarray:
  """Returns the sequence positions of the extra tokens, (num_extra,) int32.

  middle: num_patches // 2; head: 0; registers: after each group of num_patches // (n + 1)
  patches, the leftover patches at the end.
  """
  n_extra = num_extra_tokens(token_layout, num_registers)
  if token_layout == "middle":
    return np.array([num_patches // 2], np.int32)
  if token_layout == "head":
    return np.array([0], np.int32)
  group = num_patches // (n_extra + 1)
  if group < 1:
    raise checks.SettingError("num_registers", n_extra, f"must be fewer than the {num_patches} patches")
  return np.array([(i + 1) * group + i for i in range(n_extra)], np.int32)


def sequence_order(num_patches: int, token_layout: str, num_registers: int = 0) -> np.ndarray:
  """Index map of a layout: `sequence = concat([patches, extras])[:, order]`, (length,) int32."""
  n_extra = num_extra_tokens(token_layout, num_registers)
  length = num_patches + n_extra
  extra_positions = extra_token_indices(num_patches, token_layout, num_registers)
  order = np.empty(length, np.int32)
  is_extra = np.zeros(length, bool)
  is_extra[extra_positions] = True
  order[extra_positions] = num_patches + np.arange(n_extra)
  order[~is_extra] = np.arange(num_patches)
  return order


def insert_extra_tokens(patches: jax.Array, extras: jax.Array, token_layout: str) -> jax.Array:
  """Builds the token sequence: patches (batch, P, D) and extras (batch, n, D) -> (batch, P + n, D)."""
  order = sequence_order(patches.shape[1], token_layout, extras.shape[1])
  return jnp.take(jnp.concatenate([patches, extras], axis=1), order, axis=1)


def split_position_table(pos_embed: np.ndarray | jax.Array, num_patches: int, token_layout: str):
  """Splits a (num_patches + 1, D) cls-layout position table into (patch rows, extra row)."""
  extra = extra_token_indices(num_patches, token_layout)
  keep = np.setdiff1d(np.arange(num_patches + 1), extra)
  return pos_embed[keep], pos_embed[extra]


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 weights of PyTorch's 1-D bicubic resampling.

  `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` with a target size and
  no antialiasing: source position (i + 0.5) * in / out - 0.5, Keys' cubic kernel with a = -0.75,
  taps clamped to the edge. jax.image.resize uses a = -0.5 and antialiases when shrinking, so it
  does not reproduce the reference's position tables.
  """
  a = -0.75
  scale = in_size / out_size
  source = (np.arange(out_size) + 0.5) * scale - 0.5
  base = np.floor(source)
  t = source - base
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  matrix = np.zeros((out_size, in_size))
  for tap in range(4):
    index = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), index), weights[:, tap])
  return matrix


def resize_bicubic(grid: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(h, w, C) -> (*size, C), float32: PyTorch's bicubic `interpolate` (see `bicubic_matrix`).

  Two small matrix products with constant weights, so it is exact up to float32 rounding,
  differentiable, and cheap enough to run on every forward pass.
  """
  (h, w), (h2, w2) = grid.shape[:2], tuple(size)
  if (h, w) == (h2, w2):
    return grid.astype(jnp.float32)
  rows = jnp.asarray(bicubic_matrix(h, h2), jnp.float32)
  cols = jnp.asarray(bicubic_matrix(w, w2), jnp.float32)
  return jnp.einsum("ih,hwc,jw->ijc", rows, grid.astype(jnp.float32), cols, precision=jax.lax.Precision.HIGHEST)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(batch, h, w, C) -> (batch, *size, C), PyTorch's `interpolate(bilinear, align_corners=False)`.

  Half-pixel centers and no antialiasing, up or down, as mmseg's `resize`.
  """
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method="bilinear", antialias=False)


def resize_patch_positions(table: jax.Array, old_grid, new_grid) -> jax.Array:
  """Bicubically resizes (h * w, D) patch position rows on their grid to (h2 * w2, D), as the
  reference's `F.interpolate(mode="bicubic", align_corners=False)`."""
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  if old_grid == new_grid:
    return table
  dim = table.shape[-1]
  resized = resize_bicubic(jnp.asarray(table).reshape(*old_grid, dim), new_grid)
  return resized.reshape(-1, dim).astype(table.dtype)


def resize_position_embedding(pos_embed, *, old_grid, new_grid, token_layout: str) -> jax.Array:
  """Resizes a position table for another patch grid, keeping the extra-token slot as it is.

  Args:
    pos_embed: (h * w + 1, D) for the "middle" and "head" layouts (cls slot at its layout index),
      or the patch-only (h * w, D) table of the "registers" layout.
    old_grid, new_grid: (rows, columns) of patches.
    token_layout: "middle", "head" or "registers".

  Returns:
    (h2 * w2 [+ 1], D), the cls slot at the new layout's index.
  """
  old_patches = int(np.prod(old_grid))
  if token_layout == "registers":
    if pos_embed.shape[0] != old_patches:
      raise ValueError(f"pos_embed has {pos_embed.shape[0]} rows, expected {old_patches} for grid {old_grid}")
    return resize_patch_positions(pos_embed, old_grid, new_grid)
  if pos_embed.shape[0] != old_patches + 1:
    raise ValueError(f"pos_embed has {pos_embed.shape[0]} rows, expected {old_patches + 1} for grid {old_grid}")
  patch_rows, extra_row = split_position_table(pos_embed, old_patches, token_layout)
  patch_rows = resize_patch_positions(jnp.asarray(patch_rows), old_grid, new_grid)
  new_patches = int(np.prod(new_grid))
  combined = jnp.concatenate([patch_rows, jnp.asarray(extra_row, patch_rows.dtype)], axis=0)
  return jnp.take(combined, sequence_order(new_patches, token_layout), axis=0)


def resize_pos_embed_table(pos_embed, new_grid, token_layout: str) -> jax.Array:
  """Resizes a saved position table to `new_grid`, its old grid inferred as a square.

  Checkpoints store the table but not the grid it was trained on; every resolution here is a
  square image, so the grid side is the square root of the patch rows (all rows but the cls
  slot, or all rows of the patch-only "registers" table). Raises a ValueError naming the shape
  when the rows do not form a square grid.
  """
  extra = 0 if token_layout == "registers" else num_extra_tokens(token_layout, 0)
  shape = tuple(pos_embed.shape)
  patches = shape[0] - extra if len(shape) == 2 else 0
  side = math.isqrt(max(patches, 0))
  if patches < 1 or side * side != patches:
    raise ValueError(
      f"cannot infer the square patch grid of a pos_embed of shape {shape} with token_layout {token_layout!r}"
    )
  return resize_position_embedding(
    pos_embed, old_grid=(side, side), new_grid=tuple(new_grid), token_layout=token_layout
  )

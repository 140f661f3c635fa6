"""Token layouts (cls middle / head, registers) and position-embedding resizing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflemamba_jax.models import tokens


def test_vim_cls_sits_in_the_middle_and_shufflemamba_cls_at_the_head():
  assert tokens.extra_token_indices(196, "middle").tolist() == [98]
  assert tokens.extra_token_indices(196, "head").tolist() == [0]


def test_registers_follow_groups_of_patches_with_leftovers_at_the_end():
  positions = tokens.extra_token_indices(196, "registers", 12)
  # 196 // 13 = 15 patches, then a register; 12 groups use 180 patches, 16 are left at the end.
  assert positions.tolist() == [15 + 16 * i for i in range(12)]
  order = tokens.sequence_order(196, "registers", 12)
  assert len(order) == 208 and sorted(order) == list(range(208))
  assert (order[-16:] == np.arange(180, 196)).all()


@pytest.mark.parametrize("layout,n", [("middle", 1), ("head", 1), ("registers", 3)])
def test_insert_puts_patches_in_raster_order_and_extras_at_their_slots(layout, n):
  patches = jnp.arange(16, dtype=jnp.float32).reshape(1, 16, 1)
  extras = -1 - jnp.arange(n, dtype=jnp.float32).reshape(1, n, 1)
  sequence = np.asarray(tokens.insert_extra_tokens(patches, extras, layout))[0, :, 0]
  slots = tokens.extra_token_indices(16, layout, n if layout == "registers" else 0)
  assert sequence[slots].tolist() == (-1 - np.arange(n)).tolist()
  assert np.delete(sequence, slots).tolist() == list(range(16))


def test_unknown_layout_is_named():
  with pytest.raises(ValueError, match="token_layout"):
    tokens.num_extra_tokens("tail", 0)


@pytest.mark.parametrize("layout", ["middle", "head"])
def test_resize_keeps_the_cls_slot_and_interpolates_patches(layout):
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(17, 8)), jnp.float32)  # 4x4 grid + cls
  same = tokens.resize_position_embedding(table, old_grid=(4, 4), new_grid=(4, 4), token_layout=layout)
  np.testing.assert_array_equal(same, table)
  bigger = tokens.resize_position_embedding(table, old_grid=(4, 4), new_grid=(6, 6), token_layout=layout)
  assert bigger.shape == (37, 8)
  old_cls = tokens.extra_token_indices(16, layout)[0]
  new_cls = tokens.extra_token_indices(36, layout)[0]
  np.testing.assert_array_equal(bigger[new_cls], table[old_cls])
  # A constant patch grid stays constant under bicubic resizing.
  flat = jnp.ones((17, 8)).at[old_cls].set(5.0)
  resized = tokens.resize_position_embedding(flat, old_grid=(4, 4), new_grid=(6, 6), token_layout=layout)
  np.testing.assert_allclose(np.delete(np.asarray(resized), new_cls, axis=0), 1.0, atol=1e-5)


def test_resize_registers_table_is_patch_only():
  table = jnp.ones((16, 4))
  assert tokens.resize_position_embedding(table, old_grid=(4, 4), new_grid=(8, 8), token_layout="registers").shape == (
    64,
    4,
  )
  with pytest.raises(ValueError, match="rows"):
    tokens.resize_position_embedding(jnp.ones((17, 4)), old_grid=(4, 4), new_grid=(8, 8), token_layout="registers")


def test_resize_is_jittable():
  fn = jax.jit(lambda t: tokens.resize_position_embedding(t, old_grid=(2, 2), new_grid=(3, 3), token_layout="head"))
  assert fn(jnp.ones((5, 2))).shape == (10, 2)


@pytest.mark.parametrize("layout,rows", [("middle", 17), ("head", 17), ("registers", 16)])
def test_a_saved_table_is_resized_from_its_inferred_square_grid(layout, rows):
  table = jnp.asarray(np.random.default_rng(1).normal(size=(rows, 4)), jnp.float32)
  resized = tokens.resize_pos_embed_table(table, (6, 6), layout)
  expected = tokens.resize_position_embedding(table, old_grid=(4, 4), new_grid=(6, 6), token_layout=layout)
  np.testing.assert_array_equal(resized, expected)
  with pytest.raises(ValueError, match=r"square patch grid.*\(" + str(rows + 1) + r", 4\)"):
    tokens.resize_pos_embed_table(jnp.ones((rows + 1, 4)), (6, 6), layout)


@pytest.mark.parametrize("old,new", [((14, 14), (32, 32)), ((14, 14), (32, 43)), ((14, 14), (9, 5)), ((4, 6), (4, 3))])
def test_bicubic_resize_equals_torch_interpolate(old, new):
  """Up and down, square and not: the reference resizes position tables with torch's bicubic."""
  torch = pytest.importorskip("torch")
  grid = np.random.default_rng(2).normal(size=(*old, 5))
  expected = torch.nn.functional.interpolate(
    torch.from_numpy(grid).permute(2, 0, 1)[None], size=new, mode="bicubic", align_corners=False
  )[0].permute(1, 2, 0)
  resized = tokens.resize_bicubic(jnp.asarray(grid, jnp.float32), new)
  np.testing.assert_allclose(np.asarray(resized), expected.numpy(), rtol=1e-5, atol=1e-5)
  table = tokens.resize_patch_positions(jnp.asarray(grid.reshape(-1, 5), jnp.float32), old, new)
  np.testing.assert_allclose(np.asarray(table), expected.numpy().reshape(-1, 5), rtol=1e-5, atol=1e-5)

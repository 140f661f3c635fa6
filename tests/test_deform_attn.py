"""Multi-scale deformable attention against a float64 PyTorch transcription of Deformable DETR's
`ms_deform_attn_core_pytorch` (grid_sample per level) and of the official `MSDeformAttn.forward`
(tests/torch_reference.py): values, gradients, the module with a padding mask, its initialisation,
and the one-gather layout that the op is designed around."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.checks import SettingError
from shufflemamba_jax.models.deform_attn import MSDeformAttn, ms_deform_attn

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402

# Non-square levels, one of them a single column; S = 35 + 12 + 2.
SHAPES = ((5, 7), (3, 4), (2, 1))
LENGTH = sum(h * w for h, w in SHAPES)
BATCH, QUERIES, HEADS, DEPTH, POINTS = 2, 6, 3, 4, 4

op = jax.jit(ms_deform_attn, static_argnums=1)


def special_locations(height: int, width: int) -> np.ndarray:
  """(x, y) points on the edges of the map, on pixel centres, a whole pixel outside and far away."""
  xs = [0.0, 1.0, 0.5 / width, (width - 0.5) / width, -0.5 / width, (width + 0.5) / width, -0.7, 1.6]
  ys = [0.0, 1.0, 0.5 / height, (height - 0.5) / height, -0.5 / height, (height + 0.5) / height, 0.5, 0.3]
  grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
  centre = np.array([[(1.5 / width), (0.5 / height)], [0.0, 0.5 / height], [1.0, 0.0], [0.5 / width, 1.0]])
  return np.concatenate([grid, centre])


def random_inputs(seed: int, special: bool = True):
  """value, sampling_locations in [-0.2, 1.2] (some points wholly or partly outside) and
  attention_weights, float64; `special` overwrites some locations with `special_locations`."""
  rng = np.random.default_rng(seed)
  value = rng.normal(size=(BATCH, LENGTH, HEADS, DEPTH))
  locations = rng.uniform(-0.2, 1.2, size=(BATCH, QUERIES, HEADS, len(SHAPES), POINTS, 2))
  weights = rng.uniform(0.1, 1.0, size=(BATCH, QUERIES, HEADS, len(SHAPES), POINTS))
  if special:
    for level, (h, w) in enumerate(SHAPES):
      points = special_locations(h, w)
      flat = locations[:, :, :, level].reshape(-1, 2)  # a copy: written back below
      flat[: len(points)] = points
      locations[:, :, :, level] = flat.reshape(locations[:, :, :, level].shape)
  return value, locations, weights


def reference(value, locations, weights):
  as_torch = [torch.as_tensor(a, dtype=torch.float64) for a in (value, locations, weights)]
  return torch_reference.ms_deform_attn(as_torch[0], SHAPES, *as_torch[1:]).numpy()


def test_matches_grid_sample_in_float64():
  value, locations, weights = random_inputs(0)
  want = reference(value, locations, weights)
  with jax.enable_x64(True):
    got = op(jnp.asarray(value), SHAPES, jnp.asarray(locations), jnp.asarray(weights))
    assert got.dtype == jnp.float64
    got = np.asarray(got)
  assert got.shape == (BATCH, QUERIES, HEADS * DEPTH)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


def test_matches_grid_sample_in_float32():
  value, locations, weights = random_inputs(1)
  want = reference(value, locations, weights)
  value, locations, weights = (jnp.asarray(a, jnp.float32) for a in (value, locations, weights))
  got = op(value, SHAPES, locations, weights)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_special_points():
  """Points a whole pixel or more outside read nothing; on a pixel centre they read that pixel."""
  value = np.arange(LENGTH * 1.0).reshape(1, LENGTH, 1, 1) + 1
  h, w = SHAPES[0]
  locations = np.array([[-0.5 / w, 0.5], [0.5, (h + 0.5) / h], [-0.7, 0.5], [2.5 / w, 1.5 / h], [0.0, 0.5 / h]])
  locations = np.broadcast_to(locations[None, :, None, None, None, :], (1, 5, 1, len(SHAPES), 1, 2))
  weights = np.zeros((1, 5, 1, len(SHAPES), 1), np.float32)
  weights[..., 0, :] = 1  # only the first level
  value, locations = jnp.asarray(value, jnp.float32), jnp.asarray(locations, jnp.float32)
  got = np.asarray(op(value, SHAPES, locations, jnp.asarray(weights)))
  # Pixel (1, 2) holds 1 + 1*7 + 2; the left edge at row 0 is half of pixel (0, 0).
  np.testing.assert_allclose(got[0, :, 0], [0, 0, 0, 10, 0.5], atol=1e-5)


def test_gradients_match_torch_autograd():
  # Random points only: grid_sample's location gradient jumps where a coordinate is a whole pixel.
  value, locations, weights = random_inputs(2, special=False)
  cotangent = np.random.default_rng(3).normal(size=(BATCH, QUERIES, HEADS * DEPTH))
  leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (value, locations, weights)]
  out = torch_reference.ms_deform_attn(leaves[0], SHAPES, leaves[1], leaves[2])
  (out * torch.as_tensor(cotangent)).sum().backward()
  with jax.enable_x64(True):

    def loss(v, loc, att):
      return jnp.sum(ms_deform_attn(v, SHAPES, loc, att) * cotangent)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(value), jnp.asarray(locations), jnp.asarray(weights))
    grads = [np.asarray(g) for g in grads]
  for name, got, leaf in zip(("value", "sampling_locations", "attention_weights"), grads, leaves):
    want = leaf.grad.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * np.abs(want).max(), err_msg=name)


def state_dict(module: MSDeformAttn) -> dict:
  """The module's parameters under the official names: Linear weight (out, in), bias."""
  return {
    f"{name}.{kind}": np.array(getattr(module, name).kernel[...]).T
    if kind == "weight"
    else np.array(getattr(module, name).bias[...])
    for name in ("value_proj", "sampling_offsets", "attention_weights", "output_proj")
    for kind in ("weight", "bias")
  }


def randomize(module: MSDeformAttn, seed: int) -> None:
  """Non-zero values for every parameter (the initial offset and attention kernels are zero)."""
  rng = np.random.default_rng(seed)
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  # Scale 0.3: offsets of a pixel or so, sampling locations inside and outside the maps.
  leaves = [jnp.asarray(rng.normal(scale=0.3, size=leaf.shape), leaf.dtype) for leaf in leaves]
  nnx.update(module, jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("broadcast_reference", [False, True])
def test_module_matches_official_forward(broadcast_reference):
  d_model, n_heads, n_points = 12, 3, 2
  rng = np.random.default_rng(5)
  query = rng.normal(size=(BATCH, QUERIES, d_model))
  features = rng.normal(size=(BATCH, LENGTH, d_model))
  mask = rng.uniform(size=(BATCH, LENGTH)) < 0.3
  # ViT-Adapter's form: one (1, Lq, 1, 2) set of reference points for every image and level.
  ref_shape = (1, QUERIES, 1, 2) if broadcast_reference else (BATCH, QUERIES, len(SHAPES), 2)
  reference_points = rng.uniform(size=ref_shape)
  with jax.enable_x64(True):
    module = MSDeformAttn(
      d_model, len(SHAPES), n_heads, n_points, ratio=0.5, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
    )
    randomize(module, 6)
    got = np.asarray(module(jnp.asarray(query), jnp.asarray(reference_points), jnp.asarray(features), SHAPES, mask))
  want = torch_reference.ms_deform_attn_module(
    state_dict(module), query, reference_points, features, SHAPES, n_heads, n_points, torch.as_tensor(mask)
  ).numpy()
  assert got.shape == (BATCH, QUERIES, d_model)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


def test_initialisation_matches_official():
  d_model, n_levels, n_heads, n_points = 16, 3, 8, 4
  module = MSDeformAttn(d_model, n_levels, n_heads, n_points, rngs=nnx.Rngs(0))
  # The official `_reset_parameters`, in float32 as there.
  thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
  grid = torch.stack([thetas.cos(), thetas.sin()], -1)
  grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)
  grid = grid * torch.arange(1, n_points + 1, dtype=torch.float32)[None, None, :, None]
  np.testing.assert_allclose(np.asarray(module.sampling_offsets.bias[...]), grid.reshape(-1).numpy(), atol=1e-6)
  for zero in (module.sampling_offsets.kernel, module.attention_weights.kernel, module.attention_weights.bias):
    assert not np.asarray(zero[...]).any()
  bound = math.sqrt(6 / (d_model + d_model))  # xavier_uniform_ of a (d_model, d_model) weight
  for projection in (module.value_proj, module.output_proj):
    kernel = np.asarray(projection.kernel[...])
    assert not np.asarray(projection.bias[...]).any()
    assert kernel.std() > bound / 3 and np.abs(kernel).max() <= bound


def test_module_attention_in_float32_under_bfloat16():
  """The projections run in bfloat16, the sampling (one gather) in float32, as the official op."""
  d_model = 16
  module = MSDeformAttn(d_model, len(SHAPES), 4, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  randomize(module, 7)
  graphdef, state = nnx.split(module)

  def forward(state, query, reference_points, features):
    return nnx.merge(graphdef, state)(query, reference_points, features, SHAPES)

  rng = np.random.default_rng(8)
  args = (
    jnp.asarray(rng.normal(size=(1, QUERIES, d_model)), jnp.float32),
    jnp.asarray(rng.uniform(size=(1, QUERIES, 1, 2)), jnp.float32),
    jnp.asarray(rng.normal(size=(1, LENGTH, d_model)), jnp.float32),
  )
  lowered = jax.jit(forward).lower(state, *args)
  gathers = [line for line in lowered.as_text().splitlines() if '"stablehlo.gather"' in line]
  assert len(gathers) == 1 and "xf32>" in gathers[0].split("->")[-1], gathers
  got = lowered.compile()(state, *args)
  assert got.dtype == jnp.bfloat16
  want = MSDeformAttn(d_model, len(SHAPES), 4, 2, rngs=nnx.Rngs(0))
  nnx.update(want, state)
  want = np.asarray(want(*args[:3], SHAPES))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05, atol=0.05 * np.abs(want).max())


def count_ops(stablehlo: str, op: str) -> int:
  """Occurrences of the StableHLO op `op` in a lowered module's text (not of its attributes)."""
  return stablehlo.count(f'"stablehlo.{op}"')


def test_one_gather_and_one_scatter():
  """The design: every level, point and corner read by one gather (its gradient one scatter)."""
  shapes = ((32, 32), (16, 16), (8, 8))
  n, m, d, levels, points = 2, 6, 32, len(shapes), 4
  queries = sum(h * w for h, w in shapes)
  args = (
    jax.ShapeDtypeStruct((n, queries, m, d), jnp.float32),
    jax.ShapeDtypeStruct((n, queries, m, levels, points, 2), jnp.float32),
    jax.ShapeDtypeStruct((n, queries, m, levels, points), jnp.float32),
  )
  forward = jax.jit(lambda v, loc, att: ms_deform_attn(v, shapes, loc, att)).lower(*args)
  text = forward.as_text()
  assert count_ops(text, "gather") == 1 and count_ops(text, "scatter") == 0
  forward.compile()
  backward = jax.jit(jax.grad(lambda v, loc, att: ms_deform_attn(v, shapes, loc, att).sum(), argnums=(0, 1, 2)))
  text = backward.lower(*args).as_text()
  assert count_ops(text, "gather") == 1 and count_ops(text, "scatter") == 1


def test_errors_name_the_argument():
  value, locations, weights = (jnp.asarray(a, jnp.float32) for a in random_inputs(9, special=False))
  with pytest.raises(SettingError, match="spatial_shapes.*positions"):
    ms_deform_attn(value, ((5, 7), (3, 4), (2, 2)), locations, weights)
  with pytest.raises(SettingError, match="spatial_shapes.*levels"):
    ms_deform_attn(value, SHAPES[:2], locations, weights)
  with pytest.raises(SettingError, match="spatial_shapes"):
    ms_deform_attn(value, ((5, 7.0), (3, 4), (2, 1)), locations, weights)
  with pytest.raises(ValueError, match="attention_weights"):
    ms_deform_attn(value, SHAPES, locations, weights[..., :1])
  with pytest.raises(ValueError, match="sampling_locations"):
    ms_deform_attn(value, SHAPES, locations[..., :1], weights)
  with pytest.raises(SettingError, match="n_heads"):
    MSDeformAttn(12, 3, 5, 2, rngs=nnx.Rngs(0))
  with pytest.raises(SettingError, match="ratio"):
    MSDeformAttn(12, 3, 3, 2, ratio=0.1, rngs=nnx.Rngs(0))
  module = MSDeformAttn(12, 3, 3, 2, rngs=nnx.Rngs(0))
  query, features = jnp.zeros((2, QUERIES, 12)), jnp.zeros((2, LENGTH, 12))
  with pytest.raises(ValueError, match="reference_points.*box"):
    module(query, jnp.zeros((2, QUERIES, 3, 4)), features, SHAPES)
  with pytest.raises(ValueError, match="reference_points"):
    module(query, jnp.zeros((2, QUERIES, 2, 2)), features, SHAPES)
  with pytest.raises(ValueError, match="input_padding_mask"):
    module(query, jnp.zeros((2, QUERIES, 3, 2)), features, SHAPES, jnp.zeros((2, 3), bool))
  with pytest.raises(SettingError, match="spatial_shapes"):
    module(query, jnp.zeros((2, QUERIES, 3, 2)), features, ((5, 7), (3, 4)))

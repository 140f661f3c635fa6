"""The ViT-Adapter backbone against a float64 PyTorch transcription of the reference's
`Mamba_Adapter.forward` (tests/torch_reference.py), its official-layout state dict both ways, and
its settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.models import SettingError, adapter, upernet, variants
from shufflemamba_jax.weights import params as params_lib
from shufflemamba_jax.weights import pytorch

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402

# Two sizes: (embed_dim, depth, deform heads, SPM width, out_indices).
SIZES = {"one_block_stretches": (48, 4, 6, (0, 1, 2, 3), 16), "two_block_stretches": (64, 8, 8, (1, 3, 5, 7), 8)}


def backbone_config(width: int, depth: int, **overrides):
  settings = dict(
    embed_dim=width, depth=depth, d_state=8, img_size=64, norm="layernorm", remat=False, slws_max_prob=0.0
  )
  return variants.model_config("shufflemamba_tiny", **{**settings, **overrides})


def random_adapter(width, depth, heads, out_indices, inplane, seed=0, **settings) -> adapter.VimAdapter:
  """A VimAdapter whose every parameter and BatchNorm statistic is random (gamma, offsets and
  zero-initialized projections included), so that no part can hide behind its initialization."""
  config = adapter.AdapterConfig(conv_inplane=inplane, deform_num_heads=heads, deform_ratio=0.5, **settings)
  model = adapter.VimAdapter(
    backbone_config(width, depth), config, pos_grid=(3, 3), out_indices=out_indices, rngs=nnx.Rngs(seed)
  )
  rng = np.random.default_rng(seed)
  for selector in (nnx.Param, nnx.BatchStat):
    state = nnx.state(model, selector)
    flat = params_lib.flatten(nnx.to_pure_dict(state))
    for name, value in flat.items():
      noise = rng.normal(scale=0.1, size=value.shape)
      if name.endswith(".var"):
        value = 0.5 + rng.uniform(size=value.shape)
      elif name.endswith((".A_log", ".A_b_log")):
        value = value + noise
      elif name.endswith(("dt_proj.kernel", "dt_proj_b.kernel")):
        value = value + 0.1 * noise
      else:
        value = value + noise
      flat[name] = jnp.asarray(np.asarray(value, np.float32))
    nnx.replace_by_pure_dict(state, params_lib.unflatten(flat))
    nnx.update(model, state)
  return model


def state_dict_of(model) -> dict[str, np.ndarray]:
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  return pytorch.export_state_dict(params, stats)


@pytest.mark.parametrize(
  "size, image_size, extra", [("one_block_stretches", (64, 96), True), ("two_block_stretches", (96, 64), False)]
)
def test_adapter_equals_the_reference(size, image_size, extra):
  width, depth, heads, out_indices, inplane = SIZES[size]
  model = random_adapter(width, depth, heads, out_indices, inplane, use_extra_extractor=extra)
  images = np.random.default_rng(1).normal(size=(2, *image_size, 3)).astype(np.float32)
  maps = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))
  state_dict = state_dict_of(model)
  assert ("interactions.3.extra_extractors.1.ffn.fc2.weight" in state_dict) == extra
  spans = [list(span) for span in adapter.interaction_spans(out_indices)]
  expected = torch_reference.adapter_backbone(
    state_dict, images.transpose(0, 3, 1, 2), spans, pos_grid=(3, 3), deform_heads=heads
  )
  h, w = image_size
  for level, (ours, theirs) in enumerate(zip(maps, expected)):
    stride = adapter.STRIDES[level]
    assert ours.shape == (2, h // stride, w // stride, width) and ours.dtype == jnp.float32
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    error = np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max()
    assert error < 1e-4, (level, error)


def test_state_dict_round_trips_and_names_the_official_tensors():
  width, depth, heads, out_indices, inplane = SIZES["one_block_stretches"]
  model = random_adapter(width, depth, heads, out_indices, inplane)
  state_dict = state_dict_of(model)
  # The official layouts (spot checks of each rule) and PyTorch's BatchNorm counters.
  assert state_dict["spm.stem.0.weight"].shape == (inplane, 3, 3, 3)
  assert state_dict["spm.conv4.1.running_var"].shape == (4 * inplane,)
  assert state_dict["spm.fc2.weight"].shape == (width, 2 * inplane, 1, 1)
  assert state_dict["up.weight"].shape == (width, width, 2, 2)
  assert state_dict["interactions.0.extractor.ffn.dwconv.dwconv.weight"].shape == (width // 4, 1, 3, 3)
  assert state_dict["interactions.0.injector.query_norm.weight"].shape == (width,)
  assert state_dict["interactions.2.injector.attn.value_proj.weight"].shape == (width // 2, width)
  assert state_dict["norm4.num_batches_tracked"].dtype == np.int64
  assert state_dict["pos_embed"].shape == (1, 9, width) and state_dict["level_embed"].shape == (3, width)
  assert not any(name.startswith(("norm_f", "cls_token", "head")) for name in state_dict)

  params, stats = pytorch.split_state(pytorch.to_flat(state_dict))
  ours = params_lib.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  filled = params_lib.flatten(params_lib.fill(params_lib.unflatten(ours), params, source="test"))
  assert all(np.array_equal(filled[name], ours[name]) for name in ours)
  our_stats = params_lib.flatten(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  assert sorted(stats) == sorted(our_stats)
  assert all(np.array_equal(stats[name], our_stats[name]) for name in our_stats)


def test_adapter_training_mode_uses_batch_statistics_and_drop_path():
  width, depth, heads, out_indices, inplane = SIZES["one_block_stretches"]
  config = adapter.AdapterConfig(conv_inplane=inplane, deform_num_heads=heads, deform_ratio=0.5)
  backbone = backbone_config(width, depth, drop_path_rate=0.5)
  model = adapter.VimAdapter(backbone, config, pos_grid=(4, 4), out_indices=out_indices, rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(2).normal(size=(4, 64, 64, 3)), jnp.float32)
  before = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  step = nnx.jit(lambda m, x, k: m(x, train=True, key=k))
  first = step(model, images, jax.random.key(0))
  after = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  # Every BatchNorm (stem, SPM convs, output norms) moved its running statistics.
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert all(moved) and len(moved) == 2 * 10
  # Training-mode maps are batch-normalised with the batch's own statistics.
  for level in first:
    assert np.allclose(np.asarray(level).mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  second = step(model, images, jax.random.key(1))
  assert not np.allclose(np.asarray(first[3]), np.asarray(second[3]))  # Drop path draws differ.
  with pytest.raises(ValueError, match="needs a PRNG key"):
    model(images, train=True)


def test_adapter_refuses_what_it_cannot_run():
  config = adapter.AdapterConfig(deform_num_heads=6, conv_inplane=8)
  model = adapter.VimAdapter(
    backbone_config(48, 4), config, pos_grid=(4, 4), out_indices=(0, 1, 2, 3), rngs=nnx.Rngs(0)
  )
  with pytest.raises(ValueError, match="multiples of 32"):
    model(jnp.zeros((1, 48, 64, 3)))
  with pytest.raises(SettingError, match="slws_max_prob"):
    adapter.VimAdapter(
      backbone_config(48, 4, slws_max_prob=0.5), config, pos_grid=(4, 4), out_indices=(0, 1, 2, 3), rngs=nnx.Rngs(0)
    )
  with pytest.raises(SettingError, match="patch_size"):
    adapter.VimAdapter(
      backbone_config(48, 4, patch_size=8), config, pos_grid=(8, 8), out_indices=(0, 1, 2, 3), rngs=nnx.Rngs(0)
    )
  with pytest.raises(SettingError, match="out_indices"):
    adapter.VimAdapter(backbone_config(48, 4), config, pos_grid=(4, 4), out_indices=(0, 1, 2, 2), rngs=nnx.Rngs(0))
  with pytest.raises(SettingError, match="deform_num_heads"):
    adapter.AdapterConfig(deform_num_heads=5).check_backbone(backbone_config(48, 4), (0, 1, 2, 3))
  with pytest.raises(SettingError, match="neck"):
    upernet.UperNetConfig(backbone=backbone_config(48, 4), adapter=config, neck="simple_pyramid")


def test_interaction_spans_are_the_official_indexes():
  # The base / middle / large configs' interaction_indexes from their out_indices.
  assert adapter.interaction_spans((5, 11, 17, 23)) == ((0, 5), (6, 11), (12, 17), (18, 23))
  assert adapter.interaction_spans((7, 15, 23, 31)) == ((0, 7), (8, 15), (16, 23), (24, 31))
  assert adapter.interaction_spans((11, 23, 35, 47)) == ((0, 11), (12, 23), (24, 35), (36, 47))
  assert upernet.default_out_indices(48) == (11, 23, 35, 47)
  points = adapter.reference_points(((2, 4), (1, 2)))
  assert points.shape == (1, 10, 1, 2)
  np.testing.assert_allclose(points[0, :4, 0], [[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]])
  np.testing.assert_allclose(points[0, 8:, 0], [[0.25, 0.5], [0.75, 0.5]])

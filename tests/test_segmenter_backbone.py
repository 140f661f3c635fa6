"""The segmentation backbone against a float64 PyTorch transcription of the reference's
`Backbone_VideoMamba.forward` (tests/torch_reference.py): patch tokens only, the pretraining
position table resized per call, mixer outputs at the earlier taps and the final norm at the last."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.models import upernet, variants
from shufflemamba_jax.weights import params as params_lib
from shufflemamba_jax.weights import pytorch

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402


def segmenter(norm: str, depth: int, out_indices, pos_embed_size: int = 64, **backbone) -> upernet.UperNet:
  backbone = variants.model_config(
    "shufflemamba_tiny", embed_dim=48, depth=depth, d_state=8, img_size=64, norm=norm, remat=False, **backbone
  )
  config = upernet.UperNetConfig(
    backbone=backbone,
    num_classes=5,
    channels=16,
    aux_channels=8,
    out_indices=out_indices,
    pos_embed_size=pos_embed_size,
  )
  model = upernet.UperNet(config, rngs=nnx.Rngs(3))
  # Non-trivial norms, so LayerNorm and RMSNorm (and their biases) are told apart.
  state = nnx.state(model, nnx.Param)
  flat = params_lib.flatten(nnx.to_pure_dict(state))
  rng = np.random.default_rng(4)
  for name, value in flat.items():
    if "norm" in name.split(".")[-2] and name.startswith("backbone"):
      flat[name] = value + rng.normal(scale=0.2, size=value.shape).astype(np.float32)
  nnx.replace_by_pure_dict(state, params_lib.unflatten({k: jnp.asarray(v) for k, v in flat.items()}))
  nnx.update(model, state)
  return model


@pytest.mark.parametrize(
  "norm, depth, out_indices, size",
  [
    ("layernorm", 4, (0, 1, 2, 3), (64, 96)),  # The base / middle / large backbones; a wider grid than the table.
    ("rmsnorm", 5, (0, 1, 2, 3), (40, 72)),  # Reg-large's norm; the last tap is not the last block.
  ],
)
def test_backbone_maps_equal_the_reference(norm, depth, out_indices, size):
  model = segmenter(norm, depth, out_indices, pos_embed_size=48)  # A 3x3 table resized to each grid.
  images = np.random.default_rng(5).normal(size=(2, *size, 3)).astype(np.float32)
  maps = jax.jit(lambda x: model.features(x))(jnp.asarray(images))
  backbone = params_lib.flatten(nnx.to_pure_dict(nnx.state(model.backbone, nnx.Param)))
  state_dict = pytorch.export_state_dict(params_lib.unflatten(backbone))
  assert state_dict["pos_embed"].shape == (1, 9, 48)
  expected = torch_reference.segmentation_backbone(
    state_dict, images.transpose(0, 3, 1, 2), out_indices, pos_grid=(3, 3)
  )
  assert len(maps) == len(expected) == 4
  for ours, theirs in zip(maps, expected):
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape == (2, size[0] // 16, size[1] // 16, 48)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_the_last_tap_is_normed_and_the_others_are_not():
  """With depth 4 and taps (0, 1, 2, 3): maps 0-2 are raw mixer outputs, map 3 a norm_f output
  (LayerNorm with unit scale and zero bias: zero mean and unit variance per token)."""
  model = segmenter("layernorm", 4, (0, 1, 2, 3))
  model.backbone.norm_f.scale[...] = jnp.ones_like(model.backbone.norm_f.scale[...])
  model.backbone.norm_f.bias[...] = jnp.zeros_like(model.backbone.norm_f.bias[...])
  maps = jax.jit(lambda x: model.features(x))(jax.random.normal(jax.random.key(0), (1, 64, 64, 3)))
  np.testing.assert_allclose(np.asarray(maps[3]).mean(-1), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(maps[3]).std(-1), 1.0, rtol=1e-3)
  assert np.abs(np.asarray(maps[2]).std(-1) - 1.0).max() > 0.1


def test_drop_path_reaches_the_last_tap_in_training():
  """The reference drops the last block's output at the final add (norm_f(residual +
  drop_path(hidden))): with drop path on, the last map differs between keys, the first does not
  (block 0's output is never dropped)."""
  model = segmenter("layernorm", 4, (0, 1, 2, 3), drop_path_rate=0.9)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  run = jax.jit(lambda x, key: model.features(x, train=True, key=key))
  first, second = run(images, jax.random.key(1)), run(images, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(second[0]))
  assert not np.allclose(np.asarray(first[3]), np.asarray(second[3]))

"""Layer-wise learning-rate decay (the detection recipe): scales, weight-decay rule and optimizer.

The oracle is the reference's `MyLayerDecayOptimizerConstructor` (ShuffleMamba's
detection/mmdet_custom/layer_decay_optimizer_constructor.py, BEiT's) transcribed below over
official PyTorch names and shapes, and torch.optim.AdamW with one parameter group per scale.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.checks import SettingError
from shufflemamba_jax.models import variants, vim
from shufflemamba_jax.training import optim
from shufflemamba_jax.weights import params as params_lib
from shufflemamba_jax.weights import pytorch

DEPTH = 4
RATE = 0.9
# The detection recipe's AdamW: lr 1e-4, betas (0.9, 0.999), weight decay 0.05, no clipping.
SETTINGS = optim.OptimizerSettings(
  lr=1e-4,
  lr_scale_batch=False,
  warmup_epochs=0.0,
  warmup_lr=0.0,
  min_lr=0.0,
  weight_decay=0.05,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
  grad_clip=None,
  ema_decay=0.0,
)


def official_num_layer(var_name, num_max_layer):
  """`get_num_layer_for_vit`, as in the reference."""
  if var_name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed", "backbone.visual_embed"):
    return 0
  elif var_name.startswith("backbone.patch_embed") or var_name.startswith("backbone.visual_embed"):
    return 0
  elif var_name.startswith("decode_head.mask_embed"):
    return 0
  elif var_name.startswith("decode_head.cls_embed"):
    return 0
  elif var_name.startswith("decode_head.level_embed"):
    return 0
  elif var_name.startswith("decode_head.query_embed"):
    return 0
  elif var_name.startswith("decode_head.query_feat"):
    return 0
  elif var_name.startswith("backbone.blocks") or var_name.startswith("backbone.layers"):
    layer_id = int(var_name.split(".")[2])
    return layer_id + 1
  else:
    return num_max_layer - 1


def official_group(name, shape, *, num_layers, layer_decay_rate):
  """(lr_scale, decays) of one named parameter in `MyLayerDecayOptimizerConstructor.add_params`."""
  num_layers = num_layers + 2
  no_decay = len(shape) == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token", "visual_embed")
  layer_id = official_num_layer(name, num_layers)
  return layer_decay_rate ** (num_layers - layer_id - 1), not no_decay


def detector_params():
  """A tiny detector-like parameter tree (zeros): the Vim backbone plus adapter-like leaves, an
  FPN-like neck and a head with a Mask2Former-style embedding."""
  config = variants.model_config(
    "shufflemamba_tiny",
    embed_dim=48,
    depth=DEPTH,
    d_state=8,
    img_size=64,
    norm="layernorm",
    remat=False,
    slws_max_prob=0.0,
  )
  model = nnx.eval_shape(lambda: vim.VisionMamba(config, rngs=nnx.Rngs(0)))
  backbone = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  extras = {
    "level_embed": np.zeros((3, 48), np.float32),
    "interactions": {"0": {"injector": {"gamma": np.zeros((48,), np.float32)}}},
    "spm": {"stem": {"0": {"kernel": np.zeros((3, 3, 3, 16), np.float32)}}},
  }
  heads = {
    "neck": {
      "lateral_convs": {
        "0": {"conv": {"kernel": np.zeros((3, 3, 8, 8), np.float32), "bias": np.zeros((8,), np.float32)}}
      },
      "fpn_convs": {"0": {"bn": {"scale": np.zeros((8,), np.float32), "bias": np.zeros((8,), np.float32)}}},
    },
    "decode_head": {
      "query_embed": {"embedding": np.zeros((10, 8), np.float32)},
      "conv_seg": {"kernel": np.zeros((1, 1, 8, 5), np.float32), "bias": np.zeros((5,), np.float32)},
    },
  }
  return {"backbone": {**backbone, **extras}, **heads}, backbone, extras


def official_view(tree, vim_part):
  """`tree` (a detector-like tree of arrays) as {official name: array in the official layout}:
  the Vim backbone through `pytorch.export_state_dict` (blocks unstacked to `layers.{i}.`), the
  rest renamed by hand (`.kernel`, `.scale`, `.embedding` -> `.weight`, the rank kept)."""
  official = {"backbone." + name: value for name, value in pytorch.export_state_dict(vim_part(tree)).items()}
  for name, value in params_lib.flatten(tree).items():
    if name.startswith("backbone.") and name.split(".")[1] in vim_part(tree):
      continue
    module, leaf = name.rsplit(".", 1)
    official[f"{module}.{'weight' if leaf in ('kernel', 'scale', 'embedding') else leaf}"] = np.asarray(value)
  return official


def test_scales_and_decay_match_the_reference_constructor_parameter_by_parameter():
  params, backbone, _ = detector_params()
  scales = optim.layer_decay_scales(params, RATE, DEPTH)
  mask = optim.layer_decay_weight_decay_mask(params)
  # Ours broadcast to each leaf, then exported like the parameters: each official tensor (each
  # block's, for stacked leaves) carries our scale / flag in every element.
  ours_scale = jax.tree.map(lambda s, p: np.broadcast_to(s, p.shape).astype(np.float32), scales, params)
  ours_decay = jax.tree.map(lambda d, p: np.full(p.shape, d), mask, params)
  vim_part = lambda tree: {key: tree["backbone"][key] for key in backbone}
  official_params = official_view(params, vim_part)
  official_scales = official_view(ours_scale, vim_part)
  official_decays = official_view(ours_decay, vim_part)
  assert official_scales.keys() == official_params.keys() == official_decays.keys()
  for name in ("backbone.patch_embed.proj.weight", "backbone.pos_embed", "backbone.layers.3.mixer.A_log"):
    assert name in official_params

  for name, value in official_params.items():
    scale, decays = official_group(name, value.shape, num_layers=DEPTH, layer_decay_rate=RATE)
    np.testing.assert_allclose(official_scales[name], np.float32(scale), rtol=1e-7, err_msg=name)
    assert np.all(official_decays[name] == decays), name

  # The constructor's outcomes written out (rate 0.9, depth 4: 6 layers).
  expected_scale = {
    "backbone.patch_embed.proj.weight": 0.9**5,
    "backbone.patch_embed.proj.bias": 0.9**5,
    "backbone.pos_embed": 0.9**5,
    "backbone.cls_token": 0.9**5,
    **{f"backbone.layers.{i}.mixer.in_proj.weight": 0.9 ** (4 - i) for i in range(DEPTH)},
    "backbone.norm_f.weight": 1.0,
    "backbone.level_embed": 1.0,
    "backbone.spm.stem.0.weight": 1.0,
    "neck.lateral_convs.0.conv.weight": 1.0,
    "decode_head.query_embed.weight": 0.9**5,
    "decode_head.conv_seg.weight": 1.0,
  }
  for name, scale in expected_scale.items():
    np.testing.assert_allclose(official_scales[name], scale, rtol=1e-6, err_msg=name)
  decayed = [
    "backbone.pos_embed",
    "backbone.cls_token",
    "backbone.layers.2.mixer.A_log",
    "backbone.layers.2.mixer.A_b_log",
    "backbone.level_embed",
    "backbone.layers.0.mixer.conv1d.weight",
    "backbone.spm.stem.0.weight",
    "neck.lateral_convs.0.conv.weight",
  ]
  kept = [
    "backbone.layers.1.mixer.D",
    "backbone.layers.1.mixer.D_b",
    "backbone.interactions.0.injector.gamma",
    "backbone.layers.3.norm.weight",
    "backbone.norm_f.weight",
    "backbone.patch_embed.proj.bias",
    "backbone.layers.0.mixer.dt_proj.bias",
    "neck.fpn_convs.0.bn.weight",
    "neck.lateral_convs.0.conv.bias",
  ]
  assert all(official_decays[name].all() for name in decayed)
  assert not any(official_decays[name].any() for name in kept)


def test_scales_have_per_block_shapes_and_work_on_abstract_parameters():
  params, _, _ = detector_params()
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  scales = optim.layer_decay_scales(abstract, 0.5, DEPTH)
  in_proj = params_lib.flatten(scales)["backbone.layers.mixer.in_proj.kernel"]
  assert in_proj.shape == (DEPTH, 1, 1) and in_proj.dtype == np.float32
  np.testing.assert_array_equal(in_proj.ravel(), [0.5**4, 0.5**3, 0.5**2, 0.5])
  assert params_lib.flatten(scales)["backbone.pos_embed"].shape == ()
  assert jax.tree.structure(optim.layer_decay_weight_decay_mask(abstract)) == jax.tree.structure(params)


def small_detector():
  """A tree with a stacked leaf (3 blocks) that decays and one that does not, embeddings and a neck."""
  rng = np.random.default_rng(0)
  shapes = {
    "backbone": {
      "patch_embed": {"kernel": (2, 2, 3, 4), "bias": (4,)},
      "pos_embed": (5, 4),
      "layers": {"mixer": {"A_log": (3, 4, 2), "D": (3, 4)}},
    },
    "neck": {"conv": {"kernel": (4, 2), "bias": (2,)}},
  }
  return jax.tree.map(
    lambda shape: rng.normal(size=shape).astype(np.float32) + 1.0, shapes, is_leaf=lambda x: isinstance(x, tuple)
  )


def test_one_update_is_torch_adamw_with_a_group_per_scale_by_hand():
  """Step 1 of AdamW is lr * (g / (|g| + eps) + wd * p) per element: each group's lr is scale * lr."""
  params = small_detector()
  grads = jax.tree.map(np.zeros_like, params)
  grads["backbone"]["layers"]["mixer"]["A_log"][:] = 0.5
  grads["neck"]["conv"]["kernel"][:] = -2.0
  scales = optim.layer_decay_scales(params, 0.5, 3)
  mask = optim.layer_decay_weight_decay_mask(params)
  tx = optim.create_optimizer(SETTINGS, lambda _: 1e-2, mask=optim.layer_decay_weight_decay_mask, lr_scales=scales)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)

  def by_hand(g, p, scale, decays):
    return -scale * 1e-2 * (g / (np.abs(g) + 1e-8) + 0.05 * decays * p)

  expected = jax.tree.map(by_hand, grads, params, scales, mask)
  flat_updates, flat_expected = params_lib.flatten(updates), params_lib.flatten(expected)
  # rtol: optax's float32 (1 - b2) and bias correction 1 - b2 ** t differ by 1e-5 of v (6e-6 of the step).
  for name in flat_expected:
    np.testing.assert_allclose(flat_updates[name], flat_expected[name], rtol=2e-5, atol=1e-12, err_msg=name)
  a_log = flat_updates["backbone.layers.mixer.A_log"]
  # Per block: 0.5 ** (3 - i); the Adam step is 1 in every element, the decay adds p.
  a_log_params = params["backbone"]["layers"]["mixer"]["A_log"]
  for i, scale in enumerate([0.125, 0.25, 0.5]):
    np.testing.assert_allclose(a_log[i], -scale * 1e-2 * (1 + 0.05 * a_log_params[i]), rtol=2e-5)
  # Embeddings: 0.5 ** 4; the (5, 4) pos_embed decays, the bias does not; the neck is unscaled.
  np.testing.assert_allclose(
    flat_updates["backbone.pos_embed"], -(0.5**4) * 1e-2 * 0.05 * params["backbone"]["pos_embed"], rtol=1e-6
  )
  np.testing.assert_array_equal(flat_updates["backbone.patch_embed.bias"], 0.0)
  np.testing.assert_array_equal(flat_updates["backbone.layers.mixer.D"], 0.0)
  np.testing.assert_allclose(
    flat_updates["neck.conv.kernel"], -1e-2 * (-1 + 0.05 * params["neck"]["conv"]["kernel"]), rtol=2e-5
  )

  # Scales of 1 change nothing: the same updates as no scales, bit for bit.
  plain = optim.create_optimizer(SETTINGS, lambda _: 1e-2, mask=optim.layer_decay_weight_decay_mask)
  ones = optim.create_optimizer(
    SETTINGS,
    lambda _: 1e-2,
    mask=optim.layer_decay_weight_decay_mask,
    lr_scales=optim.layer_decay_scales(params, 1.0, 3),
  )
  for a, b in zip(
    jax.tree.leaves(plain.update(grads, plain.init(params), params)[0]),
    jax.tree.leaves(ones.update(grads, ones.init(params), params)[0]),
  ):
    np.testing.assert_array_equal(a, b)


def test_several_steps_with_clipping_match_torch_adamw_param_groups():
  """Three steps with clipping (norm 1) against torch.optim.AdamW, one group per official tensor with
  the constructor's lr and weight decay, each stacked block a tensor of its own."""
  torch = pytest.importorskip("torch")
  params = small_detector()
  rate, depth, lr = 0.5, 3, 1e-2
  settings = dataclasses.replace(SETTINGS, grad_clip=1.0)
  tx = optim.create_optimizer(
    settings,
    lambda _: lr,
    mask=optim.layer_decay_weight_decay_mask,
    lr_scales=optim.layer_decay_scales(params, rate, depth),
  )
  rng = np.random.default_rng(1)
  grad_steps = [jax.tree.map(lambda p: 3 * rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]

  # The torch side: official-style names (blocks split out, `.kernel` -> `.weight`).
  def official_tensors(tree):
    tensors = {}
    for name, value in params_lib.flatten(tree).items():
      module, leaf = name.rsplit(".", 1)
      leaf = "weight" if leaf == "kernel" else leaf
      if name.startswith("backbone.layers."):
        for i in range(depth):
          tensors[f"backbone.layers.{i}.{module[len('backbone.layers.') :]}.{leaf}"] = value[i]
      else:
        tensors[f"{module}.{leaf}"] = value
    return tensors

  torch_params = {name: torch.tensor(value, requires_grad=True) for name, value in official_tensors(params).items()}
  groups = []
  for name, tensor in torch_params.items():
    scale, decays = official_group(name, tensor.shape, num_layers=depth, layer_decay_rate=rate)
    groups.append({"params": [tensor], "lr": scale * lr, "weight_decay": 0.05 if decays else 0.0})
  torch_opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
  for grads in grad_steps:
    for name, grad in official_tensors(grads).items():
      torch_params[name].grad = torch.tensor(grad)
    torch.nn.utils.clip_grad_norm_(list(torch_params.values()), 1.0)
    torch_opt.step()

  state, ours = tx.init(params), jax.tree.map(jnp.asarray, params)
  step = jax.jit(tx.update)
  for grads in grad_steps:
    updates, state = step(grads, state, ours)
    ours = jax.tree.map(jnp.add, ours, updates)
  ours_official = official_tensors(jax.tree.map(np.asarray, ours))
  for name, tensor in torch_params.items():
    np.testing.assert_allclose(ours_official[name], tensor.detach().numpy(), rtol=0, atol=2e-6, err_msg=name)
  # The blocks did move by different amounts (the check is not blind to the per-slice scale).
  moved = np.abs(ours_official["backbone.layers.0.mixer.A_log"] - params["backbone"]["layers"]["mixer"]["A_log"][0])
  moved_last = np.abs(
    ours_official["backbone.layers.2.mixer.A_log"] - params["backbone"]["layers"]["mixer"]["A_log"][2]
  )
  assert moved.mean() < 0.5 * moved_last.mean()


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, float("nan")])
def test_rate_outside_zero_one_is_a_setting_error(rate):
  with pytest.raises(SettingError) as error:
    optim.layer_decay_scales(small_detector(), rate, 3)
  assert error.value.setting == "rate"


@pytest.mark.parametrize("depth", [0, 2, 4])
def test_depth_must_be_the_stacked_blocks(depth):
  with pytest.raises(SettingError) as error:
    optim.layer_decay_scales(small_detector(), 0.9, depth)
  assert error.value.setting == "depth"
  if depth:
    assert "backbone.layers.mixer" in str(error.value) and "(3," in str(error.value)


def test_a_tree_without_backbone_blocks_is_refused():
  """A classifier's tree (blocks at the top) would silently get scale 1 everywhere."""
  with pytest.raises(ValueError, match="backbone.layers"):
    optim.layer_decay_scales(small_detector()["backbone"], 0.9, 3)

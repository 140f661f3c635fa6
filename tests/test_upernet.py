"""UperNet on the Vim backbone: settings, head shapes for every token layout, features read from
the right blocks with the extra tokens dropped, and sliding-window inference."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.models import SettingError, tokens, upernet, variants
from shufflemamba_jax.models.vim import VisionMamba

LAYOUTS = {
  "middle": dict(variant="vim_tiny"),
  "head": dict(variant="shufflemamba_tiny"),
  "registers": dict(variant="shufflemamba_reg_tiny", num_registers=3),
}


def tiny_config(layout: str, **settings) -> upernet.UperNetConfig:
  layout_settings = dict(LAYOUTS[layout])
  variant = layout_settings.pop("variant")
  backbone = variants.model_config(
    variant, embed_dim=48, depth=4, img_size=64, slws_max_prob=0.0, remat=False, **layout_settings
  )
  return upernet.UperNetConfig(backbone=backbone, **{**dict(num_classes=5, channels=32, aux_channels=16), **settings})


def test_default_out_indices_are_the_last_block_of_each_quarter():
  assert upernet.default_out_indices(24) == (5, 11, 17, 23)
  assert upernet.default_out_indices(48) == (11, 23, 35, 47)
  assert upernet.default_out_indices(32) == (7, 15, 23, 31)
  assert tiny_config("head").resolved_out_indices == (0, 1, 2, 3)


@pytest.mark.parametrize(
  "settings, name",
  [
    (dict(out_indices=(0, 1, 2)), "out_indices"),
    (dict(out_indices=(0, 2, 1, 3)), "out_indices"),
    (dict(out_indices=(0, 1, 2, 4)), "out_indices"),
    (dict(aux_level=4), "aux_level"),
    (dict(dropout=1.0), "dropout"),
    (dict(pool_scales=(1, 0)), "pool_scales"),
    (dict(channels=0), "channels"),
  ],
)
def test_bad_settings_name_themselves(settings, name):
  with pytest.raises(SettingError) as error:
    tiny_config("head", **settings)
  assert error.value.setting == name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_head_shapes_for_every_layout(layout):
  """Traced only (no compilation): logits at 1/4, auxiliary logits at 1/32, on a non-square image."""
  config = tiny_config(layout)
  model = nnx.eval_shape(lambda: upernet.UperNet(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  images = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)

  def train_forward(state, images):
    return nnx.merge(graphdef, state).forward(images, train=True, key=jax.random.key(0))

  logits, aux_logits = jax.eval_shape(train_forward, state, images)
  assert logits.shape == (2, 16, 24, 5) and logits.dtype == jnp.float32
  assert aux_logits.shape == (2, 2, 3, 5) and aux_logits.dtype == jnp.float32
  eval_logits = jax.eval_shape(lambda state, images: nnx.merge(graphdef, state)(images), state, images)
  assert eval_logits.shape == (2, 16, 24, 5)
  features = jax.eval_shape(lambda state, images: nnx.merge(graphdef, state).features(images), state, images)
  assert [f.shape for f in features] == [(2, 4, 6, 48)] * 4
  # The classification parts are gone: no parameters the loss cannot reach.
  assert not set(upernet.UNUSED_BACKBONE_PARTS) & set(nnx.to_pure_dict(nnx.state(model.backbone, nnx.Param)))


# About 7 s each; the registers layout (several extra tokens inside the sequence) is in the fast tier.
@pytest.mark.parametrize("layout", [pytest.param("middle", marks=pytest.mark.slow), "registers"])
def test_features_are_the_streams_after_the_out_indices_blocks(layout):
  """Feature k equals the un-normed token stream of a backbone cut after block out_indices[k],
  with the extra tokens removed and patch (r, c) at [r, c]."""
  config = tiny_config(layout, out_indices=(0, 1, 2, 3))
  model = upernet.create_segmenter(config, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
  features = jax.jit(lambda images: model.features(images))(images)
  backbone_params = nnx.to_pure_dict(nnx.state(model.backbone, nnx.Param))
  grid, num_patches = (4, 4), 16
  extras = tokens.extra_token_indices(num_patches, config.backbone.token_layout, config.backbone.num_registers)
  order = tokens.sequence_order(num_patches, config.backbone.token_layout, config.backbone.num_registers)
  for level in (1, 3):
    blocks = level + 1
    cut_config = dataclasses.replace(config.backbone, depth=blocks)
    cut = nnx.eval_shape(lambda cut_config=cut_config: VisionMamba(cut_config, rngs=nnx.Rngs(0)))
    params = dict(backbone_params)
    params["layers"] = jax.tree.map(lambda x, blocks=blocks: x[:blocks], params["layers"])
    cut_params = nnx.state(cut, nnx.Param)
    nnx.replace_by_pure_dict(cut_params, {k: v for k, v in params.items() if k in nnx.to_pure_dict(cut_params)})
    nnx.update(cut, cut_params)
    ((hidden, residual),) = jax.jit(lambda images, cut=cut, blocks=blocks: cut.run_blocks(images, (blocks,)))(images)
    stream = np.asarray(residual + hidden)[0]  # (length, D) in sequence order
    expected = np.zeros((*grid, stream.shape[-1]), np.float32)
    for position, source in enumerate(order):
      if position not in extras:
        expected[source // grid[1], source % grid[1]] = stream[position]
    np.testing.assert_allclose(np.asarray(features[level])[0], expected, rtol=1e-5, atol=1e-5)


def test_window_starts_follow_mmseg():
  assert upernet.window_starts(683, 512, 341) == [0, 171]
  assert upernet.window_starts(512, 512, 341) == [0]
  assert upernet.window_starts(2048, 512, 341) == [0, 341, 682, 1023, 1364, 1536]
  assert upernet.window_starts(300, 512, 341) == [0]


def pixelwise_logits(images):
  """A per-pixel function (the same at every position), so overlapping windows agree exactly."""
  weights = jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7.0
  return jnp.tanh(images @ weights)


def test_sliding_window_covers_every_pixel_and_averages_overlaps():
  images = jax.random.normal(jax.random.key(0), (2, 80, 112, 3))
  counted = upernet.slide_inference(
    lambda x: jnp.ones(x.shape[:3] + (1,)), images, crop_size=(32, 48), stride=(21, 31), num_classes=1
  )
  np.testing.assert_array_equal(np.asarray(counted), 1.0)  # Covered pixels average to 1; others would be NaN.
  slid = upernet.slide_inference(pixelwise_logits, images, crop_size=(32, 48), stride=(21, 31), num_classes=4)
  np.testing.assert_allclose(np.asarray(slid), np.asarray(pixelwise_logits(images)), rtol=1e-6, atol=1e-6)


def test_sliding_window_on_an_image_that_fits_one_window_is_whole_image_inference():
  config = tiny_config("head")
  model = upernet.create_segmenter(config, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
  logits_fn = functools.partial(upernet.segment_logits, model)
  whole, slid = jax.jit(
    lambda images: (
      logits_fn(images),
      upernet.slide_inference(logits_fn, images, crop_size=(64, 64), stride=(43, 43), num_classes=5),
    )
  )(images)
  assert whole.shape == (2, 64, 64, 5)
  np.testing.assert_array_equal(np.asarray(slid), np.asarray(whole))


def test_warm_start_from_a_classifier_resizes_positions_and_reports_fresh_heads(caplog):
  from shufflemamba_jax.weights import params as params_lib

  config = tiny_config("middle")
  classifier = variants.create_model(
    "vim_tiny", rngs=nnx.Rngs(1), embed_dim=48, depth=4, img_size=32, num_classes=7, remat=False
  )
  saved = params_lib.flatten(nnx.to_pure_dict(nnx.state(classifier, nnx.Param)))
  segmenter = nnx.eval_shape(lambda: upernet.UperNet(config, rngs=nnx.Rngs(0)))
  # Concrete fresh values for the target, without compiling an initializer.
  target = jax.tree.map(lambda x: np.full(x.shape, 0.5, x.dtype), nnx.to_pure_dict(nnx.state(segmenter, nnx.Param)))
  with caplog.at_level("INFO"):
    filled, fresh = params_lib.segmenter_from_classifier(saved, target, config, source="classifier")
  flat = params_lib.flatten(filled)
  assert set(flat) == set(params_lib.flatten(target))
  np.testing.assert_array_equal(flat["backbone.layers.mixer.in_proj.kernel"], saved["layers.mixer.in_proj.kernel"])
  np.testing.assert_array_equal(flat["backbone.patch_embed.kernel"], saved["patch_embed.kernel"])
  # 2x2 -> 4x4 patch grid, the cls slot (middle) carried over.
  expected = tokens.resize_position_embedding(
    saved["pos_embed"], old_grid=(2, 2), new_grid=(4, 4), token_layout="middle"
  )
  np.testing.assert_allclose(flat["backbone.pos_embed"], np.asarray(expected), rtol=1e-6)
  assert {name.split(".")[0] for name in fresh} == {"pyramid", "decode_head", "aux_head"}
  assert all((flat[name] == 0.5).all() for name in fresh)
  assert "initialized fresh (not in a classifier): aux_head, decode_head, pyramid" in caplog.text
  assert "left out the classifier's head.bias, head.kernel, norm_f.scale" in caplog.text


def test_the_pyramid_follows_the_patch_grid_for_other_patch_sizes():
  """8-pixel patches: levels at strides 2, 4, 8 and 16, logits at 1/2 of the image."""
  backbone = variants.model_config("shufflemamba_tiny", embed_dim=48, depth=4, img_size=64, patch_size=8)
  config = upernet.UperNetConfig(backbone=backbone, num_classes=5, channels=32, aux_channels=16, aux_level=2)
  model = nnx.eval_shape(lambda: upernet.UperNet(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  images = jax.ShapeDtypeStruct((2, 64, 48, 3), jnp.float32)
  logits, aux_logits = jax.eval_shape(
    lambda state, images: nnx.merge(graphdef, state).forward(images, train=True, key=jax.random.key(0)), state, images
  )
  assert logits.shape == (2, 32, 24, 5) and aux_logits.shape == (2, 8, 6, 5)
  with pytest.raises(SettingError) as error:
    upernet.UperNetConfig(backbone=variants.model_config("shufflemamba_tiny", img_size=60, patch_size=10))
  assert error.value.setting == "patch_size"

"""UperNet on the Vim backbone: settings, head shapes for every token layout (the backbone scans
patches only), the opt-in simple pyramid, warm start from a classifier, and sliding-window
inference. The backbone's maps against the reference are in test_segmenter_backbone.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.models import SettingError, tokens, upernet, variants, vim

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
  """Traced only (no compilation): the reference has no neck, so both heads' logits are at the
  patch grid; the backbone scans patches only, whatever the classifier's token layout."""
  config = tiny_config(layout)
  model = nnx.eval_shape(lambda: upernet.UperNet(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  images = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)

  def train_forward(state, images):
    return nnx.merge(graphdef, state).forward(images, train=True, key=jax.random.key(0))

  logits, aux_logits = jax.eval_shape(train_forward, state, images)
  assert logits.shape == (2, 4, 6, 5) and logits.dtype == jnp.float32
  assert aux_logits.shape == (2, 4, 6, 5) and aux_logits.dtype == jnp.float32
  eval_logits = jax.eval_shape(lambda state, images: nnx.merge(graphdef, state)(images), state, images)
  assert eval_logits.shape == (2, 4, 6, 5)
  features = jax.eval_shape(lambda state, images: nnx.merge(graphdef, state).features(images), state, images)
  assert [f.shape for f in features] == [(2, 4, 6, 48)] * 4
  backbone = nnx.to_pure_dict(nnx.state(model.backbone, nnx.Param))
  # The classification parts are gone (no parameters the loss cannot reach); norm_f stays.
  assert not set(vim.UNUSED_BACKBONE_PARTS) & set(backbone)
  assert "norm_f" in backbone and "pyramid" not in nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # The pretraining (224 px) table: 14x14 patch rows, no cls row.
  assert backbone["pos_embed"].shape == (14 * 14, 48)


def test_the_patch_convolution_floors_sizes_that_are_not_multiples_of_the_patch():
  config = tiny_config("head")
  model = nnx.eval_shape(lambda: upernet.UperNet(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  images = jax.ShapeDtypeStruct((1, 70, 100, 3), jnp.float32)
  logits = jax.eval_shape(lambda state, images: nnx.merge(graphdef, state)(images), state, images)
  assert logits.shape == (1, 4, 6, 5)


def test_the_simple_pyramid_is_an_opt_in_neck():
  """neck="simple_pyramid": levels at 4x, 2x, 1x and 1/2x the grid; logits at 1/4, auxiliary at 1/32."""
  config = tiny_config("head", neck="simple_pyramid")
  model = nnx.eval_shape(lambda: upernet.UperNet(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  images = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
  logits, aux_logits = jax.eval_shape(
    lambda state, images: nnx.merge(graphdef, state).forward(images, train=True, key=jax.random.key(0)), state, images
  )
  assert logits.shape == (2, 16, 24, 5) and aux_logits.shape == (2, 2, 3, 5)
  with pytest.raises(SettingError) as error:
    tiny_config("head", neck="fpn")
  assert error.value.setting == "neck"


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


def test_warm_start_from_a_classifier_drops_the_cls_row_and_keeps_the_norm_scales(caplog):
  """As the reference's load_state_dict(strict=False): an RMSNorm classifier under a LayerNorm
  segmentation backbone gives its scales, the biases stay fresh; the cls row of pos_embed is
  dropped and a table of another grid is resized (torch's bicubic) to the 14x14 pretraining grid."""
  from shufflemamba_jax.weights import params as params_lib

  config = tiny_config("middle")
  config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, norm="layernorm"))
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
  np.testing.assert_array_equal(flat["backbone.norm_f.scale"], saved["norm_f.scale"])
  # 2x2 -> 14x14 patch grid; the middle cls row (index 2 of 5) is dropped.
  patches = np.delete(np.asarray(saved["pos_embed"]), 2, axis=0)
  expected = tokens.resize_patch_positions(jnp.asarray(patches), (2, 2), (14, 14))
  np.testing.assert_allclose(flat["backbone.pos_embed"], np.asarray(expected), rtol=1e-6)
  assert {name.split(".")[0] for name in fresh} == {"decode_head", "aux_head", "backbone"}
  assert [name for name in fresh if name.startswith("backbone.")] == [
    "backbone.layers.norm.bias",
    "backbone.norm_f.bias",
  ]
  assert all((flat[name] == 0.5).all() for name in fresh)
  assert "initialized fresh (not in a classifier): aux_head, backbone.layers.norm.bias" in caplog.text
  assert "left out the classifier's cls_token, head.bias, head.kernel" in caplog.text

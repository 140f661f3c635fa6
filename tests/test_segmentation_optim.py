"""The segmentation recipe's optimizer pieces: warmup + poly schedule and the weight-decay rule."""

import jax
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.models import SettingError, upernet, variants
from shufflemamba_jax.training import optim
from shufflemamba_jax.weights import params as params_lib


def test_warmup_poly_schedule_matches_mmseg():
  schedule = optim.warmup_poly_schedule(6e-5, warmup_steps=1500, warmup_factor=1e-6, total_steps=160_000)
  np.testing.assert_allclose(schedule(0), 6e-5 * 1e-6, rtol=1e-5)
  np.testing.assert_allclose(schedule(750), 6e-5 * (1e-6 + (1 - 1e-6) * 0.5), rtol=1e-5)
  np.testing.assert_allclose(schedule(1500), 6e-5, rtol=1e-6)
  np.testing.assert_allclose(schedule(1500 + 158_500 // 2), 3e-5, rtol=1e-4)
  np.testing.assert_allclose(schedule(160_000), 0.0, atol=1e-12)
  with pytest.raises(SettingError) as error:
    optim.warmup_poly_schedule(1.0, warmup_steps=10, warmup_factor=0.1, total_steps=10)
  assert error.value.setting == "warmup_steps"


def test_segmentation_weight_decay_is_mmengines_substring_match_of_the_reference_keys():
  """The reference's custom_keys (.pos_embed, .cls_token, norm, .A_log, .D) as substrings of the
  PyTorch names: A_b_log decays, D_b does not, and the heads' BatchNorms (mmcv's `bn`) decay."""
  backbone = variants.model_config("shufflemamba_tiny", embed_dim=48, depth=4, img_size=64, norm="layernorm")
  config = upernet.UperNetConfig(backbone=backbone, num_classes=5, channels=16, aux_channels=8)
  model = nnx.eval_shape(lambda: upernet.UperNet(config, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mask = params_lib.flatten(optim.segmentation_weight_decay_mask(jax.tree.map(np.zeros_like, params)))
  kept = sorted(name for name, decays in mask.items() if not decays)
  assert kept == [
    "backbone.layers.mixer.A_log",
    "backbone.layers.mixer.D",
    "backbone.layers.mixer.D_b",
    "backbone.layers.norm.bias",
    "backbone.layers.norm.scale",
    "backbone.norm_f.bias",
    "backbone.norm_f.scale",
    "backbone.pos_embed",
  ]
  for name in ("backbone.layers.mixer.A_b_log", "decode_head.fpn0.norm.bias", "decode_head.fpn0.norm.scale",
               "aux_head.conv.norm.scale", "backbone.patch_embed.bias", "decode_head.classifier.bias"):  # fmt: skip
    assert mask[name]

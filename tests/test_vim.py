"""The Vim / ShuffleMamba / ShuffleMamba-Reg backbone: sizes, layouts, modes and SLWS in the model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import shufflemamba_jax as smj

# SPEC §2: exact parameter counts for 1000 classes at 224 px.
SPEC_PARAMETER_COUNTS = {
  "vim_tiny": 7_148_008,
  "vim_small": 25_796_584,
  "vim_base": 97_598_440,
  "shufflemamba_tiny": 7_148_008,
  "shufflemamba_small": 25_796_584,
  "shufflemamba_middle": 74_236_456,
  "shufflemamba_base": 97_598_440,
  "shufflemamba_large": 340_034_536,
  "shufflemamba_reg_tiny": 9_264_232,
  "shufflemamba_reg_small": 27_801_064,
  "shufflemamba_reg_base": 99_301_096,
  "shufflemamba_reg_large": 341_222_376,
}

# The sequential scan compiles fastest; the scan methods are compared in their own test.
TINY = dict(num_classes=10, img_size=16, patch_size=4, embed_dim=48, depth=4, scan_method="sequential")


@nnx.jit
def evaluate(model, images):
  return model(images)


@nnx.jit
def train_forward(model, images, key):
  return model(images, train=True, key=key)


def count_parameters(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_every_variant_is_listed():
  assert set(smj.VARIANTS) == set(SPEC_PARAMETER_COUNTS)


@pytest.mark.parametrize("variant", sorted(SPEC_PARAMETER_COUNTS))
def test_parameter_count_matches_reference(variant):
  abstract = nnx.eval_shape(lambda: smj.create_model(variant, rngs=nnx.Rngs(0)))
  assert count_parameters(abstract) == SPEC_PARAMETER_COUNTS[variant]


def test_per_block_parameter_formula():
  """6 D^2 + 8 D R + 221 D per RMSNorm block (SPEC §2)."""
  abstract = nnx.eval_shape(lambda: smj.create_model("vim_small", rngs=nnx.Rngs(0)))
  per_block = sum(x.size for x in jax.tree.leaves(nnx.state(abstract.layers, nnx.Param))) // 24
  D, R = 384, 24
  assert per_block == 6 * D * D + 8 * D * R + 221 * D


def test_reference_initialization():
  model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), **TINY)
  mixer = model.layers.mixer
  np.testing.assert_allclose(mixer.A_log[0], np.log(np.tile(np.arange(1, 17), (96, 1))), rtol=1e-6)
  np.testing.assert_array_equal(mixer.D[...], 1.0)
  dt = jax.nn.softplus(mixer.dt_proj.bias[...])
  assert float(dt.min()) >= 1e-4 - 1e-9 and float(dt.max()) <= 0.1 + 1e-6
  # out_proj ~ U(+-1/sqrt(E)) / sqrt(depth); in_proj ~ U(+-1/sqrt(D)).
  assert float(jnp.abs(mixer.out_proj.kernel[...]).max()) <= 1 / np.sqrt(96) / np.sqrt(4)
  assert float(jnp.abs(mixer.in_proj.kernel[...]).max()) <= 1 / np.sqrt(48)
  assert float(jnp.abs(mixer.dt_proj.kernel[...]).max()) <= 3**-0.5
  np.testing.assert_array_equal(model.head.bias[...], 0.0)
  assert 0.015 < float(model.pos_embed[...].std()) < 0.025


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.key(0), (4, 16, 16, 3))


@pytest.mark.parametrize(
  "variant,extra",
  [
    ("vim_tiny", {}),
    ("shufflemamba_tiny", {}),
    ("shufflemamba_middle", {}),
    ("shufflemamba_reg_tiny", dict(num_registers=3)),
    ("shufflemamba_reg_small", dict(num_registers=3)),
  ],
)
def test_output_shapes_for_each_token_layout(variant, extra, images):
  model = smj.create_model(variant, rngs=nnx.Rngs(0), **{**TINY, **extra})
  logits = evaluate(model, images)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  train_logits = train_forward(model, images, jax.random.key(1))
  assert train_logits.shape == (4, 10)


def test_evaluation_ignores_slws_drop_path_and_keys(images):
  shuffled = smj.create_model(
    "shufflemamba_tiny", rngs=nnx.Rngs(0), slws_max_prob=1.0, slws_group_size=1, drop_path_rate=0.3, **TINY
  )
  # Another init, then the same parameters: equal logits come from the mode, not from equal seeds.
  plain = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(1), **TINY)
  nnx.update(plain, nnx.state(shuffled, nnx.Param))
  expected = evaluate(plain, images)
  np.testing.assert_array_equal(evaluate(shuffled, images), expected)
  keyed = nnx.jit(lambda model, images, key: model(images, key=key))(shuffled, images, jax.random.key(5))
  np.testing.assert_array_equal(keyed, expected)


def test_training_without_shuffle_or_drop_path_equals_evaluation(images):
  model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), slws_max_prob=0.0, drop_path_rate=0.0, **TINY)
  np.testing.assert_allclose(
    train_forward(model, images, jax.random.key(3)), evaluate(model, images), rtol=1e-6, atol=1e-6
  )


def test_shuffle_changes_training_outputs_and_is_keyed(images):
  model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), slws_max_prob=1.0, slws_group_size=1, **TINY)
  eval_logits = evaluate(model, images)
  a = train_forward(model, images, jax.random.key(3))
  b = train_forward(model, images, jax.random.key(3))
  c = train_forward(model, images, jax.random.key(4))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, eval_logits, atol=1e-4)
  assert not np.allclose(a, c, atol=1e-4)


def _make_token_wise(model):
  """Makes every mixer act token by token: convs see only the current token, the state forgets."""
  mixer = model.layers.mixer
  for conv in (mixer.conv1d, mixer.conv1d_b):
    kernel = np.zeros(conv.kernel.shape, np.float32)
    kernel[:, -1] = 1.0  # tap k = d_conv - 1 is the current token in both directions
    conv.kernel[...] = jnp.asarray(kernel)
  for a_log, dt_proj in ((mixer.A_log, mixer.dt_proj), (mixer.A_b_log, mixer.dt_proj_b)):
    a_log[...] = jnp.full(a_log.shape, np.log(1e4))  # exp(delta * A) underflows to exactly 0
    dt_proj.bias[...] = jnp.full(dt_proj.bias.shape, 10.0)


def test_token_wise_block_gives_identical_outputs_with_and_without_shuffling(images):
  model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), slws_max_prob=1.0, slws_group_size=1, **TINY)
  _make_token_wise(model)
  np.testing.assert_allclose(
    train_forward(model, images, jax.random.key(9)), evaluate(model, images), rtol=1e-5, atol=1e-6
  )


def test_first_layer_is_never_shuffled():
  model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), slws_max_prob=1.0, **TINY)
  assert model.config.shuffle_probs[0] == 0.0 and model.config.shuffle_probs[-1] == 1.0


def test_drop_path_follows_the_reference_shifted_schedule():
  model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), drop_path_rate=0.3, **TINY)
  np.testing.assert_allclose(model.block_drop_rates, [0.0, 0.0, 0.1, 0.2], atol=1e-7)


def test_training_needs_a_key(images):
  model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), **TINY)
  with pytest.raises(ValueError, match="key"):
    model(images, train=True)


def test_other_resolution_resizes_position_embeddings(images):
  model = smj.create_model("vim_tiny", rngs=nnx.Rngs(0), **TINY)
  bigger = jax.random.normal(jax.random.key(2), (2, 24, 24, 3))
  assert evaluate(model, bigger).shape == (2, 10)
  with pytest.raises(ValueError, match="patch_size"):
    evaluate(model, jnp.ones((1, 18, 18, 3)))


def test_256px_input_through_224px_model():
  """Shapes only, traced abstractly: the 14x14 position table resized to the 16x16 grid (values: the test above)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: smj.create_model("vim_tiny", rngs=nnx.Rngs(0), depth=2)))
  images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  logits = jax.eval_shape(lambda state, images: nnx.merge(graphdef, state)(images), state, images)
  assert logits.shape == (1, 1000) and logits.dtype == jnp.float32


@pytest.mark.parametrize("method", ["sequential", "chunked"])
def test_scan_methods_give_the_same_model_outputs(method, images):
  reference = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), **{**TINY, "scan_method": "associative"})
  other = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), chunk_size=5, **{**TINY, "scan_method": method})
  np.testing.assert_allclose(evaluate(other, images), evaluate(reference, images), rtol=1e-4, atol=1e-5)


def test_bfloat16_computation_keeps_float32_params_and_logits(images):
  model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), dtype="bfloat16", **TINY)
  reference = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), **TINY)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logits = evaluate(model, images)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, evaluate(reference, images), atol=0.1)


def _loss_and_grads(model, images, labels, key):
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def step(params):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(images, train=True, key=key)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.value_and_grad(loss_fn)(params)

  return step(params)


def test_remat_gives_the_same_gradients(images):
  labels = jnp.arange(4) % 10
  settings = dict(slws_max_prob=0.5, drop_path_rate=0.2, **TINY)
  plain = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), remat=False, **settings)
  remat = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), remat=True, **settings)
  loss_a, grads_a = _loss_and_grads(plain, images, labels, jax.random.key(5))
  loss_b, grads_b = _loss_and_grads(remat, images, labels, jax.random.key(5))
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_jitted_training_step_of_vim_tiny_at_224():
  model = smj.create_model("vim_tiny", rngs=nnx.Rngs(0), remat=True, drop_path_rate=0.1, slws_max_prob=0.5)
  images = jax.random.normal(jax.random.key(0), (2, 224, 224, 3))
  loss, grads = _loss_and_grads(model, images, jnp.array([1, 2]), jax.random.key(1))
  assert np.isfinite(float(loss))
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(norms) > 0


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(depth_=3), "unknown model setting"),
    (dict(img_size=225), "img_size=225: must be divisible by patch_size 16"),
    (dict(slws_max_prob=1.2), "slws_max_prob"),
    (dict(slws_max_prob=-0.1), "slws_max_prob"),
    (dict(slws_group_size=0), "slws_group_size"),
    (dict(scan_method="parallel"), "scan_method"),
    (dict(slws_schedule="cosine"), "slws_schedule"),
    (dict(drop_path_rate=1.0), "drop_path_rate"),
    (dict(dtype="float8"), "dtype"),
    (dict(depth=0), "depth"),
    (dict(num_registers=4), "num_registers"),
  ],
)
def test_bad_settings_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    smj.model_config("shufflemamba_tiny", **overrides)


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="variant='vim_huge': unknown model variant"):
    smj.create_model("vim_huge", rngs=nnx.Rngs(0))

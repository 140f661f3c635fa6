"""The optimizer of the training recipe: schedule, weight-decay mask, gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import shufflemamba_jax as smj
from shufflemamba_jax import optim
from shufflemamba_jax import train

TINY = dict(img_size=16, patch_size=4, embed_dim=48, depth=4, num_classes=10)


def test_lr_schedule_key_steps():
  schedule = optim.warmup_cosine_schedule(peak_lr=2e-3, total_steps=1000, warmup_steps=100,
                                          warmup_lr=1e-6, min_lr=1e-5)
  np.testing.assert_allclose(schedule(0), 1e-6, rtol=1e-5)  # Starts at warmup_lr.
  np.testing.assert_allclose(schedule(50), 1e-6 + 0.5 * (2e-3 - 1e-6), rtol=1e-5)  # Linear.
  np.testing.assert_allclose(schedule(100), 2e-3, rtol=1e-5)  # Peak at the end of warmup.
  np.testing.assert_allclose(schedule(550), 0.5 * (2e-3 + 1e-5), rtol=1e-5)  # Cosine midpoint.
  np.testing.assert_allclose(schedule(1000), 1e-5, rtol=1e-5)  # min_lr at the end.
  np.testing.assert_allclose(schedule(1200), 1e-5, rtol=1e-5)  # ...and held after it.
  values = np.array([schedule(s) for s in range(100, 1001, 50)])
  assert np.all(np.diff(values) < 0)  # Decays monotonically after warmup.


def test_peak_lr_scales_with_global_batch():
  assert optim.peak_learning_rate(5e-4, 2048, True) == pytest.approx(2e-3)  # ShuffleMamba-B.
  assert optim.peak_learning_rate(5e-4, 2048, False) == pytest.approx(5e-4)


def test_weight_decay_mask_on_a_real_model():
  model = nnx.eval_shape(lambda: smj.create_model('shufflemamba_tiny', rngs=nnx.Rngs(0), **TINY))
  _, params, _ = train.split_model(model)
  mask = {jax.tree_util.keystr(path, simple=True, separator='.'): value
          for path, value in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))}
  decayed = sorted(name for name, value in mask.items() if value)
  assert decayed == sorted([
      'patch_embed.kernel', 'head.kernel',
      'layers.mixer.in_proj.kernel', 'layers.mixer.out_proj.kernel',
      'layers.mixer.conv1d.kernel', 'layers.mixer.conv1d_b.kernel',
      'layers.mixer.x_proj.kernel', 'layers.mixer.x_proj_b.kernel',
      'layers.mixer.dt_proj.kernel', 'layers.mixer.dt_proj_b.kernel',
      'layers.mixer.A_log', 'layers.mixer.A_b_log'])
  for name in ('pos_embed', 'cls_token', 'layers.mixer.D', 'layers.mixer.D_b',
               'layers.mixer.dt_proj.bias', 'layers.mixer.conv1d.bias', 'layers.norm.scale',
               'norm_f.scale', 'patch_embed.bias', 'head.bias'):
    assert mask[name] is False, name


def test_weight_decay_mask_registers_layout():
  model = nnx.eval_shape(lambda: smj.create_model(
      'shufflemamba_reg_small', rngs=nnx.Rngs(0), **dict(TINY, depth=2)))
  _, params, _ = train.split_model(model)
  mask = {jax.tree_util.keystr(path, simple=True, separator='.'): value
          for path, value in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))}
  assert mask['pos_embed_cls'] is False and mask['pos_embed'] is False
  assert mask['neck.kernel'] is True and mask['norm_neck.scale'] is False


def test_decay_applies_only_to_masked_parameters():
  params = {'w': jnp.ones((2, 2)), 'pos_embed': jnp.ones((3, 2)), 'b': jnp.ones((2,))}
  tx = optim.create_optimizer(schedule=lambda _: 0.1, weight_decay=0.5, b1=0.9, b2=0.999,
                              eps=1e-8, grad_clip=None)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates['pos_embed'], 0.0)
  np.testing.assert_array_equal(updates['b'], 0.0)


def test_grad_clipping_bounds_the_global_norm():
  """Adam's first moment after one step is (1 - b1) * the clipped gradient (norm 1, not 20)."""
  params = {'w': jnp.zeros((4,))}
  tx = optim.create_optimizer(schedule=lambda _: 1.0, weight_decay=0.0, b1=0.9, b2=0.999,
                              eps=1e-8, grad_clip=1.0)
  _, opt_state = tx.update({'w': jnp.full((4,), 10.0)}, tx.init(params), params)
  first_moment = optax.tree_utils.tree_get(opt_state, 'mu')
  np.testing.assert_allclose(optax.tree.norm(first_moment), 0.1, rtol=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
  """Four micro-batches in one jitted step give the same update as the whole batch at once."""
  model = smj.create_model('shufflemamba_tiny', rngs=nnx.Rngs(0), slws_max_prob=0.0,
                           scan_method='associative', **TINY)
  graphdef, params, rest = train.split_model(model)
  tx = optax.sgd(0.5)  # Plain SGD: the update is the gradient itself, no normalisation.
  schedule = lambda step: jnp.float32(0.5)
  batch = {'image': jax.random.normal(jax.random.key(1), (16, 16, 16, 3)),
           'label': jnp.arange(16, dtype=jnp.int32) % 10}
  results = []
  for accum in (1, 4):
    state = train.init_train_state(params, tx, seed=0, ema_decay=0.0)
    step = train.make_train_step(graphdef, rest, tx, schedule, num_classes=10,
                                 grad_accum_steps=accum, label_smoothing=0.1, donate=False)
    results.append(step(state, batch))
  (big_state, big_metrics), (acc_state, acc_metrics) = results
  np.testing.assert_allclose(acc_metrics['loss'], big_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(acc_metrics['grad_norm'], big_metrics['grad_norm'], rtol=1e-4)
  np.testing.assert_allclose(acc_metrics['train_top1'], big_metrics['train_top1'])
  for big, acc in zip(jax.tree.leaves(big_state['params']), jax.tree.leaves(acc_state['params'])):
    np.testing.assert_allclose(acc, big, rtol=1e-4, atol=1e-6)
  assert int(acc_state['step']) == 1


def test_ema_update():
  ema = optim.ema_update({'w': jnp.zeros(3)}, {'w': jnp.ones(3)}, 0.9)
  np.testing.assert_allclose(ema['w'], 0.1, rtol=1e-6)

"""The optimizer of the training recipe: schedule, weight-decay mask, gradient accumulation."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import shufflemamba_jax as smj
from shufflemamba_jax.data import device
from shufflemamba_jax.training import config_files, mixup, optim, steps
from shufflemamba_jax.training.tasks import classification

TINY = dict(img_size=16, patch_size=4, embed_dim=48, depth=4, num_classes=10)
# The ShuffleMamba-B recipe's optimizer (SPEC §4); tests replace what they vary.
RECIPE = optim.OptimizerSettings.from_config(
  config_files.get_config(str(pathlib.Path(__file__).parents[1] / "configs" / "imagenet.py"), "shufflemamba_base")
)
NO_MIXUP = mixup.MixupSettings(
  mixup_alpha=0.0, cutmix_alpha=0.0, mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1, mixup_group_size=1
)


def reference_schedule(step, *, peak_lr, total_steps, warmup_steps, warmup_lr, min_lr):
  """The recipe's schedule written out: linear warmup, then half a cosine to min_lr, held after."""
  if step < warmup_steps:
    return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
  progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
  return min_lr + 0.5 * (peak_lr - min_lr) * (1 + np.cos(np.pi * progress))


def test_lr_schedule_key_steps():
  settings = dataclasses.replace(RECIPE, lr=2e-3, lr_scale_batch=False, warmup_epochs=1.0, warmup_lr=1e-6, min_lr=1e-5)
  schedule = optim.learning_rate_schedule(settings, batch_size=256, steps_per_epoch=100, total_steps=1000)
  np.testing.assert_allclose(schedule(0), 1e-6, rtol=1e-5)  # Starts at warmup_lr.
  np.testing.assert_allclose(schedule(50), 1e-6 + 0.5 * (2e-3 - 1e-6), rtol=1e-5)  # Linear.
  np.testing.assert_allclose(schedule(100), 2e-3, rtol=1e-5)  # Peak at the end of warmup.
  np.testing.assert_allclose(schedule(550), 0.5 * (2e-3 + 1e-5), rtol=1e-5)  # Cosine midpoint.
  np.testing.assert_allclose(schedule(1000), 1e-5, rtol=1e-5)  # min_lr at the end.
  np.testing.assert_allclose(schedule(1200), 1e-5, rtol=1e-5)  # ...and held after it.
  values = np.array([schedule(s) for s in range(100, 1001, 50)])
  assert np.all(np.diff(values) < 0)  # Decays monotonically after warmup.


def test_lr_schedule_is_the_recipe_at_every_step():
  """optax's warmup-cosine equals the recipe's formula (DeiT scaling: peak = lr * batch / 512)."""
  schedule = optim.learning_rate_schedule(RECIPE, batch_size=2048, steps_per_epoch=10, total_steps=3000)
  expected = [
    reference_schedule(step, peak_lr=2e-3, total_steps=3000, warmup_steps=300, warmup_lr=5e-7, min_lr=5e-6)
    for step in range(3100)
  ]
  # atol: optax interpolates from the peak in float32, 1e-10 off at the 5e-7 start (1e-7 of the peak).
  np.testing.assert_allclose(jax.vmap(schedule)(jnp.arange(3100)), expected, rtol=2e-5, atol=3e-10)
  unscaled = optim.learning_rate_schedule(
    dataclasses.replace(RECIPE, lr_scale_batch=False), batch_size=2048, steps_per_epoch=10, total_steps=3000
  )
  np.testing.assert_allclose(unscaled(300), 5e-4, rtol=1e-6)
  # Warmup longer than the run: warmup all the way, never a zero-length decay.
  short = optim.learning_rate_schedule(RECIPE, batch_size=512, steps_per_epoch=10, total_steps=50)
  np.testing.assert_allclose(short(25), 5e-7 + (5e-4 - 5e-7) * 25 / 50, rtol=1e-5)


def mmengine_learning_rates(peak, *, warmup_steps, warmup_factor, milestones, gamma, num_steps, epoch_length=None):
  """The learning rate of each of `num_steps` iterations under mmengine's LinearLR (by iteration) and
  MultiStepLR (milestones in iterations, or in epochs of `epoch_length` iterations, stepped at each
  epoch's end), stepped as mmengine's ParamSchedulerHook steps them."""
  torch = pytest.importorskip("torch")
  scheduler = pytest.importorskip("mmengine.optim.scheduler")
  optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
  linear = scheduler.LinearLR(optimizer, start_factor=warmup_factor, by_epoch=False, begin=0, end=warmup_steps)
  by_epoch = epoch_length is not None
  multistep = scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma, by_epoch=by_epoch)
  rates = []
  for step in range(num_steps):
    rates.append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    linear.step()
    if not by_epoch or (step + 1) % epoch_length == 0:
      multistep.step()
  return np.array(rates)


@pytest.mark.parametrize(
  "warmup_steps, warmup_factor, milestones, gamma, epoch_length, boundaries",
  [
    (10, 0.001, (30, 45), 0.1, None, (30, 45)),  # Milestones in iterations.
    (20, 0.01, (5, 12, 12), 0.5, None, (5, 12, 12)),  # Inside the warmup, one repeated.
    (10, 0.001, (3, 5), 0.1, 7, (21, 35)),  # In epochs (the recipe's), as steps of the schedule.
    (2, 0.25, (0, 40), 0.2, None, (0, 40)),  # The shortest warmup, a milestone at 0.
  ],
)
def test_warmup_multistep_schedule_is_mmengines(
  warmup_steps, warmup_factor, milestones, gamma, epoch_length, boundaries
):
  """LinearLR + MultiStepLR as the detection recipe chains them, every step of 300."""
  expected = mmengine_learning_rates(
    1e-4,
    warmup_steps=warmup_steps,
    warmup_factor=warmup_factor,
    milestones=milestones,
    gamma=gamma,
    num_steps=300,
    epoch_length=epoch_length,
  )
  schedule = optim.warmup_multistep_schedule(
    1e-4, warmup_steps=warmup_steps, warmup_factor=warmup_factor, boundaries=boundaries, decay=gamma
  )
  np.testing.assert_allclose(jax.vmap(schedule)(jnp.arange(300)), expected, rtol=2e-6)
  np.testing.assert_allclose(jax.jit(schedule)(299), expected[-1], rtol=2e-6)


def test_warmup_multistep_schedule_key_steps():
  """The recipe's: 1e-3 of the peak at 0, the peak at step 999 (LinearLR's end 1000, minus one)."""
  schedule = optim.warmup_multistep_schedule(1e-4, warmup_steps=1000, warmup_factor=0.001, boundaries=(1200, 1500))
  np.testing.assert_allclose(schedule(0), 1e-7, rtol=1e-5)
  np.testing.assert_allclose(schedule(700), 1e-4 * (0.001 + 0.999 * 700 / 999), rtol=1e-6)
  np.testing.assert_allclose(schedule(999), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(schedule(1199), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(schedule(1200), 1e-5, rtol=1e-6)
  np.testing.assert_allclose(schedule(1500), 1e-6, rtol=1e-6)
  overlap = optim.warmup_multistep_schedule(1e-4, warmup_steps=1000, warmup_factor=0.001, boundaries=(800,))
  np.testing.assert_allclose(overlap(800), 1e-5 * (0.001 + 0.999 * 800 / 999), rtol=1e-6)  # Both at once.
  no_warmup = optim.warmup_multistep_schedule(2.0, warmup_steps=0, warmup_factor=0.5, boundaries=(3,), decay=0.5)
  np.testing.assert_allclose([no_warmup(step) for step in range(5)], [2.0, 2.0, 2.0, 1.0, 1.0])
  for setting, kwargs in [
    ("warmup_steps", dict(warmup_steps=1)),
    ("warmup_steps", dict(warmup_steps=-1)),
    ("warmup_factor", dict(warmup_factor=1.5)),
    ("boundaries", dict(boundaries=(-1,))),
    ("boundaries", dict(boundaries=8)),
    ("decay", dict(decay=-0.1)),
  ]:
    with pytest.raises(smj.SettingError) as error:
      optim.warmup_multistep_schedule(1.0, **{**dict(warmup_steps=10, warmup_factor=0.1, boundaries=(5,)), **kwargs})
    assert error.value.setting == setting


def test_weight_decay_mask_on_a_real_model():
  model = nnx.eval_shape(lambda: smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), **TINY))
  _, params, _ = steps.split_model(model)
  mask = {
    jax.tree_util.keystr(path, simple=True, separator="."): value
    for path, value in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))
  }
  decayed = sorted(name for name, value in mask.items() if value)
  assert decayed == sorted(
    [
      "patch_embed.kernel",
      "head.kernel",
      "layers.mixer.in_proj.kernel",
      "layers.mixer.out_proj.kernel",
      "layers.mixer.conv1d.kernel",
      "layers.mixer.conv1d_b.kernel",
      "layers.mixer.x_proj.kernel",
      "layers.mixer.x_proj_b.kernel",
      "layers.mixer.dt_proj.kernel",
      "layers.mixer.dt_proj_b.kernel",
      "layers.mixer.A_log",
      "layers.mixer.A_b_log",
    ]
  )
  for name in (
    "pos_embed",
    "cls_token",
    "layers.mixer.D",
    "layers.mixer.D_b",
    "layers.mixer.dt_proj.bias",
    "layers.mixer.conv1d.bias",
    "layers.norm.scale",
    "norm_f.scale",
    "patch_embed.bias",
    "head.bias",
  ):
    assert mask[name] is False, name


def test_weight_decay_mask_registers_layout():
  model = nnx.eval_shape(lambda: smj.create_model("shufflemamba_reg_small", rngs=nnx.Rngs(0), **dict(TINY, depth=2)))
  _, params, _ = steps.split_model(model)
  mask = {
    jax.tree_util.keystr(path, simple=True, separator="."): value
    for path, value in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))
  }
  assert mask["pos_embed_cls"] is False and mask["pos_embed"] is False
  assert mask["neck.kernel"] is True and mask["norm_neck.scale"] is False


def test_decay_applies_only_to_masked_parameters():
  params = {"w": jnp.ones((2, 2)), "pos_embed": jnp.ones((3, 2)), "b": jnp.ones((2,))}
  tx = optim.create_optimizer(dataclasses.replace(RECIPE, weight_decay=0.5, grad_clip=None), lambda _: 0.1)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["pos_embed"], 0.0)
  np.testing.assert_array_equal(updates["b"], 0.0)


def test_grad_clipping_bounds_the_global_norm():
  """Adam's first moment after one step is (1 - b1) * the clipped gradient (norm 1, not 20)."""
  params = {"w": jnp.zeros((4,))}
  tx = optim.create_optimizer(dataclasses.replace(RECIPE, weight_decay=0.0, grad_clip=1.0), lambda _: 1.0)
  _, opt_state = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
  first_moment = optax.tree_utils.tree_get(opt_state, "mu")
  np.testing.assert_allclose(optax.tree.norm(first_moment), 0.1, rtol=1e-5)


@pytest.fixture(scope="module")
def sgd_steps():
  """One plain-SGD step (the update is the gradient itself) on one batch, without and with four
  micro-batches, with EMA 0.9 and label smoothing 0.1; no mixup and no shuffle."""
  model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), slws_max_prob=0.0, scan_method="sequential", **TINY)
  graphdef, params, rest = steps.split_model(model)
  tx = optax.sgd(0.5)
  pixels = jax.random.randint(jax.random.key(1), (16, 16, 16, 3), 0, 256).astype(jnp.uint8)
  batch = {"image": pixels, "label": jnp.arange(16) % 10}
  results = {}
  for accum in (1, 4):
    step = classification.make_train_step(
      graphdef,
      rest,
      tx,
      lambda _: 0.5,
      num_classes=10,
      seed=0,
      mixup_settings=NO_MIXUP,
      grad_accum_steps=accum,
      ema_decay=0.9,
      donate=False,
    )
    results[accum] = step(steps.init_train_state(params, tx, ema_decay=0.9), batch)
  return model, params, batch, results


def test_gradient_accumulation_equals_one_big_batch(sgd_steps):
  """Four micro-batches in one jitted step give the same update as the whole batch at once."""
  _, _, _, results = sgd_steps
  (big_state, big_metrics), (acc_state, acc_metrics) = results[1], results[4]
  np.testing.assert_allclose(acc_metrics["loss"], big_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(acc_metrics["grad_norm"], big_metrics["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(acc_metrics["train_top1"], big_metrics["train_top1"])
  for big, acc in zip(jax.tree.leaves(big_state["params"]), jax.tree.leaves(acc_state["params"])):
    np.testing.assert_allclose(acc, big, rtol=1e-4, atol=1e-6)
  assert int(acc_state["step"]) == 1


def test_the_train_step_updates_the_ema_and_labels_like_the_recipe(sgd_steps):
  """EMA = decay * EMA + (1 - decay) * new params (optax.incremental_update), and the loss is the
  cross entropy against label-smoothed one-hots (optax.smooth_labels)."""
  model, params, batch, results = sgd_steps
  new_state, metrics = results[1]
  for ema, old, new in zip(*(jax.tree.leaves(tree) for tree in (new_state["ema"], params, new_state["params"]))):
    np.testing.assert_allclose(ema, 0.9 * old + 0.1 * new, rtol=1e-5, atol=1e-7)
  log_probs = jax.nn.log_softmax(model(device.normalize(batch["image"])))  # Normalized in the step.
  targets = jax.nn.one_hot(batch["label"], 10) * 0.9 + 0.01
  np.testing.assert_allclose(metrics["loss"], -jnp.mean(jnp.sum(targets * log_probs, axis=-1)), rtol=1e-5)

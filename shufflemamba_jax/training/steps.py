"""The train state and the jitted update and evaluation steps, pure functions of that state.

The train state is a plain dict pytree (checkpointed as is):
  step: int32 scalar, optimizer steps done;
  params: nested dict of float arrays (the nnx.Param values);  opt_state: optax state;
  ema: like params, or None when ema_decay is 0;
  nonfinite_step: int32, the first step whose loss was NaN/Inf, -1 if none (checked at log
    points, so a bad step is named exactly without a host sync on every step);
  model_state (segmentation only): nested dict of the model's other state, the BatchNorm
    running statistics, updated by every training step.
The training key of step s is fold_in(key(seed), s): a function of the config, not state.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from shufflemamba_jax.data import IGNORE_INDEX, device
from shufflemamba_jax.models import upernet
from shufflemamba_jax.parallel import sharding
from shufflemamba_jax.training import mixup, segmentation


def split_model(model: nnx.Module):
  """(graphdef, params as a nested dict of arrays, the remaining state)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), rest


def init_train_state(params, tx: optax.GradientTransformation, *, ema_decay: float) -> dict:
  """The train state (see the module docstring) at step 0 for `params`."""
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "opt_state": tx.init(params),
    "ema": jax.tree.map(jnp.copy, params) if ema_decay > 0 else None,
    "nonfinite_step": jnp.full((), -1, jnp.int32),
  }


def _apply_gradients(state, grads, loss, tx: optax.GradientTransformation, ema_decay: float):
  """One optimizer update of `state` (both tasks' train state): (params, opt_state, EMA, the
  first non-finite step), the EMA left None when it is off."""
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_params = optax.apply_updates(state["params"], updates)
  ema = state["ema"]
  if ema is not None:
    ema = optax.incremental_update(new_params, ema, step_size=1.0 - ema_decay)
  bad = (state["nonfinite_step"] < 0) & ~jnp.isfinite(loss)
  return new_params, opt_state, ema, jnp.where(bad, state["step"], state["nonfinite_step"])


def _jit_train_step(train_step, donate: bool, state_shardings, batch_sharding):
  """jax.jit of `train_step(state, batch) -> (state, metrics)`, the state donated when `donate`.

  With explicit shardings the state keeps its FSDP layout step after step and the metrics are
  replicated.
  """
  donate_argnums = (0,) if donate else ()
  if state_shardings is None:
    return jax.jit(train_step, donate_argnums=donate_argnums)
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, replicated),
    donate_argnums=donate_argnums,
  )


def make_train_step(
  graphdef,
  rest,
  tx: optax.GradientTransformation,
  schedule: Callable,
  *,
  num_classes: int,
  seed: int,
  mixup_settings: mixup.MixupSettings,
  input_transform: device.DeviceTransform = device.IMAGENET,
  grad_accum_steps: int = 1,
  ema_decay: float = 0.0,
  donate: bool = True,
  state_shardings=None,
  batch_sharding=None,
):
  """Returns `train_step(state, batch) -> (state, metrics)`, one jitted pure function.

  batch: {"image": (batch, H, W, 3) uint8, "label": (batch,) int32} (global batch on the
  leading axis), normalized and randomly erased by `input_transform` on the device, then mixed
  (`mixup_settings`). One call is one optimizer update: with `grad_accum_steps` = A > 1 the
  batch is mixed as a whole, split into A equal micro-batches (every A-th sample, so each takes
  its share of every device's samples) and their gradients averaged in a scan, which equals one
  big-batch step for a deterministic model. Micro-batch m uses fold_in(model key, m).
  metrics: float32 scalars loss, train_top1 (against the unmixed labels), grad_norm, lr.
  """

  def loss_fn(params, images, targets, key):
    model = nnx.merge(graphdef, params, rest)
    logits = model(images, train=True, key=key)
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)), logits

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    step = state["step"]
    mix_key, model_key, erase_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), step), 3)
    labels = batch["label"]
    images = input_transform(batch["image"], erase_key)
    images, targets, _ = mixup.mix_batch(mix_key, images, labels, num_classes=num_classes, settings=mixup_settings)
    params = state["params"]

    if grad_accum_steps == 1:
      (loss, logits), grads = grad_fn(params, images, targets, model_key)
    else:
      batch_size = images.shape[0]

      def to_micro_batches(x):
        # Micro-batch m takes rows m, m + A, m + 2A, ... (A = grad_accum_steps): an equal share of
        # every device's rows, so no micro-batch has to move between devices.
        return jnp.swapaxes(x.reshape((batch_size // grad_accum_steps, grad_accum_steps) + x.shape[1:]), 0, 1)

      micro_batches = [to_micro_batches(x) for x in (images, targets)]

      def accumulate(carry, xs):
        grad_sum, loss_sum = carry
        index, image, target = xs
        (loss, logits), grads = grad_fn(params, image, target, jax.random.fold_in(model_key, index))
        return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), logits

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grad_sum, loss_sum), logits = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(grad_accum_steps), *micro_batches)
      )
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
      loss = loss_sum / grad_accum_steps
      logits = jnp.swapaxes(logits, 0, 1).reshape((batch_size,) + logits.shape[2:])

    new_params, opt_state, ema, nonfinite_step = _apply_gradients(state, grads, loss, tx, ema_decay)
    new_state = dict(
      state, step=step + 1, params=new_params, opt_state=opt_state, ema=ema, nonfinite_step=nonfinite_step
    )
    metrics = {
      "loss": loss,
      "train_top1": jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)),
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(step),
    }
    return new_state, metrics

  return _jit_train_step(train_step, donate, state_shardings, batch_sharding)


def make_eval_step(graphdef, rest, input_transform: device.DeviceTransform = device.IMAGENET):
  """Returns jitted `eval_step(params, batch) -> sums` for a padded, masked eval batch.

  batch: {"image": (batch, H, W, 3) uint8, "label": (batch,) int32, "mask": (batch,) float32};
  the images are normalized by `input_transform` on the device.
  sums: float32 scalars top1, top5 (correct counts), loss (cross-entropy sum), count; padding
  examples (mask 0) count for nothing.
  """

  def eval_step(params, batch):
    logits = nnx.merge(graphdef, params, rest)(input_transform(batch["image"]), train=False)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    _, top_k = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    top1 = (top_k[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(top_k == labels[:, None], axis=-1).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return {
      "top1": jnp.sum(top1 * mask),
      "top5": jnp.sum(top5 * mask),
      "loss": jnp.sum(loss * mask),
      "count": jnp.sum(mask),
    }

  return jax.jit(eval_step)


def run_evaluation(eval_step, params, batches, mesh) -> dict:
  """Top-1, top-5 (fractions), mean loss and count of `params` over finite eval `batches`.

  Each process passes its own local batches; they are assembled into global batches sharded over
  all devices of `mesh`, so the sums (and the result) cover every process's examples.
  """
  totals = {"top1": 0.0, "top5": 0.0, "loss": 0.0, "count": 0.0}
  pending = []
  fields = ("image", "label", "mask")
  for batch in sharding.prefetch_to_mesh(({name: b[name] for name in fields} for b in batches), mesh):
    with jax.set_mesh(mesh):  # Activation sharding constraints refer to this mesh.
      pending.append(eval_step(params, batch))
  for sums in jax.device_get(pending):
    for name in totals:
      totals[name] += float(sums[name])
  count = max(totals["count"], 1.0)
  return {
    "top1": totals["top1"] / count,
    "top5": totals["top5"] / count,
    "loss": totals["loss"] / count,
    "count": totals["count"],
  }


# ---------------------------------------------------------------------------------------------
# Semantic segmentation: the same state, plus the BatchNorm statistics.
# ---------------------------------------------------------------------------------------------


def init_segmentation_state(params, model_state, tx: optax.GradientTransformation, *, ema_decay: float) -> dict:
  """The train state of a segmenter at step 0: `init_train_state` plus its `model_state`."""
  return {**init_train_state(params, tx, ema_decay=ema_decay), "model_state": model_state}


def make_segmentation_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  schedule: Callable,
  *,
  seed: int,
  aux_weight: float = 0.4,
  class_weight: tuple[float, ...] | None = None,
  input_transform: device.DeviceTransform = device.IMAGENET,
  ema_decay: float = 0.0,
  donate: bool = True,
  state_shardings=None,
  batch_sharding=None,
):
  """Returns `train_step(state, batch) -> (state, metrics)` for a segmenter, one jitted function.

  batch: {"image": (batch, H, W, 3) uint8, "label": (batch, H, W) integers, 255 ignored}
  (global batch on the leading axis), normalized by `input_transform` on the device. BatchNorm
  uses the statistics of the whole global batch, and its running averages go to
  state["model_state"]. `class_weight` (one weight per class, or None) weighs each pixel's loss by
  its label (`segmentation.cross_entropy`). metrics: float32 scalars loss (decode + aux_weight x
  aux), decode_loss, aux_loss, train_pixel_acc (decode head, non-ignored pixels), grad_norm, lr.
  """
  grad_fn = jax.value_and_grad(segmentation.train_loss, argnums=1, has_aux=True)

  def train_step(state, batch):
    step = state["step"]
    model_key = jax.random.fold_in(jax.random.key(seed), step)
    images = input_transform(batch["image"])
    labels = batch["label"].astype(jnp.int32)
    params = state["params"]
    (loss, (parts, model_state, logits)), grads = grad_fn(
      graphdef,
      params,
      state["model_state"],
      images,
      labels,
      model_key,
      aux_weight=aux_weight,
      class_weight=class_weight,
    )
    new_params, opt_state, ema, nonfinite_step = _apply_gradients(state, grads, loss, tx, ema_decay)
    new_state = dict(
      state,
      step=step + 1,
      params=new_params,
      model_state=nnx.to_pure_dict(model_state),
      opt_state=opt_state,
      ema=ema,
      nonfinite_step=nonfinite_step,
    )
    predictions = jnp.argmax(upernet.resize_bilinear(logits, labels.shape[1:3]), axis=-1)
    valid = labels != IGNORE_INDEX
    metrics = {
      "loss": loss,
      **parts,
      "train_pixel_acc": jnp.sum((predictions == labels) & valid) / jnp.maximum(jnp.sum(valid), 1),
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(step),
    }
    return new_state, metrics

  return _jit_train_step(train_step, donate, state_shardings, batch_sharding)


def make_segmentation_eval_step(
  graphdef,
  num_classes: int,
  *,
  crop_size: tuple[int, int] | None = None,
  stride: tuple[int, int] | None = None,
  input_transform: device.DeviceTransform = device.IMAGENET,
):
  """Returns jitted `eval_step(params, model_state, batch) -> areas` for a padded, masked batch.

  batch: {"image": (batch, H, W, 3) uint8, "label": (batch, H, W) integers (255 ignored),
  "mask": (batch,) float32}. Logits come from sliding windows of `crop_size` every `stride`, or
  from the whole image when crop_size is None. areas: `segmentation.intersect_and_union` of the
  global batch, (num_classes,) int32 each.
  """

  def eval_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    logits = segmentation.predict_logits(model, input_transform(batch["image"]), crop_size=crop_size, stride=stride)
    predictions = jnp.argmax(logits, axis=-1)
    return segmentation.intersect_and_union(predictions, batch["label"], num_classes, mask=batch["mask"])

  return jax.jit(eval_step)


def run_segmentation_evaluation(eval_step, params, model_state, batches, mesh, class_names=None) -> dict:
  """`segmentation.segmentation_metrics` (mIoU, mAcc, aAcc, per-class IoU and accuracy) of the
  model over finite eval `batches`: every process passes its local batches, the areas are global
  and summed over the whole split before dividing."""
  totals = None
  fields = ("image", "label", "mask")
  for batch in sharding.prefetch_to_mesh(({name: b[name] for name in fields} for b in batches), mesh):
    with jax.set_mesh(mesh):
      areas = eval_step(params, model_state, batch)
    if totals is None:
      totals = segmentation.AreaTotals(areas["area_label"].shape[0])
    totals.add(areas)
  return segmentation.segmentation_metrics(totals.totals, class_names)

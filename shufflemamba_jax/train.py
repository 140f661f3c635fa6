"""Training and evaluation of Vision Mamba / ShuffleMamba classifiers (SPEC section 4).

`train_and_evaluate(config, workdir)` runs a whole experiment: model, data, a pure `jax.jit`
update step over the `nnx.split` state, periodic logging, evaluation of the model and its EMA,
asynchronous checkpoints and resumption from the latest one. `evaluate(...)` scores a saved
checkpoint on any split and resolution.

The train state is a plain dict pytree (checkpointed as is):
  step: int32 scalar, optimizer steps done;  rng: uint32 key data of the run's base key;
  params: nested dict of float arrays (nnx.Param values);  opt_state: optax state;
  ema: like params, or None when ema_decay is 0;
  nonfinite_step: int32, the first step whose loss was NaN/Inf, -1 if none (checked at log
  points, so a bad step is named exactly without a host sync on every step).
"""

import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import shufflemamba_jax
from shufflemamba_jax import checkpoint as checkpoint_lib
from shufflemamba_jax import convert
from shufflemamba_jax import metrics as metrics_lib
from shufflemamba_jax import mixup
from shufflemamba_jax import optim
from shufflemamba_jax import preemption
from shufflemamba_jax import sharding
from shufflemamba_jax import warm_start

# Config fields under `model` that are not VisionMambaConfig overrides.
_MODEL_FIELDS_NOT_OVERRIDES = ('variant', 'slws')


# ----------------------------------------------------------------------------------------------
# Model and state
# ----------------------------------------------------------------------------------------------
def model_overrides(config) -> dict:
  """VisionMambaConfig overrides from `config.model` (None fields keep the variant's value)."""
  overrides = {name: value for name, value in config.model.items()
               if name not in _MODEL_FIELDS_NOT_OVERRIDES and value is not None}
  slws = {'slws_max_prob': config.model.slws.max_prob,
          'slws_schedule': config.model.slws.schedule,
          'slws_group_size': config.model.slws.group_size}
  overrides.update({name: value for name, value in slws.items() if value is not None})
  return overrides


def create_model(config, num_classes: int, seed: int | None = None):
  """The model of `config` with `num_classes` outputs, parameters from `seed` (default config.seed)."""
  return shufflemamba_jax.create_model(
      config.model.variant, rngs=nnx.Rngs(config.seed if seed is None else seed),
      num_classes=num_classes, img_size=config.image_size, **model_overrides(config))


def split_model(model):
  """(graphdef, params as a nested dict of arrays, the remaining state)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), rest


def init_train_state(params, tx: optax.GradientTransformation, *, seed: int, ema_decay: float):
  """The train state (see module docstring) at step 0 for `params`."""
  return {
      'step': jnp.zeros((), jnp.int32),
      'rng': jax.random.key_data(jax.random.key(seed)),
      'params': params,
      'opt_state': tx.init(params),
      'ema': jax.tree.map(jnp.copy, params) if ema_decay > 0 else None,
      'nonfinite_step': jnp.full((), -1, jnp.int32),
  }


# ----------------------------------------------------------------------------------------------
# Update and evaluation steps
# ----------------------------------------------------------------------------------------------
def make_train_step(graphdef, rest, tx: optax.GradientTransformation, schedule: Callable, *,
                    num_classes: int, grad_accum_steps: int = 1, ema_decay: float = 0.0,
                    mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mixup_prob: float = 1.0,
                    mixup_switch_prob: float = 0.5, label_smoothing: float = 0.0,
                    donate: bool = True, state_shardings=None, batch_sharding=None):
  """Returns `train_step(state, batch) -> (state, metrics)`, one jitted pure function.

  batch: {'image': (batch, H, W, 3) float32, 'label': (batch,) int32} (global batch on the
  leading axis). One call is one optimizer update: with `grad_accum_steps` > 1 the batch is
  mixed as a whole, split into that many equal micro-batches and their gradients averaged
  in a scan, which equals one big-batch step for a deterministic model. The training key of
  step s is fold_in(key(seed), s); micro-batch m uses fold_in(model key, m).
  metrics: float32 scalars loss, train_top1 (against the unmixed labels), grad_norm, lr.
  """

  def loss_fn(params, images, targets, key):
    model = nnx.merge(graphdef, params, rest)
    logits = model(images, train=True, key=key)
    loss = jnp.mean(mixup.soft_target_cross_entropy(logits, targets))
    return loss, logits

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    step = state['step']
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)
    mix_key, model_key = jax.random.split(step_key)
    labels = batch['label']
    images, targets, _ = mixup.mix_batch(
        mix_key, batch['image'], labels, num_classes=num_classes, mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha, prob=mixup_prob, switch_prob=mixup_switch_prob,
        label_smoothing=label_smoothing)
    params = state['params']

    if grad_accum_steps == 1:
      (loss, logits), grads = grad_fn(params, images, targets, model_key)
    else:
      batch_size = images.shape[0]
      micro = batch_size // grad_accum_steps
      micro_images = images.reshape((grad_accum_steps, micro) + images.shape[1:])
      micro_targets = targets.reshape((grad_accum_steps, micro) + targets.shape[1:])

      def accumulate(carry, xs):
        grad_sum, loss_sum = carry
        index, image, target = xs
        (loss, logits), grads = grad_fn(params, image, target,
                                        jax.random.fold_in(model_key, index))
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, loss_sum + loss), logits

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grad_sum, loss_sum), logits = jax.lax.scan(
          accumulate, (zeros, jnp.zeros((), jnp.float32)),
          (jnp.arange(grad_accum_steps), micro_images, micro_targets))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
      loss = loss_sum / grad_accum_steps
      logits = logits.reshape((batch_size,) + logits.shape[2:])

    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    ema = state['ema']
    if ema is not None:
      ema = optim.ema_update(ema, new_params, ema_decay)
    finite = jnp.isfinite(loss)
    nonfinite_step = jnp.where((state['nonfinite_step'] < 0) & ~finite, step,
                               state['nonfinite_step'])
    new_state = dict(state, step=step + 1, params=new_params, opt_state=opt_state, ema=ema,
                     nonfinite_step=nonfinite_step)
    metrics = {
        'loss': loss,
        'train_top1': jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)),
        'grad_norm': optax.tree.norm(grads),
        'lr': schedule(step),
    }
    return new_state, metrics

  donate_argnums = (0,) if donate else ()
  if state_shardings is None:
    return jax.jit(train_step, donate_argnums=donate_argnums)
  # Explicit shardings: the state keeps its FSDP layout step after step, metrics are replicated.
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=donate_argnums)


def make_eval_step(graphdef, rest):
  """Returns jitted `eval_step(params, batch) -> sums` for a padded, masked eval batch.

  batch: {'image': (batch, H, W, 3) float32, 'label': (batch,) int32, 'mask': (batch,) float32}.
  sums: float32 scalars top1, top5 (correct counts), loss (cross-entropy sum), count; padding
  examples (mask 0) count for nothing.
  """

  def eval_step(params, batch):
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch['image'], train=False)
    labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
    k = min(5, logits.shape[-1])
    _, top_k = jax.lax.top_k(logits, k)
    top1 = (top_k[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(top_k == labels[:, None], axis=-1).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return {'top1': jnp.sum(top1 * mask), 'top5': jnp.sum(top5 * mask),
            'loss': jnp.sum(loss * mask), 'count': jnp.sum(mask)}

  return jax.jit(eval_step)


def run_evaluation(eval_step, params, dataset, to_device=None) -> dict:
  """Top-1, top-5 (fractions) and mean loss of `params` over a finite eval dataset."""
  totals = {'top1': 0.0, 'top5': 0.0, 'loss': 0.0, 'count': 0.0}
  pending = []
  for batch in _as_numpy(dataset):
    batch = {name: batch[name] for name in ('image', 'label', 'mask')}
    pending.append(eval_step(params, to_device(batch) if to_device else batch))
  for sums in jax.device_get(pending):
    for name in totals:
      totals[name] += float(sums[name])
  count = max(totals['count'], 1.0)
  return {'top1': totals['top1'] / count, 'top5': totals['top5'] / count,
          'loss': totals['loss'] / count, 'count': totals['count']}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _as_numpy(dataset):
  return dataset.as_numpy_iterator() if hasattr(dataset, 'as_numpy_iterator') else iter(dataset)


def _dataset_sizes(info, config) -> tuple[int, int]:
  """(train examples, eval examples) from a DatasetInfo (ints or per-split dicts)."""

  def pick(value, split):
    return int(value[split]) if isinstance(value, dict) else int(value)

  return (pick(info.num_train_examples, config.train_split),
          pick(info.num_eval_examples, config.eval_split))


def steps_per_epoch(num_train_examples: int, batch_size: int) -> int:
  if batch_size > num_train_examples:
    raise ValueError(f'batch_size {batch_size} exceeds the {num_train_examples} training examples.')
  return num_train_examples // batch_size  # The pipeline drops the remainder: static shapes.


def total_train_steps(config, epoch_steps: int) -> int:
  if config.total_steps is not None:
    return int(config.total_steps)
  return int(math.ceil(config.num_epochs * epoch_steps))


def _raise_if_nonfinite(state, step: int):
  bad = int(jax.device_get(state['nonfinite_step']))
  if bad >= 0:
    raise FloatingPointError(
        f'Non-finite (NaN/Inf) training loss at step {bad} (detected by step {step}); stopping. '
        'Lower the learning rate (config.lr) or enable clipping (config.grad_clip).')


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the last eval.

  Writes WORKDIR/metrics.jsonl (train records every log_every_steps: loss, train_top1, lr,
  grad_norm, images_per_s, step_time_s; eval records: eval_top1, eval_top5, eval_loss and
  ema_eval_* when EMA is on), TensorBoard events and WORKDIR/checkpoints/.
  """
  from shufflemamba_jax import input_pipeline  # Lazy: TensorFlow lives there.

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  # ---- Input -----------------------------------------------------------------------------
  info = input_pipeline.get_dataset_info(config.dataset, config.data_dir)
  num_train, _ = _dataset_sizes(info, config)
  epoch_steps = steps_per_epoch(num_train, config.batch_size)
  total_steps = total_train_steps(config, epoch_steps)
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  sharding.check_batch_divisible(config.batch_size, mesh, 'config.batch_size')
  sharding.check_batch_divisible(config.eval_batch_size, mesh, 'config.eval_batch_size')

  # ---- Model and optimizer ---------------------------------------------------------------
  tx, schedule = optim.create_optimizer_from_config(config, epoch_steps, total_steps)
  num_classes = int(info.num_classes)

  def initial_state():
    model = create_model(config, num_classes)
    _, params, _ = split_model(model)
    return init_train_state(params, tx, seed=config.seed, ema_decay=config.ema_decay)

  abstract_model = nnx.eval_shape(lambda: create_model(config, num_classes))
  graphdef, _, rest = split_model(abstract_model)
  if jax.tree.leaves(rest):
    raise NotImplementedError('The model has non-parameter state; the trainer carries params only.')
  abstract_state = jax.eval_shape(initial_state)
  # Created, restored and updated already sharded: FSDP over the mesh, never whole on one device.
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  abstract_state = jax.tree.map(
      lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
      abstract_state, state_shardings)

  # ---- Checkpoint: resume or start -------------------------------------------------------
  checkpointer = checkpoint_lib.Checkpointer(
      checkpoint_lib.checkpoint_directory(workdir), keep=config.keep_checkpoints,
      keep_best=config.keep_best_checkpoints, best_metric=config.best_metric,
      save_every_steps=config.checkpoint_every_steps, async_save=config.async_checkpointing)
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(abstract_state)
    logging.info('Resumed from %s at step %d.', checkpointer.directory, meta['step'])
    saved_processes = meta.get('process_count', jax.process_count())
    if saved_processes != jax.process_count() and not config.data_shards:
      logging.warning(
          'The checkpoint was written by %d processes, this run has %d: with config.data_shards '
          '= 0 (one shard per process) the rest of this epoch sees other examples. Set '
          'config.data_shards to a fixed multiple of both to keep the data order.',
          saved_processes, jax.process_count())
  else:
    state = jax.jit(initial_state, out_shardings=state_shardings)()
    if config.init_from:
      state['params'] = jax.device_put(
          warm_start.init_params_from(
              config.init_from, state['params'], token_layout=abstract_model.config.token_layout,
              grid=abstract_model.config.grid),
          state_shardings['params'])
      if state['ema'] is not None:
        state['ema'] = jax.tree.map(jnp.copy, state['params'])
  start_step = int(jax.device_get(state['step']))

  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state['params']))
  logging.info('Model %s: %d parameters; %d steps (%d per epoch), global batch %d.',
               config.model.variant, num_params, total_steps, epoch_steps, config.batch_size)

  train_step = make_train_step(
      graphdef, rest, tx, schedule, num_classes=num_classes,
      grad_accum_steps=config.grad_accum_steps, ema_decay=config.ema_decay,
      mixup_alpha=config.aug.mixup_alpha, cutmix_alpha=config.aug.cutmix_alpha,
      mixup_prob=config.aug.mixup_prob, mixup_switch_prob=config.aug.mixup_switch_prob,
      label_smoothing=config.aug.label_smoothing,
      state_shardings=state_shardings, batch_sharding=sharding.batch_sharding(mesh))
  eval_step = make_eval_step(graphdef, rest)

  train_ds = input_pipeline.create_train_dataset(
      config, global_batch_size=config.batch_size, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_ds = input_pipeline.create_eval_dataset(
      config, split=config.eval_split, global_batch_size=config.eval_batch_size, image_size=None,
      process_index=jax.process_index(), process_count=jax.process_count())

  writer = metrics_lib.MetricWriter(workdir)
  config_json = _config_json(config)

  def to_device(batch):
    return sharding.global_batch({name: batch[name] for name in ('image', 'label', 'mask')}, mesh)

  def evaluate_now(step: int) -> dict:
    record = {}
    for prefix, params in (('eval', state['params']), ('ema_eval', state['ema'])):
      if params is None:
        continue
      result = run_evaluation(eval_step, params, eval_ds, to_device)
      record.update({f'{prefix}_top1': result['top1'], f'{prefix}_top5': result['top5'],
                     f'{prefix}_loss': result['loss']})
    record = writer.write(step, record)
    logging.info('step %d: %s', step, record)
    return record

  def save(step: int, metrics: dict | None = None):
    _raise_if_nonfinite(state, step)
    # A copy: the next train step donates `state`'s buffers while the async save may still be
    # reading them (on CPU, host views of device arrays are not copies).
    checkpointer.save(step, jax.tree.map(jnp.copy, state),
                      meta={'step': step, 'data_position': step, 'seed': config.seed,
                            'process_count': jax.process_count()},
                      config=config_json, metrics=metrics, force=True)

  # ---- Loop ------------------------------------------------------------------------------
  train_iter = _as_numpy(train_ds)
  progress = None
  if sys.stdout.isatty() and jax.process_index() == 0:
    try:
      import tqdm  # Only for interactive runs; logs stay clean otherwise.
      progress = tqdm.tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)
    except ImportError:
      logging.info('tqdm is not installed: no progress bar.')
  last_eval: dict = {}
  pending_metrics = []
  window_start, window_steps = time.perf_counter(), 0
  watcher = preemption.PreemptionWatcher()
  try:
    for step in range(start_step, total_steps):
      batch = next(train_iter)
      batch = sharding.global_batch({'image': batch['image'], 'label': batch['label']}, mesh)
      with jax.set_mesh(mesh):  # Activation sharding constraints refer to this mesh.
        state, step_metrics = train_step(state, batch)
      pending_metrics.append(step_metrics)
      window_steps += 1
      done = step + 1
      is_last = done == total_steps
      if progress is not None:
        progress.update(1)

      if done % config.log_every_steps == 0 or is_last:
        fetched = jax.device_get(pending_metrics)
        _raise_if_nonfinite(state, done)
        elapsed = time.perf_counter() - window_start
        record = {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}
        record['lr'] = float(fetched[-1]['lr'])
        record['step_time_s'] = elapsed / window_steps
        record['images_per_s'] = config.batch_size * window_steps / elapsed
        record['epoch'] = done / epoch_steps
        record = writer.write(done, record)
        if progress is not None:
          progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        else:
          logging.info('step %d/%d: %s', done, total_steps, record)
        pending_metrics = []
        window_start, window_steps = time.perf_counter(), 0

      evaluated = done % config.eval_every_steps == 0 or is_last
      if evaluated:
        last_eval = evaluate_now(done)
      # The save policy (fixed interval, or the step all processes agreed on after a
      # preemption notice) is asked on every step by every process; the last step, and every
      # evaluation when the best checkpoints are kept, are saved regardless.
      saved = (checkpointer.should_save(done) or is_last
               or (evaluated and config.keep_best_checkpoints > 0))
      if saved:
        save(done, metrics=last_eval if evaluated else None)
      if evaluated or saved:
        window_start = time.perf_counter()  # Keep evaluation and saving out of the speed.
      if not is_last and watcher.should_stop(done):
        if not saved:
          save(done)
        checkpointer.wait()  # The process may be killed soon after: the save must be complete.
        logging.warning('Stopped by %s after step %d; checkpoint saved in %s. Run the same command '
                        'to resume.', watcher.signal_name, done, checkpointer.directory)
        break
    if start_step >= total_steps:
      logging.info('Already trained %d of %d steps; nothing to do.', start_step, total_steps)
  finally:
    watcher.close()
    if progress is not None:
      progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return last_eval


# ----------------------------------------------------------------------------------------------
# Evaluation of a saved checkpoint
# ----------------------------------------------------------------------------------------------
def evaluate(config, path: str, split: str | None = None, image_size: int | None = None) -> dict:
  """Evaluates the checkpoint at `path` (a workdir, its checkpoints/ or a step folder).

  The model is built from `config` (its resolution decides the stored position-embedding
  grid; `image_size` = None evaluates at config.image_size, another value resizes the
  position embeddings on the fly). Returns and logs {step, split, image_size, eval_top1,
  eval_top5, eval_loss, and ema_eval_* when the checkpoint has an EMA}; when `path` is a
  workdir the record is appended to its metrics.jsonl.
  """
  from shufflemamba_jax import input_pipeline  # Lazy: TensorFlow lives there.

  split = split or config.eval_split
  image_size = image_size or config.image_size
  converted = convert.is_params_checkpoint(path)  # official weights from shufflemamba_jax.convert
  if converted:
    directory, step = os.path.abspath(path), 0
  else:
    directory, step = checkpoint_lib.resolve(path)
    checkpointer = checkpoint_lib.Checkpointer(directory, async_save=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {directory}.')

  info = input_pipeline.get_dataset_info(config.dataset, config.data_dir)
  num_classes = int(info.num_classes)
  abstract_model = nnx.eval_shape(lambda: create_model(config, num_classes))
  graphdef, abstract_params, rest = split_model(abstract_model)
  # Only the parameter trees are read (whatever optimizer the run used, its state stays on disk).
  if converted:
    state = {'params': convert.load_params(path)[0]}
  else:
    state = checkpointer.restore_parts(('params', 'ema'), step)
    checkpointer.close()
  params = _match_params(state['params'], abstract_params, 'params')
  ema = _match_params(state['ema'], abstract_params, 'ema') if state.get('ema') else None

  eval_ds = input_pipeline.create_eval_dataset(
      config, split=split, global_batch_size=config.eval_batch_size, image_size=image_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_step = make_eval_step(graphdef, rest)
  record = {'split': split, 'image_size': int(image_size)}
  for prefix, tree in (('eval', params), ('ema_eval', ema)):
    if tree is None:
      continue
    result = run_evaluation(eval_step, tree, eval_ds)
    record.update({f'{prefix}_top1': result['top1'], f'{prefix}_top5': result['top5'],
                   f'{prefix}_loss': result['loss']})
  record['num_examples'] = int(result['count'])
  workdir = os.path.dirname(directory)
  if os.path.basename(directory) == checkpoint_lib.CHECKPOINT_DIR and os.path.isdir(workdir):
    record = metrics_lib.MetricWriter(workdir, tensorboard=False).write(step, record)
  else:
    record = {'step': step, **record}
  logging.info('evaluate: %s', record)
  return record


def _match_params(saved, abstract_params, name: str):
  """Casts restored arrays to the model's parameter tree, with a clear error on mismatch."""
  saved_flat = dict(jax.tree_util.tree_flatten_with_path(saved)[0])

  def take(path, target):
    if path not in saved_flat:
      raise ValueError(f'Checkpoint {name} has no parameter {jax.tree_util.keystr(path)}; '
                       'does the config match the checkpoint (model.variant and overrides)?')
    value = saved_flat[path]
    if tuple(value.shape) != tuple(target.shape):
      raise ValueError(f'Checkpoint {name}{jax.tree_util.keystr(path)} has shape {value.shape}, '
                       f'the model built from the config wants {target.shape}.')
    return jnp.asarray(value, target.dtype)

  return jax.tree_util.tree_map_with_path(take, abstract_params)

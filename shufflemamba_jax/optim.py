"""Optimizer of the training recipe (SPEC section 4): masked AdamW, warmup + cosine, clipping, EMA.

The learning rate is a function of the optimizer step: linear warmup from `warmup_lr` to the peak,
then cosine decay to `min_lr` at the last step. The peak is `lr * global_batch / 512` (the DeiT
scaling rule) when `lr_scale_batch` is on. Gradient accumulation is not an optax wrapper here: the
train step loops over micro-batches itself, so one call of the step is one optimizer update.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

# Parameters that never decay, whatever their rank (SPEC section 4).
NO_DECAY_NAMES = ('pos_embed', 'cls_token', 'pos_embed_cls')
# Collections whose leading axis stacks the blocks (one scan over depth), not a parameter axis.
STACKED_PREFIXES = ('layers',)


def peak_learning_rate(lr: float, batch_size: int, scale_with_batch: bool) -> float:
  """The peak learning rate: `lr * batch_size / 512` when scaling with the batch, else `lr`."""
  return lr * batch_size / 512.0 if scale_with_batch else lr


def warmup_cosine_schedule(*, peak_lr: float, total_steps: int, warmup_steps: int,
                           warmup_lr: float, min_lr: float) -> Callable[[Any], jax.Array]:
  """Learning rate per optimizer step (0-based), float32.

  Steps [0, warmup_steps): linear from `warmup_lr` (at step 0) towards `peak_lr` (reached at
  `warmup_steps`). Steps [warmup_steps, total_steps]: half cosine from `peak_lr` to `min_lr`
  (reached at `total_steps`, and held after it).
  """
  if total_steps < 1:
    raise ValueError(f'total_steps must be >= 1, got {total_steps}.')
  warmup_steps = min(max(int(warmup_steps), 0), total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_lr + (peak_lr - warmup_lr) * step / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine).astype(jnp.float32)

  return schedule


def _path_names(path) -> tuple[str, ...]:
  names = []
  for entry in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(entry, attribute):
        names.append(str(getattr(entry, attribute)))
        break
    else:
      names.append(str(entry))
  return tuple(names)


def decays(path: tuple[str, ...], ndim: int) -> bool:
  """Whether the parameter at `path` (names from the root) with `ndim` dimensions decays.

  Rank >= 2 per layer decays (Linear and conv kernels, A_log); rank <= 1 (biases, D, norm
  scales) and the position / class / register embeddings do not. Under `layers` the leading
  axis stacks the blocks, so it does not count.
  """
  if any(name in NO_DECAY_NAMES for name in path):
    return False
  if path and path[-1] == 'bias':
    return False
  if path and path[0] in STACKED_PREFIXES:
    ndim -= 1
  return ndim >= 2


def weight_decay_mask(params):
  """A pytree of bools like `params` (a pure dict or nnx.State of arrays): True = decays."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: decays(_path_names(path), jnp.ndim(leaf)), params)


def create_optimizer(*, schedule, weight_decay: float, b1: float, b2: float, eps: float,
                     grad_clip: float | None) -> optax.GradientTransformation:
  """AdamW (decoupled decay, masked by `weight_decay_mask`) after optional global-norm clipping."""
  adamw = optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps,
                      weight_decay=weight_decay, mask=weight_decay_mask)
  if grad_clip is None or grad_clip <= 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


def create_optimizer_from_config(config, steps_per_epoch: int, total_steps: int):
  """Builds (optimizer, schedule) from the optimizer fields of a training config."""
  peak = peak_learning_rate(config.lr, config.batch_size, config.lr_scale_batch)
  schedule = warmup_cosine_schedule(
      peak_lr=peak, total_steps=total_steps,
      warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)),
      warmup_lr=config.warmup_lr, min_lr=config.min_lr)
  tx = create_optimizer(schedule=schedule, weight_decay=config.weight_decay, b1=config.b1,
                        b2=config.b2, eps=config.eps, grad_clip=config.grad_clip)
  return tx, schedule


def ema_update(ema, params, decay: float):
  """One EMA step: `ema * decay + params * (1 - decay)`, leaf by leaf, in the EMA's dtype."""
  return jax.tree.map(
      lambda e, p: (e * decay + p.astype(e.dtype) * (1.0 - decay)).astype(e.dtype), ema, params)

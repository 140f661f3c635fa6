"""The train state and what every task's jitted steps share: the optimizer update, the jit of a
train step with explicit shardings, and the evaluation loop over a split.

The train state is a plain dict pytree (checkpointed as is):
  step: int32 scalar, optimizer steps done;
  params: nested dict of float arrays (the nnx.Param values);  opt_state: optax state;
  ema: like params, or None when ema_decay is 0;
  nonfinite_step: int32, the first step whose loss was NaN/Inf, -1 if none (checked at log
    points, so a bad step is named exactly without a host sync on every step);
  model_state (models that have other state, such as a segmenter's BatchNorm statistics):
    nested dict of that state, updated by every training step.
The training key of step s is fold_in(key(seed), s): a function of the config, not state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from shufflemamba_jax.parallel import sharding


def split_model(model: nnx.Module):
  """(graphdef, params as a nested dict of arrays, the remaining state)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), rest


def init_train_state(params, tx: optax.GradientTransformation, *, ema_decay: float, model_state=None) -> dict:
  """The train state (see the module docstring) at step 0 for `params` and the model's other
  state `model_state` (a nested dict; left out when it holds nothing)."""
  state = {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "opt_state": tx.init(params),
    "ema": jax.tree.map(jnp.copy, params) if ema_decay > 0 else None,
    "nonfinite_step": jnp.full((), -1, jnp.int32),
  }
  if jax.tree.leaves(model_state):
    state["model_state"] = model_state
  return state


def apply_gradients(state, grads, loss, tx: optax.GradientTransformation, ema_decay: float):
  """One optimizer update of `state`: (params, opt_state, EMA, the first non-finite step), the EMA
  left None when it is off."""
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_params = optax.apply_updates(state["params"], updates)
  ema = state["ema"]
  if ema is not None:
    ema = optax.incremental_update(new_params, ema, step_size=1.0 - ema_decay)
  bad = (state["nonfinite_step"] < 0) & ~jnp.isfinite(loss)
  return new_params, opt_state, ema, jnp.where(bad, state["step"], state["nonfinite_step"])


def jit_train_step(train_step, donate: bool, state_shardings, batch_sharding):
  """jax.jit of `train_step(state, batch) -> (state, metrics)`, the state donated when `donate`.

  With explicit shardings the state keeps its FSDP layout step after step and the metrics are
  replicated.
  """
  donate_argnums = (0,) if donate else ()
  if state_shardings is None:
    return jax.jit(train_step, donate_argnums=donate_argnums)
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, sharding.replicated(batch_sharding.mesh)),
    donate_argnums=donate_argnums,
  )


def make_eval_step(sums: Callable) -> Callable:
  """jax.jit of a task's `sums(params, model_state, batch)`, plus num_examples, the real (mask 1)
  examples of the global batch."""

  def eval_step(params, model_state, batch):
    return {**sums(params, model_state, batch), "num_examples": jnp.sum(batch["mask"])}

  return jax.jit(eval_step)


def run_evaluation(eval_step: Callable, params, model_state, batches: Iterable[dict], mesh) -> dict:
  """The totals of `eval_step`'s sums over finite eval `batches`, as float64 or int64 numpy arrays.

  Each process passes its own local batches; they are assembled into global batches sharded over
  all devices of `mesh`, so the sums (and the totals) cover every process's examples.
  """
  pending = []
  fields = ("image", "label", "mask")
  for batch in sharding.prefetch_to_mesh(({name: b[name] for name in fields} for b in batches), mesh):
    with jax.set_mesh(mesh):  # Activation sharding constraints refer to this mesh.
      pending.append(eval_step(params, model_state, batch))
  wide = lambda x: np.asarray(x, np.int64 if np.issubdtype(np.asarray(x).dtype, np.integer) else np.float64)
  return jax.tree.map(lambda *sums: sum(map(wide, sums)), *jax.device_get(pending))

"""The one train-step factory. Each pillar supplies only its loss function.

loss_fn(params, model_state, batch, key) -> (loss, (metrics, new_model_state))
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from jaxgen.train.state import TrainState

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, tuple[dict, Any]]]


def make_train_step(loss_fn: LossFn, *, ema_decay: float, schedule: optax.Schedule | None = None,
                    state_sharding=None, batch_sharding: NamedSharding | None = None):
  """A jitted `train_step(state, batch) -> (state, metrics)` with the state donated.

  A step whose loss or gradients are not finite leaves the state unchanged and reports
  `finite=False`; the loop stops on it. So a NaN never reaches parameters or checkpoints.
  """

  def train_step(state: TrainState, batch: dict):
    key = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, key)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if ema_decay > 0:
      # e + (1 - d)(p - e): a parameter that does not move (a frozen tower) keeps its EMA
      # bit-for-bit, which d e + (1 - d) p would round away.
      ema = jax.tree.map(lambda e, p: e + (1.0 - ema_decay) * (p - e), state.ema_params, params)
    else:
      ema = params
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                        model_state=model_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite)
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return new, metrics

  shardings = {}
  if state_sharding is not None:
    shardings = dict(in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, None))
  return jax.jit(train_step, donate_argnums=0, **shardings)

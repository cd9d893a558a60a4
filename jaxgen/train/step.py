"""The one train-step factory. Each pillar supplies only its loss function.

loss_fn(params, model_state, batch, key) -> (loss, (metrics, new_model_state))
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from jaxgen.train.optim import frozen_mask
from jaxgen.train.state import TrainState

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, tuple[dict, Any]]]


def _micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...] with micro-batch i = examples i, i + k, ...: a batch split over
  the devices stays split over them in every micro-batch."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} does not split into {k} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulated_grads(loss_fn: LossFn, params, model_state, batch, key, k: int,
                      unroll: bool | None = None):
  """Mean loss, metrics and gradients over k micro-batches, one after the other so that only
  one micro-batch's activations live at a time (gradient accumulation). k = 1 is a plain
  value_and_grad. Equals the whole-batch gradient for losses that are means over examples.

  unroll=None: a `lax.scan` over the micro-batches, except on the CPU backend, where they are
  unrolled: XLA:CPU runs the convolutions inside a while loop without its YNNPACK kernels, and
  the scanned small DDPM step with 4 micro-batches ran 10x slower than without accumulation
  (2.28 s against 0.22 s; unrolled 0.15 s). The price on CPU: XLA schedules the unrolled
  micro-batches with about the memory of the whole batch (117 MB of temporaries against 32 MB
  scanned and 122 MB without accumulation), so on CPU accumulation buys speed, not memory.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    return grad_fn(params, model_state, batch, key)
  if unroll is None:
    unroll = jax.default_backend() == "cpu"
  micro = _micro_batches(batch, k)
  add = lambda a, b: jax.tree.map(jnp.add, a, b)

  def one(carry, mb, i):
    model_state, g_sum, l_sum, m_sum = carry
    (loss, (metrics, model_state)), g = grad_fn(params, model_state, mb, jax.random.fold_in(key, i))
    return model_state, add(g_sum, g), l_sum + loss, add(m_sum, metrics)

  first = jax.tree.map(lambda x: x[0], micro)
  _, (metrics_shape, _) = jax.eval_shape(loss_fn, params, model_state, first, key)
  zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
  carry = (model_state, jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
           zeros(metrics_shape))
  if unroll:
    for i in range(k):
      carry = one(carry, jax.tree.map(lambda x: x[i], micro), i)
  else:
    carry, _ = jax.lax.scan(lambda c, xs: (one(c, *xs), None), carry, (micro, jnp.arange(k)))
  model_state, g_sum, l_sum, m_sum = carry
  mean = lambda t: jax.tree.map(lambda x: x / k, t)
  return (l_sum / k, (mean(m_sum), model_state)), mean(g_sum)


def make_train_step(loss_fn: LossFn, *, ema_decay: float, schedule: optax.Schedule | None = None,
                    state_sharding=None, batch_sharding: NamedSharding | None = None,
                    accum_steps: int = 1, frozen: Callable[[str], bool] | None = None):
  """A jitted `train_step(state, batch) -> (state, metrics)` with the state donated.

  A step whose loss or gradients are not finite leaves the state unchanged and reports
  `finite=False`; the loop stops on it. So a NaN never reaches parameters or checkpoints.
  `accum_steps` > 1 accumulates gradients over that many micro-batches of the batch.

  `frozen(path) -> bool` (the task's, as given to make_optimizer) marks parameters that never
  change: the loss sees them through stop_gradient, so their gradients are zeros without a
  backward pass (a frozen text tower's), and their EMA is carried over as it is. `grad_norm`
  is the norm of the trained parameters' gradients, which is what clipping acts on; the step
  hands it to the optimizer's clip (jaxgen.train.optim.clip_by_global_norm), which then does not
  compute it again. So give it the `frozen` given to make_optimizer: without it, the frozen
  parameters' gradients would be computed and counted in the clip's norm.
  """

  def train_step(state: TrainState, batch: dict):
    key = jax.random.fold_in(state.rng, state.step)
    fixed = frozen_mask(state.params, frozen)

    def loss_of_trained(params, *args):
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, fixed)
      return loss_fn(params, *args)

    (loss, (metrics, model_state)), grads = accumulated_grads(
        loss_of_trained if frozen else loss_fn, state.params, state.model_state, batch, key,
        accum_steps)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state):
      tx = optax.with_extra_args_support(state.tx)
      updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                     global_norm=grad_norm)
      params = optax.apply_updates(state.params, updates)
      if ema_decay > 0:
        # e + (1 - d)(p - e): a parameter that moves by less than its rounding keeps its EMA
        # bit-for-bit, which d e + (1 - d) p would round away. A frozen one is carried over.
        ema = jax.tree.map(lambda e, p, f: e if f else e + (1.0 - ema_decay) * (p - e),
                           state.ema_params, params, fixed)
      else:
        ema = params
      return state.replace(step=state.step + 1, params=params, ema_params=ema,
                           opt_state=opt_state, model_state=model_state)

    # A branch, not a select of new and old over the whole state: the select keeps both alive
    # and writes a third copy (SD-like U-Net, 150M parameters, CPU: XLA's temporaries 1,733 ->
    # 1,582 MB; the update on its own 0.81 -> 0.24 s with optim.clip_by_global_norm; the whole
    # step's time the same within noise).
    new = jax.lax.cond(finite, update, lambda state: state, state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite)
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return new, metrics

  shardings = {}
  if state_sharding is not None:
    shardings = dict(in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, None))
  return jax.jit(train_step, donate_argnums=0, **shardings)

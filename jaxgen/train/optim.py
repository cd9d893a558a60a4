"""optax optimizer and learning-rate schedule from the config's `optim` section."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def make_schedule(o, num_steps: int) -> optax.Schedule:
  warmup = min(o.warmup_steps, max(num_steps - 1, 0))
  if o.schedule == "constant":
    after = optax.constant_schedule(o.lr)
  else:
    after = optax.cosine_decay_schedule(o.lr, max(num_steps - warmup, 1), alpha=o.end_lr_factor)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), after], [warmup])


def _decay_mask(params):
  # No weight decay on biases and normalisation scales (the usual AdamW/LARS practice).
  return jax.tree.map(lambda p: p.ndim > 1, params)


def frozen_mask(params, frozen=None):
  """A tree of Python bools like `params`: True where `frozen(keystr(path))` (None: all False)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: frozen is not None and bool(frozen(jax.tree_util.keystr(path))), params)


def make_optimizer(o, num_steps: int, frozen=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`frozen(path) -> bool` marks parameters (by their key path) that must never change: they
  get zero updates, and no weight decay either (LiT's locked tower). Give make_train_step the
  same `frozen`: it hands the clip the norm of every gradient it computes."""
  schedule = make_schedule(o, num_steps)
  tx = _base_optimizer(o, schedule)
  if frozen is not None:
    labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "train",
                                         frozen_mask(params, frozen))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def _base_optimizer(o, schedule) -> optax.GradientTransformation:
  if o.name == "adamw":
    base = optax.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay, mask=_decay_mask)
  elif o.name == "adam":
    base = optax.adam(schedule, o.b1, o.b2, o.eps)
  elif o.name == "sgd":
    base = optax.chain(optax.add_decayed_weights(o.weight_decay, _decay_mask),
                       optax.sgd(schedule, momentum=o.momentum))
  elif o.name == "lars":
    base = optax.lars(schedule, weight_decay=o.weight_decay, weight_decay_mask=_decay_mask,
                      trust_ratio_mask=_decay_mask, momentum=o.momentum)
  else:
    raise ValueError(f"unknown optimizer {o.name}")
  if o.grad_clip > 0:
    return optax.chain(clip_by_global_norm(o.grad_clip), base)
  return base


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales the updates by max_norm / ||updates|| when that global norm reaches max_norm, as
  optax.clip_by_global_norm does, with one multiply by a scalar per element where optax divides
  each element by the norm and selects (as torch.nn.utils.clip_grad_norm_ scales). The results
  agree to rounding; on the CPU the division and select made optax's clip cost more than the
  Adam update itself (0.25 s of the SD-like U-Net's 150M-parameter update, on its own).

  `update(..., global_norm=n)` takes the norm from the caller (the train step computes it for
  its finite check and metrics; a second reduction over every gradient cost 22 ms per step on
  the SD-like U-Net's 150M values). It must be the norm of exactly the updates this transform
  sees: where it sits inside optax.multi_transform, the other groups' updates must be zero.
  """

  def update(updates, state, params=None, global_norm=None):
    del params
    norm = optax.tree.norm(updates) if global_norm is None else global_norm
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)

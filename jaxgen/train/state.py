"""The one TrainState every pillar trains with."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: Any
  ema_params: Any          # its own buffers: donation forbids sharing them with params
  opt_state: optax.OptState
  model_state: Any         # non-trainable collections (e.g. batch_stats); {} when none
  rng: jax.Array           # raw uint32 key; each step folds in the step number
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, params, tx, rng, model_state=None) -> TrainState:
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
               model_state={} if model_state is None else model_state, rng=rng, tx=tx)

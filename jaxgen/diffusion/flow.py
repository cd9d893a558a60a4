"""Flow matching with the rectified-flow path (Liu et al. 2022; Lipman et al. 2022; Esser et al.
2024, Stable Diffusion 3): x_t = (1 - t) x_0 + t eps, t in [0, 1], and the model predicts the
velocity dx_t/dt = eps - x_0. Sampling integrates the ODE from t = 1 to 0 (samplers.flow_grid
with the euler or heun step).

Training times: uniform; logit-normal (SD3's choice, t = sigmoid(N(mean, std))); or SD3's
'mode' density with scale s, t = 1 - u - s (cos^2(pi u / 2) - 1 + u); each optionally shifted by
samplers.flow_shift. Loss math is float32.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxgen.diffusion.process import expand
from jaxgen.diffusion.samplers import flow_shift
from jaxgen.errors import ConfigError

TIME_SAMPLINGS = ("uniform", "logit_normal", "mode")


def interpolate(x0, eps, t) -> jax.Array:
  """The point of the straight path at time t [B]: (1 - t) x0 + t eps."""
  t = expand(jnp.asarray(t, jnp.float32), x0)
  return (1.0 - t) * x0 + t * eps


def velocity(x0, eps) -> jax.Array:
  """The path's velocity dx_t/dt, the model's target: eps - x0."""
  return eps - x0


def sample_times(key, n: int, sampling: str = "logit_normal", *, mean: float = 0.0,
                 std: float = 1.0, mode_scale: float = 1.29, shift: float = 1.0) -> jax.Array:
  """n training times in (0, 1), float32 [n]."""
  if sampling == "uniform":
    t = jax.random.uniform(key, (n,), jnp.float32)
  elif sampling == "logit_normal":
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,), jnp.float32))
  elif sampling == "mode":
    u = jax.random.uniform(key, (n,), jnp.float32)
    t = 1.0 - u - mode_scale * (jnp.cos(jnp.pi * u / 2) ** 2 - 1.0 + u)
  else:
    raise ConfigError(f"unknown flow time sampling {sampling!r}; valid: "
                      f"{', '.join(TIME_SAMPLINGS)}")
  return flow_shift(t, shift) if shift != 1.0 else t


def flow_loss(model_fn: Callable, x0, key, *, sampling: str = "logit_normal",
              mean: float = 0.0, std: float = 1.0, mode_scale: float = 1.29,
              shift: float = 1.0) -> jax.Array:
  """Per-example mean squared error of the velocity, [B] float32. model_fn(x_t, t[B]) -> v,
  with t the flow time in [0, 1]."""
  k_t, k_eps = jax.random.split(key)
  x0 = jnp.asarray(x0, jnp.float32)
  t = sample_times(k_t, x0.shape[0], sampling, mean=mean, std=std, mode_scale=mode_scale,
                   shift=shift)
  eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
  v = jnp.asarray(model_fn(interpolate(x0, eps, t), t), jnp.float32)
  return jnp.mean(jnp.square(v - velocity(x0, eps)), axis=tuple(range(1, x0.ndim)))

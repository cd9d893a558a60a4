"""The forward process, conversions between eps / x0 / v model outputs, and the training loss."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxgen.diffusion.schedules import Schedule
from jaxgen.errors import ConfigError

PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("uniform", "min_snr")


def check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ConfigError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def expand(a, x) -> jax.Array:
  """[B] -> [B, 1, ..., 1] to broadcast a per-example coefficient against x [B, ...]."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (jnp.ndim(x) - a.ndim))


def _coefs(schedule: Schedule, t, x):
  return _coefs_at(schedule.abar_at(t), x)


def _coefs_at(abar, x):
  abar = expand(jnp.asarray(abar, jnp.float32), x)
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def q_sample(schedule: Schedule, x0, t, eps) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, in float32; t: int32 [B]."""
  x0, eps = jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32)
  sa, so = _coefs(schedule, t, x0)
  return sa * x0 + so * eps


def snr(schedule: Schedule, t) -> jax.Array:
  """Signal-to-noise ratio abar / (1 - abar) at t -> [B]."""
  abar = schedule.abar[t]
  return abar / (1.0 - abar)


def to_x0_eps(pred, x_t, t, schedule: Schedule, prediction: str):
  """The model output of type `prediction` at (x_t, t) -> (x0, eps), both float32."""
  return to_x0_eps_at(pred, x_t, schedule.abar_at(t), prediction)


def to_x0_eps_at(pred, x_t, abar, prediction: str):
  """to_x0_eps at noise level abar [B] (alpha-bar, float) instead of an integer timestep."""
  check_prediction(prediction)
  pred, x_t = jnp.asarray(pred, jnp.float32), jnp.asarray(x_t, jnp.float32)
  sa, so = _coefs_at(abar, x_t)
  if prediction == "eps":
    return (x_t - so * pred) / sa, pred
  if prediction == "x0":
    return pred, (x_t - sa * pred) / so
  # v = sa eps - so x0 and x_t = sa x0 + so eps form a rotation, inverted by its transpose.
  return sa * x_t - so * pred, so * x_t + sa * pred


def eps_from_x0(x0, x_t, t, schedule: Schedule) -> jax.Array:
  """The noise that takes x0 to x_t at step t (t >= 0)."""
  return eps_from_x0_at(x0, x_t, schedule.abar_at(t))


def eps_from_x0_at(x0, x_t, abar) -> jax.Array:
  """The noise that takes x0 to x_t at noise level abar [B] < 1."""
  sa, so = _coefs_at(abar, x_t)
  return (x_t - sa * x0) / so


def target(x0, eps, t, schedule: Schedule, prediction: str) -> jax.Array:
  """What a model of type `prediction` regresses onto: eps, x0, or v = sa eps - so x0."""
  check_prediction(prediction)
  x0, eps = jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32)
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  sa, so = _coefs(schedule, t, x0)
  return sa * eps - so * x0


def loss_weight(schedule: Schedule, t, prediction: str, weighting: str = "uniform",
                gamma: float = 5.0) -> jax.Array:
  """Per-example weight [B] of the MSE on `prediction`.

  'min_snr' (Hang et al. 2023) makes every prediction type's loss equal min(snr, gamma) times the
  x0-MSE: the x0 error is the eps error / sqrt(snr) and the v error / sqrt(snr + 1).
  """
  check_prediction(prediction)
  if weighting not in WEIGHTINGS:
    raise ConfigError(f"unknown loss weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
  if weighting == "uniform":
    return jnp.ones(jnp.shape(t), jnp.float32)
  s = snr(schedule, t)
  clipped = jnp.minimum(s, jnp.float32(gamma))
  if prediction == "eps":
    return clipped / s
  if prediction == "x0":
    return clipped
  return clipped / (s + 1.0)


def diffusion_loss(model_fn: Callable, schedule: Schedule, x0, key, *, prediction: str = "eps",
                   weighting: str = "uniform", gamma: float = 5.0) -> jax.Array:
  """Per-example loss [B]: t ~ U{0..T-1}, eps ~ N(0, I), weighted MSE of model_fn(x_t, t)."""
  check_prediction(prediction)
  x0 = jnp.asarray(x0, jnp.float32)
  key_t, key_eps = jax.random.split(key)
  t = jax.random.randint(key_t, x0.shape[:1], 0, schedule.num_timesteps, dtype=jnp.int32)
  eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
  x_t = q_sample(schedule, x0, t, eps)
  # The network may run in bfloat16; the regression and its weights stay in float32.
  out = model_fn(x_t, t).astype(jnp.float32)
  err = jnp.square(out - target(x0, eps, t, schedule, prediction))
  mse = err.reshape(err.shape[0], -1).mean(-1)
  return mse * loss_weight(schedule, t, prediction, weighting, gamma)

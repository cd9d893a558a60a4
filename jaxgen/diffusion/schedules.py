"""Noise schedules of the discrete variance-preserving diffusion: betas, alphas and abar."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.errors import ConfigError

SCHEDULES = ("linear", "cosine", "scaled_linear")


class Schedule(struct.PyTreeNode):
  """float32 arrays [T]. Index t in [0, T-1] is the papers' step t + 1; t = -1 is the data."""
  betas: jax.Array
  alphas: jax.Array
  abar: jax.Array  # cumulative product of alphas
  # abar as static host values (float32 numbers): grids computed on the host (Euler, Karras)
  # read them even where the arrays are traced, e.g. inside jit.
  host_abar: tuple = struct.field(pytree_node=False, default=())

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  def abar_at(self, t) -> jax.Array:
    """abar[t], and 1 at t = -1 so that samplers can step to the clean data without a branch."""
    t = jnp.asarray(t, jnp.int32)
    return jnp.where(t >= 0, self.abar[jnp.maximum(t, 0)], jnp.float32(1.0))


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  # Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2;
  # the clip keeps the last betas away from 1, where f(T) = 0 would make them singular.
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  return np.minimum(1 - f[1:] / f[:-1], max_beta)


def make_schedule(name: str, num_timesteps: int = 1000, beta_start: float | None = None,
                  beta_end: float | None = None) -> Schedule:
  """'linear' (Ho et al. 2020), 'cosine' (Nichol & Dhariwal 2021) or 'scaled_linear' (Stable
  Diffusion). beta_start/beta_end override the linear schedules' end points."""
  if name not in SCHEDULES:
    raise ConfigError(f"unknown noise schedule {name!r}; valid: {', '.join(SCHEDULES)}")
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
    raise ConfigError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
  # float64 first: the cumulative product over 1000 steps loses digits in float32.
  if name == "linear":
    b0 = 1e-4 if beta_start is None else beta_start
    b1 = 0.02 if beta_end is None else beta_end
    betas = np.linspace(b0, b1, num_timesteps, dtype=np.float64)
  elif name == "scaled_linear":
    b0 = 0.00085 if beta_start is None else beta_start
    b1 = 0.012 if beta_end is None else beta_end
    betas = np.linspace(np.sqrt(b0), np.sqrt(b1), num_timesteps, dtype=np.float64) ** 2
  else:
    if beta_start is not None or beta_end is not None:
      raise ConfigError("the cosine schedule is defined by abar, it takes no beta_start/beta_end")
    betas = _cosine_betas(num_timesteps)
  if not (np.all(betas > 0) and np.all(betas < 1)):
    raise ConfigError(f"betas must lie in (0, 1); got [{betas.min()}, {betas.max()}]")
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(betas=f32(betas), alphas=f32(alphas), abar=f32(abar),
                  host_abar=tuple(abar.astype(np.float32).tolist()))

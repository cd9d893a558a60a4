"""Exact denoisers for data x0 ~ N(m, s^2 I), written from the formulas, not from jaxgen."""
import jax.numpy as jnp
import numpy as np


def eps_star_np(x, abar, m, s):
  """E[eps | x_t] for Gaussian data: sqrt(1 - abar) (x - sqrt(abar) m) / (abar s^2 + 1 - abar)."""
  return np.sqrt(1 - abar) * (x - np.sqrt(abar) * m) / (abar * s ** 2 + 1 - abar)


def exact_denoiser(schedule, m, s, prediction="eps"):
  """The optimal model of type `prediction` (t: int [B], x: [B, ...] with m broadcast on the
  trailing axes)."""
  m = jnp.asarray(m, jnp.float32)

  def denoise(x, t):
    abar = schedule.abar[t].reshape((-1,) + (1,) * (x.ndim - 1))
    eps = jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * m) / (abar * s ** 2 + 1 - abar)
    if prediction == "eps":
      return eps
    # E[x0 | x_t] in closed form, not (x - sqrt(1 - abar) eps) / sqrt(abar), which loses digits
    x0 = m + jnp.sqrt(abar) * s ** 2 * (x - jnp.sqrt(abar) * m) / (abar * s ** 2 + 1 - abar)
    if prediction == "x0":
      return x0
    return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0  # v

  return denoise

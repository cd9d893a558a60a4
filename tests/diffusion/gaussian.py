"""Exact denoisers for data x0 ~ N(m, s^2 I), written from the formulas, not from jaxgen."""
import jax.numpy as jnp
import numpy as np


def eps_star_np(x, abar, m, s):
  """E[eps | x_t] for Gaussian data: sqrt(1 - abar) (x - sqrt(abar) m) / (abar s^2 + 1 - abar)."""
  return np.sqrt(1 - abar) * (x - np.sqrt(abar) * m) / (abar * s ** 2 + 1 - abar)


def exact_denoiser(schedule, m, s, prediction="eps"):
  """The optimal model of type `prediction` (t: [B], x: [B, ...] with m broadcast on the
  trailing axes). A fractional t (the Euler samplers' grids) is at the noise level whose sigma =
  sqrt((1 - abar) / abar) is interpolated linearly between the integer steps, as diffusers'
  schedulers place it."""
  m = jnp.asarray(m, jnp.float32)
  sigmas = jnp.sqrt((1 - schedule.abar) / schedule.abar)

  def level(t):
    if jnp.issubdtype(t.dtype, jnp.integer):
      return schedule.abar[t]
    lo = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, sigmas.shape[0] - 2)
    w = t - lo
    sigma = (1 - w) * sigmas[lo] + w * sigmas[lo + 1]
    return 1 / (1 + sigma ** 2)

  def denoise(x, t):
    abar = level(t).reshape((-1,) + (1,) * (x.ndim - 1))
    eps = jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * m) / (abar * s ** 2 + 1 - abar)
    if prediction == "eps":
      return eps
    # E[x0 | x_t] in closed form, not (x - sqrt(1 - abar) eps) / sqrt(abar), which loses digits
    x0 = m + jnp.sqrt(abar) * s ** 2 * (x - jnp.sqrt(abar) * m) / (abar * s ** 2 + 1 - abar)
    if prediction == "x0":
      return x0
    return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0  # v

  return denoise

"""Editing with a trained denoiser: inpainting, img2img (SDEdit), DDIM inversion, interpolation,
and denoising a given noisy image."""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion.process import check_prediction, expand, to_x0_eps
from jaxgen.diffusion.samplers import (
  GRID_OPTIONS,
  check_timesteps,
  flow_grid,
  make_grid,
  make_timesteps,
  sample,
)
from jaxgen.diffusion.schedules import Schedule
from jaxgen.distributions import slerp
from jaxgen.errors import ConfigError


def flow_level(abar) -> jax.Array:
  """The flow time sigma whose interpolation (1 - sigma) x + sigma noise has the signal-to-noise
  ratio of variance-preserving level abar: (1 - sigma) / sigma = sqrt(abar / (1 - abar))."""
  abar = jnp.asarray(abar, jnp.float32)
  return jnp.sqrt(1.0 - abar) / (jnp.sqrt(abar) + jnp.sqrt(1.0 - abar))


def inpaint(denoise: Callable, schedule: Schedule, key, x_known, mask, **sample_kwargs):
  """Fills the pixels where mask == 0; mask == 1 marks known pixels (broadcast to x_known).

  After every step the known pixels are replaced by x_known noised to the new level with fresh
  noise (Lugmayr et al. 2022 without resampling); the last step puts x_known back exactly.
  A soft mask blends. Other keyword arguments go to `sample`; with prediction="flow" (a flow
  grid) the known pixels are interpolated to the step's flow time instead.
  """
  x_known = jnp.asarray(x_known, jnp.float32)
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x_known.shape)
  user_constraint = sample_kwargs.pop("constraint", None)
  flow = sample_kwargs.get("prediction") == "flow"

  def constraint(x_prev, abar_prev, key):
    key_noise, key_user = jax.random.split(key)
    if user_constraint is not None:
      x_prev = user_constraint(x_prev, abar_prev, key_user)
    # At the data (abar = 1) this is 1 * x_known + 0 * noise: the known pixels come back exact.
    a = expand(abar_prev, x_known)
    noise = jax.random.normal(key_noise, x_known.shape)
    if flow:
      sigma = flow_level(a)
      known = (1.0 - sigma) * x_known + sigma * noise
    else:
      known = jnp.sqrt(a) * x_known + jnp.sqrt(1.0 - a) * noise
    return mask * known + (1.0 - mask) * x_prev

  return sample(denoise, schedule, key, x_known.shape, constraint=constraint, **sample_kwargs)


def img2img(denoise: Callable, schedule: Schedule, key, x0, strength: float, *,
            sampler: str = "ddim", num_steps: int = 50, timesteps=None, **sample_kwargs):
  """SDEdit (Meng et al. 2022): noise x0 to the level of the sampler's grid at fraction
  `strength` of its steps, then run only the remaining steps. strength is a Python float in
  (0, 1] (it sets the number of steps, so it is static); small values stay close to x0, 1
  ignores it. Grid options (spacing, offset, karras, final_abar, ...) and the other keyword
  arguments of `sample` pass through."""
  if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
    raise ConfigError(f"img2img strength must be a number in (0, 1], got {strength!r}")
  grid_options = {k: sample_kwargs.pop(k) for k in GRID_OPTIONS if k in sample_kwargs}
  if timesteps is not None:
    check_timesteps(timesteps, schedule.num_timesteps)
    n = timesteps.shape[0]
  else:
    n = num_steps
  # At least one step, so that strength -> 0 still denoises the lightly noised image.
  n_run = max(1, min(n, math.floor(n * strength + 1e-9)))
  grid = make_grid(schedule, sampler, num_steps=num_steps, timesteps=timesteps,
                   skip=n - n_run, **grid_options)
  # The noised image is the start itself: no init_scale (diffusers' add_noise, likewise).
  grid = grid.replace(init_scale=jnp.float32(1.0))
  x0 = jnp.asarray(x0, jnp.float32)
  key_noise, key_sample = jax.random.split(key)
  a = grid.abar_from[0]
  x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * jax.random.normal(key_noise, x0.shape)
  return sample(denoise, schedule, key_sample, x0.shape, sampler=sampler, grid=grid, x_T=x_t,
                **sample_kwargs)


def flow_img2img(velocity: Callable, key, x0, strength: float, *, sampler: str = "euler",
                 num_steps: int = 50, shift: float = 1.0, num_timesteps: int = 1000):
  """SDEdit for a flow model (the start rule of diffusers' SD3 img2img; not compared with it):
  interpolate x0 towards noise to the flow time of the grid's step at fraction `strength` (a
  Python float in (0, 1]), then run the remaining steps of flow_grid(num_steps, shift)."""
  if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
    raise ConfigError(f"img2img strength must be a number in (0, 1], got {strength!r}")
  n_run = max(1, min(num_steps, math.floor(num_steps * strength + 1e-9)))
  grid = flow_grid(num_steps, shift, num_timesteps, skip=num_steps - n_run)
  x0 = jnp.asarray(x0, jnp.float32)
  key_noise, key_sample = jax.random.split(key)
  sigma = grid.t[0]
  x_t = (1.0 - sigma) * x0 + sigma * jax.random.normal(key_noise, x0.shape)
  return sample(velocity, None, key_sample, None, sampler=sampler, prediction="flow", grid=grid,
                x_T=x_t)


def ddim_invert(denoise: Callable, schedule: Schedule, x0, num_steps: int = 50, *,
                prediction: str = "eps", timesteps=None, spacing: str = "trailing",
                return_trajectory: bool = False):
  """Deterministic DDIM run backwards (Song et al. 2021, sec. 4.3): data x0 [B, ...] -> x_T.

  `timesteps` are the descending sampling grid that will decode x_T; inversion visits it in
  increasing order. Each step from s to t reuses the model output at (x_s, t) as if it were the
  output at (x_t, t), the standard approximation (exact as the steps shrink). With
  return_trajectory, returns (x_T, xs) where xs [N + 1, B, ...] starts with x0.
  """
  check_prediction(prediction)
  if timesteps is None:
    timesteps = make_timesteps(schedule.num_timesteps, num_steps, spacing)
  check_timesteps(timesteps, schedule.num_timesteps)
  ts_up = jnp.asarray(timesteps, jnp.int32)[::-1]
  ts_from = jnp.concatenate([jnp.full((1,), -1, jnp.int32), ts_up[:-1]])
  x0 = jnp.asarray(x0, jnp.float32)
  batch = x0.shape[:1]

  def step(x_s, ts):
    s, t = ts
    s_b, t_b = jnp.full(batch, s, jnp.int32), jnp.full(batch, t, jnp.int32)
    _, eps = to_x0_eps(denoise(x_s, t_b), x_s, t_b, schedule, prediction)
    abar_s = expand(schedule.abar_at(s_b), x_s)
    abar_t = expand(schedule.abar_at(t_b), x_s)
    x0_hat = (x_s - jnp.sqrt(1.0 - abar_s) * eps) / jnp.sqrt(abar_s)
    x_t = jnp.sqrt(abar_t) * x0_hat + jnp.sqrt(1.0 - abar_t) * eps
    return x_t, x_t

  x_T, xs = jax.lax.scan(step, x0, (ts_from, ts_up))
  if return_trajectory:
    return x_T, jnp.concatenate([x0[None], xs])
  return x_T


def interpolate(denoise: Callable, schedule: Schedule, x_a, x_b, num: int, num_steps: int = 50,
                *, prediction: str = "eps", timesteps=None, spacing: str = "trailing"):
  """Inverts two examples x_a, x_b (one each, no batch axis), slerps the inverted noises at `num`
  points from a to b, and decodes each with deterministic DDIM -> [num, ...]."""
  if timesteps is None:
    timesteps = make_timesteps(schedule.num_timesteps, num_steps, spacing)
  pair = jnp.stack([jnp.asarray(x_a, jnp.float32), jnp.asarray(x_b, jnp.float32)])
  z = ddim_invert(denoise, schedule, pair, prediction=prediction, timesteps=timesteps)
  z_path = slerp(z[0], z[1], jnp.linspace(0.0, 1.0, num))  # [num, ...]
  # The key is unused: deterministic DDIM with a given x_T draws nothing.
  return sample(denoise, schedule, jax.random.key(0), None, sampler="ddim", eta=0.0,
                prediction=prediction, timesteps=timesteps, x_T=z_path)


def timestep_for_sigma(schedule: Schedule, sigma: float) -> int:
  """The timestep whose noise-to-signal ratio sqrt((1 - abar) / abar) is nearest (in log) to
  `sigma`: an image y = x0 + sigma * eps is sqrt(abar)-scaled x_t at that step."""
  if not sigma > 0:
    raise ConfigError(f"the noise level sigma must be positive, got {sigma!r}")
  abar = np.asarray(schedule.host_abar or schedule.abar, np.float64)
  ratio = np.sqrt((1 - abar) / abar)
  return int(np.argmin(np.abs(np.log(ratio) - np.log(sigma))))


def denoising_timesteps(t_start: int, num_steps: int) -> np.ndarray:
  """Descending timesteps from t_start to 0: num_steps of them, or t_start + 1 when fewer."""
  n = min(num_steps, t_start + 1)
  return np.unique(np.round(np.linspace(t_start, 0, n)).astype(np.int32))[::-1].copy()


def denoise(denoise_fn: Callable, schedule: Schedule, key, y, timesteps, *, draws: int = 1,
            sampler: str = "ddim", **sample_kwargs):
  """Estimates x0 from y = x0 + sigma * eps (model space) by running the reverse process from
  the step that matches sigma: x_t = sqrt(abar_t) y at t = timesteps[0] (see timestep_for_sigma
  and denoising_timesteps), down to the data.

  sampler='ddim' (deterministic) returns the probability-flow ODE's image of y, a plausible clean
  image; sampler='ddpm' with draws=K averages K ancestral draws from the posterior p(x0 | y), which
  approaches the posterior mean (the least-squares estimate, smoother) as K grows. The timesteps
  may be traced: new noise levels with the same number of steps do not recompile."""
  y = jnp.asarray(y, jnp.float32)
  timesteps = jnp.asarray(timesteps, jnp.int32)
  x_t = jnp.sqrt(schedule.abar_at(timesteps[0])) * y

  def one(k):
    return sample(denoise_fn, schedule, k, None, sampler=sampler, timesteps=timesteps, x_T=x_t,
                  **sample_kwargs)

  if draws == 1:
    return one(key)
  return jnp.mean(jax.lax.map(one, jax.random.split(key, draws)), axis=0)

"""DDPM, DDIM and DPM-Solver++(2M) as pure steps run by one lax.scan, and classifier-free guidance.
Only shapes, sampler name and step count are static, so a jitted wrapper compiles once."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.diffusion.process import check_prediction, eps_from_x0, expand, to_x0_eps
from jaxgen.diffusion.schedules import Schedule
from jaxgen.errors import ConfigError, ShapeError

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
SPACINGS = ("trailing", "leading", "linspace")


def make_timesteps(num_timesteps: int, num_steps: int, spacing: str = "trailing",
                   offset: int = 0) -> jax.Array:
  """The num_steps timesteps a sampler visits, descending, int32 [num_steps].

  - 'trailing' (Lin et al. 2024): from T-1 down in strides of T / num_steps, so sampling always
    starts at the noisiest step; with num_steps = T it is every step.
  - 'leading' (DDIM's original spacing): multiples of T // num_steps counted up from 0, plus
    `offset` (Stable Diffusion uses 1); it usually stops short of T-1, the noisiest step.
  - 'linspace': num_steps points spread evenly over [0, T-1], both ends included, rounded.
  """
  if spacing not in SPACINGS:
    raise ConfigError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
    raise ConfigError(f"num_steps must be an int in [1, {num_timesteps}] (the schedule's "
                      f"num_timesteps), got {num_steps!r}")
  if spacing == "trailing":
    ts = np.round(num_timesteps - np.arange(num_steps) * (num_timesteps / num_steps)) - 1
  elif spacing == "leading":
    ts = np.arange(num_steps)[::-1] * (num_timesteps // num_steps) + offset
    if offset < 0 or ts[0] > num_timesteps - 1:
      raise ConfigError(f"leading spacing: offset {offset} puts timesteps outside "
                        f"[0, {num_timesteps - 1}]")
  else:
    ts = np.round(np.linspace(num_timesteps - 1, 0, num_steps))
  return jnp.asarray(ts.astype(np.int32))


def _sqrt0(u):
  """sqrt(max(u, 0)) with a zero gradient where u <= 0: coefficients that vanish on the last step
  (sigma, the DDIM direction) would otherwise give inf * 0 = nan in gradients, e.g. for eta."""
  pos = u > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, u, 1.0)), 0.0)


# The three updates take the float32 predictions (x0, eps) at the current step t and return the
# sample at the next, less noisy step t_prev (-1: the data). Pure, shapes [B, ...], t/t_prev [B].

def ddpm_update(schedule: Schedule, x_t, x0, t, t_prev, noise) -> jax.Array:
  """Ancestral step (Ho et al. 2020): a draw from the posterior q(x_{t_prev} | x_t, x0).

  Between strided timesteps the posterior is that of the two-step chain with
  alpha = abar_t / abar_prev; its variance is beta-tilde, zero at t_prev = -1.
  """
  abar_t = expand(schedule.abar_at(t), x_t)
  abar_s = expand(schedule.abar_at(t_prev), x_t)
  alpha = abar_t / abar_s
  beta = 1.0 - alpha
  mean = (jnp.sqrt(abar_s) * beta * x0 + jnp.sqrt(alpha) * (1.0 - abar_s) * x_t) / (1.0 - abar_t)
  var = (1.0 - abar_s) / (1.0 - abar_t) * beta
  return mean + _sqrt0(var) * noise


def ddim_update(schedule: Schedule, x_t, x0, eps, t, t_prev, eta, noise,
                final_abar=None) -> jax.Array:
  """Song et al. 2021, eq. 12: eta = 0 is the deterministic DDIM, eta = 1 equals DDPM.

  final_abar: abar of the step after the last (t_prev = -1); None is 1, the clean data.
  diffusers' DDIMScheduler with set_alpha_to_one=False (Stable Diffusion's scheduler configs)
  uses abar[0] there, so its last step stops a little short of the data."""
  abar_t = expand(schedule.abar_at(t), x_t)
  abar_s = schedule.abar_at(t_prev)
  if final_abar is not None:
    abar_s = jnp.where(t_prev >= 0, abar_s, jnp.asarray(final_abar, jnp.float32))
  abar_s = expand(abar_s, x_t)
  sigma = eta * _sqrt0((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s))
  # Rounding can push 1 - abar_s - sigma^2 a hair below 0 when eta = 1 at the last step.
  dir_coef = _sqrt0(1.0 - abar_s - jnp.square(sigma))
  return jnp.sqrt(abar_s) * x0 + dir_coef * eps + sigma * noise


def dpmpp_2m_update(schedule: Schedule, x_t, x0, x0_last, t, t_prev, h_last, second_order):
  """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) in data prediction, from t to t_prev.

  h = lambda(t_prev) - lambda(t) with lambda = log(alpha / sigma). `x0_last` is the previous
  step's x0 and h_last its step; where `second_order` is False this is the first-order update,
  which equals DDIM with eta = 0. Returns (x_prev, h).
  """
  abar_t = schedule.abar_at(t)
  abar_s = schedule.abar_at(t_prev)
  a_t, s_t = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
  a_s, s_s = jnp.sqrt(abar_s), jnp.sqrt(1.0 - abar_s)
  # exp(-h) written without lambda: lambda is +inf at t_prev = -1 (sigma = 0), exp(-h) is 0.
  emh = s_s * a_t / (a_s * s_t)
  # The last step (to t_prev = -1) is always first order; a finite stand-in for its infinite h
  # keeps inf/nan out of both branches of the where, and so out of gradients.
  finite = t_prev >= 0
  h = -jnp.log(jnp.where(finite, emh, 0.5))
  c = expand(jnp.where(jnp.asarray(second_order) & finite, 0.5 * h / h_last, 0.0), x0)  # 1/(2r)
  d = (1.0 + c) * x0 - c * x0_last
  x_prev = expand(s_s / s_t, x_t) * x_t + expand(a_s * (1.0 - emh), x_t) * d
  return x_prev, h


class SamplerState(struct.PyTreeNode):
  """The scan carry: the sample and, for the multistep solver, the previous step's x0 and h."""
  x: jax.Array  # [B, ...] float32
  x0_last: jax.Array  # [B, ...]
  h_last: jax.Array  # [B]
  step: jax.Array  # int32 scalar: steps taken

  @classmethod
  def create(cls, x_T) -> SamplerState:
    x = jnp.asarray(x_T, jnp.float32)
    return cls(x=x, x0_last=jnp.zeros_like(x), h_last=jnp.ones(x.shape[:1], jnp.float32),
               step=jnp.zeros((), jnp.int32))


def _is_static_zero(v) -> bool:
  return isinstance(v, (int, float)) and v == 0


def make_step(denoise: Callable, schedule: Schedule, *, sampler: str = "ddim",
              prediction: str = "eps", eta=0.0, clip_x0: float | None = None,
              constraint: Callable | None = None, final_abar=None,
              use_clipped_model_output: bool = True) -> Callable:
  """One sampler step: step(state, (t, t_prev, key)) -> (state, x_prev), t/t_prev int32 scalars.

  `sample` scans it; the same function can be called in a Python loop. denoise(x_t, t[B]) returns
  a model output of type `prediction`; constraint(x_prev, t_prev[B], key) runs after each step.
  With clip_x0, eps is re-derived from the clipped x0 when use_clipped_model_output (GLIDE's
  rule, jaxgen's default), else kept as predicted (what diffusers' pipelines do).
  final_abar (DDIM only): see ddim_update.
  """
  if sampler not in SAMPLERS:
    raise ConfigError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
  check_prediction(prediction)
  if final_abar is not None and sampler != "ddim":
    raise ConfigError(f"final_abar (set_alpha_to_one=False) applies to the ddim sampler only, "
                      f"not {sampler!r}")
  # A literal eta = 0 makes DDIM deterministic: skip drawing noise that would be multiplied by 0.
  stochastic = sampler == "ddpm" or (sampler == "ddim" and not _is_static_zero(eta))

  def step(state: SamplerState, inputs):
    t, t_prev, key = inputs
    x = state.x
    batch = x.shape[:1]
    t_b = jnp.full(batch, t, jnp.int32)
    t_prev_b = jnp.full(batch, t_prev, jnp.int32)
    key_noise, key_constraint = jax.random.split(key)
    out = denoise(x, t_b)
    x0, eps = to_x0_eps(out, x, t_b, schedule, prediction)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      if use_clipped_model_output:
        eps = eps_from_x0(x0, x, t_b, schedule)  # keep eps consistent with the clipped x0
    noise = jax.random.normal(key_noise, x.shape, jnp.float32) if stochastic else None
    h = state.h_last
    if sampler == "ddpm":
      x_prev = ddpm_update(schedule, x, x0, t_b, t_prev_b, noise)
    elif sampler == "ddim":
      x_prev = ddim_update(schedule, x, x0, eps, t_b, t_prev_b, jnp.asarray(eta, jnp.float32),
                           0.0 if noise is None else noise, final_abar)
    else:
      x_prev, h = dpmpp_2m_update(schedule, x, x0, state.x0_last, t_b, t_prev_b, state.h_last,
                                  state.step > 0)
    if constraint is not None:
      x_prev = constraint(x_prev, t_prev_b, key_constraint)
    new = SamplerState(x=x_prev, x0_last=x0, h_last=h, step=state.step + 1)
    return new, x_prev

  return step


def step_inputs(timesteps, key):
  """Scan inputs for descending `timesteps` [N]: (t, t_prev, key) per step; t_prev ends at -1."""
  timesteps = jnp.asarray(timesteps, jnp.int32)
  t_prev = jnp.concatenate([timesteps[1:], jnp.full((1,), -1, jnp.int32)])
  return timesteps, t_prev, jax.random.split(key, timesteps.shape[0])


def check_timesteps(timesteps, num_timesteps: int) -> None:
  """ConfigError unless timesteps is 1-D and, where its values are known, descending in range."""
  if jnp.ndim(timesteps) != 1 or jnp.shape(timesteps)[0] < 1:
    raise ConfigError(f"timesteps must be a non-empty 1-D int array, got shape "
                      f"{jnp.shape(timesteps)}")
  try:
    ts = np.asarray(timesteps)
  except jax.errors.TracerArrayConversionError:
    return  # traced under jit: the values are only known at run time
  if ts.min() < 0 or ts.max() > num_timesteps - 1 or np.any(np.diff(ts) >= 0):
    raise ConfigError(f"timesteps must be strictly descending in [0, {num_timesteps - 1}], "
                      f"got {ts.tolist()}")


def sample(denoise: Callable, schedule: Schedule, key, shape, *, sampler: str = "ddim",
           num_steps: int = 50, prediction: str = "eps", eta=0.0, timesteps=None,
           spacing: str = "trailing", x_T=None, return_trajectory: bool = False,
           clip_x0: float | None = None, constraint: Callable | None = None,
           final_abar=None, use_clipped_model_output: bool = True):
  """Draws x_0 [shape] from noise with 'ddpm', 'ddim' or 'dpmpp_2m'; pure and jittable.

  `key` is split into the key of x_T and the per-step keys (noise, then `constraint`).
  `timesteps` (int [N], descending, may be traced) replaces the num_steps/spacing grid; `x_T`
  replaces the starting noise (then `shape` may be None). eta is DDIM's noise scale (traced).
  With return_trajectory, returns (x_0, xs) where xs [N + 1, *shape] starts with x_T.
  final_abar and use_clipped_model_output: see make_step (diffusers' set_alpha_to_one=False is
  final_abar=schedule.abar[0]; its pipelines use use_clipped_model_output=False).
  """
  if sampler not in SAMPLERS:
    raise ConfigError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
  check_prediction(prediction)
  if timesteps is None:
    timesteps = make_timesteps(schedule.num_timesteps, num_steps, spacing)
  check_timesteps(timesteps, schedule.num_timesteps)
  key_T, key_steps = jax.random.split(key)
  if x_T is None:
    if shape is None:
      raise ShapeError("sample needs a shape when no x_T is given")
    x_T = jax.random.normal(key_T, tuple(shape), jnp.float32)
  elif shape is not None and tuple(shape) != tuple(x_T.shape):
    raise ShapeError(f"x_T has shape {tuple(x_T.shape)} but shape {tuple(shape)} was asked for")
  step = make_step(denoise, schedule, sampler=sampler, prediction=prediction, eta=eta,
                   clip_x0=clip_x0, constraint=constraint, final_abar=final_abar,
                   use_clipped_model_output=use_clipped_model_output)
  state, xs = jax.lax.scan(step, SamplerState.create(x_T), step_inputs(timesteps, key_steps))
  if return_trajectory:
    return state.x, jnp.concatenate([jnp.asarray(x_T, jnp.float32)[None], xs])
  return state.x


def sampling_options(schedule: Schedule, sampler: str, *, clip_x0: float | None = None,
                     set_alpha_to_one: bool = True, use_clipped_model_output: bool = True
                     ) -> dict:
  """The keyword arguments of `sample` that follow a diffusers scheduler config: clip_sample
  (clip_x0), set_alpha_to_one (DDIM's last step to abar = 1, or to abar[0] when False; the other
  samplers always end at the data) and use_clipped_model_output."""
  final = None if set_alpha_to_one or sampler != "ddim" else schedule.abar[0]
  return dict(clip_x0=clip_x0, final_abar=final,
              use_clipped_model_output=use_clipped_model_output)


def guided_denoiser(model_fn: Callable, cond, null_cond, guidance_scale) -> Callable:
  """Classifier-free guidance (Ho & Salimans 2022): out_u + s (out_c - out_u).

  model_fn(x_t, t, cond) takes a conditioning pytree batched on axis 0; null_cond leaves are
  broadcast to cond's shapes (one null embedding serves the batch). Conditional and unconditional
  run in one batched call. guidance_scale: a traced scalar, or [B] for one scale per example.
  """
  null_cond = jax.tree.map(lambda n, c: jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape),
                           null_cond, cond)

  def denoise(x_t, t):
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null_cond)
    out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), both)
    out_c, out_u = jnp.split(out.astype(jnp.float32), 2)
    s = expand(jnp.asarray(guidance_scale, jnp.float32), out_c)
    return out_u + s * (out_c - out_u)

  return denoise

"""The samplers Stable Diffusion users pick (DDPM, DDIM, PLMS, Euler, Euler ancestral,
DPM-Solver++(2M), optionally on Karras sigmas) as pure steps run by one lax.scan, each step
following the matching diffusers scheduler, and classifier-free guidance.

A sampler is a grid (`make_grid`: one row per model call with the model's timestep and the noise
levels the update goes from and to) and a step (`make_step`). Only shapes, the sampler name and
the step count are static, so a jitted wrapper compiles once per sampler and size.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.diffusion.process import check_prediction, eps_from_x0_at, expand, to_x0_eps_at
from jaxgen.diffusion.schedules import Schedule
from jaxgen.errors import ConfigError, ShapeError
from jaxgen.train.mesh import constrain_batch

SAMPLERS = ("ddpm", "ddim", "plms", "euler", "euler_a", "dpmpp_2m")
FLOW_SAMPLERS = ("euler", "heun")  # the ODE samplers of flow-matching models (prediction "flow")
KARRAS_SAMPLERS = ("euler", "dpmpp_2m")  # the samplers that take Karras et al.'s sigmas
SPACINGS = ("trailing", "leading", "linspace")
# The keyword arguments of `sample` that shape the grid (make_grid's, besides num_steps).
GRID_OPTIONS = ("timesteps", "spacing", "offset", "karras", "final_abar", "lower_order_final")


def make_timesteps(num_timesteps: int, num_steps: int, spacing: str = "trailing",
                   offset: int = 0) -> jax.Array:
  """The num_steps timesteps a sampler visits, descending, int32 [num_steps].

  - 'trailing' (Lin et al. 2024): from T-1 down in strides of T / num_steps, so sampling always
    starts at the noisiest step; with num_steps = T it is every step.
  - 'leading' (DDIM's original spacing): multiples of T // num_steps counted up from 0, plus
    `offset` (Stable Diffusion uses 1); it usually stops short of T-1, the noisiest step.
  - 'linspace': num_steps points spread evenly over [0, T-1], both ends included, rounded.
  """
  return jnp.asarray(_timesteps_np(num_timesteps, num_steps, spacing, offset))


def _timesteps_np(num_timesteps: int, num_steps: int, spacing: str = "trailing",
                  offset: int = 0) -> np.ndarray:
  """make_timesteps as NumPy (host) values."""
  if spacing not in SPACINGS:
    raise ConfigError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
  _check_steps(num_timesteps, num_steps)
  if spacing == "trailing":
    ts = np.round(num_timesteps - np.arange(num_steps) * (num_timesteps / num_steps)) - 1
  elif spacing == "leading":
    ts = np.arange(num_steps)[::-1] * (num_timesteps // num_steps) + offset
    if offset < 0 or ts[0] > num_timesteps - 1:
      raise ConfigError(f"leading spacing: offset {offset} puts timesteps outside "
                        f"[0, {num_timesteps - 1}]")
  else:
    ts = np.round(np.linspace(num_timesteps - 1, 0, num_steps))
  return ts.astype(np.int32)


def _check_steps(num_timesteps: int, num_steps) -> None:
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
    raise ConfigError(f"num_steps must be an int in [1, {num_timesteps}] (the schedule's "
                      f"num_timesteps), got {num_steps!r}")


def _dpm_timesteps(num_timesteps: int, num_steps: int, spacing: str, offset: int) -> np.ndarray:
  """DPMSolverMultistepScheduler's grid: linspace and leading place num_steps + 1 points and
  drop the last (t = 0), so they differ from make_timesteps; trailing is the same."""
  _check_steps(num_timesteps, num_steps)
  if spacing == "linspace":
    return np.linspace(0, num_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  if spacing == "leading":
    ratio = num_timesteps // (num_steps + 1)
    return (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + offset
  return _timesteps_np(num_timesteps, num_steps, spacing, offset).astype(np.int64)


def _euler_timesteps(num_timesteps: int, num_steps: int, spacing: str, offset: int) -> np.ndarray:
  """EulerDiscreteScheduler's grid, float32: 'linspace' is not rounded (fractional timesteps,
  at which the sigmas are interpolated)."""
  if spacing == "linspace":
    _check_steps(num_timesteps, num_steps)
    return np.linspace(0, num_timesteps - 1, num_steps, dtype=np.float32)[::-1].copy()
  return _timesteps_np(num_timesteps, num_steps, spacing, offset).astype(np.float32)


def _karras(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
  """Karras et al. 2022, eq. 5: n sigmas from sigma_max to sigma_min, even in sigma^(1/rho)."""
  ramp = np.linspace(0, 1, n)
  hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """The fractional timestep whose sigma is `sigma`, interpolating log sigma linearly between
  the schedule's integer steps (as diffusers and k-diffusion do)."""
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, None]
  low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
  return (1 - w) * low + w * (low + 1)


class Grid(struct.PyTreeNode):
  """What a sampler visits: one row per model call, arrays [N].

  The model sees the sample at noise level `abar` (alpha-bar) with timestep input `t` (int32;
  float32 for the Euler samplers, whose grids fall between integer steps). The update goes
  from level `abar_from` (equal to abar except in PLMS's second row, which restarts from the
  first sample) to `abar_to` (1 is the data). `low_order` marks the rows where DPM-Solver++
  takes a first-order step. The starting noise is multiplied by `init_scale` (a scalar).

  A flow grid (`flow_grid`) steps in flow time instead: t is the time sigma in [0, 1] the model
  sees (1 = noise) and `t_to` the time the step goes to; its abar columns hold the matching
  variance-preserving levels, (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2).
  """
  t: jax.Array
  abar: jax.Array
  abar_from: jax.Array
  abar_to: jax.Array
  low_order: jax.Array
  init_scale: jax.Array
  t_to: jax.Array | None = None

  @property
  def num_rows(self) -> int:
    return self.t.shape[0]

  def rows(self) -> dict:
    rows = dict(t=self.t, abar=self.abar, abar_from=self.abar_from, abar_to=self.abar_to,
                low_order=self.low_order)
    if self.t_to is not None:
      rows["t_to"] = self.t_to
    return rows


def _concrete(schedule: Schedule, sampler: str) -> np.ndarray:
  if schedule.host_abar:
    return np.asarray(schedule.host_abar, np.float32)
  try:
    return np.asarray(schedule.abar)
  except jax.errors.TracerArrayConversionError:
    raise ConfigError(f"the {sampler} grid is computed on the host from the schedule's "
                      f"host_abar, which this schedule lacks: build it with make_schedule"
                      ) from None


def _sigma_grid(schedule: Schedule, sampler: str, num_steps: int, timesteps, spacing: str,
                offset: int, karras: bool, final_abar) -> tuple[np.ndarray, np.ndarray]:
  """(model timesteps [N], sigmas [N + 1]) of diffusers' Euler and (Karras) DPM schedulers,
  sigma = sqrt((1 - abar) / abar), ending at 0 or at the final level."""
  abar = _concrete(schedule, sampler)
  sigmas_all = np.sqrt((1 - abar) / abar)  # float32, as diffusers computes them
  log_sigmas = np.log(sigmas_all)
  T = abar.shape[0]
  if sampler == "dpmpp_2m":  # only with karras here
    _check_steps(T, num_steps)
    sig = _karras(float(sigmas_all[-1]), float(sigmas_all[0]), num_steps)
    ts = np.round(_sigma_to_t(sig, log_sigmas)).astype(np.int32)
  else:
    if timesteps is not None:
      ts = np.asarray(timesteps, np.float32)
    else:
      ts = _euler_timesteps(T, num_steps, spacing, offset)
    sig = np.interp(ts, np.arange(T), sigmas_all)
    if karras:
      sig = _karras(float(sig[0]), float(sig[-1]), ts.shape[0])
      ts = _sigma_to_t(sig, log_sigmas).astype(np.float32)
  last = 0.0 if final_abar is None else float(np.sqrt((1 - final_abar) / final_abar))
  return ts, np.concatenate([sig, [last]]).astype(np.float32)


def make_grid(schedule: Schedule, sampler: str = "ddim", *, num_steps: int = 50,
              timesteps=None, spacing: str = "trailing", offset: int = 0, karras: bool = False,
              final_abar=None, lower_order_final: bool = True, skip: int = 0) -> Grid:
  """The grid of `sampler` as diffusers' matching scheduler builds it.

  num_steps and spacing ('trailing', 'leading' + offset, 'linspace') give the timesteps, each
  sampler's own way (DPM-Solver++ and Euler differ from DDIM on 'linspace' and 'leading');
  `timesteps` (int [N], descending, may be traced for ddpm/ddim/plms/dpmpp_2m) replaces them.
  karras: Karras et al.'s sigmas (euler, dpmpp_2m). final_abar: the level after the last step
  (None: the data; schedule.abar[0] is diffusers' set_alpha_to_one=False for ddim/plms and
  final_sigmas_type='sigma_min' for euler/dpmpp_2m). lower_order_final: DPM-Solver++'s last
  step is first order when it ends at the data, or with this flag under 15 steps. skip: leave
  out the first `skip` timesteps (img2img); PLMS then warms up again from the first one left.
  """
  if sampler not in SAMPLERS:
    raise ConfigError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
  if spacing not in SPACINGS:
    raise ConfigError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
  if karras and sampler not in KARRAS_SAMPLERS:
    raise ConfigError(f"Karras sigmas apply to the {' and '.join(KARRAS_SAMPLERS)} samplers, "
                      f"not {sampler!r}")
  if final_abar is not None and sampler == "ddpm":
    raise ConfigError("final_abar (set_alpha_to_one=False) does not apply to the ddpm sampler: "
                      "its last step always ends at the data")
  if karras and timesteps is not None:
    raise ConfigError("custom timesteps cannot be combined with Karras sigmas")
  T = schedule.num_timesteps
  fin = jnp.float32(1.0) if final_abar is None else jnp.asarray(final_abar, jnp.float32)
  f32 = lambda a: jnp.asarray(a, jnp.float32)

  if sampler == "euler" or sampler == "euler_a" or karras:
    ts, sig = _sigma_grid(schedule, sampler, num_steps, timesteps, spacing, offset, karras,
                          final_abar)
    levels = 1.0 / (1.0 + np.square(sig.astype(np.float64)))
    abar, abar_to = f32(levels[:-1]), f32(levels[1:])
    t = jnp.asarray(ts)
    init = 1.0
    if sampler != "dpmpp_2m" and spacing != "leading":
      # diffusers' Euler multiplies the noise by sigma_max, not sqrt(sigma_max^2 + 1): in the
      # variance-preserving space jaxgen samples in, that is sqrt(1 - abar) of the first row.
      init = float(np.sqrt(1.0 - levels[0]))
    grid = Grid(t=t, abar=abar, abar_from=abar, abar_to=abar_to,
                low_order=_low_order(t.shape[0], final_abar, lower_order_final),
                init_scale=jnp.float32(init))
    return _drop_rows(grid, skip)

  from_spacing = timesteps is None
  if from_spacing:
    if sampler == "dpmpp_2m":
      timesteps = _dpm_timesteps(T, num_steps, spacing, offset)
    else:
      timesteps = _timesteps_np(T, num_steps, spacing, offset)
  check_timesteps(timesteps, T)
  ts = jnp.asarray(timesteps, jnp.int32)
  if sampler == "plms":
    return _plms_grid(schedule, ts[skip:], T // ts.shape[0], fin)
  abar = schedule.abar_at(ts)
  if sampler == "ddim" and from_spacing:
    # DDIMScheduler steps from t to t - T // num_steps, which is the next timestep only where
    # num_steps divides T or the spacing is 'leading'; elsewhere the model then sees a sample a
    # little off its timestep. Given timesteps are followed one to the next.
    t_to = ts - T // ts.shape[0]
    abar_to = jnp.where(t_to >= 0, schedule.abar_at(jnp.maximum(t_to, 0)), fin)
  else:
    abar_to = jnp.concatenate([abar[1:], fin[None]])
  grid = Grid(t=ts, abar=abar, abar_from=abar, abar_to=abar_to,
              low_order=_low_order(ts.shape[0], final_abar, lower_order_final),
              init_scale=jnp.float32(1.0))
  return _drop_rows(grid, skip)


def _low_order(n: int, final_abar, lower_order_final: bool) -> jax.Array:
  """DPM-Solver++(2M)'s first-order rows: the first, and the last when it ends at the data (or
  with lower_order_final under 15 steps), as DPMSolverMultistepScheduler decides."""
  low = np.zeros(n, bool)
  low[0] = True
  if final_abar is None or (lower_order_final and n < 15):
    low[-1] = True
  return jnp.asarray(low)


def _drop_rows(grid: Grid, skip: int) -> Grid:
  if not skip:
    return grid
  if not 0 <= skip < grid.num_rows:
    raise ConfigError(f"skip={skip} leaves no step of a {grid.num_rows}-step grid")
  cut = jax.tree.map(lambda a: a[skip:], grid.rows())
  return Grid(**cut, init_scale=grid.init_scale).replace(
      low_order=cut["low_order"].at[0].set(True))


def _plms_grid(schedule: Schedule, ts, ratio: int, fin) -> Grid:
  """PNDMScheduler with skip_prk_steps: timesteps [t0, t1, t1, t2, ..., t_{N-1}] (one model call
  more than steps). Each row steps from t to t - ratio (T // num_steps, whatever the spacing),
  except the second, which restarts from the first sample at t + ratio and goes to t."""
  n = ts.shape[0]
  if n == 0:
    raise ConfigError("PLMS needs at least one timestep")
  t = ts if n == 1 else jnp.concatenate([ts[:2], ts[1:]])
  second = jnp.arange(t.shape[0]) == 1
  t_from = jnp.where(second, t + ratio, t)
  t_to = jnp.where(second, t, t - ratio)
  abar_to = jnp.where(t_to >= 0, schedule.abar_at(jnp.maximum(t_to, 0)), fin)
  return Grid(t=t, abar=schedule.abar_at(t), abar_from=schedule.abar_at(t_from), abar_to=abar_to,
              low_order=jnp.zeros(t.shape, bool), init_scale=jnp.float32(1.0))


def flow_shift(sigma, shift):
  """Stable Diffusion 3's time shift: shift * s / (1 + (shift - 1) * s); shift > 1 spends more
  of the steps (or of training) at high noise, as larger images need (SD3 sets the shift to
  sqrt(m / n) for m pixels against a base of n)."""
  return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_shift(height: int, width: int, base: int = 256) -> float:
  """SD3's resolution-dependent shift sqrt(m / n): m = height * width, n = base * base."""
  return float(np.sqrt(height * width / float(base * base)))


def flow_grid(num_steps: int, shift: float = 1.0, num_timesteps: int = 1000, *,
              skip: int = 0) -> Grid:
  """The time grid of diffusers' FlowMatchEulerDiscreteScheduler (and FlowMatchHeun's steps):
  num_steps times evenly spaced from 1 down to the training grid's smallest time
  shift(1 / num_timesteps), shifted, then 0 (the data). skip: leave out the first `skip` steps
  (img2img: start at a fraction of the same grid)."""
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ConfigError(f"num_steps must be a positive int, got {num_steps!r}")
  if shift <= 0:
    raise ConfigError(f"the time shift must be positive, got {shift}")
  shift32 = np.float32(shift)
  smallest = flow_shift(np.float32(1.0) / np.float32(num_timesteps), shift32)  # float32
  sig = np.linspace(1.0 * num_timesteps, float(smallest) * num_timesteps, num_steps)
  sig = flow_shift(sig / num_timesteps, float(shift)).astype(np.float32)
  sig = np.concatenate([sig, [0.0]]).astype(np.float32)
  s64 = sig.astype(np.float64)
  levels = (1 - s64) ** 2 / ((1 - s64) ** 2 + s64 ** 2)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return _drop_rows(Grid(t=f32(sig[:-1]), abar=f32(levels[:-1]), abar_from=f32(levels[:-1]),
                         abar_to=f32(levels[1:]), low_order=jnp.zeros(num_steps, bool),
                         init_scale=jnp.float32(1.0), t_to=f32(sig[1:])), skip)


def flow_grid_from(start, num_steps: int) -> Grid:
  """num_steps evenly spaced flow times from `start` (may be traced) down to 0: the grid that
  denoises a picture whose noise puts it at flow time `start`."""
  sig = jnp.asarray(start, jnp.float32) * jnp.linspace(1.0, 0.0, num_steps + 1)
  levels = (1 - sig) ** 2 / ((1 - sig) ** 2 + sig ** 2)
  return Grid(t=sig[:-1], abar=levels[:-1], abar_from=levels[:-1], abar_to=levels[1:],
              low_order=jnp.zeros(num_steps, bool), init_scale=jnp.float32(1.0), t_to=sig[1:])


def _sqrt0(u):
  """sqrt(max(u, 0)) with a zero gradient where u <= 0: coefficients that vanish on the last step
  (sigma, the DDIM direction) would otherwise give inf * 0 = nan in gradients, e.g. for eta."""
  pos = u > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, u, 1.0)), 0.0)


# The updates take the float32 predictions (x0, eps) of the sample x_t at level abar_t and return
# the sample at level abar_s (1: the data). Pure; shapes [B, ...], levels [B].

def ddpm_update(x_t, x0, abar_t, abar_s, noise) -> jax.Array:
  """Ancestral step (Ho et al. 2020): a draw from the posterior q(x_s | x_t, x0).

  Between strided timesteps the posterior is that of the two-step chain with
  alpha = abar_t / abar_s; its variance is beta-tilde, zero at the data.
  """
  abar_t, abar_s = expand(abar_t, x_t), expand(abar_s, x_t)
  alpha = abar_t / abar_s
  beta = 1.0 - alpha
  mean = (jnp.sqrt(abar_s) * beta * x0 + jnp.sqrt(alpha) * (1.0 - abar_s) * x_t) / (1.0 - abar_t)
  var = (1.0 - abar_s) / (1.0 - abar_t) * beta
  return mean + _sqrt0(var) * noise


def ddim_update(x_t, x0, eps, abar_t, abar_s, eta, noise) -> jax.Array:
  """Song et al. 2021, eq. 12: eta = 0 is the deterministic DDIM, eta = 1 equals DDPM. With
  eta = 0 it is also PLMS's update (with PLMS's combined eps) and Euler's."""
  abar_t, abar_s = expand(abar_t, x_t), expand(abar_s, x_t)
  sigma = eta * _sqrt0((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s))
  # Rounding can push 1 - abar_s - sigma^2 a hair below 0 when eta = 1 at the last step.
  dir_coef = _sqrt0(1.0 - abar_s - jnp.square(sigma))
  return jnp.sqrt(abar_s) * x0 + dir_coef * eps + sigma * noise


def euler_ancestral_update(x_t, x0, eps, abar_t, abar_s, noise) -> jax.Array:
  """Euler ancestral (k-diffusion, diffusers' EulerAncestralDiscreteScheduler): an Euler step of
  the probability-flow ODE down to sigma_down, then fresh noise of scale sigma_up, in the
  variance-exploding sigmas sigma^2 = (1 - abar) / abar; sigma_up^2 + sigma_down^2 = sigma_s^2."""
  abar_t, abar_s = expand(abar_t, x_t), expand(abar_s, x_t)
  var_t, var_s = (1.0 - abar_t) / abar_t, (1.0 - abar_s) / abar_s
  var_up = var_s * (var_t - var_s) / var_t
  up, down = _sqrt0(var_up), _sqrt0(var_s - var_up)
  return jnp.sqrt(abar_s) * (x0 + down * eps + up * noise)


def dpmpp_2m_update(x_t, x0, x0_last, abar_t, abar_s, h_last, second_order):
  """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) in data prediction, from abar_t to abar_s.

  h = lambda(s) - lambda(t) with lambda = log(alpha / sigma). `x0_last` is the previous
  step's x0 and h_last its step; where `second_order` is False this is the first-order update,
  which equals DDIM with eta = 0. Returns (x_prev, h).
  """
  a_t, s_t = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
  a_s, s_s = jnp.sqrt(abar_s), jnp.sqrt(1.0 - abar_s)
  # exp(-h) written without lambda: lambda is +inf at the data (sigma = 0), exp(-h) is 0.
  emh = s_s * a_t / (a_s * s_t)
  # A step to the data is always first order; a finite stand-in for its infinite h keeps
  # inf/nan out of both branches of the where, and so out of gradients.
  finite = abar_s < 1.0
  h = -jnp.log(jnp.where(finite, emh, 0.5))
  c = expand(jnp.where(jnp.asarray(second_order) & finite, 0.5 * h / h_last, 0.0), x0)  # 1/(2r)
  d = (1.0 + c) * x0 - c * x0_last
  x_prev = expand(s_s / s_t, x_t) * x_t + expand(a_s * (1.0 - emh), x_t) * d
  return x_prev, h


# PLMS's linear multistep weights on the last 1..4 model outputs, newest first (PNDMScheduler).
_PLMS_WEIGHTS = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.5, -0.5, 0.0, 0.0],
                          [23.0, -16.0, 5.0, 0.0], [55.0, -59.0, 37.0, -9.0]]) / np.array(
                              [[1.0], [1.0], [1.0], [12.0], [24.0]])


def threshold_x0(x0, ratio: float, max_value: float = 1.0) -> jax.Array:
  """Dynamic thresholding (Saharia et al. 2022, diffusers' `thresholding`): per example, s is the
  `ratio` quantile of |x0| clipped to [1, max_value]; x0 is clipped to [-s, s] and divided by s."""
  flat = x0.reshape(x0.shape[0], -1)
  s = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1), 1.0, max_value)
  s = expand(s, x0)
  return jnp.clip(x0, -s, s) / s


class SamplerState(struct.PyTreeNode):
  """The scan carry: the sample, the multistep samplers' history (DPM-Solver++: the previous
  x0; PLMS: the last four model outputs, newest last; empty for the others), PLMS's first
  sample, DPM-Solver++'s previous step h, and the number of steps taken."""
  x: jax.Array  # [B, ...] float32
  history: jax.Array  # [K, B, ...]
  x_first: jax.Array  # [B, ...] for PLMS, else [0]
  h_last: jax.Array  # [B]
  step: jax.Array  # int32 scalar

  @classmethod
  def create(cls, x_T, sampler: str = "ddim") -> SamplerState:
    x = jnp.asarray(x_T, jnp.float32)
    k = {"dpmpp_2m": 1, "plms": 4}.get(sampler, 0)
    return cls(x=x, history=jnp.zeros((k, *x.shape), jnp.float32),
               x_first=jnp.zeros_like(x) if sampler == "plms" else jnp.zeros((0,), jnp.float32),
               h_last=jnp.ones(x.shape[:1], jnp.float32), step=jnp.zeros((), jnp.int32))


def _is_static_zero(v) -> bool:
  return isinstance(v, (int, float)) and v == 0


def make_step(denoise: Callable, *, sampler: str = "ddim", prediction: str = "eps", eta=0.0,
              clip_x0: float | None = None, threshold: tuple[float, float] | None = None,
              constraint: Callable | None = None,
              use_clipped_model_output: bool = True) -> Callable:
  """One sampler step: step(state, (row, key)) -> (state, x_prev), row a dict of one grid row's
  scalars (see Grid.rows). `sample` scans it; the same function can run in a Python loop.

  denoise(x_t, t[B]) returns a model output of type `prediction`; constraint(x_prev,
  abar_prev[B], key) runs after each step. clip_x0 clips the predicted x0 to [-c, c];
  threshold=(ratio, max_value) applies dynamic thresholding instead (not in PLMS, which works on
  model outputs, as in diffusers). With either, DDIM re-derives eps from the processed x0 when
  use_clipped_model_output (GLIDE's rule, jaxgen's default; diffusers' pipelines do not); the
  Euler samplers always do (their ODE direction is x_t - x0).
  """
  if prediction == "flow":
    return _flow_step(denoise, sampler, constraint)
  if sampler not in SAMPLERS:
    raise ConfigError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
  check_prediction(prediction)
  if clip_x0 is not None and threshold is not None:
    raise ConfigError("clip_x0 and threshold are alternatives; give one")
  # A literal eta = 0 makes DDIM deterministic: skip drawing noise that would be multiplied by 0.
  stochastic = sampler in ("ddpm", "euler_a") or (sampler == "ddim" and not _is_static_zero(eta))
  weights = jnp.asarray(_PLMS_WEIGHTS, jnp.float32)

  def process_x0(x0):
    if clip_x0 is not None:
      return jnp.clip(x0, -clip_x0, clip_x0), True
    if threshold is not None:
      return threshold_x0(x0, *threshold), True
    return x0, False

  def step(state: SamplerState, inputs):
    row, key = inputs
    x = state.x
    batch = x.shape[:1]
    full = lambda v: jnp.full(batch, v, v.dtype)
    abar, abar_from, abar_to = full(row["abar"]), full(row["abar_from"]), full(row["abar_to"])
    key_noise, key_constraint = jax.random.split(key)
    out = jnp.asarray(denoise(x, full(row["t"])), jnp.float32)
    noise = jax.random.normal(key_noise, x.shape, jnp.float32) if stochastic else 0.0
    history, x_first, h = state.history, state.x_first, state.h_last
    if sampler == "plms":
      c = state.step
      pushed = jnp.concatenate([history[1:], out[None]])
      history = jnp.where(c == 1, history, pushed)
      # c = 0: the output alone; 1: averaged with the first (below); then 2, 3, 4 outputs.
      w = weights[jnp.where(c <= 1, c, jnp.minimum(c, 4))]
      combined = jnp.tensordot(w, history[::-1], axes=1)
      combined = jnp.where(c == 1, 0.5 * (out + history[-1]), combined)
      x_from = jnp.where(c == 1, x_first, x)
      x_first = jnp.where(c == 0, x, x_first)
      x0, eps = to_x0_eps_at(combined, x_from, abar_from, prediction)
      x_prev = ddim_update(x_from, x0, eps, abar_from, abar_to, 0.0, 0.0)
    else:
      x0, eps = to_x0_eps_at(out, x, abar, prediction)
      x0, processed = process_x0(x0)
      if processed and (sampler in ("euler", "euler_a") or use_clipped_model_output):
        eps = eps_from_x0_at(x0, x, abar)
      if sampler == "ddpm":
        x_prev = ddpm_update(x, x0, abar, abar_to, noise)
      elif sampler in ("ddim", "euler"):
        eta_ = 0.0 if sampler == "euler" else jnp.asarray(eta, jnp.float32)
        x_prev = ddim_update(x, x0, eps, abar, abar_to, eta_, noise)
      elif sampler == "euler_a":
        x_prev = euler_ancestral_update(x, x0, eps, abar, abar_to, noise)
      else:
        x_prev, h = dpmpp_2m_update(x, x0, history[0], abar, abar_to, state.h_last,
                                    ~row["low_order"])
        history = x0[None]
    if constraint is not None:
      x_prev = constraint(x_prev, abar_to, key_constraint)
    new = SamplerState(x=x_prev, history=history, x_first=x_first, h_last=h,
                       step=state.step + 1)
    return new, x_prev

  return step


def _flow_step(denoise: Callable, sampler: str, constraint: Callable | None) -> Callable:
  """A flow model's ODE step on a flow grid: denoise(x, sigma[B]) is the velocity
  dx/dsigma (noise - data, for x = (1 - sigma) data + sigma noise). Euler: x + (s - t) v(x, t).
  Heun: the mean of v at both ends, the second taken at the Euler point (diffusers'
  FlowMatchHeunDiscreteScheduler); a step that ends at the data (s = 0) is an Euler step."""
  if sampler not in FLOW_SAMPLERS:
    raise ConfigError(f"a flow model samples with {' or '.join(FLOW_SAMPLERS)}, not "
                      f"{sampler!r}")

  def step(state: SamplerState, inputs):
    row, key = inputs
    x = state.x
    full = lambda v: jnp.full(x.shape[:1], v, jnp.float32)
    t, t_to = full(row["t"]), full(row["t_to"])
    v = jnp.asarray(denoise(x, t), jnp.float32)
    dt = expand(t_to - t, x)
    x_prev = x + dt * v
    if sampler == "heun":
      v2 = jnp.asarray(denoise(x_prev, t_to), jnp.float32)
      x_prev = jnp.where(expand(t_to > 0, x), x + dt * 0.5 * (v + v2), x_prev)
    if constraint is not None:
      x_prev = constraint(x_prev, full(row["abar_to"]), key)
    return state.replace(x=x_prev, step=state.step + 1), x_prev

  return step


def step_inputs(grid: Grid, key):
  """Scan inputs of `grid`: (rows, keys), one key per row."""
  return grid.rows(), jax.random.split(key, grid.num_rows)


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
           prediction: str = "eps", eta=0.0, x_T=None, return_trajectory: bool = False,
           clip_x0: float | None = None, threshold: tuple[float, float] | None = None,
           constraint: Callable | None = None, use_clipped_model_output: bool = True,
           grid: Grid | None = None, **grid_options):
  """Draws x_0 [shape] from noise with any of SAMPLERS; pure and jittable.

  grid_options go to make_grid (num_steps=50, timesteps, spacing='trailing', offset, karras,
  final_abar, lower_order_final), or `grid` is given. `key` is split into the key of x_T and
  the per-step keys (noise, then `constraint`). `x_T` replaces the starting noise (then `shape`
  may be None); like diffusers' `latents` it is multiplied by the grid's init_scale (1 except
  for Euler on 'linspace'/'trailing' grids). eta is DDIM's noise scale (traced). With
  return_trajectory, returns (x_0, xs) where xs [rows + 1, *shape] starts with the scaled x_T.
  clip_x0, threshold, use_clipped_model_output: see make_step. prediction="flow": a flow model
  (denoise gives the velocity) sampled with FLOW_SAMPLERS on `grid` = flow_grid(...).
  """
  if prediction == "flow":
    if grid is None or grid.t_to is None:
      raise ConfigError("a flow model samples on a flow grid: pass grid=flow_grid(num_steps, "
                        "shift)")
  else:
    if sampler not in SAMPLERS:
      raise ConfigError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    check_prediction(prediction)
  if grid is None:
    grid = make_grid(schedule, sampler, **grid_options)
  elif grid_options:
    raise ConfigError(f"give a grid or grid options, not both: {sorted(grid_options)}")
  key_T, key_steps = jax.random.split(key)
  if x_T is None:
    if shape is None:
      raise ShapeError("sample needs a shape when no x_T is given")
    x_T = jax.random.normal(key_T, tuple(shape), jnp.float32)
  elif shape is not None and tuple(shape) != tuple(x_T.shape):
    raise ShapeError(f"x_T has shape {tuple(x_T.shape)} but shape {tuple(shape)} was asked for")
  # Under a mesh set with jax.set_mesh, the batch is split over its 'data' devices.
  x_T = constrain_batch(jnp.asarray(x_T, jnp.float32) * grid.init_scale)
  step = make_step(denoise, sampler=sampler, prediction=prediction, eta=eta, clip_x0=clip_x0,
                   threshold=threshold, constraint=constraint,
                   use_clipped_model_output=use_clipped_model_output)
  state, xs = jax.lax.scan(step, SamplerState.create(x_T, sampler), step_inputs(grid, key_steps))
  if return_trajectory:
    return state.x, jnp.concatenate([x_T[None], xs])
  return state.x


def sampling_options(schedule: Schedule, sampler: str, *, clip_x0: float | None = None,
                     threshold: tuple[float, float] | None = None, set_alpha_to_one: bool = True,
                     final_sigmas: str = "zero", use_clipped_model_output: bool = True,
                     karras: bool = False, spacing: str | None = None, offset: int = 0) -> dict:
  """The keyword arguments of `sample` that follow a diffusers scheduler config for `sampler`:
  clip_sample (clip_x0), thresholding (threshold), the last step's level (set_alpha_to_one for
  ddim and plms, final_sigmas_type 'zero' | 'sigma_min' for euler, euler_a and dpmpp_2m),
  use_clipped_model_output, use_karras_sigmas (for the samplers that take it; ignored by the
  others, as diffusers' other schedulers ignore the key), timestep_spacing and steps_offset."""
  if final_sigmas not in ("zero", "sigma_min"):
    raise ConfigError(f"final_sigmas must be 'zero' or 'sigma_min', got {final_sigmas!r}")
  ends_early = (sampler in ("ddim", "plms") and not set_alpha_to_one) or (
      sampler in ("euler", "euler_a", "dpmpp_2m") and final_sigmas == "sigma_min")
  opts = dict(clip_x0=clip_x0, threshold=threshold,
              final_abar=schedule.abar[0] if ends_early else None,
              use_clipped_model_output=use_clipped_model_output,
              karras=bool(karras) and sampler in KARRAS_SAMPLERS, offset=offset)
  if spacing is not None:
    opts["spacing"] = spacing
  return opts


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

"""Whole DDIM trajectories against diffusers' DDIMScheduler with a fixed analytic model, for the
scheduler settings Stable Diffusion's configs use: set_alpha_to_one (the last step's alpha-bar),
steps_offset with leading spacing, clip_sample without re-deriving eps, and each prediction
type, on linear, scaled-linear and cosine schedules."""
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as d

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULES = {"linear": ("linear", None, None), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
             "cosine": ("squaredcos_cap_v2", None, None)}
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def model_np(x, t):
  """A fixed smooth 'network' of x and t (any output type): the same numbers in both."""
  return 0.7 * np.tanh(x) + 0.3 * np.sin(0.01 * t + x)


def model_jax(x, t):
  t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.7 * jnp.tanh(x) + 0.3 * jnp.sin(0.01 * t + x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("schedule, prediction, set_alpha_to_one, clip", [
    *[(s, p, False, False) for s, p in itertools.product(SCHEDULES, PREDICTIONS)],
    ("scaled_linear", "eps", True, False), ("linear", "x0", False, True),
    ("cosine", "v", True, True)])
def test_ddim_trajectory_matches_diffusers(schedule, prediction, set_alpha_to_one, clip):
  name, b0, b1 = SCHEDULES[schedule]
  kw = {} if b0 is None else dict(beta_start=b0, beta_end=b1)
  ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=name,
                                prediction_type=PREDICTIONS[prediction], clip_sample=clip,
                                clip_sample_range=1.0, set_alpha_to_one=set_alpha_to_one,
                                steps_offset=1, timestep_spacing="leading", **kw)
  steps = 20
  ref.set_timesteps(steps)
  x_T = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype(np.float32)
  x = torch.from_numpy(x_T.copy())
  traj = [x.numpy()]
  for t in ref.timesteps:
    out = torch.from_numpy(model_np(x.numpy(), int(t)).astype(np.float32))
    x = ref.step(out, t, x, eta=0.0).prev_sample
    traj.append(x.numpy())

  sched = d.make_schedule({"squaredcos_cap_v2": "cosine"}.get(name, name), 1000, b0, b1)
  timesteps = d.make_timesteps(1000, steps, "leading", offset=1)
  np.testing.assert_array_equal(np.asarray(timesteps), ref.timesteps.numpy())
  final = None if set_alpha_to_one else sched.abar[0]
  run = jax.jit(lambda x_T: d.sample(model_jax, sched, jax.random.PRNGKey(0), None,
                                     timesteps=timesteps, prediction=prediction, x_T=x_T,
                                     clip_x0=1.0 if clip else None, final_abar=final,
                                     use_clipped_model_output=False, return_trajectory=True))
  out, ours = run(jnp.asarray(x_T))
  np.testing.assert_allclose(np.asarray(ours), np.stack(traj), atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ours[-1]))


def test_grid_options_that_do_not_apply_are_refused():
  from jaxgen.errors import ConfigError
  sched = d.make_schedule("linear", 100)
  with pytest.raises(ConfigError, match="does not apply to the ddpm sampler"):
    d.sample(model_jax, sched, jax.random.PRNGKey(0), (1, 2), sampler="ddpm", num_steps=5,
             final_abar=sched.abar[0])
  with pytest.raises(ConfigError, match="Karras sigmas apply to the euler and dpmpp_2m "
                                        "samplers, not 'plms'"):
    d.make_grid(sched, "plms", num_steps=5, karras=True)
  with pytest.raises(ConfigError, match="custom timesteps cannot be combined with Karras"):
    d.make_grid(sched, "euler", timesteps=np.arange(9, 0, -1), karras=True)
  with pytest.raises(ConfigError, match="clip_x0 and threshold are alternatives"):
    d.sample(model_jax, sched, jax.random.PRNGKey(0), (1, 2), num_steps=5, clip_x0=1.0,
             threshold=(0.99, 1.0))
  with pytest.raises(ConfigError, match="give a grid or grid options, not both"):
    d.sample(model_jax, sched, jax.random.PRNGKey(0), (1, 2), grid=d.make_grid(sched),
             num_steps=5)
  with pytest.raises(ConfigError, match="final_sigmas must be 'zero' or 'sigma_min'"):
    d.sampling_options(sched, "euler", final_sigmas="min")

  # the Euler grid is computed on the host, from static values: a traced schedule has them
  host = jax.jit(lambda schedule: d.make_grid(schedule, "euler", num_steps=5).t)(sched)
  np.testing.assert_array_equal(host, d.make_grid(sched, "euler", num_steps=5).t)
  bare = jax.jit(lambda abar: d.Schedule(betas=abar, alphas=abar, abar=abar))
  with pytest.raises(ConfigError, match="the euler grid is computed on the host"):
    jax.jit(lambda s: d.make_grid(s, "euler", num_steps=5).t)(bare(sched.abar))


# -- every sampler against its diffusers scheduler ---------------------------------------------

SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "plms": "PNDMScheduler",
              "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler"}
NOISE_MODULES = {"ddpm": "scheduling_ddpm", "euler_a": "scheduling_euler_ancestral_discrete"}
SIGMA_SAMPLERS = ("euler", "euler_a")  # diffusers' sample lives in sigma space


def _cases():
  """(sampler, schedule, prediction, spacing, options): each sampler on the three schedules and
  the prediction types its scheduler takes, spacings in turn, plus the settings SD users set."""
  spacings = ("leading", "trailing", "linspace")
  out = []
  for i, (sampler, schedule, prediction) in enumerate(itertools.product(
      SCHEDULERS, SCHEDULES, PREDICTIONS)):
    if sampler in ("plms", "euler_a") and prediction == "x0":
      continue  # PNDMScheduler and EulerAncestralDiscreteScheduler take eps and v only
    out.append((sampler, schedule, prediction, spacings[i % 3], {}))
  out += [
      ("euler", "scaled_linear", "eps", "linspace", dict(karras=True)),
      ("euler", "linear", "v", "leading", dict(karras=True, final_sigmas="sigma_min")),
      ("dpmpp_2m", "scaled_linear", "eps", "linspace", dict(karras=True)),
      ("dpmpp_2m", "linear", "v", "leading", dict(karras=True, final_sigmas="sigma_min")),
      ("dpmpp_2m", "scaled_linear", "x0", "trailing", dict(final_sigmas="sigma_min",
                                                           lower_order_final=False)),
      ("dpmpp_2m", "cosine", "x0", "linspace", dict(threshold=(0.9, 1.5))),
      ("ddim", "linear", "x0", "leading", dict(threshold=(0.9, 1.5))),
      ("ddpm", "cosine", "x0", "trailing", dict(clip=True)),
      ("plms", "scaled_linear", "eps", "leading", dict(set_alpha_to_one=False)),
      ("plms", "cosine", "v", "trailing", dict(set_alpha_to_one=True)),
  ]
  return out


def _reference(sampler, schedule, prediction, spacing, opts, steps):
  name, b0, b1 = SCHEDULES[schedule]
  kw = dict(num_train_timesteps=1000, beta_schedule=name, prediction_type=PREDICTIONS[prediction],
            timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
  if b0 is not None:
    kw.update(beta_start=b0, beta_end=b1)
  if sampler in ("ddpm", "ddim"):
    kw.update(clip_sample=opts.get("clip", False), clip_sample_range=1.0)
  if sampler in ("ddim", "plms"):
    kw.update(set_alpha_to_one=opts.get("set_alpha_to_one", False))
  if sampler == "plms":
    kw.update(skip_prk_steps=True)
  if sampler in ("euler", "dpmpp_2m"):
    kw.update(use_karras_sigmas=opts.get("karras", False))
  if sampler in ("euler", "dpmpp_2m"):
    kw.update(final_sigmas_type=opts.get("final_sigmas", "zero"))
  if sampler == "dpmpp_2m":
    kw.update(algorithm_type="dpmsolver++", solver_order=2,
              lower_order_final=opts.get("lower_order_final", True))
  if "threshold" in opts:
    ratio, max_value = opts["threshold"]
    kw.update(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
  ref = getattr(diffusers, SCHEDULERS[sampler])(**kw)
  ref.set_timesteps(steps)
  return ref


def _our_options(sampler, schedule, opts, spacing):
  sched = d.make_schedule({"squaredcos_cap_v2": "cosine"}.get(SCHEDULES[schedule][0],
                                                              SCHEDULES[schedule][0]),
                          1000, *SCHEDULES[schedule][1:])
  kw = d.sampling_options(sched, sampler, clip_x0=1.0 if opts.get("clip") else None,
                          threshold=opts.get("threshold"),
                          set_alpha_to_one=opts.get("set_alpha_to_one", False),
                          final_sigmas=opts.get("final_sigmas", "zero"),
                          use_clipped_model_output=False, karras=opts.get("karras", False),
                          spacing=spacing, offset=1 if spacing == "leading" else 0)
  if "lower_order_final" in opts:
    kw["lower_order_final"] = opts["lower_order_final"]
  return sched, kw


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("sampler, schedule, prediction, spacing, opts", _cases())
def test_sampler_trajectory_matches_diffusers(monkeypatch, sampler, schedule, prediction,
                                              spacing, opts):
  """The whole trajectory of each sampler (its grid, first step, multistep history, last step)
  against the diffusers scheduler of the same config, with a fixed analytic model and, for the
  stochastic samplers, the same noise. Euler's samples are compared in jaxgen's
  variance-preserving space (diffusers' x / sqrt(sigma^2 + 1), what its model sees)."""
  steps = 7
  ref = _reference(sampler, schedule, prediction, spacing, opts, steps)
  sched, kw = _our_options(sampler, schedule, opts, spacing)
  grid = d.make_grid(sched, sampler, num_steps=steps,
                     **{k: v for k, v in kw.items() if k in d.GRID_OPTIONS})
  # Karras grids map sigmas back to fractional timesteps through log sigma: diffusers' float32
  # cumulative product of the alphas differs from jaxgen's float64 one by ~1e-5 relative.
  np.testing.assert_allclose(np.asarray(grid.t, np.float64), ref.timesteps.numpy(), rtol=1e-4,
                             atol=1e-4)
  shape = (3, 4, 4, 2)
  x_T = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  key = jax.random.PRNGKey(3)
  # the noise `sample` draws at each step: key -> (x_T key, step keys) -> (noise, constraint)
  step_keys = jax.random.split(jax.random.split(key)[1], grid.num_rows)
  noises = [np.asarray(jax.random.normal(jax.random.split(k)[0], shape)) for k in step_keys]
  current = {}
  if sampler in NOISE_MODULES:
    module = getattr(diffusers.schedulers, NOISE_MODULES[sampler])
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: current["noise"])

  sigmas = getattr(ref, "sigmas", None)
  def to_vp(x, i):
    if sampler not in SIGMA_SAMPLERS:
      return x.numpy()
    return (x / (sigmas[i] ** 2 + 1) ** 0.5).numpy()

  x = torch.from_numpy(x_T.copy()) * ref.init_noise_sigma
  traj = [to_vp(x, 0)]
  for i, t in enumerate(ref.timesteps):
    current["noise"] = torch.from_numpy(noises[i])
    inp = ref.scale_model_input(x, t)
    out = torch.from_numpy(model_np(inp.numpy(), float(t)).astype(np.float32))
    x = ref.step(out, t, x).prev_sample
    traj.append(to_vp(x, i + 1))

  out, ours = jax.jit(lambda x_T: d.sample(model_jax, sched, key, None, sampler=sampler,
                                           prediction=prediction, x_T=x_T, grid=grid,
                                           return_trajectory=True,
                                           **{k: v for k, v in kw.items()
                                              if k not in d.GRID_OPTIONS}))(jnp.asarray(x_T))
  assert ours.shape[0] == len(traj)
  atol = 5e-5
  if sampler in ("plms", "euler", "euler_a"):
    # diffusers' PNDM and Euler formulas scale the sample by 1 / sqrt(abar) at the noisiest step
    # (sigma space), so its float32 rounding there is eps32 / sqrt(abar): 2.4e-3 for the cosine
    # schedule, whose abar at t = 999 is 2.4e-9. jaxgen's variance-preserving updates avoid it.
    atol += np.finfo(np.float32).eps / np.sqrt(float(grid.abar[0]))
  logging.getLogger(__name__).info(
      "%s %s %s %s %s: max |jaxgen - diffusers| over the trajectory %.2e", sampler, schedule,
      prediction, spacing, opts, float(np.abs(np.asarray(ours) - np.stack(traj)).max()))
  np.testing.assert_allclose(np.asarray(ours), np.stack(traj), atol=atol, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ours[-1]))

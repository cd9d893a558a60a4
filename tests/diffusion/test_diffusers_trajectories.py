"""Whole DDIM trajectories against diffusers' DDIMScheduler with a fixed analytic model, for the
scheduler settings Stable Diffusion's configs use: set_alpha_to_one (the last step's alpha-bar),
steps_offset with leading spacing, clip_sample without re-deriving eps, and each prediction
type, on linear, scaled-linear and cosine schedules."""
import itertools

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


def test_final_abar_is_for_ddim_only():
  from jaxgen.errors import ConfigError
  sched = d.make_schedule("linear", 100)
  with pytest.raises(ConfigError, match="applies to the ddim sampler only"):
    d.sample(model_jax, sched, jax.random.PRNGKey(0), (1, 2), sampler="ddpm", num_steps=5,
             final_abar=sched.abar[0])

"""Flow matching: the ODE samplers against the exact flow of Gaussian data (whose velocity field
and solution are known in closed form) and against diffusers' FlowMatch schedulers; the
training objective's pieces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion
from jaxgen.diffusion import flow

MU, S = 0.7, 0.4  # data: independent N(MU, S^2) per dimension


def exact_velocity(x, t):
  """E[eps - x0 | x_t = x] for x_t = (1 - t) x0 + t eps, x0 ~ N(MU, S^2)."""
  t = jnp.reshape(t, (-1,) + (1,) * (x.ndim - 1))
  var = (1 - t) ** 2 * S ** 2 + t ** 2
  centred = x - (1 - t) * MU
  return t / var * centred - (MU + (1 - t) * S ** 2 / var * centred)


def run(sampler, steps, x1, shift=1.0):
  grid = diffusion.flow_grid(steps, shift)
  return diffusion.sample(exact_velocity, None, jax.random.PRNGKey(0), None, x_T=x1,
                          sampler=sampler, prediction="flow", grid=grid, return_trajectory=True)


def test_one_euler_step_is_the_euler_formula():
  x1 = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
  _, xs = run("euler", 5, x1)
  grid = diffusion.flow_grid(5)
  for i in range(5):
    t, t_to = float(grid.t[i]), float(grid.t_to[i])
    expected = xs[i] + (t_to - t) * exact_velocity(xs[i], jnp.full((4,), t))
    np.testing.assert_allclose(xs[i + 1], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler,steps,tol", [("heun", 30, 2e-3), ("euler", 300, 1e-2)])
def test_the_ode_solution_maps_noise_to_the_data(sampler, steps, tol):
  """The exact flow of this data maps x_1 to MU + S x_1 (it is affine: x_t = (1 - t) MU +
  sqrt(Var_t) x_1); Heun converges at second order, Euler at first."""
  x1 = jax.random.normal(jax.random.PRNGKey(2), (2000,))
  x0, _ = run(sampler, steps, x1)
  np.testing.assert_allclose(x0, MU + S * x1, atol=tol)
  assert abs(float(x0.mean()) - float(MU + S * x1.mean())) < tol
  assert abs(float(x0.std()) - S * float(x1.std())) < tol


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler",
                                  "FlowMatchHeunDiscreteScheduler"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_trajectory_matches_diffusers(name, shift):
  torch = pytest.importorskip("torch")
  schedulers = pytest.importorskip("diffusers.schedulers")
  sch = getattr(schedulers, name)(shift=shift)
  sch.set_timesteps(8)
  x1 = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  x = torch.from_numpy(x1)
  for t in sch.timesteps:
    v = exact_velocity(jnp.asarray(x.numpy()), jnp.full((3,), float(t) / 1000.0))
    x = sch.step(torch.from_numpy(np.array(v)), t, x).prev_sample
  sampler = "heun" if "Heun" in name else "euler"
  ours, _ = run(sampler, 8, jnp.asarray(x1), shift)
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-5, atol=1e-5)
  grid = diffusion.flow_grid(8, shift)
  expected_t = sch.timesteps.numpy() / 1000.0
  if sampler == "heun":
    expected_t = expected_t[::2]
  np.testing.assert_allclose(np.asarray(grid.t), expected_t, rtol=1e-6)


def test_flow_sampling_vmaps_and_differentiates():
  x1 = jax.random.normal(jax.random.PRNGKey(3), (5, 2))
  one = lambda x: run("heun", 6, x[None])[0][0]
  np.testing.assert_allclose(jax.vmap(one)(x1), run("heun", 6, x1)[0], rtol=1e-6)
  g = jax.grad(lambda x: run("heun", 6, x)[0].sum())(x1)
  np.testing.assert_allclose(g, S, rtol=2e-2)  # d x0 / d x1 = S for the exact flow


def test_time_sampling_and_shift():
  key = jax.random.PRNGKey(0)
  t = flow.sample_times(key, 20000, "logit_normal", mean=0.5, std=0.8)
  logit = np.log(t / (1 - t))
  assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
  u = flow.sample_times(key, 20000, "uniform")
  np.testing.assert_allclose(flow.sample_times(key, 20000, "mode", mode_scale=0.0), 1 - u,
                             atol=1e-6)
  shifted = flow.sample_times(key, 20000, "uniform", shift=3.0)
  np.testing.assert_allclose(shifted, 3 * u / (1 + 2 * u), rtol=1e-6)
  assert float(jnp.median(shifted)) > 0.7  # shifted towards noise
  assert diffusion.resolution_shift(1024, 1024, 256) == 4.0
  with pytest.raises(Exception, match="unknown flow time sampling"):
    flow.sample_times(key, 3, "cosine")


def test_the_exact_velocity_minimises_the_loss():
  x0 = MU + S * jax.random.normal(jax.random.PRNGKey(4), (4096, 2))
  key = jax.random.PRNGKey(5)
  best = flow.flow_loss(exact_velocity, x0, key).mean()
  for bias in (0.05, -0.05):
    worse = flow.flow_loss(lambda x, t: exact_velocity(x, t) + bias, x0, key).mean()
    assert worse > best
  # the loss is the velocity error of the path point, checked by hand for one example
  k_t, k_eps = jax.random.split(key)
  t = flow.sample_times(k_t, 4096)
  eps = jax.random.normal(k_eps, x0.shape)
  xt = (1 - t[:, None]) * x0 + t[:, None] * eps
  manual = jnp.mean((exact_velocity(xt, t) - (eps - x0)) ** 2, axis=1)
  np.testing.assert_allclose(flow.flow_loss(exact_velocity, x0, key), manual, rtol=1e-5)


def test_flow_sampler_under_pmap():
  x1 = jax.random.normal(jax.random.PRNGKey(6), (jax.local_device_count(), 3, 2))
  out = jax.pmap(lambda x: run("euler", 4, x)[0])(x1)
  np.testing.assert_allclose(out[0], run("euler", 4, x1[0])[0], rtol=1e-6)


X_STAR = jnp.array([[0.3, -1.2, 2.0, 0.5]])


def to_point(x, t):
  """The exact velocity when all data is the point X_STAR: x_t = (1 - t) X_STAR + t eps gives
  eps - X_STAR = (x_t - X_STAR) / t. Euler follows it exactly, so every start lands on X_STAR."""
  return (x - X_STAR) / jnp.reshape(t, (-1, 1))


def test_flow_img2img_starts_at_the_strength_and_lands_on_the_data():
  x0 = jnp.array([[1.0, 1.0, -1.0, 0.0]])
  for strength in (0.3, 0.5, 1.0):
    out = diffusion.flow_img2img(to_point, jax.random.PRNGKey(0), x0, strength, num_steps=10)
    np.testing.assert_allclose(out, X_STAR, atol=1e-5)
  # it runs the last floor(10 * 0.3) = 3 steps of the 10-step grid, starting from its time
  grid = diffusion.flow_grid(10, skip=7)
  assert grid.num_rows == 3
  np.testing.assert_allclose(grid.t, diffusion.flow_grid(10).t[7:])
  with pytest.raises(Exception, match="strength"):
    diffusion.flow_img2img(to_point, jax.random.PRNGKey(0), x0, 0.0)


def test_flow_inpainting_keeps_the_known_values_exactly():
  known = jnp.array([[9.0, 9.0, 9.0, 9.0]])
  mask = jnp.array([[1.0, 0.0, 1.0, 0.0]])
  out = diffusion.inpaint(to_point, None, jax.random.PRNGKey(1), known, mask, sampler="euler",
                          prediction="flow", grid=diffusion.flow_grid(8))
  np.testing.assert_allclose(out, mask * known + (1 - mask) * X_STAR, atol=1e-5)


def test_flow_level_inverts_the_grid_levels():
  grid = diffusion.flow_grid(12, shift=3.0)
  from jaxgen.diffusion.editing import flow_level
  np.testing.assert_allclose(flow_level(grid.abar), grid.t, atol=1e-5)
  assert float(flow_level(1.0)) == 0.0

"""Sampler updates against NumPy re-derivations, scan vs loop, exact-denoiser sampling, CFG, jit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as d
from jaxgen.errors import ConfigError
from tests.diffusion.gaussian import eps_star_np, exact_denoiser

M, S = np.array([1.0, -2.0]), 0.5
LINEAR = d.make_schedule("linear")
SMALL = d.make_schedule("linear", 100, beta_start=1e-3, beta_end=0.2)


def _abar(sched):
  return np.asarray(sched.abar, np.float64)


def _lv(t):
  """LINEAR's noise level at step t for a batch of 2 (t = -1: the data)."""
  return LINEAR.abar_at(jnp.full(2, t))


def test_make_timesteps_spacings_and_errors():
  # the values diffusers' schedulers produce for T = 1000, 10 steps
  np.testing.assert_array_equal(d.make_timesteps(1000, 10), np.arange(999, 0, -100))
  np.testing.assert_array_equal(d.make_timesteps(1000, 10, "leading", offset=1),
                                np.arange(901, 0, -100))
  np.testing.assert_array_equal(d.make_timesteps(1000, 10, "linspace"), np.arange(999, -1, -111))
  np.testing.assert_array_equal(d.make_timesteps(1000, 3), [999, 666, 332])
  for spacing in d.SPACINGS:
    ts = np.asarray(d.make_timesteps(10, 10, spacing))
    assert ts.dtype == np.int32
    np.testing.assert_array_equal(ts, np.arange(9, -1, -1), err_msg=spacing)
  with pytest.raises(ConfigError, match=r"num_steps must be an int in \[1, 1000\] \(the "
                                        r"schedule's num_timesteps\), got 1001"):
    d.make_timesteps(1000, 1001)
  with pytest.raises(ConfigError, match=r"num_steps must be an int in \[1, 1000\]"):
    d.make_timesteps(1000, 0)
  with pytest.raises(ConfigError, match="unknown timestep spacing 'even'; valid: trailing, "
                                        "leading, linspace"):
    d.make_timesteps(1000, 10, "even")
  with pytest.raises(ConfigError, match="offset 1 puts timesteps outside"):
    d.make_timesteps(10, 10, "leading", offset=1)


def test_one_ddpm_step_is_the_posterior():
  rng = np.random.default_rng(0)
  x_t, x0, noise = rng.normal(size=(3, 2, 3)).astype(np.float32)
  abar = _abar(LINEAR)
  betas = np.asarray(LINEAR.betas, np.float64)
  # consecutive steps: Ho et al. eq. 11 in eps form with sigma^2 = beta-tilde
  t = 400
  eps = (x_t - np.sqrt(abar[t]) * x0) / np.sqrt(1 - abar[t])
  mean = (x_t - betas[t] / np.sqrt(1 - abar[t]) * eps) / np.sqrt(1 - betas[t])
  var = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
  got = d.ddpm_update(x_t, x0, _lv(t), _lv(t - 1), noise)
  np.testing.assert_allclose(got, mean + np.sqrt(var) * noise, rtol=1e-4, atol=1e-5)
  # strided: condition the Gaussian (x_s, x_t) | x0 on x_t
  for t, s in ((700, 500), (40, -1)):
    a_t, a_s = abar[t], (abar[s] if s >= 0 else 1.0)
    var_s, var_t = 1 - a_s, 1 - a_t
    cov = np.sqrt(a_t / a_s) * var_s
    mean = np.sqrt(a_s) * x0 + cov / var_t * (x_t - np.sqrt(a_t) * x0)
    var = var_s - cov ** 2 / var_t
    got = d.ddpm_update(x_t, x0, _lv(t), _lv(s), noise)
    np.testing.assert_allclose(got, mean + np.sqrt(var) * noise, rtol=1e-4, atol=1e-5)


def test_one_ddim_step_is_song_et_al_eq_12_and_eta_1_is_ddpm():
  rng = np.random.default_rng(1)
  x_t, x0, noise = rng.normal(size=(3, 2, 3)).astype(np.float32)
  abar = _abar(LINEAR)
  for t, s in ((999, 899), (300, 299), (50, -1)):
    a_t, a_s = abar[t], (abar[s] if s >= 0 else 1.0)
    eps = (x_t - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
    tb, sb = _lv(t), _lv(s)
    for eta in (0.0, 0.5, 1.0):
      sigma = eta * np.sqrt((1 - a_s) / (1 - a_t)) * np.sqrt(1 - a_t / a_s)
      ref = (np.sqrt(a_s) * (x_t - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
             + np.sqrt(max(1 - a_s - sigma ** 2, 0.0)) * eps + sigma * noise)
      got = d.ddim_update(x_t, x0, eps.astype(np.float32), tb, sb, eta, noise)
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5, err_msg=f"{t} {s} {eta}")
    # eta = 1 is the DDPM posterior draw, for the same noise
    np.testing.assert_allclose(
        d.ddim_update(x_t, x0, eps.astype(np.float32), tb, sb, 1.0, noise),
        d.ddpm_update(x_t, x0, tb, sb, noise), rtol=1e-4, atol=2e-5)


def test_one_dpmpp_2m_step_is_lu_et_al():
  rng = np.random.default_rng(2)
  x_t, x0, x0_last = rng.normal(size=(3, 2, 3)).astype(np.float32)
  abar = _abar(LINEAR)
  lam = lambda a: np.log(np.sqrt(a) / np.sqrt(1 - a))
  t_last, t, s = 999, 749, 499
  h, h_last = lam(abar[s]) - lam(abar[t]), lam(abar[t]) - lam(abar[t_last])
  r = h_last / h
  dd = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
  ref = (np.sqrt(1 - abar[s]) / np.sqrt(1 - abar[t]) * x_t
         - np.sqrt(abar[s]) * (np.exp(-h) - 1) * dd)
  tb, sb = _lv(t), _lv(s)
  got, got_h = d.dpmpp_2m_update(x_t, x0, x0_last, tb, sb, jnp.full(2, h_last), True)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_h, h, rtol=1e-5)
  # first order is DDIM with eta = 0; the final step lands on x0
  first, _ = d.dpmpp_2m_update(x_t, x0, x0_last, tb, sb, jnp.full(2, h_last), False)
  eps = (x_t - np.sqrt(abar[t]) * x0) / np.sqrt(1 - abar[t])
  np.testing.assert_allclose(first, np.sqrt(abar[s]) * x0 + np.sqrt(1 - abar[s]) * eps,
                             rtol=1e-4, atol=1e-5)
  last, _ = d.dpmpp_2m_update(x_t, x0, x0_last, tb, _lv(-1), jnp.ones(2), True)
  np.testing.assert_allclose(last, x0, rtol=1e-6)


def _ddim_np(x, ts, abar):
  """diffusers' DDIM: from t to t - T // n, which for trailing grids is not always the next t."""
  for t in ts:
    s = t - len(abar) // len(ts)
    a_t, a_s = abar[t], (abar[s] if s >= 0 else 1.0)
    eps = eps_star_np(x, a_t, M, S)
    x = np.sqrt(a_s) * (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t) + np.sqrt(1 - a_s) * eps
  return x


def _dpmpp_2m_np(x, ts, abar):
  alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
  lam = np.log(alpha / sigma)
  x0_last = h_last = None
  for i, (t, s) in enumerate(zip(ts, list(ts[1:]) + [-1])):
    x0 = (x - sigma[t] * eps_star_np(x, abar[t], M, S)) / alpha[t]
    if s < 0:  # lower order final: sigma_s = 0, the update is x0 itself
      return x0
    h = lam[s] - lam[t]
    dd = x0 if i == 0 else (1 + h / (2 * h_last)) * x0 - h / (2 * h_last) * x0_last
    x = sigma[s] / sigma[t] * x - alpha[s] * (np.exp(-h) - 1) * dd
    x0_last, h_last = x0, h
  return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy 2 warning
def test_whole_ddim_and_dpmpp_runs_match_numpy_and_diffusers():
  x_T = np.random.default_rng(3).normal(size=(3, 2)).astype(np.float32)
  den = exact_denoiser(LINEAR, M, S)
  key = jax.random.key(0)
  for n in (5, 12):
    ts = np.asarray(d.make_timesteps(1000, n))
    for sampler, ref_fn in (("ddim", _ddim_np), ("dpmpp_2m", _dpmpp_2m_np)):
      got = d.sample(den, LINEAR, key, None, sampler=sampler, num_steps=n, x_T=x_T)
      ref = ref_fn(x_T.astype(np.float64), ts, _abar(LINEAR))
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=f"{sampler} {n}")
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  common = dict(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing")
  schedulers = {
      ("ddim", 12): diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True),
      ("dpmpp_2m", 12): diffusers.DPMSolverMultistepScheduler(
          **common, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
          final_sigmas_type="zero")}
  for (sampler, n), sch in schedulers.items():
    sch.set_timesteps(n)
    x = torch.tensor(x_T, dtype=torch.float64)
    for t in sch.timesteps:
      eps = torch.tensor(eps_star_np(x.numpy(), _abar(LINEAR)[int(t)], M, S))
      x = sch.step(eps, t, x).prev_sample
    got = d.sample(den, LINEAR, key, None, sampler=sampler, num_steps=n, x_T=x_T)
    np.testing.assert_allclose(got, x.numpy(), rtol=1e-4, atol=1e-4, err_msg=sampler)


def test_scan_equals_a_python_loop_over_the_same_step():
  den = exact_denoiser(SMALL, M, S)
  key = jax.random.key(4)
  x_T = jax.random.normal(jax.random.key(5), (3, 2))
  def shrink(x, abar_prev, key):  # a constraint that uses its key and the level
    return 0.9 * x + 0.1 * (1 - abar_prev[:, None]) * jax.random.normal(key, x.shape)

  for sampler, eta in (("ddpm", 0.0), ("ddim", 0.7), ("plms", 0.0), ("euler", 0.0),
                       ("euler_a", 0.0), ("dpmpp_2m", 0.0)):
    grid = d.make_grid(SMALL, sampler, num_steps=7)
    step = jax.jit(d.make_step(den, sampler=sampler, eta=eta, constraint=shrink))
    # `sample` splits its key into the x_T key and the step key
    got, traj = d.sample(den, SMALL, key, None, sampler=sampler, grid=grid, eta=eta,
                         x_T=x_T, return_trajectory=True, constraint=shrink)
    rows, keys = d.step_inputs(grid, jax.random.split(key)[1])
    state = d.SamplerState.create(x_T * grid.init_scale, sampler)
    xs = [x_T * grid.init_scale]
    for i in range(grid.num_rows):
      state, x = step(state, (jax.tree.map(lambda a: a[i], rows), keys[i]))
      xs.append(x)
    assert traj.shape == (grid.num_rows + 1, 3, 2)
    np.testing.assert_allclose(traj, np.stack(xs), rtol=1e-5, atol=1e-6, err_msg=sampler)
    np.testing.assert_array_equal(got, traj[-1])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler,num_steps,tol_std", [("ddim", 50, 0.07), ("ddpm", 1000, 0.03),
                                                        ("dpmpp_2m", 20, 0.025),
                                                        ("plms", 50, 0.02), ("euler", 50, 0.07),
                                                        ("euler_a", 200, 0.05)])
def test_exact_denoiser_samples_the_data_distribution(sampler, num_steps, tol_std, prediction):
  """x0 ~ N(m, s^2). Every sampler's last step returns E[x0 | x_t] at the grid's smallest t,
  whose std is s^2 sqrt(abar) / sqrt(abar s^2 + 1 - abar): 5.7% below s for 20 trailing steps
  (t = 49). DDIM's first-order ODE steps lose another ~5% at 50 steps; DPM-Solver++ and DDPM
  over all 1000 steps match it to within their error (DDPM's Monte Carlo error: 0.6%)."""
  if sampler == "plms" and prediction == "v":
    pytest.skip("PLMS combines raw model outputs (as diffusers' PNDMScheduler), which for v "
                "outputs at different levels is not a combination of eps: its mean is off")
  den = exact_denoiser(LINEAR, M, S, prediction)
  # x_T with exactly zero mean and unit std: the ODE samplers are affine maps for Gaussian data,
  # so their output statistics then carry no Monte Carlo error at all
  x_T = jax.random.normal(jax.random.key(6), (16_384, 2))
  x_T = (x_T - x_T.mean(0)) / x_T.std(0)
  x = d.sample(den, LINEAR, jax.random.key(7), None, sampler=sampler, num_steps=num_steps,
               prediction=prediction, x_T=x_T)
  x = np.asarray(x, np.float64)
  abar = float(d.make_grid(LINEAR, sampler, num_steps=num_steps).abar[-1])
  np.testing.assert_allclose(x.mean(0), M, atol=0.02)
  np.testing.assert_allclose(x.std(0), S ** 2 * np.sqrt(abar / (abar * S ** 2 + 1 - abar)),
                             rtol=tol_std)


def test_ddim_eta_1_over_all_steps_is_ddpm():
  """Same key, same per-step noise: DDIM(eta=1) and ancestral DDPM give the same chain."""
  den = exact_denoiser(LINEAR, M, S)
  run = jax.jit(functools.partial(d.sample, den, LINEAR, shape=(64, 2), num_steps=1000),
                static_argnames="sampler")
  key = jax.random.key(7)
  a, b = run(key, sampler="ddpm"), run(key, sampler="ddim", eta=1.0)
  np.testing.assert_allclose(a, b, atol=2e-4)
  c = run(key, sampler="ddim", eta=0.0)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0.1  # the noise matters


def test_gradients_flow_through_sample():
  x_T = jax.random.normal(jax.random.key(8), (2, 3))

  def loss(theta, x_T, eta, sampler):
    den = lambda x, t: jnp.tanh(theta * x) + 0.1 * theta
    x = d.sample(den, SMALL, jax.random.key(9), None, sampler=sampler, num_steps=5, x_T=x_T,
                 eta=eta)
    return jnp.sum(jnp.square(x)) / 100.0

  h = 1e-2
  for sampler in d.SAMPLERS:
    f = jax.jit(functools.partial(loss, sampler=sampler))
    eta = 0.5 if sampler == "ddim" else 0.0
    g_theta, g_x, g_eta = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(0.8, x_T, eta)
    assert np.all(np.isfinite(g_x)) and np.abs(np.asarray(g_x)).max() > 0
    fd = (f(0.8 + h, x_T, eta) - f(0.8 - h, x_T, eta)) / (2 * h)
    np.testing.assert_allclose(g_theta, fd, rtol=1e-2, err_msg=sampler)
    if sampler == "ddim":  # through the noise scale too, where sigma vanishes on the last step
      fd = (f(0.8, x_T, eta + h) - f(0.8, x_T, eta - h)) / (2 * h)
      np.testing.assert_allclose(g_eta, fd, rtol=1e-2)


EMB = jnp.array([[1.0, -1.0], [3.0, 0.5], [0.0, 0.0]])  # class means; class 2 is "no label"


def _class_model(calls=None):
  def model_fn(x, t, labels):
    if calls is not None:
      calls.append(x.shape)
    abar = SMALL.abar[t][:, None]
    m = EMB[labels]
    return (jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * m) / (abar * S ** 2 + 1 - abar)
            ).astype(jnp.bfloat16)
  return model_fn


def test_guided_denoiser_is_one_batched_call():
  calls = []
  labels = jnp.array([0, 1, 1])
  den = d.guided_denoiser(_class_model(calls), labels, jnp.array(2), 2.5)
  x, t = jax.random.normal(jax.random.key(1), (3, 2)), jnp.array([10, 50, 90])
  out = den(x, t)
  assert calls == [(6, 2)]
  model = _class_model()
  out_c = np.asarray(model(x, t, labels), np.float32)
  out_u = np.asarray(model(x, t, jnp.full(3, 2)), np.float32)
  np.testing.assert_allclose(out, out_u + 2.5 * (out_c - out_u), rtol=1e-6)
  assert out.dtype == jnp.float32
  per_example = d.guided_denoiser(model, labels, jnp.array(2), jnp.array([0.0, 1.0, 2.5]))(x, t)
  np.testing.assert_allclose(per_example[0], out_u[0], rtol=1e-6)
  np.testing.assert_allclose(per_example[1], out_c[1], rtol=1e-6)
  np.testing.assert_allclose(per_example[2], out[2], rtol=1e-6)


def test_changing_keys_scales_labels_and_timesteps_does_not_recompile():
  traces = []

  @jax.jit
  def guided(key, labels, scale, timesteps, eta):
    traces.append(1)
    den = d.guided_denoiser(_class_model(), labels, jnp.array(2), scale)
    return d.sample(den, SMALL, key, (4, 2), timesteps=timesteps, eta=eta)

  ts_a, ts_b = d.make_timesteps(100, 10), d.make_timesteps(100, 10, "leading")
  outs = [guided(jax.random.key(0), jnp.array([0, 1, 0, 1]), 1.0, ts_a, 0.0),
          guided(jax.random.key(1), jnp.array([1, 1, 0, 0]), 4.0, ts_a, 0.0),
          guided(jax.random.key(1), jnp.array([1, 1, 0, 0]), 4.0, ts_b, 0.0),
          guided(jax.random.key(1), jnp.array([1, 1, 0, 0]), 4.0, ts_b, 1.0)]
  assert len(traces) == 1 and guided._cache_size() == 1
  for a, b in zip(outs, outs[1:]):
    assert not np.allclose(a, b)  # every change reached the computation

  plain = jax.jit(lambda key, ts: d.sample(exact_denoiser(SMALL, M, S), SMALL, key, (4, 2),
                                           sampler="ddpm", timesteps=ts))
  for i in range(3):
    plain(jax.random.key(i), d.make_timesteps(100, 10, d.SPACINGS[i]))
  assert plain._cache_size() == 1


def test_vmap_over_keys_and_guidance_scales_equals_separate_calls():
  den = exact_denoiser(SMALL, M, S)
  one = jax.jit(lambda key: d.sample(den, SMALL, key, (4, 2), sampler="ddpm", num_steps=10))
  keys = jax.random.split(jax.random.key(11), 3)
  np.testing.assert_allclose(jax.vmap(one)(keys), np.stack([one(k) for k in keys]),
                             rtol=1e-5, atol=1e-6)

  labels = jnp.array([0, 1, 1, 0])
  guided = jax.jit(lambda scale: d.sample(
      d.guided_denoiser(_class_model(), labels, jnp.array(2), scale), SMALL, jax.random.key(12),
      (4, 2), sampler="dpmpp_2m", num_steps=8))
  scales = jnp.array([0.0, 1.0, 3.0])
  np.testing.assert_allclose(jax.vmap(guided)(scales), np.stack([guided(s) for s in scales]),
                             rtol=1e-5, atol=1e-5)


def test_clip_x0_and_bad_arguments():
  far = exact_denoiser(SMALL, np.array([5.0, -5.0]), 0.1, "x0")
  x = d.sample(far, SMALL, jax.random.key(0), (8, 2), num_steps=10, prediction="x0",
               clip_x0=1.0)
  np.testing.assert_allclose(x, np.broadcast_to([1.0, -1.0], (8, 2)), atol=1e-5)
  den = exact_denoiser(SMALL, M, S)
  key = jax.random.key(0)
  with pytest.raises(ConfigError, match="unknown sampler 'heun'; valid: ddpm, ddim, plms, euler, "
                                        "euler_a, dpmpp_2m"):
    d.sample(den, SMALL, key, (2, 2), sampler="heun")
  with pytest.raises(ConfigError, match="unknown prediction 'score'; valid: eps, x0, v"):
    d.sample(den, SMALL, key, (2, 2), prediction="score")
  with pytest.raises(ConfigError, match=r"num_steps must be an int in \[1, 100\]"):
    d.sample(den, SMALL, key, (2, 2), num_steps=200)
  with pytest.raises(ConfigError, match=r"strictly descending in \[0, 99\], got \[10, 20\]"):
    d.sample(den, SMALL, key, (2, 2), timesteps=jnp.array([10, 20]))

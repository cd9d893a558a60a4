"""Schedules, the forward process, eps/x0/v conversions and the loss against the papers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as d
from jaxgen.errors import ConfigError


def _f_cosine(t, T, s=0.008):
  return np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2


def test_linear_and_scaled_linear_betas_are_the_papers():
  lin = d.make_schedule("linear")
  np.testing.assert_allclose(lin.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-6)
  sd = d.make_schedule("scaled_linear")
  np.testing.assert_allclose(sd.betas, np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2,
                             rtol=1e-6)
  custom = d.make_schedule("linear", 10, beta_start=0.1, beta_end=0.2)
  np.testing.assert_allclose(custom.betas, [0.1 + 0.1 * i / 9 for i in range(10)], rtol=1e-6)
  for sched in (lin, sd, custom):
    assert sched.betas.dtype == sched.abar.dtype == jnp.float32
    np.testing.assert_allclose(sched.alphas, 1 - np.asarray(sched.betas, np.float64), rtol=1e-6)
    # abar_t = prod_{s <= t} alpha_s, accumulated in float64 here
    np.testing.assert_allclose(sched.abar, np.cumprod(1 - np.asarray(sched.betas, np.float64)),
                               rtol=1e-5)
  assert lin.num_timesteps == 1000 and custom.num_timesteps == 10


def test_cosine_abar_is_nichol_dhariwal_until_the_clip():
  T = 1000
  sched = d.make_schedule("cosine", T)
  abar_paper = _f_cosine(np.arange(1, T + 1), T) / _f_cosine(0, T)  # index i is the paper's i+1
  clipped = np.asarray(sched.betas) >= 0.999 - 1e-6
  assert clipped.sum() == 1 and clipped[-1]  # only the final beta (f(T) = 0) hits the clip
  np.testing.assert_allclose(sched.abar[:-1], abar_paper[:-1], rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(sched.abar[-1], sched.abar[-2] * 0.001, rtol=1e-4)


def test_schedules_match_diffusers():
  diffusers = pytest.importorskip("diffusers")
  for ours, theirs in (("linear", "linear"), ("cosine", "squaredcos_cap_v2"),
                       ("scaled_linear", "scaled_linear")):
    kw = dict(beta_start=0.00085, beta_end=0.012) if ours == "scaled_linear" else {}
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, **kw)
    np.testing.assert_allclose(d.make_schedule(ours).abar, ref.alphas_cumprod.numpy(),
                               rtol=1e-5, atol=1e-7, err_msg=ours)


def test_bad_schedule_arguments_are_config_errors():
  with pytest.raises(ConfigError, match="unknown noise schedule 'cosin'; valid: linear, cosine, "
                                        "scaled_linear"):
    d.make_schedule("cosin")
  with pytest.raises(ConfigError, match="cosine schedule .* no beta_start"):
    d.make_schedule("cosine", beta_end=0.02)
  with pytest.raises(ConfigError, match=r"betas must lie in \(0, 1\)"):
    d.make_schedule("linear", 10, beta_end=1.5)


def test_abar_at_minus_one_is_the_clean_data():
  sched = d.make_schedule("linear", 10)
  np.testing.assert_allclose(sched.abar_at(jnp.array([-1, 0, 9])),
                             [1.0, sched.abar[0], sched.abar[9]])


def test_snr_and_conversions_round_trip():
  sched = d.make_schedule("cosine", 100)
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(2, 4, 3, 3, 2)).astype(np.float32)
  t = jnp.array([0, 17, 60, 99], jnp.int32)
  abar = np.asarray(sched.abar, np.float64)[np.asarray(t)].reshape(4, 1, 1, 1)
  np.testing.assert_allclose(d.snr(sched, t), (abar / (1 - abar)).ravel(), rtol=1e-5)
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
  np.testing.assert_allclose(d.q_sample(sched, x0, t, eps), x_t, rtol=1e-5, atol=1e-6)
  v = np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0  # Salimans & Ho 2022
  targets = {"eps": eps, "x0": x0, "v": v}
  for prediction, ref in targets.items():
    np.testing.assert_allclose(d.target(x0, eps, t, sched, prediction), ref, rtol=1e-5,
                               atol=1e-6)
    got_x0, got_eps = d.to_x0_eps(ref, x_t, t, sched, prediction)
    # x0 from eps at the last step divides by sqrt(abar) ~ 0.006: float32 x_t limits it there
    np.testing.assert_allclose(got_x0, x0, rtol=1e-3, atol=2e-3, err_msg=prediction)
    np.testing.assert_allclose(got_eps, eps, rtol=1e-3, atol=2e-3, err_msg=prediction)
  with pytest.raises(ConfigError, match="unknown prediction 'score'; valid: eps, x0, v"):
    d.to_x0_eps(eps, x_t, t, sched, "score")


def test_q_sample_mean_and_variance():
  sched = d.make_schedule("linear")
  t = jnp.array([10, 500, 999], jnp.int32)
  x0 = jnp.broadcast_to(jnp.array([2.0, -1.0, 0.5]).reshape(3, 1), (3, 20_000))
  eps = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = np.asarray(d.q_sample(sched, x0, t, eps), np.float64)
  abar = np.asarray(sched.abar, np.float64)[np.asarray(t)]
  np.testing.assert_allclose(x_t.mean(1), np.sqrt(abar) * np.array([2.0, -1.0, 0.5]), atol=0.025)
  np.testing.assert_allclose(x_t.var(1), 1 - abar, rtol=0.04)


def test_min_snr_weights_are_hang_et_al():
  sched = d.make_schedule("linear")
  t = jnp.arange(0, 1000, 37, dtype=jnp.int32)
  abar = np.asarray(sched.abar, np.float64)[np.asarray(t)]
  snr = abar / (1 - abar)
  gamma = 5.0
  ref = {"eps": np.minimum(snr, gamma) / snr, "x0": np.minimum(snr, gamma),
         "v": np.minimum(snr, gamma) / (snr + 1)}
  for prediction, w in ref.items():
    np.testing.assert_allclose(d.loss_weight(sched, t, prediction, "min_snr", gamma), w,
                               rtol=1e-4)
    np.testing.assert_array_equal(d.loss_weight(sched, t, prediction, "uniform"), 1.0)
  # The defining property: every prediction's weighted MSE is min(snr, gamma) * the x0-MSE.
  rng = np.random.default_rng(1)
  x0, eps, x0_hat = rng.normal(size=(3, t.shape[0], 5)).astype(np.float32)
  x_t = d.q_sample(sched, x0, t, eps)
  x0_mse = np.square(x0_hat - x0).mean(-1)
  for prediction in ("eps", "x0", "v"):
    # the prediction a model would output if its x0 estimate were x0_hat
    pred = d.target(x0_hat, d.eps_from_x0(x0_hat, x_t, t, sched), t, sched, prediction)
    mse = np.square(np.asarray(pred) - np.asarray(d.target(x0, eps, t, sched, prediction)))
    weighted = d.loss_weight(sched, t, prediction, "min_snr", gamma) * mse.mean(-1)
    np.testing.assert_allclose(weighted, np.minimum(snr, gamma) * x0_mse, rtol=2e-3,
                               err_msg=prediction)
  with pytest.raises(ConfigError, match="unknown loss weighting 'snr'; valid: uniform, min_snr"):
    d.loss_weight(sched, t, "eps", "snr")


def test_diffusion_loss_is_zero_for_the_oracle_and_casts_bfloat16():
  sched = d.make_schedule("linear", 50)
  x0 = jnp.zeros((64, 4, 4, 1))
  key = jax.random.key(3)

  # For x0 = 0, x_t = sqrt(1 - abar) eps: an oracle recovers every target from x_t alone.
  def oracle(prediction, dtype=jnp.float32, offset=0.0):
    def model_fn(x_t, t):
      assert x_t.dtype == jnp.float32 and t.dtype == jnp.int32 and t.shape == (64,)
      abar = sched.abar[t][:, None, None, None]
      eps = x_t / jnp.sqrt(1 - abar)
      out = {"eps": eps, "x0": jnp.zeros_like(x_t), "v": jnp.sqrt(abar) * eps}[prediction]
      return (out + offset).astype(dtype)
    return model_fn

  for prediction in ("eps", "x0", "v"):
    loss = d.diffusion_loss(oracle(prediction), sched, x0, key, prediction=prediction)
    assert loss.shape == (64,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, 0.0, atol=1e-9)
  # an error of exactly 1 everywhere: the loss is the weight of the sampled t
  loss = d.diffusion_loss(oracle("x0", jnp.bfloat16, 1.0), sched, x0, key, prediction="x0",
                          weighting="min_snr", gamma=2.0)
  assert loss.dtype == jnp.float32
  table = np.asarray(d.loss_weight(sched, jnp.arange(50), "x0", "min_snr", 2.0))
  assert all(np.isclose(table, w, rtol=1e-6).any() for w in np.asarray(loss))
  assert len(np.unique(np.asarray(loss))) > 5  # t is drawn per example

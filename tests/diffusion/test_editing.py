"""Inpainting, img2img, DDIM inversion and interpolation with the exact Gaussian denoiser."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as d
from jaxgen.distributions import slerp
from jaxgen.errors import ConfigError
from tests.diffusion.gaussian import eps_star_np, exact_denoiser

M, S = np.array([1.0, -2.0]), 0.5
LINEAR = d.make_schedule("linear")
# 100 steps that end as noisy as Ho et al.'s 1000 (abar_T ~ 4e-5), so x_T ~ N(0, I) is right
SMALL = d.make_schedule("linear", 100, beta_start=1e-3, beta_end=0.2)


@pytest.mark.parametrize("sampler", d.SAMPLERS)
def test_inpaint_keeps_known_pixels_exactly(sampler):
  key_x, key_mask, key = jax.random.split(jax.random.key(0), 3)
  x_known = 0.5 + jax.random.normal(key_x, (128, 4, 4, 1))
  mask = (jax.random.uniform(key_mask, (128, 4, 4, 1)) < 0.5).astype(jnp.float32)
  den = exact_denoiser(SMALL, 0.5, 1.0)
  x = d.inpaint(den, SMALL, key, x_known, mask, sampler=sampler, num_steps=100)
  known = np.asarray(mask) == 1
  np.testing.assert_array_equal(np.asarray(x)[known], np.asarray(x_known)[known])
  # independent pixels: the filled ones are draws from the data distribution N(0.5, 1)
  filled = np.asarray(x)[~known]
  assert abs(filled.mean() - 0.5) < 0.12 and abs(filled.std() - 1.0) < 0.1
  assert not np.any(np.isclose(filled, np.asarray(x_known)[~known]))


def test_img2img_strength_controls_how_far_the_result_moves():
  den = exact_denoiser(LINEAR, M, S)
  x0 = M + S * jax.random.normal(jax.random.key(1), (512, 2))
  err = {}
  for strength in (0.02, 0.3, 1.0):
    x, traj = d.img2img(den, LINEAR, jax.random.key(2), x0, strength, num_steps=50,
                        return_trajectory=True)
    assert traj.shape[0] == max(1, int(50 * strength)) + 1
    err[strength] = float(jnp.abs(x - x0).mean())
  # strength near 0: one step from t = 19 (abar = 0.994) gives back E[x0 | x_t] ~ x0
  assert err[0.02] < 0.06 < err[0.3] < err[1.0]
  # strength 1 forgets x0: the mean error of independent draws, 2 s / sqrt(pi) per coordinate
  assert abs(err[1.0] - 2 * S / np.sqrt(np.pi)) < 0.07
  for bad in (0, 0.0, -0.1, 1.5):
    with pytest.raises(ConfigError, match=rf"img2img strength must be a number in \(0, 1\], "
                                          rf"got {bad}"):
      d.img2img(den, LINEAR, jax.random.key(2), x0, bad)


def test_one_inversion_step_is_ddim_run_backwards():
  x0 = np.random.default_rng(3).normal(size=(3, 2)).astype(np.float32)
  ts = [999, 666, 332]
  got, traj = d.ddim_invert(exact_denoiser(LINEAR, M, S), LINEAR, x0,
                            timesteps=jnp.array(ts), return_trajectory=True)
  abar = np.asarray(LINEAR.abar, np.float64)
  x, ref = x0.astype(np.float64), [x0]
  for s, t in ((-1, 332), (332, 666), (666, 999)):
    a_s, a_t = (abar[s] if s >= 0 else 1.0), abar[t]
    eps = eps_star_np(x, a_t, M, S)  # the model at the current x and the target t
    x = np.sqrt(a_t) * (x - np.sqrt(1 - a_s) * eps) / np.sqrt(a_s) + np.sqrt(1 - a_t) * eps
    ref.append(x)
  np.testing.assert_allclose(traj, np.stack(ref), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got, traj[-1])


def test_ddim_inversion_then_decoding_reconstructs_the_data():
  den = exact_denoiser(LINEAR, M, S)
  x0 = M + S * jax.random.normal(jax.random.key(4), (1024, 2))
  errors = []
  for num_steps in (50, 100):
    x_T = d.ddim_invert(den, LINEAR, x0, num_steps)
    rec = d.sample(den, LINEAR, jax.random.key(0), None, num_steps=num_steps, x_T=x_T)
    errors.append(float(jnp.abs(rec - x0).mean()))
    # the inverted codes look like the prior N(0, I)
    assert abs(float(x_T.mean())) < 0.1 and abs(float(x_T.std()) - 1.0) < 0.05
  assert errors[0] < 0.1 and errors[1] < 0.6 * errors[0]  # first-order: error ~ 1 / num_steps
  with pytest.raises(ConfigError, match=r"num_steps must be an int in \[1, 1000\]"):
    d.ddim_invert(den, LINEAR, x0, 2000)


def test_interpolate_runs_from_a_to_b():
  den = exact_denoiser(LINEAR, M, S)
  x_a, x_b = jnp.array([1.4, -2.3]), jnp.array([0.7, -1.6])
  path = d.interpolate(den, LINEAR, x_a, x_b, 5, num_steps=100)
  assert path.shape == (5, 2)
  np.testing.assert_allclose(path[0], x_a, atol=0.1)  # inversion error ~ |x - m| / num_steps
  np.testing.assert_allclose(path[-1], x_b, atol=0.1)
  # the inner points decode the slerp of the two inverted codes
  z = d.ddim_invert(den, LINEAR, jnp.stack([x_a, x_b]), 100)
  z_mid = slerp(z[0], z[1], jnp.array([0.25, 0.5, 0.75]))
  mid = d.sample(den, LINEAR, jax.random.key(5), None, num_steps=100, x_T=z_mid)
  np.testing.assert_allclose(path[1:-1], mid, rtol=1e-5, atol=1e-5)

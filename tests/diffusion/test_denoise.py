"""Denoising a given noisy picture: the noise estimator on images of known noise (and against
scikit-image's), the step that matches a noise level, the reverse process from there with the
exact denoiser of Gaussian data (DDIM keeps the data's spread; the mean of ancestral draws is the
posterior mean), and the user-facing pipeline and command (padding, grouping, errors)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as d
from jaxgen.errors import ConfigError, ShapeError
from jaxgen.images import estimate_noise_sigma
from tests.diffusion.gaussian import exact_denoiser

LINEAR = d.make_schedule("linear")


def _smooth_images(n, size=64, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = []
  for _ in range(n):
    a, b, c = rng.uniform(0.2, 0.8, 3)
    img = 0.5 + 0.3 * np.sin(2 * np.pi * (a * xx + b * yy) + c)
    out.append(np.repeat(img[..., None], channels, -1))
  return np.stack(out)


@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1, 0.2])
def test_noise_estimate_on_images_of_known_noise(sigma):
  clean = _smooth_images(6)
  noisy = clean + sigma * np.random.default_rng(1).normal(size=clean.shape)
  est = estimate_noise_sigma(noisy)  # values outside [0, 1] are kept: no clipping bias here
  np.testing.assert_allclose(est, sigma, rtol=0.08)
  assert np.all(estimate_noise_sigma(clean) < 0.004)  # smooth content barely registers


def test_noise_estimate_agrees_with_scikit_image():
  restoration = pytest.importorskip("skimage.restoration")
  pytest.importorskip("pywt")
  noise = 0.1 * np.random.default_rng(2).normal(size=(3, 64, 64, 1)) + 0.5
  ours = estimate_noise_sigma(noise)
  ref = [restoration.estimate_sigma(im[..., 0]) for im in noise]  # Daubechies-2, same rule
  np.testing.assert_allclose(ours, ref, rtol=0.06)
  with pytest.raises(ShapeError, match="too small"):
    estimate_noise_sigma(np.zeros((1, 1, 5, 3)))


def test_timestep_for_sigma_and_the_grid():
  abar = np.asarray(LINEAR.abar, np.float64)
  for t in (0, 57, 400, 999):
    assert d.timestep_for_sigma(LINEAR, float(np.sqrt((1 - abar[t]) / abar[t]))) == t
  assert d.denoising_timesteps(30, 10).tolist() == [30, 27, 23, 20, 17, 13, 10, 7, 3, 0]
  assert d.denoising_timesteps(3, 10).tolist() == [3, 2, 1, 0]
  with pytest.raises(ConfigError, match="must be positive"):
    d.timestep_for_sigma(LINEAR, 0.0)


def test_reverse_process_from_the_matched_level_on_gaussian_data():
  """x0 ~ N(m, s^2), y = x0 + sigma eps with sigma exactly the ratio at t = 200. The ODE (DDIM)
  maps the noisy marginal onto the data's: same mean and spread s. The mean of ancestral draws
  estimates E[x0 | y] = m + s^2 / (s^2 + sigma^2) (y - m)."""
  m, s = np.array([0.5, -0.5]), 0.4
  abar = np.asarray(LINEAR.abar, np.float64)
  sigma = float(np.sqrt((1 - abar[200]) / abar[200]))
  t = d.timestep_for_sigma(LINEAR, sigma)
  rng = np.random.default_rng(3)
  x0 = m + s * rng.normal(size=(4096, 2))
  y = (x0 + sigma * rng.normal(size=x0.shape)).astype(np.float32)
  den = exact_denoiser(LINEAR, m, s)
  ts = d.denoising_timesteps(t, 50)
  ode = np.asarray(d.denoise(den, LINEAR, jax.random.key(0), y, ts))
  np.testing.assert_allclose(ode.mean(0), m, atol=0.02)
  np.testing.assert_allclose(ode.std(0), s, rtol=0.04)
  yy = y[:64]
  mean = np.asarray(jax.jit(lambda k: d.denoise(den, LINEAR, k, yy, ts, draws=256,
                                                sampler="ddpm"))(jax.random.key(1)))
  post = m + s ** 2 / (s ** 2 + sigma ** 2) * (yy - m)
  post_std = s * sigma / np.sqrt(s ** 2 + sigma ** 2)
  assert np.abs(mean - post).max() < 5 * post_std / np.sqrt(256)
  mse = lambda a: float(np.mean((a - x0[:64]) ** 2))
  assert mse(mean) < mse(ode[:64]) and mse(mean) < mse(yy)  # the posterior mean: least squares


def test_pipeline_pads_groups_and_refuses_clearly():
  from jaxgen.models.unet import UNet
  from jaxgen.pipelines import diffusion as pipe
  unet = UNet(out_channels=1, block_channels=(8, 16), layers_per_block=1,
              attn_levels=(False, True), num_heads=2, groups=4)
  model = pipe.DiffusionModel(unet, (8, 8, 1), num_timesteps=100)
  params = unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
  x = np.random.default_rng(4).uniform(size=(3, 9, 7, 1))
  out, sig = pipe.denoise(model, params, x, jax.random.key(1), sigma=[0.1, 0.1, 0.3], steps=4)
  assert out.shape == x.shape and np.all((out >= 0) & (out <= 1))
  np.testing.assert_allclose(sig, [0.1, 0.1, 0.3])
  size = pipe._denoise._cache_size()
  pipe.denoise(model, params, x, jax.random.key(1), sigma=0.12, steps=4)  # new level, no compile
  assert pipe._denoise._cache_size() == size + 1  # one more batch size (3 at once)
  pipe.denoise(model, params, x, jax.random.key(1), sigma=0.15, steps=4)
  assert pipe._denoise._cache_size() == size + 1  # a new noise level: the same program
  est_out, est = pipe.denoise(model, params, x, jax.random.key(2), steps=4)
  assert est.shape == (3,) and np.all(est > 0.1)  # uniform noise pictures: lots of "noise"
  with pytest.raises(ShapeError, match=r"this model's channels"):
    pipe.denoise(model, params, np.zeros((1, 8, 8, 3)), jax.random.key(0), sigma=0.1)
  with pytest.raises(ConfigError, match="sigma must be positive"):
    pipe.denoise(model, params, np.zeros((1, 8, 8, 1)), jax.random.key(0), sigma=0.0)
  with pytest.raises(ShapeError, match="too small"):
    pipe.denoise(model, params, np.zeros((1, 1, 8, 1)), jax.random.key(0), sigma=0.1)
  with pytest.raises(ConfigError, match="draws must be a positive int"):
    pipe.denoise(model, params, x, jax.random.key(0), sigma=0.1, draws=0)


def test_latent_model_denoises_through_its_autoencoder(tmp_path):
  """The latent path on a small random text-to-image model: the latent noise level is measured by
  re-encoding with fresh pixel noise, grows with the pixel noise, and picks the step; pictures
  come back decoded at their size."""
  pytest.importorskip("diffusers")
  from jaxgen.app import restore_run
  from jaxgen.cli import main
  from jaxgen.pipelines import text_to_image as t2i
  from tests.convert.test_stable_diffusion import tiny_pipeline
  tiny_pipeline(tmp_path, False)
  main(["import", "--diffusers", str(tmp_path / "sd"), "--workdir", str(tmp_path / "run")])
  run = restore_run(tmp_path / "run")
  x = np.clip(_smooth_images(2, size=16) + 0.1 * np.random.default_rng(5).normal(
      size=(2, 16, 16, 3)), 0, 1)
  out, sig, sig_z = t2i.denoise(run.task.model, run.params, run.model_state, x,
                                jax.random.key(0), steps=4)
  assert out.shape == x.shape and np.all((out >= 0) & (out <= 1))
  np.testing.assert_allclose(sig, 0.1, rtol=0.25)  # estimated on 16x16 pictures
  _, _, more = t2i.denoise(run.task.model, run.params, run.model_state, x, jax.random.key(0),
                           sigma=0.4, steps=4)
  assert np.all(sig_z > 0) and np.all(more > sig_z)
  with pytest.raises(ShapeError, match="multiples of"):
    t2i.denoise(run.task.model, run.params, run.model_state, x[:, :15], jax.random.key(0),
                sigma=0.1)
  from PIL import Image
  Image.fromarray((x[0] * 255).astype(np.uint8)).save(tmp_path / "noisy.png")
  main(["denoise", "--workdir", str(tmp_path / "run"), "--image", str(tmp_path / "noisy.png"),
        "--prompt", "a red photo", "--steps", "2", "--outdir", str(tmp_path / "clean")])
  assert (tmp_path / "clean" / "noisy_denoised.png").is_file()

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config
from jaxgen.commands import evaluate_autoencoder
from jaxgen.data import heldout_images
from jaxgen.errors import ShapeError
from jaxgen.eval.image_metrics import psnr
from jaxgen.pipelines import autoencoder as pipe
from jaxgen.tasks.vae import AutoencoderTask


@pytest.fixture(scope="module")
def vae():
  task = AutoencoderTask(config("vae"))
  x = heldout_images(task.config.data, 8)
  params, _ = task.init(jax.random.PRNGKey(0), {"image": x})
  return task, params, x


def test_wrong_image_shape_is_a_clear_error(vae):
  task, params, x = vae
  with pytest.raises(ShapeError, match=r"expected shape \[batch, 28, 28, 1\] \(NHWC\), got "
                                       r"\[2, 1, 28, 28\]"):
    pipe.reconstruct(task.model, params, jnp.zeros((2, 1, 28, 28)))
  with pytest.raises(ShapeError, match=r"latents: expected shape \[batch, 4\]"):
    pipe.decode(task.model, params, jnp.zeros((2, 5)))


def test_interpolation_ends_are_the_reconstructions(vae):
  task, params, x = vae
  recon = pipe.reconstruct(task.model, params, x[:2])
  for method in ("lerp", "slerp"):
    path = pipe.interpolate(task.model, params, x[0], x[1], 5, method)
    assert path.shape == (5, 28, 28, 1)
    np.testing.assert_allclose(path[0], recon[0], atol=1e-5)
    np.testing.assert_allclose(path[-1], recon[1], atol=1e-5)


def test_prior_samples_are_images_and_depend_on_the_key(vae):
  task, params, _ = vae
  a = pipe.sample_prior(task.model, params, jax.random.PRNGKey(1), 3)
  b = pipe.sample_prior(task.model, params, jax.random.PRNGKey(2), 3)
  assert a.shape == (3, 28, 28, 1) and float(a.min()) >= 0 and float(a.max()) <= 1
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, pipe.sample_prior(task.model, params, jax.random.PRNGKey(1), 3))


def test_evaluate_agrees_with_an_independent_recomputation(vae):
  task, params, x = vae
  metrics = evaluate_autoencoder(task, params, {}, jax.random.PRNGKey(0), limit=20)
  data = heldout_images(task.config.data, 20)
  recon = np.asarray(pipe.reconstruct(task.model, params, data))
  ref_psnr = np.mean([10 * np.log10(1 / np.mean((data[i] / 255.0 - recon[i]) ** 2))
                      for i in range(20)])
  assert metrics["num_images"] == 20
  assert metrics["psnr"] == pytest.approx(ref_psnr, rel=1e-4)
  assert metrics["neg_elbo"] == pytest.approx(metrics["nll"] + metrics["kl"], rel=1e-5)
  assert 0 < metrics["ssim"] < 1
  assert float(psnr(data / 255.0, recon).mean()) == pytest.approx(ref_psnr, rel=1e-4)
  # 1 / std of the sampled latents, the noise integrated out: E[z^2] = mean^2 + var.
  mean, logvar = (np.asarray(a, np.float64) for a in pipe.encode(task.model, params, data))
  var = (mean ** 2 + np.exp(logvar)).mean() - mean.mean() ** 2
  assert metrics["latent_scale_heldout"] == pytest.approx(1 / np.sqrt(var), rel=1e-4)
  assert "latent_scale" not in metrics  # no running statistics in an empty model_state

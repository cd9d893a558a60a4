import numpy as np
import pytest
from skimage.metrics import structural_similarity

from jaxgen.eval.image_metrics import psnr, ssim


def test_psnr_matches_its_formula():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(3, 8, 8, 1))
  y = np.clip(x + rng.normal(scale=0.05, size=x.shape), 0, 1)
  mse = ((x - y) ** 2).reshape(3, -1).mean(1)
  np.testing.assert_allclose(psnr(x, y), 10 * np.log10(1.0 / mse), rtol=1e-5)
  np.testing.assert_allclose(psnr(255 * x, 255 * y, data_range=255.0), 10 * np.log10(1 / mse),
                             rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_scikit_image(channels):
  rng = np.random.default_rng(channels)
  x = rng.uniform(size=(2, 28, 28, channels)).astype(np.float32)
  x = (x + np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2)) / 3  # some structure
  y = np.clip(x + rng.normal(scale=0.1, size=x.shape), 0, 1).astype(np.float32)
  ref = [structural_similarity(x[i], y[i], data_range=1.0, channel_axis=-1,
                               gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
         for i in range(2)]
  np.testing.assert_allclose(ssim(x, y), ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ssim(x, x), 1.0, rtol=1e-5)

"""PSNR and SSIM between image batches [B, H, W, C] with values in [0, data_range]."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(x, y, data_range: float = 1.0) -> jax.Array:
  """Per-image PSNR in dB, 10 log10(range^2 / MSE). [B, H, W, C] -> [B]."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  mse = jnp.mean((x - y) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-20))


def _gaussian_window(size: int, sigma: float) -> jax.Array:
  r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  g = jnp.exp(-0.5 * (r / sigma) ** 2)
  return g / g.sum()


def _filter(x, window):
  """Separable 'valid' filtering of each channel: [B, H, W, C] -> [B, H-k+1, W-k+1, C]."""
  b, h, w, c = x.shape
  k = window.shape[0]
  x = jnp.moveaxis(x, -1, 1).reshape(b * c, 1, h, w)
  dn = ("NCHW", "OIHW", "NCHW")
  x = jax.lax.conv_general_dilated(x, window.reshape(1, 1, k, 1), (1, 1), "VALID",
                                   dimension_numbers=dn)
  x = jax.lax.conv_general_dilated(x, window.reshape(1, 1, 1, k), (1, 1), "VALID",
                                   dimension_numbers=dn)
  return jnp.moveaxis(x.reshape(b, c, h - k + 1, w - k + 1), 1, -1)


def ssim(x, y, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Per-image mean SSIM (Wang et al. 2004) with a Gaussian window. [B, H, W, C] -> [B]."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  if min(x.shape[1:3]) < window_size:
    raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}; got "
                     f"{x.shape[1:3]}")
  win = _gaussian_window(window_size, sigma)
  mu_x, mu_y = _filter(x, win), _filter(y, win)
  var_x = _filter(x * x, win) - mu_x ** 2
  var_y = _filter(y * y, win) - mu_y ** 2
  cov = _filter(x * y, win) - mu_x * mu_y
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
      (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return jnp.mean(s, axis=(1, 2, 3))

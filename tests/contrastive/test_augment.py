"""Augmentations against NumPy / scipy / colorsys references written from torchvision's docs."""
import colorsys
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxgen.contrastive import augment as A
from jaxgen.errors import ShapeError

KEY = jax.random.PRNGKey(0)


def images(*shape, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def ramp(h=16, w=16, c=3):
  """A linear image: bilinear resampling reproduces it exactly away from the borders."""
  y, x, ch = np.meshgrid(np.arange(h), np.arange(w), np.arange(c), indexing="ij")
  return (0.02 * y + 0.01 * x + 0.1 * ch).astype(np.float32)


def luma(x):
  return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def test_simclr_views_shapes_range_keys_and_traced_parameters():
  f = jax.jit(A.two_views, static_argnames=("size", "blur"))
  x = images(6, 16, 16, 3)
  paper = dict(strength=1.0, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5,
               jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0))
  defaults = inspect.signature(A.simclr_augment).parameters
  assert {k: defaults[k].default for k in paper} == paper  # Chen et al. 2020, appendix A
  v1, v2 = f(KEY, x, size=12, **paper)
  assert v1.shape == v2.shape == (6, 12, 12, 3) and v1.dtype == jnp.float32
  for v in (v1, v2):
    assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
  assert not np.allclose(v1, v2)
  assert not np.allclose(v1[0], v1[1])  # one key per image
  np.testing.assert_array_equal(v1, f(KEY, x, size=12, **paper)[0])
  assert not np.allclose(v1, f(jax.random.PRNGKey(1), x, size=12, **paper)[0])
  # Every probability and strength at its identity value (and a crop of the whole image): the
  # recipe is a plain resize, and changing the values reuses the compiled program.
  identity = dict(strength=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                  jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, blur_sigma=(0.1, 2.0))
  u1, u2 = f(KEY, x, size=12, **identity)
  np.testing.assert_allclose(u1, u2, atol=1e-6)
  resized = jax.image.resize(x, (6, 12, 12, 3), "linear", antialias=True)
  np.testing.assert_allclose(u1, resized, atol=1e-5)
  assert f._cache_size() == 1


def test_grayscale_images_and_bad_channels():
  x = images(3, 20, 24, 1)
  y = jax.jit(A.simclr_augment, static_argnames=("size", "blur"))(KEY, x, size=8)
  assert y.shape == (3, 8, 8, 1)
  assert float(y.min()) >= 0 and float(y.max()) <= 1 and not np.allclose(y[0], y[1])
  with pytest.raises(ShapeError, match="C = 1 or 3"):
    A.simclr_augment(KEY, images(2, 8, 8, 2), size=8)


def test_random_resized_crop_identity_and_geometry():
  crop = jax.jit(A.random_resized_crop, static_argnames=("size",))
  x = images(16, 16, 3)
  same = crop(KEY, x, size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(same, x, atol=1e-6)
  r = ramp()
  tops = set()
  for i in range(4):
    # A quarter of the area, square: an 8x8 box anywhere, resampled 1:1.
    y = np.asarray(crop(jax.random.PRNGKey(i), r, size=8, scale=(0.25, 0.25), ratio=(1.0, 1.0)))
    np.testing.assert_allclose(np.diff(y, axis=0), 0.02, atol=1e-5)
    np.testing.assert_allclose(np.diff(y, axis=1), 0.01, atol=1e-5)
    corner = float(y[0, 0, 0])  # 0.02 top + 0.01 left, top and left in [0, 8]
    assert -1e-5 <= corner <= 0.02 * 8 + 0.01 * 8 + 1e-5
    tops.add(round(corner, 4))
  assert len(tops) > 1
  # aspect = width / height: ratio 2 at half the area is a box 8 rows x 16 columns.
  y = np.asarray(crop(KEY, r, size=(8, 16), scale=(0.5, 0.5), ratio=(2.0, 2.0)))
  np.testing.assert_allclose(np.diff(y, axis=0), 0.02, atol=1e-5)
  np.testing.assert_allclose(y[:, 0, 0] - 0.02 * np.arange(8), y[0, 0, 0], atol=1e-5)
  np.testing.assert_allclose(y[0, :, 0], 0.01 * np.arange(16) + y[0, 0, 0], atol=1e-5)


def test_flip_and_grayscale():
  x = images(5, 7, 3)
  np.testing.assert_array_equal(A.horizontal_flip(KEY, x, p=1.0), x[:, ::-1])
  np.testing.assert_array_equal(A.horizontal_flip(KEY, x, p=0.0), x)
  grey = np.repeat(luma(x)[..., None], 3, axis=-1)
  np.testing.assert_allclose(A.random_grayscale(KEY, x, p=1.0), grey, atol=1e-6)
  np.testing.assert_array_equal(A.random_grayscale(KEY, x, p=0.0), x)
  g = images(5, 7, 1)
  np.testing.assert_array_equal(A.random_grayscale(KEY, g, p=1.0), g)
  flips = [bool(np.array_equal(A.horizontal_flip(jax.random.PRNGKey(i), x), x[:, ::-1]))
           for i in range(40)]
  assert 8 < sum(flips) < 32  # p = 0.5


@pytest.mark.parametrize("factor", [0.0, 0.4, 1.0, 1.7])
def test_brightness_contrast_saturation_match_torchvision_definitions(factor):
  x = images(6, 5, 3)
  clamp = lambda v: np.clip(v, 0.0, 1.0)
  np.testing.assert_allclose(A.adjust_brightness(x, factor), clamp(factor * x), atol=1e-6)
  mean = luma(x).mean()
  np.testing.assert_allclose(A.adjust_contrast(x, factor),
                             clamp(factor * x + (1 - factor) * mean), atol=1e-6)
  grey = luma(x)[..., None]
  np.testing.assert_allclose(A.adjust_saturation(x, factor),
                             clamp(factor * x + (1 - factor) * grey), atol=1e-6)
  g = images(6, 5, 1)
  np.testing.assert_allclose(A.adjust_contrast(g, factor),
                             clamp(factor * g + (1 - factor) * g.mean()), atol=1e-6)
  np.testing.assert_array_equal(A.adjust_saturation(g, factor), g)


def test_hue_matches_colorsys():
  x = images(6, 5, 3)
  x[0, 0] = [0.3, 0.3, 0.3]  # grey: hue undefined, must stay grey
  for delta in (0.0, 0.13, -0.4):
    ref = np.array([colorsys.hsv_to_rgb((h + delta) % 1.0, s, v) for h, s, v in
                    (colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3))]).reshape(x.shape)
    np.testing.assert_allclose(A.adjust_hue(x, delta), ref, atol=1e-5)
  hsv = np.array([colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)]).reshape(x.shape)
  np.testing.assert_allclose(A.rgb_to_hsv(jnp.asarray(x)), hsv, atol=1e-5)
  g = images(6, 5, 1)
  np.testing.assert_array_equal(A.adjust_hue(g, 0.3), g)


def test_color_jitter_identity_probability_and_bounds():
  jitter = jax.jit(A.color_jitter)
  x = images(6, 5, 3)
  off = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p=1.0)
  strong = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, p=1.0)
  np.testing.assert_allclose(jitter(KEY, x, **off), x, atol=1e-5)
  np.testing.assert_array_equal(jitter(KEY, x, **dict(strong, p=0.0)), x)
  assert not np.allclose(jitter(KEY, x, **strong), x)
  for i in range(5):
    # Brightness alone: one factor in [0.5, 1.5] scales every (unclamped) pixel.
    y = np.asarray(jitter(jax.random.PRNGKey(i), x * 0.5, **dict(off, brightness=0.5)))
    ratio = y / (x * 0.5)
    assert 0.5 - 1e-5 <= ratio.min() and ratio.max() <= 1.5 + 1e-5
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)
  assert jitter._cache_size() == 1


def test_blur_matches_scipy_in_the_interior_and_tiny_sigma_is_identity():
  x = images(20, 18, 3)
  for sigma, taps in ((1.3, 7), (0.6, 3), (2.0, 9)):
    r = taps // 2
    ref = ndimage.gaussian_filter(x.astype(np.float64), sigma, radius=r, axes=(0, 1))
    np.testing.assert_allclose(np.asarray(A.blur(x, sigma, taps))[r:-r, r:-r], ref[r:-r, r:-r],
                               atol=1e-5)
  fixed = A.gaussian_blur(KEY, x, sigma_range=(1.3, 1.3), kernel_fraction=0.35)  # 7 taps
  np.testing.assert_allclose(fixed, A.blur(x, 1.3, 7), atol=1e-6)
  np.testing.assert_allclose(A.gaussian_blur(KEY, x, sigma_range=(1e-3, 1e-3)), x, atol=1e-6)
  np.testing.assert_array_equal(A.gaussian_blur(KEY, x, p=0.0), x)
  assert (A.blur_kernel_size(224), A.blur_kernel_size(32), A.blur_kernel_size(96)) == (23, 3, 9)
  with pytest.raises(ShapeError, match="odd"):
    A.blur(x, 1.0, 4)

"""SimCLR-style image augmentations as pure, jittable JAX functions on one [H, W, C] image.

Every random op is `(key, image, **params) -> image` on a float32 image in [0, 1] with C = 1 or 3;
`batch_apply` vmaps one over a batch with a key per image. Probabilities and strengths are plain
arguments that may be traced arrays, so changing them never recompiles; only output sizes and
kernel sizes (shapes) are static.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxgen.errors import ShapeError

# ITU-R BT.601 luma weights (PIL's "L" conversion).
LUMA = (0.299, 0.587, 0.114)


def _pair(size) -> tuple[int, int]:
  return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_image(image) -> jax.Array:
  image = jnp.asarray(image, jnp.float32)
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ShapeError(f"expected one image [H, W, C] with C = 1 or 3, got shape {image.shape}")
  return image


def _maybe(key, p, new, old):
  """`new` with probability p, else `old` (p may be traced)."""
  return jnp.where(jax.random.bernoulli(key, p), new, old)


def batch_apply(fn: Callable, key: jax.Array, images, *args, **kwargs) -> jax.Array:
  """Applies `fn(key, image, *args, **kwargs)` to each image of [B, H, W, C], one key each."""
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ShapeError(f"expected a batch of images [B, H, W, C], got shape {images.shape}")
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: fn(k, x, *args, **kwargs))(keys, images)


# ----------------------------------------------------------------------------------- geometry


def crop_and_resize(image, top, left, height, width, size) -> jax.Array:
  """Bilinear (antialiased when shrinking) resample of the box [top, top+height) x
  [left, left+width) in pixel-edge coordinates (may be fractional) to `size`."""
  image = _check_image(image)
  out_h, out_w = _pair(size)
  sy, sx = out_h / height, out_w / width
  scale = jnp.stack([sy, sx]).astype(jnp.float32)
  translation = jnp.stack([-top * sy, -left * sx]).astype(jnp.float32)
  out = jax.image.scale_and_translate(image, (out_h, out_w, image.shape[-1]), (0, 1), scale,
                                      translation, method="linear", antialias=True)
  return jnp.clip(out, 0.0, 1.0)


def random_resized_crop(key, image, *, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        attempts: int = 10) -> jax.Array:
  """torchvision's RandomResizedCrop: area fraction ~ U(scale), log aspect ~ U(log ratio).

  Like torchvision, up to `attempts` boxes are drawn and the first that fits is used, else the
  whole image with its aspect clamped to `ratio`, centred. Unlike torchvision the box is not
  rounded to whole pixels: the resampler handles fractional boxes, and shapes stay static.
  """
  image = _check_image(image)
  h, w = image.shape[0], image.shape[1]
  scale = jnp.asarray(scale, jnp.float32)
  log_ratio = jnp.log(jnp.asarray(ratio, jnp.float32))
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1]) * (h * w)
  aspect = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=log_ratio[0],
                                      maxval=log_ratio[1]))
  cw, ch = jnp.sqrt(area * aspect), jnp.sqrt(area / aspect)
  fits = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
  first = jnp.argmax(fits)
  found = jnp.any(fits)
  # Fallback box: the whole image, narrowed to the nearest allowed aspect ratio.
  lo, hi = jnp.exp(log_ratio[0]), jnp.exp(log_ratio[1])
  in_ratio = w / h
  fw = jnp.where(in_ratio > hi, h * hi, float(w))
  fh = jnp.where(in_ratio < lo, w / lo, float(h))
  cw = jnp.where(found, cw[first], fw)
  ch = jnp.where(found, ch[first], fh)
  u_top = jnp.where(found, jax.random.uniform(k_top), 0.5)
  u_left = jnp.where(found, jax.random.uniform(k_left), 0.5)
  return crop_and_resize(image, u_top * (h - ch), u_left * (w - cw), ch, cw, size)


def horizontal_flip(key, image, *, p=0.5) -> jax.Array:
  """Mirrors left-right with probability p."""
  image = _check_image(image)
  return _maybe(key, p, image[:, ::-1], image)


# --------------------------------------------------------------------------------- colour ops
# Written from torchvision's documented definitions: each op blends the image with a
# degenerate image (black, mean grey, grayscale) by a factor and clamps to [0, 1].


def rgb_to_grayscale(image) -> jax.Array:
  """[H, W, 3] -> [H, W, 1] luma (ITU-R 601); a 1-channel image is returned as is."""
  image = _check_image(image)
  if image.shape[-1] == 1:
    return image
  return jnp.tensordot(image, jnp.asarray(LUMA, jnp.float32), axes=([-1], [0]))[..., None]


def _blend(image, other, factor):
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor) -> jax.Array:
  """factor * image, clamped (0 gives black, 1 the image)."""
  return _blend(_check_image(image), 0.0, factor)


def adjust_contrast(image, factor) -> jax.Array:
  """Blend with the image's mean grey level (mean of its grayscale) by `factor`."""
  image = _check_image(image)
  return _blend(image, jnp.mean(rgb_to_grayscale(image)), factor)


def adjust_saturation(image, factor) -> jax.Array:
  """Blend with the image's own grayscale by `factor`. A no-op on 1-channel images."""
  image = _check_image(image)
  if image.shape[-1] == 1:
    return image
  return _blend(image, rgb_to_grayscale(image), factor)


def rgb_to_hsv(image) -> jax.Array:
  """[..., 3] RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn, as in colorsys)."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  maxc, minc = jnp.max(image, axis=-1), jnp.min(image, axis=-1)
  delta = maxc - minc
  grey = delta <= 0
  # Safe divisors: grey pixels have undefined hue and zero saturation.
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  d = jnp.where(grey, 1.0, delta)
  rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
  h = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(grey, 0.0, jnp.mod(h / 6.0, 1.0))
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv) -> jax.Array:
  """Inverse of `rgb_to_hsv`, in the closed form f(n) = V - V S max(0, min(k, 4 - k, 1))."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]

  def channel(n):
    k = jnp.mod(n + 6.0 * h, 6.0)
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def adjust_hue(image, delta) -> jax.Array:
  """Rotates the hue by `delta` turns (in [-0.5, 0.5]). A no-op on 1-channel images."""
  image = _check_image(image)
  if image.shape[-1] == 1:
    return image
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + delta, 1.0))
  return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def color_jitter(key, image, *, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                 p=1.0) -> jax.Array:
  """torchvision's ColorJitter, applied with probability p.

  Factors: brightness, contrast and saturation ~ U(max(0, 1 - x), 1 + x), hue shift ~
  U(-hue, hue); the four ops run in a random order, as in torchvision.
  """
  image = _check_image(image)
  k_apply, k_order, kb, kc, ks, kh = jax.random.split(key, 6)

  def factor(k, x):
    x = jnp.asarray(x, jnp.float32)
    return jax.random.uniform(k, minval=jnp.maximum(0.0, 1.0 - x), maxval=1.0 + x)

  fb, fc, fs = factor(kb, brightness), factor(kc, contrast), factor(ks, saturation)
  hue = jnp.asarray(hue, jnp.float32)
  fh = jax.random.uniform(kh, minval=-hue, maxval=hue)
  ops = [lambda x: adjust_brightness(x, fb), lambda x: adjust_contrast(x, fc),
         lambda x: adjust_saturation(x, fs), lambda x: adjust_hue(x, fh)]
  # One scan over a random permutation: each op is compiled once, whatever the order.
  out, _ = jax.lax.scan(lambda x, i: (jax.lax.switch(i, ops, x), None), image,
                        jax.random.permutation(k_order, 4))
  return _maybe(k_apply, p, out, image)


def random_grayscale(key, image, *, p=0.2) -> jax.Array:
  """With probability p, the luma copied to all channels. A no-op on 1-channel images."""
  image = _check_image(image)
  if image.shape[-1] == 1:
    return image
  grey = jnp.broadcast_to(rgb_to_grayscale(image), image.shape)
  return _maybe(key, p, grey, image)


# --------------------------------------------------------------------------------------- blur


def blur_kernel_size(size: int, fraction: float = 0.1) -> int:
  """Odd kernel size for a blur of `fraction` of the image side, as SimCLR's code derives it:
  k = int(fraction * size), radius k // 2, size 2 * radius + 1 (23 for 224 px, 3 for 32 px)."""
  return 2 * (int(fraction * size) // 2) + 1


def blur(image, sigma, kernel_size: int) -> jax.Array:
  """Separable Gaussian blur with a normalised kernel of `kernel_size` taps (odd, static) and
  reflect padding (as torchvision). `sigma` may be traced."""
  image = _check_image(image)
  if kernel_size % 2 != 1:
    raise ShapeError(f"blur kernel size must be odd, got {kernel_size}")
  radius = kernel_size // 2
  if radius == 0:
    return image
  if radius >= min(image.shape[:2]):
    raise ShapeError(f"blur kernel of {kernel_size} taps is too large for an image of shape "
                     f"{image.shape}")
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * (offsets / jnp.asarray(sigma, jnp.float32)) ** 2)
  weights = weights / jnp.sum(weights)
  h, w = image.shape[:2]
  x = jnp.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
  x = sum(weights[i] * x[i:i + h] for i in range(kernel_size))
  x = jnp.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
  x = sum(weights[i] * x[:, i:i + w] for i in range(kernel_size))
  return jnp.clip(x, 0.0, 1.0)


def gaussian_blur(key, image, *, sigma_range=(0.1, 2.0), kernel_fraction: float = 0.1,
                  p=1.0) -> jax.Array:
  """With probability p, a blur with sigma ~ U(sigma_range) and a kernel of `kernel_fraction`
  of the image height (see `blur_kernel_size`)."""
  image = _check_image(image)
  k_apply, k_sigma = jax.random.split(key)
  lo, hi = sigma_range
  sigma = jax.random.uniform(k_sigma, minval=lo, maxval=hi)
  out = blur(image, sigma, blur_kernel_size(image.shape[0], kernel_fraction))
  return _maybe(k_apply, p, out, image)


# ------------------------------------------------------------------------------------ recipes


def simclr_augment(key, images, *, size, strength=1.0, blur: bool = True,
                   crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter_p=0.8,
                   grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0)) -> jax.Array:
  """SimCLR's augmentation (Chen et al. 2020, appendix A) of a batch [B, H, W, C] ->
  [B, size, size, C]: random resized crop, flip, colour jitter (0.8s, 0.8s, 0.8s, 0.2s) with
  probability 0.8, grayscale 0.2, blur 0.5 (sigma in [0.1, 2], kernel 10% of the side).

  `blur=False` is the paper's CIFAR-10 recipe. Everything but `size` and `blur` may be traced.
  """
  s = jnp.asarray(strength, jnp.float32)
  apply_blur = blur

  def one(key, image):
    k_crop, k_flip, k_jitter, k_grey, k_blur = jax.random.split(key, 5)
    x = random_resized_crop(k_crop, image, size=size, scale=crop_scale, ratio=crop_ratio)
    x = horizontal_flip(k_flip, x, p=flip_p)
    x = color_jitter(k_jitter, x, brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s,
                     hue=0.2 * s, p=jitter_p)
    x = random_grayscale(k_grey, x, p=grayscale_p)
    if apply_blur:
      x = gaussian_blur(k_blur, x, sigma_range=blur_sigma, p=blur_p)
    return x

  return batch_apply(one, key, images)


def two_views(key, images, **kwargs) -> tuple[jax.Array, jax.Array]:
  """The positive pair: two independent `simclr_augment` draws of the same batch."""
  k1, k2 = jax.random.split(key)
  return simclr_augment(k1, images, **kwargs), simclr_augment(k2, images, **kwargs)


"""Jitted functions for a trained autoencoder/VAE: encode, decode, reconstruct, sample, interpolate.

Images go in as uint8 or float in [0, 1], [B, H, W, C], and come out as float in [0, 1].
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxgen.distributions import lerp, slerp
from jaxgen.errors import ShapeError
from jaxgen.models.autoencoder import Autoencoder


@dataclasses.dataclass(frozen=True)
class AutoencoderModel:
  """A module and the likelihood that turns its decoder output into an image (hashable)."""
  module: Autoencoder
  likelihood: str = "bernoulli"  # bernoulli: outputs are logits; gaussian: outputs are means

  @property
  def image_shape(self) -> tuple[int, int, int]:
    m = self.module
    return (m.image_size, m.image_size, m.in_channels)

  @property
  def latent_shape(self) -> tuple[int, ...]:
    return self.module.latent_shape


def check_images(images, expected: tuple[int, ...], what: str = "images") -> None:
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(expected):
    raise ShapeError(f"{what}: expected shape [batch, {', '.join(map(str, expected))}] "
                     f"(NHWC), got {list(images.shape)}.")


def to_unit(images) -> jax.Array:
  """uint8 or [0, 1] float -> float32 in [0, 1]."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def output_to_images(model: AutoencoderModel, out) -> jax.Array:
  if model.likelihood == "bernoulli":
    return jax.nn.sigmoid(out)
  return jnp.clip(out, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def encode(model: AutoencoderModel, params, images):
  """-> (mean, logvar); logvar is None for a deterministic autoencoder."""
  check_images(images, model.image_shape)
  return model.module.apply(params, 2.0 * to_unit(images) - 1.0, method=Autoencoder.encode)


@functools.partial(jax.jit, static_argnums=0)
def decode(model: AutoencoderModel, params, z):
  if tuple(z.shape[1:]) != tuple(model.latent_shape):
    raise ShapeError(f"latents: expected shape [batch, {', '.join(map(str, model.latent_shape))}]"
                     f", got {list(z.shape)}.")
  return output_to_images(model, model.module.apply(params, z, method=Autoencoder.decode))


@functools.partial(jax.jit, static_argnums=0)
def reconstruct(model: AutoencoderModel, params, images):
  """Decodes the posterior mean: the deterministic reconstruction."""
  mean, _ = encode(model, params, images)
  return decode(model, params, mean)


@functools.partial(jax.jit, static_argnums=(0, 3))
def sample_prior(model: AutoencoderModel, params, key, num: int):
  """Decodes `num` latents drawn from the N(0, I) prior."""
  z = jax.random.normal(key, (num,) + tuple(model.latent_shape))
  return decode(model, params, z)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def interpolate(model: AutoencoderModel, params, image_a, image_b, num: int = 10,
                method: str = "slerp"):
  """Decodes `num` latents on the path between the posterior means of two images [H, W, C]."""
  if method not in ("lerp", "slerp"):
    raise ValueError(f"method must be 'lerp' or 'slerp', got {method!r}")
  mean, _ = encode(model, params, jnp.stack([image_a, image_b]))
  t = jnp.linspace(0.0, 1.0, num)
  z = (slerp if method == "slerp" else lerp)(mean[0], mean[1], t)
  return decode(model, params, z)

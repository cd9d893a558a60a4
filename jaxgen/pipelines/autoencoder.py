"""Jitted functions for a trained autoencoder/VAE: encode, decode, reconstruct, sample, interpolate.

Images go in as uint8 or float in [0, 1], [B, H, W, C], and come out as float in [0, 1].
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.distributions import lerp, slerp
from jaxgen.errors import ShapeError
from jaxgen.images import check_images, map_batches, to_signed, to_unit
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


def output_to_images(model: AutoencoderModel, out) -> jax.Array:
  if model.likelihood == "bernoulli":
    return jax.nn.sigmoid(out)
  return jnp.clip(out, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def encode(model: AutoencoderModel, params, images):
  """-> (mean, logvar); logvar is None for a deterministic autoencoder."""
  check_images(images, model.image_shape)
  return model.module.apply(params, to_signed(images), method=Autoencoder.encode)


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


def latent_scale(model_state) -> jax.Array:
  """1 / std of the latents, the factor latent diffusion multiplies them by to give them unit
  variance (Stable Diffusion's scaling_factor: 0.18215 for SD 1.x's VAE). Pure and jittable;
  float() it on the host. model_state holds the vae task's running {"latent_stats"}."""
  return jax.lax.rsqrt(jnp.asarray(model_state["latent_stats"]["var"], jnp.float32))


def latent_stats_for_scale(scale: float, mean: float = 0.0) -> dict:
  """latent_stats whose latent_scale() is `scale` (e.g. for imported weights with a published
  scaling factor)."""
  return {"mean": jnp.float32(mean), "var": jnp.float32(1.0 / scale ** 2)}


@functools.partial(jax.jit, static_argnums=0)
def _latent_sums(model: AutoencoderModel, params, images):
  """Per image: sum of the posterior means and sum of E[z^2] = mean^2 + var over its latent."""
  mean, logvar = encode(model, params, images)
  second = jnp.square(mean) if logvar is None else jnp.square(mean) + jnp.exp(logvar)
  flat = lambda a: a.reshape(a.shape[0], -1).astype(jnp.float32).sum(-1)
  return {"s1": flat(mean), "s2": flat(second)}


def latent_stats(model: AutoencoderModel, params, images, batch_size: int = 256) -> dict:
  """Mean and variance of the sampled latents z ~ q(z | x) over all latent elements of the
  given images, exactly: the noise is integrated out (E[z^2] = mean^2 + var), not sampled."""
  r = map_batches(lambda b, _: _latent_sums(model, params, b["image"]), {"image": images},
                  min(batch_size, len(images)))
  n = len(images) * math.prod(model.latent_shape)
  mean = r["s1"].astype(np.float64).sum() / n
  var = r["s2"].astype(np.float64).sum() / n - mean ** 2
  return {"mean": np.float32(mean), "var": np.float32(var)}


def interpolation_strip(model: AutoencoderModel, params, image_a, image_b, num: int = 10
                        ) -> np.ndarray:
  """Row 1: linear, row 2: spherical interpolation of the latents, each framed by the two
  original images."""
  from jaxgen import images as img
  ends = to_unit(np.stack([image_a, image_b]))
  lin = interpolate(model, params, image_a, image_b, num, "lerp")
  sph = interpolate(model, params, image_a, image_b, num, "slerp")
  frame = lambda r: np.concatenate([ends[:1], r, ends[1:]])
  return img.rows(frame(lin), frame(sph), scale=img.display_scale(model.image_shape[0]))

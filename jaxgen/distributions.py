"""Pure float32 likelihood and latent math shared by the VAEs and latent diffusion."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl(mean, logvar) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)), summed over all but the batch axis -> [B]."""
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(-1)


def reparameterize(key, mean, logvar) -> jax.Array:
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def bernoulli_log_prob(x, logits) -> jax.Array:
  """log p(x | logits) for x in [0, 1] (grey levels as soft targets), summed -> [B]."""
  lp = x * logits - jax.nn.softplus(logits)
  return lp.reshape(lp.shape[0], -1).sum(-1)


def gaussian_log_prob(x, mean, log_scale) -> jax.Array:
  """log N(x | mean, exp(log_scale)^2), summed over all but the batch axis -> [B]."""
  log_scale = jnp.broadcast_to(log_scale, mean.shape)
  z = (x - mean) * jnp.exp(-log_scale)
  lp = -0.5 * jnp.square(z) - log_scale - 0.5 * LOG_2PI
  return lp.reshape(lp.shape[0], -1).sum(-1)


def lerp(a, b, t):
  """Linear interpolation between latents a and b at t (a scalar or [T] -> leading axis)."""
  t = jnp.asarray(t, jnp.float32)
  t = t.reshape(t.shape + (1,) * a.ndim)
  return (1.0 - t) * a + t * b


def slerp(a, b, t, eps: float = 1e-6):
  """Spherical interpolation on the flattened latents (Shoemake 1985); lerp when parallel."""
  t = jnp.asarray(t, jnp.float32)
  fa, fb = a.reshape(-1).astype(jnp.float32), b.reshape(-1).astype(jnp.float32)
  cos = jnp.dot(fa, fb) / (jnp.linalg.norm(fa) * jnp.linalg.norm(fb) + eps)
  omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  so = jnp.sin(omega)
  tt = t.reshape(t.shape + (1,) * a.ndim)
  near = so < eps
  safe_so = jnp.where(near, 1.0, so)
  wa = jnp.where(near, 1.0 - tt, jnp.sin((1.0 - tt) * omega) / safe_so)
  wb = jnp.where(near, tt, jnp.sin(tt * omega) / safe_so)
  return wa * a + wb * b

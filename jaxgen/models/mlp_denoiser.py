"""A residual MLP that denoises vectors (image embeddings): the network of a diffusion prior over
an embedding space (RCG's representation generator, unCLIP's prior).

x [B, D], t [B] -> [B, D]. The timestep's sinusoidal embedding (and, with cond_dim, an MLP of a
conditioning vector such as a CLIP text embedding; zeros: none) is added inside every block:
h + Dense(SiLU(Dense(SiLU(LayerNorm(h))) + Dense(emb))). The output layer starts at zero.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.errors import ConfigError, ShapeError
from jaxgen.models.layers import timestep_embedding
from jaxgen.models.unet import TimestepEmbedding


class MLPBlock(nn.Module):
  width: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h, emb, *, train: bool):
    y = nn.Dense(self.width, name="dense_1")(nn.silu(nn.LayerNorm(name="norm")(h)))
    y = y + nn.Dense(self.width, name="emb_proj")(nn.silu(emb))
    y = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(y))
    return h + nn.Dense(self.width, name="dense_2")(y)


class MLPDenoiser(nn.Module):
  features: int                   # D, the vectors' size
  width: int = 512
  depth: int = 6
  dropout: float = 0.0
  cond_dim: int = 0               # a conditioning vector [B, cond_dim]; 0: unconditional

  @nn.compact
  def __call__(self, x, t, *, cond=None, train: bool = False):
    if x.ndim != 2 or x.shape[-1] != self.features:
      raise ShapeError(f"x: expected [batch, {self.features}], got {list(x.shape)}")
    if (cond is None) != (not self.cond_dim):
      raise ConfigError(f"cond is given exactly when the prior is conditional "
                        f"(cond_dim={self.cond_dim}; zeros: no condition)")
    if cond is not None and cond.shape != (x.shape[0], self.cond_dim):
      raise ShapeError(f"cond: expected [{x.shape[0]}, {self.cond_dim}], got "
                       f"{list(cond.shape)}")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    emb = TimestepEmbedding(self.width, name="time_embedding")(
        timestep_embedding(t, self.width))
    if cond is not None:
      emb = emb + TimestepEmbedding(self.width, name="cond_embedding")(
          jnp.asarray(cond, jnp.float32))
    h = nn.Dense(self.width, name="proj_in")(jnp.asarray(x, jnp.float32))
    for i in range(self.depth):
      h = MLPBlock(self.width, self.dropout, name=f"block_{i}")(h, emb, train=train)
    h = nn.silu(nn.LayerNorm(name="norm_out")(h))
    return nn.Dense(self.features, kernel_init=nn.initializers.zeros, name="proj_out")(h)

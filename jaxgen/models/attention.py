"""Transformer blocks of Stable Diffusion's U-Net (NHWC): attention, GEGLU, Transformer2D.

Sub-module names follow diffusers' (attn1, attn2, ff, norm1-3, proj_in, proj_out, to_q, ...)
so that published weights map onto these modules by a rename.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.models.layers import attention, group_norm, timestep_embedding
from jaxgen.models.ops import Conv, Dropout


class Attention(nn.Module):
  """Multi-head attention of a sequence x [B, T, D] to itself or to a context [B, S, E]."""
  heads: int
  head_dim: int
  qkv_bias: bool = False  # Stable Diffusion's q/k/v projections have no bias; to_out has one
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    inner = self.heads * self.head_dim
    dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, dtype=self.dtype, name=name)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
    q = split(dense(inner, "to_q", self.qkv_bias)(x))
    k = split(dense(inner, "to_k", self.qkv_bias)(context))
    v = split(dense(inner, "to_v", self.qkv_bias)(context))
    o = attention(q, k, v).reshape(x.shape[0], x.shape[1], inner)
    return dense(x.shape[-1], "to_out", True)(o)


class GEGLU(nn.Module):
  """Dense to 2 * features, then value * gelu(gate) (exact erf gelu, as in diffusers)."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, -1)
    return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU to mult * D, dropout, Dense back to D (diffusers' ff.net.0 / ff.net.2)."""
  mult: int = 4
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    dim = x.shape[-1]
    h = GEGLU(self.mult * dim, self.dtype, name="net_0")(x)
    h = Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention (when context_dim is set), GEGLU MLP."""
  heads: int
  head_dim: int
  context_dim: int | None = None
  dropout: float = 0.0
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, *, train: bool = False):
    # LayerNorm params and statistics stay float32: with float32 params the output is float32.
    norm = lambda name: nn.LayerNorm(epsilon=self.eps, name=name)
    attn = lambda name: Attention(self.heads, self.head_dim, dtype=self.dtype, name=name)
    x = x + attn("attn1")(norm("norm1")(x))
    if self.context_dim is not None:
      x = x + attn("attn2")(norm("norm2")(x), context)
    return x + FeedForward(dropout=self.dropout, dtype=self.dtype, name="ff")(
        norm("norm3")(x), train=train)


def position_embedding_2d(h: int, w: int, dim: int) -> jax.Array:
  """[h * w, dim] float32, row-major: the first half of the channels a sinusoidal embedding of
  the row, the second of the column (max period 10000), both over the index scaled to the unit
  square's 64-cell grid so that the embedding of a place does not depend on the resolution."""
  if dim % 4:
    raise ValueError(f"a 2D position embedding needs channels divisible by 4, got {dim}")
  rows = jnp.repeat(jnp.arange(h, dtype=jnp.float32) * (64.0 / h), w)
  cols = jnp.tile(jnp.arange(w, dtype=jnp.float32) * (64.0 / w), h)
  return jnp.concatenate([timestep_embedding(rows, dim // 2, flip_sin_to_cos=False),
                          timestep_embedding(cols, dim // 2, flip_sin_to_cos=False)], axis=-1)


class Transformer2D(nn.Module):
  """GroupNorm, proj_in, `depth` transformer blocks over the H*W positions, proj_out, residual.

  proj_in/proj_out are 1x1 convs (SD 1.x) or Dense layers (`use_linear_projection`, SD 2.x).
  `position_embedding` adds a fixed 2D sine-cosine embedding of each position's row and column
  after proj_in (no parameters; Stable Diffusion has none), so that the queries of the
  cross-attention know where they are: a prompt's "left of" can only be drawn by a network
  whose features say which side a position is on.
  """
  heads: int
  head_dim: int
  depth: int = 1
  context_dim: int | None = None
  use_linear_projection: bool = False
  groups: int = 32
  dropout: float = 0.0
  position_embedding: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, *, train: bool = False):
    b, h, w, c = x.shape
    inner = self.heads * self.head_dim
    # diffusers fixes this GroupNorm's eps at 1e-6 whatever the U-Net's norm_eps.
    y = group_norm(self.groups, 1e-6, "norm")(x)
    if self.use_linear_projection:
      y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
    else:
      y = Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(y).reshape(b, h * w, inner)
    if self.position_embedding:
      with jax.ensure_compile_time_eval():  # a constant of the program, not computed per call
        pe = position_embedding_2d(h, w, inner)
      y = y + pe.astype(y.dtype)
    for n in range(self.depth):
      y = BasicTransformerBlock(self.heads, self.head_dim, self.context_dim, self.dropout,
                                dtype=self.dtype, name=f"transformer_blocks_{n}")(
                                    y, context, train=train)
    if self.use_linear_projection:
      y = nn.Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
    else:
      y = Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(y.reshape(b, h, w, inner))
    return x + y

"""Vision Transformer (Dosovitskiy et al. 2020): patches, learned positions, pre-LN blocks."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.errors import ConfigError, ShapeError
from jaxgen.models.layers import attention
from jaxgen.models.ops import Dropout

# big_vision / the ViT paper's initialisers.
dense_init = nn.initializers.xavier_uniform()


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense, hidden = mlp_dim."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    d = x.shape[-1]
    h = nn.gelu(nn.Dense(self.mlp_dim, kernel_init=dense_init, bias_init=nn.initializers.normal(
        1e-6), dtype=self.dtype, name="fc1")(x), approximate=False)
    h = Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(d, kernel_init=dense_init, bias_init=nn.initializers.normal(1e-6),
                    dtype=self.dtype, name="fc2")(h)


class SelfAttention(nn.Module):
  """Multi-head self-attention over tokens [B, T, D] (softmax in float32)."""
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    dense = lambda name: nn.Dense(d, kernel_init=dense_init, dtype=self.dtype, name=name)
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = (split(dense(n)(x)) for n in ("query", "key", "value"))
    return dense("out")(attention(q, k, v).reshape(b, t, d))


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""
  heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    drop = Dropout(self.dropout, deterministic=not train)
    h = SelfAttention(self.heads, dtype=self.dtype, name="attn")(
        nn.LayerNorm(1e-6, dtype=self.dtype, name="ln1")(x))
    x = x + drop(h)
    h = MlpBlock(self.mlp_dim, self.dropout, dtype=self.dtype, name="mlp")(
        nn.LayerNorm(1e-6, dtype=self.dtype, name="ln2")(x), train=train)
    return x + drop(h)


class ViT(nn.Module):
  """[B, H, W, C] -> pooled features [B, width] float32 (and patch tokens [B, N, width] with
  `return_tokens=True`). H and W must be multiples of `patch_size`; the position embedding is
  sized by the images seen at init. `pool`: 'cls' (class token) or 'mean' (no class token).
  `num_classes > 0` adds a linear head on the pooled features and returns its logits.
  """
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  pool: str = "cls"
  dropout: float = 0.0
  num_classes: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_tokens: bool = False):
    if self.pool not in ("cls", "mean"):
      raise ConfigError(f"unknown ViT pool {self.pool!r}; choose 'cls' or 'mean'")
    if self.width % self.heads:
      raise ConfigError(f"ViT width {self.width} is not divisible by heads {self.heads}")
    if x.ndim != 4:
      raise ShapeError(f"ViT expects images [B, H, W, C], got shape {x.shape}")
    b, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ShapeError(f"image size {h}x{w} is not divisible by the patch size {p}")
    n = (h // p) * (w // p)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="patch_embed")(x.astype(self.dtype)).reshape(b, n, self.width)
    tokens = n + (self.pool == "cls")
    if self.has_variable("params", "pos_embedding"):
      built = self.get_variable("params", "pos_embedding").shape[1]
      if built != tokens:
        raise ShapeError(f"image size {h}x{w} gives {n} patches of {p} px, but this ViT was "
                         f"initialised for {built - (self.pool == 'cls')} patches")
    if self.pool == "cls":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, tokens, self.width))
    x = Dropout(self.dropout, deterministic=not train)(x + pos.astype(x.dtype))
    for i in range(self.depth):
      x = EncoderBlock(self.heads, int(self.mlp_ratio * self.width), self.dropout,
                       dtype=self.dtype, name=f"block{i + 1}")(x, train=train)
    x = nn.LayerNorm(1e-6, dtype=self.dtype, name="ln_final")(x).astype(jnp.float32)
    patches = x[:, 1:] if self.pool == "cls" else x
    pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    if self.num_classes:
      pooled = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(pooled)
    return (pooled, patches) if return_tokens else pooled


ViT_Ti16 = functools.partial(ViT, patch_size=16, width=192, depth=12, heads=3)
ViT_S16 = functools.partial(ViT, patch_size=16, width=384, depth=12, heads=6)
ViT_B16 = functools.partial(ViT, patch_size=16, width=768, depth=12, heads=12)

"""Diffusion Transformer (Peebles & Xie 2023): the image cut into patches, transformer blocks
modulated by the timestep (and class) embedding through adaLN-Zero, and a linear decoder back to
patches.

Conditioning: class labels (with a null label for classifier-free guidance) add to the timestep
embedding; text (per-token states [B, S, E]) enters by cross-attention after each self-attention
(PixArt-alpha's way, `text_mode="cross"`) or by joint attention over image and text tokens, the
text tokens carrying their own adaLN-modulated weights (Stable Diffusion 3's MMDiT,
`text_mode="joint"`).

Module and field names follow the paper; `jaxgen.convert.dit` maps diffusers'
DiTTransformer2DModel onto them (the tests check the outputs agree).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError, ShapeError
from jaxgen.models.attention import Attention as _Attention
from jaxgen.models.layers import attention, timestep_embedding

SIZES = {  # the paper's table 1: depth, hidden size, heads
    "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
TEXT_MODES = ("cross", "joint")


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[sin(p w), cos(p w)] with w_i = 10000^(-i / (dim / 2)): [N] -> [N, dim] (float64)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(positions.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, height: int, width: int) -> np.ndarray:
  """MAE's fixed 2D position table for a height x width grid of patches in raster order,
  [H * W, dim]: the first half encodes the column, the second the row."""
  if dim % 4:
    raise ConfigError(f"the 2D sine-cosine position table needs a width divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.concatenate([sincos_1d(dim // 2, cols.ravel()), sincos_1d(dim // 2, rows.ravel())],
                        axis=1).astype(np.float32)


def _attn(heads: int, width: int, dtype, name: str) -> nn.Module:
  """Multi-head attention with biased q/k/v (the U-Net's module, diffusers' names to_q ...)."""
  return _Attention(heads, width // heads, qkv_bias=True, dtype=dtype, name=name)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(eps: float, name: str):
  return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, dtype=jnp.float32, name=name)


class Mlp(nn.Module):
  """Dense -> tanh-approximated GELU -> Dense (the paper's and diffusers' 'gelu-approximate')."""
  ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(int(self.ratio * x.shape[-1]), dtype=self.dtype, name="fc1")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(jax.nn.gelu(h, approximate=True))


class DiTBlock(nn.Module):
  """adaLN-Zero block: the conditioning c [B, D] gives shift, scale and gate of the attention and
  of the MLP branch (a zero-initialised Dense, so that each block starts as the identity)."""
  heads: int
  mlp_ratio: float = 4.0
  eps: float = 1e-6
  mlp_eps: float = 1e-6
  cross: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, context=None):
    mod = nn.Dense(6 * x.shape[-1], kernel_init=nn.initializers.zeros, name="adaLN_modulation")
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod(nn.silu(c)), 6, axis=-1)
    h = modulate(_layer_norm(self.eps, "norm1")(x), shift1, scale1)
    x = x + gate1[:, None] * _attn(self.heads, x.shape[-1], self.dtype, "attn")(h)
    if self.cross:
      h = nn.LayerNorm(epsilon=self.eps, dtype=jnp.float32, name="norm_cross")(x)
      x = x + _attn(self.heads, x.shape[-1], self.dtype, "cross_attn")(h, context)
    h = modulate(_layer_norm(self.mlp_eps, "norm2")(x), shift2, scale2)
    return x + gate2[:, None] * Mlp(self.mlp_ratio, self.dtype, name="mlp")(h)


class JointBlock(nn.Module):
  """MMDiT block: image tokens x and text tokens y each get their own adaLN-Zero modulation,
  q/k/v and output projections and MLP; one attention runs over the concatenated tokens."""
  heads: int
  mlp_ratio: float = 4.0
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, y):
    d = x.shape[-1]
    split = lambda t: t.reshape(*t.shape[:2], self.heads, d // self.heads)
    streams, mods = [], []
    for name, tokens in (("x", x), ("y", y)):
      mod = nn.Dense(6 * d, kernel_init=nn.initializers.zeros, name=f"adaLN_modulation_{name}")
      m = jnp.split(mod(nn.silu(c)), 6, axis=-1)
      h = modulate(_layer_norm(self.eps, f"norm1_{name}")(tokens), m[0], m[1])
      qkv = [split(nn.Dense(d, dtype=self.dtype, name=f"to_{p}_{name}")(h)) for p in "qkv"]
      streams.append(qkv)
      mods.append(m)
    n = x.shape[1]
    q, k, v = (jnp.concatenate([streams[0][i], streams[1][i]], axis=1) for i in range(3))
    out = attention(q, k, v).reshape(x.shape[0], -1, d)
    results = []
    for (name, tokens), m, o in zip((("x", x), ("y", y)), mods, (out[:, :n], out[:, n:])):
      tokens = tokens + m[2][:, None] * nn.Dense(d, dtype=self.dtype, name=f"to_out_{name}")(o)
      h = modulate(_layer_norm(self.eps, f"norm2_{name}")(tokens), m[3], m[4])
      results.append(tokens + m[5][:, None] * Mlp(self.mlp_ratio, self.dtype,
                                                  name=f"mlp_{name}")(h))
    return results


class DiT(nn.Module):
  """x [B, H, W, C], timesteps t [B] (int or float: flow models pass 1000 * time), labels [B]
  (class models; `null_label_id` = num_classes is the unconditional label), context [B, S, E]
  (text models) -> [B, H, W, out_channels].

  Sizes: `size` in SIZES sets depth, hidden_size and heads (S, B, L, XL), or leave it '' and set
  them. H and W must be multiples of patch_size. `freq_shift`: the timestep embedding's
  downscale_freq_shift (0 in the paper, 1 in diffusers' DiT); `mlp_eps`: the MLP branch's
  LayerNorm epsilon (1e-6 in the paper, 1e-5 in diffusers' DiT). `remat` recomputes each block
  in the backward pass.
  """
  patch_size: int = 2
  size: str = ""
  depth: int = 6
  hidden_size: int = 256
  heads: int = 4
  mlp_ratio: float = 4.0
  out_channels: int = 0               # 0: the input's channels
  num_classes: int = 0                # 0: no class conditioning
  context_dim: int = 0                # > 0: text states of this width condition the model
  text_mode: str = "cross"            # cross | joint
  freq_shift: float = 0.0
  mlp_eps: float = 1e-6
  remat: bool = False
  dtype: str = "float32"

  @property
  def null_label_id(self) -> int:
    return self.num_classes

  @property
  def downsample_factor(self) -> int:
    """Image sides must be multiples of this (the patch size)."""
    return self.patch_size

  @property
  def levels(self) -> int:
    return 1

  def dims(self) -> tuple[int, int, int]:
    if self.size:
      if self.size not in SIZES:
        raise ConfigError(f"unknown DiT size {self.size!r}; sizes: {', '.join(SIZES)}")
      return SIZES[self.size]
    return self.depth, self.hidden_size, self.heads

  @nn.compact
  def __call__(self, x, t, labels=None, context=None, *, train: bool = False):
    depth, width, heads = self.dims()
    dtype = jnp.dtype(self.dtype)
    if width % heads:
      raise ConfigError(f"DiT hidden size {width} is not divisible by heads {heads}")
    if self.text_mode not in TEXT_MODES:
      raise ConfigError(f"text_mode must be one of {TEXT_MODES}, got {self.text_mode!r}")
    if x.ndim != 4:
      raise ShapeError(f"DiT expects images [B, H, W, C], got shape {x.shape}")
    b, h, w, ch = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ShapeError(f"image size {h}x{w} is not divisible by the patch size {p}")
    if (labels is None) != (self.num_classes == 0):
      raise ConfigError("labels are needed exactly when num_classes > 0")
    if (context is None) != (self.context_dim == 0):
      raise ConfigError("context (text states) is needed exactly when context_dim > 0")
    gh, gw = h // p, w // p
    tokens = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                     name="patch_embed")(x.astype(dtype)).reshape(b, gh * gw, width)
    tokens = tokens.astype(jnp.float32) + jnp.asarray(sincos_2d(width, gh, gw))[None]
    # timestep (and class) embedding
    t_freq = timestep_embedding(t, 256, flip_sin_to_cos=True, shift=self.freq_shift)
    c = nn.Dense(width, name="t_embed_1")(t_freq)
    c = nn.Dense(width, name="t_embed_2")(nn.silu(c))
    if self.num_classes:
      c = c + nn.Embed(self.num_classes + 1, width, embedding_init=nn.initializers.normal(0.02),
                       name="y_embed")(labels)
    y = None
    if self.context_dim:
      y = nn.Dense(width, name="context_proj")(jnp.asarray(context, jnp.float32))
    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    joint_cls = nn.remat(JointBlock) if self.remat else JointBlock
    for i in range(depth):
      if self.context_dim and self.text_mode == "joint":
        tokens, y = joint_cls(heads, self.mlp_ratio, dtype=dtype, name=f"blocks_{i}")(
            tokens, c, y)
      else:
        tokens = block_cls(heads, self.mlp_ratio, mlp_eps=self.mlp_eps,
                           cross=bool(self.context_dim), dtype=dtype,
                           name=f"blocks_{i}")(tokens, c, y)
    # final layer: adaLN (shift, scale), then a zero-initialised linear map to patches
    out_ch = self.out_channels or ch
    shift, scale = jnp.split(nn.Dense(2 * width, kernel_init=nn.initializers.zeros,
                                      name="final_modulation")(nn.silu(c)), 2, axis=-1)
    tokens = modulate(_layer_norm(1e-6, "final_norm")(tokens), shift, scale)
    out = nn.Dense(p * p * out_ch, kernel_init=nn.initializers.zeros, dtype=dtype,
                   name="final_linear")(tokens).astype(jnp.float32)
    out = out.reshape(b, gh, gw, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h, w, out_ch)


def num_params(params) -> int:
  return int(sum(math.prod(v.shape) for v in jax.tree.leaves(params)))

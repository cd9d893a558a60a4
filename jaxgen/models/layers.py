"""Building blocks shared by the autoencoders and U-Nets (NHWC).

Sub-module names follow diffusers' (norm1, conv1, time_emb_proj, ...) so that Stable Diffusion
weights map onto these modules by a rename, without reshaping the architecture.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.models.ops import Conv, Dropout, GroupNorm


def group_norm(groups: int, eps: float, name: str | None = None, act: str | None = None
               ) -> GroupNorm:
  """GroupNorm (flax's parameter names), followed by SiLU when act="silu", fused (models/ops)."""
  return GroupNorm(num_groups=groups, epsilon=eps, act=act, name=name)


class ResBlock(nn.Module):
  """GroupNorm -> SiLU -> Conv, twice, with an optional time embedding added in between."""
  features: int
  groups: int = 32
  eps: float = 1e-6
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t_emb=None, *, train: bool = False):
    h = group_norm(self.groups, self.eps, "norm1", act="silu")(x)
    h = Conv(self.features, (3, 3), dtype=self.dtype, name="conv1")(h)
    if t_emb is not None:
      h = h + nn.Dense(self.features, dtype=self.dtype, name="time_emb_proj")(
          nn.silu(t_emb))[:, None, None, :]
    h = group_norm(self.groups, self.eps, "norm2", act="silu")(h)
    h = Dropout(self.dropout, deterministic=not train)(h)
    h = Conv(self.features, (3, 3), dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class Downsample(nn.Module):
  """Stride-2 3x3 conv. `asymmetric` pads (0, 1) as Stable Diffusion's VAE does, else (1, 1)."""
  features: int
  asymmetric: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.asymmetric:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      padding = "VALID"
    else:
      padding = ((1, 1), (1, 1))
    return Conv(self.features, (3, 3), strides=(2, 2), padding=padding, dtype=self.dtype,
                   name="conv")(x)


def repeat_2x2(x):
  """Nearest-neighbour x2 upsampling of NHWC `x` as a broadcast, which XLA fuses into its
  consumer and whose gradient is a sum: jax.image.resize's gather and the scatter-add of its
  gradient ran ~10x slower on the CPU (benchmarks/cpu_conv.py, part "layers")."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


class Upsample(nn.Module):
  """Nearest-neighbour x2 (or to `size`), then a 3x3 conv."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, size: tuple[int, int] | None = None):
    b, h, w, c = x.shape
    size = tuple(size or (2 * h, 2 * w))
    if size == (2 * h, 2 * w):
      x = repeat_2x2(x)
    else:
      x = jax.image.resize(x, (b, size[0], size[1], c), method="nearest")
    return Conv(self.features, (3, 3), dtype=self.dtype, name="conv")(x)


IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn")
# "auto" chunks when a head's logits would hold more than this many entries: on accelerators
# from 64x64 latents on (4096^2 = 16.8M; 32x32 has 1M and stays materialised), on the CPU from
# 64 x 64 logits: 3-4x faster forward and backward than the materialised softmax from 256 to
# 4096 positions under glibc's default allocator (benchmarks/results/attention.md), which faults
# the logits in afresh each call. With freed memory kept (jaxgen.host_memory, the CLI's
# default; 2026-12-06) the materialised softmax is faster alone at 1024 positions (163 against
# 225 ms, heads first) and level inside the SD-like train step, with 2.4x its XLA temporaries:
# the threshold stays for the memory.
CHUNK_ABOVE = 2 ** 20
CPU_CHUNK_ABOVE = 64 * 64
_implementation = "auto"


def set_attention(implementation: str) -> None:
  """How every jaxgen attention computes from now on (read when a function is traced): "xla"
  materialises the logits; "chunked" (jaxgen.models.chunked_attention) never does, O(T + S)
  memory in forward and backward; "cudnn" is jax.nn.dot_product_attention's fused kernel
  (GPU, float16/bfloat16); "auto" takes cudnn on a GPU for half-precision inputs, else chunked
  for long sequences (T * S > CHUNK_ABOVE, on the CPU > CPU_CHUNK_ABOVE) and xla for the rest.
  The config key `attention` sets it for a task (jaxgen.app.build_task)."""
  if implementation not in IMPLEMENTATIONS:
    raise ConfigError(f"attention must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  global _implementation
  _implementation = implementation


def attention_implementation(q, k) -> str:
  """What attention(q, k, ...) runs under the current setting."""
  if _implementation != "auto":
    return _implementation
  backend = jax.default_backend()
  if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  above = CPU_CHUNK_ABOVE if backend == "cpu" else CHUNK_ABOVE
  return "chunked" if q.shape[1] * k.shape[1] > above else "xla"


def attention(q, k, v, mask=None):
  """Scaled dot-product attention. q [B, T, N, H], k/v [B, S, N, H]; mask broadcasts to
  [B, N, T, S] (True = attend). Softmax in float32 whatever the inputs' dtype (except cudnn's
  kernel, which keeps the inputs' half precision). See set_attention for the implementations."""
  impl = attention_implementation(q, k)
  if impl == "chunked":
    from jaxgen.models.chunked_attention import chunked_attention
    return chunked_attention(q, k, v, mask)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  scale = 1.0 / math.sqrt(q.shape[-1])
  # Accumulate q.k in float32 even for bfloat16 inputs (Stable Diffusion 2's upcast_attention).
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnh->btnh", weights, v)


class SpatialSelfAttention(nn.Module):
  """Self-attention over all positions of a feature map, with a residual (VAE mid block)."""
  heads: int = 1
  groups: int = 32
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if c % self.heads:
      raise ValueError(f"channels {c} not divisible by heads {self.heads}")
    y = group_norm(self.groups, self.eps, "group_norm")(x).reshape(b, h * w, c)
    split = lambda t: t.reshape(b, h * w, self.heads, c // self.heads)
    q = split(nn.Dense(c, dtype=self.dtype, name="to_q")(y))
    k = split(nn.Dense(c, dtype=self.dtype, name="to_k")(y))
    v = split(nn.Dense(c, dtype=self.dtype, name="to_v")(y))
    o = attention(q, k, v).reshape(b, h * w, c)
    o = nn.Dense(c, dtype=self.dtype, name="to_out")(o)
    return x + o.reshape(b, h, w, c)


def timestep_embedding(t, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = True,
                       shift: float = 0.0):
  """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim], float32.

  flip_sin_to_cos=True gives [cos, sin] (Stable Diffusion); `shift` is diffusers'
  downscale_freq_shift (1 for the DDPM paper's layout, 0 for Stable Diffusion).
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb

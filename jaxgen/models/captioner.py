"""Image captioning: an image encoder's tokens, attended to by an autoregressive text decoder.

The decoder follows CoCa's layout (Yu et al. 2022): `unimodal_layers` causal self-attention
layers that see only the text (their state at the end token is CoCa's text embedding), then
multimodal layers that add cross-attention to the image tokens. With unimodal_layers=0 it is a
plain captioning decoder (Show, Attend and Tell with a transformer).

Decoding is incremental: every self-attention layer reads and writes a key/value cache
({"k", "v"} of [B, L, heads, head_dim] per layer, an explicit pytree), so a new token costs one
position, not the whole prefix. Training runs the same code on a whole caption at position 0.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError, ShapeError
from jaxgen.models.layers import attention
from jaxgen.models.text import ACTIVATIONS, MLP


def _split(x, heads):
  b, t, d = x.shape
  return x.reshape(b, t, heads, d // heads)


class CachedSelfAttention(nn.Module):
  """Causal self-attention of x [B, T, D] at positions pos .. pos + T - 1, with biases.

  cache: {"k", "v"} [B, L, heads, D // heads] holding the keys/values of earlier positions; the
  new ones are written at `pos` and each query attends to the cached positions up to its own.
  Returns (output [B, T, D], updated cache)."""
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache, pos):
    b, t, d = x.shape
    dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
    q, k, v = (_split(dense(n)(x), self.heads) for n in ("q_proj", "k_proj", "v_proj"))
    keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), pos, 1)
    values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), pos, 1)
    query_pos = pos + jnp.arange(t)
    mask = (jnp.arange(keys.shape[1])[None, :] <= query_pos[:, None])[None, None]  # [1,1,T,L]
    out = attention(q, keys, values, mask).reshape(b, t, d)
    return dense("out_proj")(out), {"k": keys, "v": values}


class CrossAttention(nn.Module):
  """Attention of text states x [B, T, D] to image tokens memory [B, M, E]."""
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, memory):
    b, t, d = x.shape
    dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
    q = _split(dense("q_proj")(x), self.heads)
    k, v = (_split(dense(n)(memory), self.heads) for n in ("k_proj", "v_proj"))
    return dense("out_proj")(attention(q, k, v).reshape(b, t, d))


class DecoderLayer(nn.Module):
  """Pre-LayerNorm: x + self_attn(ln1(x)) [+ cross_attn(ln_cross(x), memory)] + mlp(ln2(x))."""
  heads: int
  mlp_dim: int
  cross: bool
  activation: str = "gelu"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, memory, cache, pos):
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)
    h, cache = CachedSelfAttention(self.heads, self.dtype, name="self_attn")(
        norm("ln1")(x), cache, pos)
    x = x + h
    if self.cross:
      x = x + CrossAttention(self.heads, self.dtype, name="cross_attn")(norm("ln_cross")(x),
                                                                        memory)
    x = x + MLP(self.mlp_dim, self.activation, self.dtype, name="mlp")(norm("ln2")(x))
    return x, cache


class TextDecoder(nn.Module):
  """Token ids [B, T] at positions pos .. pos + T - 1 -> (logits [B, T, V], unimodal states
  [B, T, D], cache). `cache=None` starts an empty one of T positions (training: the whole
  caption at pos 0); decoding passes the cache of `init_cache` and one token at a time."""
  vocab_size: int
  width: int = 256
  layers: int = 4
  unimodal_layers: int = 0
  heads: int = 4
  mlp_dim: int = 1024
  max_positions: int = 32
  activation: str = "gelu"
  dtype: jnp.dtype = jnp.float32

  def init_cache(self, batch: int, length: int | None = None) -> list[dict]:
    """An empty cache for `batch` sequences of up to `length` (default max_positions) tokens."""
    shape = (batch, length or self.max_positions, self.heads, self.width // self.heads)
    return [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
            for _ in range(self.layers)]

  @nn.compact
  def __call__(self, input_ids, memory, cache=None, pos=0):
    if self.activation not in ACTIVATIONS:
      raise ConfigError(f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")
    if self.width % self.heads:
      raise ConfigError(f"decoder width {self.width} is not divisible by heads {self.heads}")
    if not 0 <= self.unimodal_layers < self.layers:
      raise ConfigError(f"unimodal_layers={self.unimodal_layers} must lie in [0, layers="
                        f"{self.layers}): the last layers attend to the image")
    if input_ids.ndim != 2:
      raise ShapeError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    b, t = input_ids.shape
    if cache is None:
      if t > self.max_positions:
        raise ShapeError(f"{t} tokens, but the decoder's position table holds "
                         f"{self.max_positions}")
      cache = self.init_cache(b, t)
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     name="token_embedding")
    positions = nn.Embed(self.max_positions, self.width,
                         embedding_init=nn.initializers.normal(0.01), name="position_embedding")
    x = embed(input_ids) + positions(pos + jnp.arange(t))[None]
    new_cache, unimodal = [], x
    for i in range(self.layers):
      x, c = DecoderLayer(self.heads, self.mlp_dim, cross=i >= self.unimodal_layers,
                          activation=self.activation, dtype=self.dtype,
                          name=f"layers_{i}")(x, memory, cache[i], pos)
      new_cache.append(c)
      if i + 1 == self.unimodal_layers:
        unimodal = x
    x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="final_layer_norm")(x)
    logits = embed.attend(x.astype(self.dtype)).astype(jnp.float32)  # tied output embedding
    return logits, unimodal, new_cache


class ImageMemory(nn.Module):
  """Encoder tokens [B, N, F] and pooled features [B, F] -> memory [B, N + 1, D]: the pooled
  token first, then the tokens, projected to the decoder width with learned positions (a ResNet's
  feature map has none of its own) and a LayerNorm."""
  width: int

  @nn.compact
  def __call__(self, pooled, tokens):
    x = jnp.concatenate([pooled[:, None], tokens], axis=1)
    x = nn.Dense(self.width, name="proj")(x)
    pos = self.param("positions", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
    if pos.shape[1] != x.shape[1]:
      raise ShapeError(f"the image encoder gives {x.shape[1] - 1} tokens, but this captioner was "
                       f"built for {pos.shape[1] - 1}: images of another size?")
    return nn.LayerNorm(epsilon=1e-5, name="norm")(x + pos)


class CaptionerModule(nn.Module):
  """Image encoder (ResNet or ViT, returning tokens) + text decoder with cross-attention; with
  embed_dim > 0 also CoCa's contrastive head (pooled image features and the unimodal text state
  at the end token, each projected to embed_dim, and a learnable temperature)."""
  image_encoder: nn.Module
  decoder: TextDecoder
  embed_dim: int = 0
  lock_image: bool = False
  init_logit_scale: float = 2.6593  # log(1 / 0.07), CLIP's

  def setup(self):
    self.memory = ImageMemory(self.decoder.width, name="image_memory")
    if self.embed_dim:
      self.image_proj = nn.Dense(self.embed_dim, use_bias=False, name="image_proj")
      self.text_norm = nn.LayerNorm(epsilon=1e-5, name="text_norm")
      self.text_proj = nn.Dense(self.embed_dim, use_bias=False, name="text_proj")
      self.logit_scale = self.param("logit_scale",
                                    nn.initializers.constant(self.init_logit_scale), ())

  def encode(self, images, *, train: bool = False):
    """images [B, H, W, C] in [-1, 1] -> (memory [B, M, D], pooled features [B, F])."""
    pooled, tokens = self.image_encoder(images, train=train and not self.lock_image,
                                        return_tokens=True)
    if self.lock_image:  # LiT: a fixed encoder (eval-mode statistics, no gradient)
      pooled, tokens = jax.lax.stop_gradient((pooled, tokens))
    return self.memory(pooled, tokens), pooled

  def decode(self, input_ids, memory, cache=None, pos=0):
    return self.decoder(input_ids, memory, cache, pos)

  def embed_image(self, pooled):
    return self.image_proj(pooled)

  def embed_text(self, unimodal, eos_positions):
    return self.text_proj(self.text_norm(unimodal[jnp.arange(unimodal.shape[0]), eos_positions]))

  def __call__(self, images, input_ids, eos_positions=None, *, train: bool = False):
    """Teacher forcing: logits [B, T, V] of the next token at every position; with embed_dim
    also (image_emb, text_emb) for the contrastive loss (eos_positions required)."""
    memory, pooled = self.encode(images, train=train)
    logits, unimodal, _ = self.decode(input_ids, memory)
    if not self.embed_dim:
      return logits, None
    if eos_positions is None:
      raise ShapeError("CoCa's contrastive head needs eos_positions")
    return logits, (self.embed_image(pooled), self.embed_text(unimodal, eos_positions))

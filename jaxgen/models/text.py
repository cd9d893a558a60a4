"""CLIP's text transformer with the structure and sub-module names of Hugging Face's CLIPTextModel,
so that published weights load by a rename (`jaxgen.convert.clip_text`)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError, ShapeError, TokenError
from jaxgen.models.layers import attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP, SD 1.x
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP, SD 2.x, SDXL
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
POOLING = ("eos", "argmax")


class SelfAttention(nn.Module):
  """Multi-head self-attention with biases on q/k/v/out, as CLIP's."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
    q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
    return dense("out_proj")(attention(q, k, v, mask).reshape(b, t, d))


class MLP(nn.Module):
  mlp_dim: int
  activation: str = "quick_gelu"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = ACTIVATIONS[self.activation](nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class EncoderLayer(nn.Module):
  """Pre-LayerNorm: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    # LayerNorms compute and return float32 whatever `dtype`; the Dense layers cast their inputs,
    # so the residual stream stays float32 and only the matmuls run in bfloat16.
    norm = lambda name: nn.LayerNorm(epsilon=self.eps, dtype=jnp.float32, name=name)
    attn = SelfAttention(self.num_heads, self.dtype, name="self_attn")
    x = x + attn(norm("layer_norm1")(x), mask)
    return x + MLP(self.mlp_dim, self.activation, self.dtype, name="mlp")(norm("layer_norm2")(x))


class TextTransformer(nn.Module):
  """Token ids [B, L] -> dict of CLIP text features (defaults: OpenAI CLIP ViT-B's text tower).

  The per-token states condition the diffusion U-Net through cross-attention; the pooled output
  (at the end-of-text token, optionally projected) is CLIP's text embedding.

  Returns
    last_hidden_state [B, L, D]  after the final LayerNorm (what SD 1.x's U-Net attends to)
    pooler_output     [B, D]     last_hidden_state at the end-of-text token
    text_embeds       [B, P]     pooler_output @ text_projection (only with projection_dim)
    hidden_states     tuple of num_layers + 1 arrays [B, L, D]: the embeddings, then each layer's
                      output, without final LayerNorm (only with output_hidden_states=True)
    layer_hidden_state [B, L, D] hidden_states[layer_index], through the final LayerNorm when
                      norm_layer=True (only with layer_index): SDXL takes layer_index=-2 unnormed;
                      diffusers' clip_skip=k is layer_index=-(k + 1) with norm_layer=True

  pooling="eos": the first position of `eos_token_id` (CLIP's rule); "argmax": the position of
  the largest id (Hugging Face's rule for configs saved with eos_token_id=2, which works because
  CLIP's end token has the largest id in its vocabulary).

  attention_mask (optional, 1 = real token) hides padding as keys, as Hugging Face does when
  given one; the attention is causal (CLIP's), so without it only the padding positions' outputs
  differ. causal=False: every token attends to the whole prompt (a BERT/T5-style encoder), so a
  word's state can depend on the words after it; then the mask matters everywhere.
  Outputs are float32 (they come from the float32 LayerNorms, or the projection's dtype).

  output_hidden_states, layer_index and norm_layer choose the program: under jit, pass them as
  static arguments (jax.jit(model.apply, static_argnames=("layer_index",))) or close over them.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  num_layers: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  max_positions: int = 77
  activation: str = "quick_gelu"
  eps: float = 1e-5
  projection_dim: int | None = None
  eos_token_id: int = 49407
  pooling: str = "eos"
  dtype: jnp.dtype = jnp.float32
  causal: bool = True

  def _check(self, input_ids, output_hidden_states, layer_index, norm_layer):
    if self.activation not in ACTIVATIONS:
      raise ConfigError(f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")
    if self.pooling not in POOLING:
      raise ConfigError(f"pooling must be one of {POOLING}, got {self.pooling!r}")
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                        f"{self.num_heads}")
    if input_ids.ndim != 2:
      raise ShapeError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if input_ids.shape[1] > self.max_positions:
      raise ShapeError(f"input_ids have {input_ids.shape[1]} tokens but the position table holds "
                       f"{self.max_positions}: tokenize with a context length of at most that")
    for name, value in (("output_hidden_states", output_hidden_states),
                        ("layer_index", layer_index), ("norm_layer", norm_layer)):
      if isinstance(value, jax.core.Tracer):
        raise ConfigError(f"{name} is traced: make it a static argument of jit")
    if layer_index is not None and not -self.num_layers - 1 <= layer_index <= self.num_layers:
      raise ConfigError(f"layer_index {layer_index} is out of range for {self.num_layers} layers "
                        f"(hidden_states holds {self.num_layers + 1} entries)")
    if not isinstance(input_ids, jax.core.Tracer):  # concrete ids (not under jit): cheap to check
      ids = np.asarray(input_ids)
      if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
        raise TokenError(f"token ids must lie in [0, {self.vocab_size}), got values from "
                         f"{ids.min()} to {ids.max()}: a tokenizer for another vocabulary?")

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False,
               layer_index: int | None = None, norm_layer: bool = False):
    if not hasattr(input_ids, "ndim"):  # a nested list
      input_ids = np.asarray(input_ids, np.int32)
    self._check(input_ids, output_hidden_states, layer_index, norm_layer)
    b, t = input_ids.shape
    # CLIP's initialisation: small normal embeddings (flax's default has unit variance)
    embed = lambda n, std, name: nn.Embed(n, self.hidden_size, name=name,
                                          embedding_init=nn.initializers.normal(std))
    x = (embed(self.vocab_size, 0.02, "token_embedding")(input_ids)
         + embed(self.max_positions, 0.01, "position_embedding")(jnp.arange(t))[None])
    mask = jnp.tril(jnp.ones((t, t), bool)) if self.causal else jnp.ones((t, t), bool)
    mask = mask[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
      mask = mask & jnp.asarray(attention_mask, bool)[:, None, None, :]
    hidden = [x]
    for i in range(self.num_layers):
      x = EncoderLayer(self.num_heads, self.mlp_dim, self.activation, self.eps, self.dtype,
                       name=f"layers_{i}")(x, mask)
      hidden.append(x)
    final_norm = nn.LayerNorm(epsilon=self.eps, dtype=jnp.float32, name="final_layer_norm")
    last = final_norm(x)
    if self.pooling == "eos":
      # first occurrence: with SD 1.x's padding the end token repeats to the end of the row
      pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    else:
      pos = jnp.argmax(input_ids, axis=-1)
    pooled = last[jnp.arange(b), pos]
    out = dict(last_hidden_state=last, pooler_output=pooled)
    if self.projection_dim is not None:
      out["text_embeds"] = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                    name="text_projection")(pooled)
    if output_hidden_states:
      out["hidden_states"] = tuple(hidden)
    if layer_index is not None:
      h = hidden[layer_index]
      out["layer_hidden_state"] = final_norm(h) if norm_layer else h
    return out

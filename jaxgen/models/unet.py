"""The diffusion U-Net (NHWC): diffusers' UNet2DModel and UNet2DConditionModel by configuration.

Sub-module names are diffusers' flattened (down_1_res_0 = down_blocks.1.resnets.0), so that
jaxgen.convert.diffusers imports published weights by a rename.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.errors import ConfigError, ShapeError
from jaxgen.models.attention import Transformer2D
from jaxgen.models.layers import (
  Downsample,
  ResBlock,
  SpatialSelfAttention,
  Upsample,
  group_norm,
  timestep_embedding,
)
from jaxgen.models.ops import Conv


class TimestepEmbedding(nn.Module):
  """Dense -> SiLU -> Dense on the sinusoidal embedding (diffusers' linear_1 / linear_2)."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, emb):
    h = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(emb))
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(h)


def _per_level(value, levels: int, what: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != levels:
      raise ConfigError(f"{what}: {len(value)} values given for {levels} levels")
    return tuple(value)
  return (value,) * levels


class UNet(nn.Module):
  """eps/v-prediction U-Net: x [B, H, W, C], t [B] -> [B, H, W, out_channels] (float32).

  Level i has `layers_per_block` ResBlocks (each followed by an attention block when
  attn_levels[i]) and, except the last level, a stride-2 downsample; the up path mirrors it
  with one more ResBlock per level, each fed a skip connection. `attention` picks the block:
  "self" is UNet2DModel's single-layer spatial self-attention, "transformer" is Stable
  Diffusion's Transformer2D (self-attention, cross-attention to `context` when context_dim is
  set, GEGLU MLP). Heads per level: channels // head_dim when head_dim is set, else num_heads
  (an int or one per level; the middle block uses the last level's).
  """
  out_channels: int
  block_channels: Sequence[int] = (128, 256, 256, 256)
  layers_per_block: int = 2
  attn_levels: Sequence[bool] = (False, True, False, False)
  mid_attention: bool = True
  attention: str = "self"                     # "self" | "transformer"
  num_heads: int | Sequence[int] = 1
  head_dim: int | None = None
  transformer_depth: int | Sequence[int] = 1
  context_dim: int | None = None              # None: no cross-attention
  use_linear_projection: bool = False         # transformer proj_in/out: Dense (SD2) or 1x1 conv
  position_embedding: bool = False            # transformer: fixed 2D sin-cos after proj_in
  num_classes: int = 0                        # 0: unconditional
  null_label: bool = True                     # an extra last embedding row for the null label
  dropout: float = 0.0
  groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  asymmetric_downsample: bool = False         # pad (0, 1) before the stride-2 conv, as TF "SAME"
  time_embed_dim: int | None = None           # None: 4 * block_channels[0]
  # SDXL's added conditioning (diffusers' addition_embed_type="text_time"): the pooled text
  # embedding [B, P] and the micro-conditioning ids [B, N] (original size, crop, target size),
  # each id embedded sinusoidally in addition_time_embed_dim, concatenated, and projected by an
  # MLP onto the time embedding (added). addition_embed_dim = P + N * addition_time_embed_dim.
  addition_time_embed_dim: int = 0            # 0: none
  addition_embed_dim: int = 0
  # An image embedding [B, embedding_dim] (a frozen SimCLR/CLIP tower's; zeros: none) projected
  # by an MLP onto the time embedding (added): image variations, RCG.
  embedding_dim: int = 0                      # 0: none
  dtype: Any = jnp.float32                    # compute dtype; params, norms, softmax stay float32
  remat: bool = False                         # recompute each ResBlock/attention in backward

  @property
  def levels(self) -> int:
    return len(self.block_channels)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (self.levels - 1)

  @property
  def null_label_id(self) -> int | None:
    """The label whose embedding is the unconditional one (classifier-free guidance)."""
    return self.num_classes if self.num_classes and self.null_label else None

  def heads_per_level(self) -> tuple[int, ...]:
    if self.head_dim:
      return tuple(max(c // self.head_dim, 1) for c in self.block_channels)
    return _per_level(self.num_heads, self.levels, "num_heads")

  def check_config(self) -> None:
    if self.attention not in ("self", "transformer"):
      raise ConfigError(f"attention must be 'self' or 'transformer', got {self.attention!r}")
    if len(self.attn_levels) != self.levels:
      raise ConfigError(f"attn_levels has {len(self.attn_levels)} entries for "
                        f"{self.levels} levels (block_channels={tuple(self.block_channels)})")
    _per_level(self.transformer_depth, self.levels, "transformer_depth")
    for c, heads in zip(self.block_channels, self.heads_per_level()):
      if c % self.groups:
        raise ConfigError(f"block channels {c} not divisible by groups={self.groups}")
      if heads < 1 or c % heads:
        raise ConfigError(f"block channels {c} not divisible by {heads} attention heads")
    if self.context_dim is not None and self.attention != "transformer":
      raise ConfigError("context_dim (cross-attention) needs attention='transformer'")
    if self.position_embedding and self.attention != "transformer":
      raise ConfigError("position_embedding needs attention='transformer'")

  def _check_inputs(self, x, t, labels, context, embedding=None):
    if x.ndim != 4:
      raise ShapeError(f"x: expected [batch, height, width, channels] (NHWC), got "
                       f"{list(x.shape)}")
    b, h, w, _ = x.shape
    f = self.downsample_factor
    if h % f or w % f:
      raise ShapeError(f"x: height and width must be multiples of {f} (2 ** (levels - 1)) for "
                       f"this U-Net, got {h}x{w}")
    if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and jnp.shape(t)[0] != b):
      raise ShapeError(f"t: expected a scalar or shape [{b}], got {list(jnp.shape(t))}")
    if labels is not None and not self.num_classes:
      raise ConfigError("labels given to a U-Net built without classes (num_classes=0)")
    if labels is None and self.num_classes:
      raise ConfigError(f"labels required: this U-Net is class-conditional "
                        f"(num_classes={self.num_classes}); pass null_label_id for none")
    if labels is not None and jnp.shape(labels) != (b,):
      raise ShapeError(f"labels: expected shape [{b}], got {list(jnp.shape(labels))}")
    if (embedding is None) != (not self.embedding_dim):
      raise ConfigError(f"an embedding [batch, D] is given exactly when the U-Net takes one "
                        f"(embedding_dim={self.embedding_dim}; zeros: no embedding)")
    if embedding is not None and jnp.shape(embedding) != (b, self.embedding_dim):
      raise ShapeError(f"embedding: expected [{b}, {self.embedding_dim}], got "
                       f"{list(jnp.shape(embedding))}")
    if context is not None and self.context_dim is None:
      raise ConfigError("context given to a U-Net built without cross-attention "
                        "(context_dim=None)")
    if context is None and self.context_dim is not None:
      raise ConfigError(f"context required: this U-Net cross-attends to a [batch, length, "
                        f"{self.context_dim}] sequence")
    if context is not None and (context.ndim != 3 or context.shape[0] != b
                                or context.shape[-1] != self.context_dim):
      raise ShapeError(f"context: expected [{b}, length, {self.context_dim}], got "
                       f"{list(context.shape)}")

  def _block(self, module, *args, train: bool | None):
    """Calls a ResBlock or attention block, under nn.remat when self.remat."""
    # `train` is closed over, not passed: jax.checkpoint would trace a bool argument.
    if train is None:
      fn = lambda mdl, *a: mdl(*a)
    else:
      fn = lambda mdl, *a: mdl(*a, train=train)
    return (nn.remat(fn) if self.remat else fn)(module, *args)

  def _res(self, features, name):
    return ResBlock(features, self.groups, self.norm_eps, self.dropout, self.dtype, name=name)

  def _attn(self, level, name, x, context, train):
    c = x.shape[-1]
    heads = self.heads_per_level()[level]
    if self.attention == "self":
      mdl = SpatialSelfAttention(heads, self.groups, self.norm_eps, self.dtype, name=name)
      return self._block(mdl, x, train=None)
    depth = _per_level(self.transformer_depth, self.levels, "transformer_depth")[level]
    mdl = Transformer2D(heads, c // heads, depth, self.context_dim, self.use_linear_projection,
                        self.groups, position_embedding=self.position_embedding,
                        dtype=self.dtype, name=name)
    if context is None:
      return self._block(mdl, x, train=train)
    return self._block(mdl, x, context, train=train)

  @nn.compact
  def __call__(self, x, t, *, labels=None, context=None, added=None, embedding=None,
               train: bool = False):
    """added: {"text_embeds": [B, P], "time_ids": [B, N]} for a U-Net with SDXL's added
    conditioning (addition_time_embed_dim > 0), else None. embedding: [B, embedding_dim] for a
    U-Net conditioned on an image embedding (zeros: unconditional), else None."""
    self.check_config()
    self._check_inputs(x, t, labels, context, embedding)
    if bool(self.addition_time_embed_dim) != (added is not None):
      raise ConfigError("added conditioning ({'text_embeds', 'time_ids'}) is given exactly when "
                        f"the U-Net has it (addition_time_embed_dim="
                        f"{self.addition_time_embed_dim})")
    b = x.shape[0]
    chans = tuple(self.block_channels)
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    # The sinusoidal embedding is float32 whatever the compute dtype: bfloat16 cannot resolve
    # neighbouring timesteps near t = 1000.
    emb = timestep_embedding(t, chans[0], flip_sin_to_cos=self.flip_sin_to_cos,
                             shift=self.freq_shift)
    emb = TimestepEmbedding(self.time_embed_dim or 4 * chans[0], self.dtype,
                            name="time_embedding")(emb)
    if self.num_classes:
      table = nn.Embed(self.num_classes + int(self.null_label), emb.shape[-1],
                       name="class_embedding")
      emb = emb + table(labels).astype(emb.dtype)
    if embedding is not None:
      emb = emb + TimestepEmbedding(emb.shape[-1], self.dtype, name="embedding_proj")(
          jnp.asarray(embedding, jnp.float32))
    if added is not None:
      ids = jnp.asarray(added["time_ids"], jnp.float32)
      if ids.ndim != 2 or ids.shape[0] != b:
        raise ShapeError(f"added['time_ids']: expected [{b}, N], got {list(ids.shape)}")
      ids_emb = timestep_embedding(ids.reshape(-1), self.addition_time_embed_dim,
                                   flip_sin_to_cos=self.flip_sin_to_cos, shift=self.freq_shift)
      cond = jnp.concatenate([jnp.asarray(added["text_embeds"], jnp.float32),
                              ids_emb.reshape(b, -1)], axis=-1)
      if cond.shape[-1] != self.addition_embed_dim:
        raise ShapeError(f"added conditioning: pooled text {added['text_embeds'].shape[-1]} + "
                         f"{ids.shape[1]} ids x {self.addition_time_embed_dim} = "
                         f"{cond.shape[-1]} features, the U-Net takes {self.addition_embed_dim}")
      emb = emb + TimestepEmbedding(emb.shape[-1], self.dtype, name="add_embedding")(cond)
    if context is not None:
      context = context.astype(self.dtype)

    h = Conv(chans[0], (3, 3), dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    skips = [h]
    for i, c in enumerate(chans):
      for j in range(self.layers_per_block):
        h = self._block(self._res(c, f"down_{i}_res_{j}"), h, emb, train=train)
        if self.attn_levels[i]:
          h = self._attn(i, f"down_{i}_attn_{j}", h, context, train)
        skips.append(h)
      if i < self.levels - 1:
        h = Downsample(c, self.asymmetric_downsample, self.dtype, name=f"down_{i}_downsample")(h)
        skips.append(h)

    h = self._block(self._res(chans[-1], "mid_res_0"), h, emb, train=train)
    if self.mid_attention:
      h = self._attn(self.levels - 1, "mid_attn_0", h, context, train)
    h = self._block(self._res(chans[-1], "mid_res_1"), h, emb, train=train)

    for k, i in enumerate(reversed(range(self.levels))):  # k: diffusers' up_blocks index
      for j in range(self.layers_per_block + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = self._block(self._res(chans[i], f"up_{k}_res_{j}"), h, emb, train=train)
        if self.attn_levels[i]:
          h = self._attn(i, f"up_{k}_attn_{j}", h, context, train)
      if i > 0:
        h = Upsample(chans[i], self.dtype, name=f"up_{k}_upsample")(h)

    h = group_norm(self.groups, self.norm_eps, "conv_norm_out", act="silu")(h)
    h = Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv_out")(h)
    return h.astype(jnp.float32)


def ddpm_cifar10(**overrides) -> UNet:
  """The DDPM paper's CIFAR-10 U-Net (google/ddpm-cifar10-32; 35.7M parameters)."""
  cfg = dict(out_channels=3, block_channels=(128, 256, 256, 256), layers_per_block=2,
             attn_levels=(False, True, False, False), mid_attention=True, attention="self",
             num_heads=1, dropout=0.1, groups=32, norm_eps=1e-6, flip_sin_to_cos=False,
             freq_shift=1, asymmetric_downsample=True)
  return UNet(**{**cfg, **overrides})


def stable_diffusion_xl(**overrides) -> UNet:
  """SDXL base's U-Net (stabilityai/stable-diffusion-xl-base-1.0): three levels, transformer
  depth 1/2/10 on the two attention levels (and 10 in the middle), 64-dim heads, context 2048
  (CLIP-L's 768 + OpenCLIP bigG's 1280 per token), added conditioning 1280 + 6 x 256."""
  cfg = dict(out_channels=4, block_channels=(320, 640, 1280), layers_per_block=2,
             attn_levels=(False, True, True), mid_attention=True, attention="transformer",
             num_heads=(5, 10, 20), transformer_depth=(1, 2, 10), context_dim=2048,
             use_linear_projection=True, groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
             freq_shift=0, addition_time_embed_dim=256, addition_embed_dim=2816)
  return UNet(**{**cfg, **overrides})


def stable_diffusion(version: int = 1, **overrides) -> UNet:
  """Stable Diffusion 1.x (context 768, 8 heads, conv proj) or 2.x (1024, 64-dim heads, Dense)."""
  cfg = dict(out_channels=4, block_channels=(320, 640, 1280, 1280), layers_per_block=2,
             attn_levels=(True, True, True, False), mid_attention=True, attention="transformer",
             groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)
  if version == 1:
    cfg.update(num_heads=8, context_dim=768, use_linear_projection=False)
  elif version == 2:
    cfg.update(num_heads=(5, 10, 20, 20), context_dim=1024, use_linear_projection=True)
  else:
    raise ConfigError(f"Stable Diffusion version must be 1 or 2, got {version}")
  return UNet(**{**cfg, **overrides})

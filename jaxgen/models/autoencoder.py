"""Convolutional autoencoders with the structure of Stable Diffusion's AutoencoderKL.

One encoder/decoder pair serves the deterministic autoencoder, the Gaussian VAE with vector
latents (flatten + dense) or spatial latents [h, w, z_channels], and the latent-diffusion KL
autoencoder whose published weights map onto it.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.models.layers import Downsample, ResBlock, SpatialSelfAttention, Upsample, group_norm
from jaxgen.models.ops import Conv


class MidBlock(nn.Module):
  features: int
  groups: int
  eps: float
  attention: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ResBlock(self.features, self.groups, self.eps, dtype=self.dtype, name="res_0")(x)
    if self.attention:
      x = SpatialSelfAttention(1, self.groups, self.eps, self.dtype, name="attn")(x)
    return ResBlock(self.features, self.groups, self.eps, dtype=self.dtype, name="res_1")(x)


class Encoder(nn.Module):
  """x [B, H, W, C] -> features [B, H/f, W/f, out_channels], f = 2 ** (len(ch_mult) - 1)."""
  out_channels: int
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 1
  groups: int = 32
  eps: float = 1e-6
  mid_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, final_conv: bool = True):
    h = Conv(self.ch * self.ch_mult[0], (3, 3), dtype=self.dtype, name="conv_in")(x)
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, self.groups, self.eps, dtype=self.dtype,
                     name=f"down_{i}_res_{j}")(h)
      if i < len(self.ch_mult) - 1:
        h = Downsample(self.ch * mult, asymmetric=True, dtype=self.dtype,
                       name=f"down_{i}_downsample")(h)
    h = MidBlock(self.ch * self.ch_mult[-1], self.groups, self.eps, self.mid_attention,
                 self.dtype, name="mid")(h)
    h = group_norm(self.groups, self.eps, "norm_out", act="silu")(h)
    if not final_conv:
      return h
    return Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv_out")(h)


class Decoder(nn.Module):
  """z [B, h, w, z_channels] -> [B, h*f, w*f, out_channels]."""
  out_channels: int
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 1
  groups: int = 32
  eps: float = 1e-6
  mid_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    top = self.ch * self.ch_mult[-1]
    h = Conv(top, (3, 3), dtype=self.dtype, name="conv_in")(z)
    h = MidBlock(top, self.groups, self.eps, self.mid_attention, self.dtype, name="mid")(h)
    levels = len(self.ch_mult)
    for k, i in enumerate(reversed(range(levels))):  # k: diffusers' up_blocks index
      for j in range(self.num_res_blocks + 1):
        h = ResBlock(self.ch * self.ch_mult[i], self.groups, self.eps, dtype=self.dtype,
                     name=f"up_{k}_res_{j}")(h)
      if i > 0:
        h = Upsample(self.ch * self.ch_mult[i], self.dtype, name=f"up_{k}_upsample")(h)
    h = group_norm(self.groups, self.eps, "norm_out", act="silu")(h)
    return Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv_out")(h)


class Autoencoder(nn.Module):
  """Encoder + decoder with a deterministic or diagonal-Gaussian latent.

  `latent_dim > 0` gives vector latents [B, latent_dim] (flatten + dense); 0 gives spatial
  latents [B, H/f, W/f, z_channels]. With `variational`, encode() returns (mean, logvar);
  otherwise logvar is None. decode() returns the decoder's raw output (logits or means): the
  likelihood and the data scaling belong to the task.
  """
  in_channels: int
  out_channels: int
  image_size: int
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 1
  z_channels: int = 4
  latent_dim: int = 0
  variational: bool = True
  groups: int = 32
  eps: float = 1e-6
  mid_attention: bool = True
  quant_conv: bool = True      # Stable Diffusion's 1x1 convs around the latent
  learn_output_scale: bool = False  # a per-channel log-scale parameter for Gaussian outputs
  dtype: jnp.dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def latent_shape(self) -> tuple[int, ...]:
    if self.latent_dim:
      return (self.latent_dim,)
    s = self.image_size // self.downsample_factor
    return (s, s, self.z_channels)

  def setup(self):
    moments = 2 * self.z_channels if self.variational else self.z_channels
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  groups=self.groups, eps=self.eps, mid_attention=self.mid_attention,
                  dtype=self.dtype)
    self.encoder = Encoder(moments, **common)
    self.decoder = Decoder(self.out_channels, **common)
    s = self.image_size // self.downsample_factor
    if self.latent_dim:
      n = 2 * self.latent_dim if self.variational else self.latent_dim
      self.to_latent = nn.Dense(n, dtype=self.dtype)
      self.from_latent = nn.Dense(s * s * self.z_channels, dtype=self.dtype)
    elif self.quant_conv:
      self.quant = Conv(moments, (1, 1), dtype=self.dtype)
      self.post_quant = Conv(self.z_channels, (1, 1), dtype=self.dtype)
    if self.learn_output_scale:
      self.log_scale = self.param("log_scale", nn.initializers.zeros, (self.out_channels,))

  def encode(self, x):
    if self.latent_dim:
      h = self.encoder(x, final_conv=False)
      m = self.to_latent(h.reshape(h.shape[0], -1))
    else:
      m = self.encoder(x)
      if self.quant_conv:
        m = self.quant(m)
    m = m.astype(jnp.float32)
    if not self.variational:
      return m, None
    mean, logvar = jnp.split(m, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    if self.latent_dim:
      s = self.image_size // self.downsample_factor
      z = self.from_latent(z).reshape(z.shape[0], s, s, self.z_channels)
    elif self.quant_conv:
      z = self.post_quant(z)
    return self.decoder(z).astype(jnp.float32)

  def output_log_scale(self):
    return self.log_scale if self.learn_output_scale else None

  def __call__(self, x):
    mean, _ = self.encode(x)
    return self.decode(mean)

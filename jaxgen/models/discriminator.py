"""The patch discriminator of pix2pix (Isola et al. 2017) as the LDM/taming autoencoders use it:
one real/fake logit per overlapping image patch."""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax.numpy as jnp


class PatchDiscriminator(nn.Module):
  """Images [B, H, W, C] in [-1, 1] -> logits [B, h, w, 1].

  4x4 convs: one of stride 2 with leaky ReLU, `num_layers - 1` more of stride 2 and one of
  stride 1, each doubling the channels (at most 8 * ch) and followed by a normalisation and
  leaky ReLU (0.2), then a 4x4 conv to one channel. num_layers=3, ch=64 is taming's
  NLayerDiscriminator (70x70 receptive field); num_layers=2 (34x34) suits 32 px images.
  """
  ch: int = 64
  num_layers: int = 3
  groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # N(0, 0.02) weights as in pix2pix/taming's weights_init.
    conv = functools.partial(nn.Conv, kernel_size=(4, 4), padding=((1, 1), (1, 1)),
                             kernel_init=nn.initializers.normal(0.02), dtype=self.dtype)
    h = nn.leaky_relu(conv(self.ch, strides=(2, 2), name="conv_0")(x.astype(self.dtype)), 0.2)
    for i in range(1, self.num_layers + 1):
      features = self.ch * min(2 ** i, 8)
      stride = 2 if i < self.num_layers else 1
      h = conv(features, strides=(stride, stride), use_bias=False, name=f"conv_{i}")(h)
      # GroupNorm where taming has BatchNorm: it normalises each image on its own, so real and
      # fake images can share one call and the loss needs no mutable batch statistics.
      h = nn.GroupNorm(num_groups=math.gcd(self.groups, features), dtype=self.dtype,
                       name=f"norm_{i}")(h)
      h = nn.leaky_relu(h, 0.2)
    return conv(1, name="conv_out")(h).astype(jnp.float32)

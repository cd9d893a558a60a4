"""A frozen image embedder: the image tower of a SimCLR or CLIP run, as the conditioning input of
a generator (image variations, representation-conditioned generation).

images [B, H, W, C] in [-1, 1] -> resized to the tower's input size -> encoder -> (CLIP: its
image projection) -> unit norm x sqrt(D), so that every coordinate has about unit scale, as the
generator's Dense layers and a diffusion prior over embeddings expect. A zero vector is the
"no embedding" of classifier-free guidance: no unit-norm embedding is near it.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


class ImageEmbedder(nn.Module):
  encoder: nn.Module              # images in [-1, 1] -> pooled features [B, F]
  image_size: int                 # the tower's input size (images of another size are resized)
  projection: int = 0             # CLIP's image projection to this many features; 0: none

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if (h, w) != (self.image_size, self.image_size):
      x = jax.image.resize(x.astype(jnp.float32), (b, self.image_size, self.image_size, c),
                           "linear", antialias=True)
    feats = self.encoder(x, train=False)
    if self.projection:
      feats = nn.Dense(self.projection, use_bias=False, name="image_proj")(feats)
    feats = feats.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(feats * feats, axis=-1, keepdims=True) + 1e-12)
    return feats / norm * math.sqrt(feats.shape[-1])

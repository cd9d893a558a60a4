"""An image classifier that also returns its penultimate features (for probes and metrics)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.models.resnet import ResNet


class ImageClassifier(nn.Module):
  """ResNet trunk + linear head: images [B, H, W, C] in [-1, 1] -> (features [B, D], logits)."""
  num_classes: int
  stage_sizes: Sequence[int] = (1, 1, 1)
  width: int = 16
  norm: str = "group"
  groups: int = 8
  cifar_stem: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    features = ResNet(stage_sizes=tuple(self.stage_sizes), width=self.width, norm=self.norm,
                      groups=self.groups, cifar_stem=self.cifar_stem, dtype=self.dtype,
                      name="backbone")(x, train=train)
    return features, nn.Dense(self.num_classes, name="head")(features)

"""SimCLR's training module: an image encoder and the projection head the loss sees."""
from __future__ import annotations

import flax.linen as nn


class SimCLRModel(nn.Module):
  encoder: nn.Module
  head: nn.Module

  def __call__(self, x, *, train: bool = False):
    h = self.encoder(x, train=train)
    return h, self.head(h, train=train)

  def features(self, x):
    return self.encoder(x, train=False)

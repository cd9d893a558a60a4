"""Heads on top of encoders: SimCLR's projection MLP and CLIP's linear embedding projection."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class ProjectionHead(nn.Module):
  """SimCLR's g(h): `num_layers` Dense layers, ReLU between them, [B, D] -> [B, out_dim].

  With `batch_norm` (SimCLR's code, and v2), each hidden Dense is followed by BatchNorm
  (`batch_stats`, `train` flag) and loses its bias; `final_bn` also normalises the output
  (SimCLR v2's centred, unscaled BN). Without it this is v1's W2 relu(W1 h).
  """
  hidden_dim: int = 2048
  out_dim: int = 128
  num_layers: int = 2
  batch_norm: bool = True
  final_bn: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    def bn(name, scale=True):
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          use_scale=scale, dtype=self.dtype, name=name)

    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, use_bias=not self.batch_norm, dtype=self.dtype,
                   name=f"dense{i + 1}")(x)
      if self.batch_norm:
        x = bn(f"bn{i + 1}")(x)
      x = nn.relu(x)
    final_bn = self.batch_norm and self.final_bn
    x = nn.Dense(self.out_dim, use_bias=not final_bn, dtype=self.dtype,
                 name=f"dense{self.num_layers}")(x)
    if final_bn:
      x = bn(f"bn{self.num_layers}", scale=False)(x)
    return x.astype(jnp.float32)


class LinearProjection(nn.Module):
  """CLIP's embedding projection: one bias-free matrix [B, D] -> [B, embed_dim], optionally
  L2-normalised (the losses normalise anyway)."""
  embed_dim: int = 512
  use_bias: bool = False
  normalize: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(x.shape[-1] ** -0.5)  # CLIP's proj init: width^-0.5
    x = nn.Dense(self.embed_dim, use_bias=self.use_bias, kernel_init=init, dtype=self.dtype,
                 name="proj")(x).astype(jnp.float32)
    if self.normalize:
      x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x

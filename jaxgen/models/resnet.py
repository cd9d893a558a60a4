"""ResNet encoders (He et al. 2015, torchvision's v1.5 layout) returning pooled features [B, D].

BatchNorm (running statistics in the `batch_stats` collection, updated when `train=True`) or
GroupNorm; the ImageNet stem (7x7/2 conv + 3x3/2 max-pool) or the CIFAR stem (3x3/1 conv, no
pool) used by SimCLR for 28-32 px images. With BatchNorm under jit and a batch sharded on an
Auto mesh axis, the batch statistics are those of the global batch (synchronised BN).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.errors import ConfigError, ShapeError

# torchvision's conv init: He normal on fan-out.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Norm(nn.Module):
  """BatchNorm or GroupNorm by name; `zero_init` starts a residual branch at zero."""
  kind: str = "batch"
  groups: int = 32
  zero_init: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    scale_init = nn.initializers.zeros if self.zero_init else nn.initializers.ones
    if self.kind == "batch":
      # momentum 0.9 here is torchvision's 0.1 (flax weights the old value).
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          scale_init=scale_init, dtype=self.dtype, name="bn")(x)
    return nn.GroupNorm(num_groups=math.gcd(self.groups, x.shape[-1]), epsilon=1e-5,
                        scale_init=scale_init, dtype=self.dtype, name="gn")(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); output channels = features."""
  features: int
  strides: int = 1
  norm: str = "batch"
  groups: int = 32
  zero_init_residual: bool = False
  dtype: jnp.dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = functools.partial(_Norm, self.norm, self.groups, dtype=self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    h = conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv1")(x)
    h = nn.relu(norm(name="norm1")(h, train=train))
    h = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(h)
    h = norm(zero_init=self.zero_init_residual, name="norm2")(h, train=train)
    if x.shape[-1] != self.features or self.strides != 1:
      x = conv(self.features, (1, 1), self.strides, name="shortcut_conv")(x)
      x = norm(name="shortcut_norm")(x, train=train)
    return nn.relu(x + h)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, as in v1.5) -> 1x1 convs (ResNet-50+); output = 4 x features."""
  features: int
  strides: int = 1
  norm: str = "batch"
  groups: int = 32
  zero_init_residual: bool = False
  dtype: jnp.dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = functools.partial(_Norm, self.norm, self.groups, dtype=self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    out = self.features * self.expansion
    h = nn.relu(norm(name="norm1")(conv(self.features, (1, 1), name="conv1")(x), train=train))
    h = conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv2")(h)
    h = nn.relu(norm(name="norm2")(h, train=train))
    h = conv(out, (1, 1), name="conv3")(h)
    h = norm(zero_init=self.zero_init_residual, name="norm3")(h, train=train)
    if x.shape[-1] != out or self.strides != 1:
      x = conv(out, (1, 1), self.strides, name="shortcut_conv")(x)
      x = norm(name="shortcut_norm")(x, train=train)
    return nn.relu(x + h)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """ResNet trunk -> global average pool: [B, H, W, C] -> [B, feature_dim] float32 (and the
last stage's feature map as tokens [B, h * w, feature_dim], row-major, with `return_tokens=True`).

  `width` is the first stage's channels (64 in the papers; 16-32 for tests and small data);
  `num_classes > 0` adds a linear classifier and returns its logits instead.
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  width: int = 64
  cifar_stem: bool = False
  norm: str = "batch"
  groups: int = 32
  zero_init_residual: bool = False
  num_classes: int = 0
  dtype: jnp.dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.width * 2 ** (len(self.stage_sizes) - 1) * BLOCKS[self.block].expansion

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_tokens: bool = False):
    if self.block not in BLOCKS:
      raise ConfigError(f"unknown ResNet block {self.block!r}; choose from {sorted(BLOCKS)}")
    if self.norm not in ("batch", "group"):
      raise ConfigError(f"unknown ResNet norm {self.norm!r}; choose 'batch' or 'group'")
    if x.ndim != 4:
      raise ShapeError(f"ResNet expects images [B, H, W, C], got shape {x.shape}")
    stem_stride = 1 if self.cifar_stem else 4
    if min(x.shape[1:3]) < stem_stride * 2 ** (len(self.stage_sizes) - 1):
      raise ShapeError(f"images of {x.shape[1]}x{x.shape[2]} px are too small for this ResNet "
                       f"(total stride {stem_stride * 2 ** (len(self.stage_sizes) - 1)})")
    x = x.astype(self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    if self.cifar_stem:
      x = conv(self.width, (3, 3), padding=((1, 1), (1, 1)), name="stem_conv")(x)
    else:
      x = conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(x)
    x = nn.relu(_Norm(self.norm, self.groups, dtype=self.dtype, name="stem_norm")(x, train=train))
    if not self.cifar_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block = BLOCKS[self.block]
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = block(self.width * 2 ** i, strides=2 if (i > 0 and j == 0) else 1, norm=self.norm,
                  groups=self.groups, zero_init_residual=self.zero_init_residual,
                  dtype=self.dtype, name=f"stage{i + 1}_block{j + 1}")(x, train=train)
    fmap = x.astype(jnp.float32)
    x = jnp.mean(fmap, axis=(1, 2))  # [B, feature_dim]
    if self.num_classes:
      x = nn.Dense(self.num_classes, name="classifier")(x)
    if return_tokens:
      return x, fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])
    return x


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic")
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic")
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck")

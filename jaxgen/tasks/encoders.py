"""Image encoders from config: the ResNet/ViT trunk shared by SimCLR and the CLIP image tower."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.models.resnet import ResNet
from jaxgen.models.vit import ViT


def image_encoder_section(**overrides) -> dict:
  """Config keys of an image encoder (one section: `model.encoder`)."""
  d = dict(
      kind="resnet",              # resnet | vit
      stage_sizes=(1, 1, 1),      # resnet: blocks per stage
      block="basic",              # resnet: basic | bottleneck
      width=32,                   # resnet: first stage's channels; vit: token width
      norm="batch",               # resnet: batch | group
      groups=8,
      cifar_stem=True,            # resnet: 3x3 stem without max-pool (small images)
      patch_size=4,               # vit
      depth=4,                    # vit
      heads=4,                    # vit
      mlp_ratio=4.0,              # vit
      pool="cls",                 # vit: cls | mean
  )
  d.update(overrides)
  return d


def validate_image_encoder(e, image_size: int, where: str = "model.encoder") -> None:
  if e.kind not in ("resnet", "vit"):
    raise ConfigError(f"{where}.kind must be 'resnet' or 'vit'; got {e.kind!r}.")
  if e.kind == "vit":
    if image_size % e.patch_size:
      raise ConfigError(f"data.image_size={image_size} must be divisible by "
                        f"{where}.patch_size={e.patch_size}.")
    if e.width % e.heads:
      raise ConfigError(f"{where}.width={e.width} must be divisible by {where}.heads={e.heads}.")
  elif e.norm == "group" and e.width % e.groups:
    raise ConfigError(f"{where}.groups={e.groups} must divide {where}.width={e.width}.")


def build_image_encoder(e, dtype=jnp.float32) -> nn.Module:
  """A module mapping images [B, H, W, C] in [-1, 1] to pooled features [B, D]."""
  if e.kind == "resnet":
    return ResNet(stage_sizes=tuple(e.stage_sizes), block=e.block, width=e.width, norm=e.norm,
                  groups=e.groups, cifar_stem=e.cifar_stem, dtype=dtype)
  return ViT(patch_size=e.patch_size, width=e.width, depth=e.depth, heads=e.heads,
             mlp_ratio=e.mlp_ratio, pool=e.pool, dtype=dtype)

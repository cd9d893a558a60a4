"""Modules from config sections whose keys are the modules' own fields.

`section(UNet, ...)` derives a config section from a module's dataclass fields and their
defaults; `build(UNet, section, ...)` builds the module from such a section; `fields_of(module,
keys)` reads a built (e.g. converted) module back into the same keys, which is how importers fill
a config. Adding a field to a module is therefore one edit: it appears in the section, the
builder passes it and the importer copies it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError

_FLAX_FIELDS = ("parent", "name")


def _to_config(value, name: str = ""):
  """A module field value as a config value: dtypes by name, sequences as tuples."""
  if name == "dtype" or name.endswith("_dtype"):
    return np.dtype(value).name
  if isinstance(value, (list, tuple)):
    return tuple(_to_config(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, type) and issubclass(value, np.generic) or isinstance(value, np.dtype):
    return np.dtype(value).name
  return value


def _to_module(name: str, value):
  if name == "dtype" or name.endswith("_dtype"):
    return jnp.dtype(value)
  if isinstance(value, list):
    return tuple(value)
  return value


def module_fields(cls) -> dict[str, Any]:
  """Field name -> default (dataclasses.MISSING when it has none) of a flax module class."""
  return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in _FLAX_FIELDS}


def section(cls, *, exclude: Iterable[str] = (), **overrides) -> dict[str, Any]:
  """A config section of every field of `cls` except `exclude`, at the module's defaults, with
  `overrides` (which may also add training-only keys the builder is told to skip)."""
  exclude = set(exclude)
  out = {}
  for name, default in module_fields(cls).items():
    if name in exclude:
      continue
    if name in overrides:
      out[name] = _to_config(overrides[name], name)
    elif default is dataclasses.MISSING:
      raise TypeError(f"{cls.__name__}.{name} has no default: give it or exclude it")
    else:
      out[name] = _to_config(default, name)
  out.update({k: _to_config(v) for k, v in overrides.items() if k not in out})
  return out


def build(cls, config_section: Mapping[str, Any], *, skip: Iterable[str] = (),
          where: str = "model", **context) -> nn.Module:
  """cls(**fields) from a section whose keys are cls's fields; `skip` names the section's
  training-only keys, `context` the fields that come from elsewhere (data shape, text width)."""
  fields = module_fields(cls)
  skip = set(skip)
  values = dict(config_section.items()) if not hasattr(config_section, "to_dict") else \
      config_section.to_dict()
  unknown = sorted(k for k in values if k not in fields and k not in skip)
  if unknown:
    raise ConfigError(f"{where}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                      f"a field of {cls.__name__}.")
  kwargs = {k: _to_module(k, v) for k, v in values.items() if k in fields}
  kwargs.update(context)
  return cls(**kwargs)


def fields_of(module: nn.Module, keys: Iterable[str]) -> dict[str, Any]:
  """The values of `keys` in a built module, as config values (the inverse of build)."""
  return {k: _to_config(getattr(module, k), k) for k in keys}


# -- the model families' sections and builders ---------------------------------------------------
def image_encoder_section(**overrides) -> dict:
  """Config keys of an image encoder (one section, e.g. `model.encoder`): ResNet or ViT."""
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


def image_encoder(e, dtype=jnp.float32) -> nn.Module:
  """A module mapping images [B, H, W, C] in [-1, 1] to pooled features [B, D]."""
  from jaxgen.models.resnet import ResNet
  from jaxgen.models.vit import ViT
  if e.kind == "resnet":
    return ResNet(stage_sizes=tuple(e.stage_sizes), block=e.block, width=e.width, norm=e.norm,
                  groups=e.groups, cifar_stem=e.cifar_stem, dtype=dtype)
  return ViT(patch_size=e.patch_size, width=e.width, depth=e.depth, heads=e.heads,
             mlp_ratio=e.mlp_ratio, pool=e.pool, dtype=dtype)


def text_section(**overrides) -> dict:
  """Config keys of a text tower and its tokenizer (`model.text`)."""
  d = dict(
      tokenizer="bpe",            # bpe (CLIP's byte-level BPE: no unknown words) | words (the
                                  # training captions' words; others become <unk>, with a warning)
      tokenizer_path="",          # bpe: a folder with vocab.json + merges.txt (SD tokenizer/);
                                  # empty: byte-level merges learned from the training captions
      bpe_merges=2000,            # bpe without tokenizer_path: the most merges to learn
      context_length=16,
      width=64,
      layers=2,
      heads=4,
      mlp_ratio=4.0,
      activation="quick_gelu",
      html_unescape=True,         # bpe: CLIP's text cleaning un-escapes HTML ("&amp;" -> "&");
                                  # transformers' CLIPTokenizer (diffusers pipelines) does not
      causal=True,                # False: bidirectional attention (every token reads the whole
                                  # prompt, as T5/BERT encoders do); CLIP's tower is causal
  )
  d.update(overrides)
  return d


def text_tower(t, tokenizer, projection_dim: int | None = None) -> nn.Module:
  """The text transformer of a `model.text` section (dual encoder and latent diffusion)."""
  from jaxgen.models.text import TextTransformer
  return TextTransformer(vocab_size=tokenizer.vocab_size, hidden_size=t.width,
                         num_layers=t.layers, num_heads=t.heads,
                         mlp_dim=int(t.mlp_ratio * t.width), max_positions=t.context_length,
                         activation=t.activation, projection_dim=projection_dim,
                         eos_token_id=tokenizer.eos_id, causal=t.get("causal", True))


def dual_encoder(m, tokenizer) -> nn.Module:
  """The DualEncoderModule of a clip-task model section."""
  from jaxgen.models.dual_encoder import DualEncoderModule
  return DualEncoderModule(image_encoder(m.encoder), text_tower(m.text, tokenizer, m.embed_dim),
                           m.embed_dim, loss=m.loss, lock_image=m.lock_image,
                           lock_text=m.lock_text)


def captioner_text_section(**overrides) -> dict:
  """model.text of a captioner: the tokenizer keys of text_section and the decoder's shape
  (unimodal_layers: CoCa's text-only layers below the ones that attend to the image)."""
  d = text_section(width=128, layers=3, heads=4, activation="gelu", context_length=16)
  d.update(unimodal_layers=0)
  d.update(overrides)
  return d


def captioner(m, tokenizer) -> nn.Module:
  """The CaptionerModule of a captioner-task model section."""
  from jaxgen.models.captioner import CaptionerModule, TextDecoder
  t = m.text
  decoder = TextDecoder(vocab_size=tokenizer.vocab_size, width=t.width, layers=t.layers,
                        unimodal_layers=t.unimodal_layers, heads=t.heads,
                        mlp_dim=int(t.mlp_ratio * t.width), max_positions=t.context_length,
                        activation=t.activation)
  return CaptionerModule(image_encoder(m.encoder), decoder, embed_dim=m.contrastive_dim,
                         lock_image=m.lock_image)


# UNet fields the text-conditioned U-Net (latent diffusion) takes from elsewhere: the latents fix
# out_channels, the text tower's width context_dim; it has no class labels.
_CONDITIONAL_UNET_FIXED = ("out_channels", "attention", "context_dim", "num_classes", "null_label",
                           "embedding_dim")


def conditional_unet_section(**overrides) -> dict:
  """model.unet of latent diffusion: the UNet's fields, plus num_heads_per_level: () for
  num_heads at every level, else one count per level (SD 2.x: 5, 10, 20, 20), the middle block
  taking the last; likewise transformer_depth_per_level (SDXL: 1, 2, 10)."""
  from jaxgen.models.unet import UNet
  d = section(UNet, exclude=_CONDITIONAL_UNET_FIXED, block_channels=(64, 128),
              layers_per_block=1, attn_levels=(True, True), mid_attention=True, num_heads=4,
              transformer_depth=1, use_linear_projection=True, dropout=0.0, groups=16,
              num_heads_per_level=(), transformer_depth_per_level=())
  d.update(overrides)
  return d


def conditional_unet(u, latent_channels: int, context_dim: int) -> nn.Module:
  """The cross-attention UNet of a conditional_unet_section."""
  from jaxgen.models.unet import UNet
  return build(UNet, u, skip=("num_heads_per_level", "transformer_depth_per_level"),
               where="model.unet", out_channels=latent_channels, attention="transformer",
               context_dim=context_dim, num_heads=tuple(u.num_heads_per_level) or u.num_heads,
               transformer_depth=tuple(u.transformer_depth_per_level) or u.transformer_depth)

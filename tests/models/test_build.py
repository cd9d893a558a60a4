"""Modules from config sections whose keys are the modules' fields, and back (importers)."""
import dataclasses

import jax.numpy as jnp
import pytest

from jaxgen import app
from jaxgen.errors import ConfigError
from jaxgen.models import build
from jaxgen.models.unet import UNet


def test_section_build_and_fields_of_round_trip():
  section = build.section(UNet, exclude=("out_channels",), block_channels=(8, 16),
                          attn_levels=(False, True), groups=4, dtype=jnp.bfloat16)
  fields = {f.name for f in dataclasses.fields(UNet)} - {"parent", "name", "out_channels"}
  assert set(section) == fields and section["dtype"] == "bfloat16"
  unet = build.build(UNet, section, out_channels=3)
  assert unet == UNet(out_channels=3, block_channels=(8, 16), attn_levels=(False, True),
                      groups=4, dtype=jnp.bfloat16)
  assert build.fields_of(unet, section) == section


def test_unknown_section_key_is_named():
  with pytest.raises(ConfigError, match="model: chanels is not a field of UNet"):
    build.build(UNet, {"chanels": 3}, out_channels=1)


def test_every_unet_field_is_a_key_of_the_ddpm_and_ldm_sections():
  """A new UNet field reaches both configs (and the importer, which copies the same keys)
  without another edit."""
  from jaxgen.convert.stable_diffusion import unet_section
  fields = {f.name for f in dataclasses.fields(UNet)} - {"parent", "name"}
  ddpm = set(app.base_config("ddpm").model)
  ldm = set(app.base_config("ldm").model.unet)
  # embedding_dim comes from the frozen embedder (ddpm's model.embedding), never a config key
  assert fields - ddpm == {"out_channels", "attention", "context_dim", "use_linear_projection",
                           "transformer_depth", "embedding_dim"}
  assert fields - ldm == {"out_channels", "attention", "context_dim", "num_classes",
                          "null_label", "embedding_dim"}
  converted = UNet(out_channels=4, block_channels=(8, 16), attn_levels=(True, True), groups=4,
                   attention="transformer", context_dim=8, num_heads=2, time_embed_dim=None)
  assert set(unet_section(converted, {}, 4, 8, "float32")) == ldm

"""diffusers' DiTTransformer2DModel (the published DiT-XL/2 checkpoints) as a jaxgen DiT.

diffusers keeps a copy of the timestep and class embedders in every block (the original keeps
one); the copies of a converted checkpoint are equal, and jaxgen keeps one: a file whose copies
differ is refused rather than silently averaged.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxgen.convert.diffusers import convert_state_dict
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.models.dit import DiT

_RULES = [
    (r"^patch_embed\b", "pos_embed.proj"),
    (r"^t_embed_(\d)\b", r"emb.timestep_embedder.linear_\1"),
    (r"^y_embed\b", "emb.class_embedder.embedding_table"),
    (r"^final_modulation\b", "proj_out_1"),
    (r"^final_linear\b", "proj_out_2"),
    (r"\bblocks_(\d+)\b", r"transformer_blocks.\1"),
    (r"\badaLN_modulation\b", "norm1.linear"),
    (r"\battn\b", "attn1"),
    (r"\bto_out\b", "to_out.0"),
    (r"\bmlp/fc1\b", "ff.net.0.proj"),
    (r"\bmlp/fc2\b", "ff.net.2"),
]


def dit_from_config(config: Mapping[str, Any], *, dtype=jnp.float32) -> DiT:
  """The DiT of a DiTTransformer2DModel config (adaLN-Zero, tanh GELU, biased attention)."""
  fixed = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
               norm_elementwise_affine=False)
  for key, value in fixed.items():
    if config.get(key, value) != value:
      raise ConfigError(f"DiTTransformer2DModel: {key}={config[key]!r} is not supported "
                        f"(jaxgen's DiT has {key}={value!r})")
  heads = config.get("num_attention_heads", 16)
  in_channels = config.get("in_channels", 4)
  return DiT(patch_size=config.get("patch_size", 2), depth=config.get("num_layers", 28),
             hidden_size=heads * config.get("attention_head_dim", 72), heads=heads,
             out_channels=config.get("out_channels") or in_channels,
             num_classes=config.get("num_embeds_ada_norm", 1000), freq_shift=1.0,
             mlp_eps=config.get("norm_eps", 1e-5), dtype=jnp.dtype(dtype).name)


def _shared_embedder(state_dict: Mapping[str, Any]) -> dict:
  """The state dict with block 0's embedder under 'emb.' and the other blocks' copies dropped
  (after checking they are equal)."""
  prefix = "transformer_blocks.0.norm1.emb."
  out = {k: v for k, v in state_dict.items() if ".norm1.emb." not in k}
  for name, value in state_dict.items():
    if ".norm1.emb." not in name:
      continue
    block, _, rest = name.partition(".norm1.emb.")
    if name.startswith(prefix):
      out["emb." + rest] = value
    elif prefix + rest not in state_dict or not np.array_equal(
        np.asarray(value), np.asarray(state_dict[prefix + rest])):
      raise CheckpointError(f"{name} differs from block 0's embedder: jaxgen's DiT shares one "
                            "timestep/class embedder across blocks, as the original does")
  return out


def from_diffusers_dit(config: Mapping[str, Any], state_dict: Mapping[str, Any], *,
                       dtype=jnp.float32, param_dtype=np.float32) -> tuple[DiT, dict]:
  """(DiT, variables) from a DiTTransformer2DModel config and state dict (name -> array)."""
  module = dit_from_config(config, dtype=dtype)
  p = module.patch_size
  args = (jnp.zeros((1, p, p, config.get("in_channels", 4))), jnp.zeros((1,)))
  kwargs = {"labels": jnp.zeros((1,), jnp.int32)}
  variables = convert_state_dict(module, args, _shared_embedder(state_dict), _RULES,
                                 param_dtype=param_dtype, init_kwargs=kwargs)
  return module, variables

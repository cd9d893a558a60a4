"""Import Hugging Face CLIP text encoders and tokenizers (Stable Diffusion's `text_encoder/`,
`text_encoder_2/`, `tokenizer/` folders) into `TextTransformer` and `BPETokenizer`, without torch.

CLIPTextModel and CLIPTextModelWithProjection state dicts are accepted with or without the
`text_model.` prefix (transformers 4 wrote it for both; transformers 5 drops it for
CLIPTextModel). Every tensor must land in exactly one parameter of the right shape and every
parameter must be filled; the one tensor skipped is the `position_ids` buffer of older files.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxgen.convert.common import check_complete
from jaxgen.errors import CheckpointError, ConfigError, DataError
from jaxgen.models.text import ACTIVATIONS, TextTransformer
from jaxgen.text.bpe import CLIP_MERGES_FILE, CLIP_NUM_MERGES, BPETokenizer

PREFIX = "text_model."
IGNORED = frozenset({"embeddings.position_ids"})  # a buffer (arange), not a weight
# transformers' CLIPTextConfig defaults, for keys a config.json leaves out
HF_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                   num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                   hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def text_transformer_from_config(config: Mapping[str, Any], *, with_projection: bool | None = None,
                                 dtype=jnp.float32) -> TextTransformer:
  """The TextTransformer for a CLIPTextConfig dict (a full CLIPConfig's text_config is taken).

  with_projection: None follows the config's `architectures` (CLIPTextModelWithProjection).
  """
  if "text_config" in config:
    config = config["text_config"]
  c = {**HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
  if c["hidden_act"] not in ACTIVATIONS:
    raise ConfigError(f"hidden_act {c['hidden_act']!r} is not supported (supported: "
                      f"{', '.join(sorted(ACTIVATIONS))})")
  if with_projection is None:
    with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
  # transformers' rule: configs saved before its PR #24773 carry eos_token_id=2 and pool at the
  # largest id (CLIP's end token is the last in its vocabulary); newer ones at the end token.
  legacy = c["eos_token_id"] == 2
  return TextTransformer(
      vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
      num_heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
      max_positions=c["max_position_embeddings"], activation=c["hidden_act"],
      eps=c["layer_norm_eps"], projection_dim=c["projection_dim"] if with_projection else None,
      eos_token_id=c["eos_token_id"], pooling="argmax" if legacy else "eos", dtype=dtype)


def hf_name(path: tuple[str, ...]) -> str:
  """Hugging Face's name (without `text_model.`) for a flax parameter path."""
  head, leaf = path[0], _LEAF[path[-1]]
  if head in ("token_embedding", "position_embedding"):
    return f"embeddings.{head}.{leaf}"
  if head.startswith("layers_"):
    return ".".join(("encoder", "layers", head[len("layers_"):], *path[1:-1], leaf))
  return f"{head}.{leaf}"  # final_layer_norm, text_projection (outside text_model.)


def convert_state_dict(module: TextTransformer, state_dict: Mapping[str, Any], *,
                       param_dtype=np.float32) -> dict:
  """{"params": ...} (numpy) for `module` from a CLIP text state dict; CheckpointError naming the
  missing, unused and mis-shaped tensors otherwise."""
  sd = {}
  for name, value in state_dict.items():
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if key in sd:
      raise CheckpointError(f"tensor {key} appears both with and without the {PREFIX!r} prefix")
    sd[key] = value
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids))["params"]
  out, used, missing, misshaped = {}, set(), [], []
  for path, target in traverse_util.flatten_dict(shapes).items():
    name = hf_name(path)
    if name not in sd:
      missing.append(name)
      continue
    used.add(name)
    a = np.asarray(sd[name])
    value = a.T if path[-1] == "kernel" and a.ndim == 2 else a  # torch Linear is [out, in]
    if value.shape != target.shape:
      misshaped.append(f"{name} {list(a.shape)} (model wants {list(target.shape[::-1])})"
                       if path[-1] == "kernel" else
                       f"{name} {list(a.shape)} (model wants {list(target.shape)})")
      continue
    out[path] = np.asarray(value, param_dtype)
  unused = sorted(set(sd) - used - IGNORED)
  check_complete("CLIP text", missing, misshaped, unused)
  return {"params": traverse_util.unflatten_dict(out)}



def from_hf_clip_text(state_dict: Mapping[str, Any], config: Mapping[str, Any], *,
                      dtype=jnp.float32, param_dtype=np.float32) -> tuple[nn.Module, dict]:
  """(TextTransformer, variables) from a CLIPTextModel[WithProjection] state dict (name -> numpy
  array, e.g. from safetensors) and its config.json dict. The projection is built when the state
  dict holds `text_projection.weight` or the config names CLIPTextModelWithProjection (then the
  tensor must be there). dtype is the compute dtype; params are param_dtype."""
  with_projection = (any(k.removeprefix(PREFIX) == "text_projection.weight" for k in state_dict)
                     or "CLIPTextModelWithProjection" in (config.get("architectures") or ()))
  module = text_transformer_from_config(config, with_projection=with_projection, dtype=dtype)
  return module, convert_state_dict(module, state_dict, param_dtype=param_dtype)


def _read_json(path: pathlib.Path, error=CheckpointError) -> dict:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise error(f"cannot read {path}: {e}") from e


def load_text_encoder(path, *, variant: str | None = None, dtype=jnp.float32,
                      param_dtype=np.float32) -> tuple[nn.Module, dict]:
  """(TextTransformer, variables) from a Hugging Face folder such as `<sd>/text_encoder`:
  config.json + model[.variant].safetensors, or its sharded form with a .safetensors.index.json.
  """
  from jaxgen.convert.diffusers import read_safetensors  # reads bfloat16 files too

  path = pathlib.Path(path)
  if not (path / "config.json").exists():
    raise CheckpointError(f"{path}: no config.json (expected a transformers model folder such as "
                          f"<model>/text_encoder)")
  config = _read_json(path / "config.json")
  stem = "model" + (f".{variant}" if variant else "")
  single, index = path / f"{stem}.safetensors", path / f"{stem}.safetensors.index.json"
  if single.exists():
    state_dict = read_safetensors(single)
  elif index.exists():
    state_dict = {}
    for shard in sorted(set(_read_json(index)["weight_map"].values())):
      state_dict.update(read_safetensors(path / shard))
  else:
    raise CheckpointError(f"{path}: no {single.name} (only safetensors files are read; re-save a "
                          f"pytorch_model.bin with transformers' save_pretrained first)")
  return from_hf_clip_text(state_dict, config, dtype=dtype, param_dtype=param_dtype)


def _token(value) -> str | None:
  """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def load_tokenizer(path, **overrides) -> BPETokenizer:
  """BPETokenizer from a Hugging Face CLIP tokenizer folder (vocab.json, merges.txt, optional
  tokenizer_config.json and special_tokens_map.json; the latter wins, as in transformers: that
  is how SD 2.x's tokenizer pads with '!').

  context_length is model_max_length (77 when absent or a placeholder); keyword `overrides` go to
  BPETokenizer (e.g. truncate=True, html_unescape=False for transformers' fast tokenizer).
  """
  path = pathlib.Path(path)
  clip_merges = path / CLIP_MERGES_FILE
  if not (path / "vocab.json").exists() and clip_merges.exists():
    # OpenAI's merges file alone: CLIP's vocabulary is derived from its first merges.
    return BPETokenizer.from_clip_merges(clip_merges, CLIP_NUM_MERGES, **overrides)
  for name in ("vocab.json", "merges.txt"):
    if not (path / name).exists():
      raise DataError(f"{path}: no {name} (expected a CLIP tokenizer folder such as "
                      f"<model>/tokenizer, or one holding CLIP's {CLIP_MERGES_FILE})")
  settings: dict[str, Any] = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    if (path / name).exists():
      settings.update({k: v for k, v in _read_json(path / name, DataError).items()
                       if v is not None})
  kwargs: dict[str, Any] = {}
  for role in ("bos", "eos", "pad", "unk"):
    token = _token(settings.get(f"{role}_token"))
    if token is not None:
      kwargs[f"{role}_token"] = token
  length = settings.get("model_max_length")
  # transformers writes a huge placeholder when no length was set
  kwargs["context_length"] = length if isinstance(length, int) and 1 < length < 1_000_000 else 77
  kwargs.update(overrides)
  return BPETokenizer.from_files(path / "vocab.json", path / "merges.txt", **kwargs)

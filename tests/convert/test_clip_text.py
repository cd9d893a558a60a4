"""Hugging Face CLIP text encoders and tokenizer folders -> TextTransformer / BPETokenizer.

torch and transformers serve only as the reference: tiny random models, same ids, same numbers.
"""
import json

import numpy as np
import pytest

from jaxgen.convert.clip_text import from_hf_clip_text, load_text_encoder, load_tokenizer
from jaxgen.errors import CheckpointError, DataError
from jaxgen.text.bpe import BOS, EOS, clip_vocab

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 120
BOS_ID, EOS_ID = 118, 119  # the end token has the largest id, as in CLIP's vocabulary
IDS = np.array([[BOS_ID, 5, 17, 42, EOS_ID] + [EOS_ID] * 11,  # SD 1.x: padded with the end token
                [BOS_ID] + list(range(60, 73)) + [EOS_ID, 0],  # SD 2.x: padded with '!' (0)
                [BOS_ID, EOS_ID] + [0] * 14], np.int64)  # the empty prompt


def tiny(cls, act, eos_token_id, projection_dim=24, seed=0):
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, hidden_act=act,
      projection_dim=projection_dim, bos_token_id=BOS_ID, eos_token_id=eos_token_id, pad_token_id=1)
  model = cls(config).eval()
  with torch.no_grad():  # larger than CLIP's init, so attention and the MLP are far from trivial
    for name, p in model.named_parameters():
      if "layer_norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model


def state_dict_of(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def reference(model, ids, mask=None):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                 output_hidden_states=True)


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("act, eos_token_id, pooling", [
    ("quick_gelu", 2, "argmax"),  # SD 1.x's config.json: the legacy eos_token_id, argmax pooling
    ("gelu", EOS_ID, "eos")])
def test_clip_text_model_matches_transformers(act, eos_token_id, pooling):
  hf = tiny(transformers.CLIPTextModel, act, eos_token_id)
  module, variables = from_hf_clip_text(state_dict_of(hf), hf.config.to_dict())
  assert module.pooling == pooling and module.projection_dim is None
  mask = (IDS != 0).astype(np.int64)
  mask[0, 5:] = 0
  ref, ref_masked = reference(hf, IDS), reference(hf, IDS, mask)
  out = module.apply(variables, IDS, output_hidden_states=True)
  masked = module.apply(variables, IDS, mask)
  errs = dict(last=max_err(out["last_hidden_state"], ref.last_hidden_state),
              pooled=max_err(out["pooler_output"], ref.pooler_output),
              hidden=max(max_err(a, b) for a, b in zip(out["hidden_states"], ref.hidden_states)),
              masked=max_err(masked["last_hidden_state"], ref_masked.last_hidden_state))
  assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
  scale = float(np.abs(ref.last_hidden_state.numpy()).max())
  assert scale > 1 and max(errs.values()) < 2e-5 * scale, errs


def test_with_projection_round_trip_through_save_pretrained(tmp_path):
  hf = tiny(transformers.CLIPTextModelWithProjection, "gelu", EOS_ID, seed=1)
  hf.save_pretrained(tmp_path)
  module, variables = load_text_encoder(tmp_path)
  assert module.projection_dim == 24 and module.hidden_size == 32
  ref = reference(hf, IDS)
  out = module.apply(variables, IDS)
  assert max_err(out["last_hidden_state"], ref.last_hidden_state) < 1e-4
  assert max_err(out["text_embeds"], ref.text_embeds) < 1e-4
  # the penultimate layer, unnormalised, as SDXL conditions on it
  penultimate = module.apply(variables, IDS, layer_index=-2)["layer_hidden_state"]
  assert max_err(penultimate, ref.hidden_states[-2]) < 1e-4


def test_bfloat16_file_and_legacy_prefix(tmp_path):
  hf = tiny(transformers.CLIPTextModel, "quick_gelu", 2, seed=2)
  hf.to(torch.bfloat16).save_pretrained(tmp_path)
  module, variables = load_text_encoder(tmp_path)  # bfloat16 tensors -> float32 params
  assert variables["params"]["final_layer_norm"]["scale"].dtype == np.float32
  ref = reference(hf.float(), IDS)
  assert max_err(module.apply(variables, IDS)["last_hidden_state"], ref.last_hidden_state) < 1e-4
  # transformers 4 (and Stable Diffusion's files) prefix every name with `text_model.`, and kept
  # the position_ids buffer
  sd = {"text_model." + k: v for k, v in state_dict_of(hf).items()}
  sd["text_model.embeddings.position_ids"] = np.arange(16)[None]
  module2, variables2 = from_hf_clip_text(sd, hf.config.to_dict())
  np.testing.assert_array_equal(module2.apply(variables2, IDS)["last_hidden_state"],
                                module.apply(variables, IDS)["last_hidden_state"])


def test_mismatched_weights_are_named():
  hf = tiny(transformers.CLIPTextModel, "quick_gelu", 2)
  config = hf.config.to_dict()
  sd = state_dict_of(hf)
  extra = dict(sd, **{"vision_model.post_layernorm.weight": np.ones(4, np.float32)})
  with pytest.raises(CheckpointError, match="1 tensors are not used by the model: "
                     "vision_model.post_layernorm.weight"):
    from_hf_clip_text(extra, config)
  missing = {k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"}
  with pytest.raises(CheckpointError, match="1 parameters have no tensor: "
                     "encoder.layers.1.mlp.fc2.bias"):
    from_hf_clip_text(missing, config)
  with pytest.raises(CheckpointError, match=r"tensors have the wrong shape: "
                     r"embeddings.position_embedding.weight \[16, 32\] \(model wants \[77, 32\]\)"):
    from_hf_clip_text(sd, dict(config, max_position_embeddings=77))
  with pytest.raises(CheckpointError, match="1 parameters have no tensor: text_projection.weight"):
    from_hf_clip_text(sd, dict(config, architectures=["CLIPTextModelWithProjection"]))
  with pytest.raises(CheckpointError, match="no config.json"):
    load_text_encoder("/nonexistent/text_encoder")


def test_tokenizer_folder(tmp_path):
  merges = [("l", "o"), ("lo", "w</w>")]
  vocab = clip_vocab(merges)
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\n")
  # SD 2.x's folder: tokenizer_config says one pad token, special_tokens_map another, which wins
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "model_max_length": 6, "pad_token": "<|endoftext|>",
      "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False},
      "eos_token": {"__type": "AddedToken", "content": EOS}}))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
  tok = load_tokenizer(tmp_path)
  assert tok.context_length == 6 and tok.pad_token == "!" and tok.pad_id == 0
  np.testing.assert_array_equal(tok("low")["input_ids"][0],
                                [vocab[BOS], vocab["low</w>"], vocab[EOS], 0, 0, 0])
  ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
  assert ref.pad_token == "!" and ref.model_max_length == 6
  # no tokenizer_config.json at all: 77 tokens, padded with the end token (SD 1.x)
  (tmp_path / "tokenizer_config.json").unlink()
  (tmp_path / "special_tokens_map.json").unlink()
  tok = load_tokenizer(tmp_path, truncate=True)
  assert tok.context_length == 77 and tok.pad_id == vocab[EOS] and tok.truncate
  (tmp_path / "merges.txt").unlink()
  with pytest.raises(DataError, match="no merges.txt"):
    load_tokenizer(tmp_path)


def test_tokenizer_folder_with_clips_merges_file_alone(tmp_path):
  """A folder holding OpenAI's bpe_simple_vocab_16e6.txt.gz only gives the tokenizer that
  vocab.json + merges.txt of the same merges give (the vocabulary is derived from them)."""
  import gzip
  merges = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>")]
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "vocab.json").write_text(json.dumps(clip_vocab(merges)))
  (hf / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  only = tmp_path / "clip"
  only.mkdir()
  with gzip.open(only / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
    f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\n"
            + "".join(f"{a} {b}\n" for a, b in merges))
  texts = ["low lower", "a newer lowest"]
  np.testing.assert_array_equal(load_tokenizer(only)(texts)["input_ids"],
                                load_tokenizer(hf)(texts)["input_ids"])
  # stored in a run's workdir and read back from there
  from jaxgen.text.store import load_tokenizer as from_workdir
  from jaxgen.text.store import save_tokenizer
  text = dict(tokenizer="bpe", tokenizer_path=str(only), context_length=77, html_unescape=True)
  save_tokenizer(tmp_path / "run", {"model": {"text": text}}, None, str(only))
  again = from_workdir(tmp_path / "run", {"model": {"text": text}})
  np.testing.assert_array_equal(again(texts)["input_ids"], load_tokenizer(hf)(texts)["input_ids"])

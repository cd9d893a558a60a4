"""Tokenizers for text conditioning: CLIP's byte-level BPE (`bpe`), a word-level one (`words`),
and the batch packing both share (`pack`: start/end tokens, padding, over-length policy)."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from jaxgen.errors import ConfigError, TokenError

log = logging.getLogger(__name__)


def as_batch(texts: str | Sequence[str]) -> list[str]:
  """A single string is a batch of one; anything else must be a sequence of strings."""
  if isinstance(texts, str):
    return [texts]
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"prompt {i} is of type {type(t).__name__}, not str")
  return texts


def _preview(text: str, n: int = 60) -> str:
  return repr(text if len(text) <= n else text[:n] + "...")


def pack(token_lists: Sequence[Sequence[int]], texts: Sequence[str], *, bos_id: int,
         eos_id: int, pad_id: int, context_length: int, truncate: bool) -> dict[str, np.ndarray]:
  """Adds start/end tokens to each list of prompt tokens and pads them to one [B, L] array.

  This is what every tokenizer's `tokenizer(texts, *, truncate=None)` returns, numpy arrays:
    input_ids       int32 [B, L]  start token, the prompt's tokens, end token, then padding
    attention_mask  int32 [B, L]  1 on the start token, the prompt and the end token; 0 on padding
    lengths         int32 [B]     tokens before the padding (start and end tokens included)
    eos_positions   int32 [B]     index of the end token (= lengths - 1): where CLIP pools

  L is the context length. A prompt with more than L tokens (counting the start and end tokens)
  raises TokenError saying how many it has, unless `truncate`, which keeps its first L - 1 tokens,
  ends them with the end token (CLIP's rule) and logs a warning. An empty prompt is start + end +
  padding: Stable Diffusion's unconditional prompt, so it is allowed.
  """
  batch = len(token_lists)
  ids = np.full((batch, context_length), pad_id, np.int32)
  mask = np.zeros((batch, context_length), np.int32)
  lengths = np.zeros((batch,), np.int32)
  cut = []
  for i, tokens in enumerate(token_lists):
    seq = [bos_id, *tokens, eos_id]
    if len(seq) > context_length:
      if not truncate:
        raise TokenError(
            f"prompt {i} ({_preview(texts[i])}) has {len(seq)} tokens, counting the start and end "
            f"tokens, but the context length is {context_length}: shorten it, or keep its first "
            f"{context_length - 2} tokens with truncate=True (Python) or --truncate (jaxgen "
            f"generate)")
      cut.append(len(seq))
      # the end token must survive: CLIP pools there, and the U-Net saw it in every training prompt
      seq = seq[:context_length - 1] + [eos_id]
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
    lengths[i] = len(seq)
  if cut:
    log.warning("truncated %d of %d prompts to the context length %d (the longest had %d tokens)",
                len(cut), batch, context_length, max(cut))
  return dict(input_ids=ids, attention_mask=mask, lengths=lengths, eos_positions=lengths - 1)


def check_context_length(context_length: int) -> int:
  if int(context_length) < 2:
    raise ConfigError(f"context_length must leave room for the start and end tokens, got "
                      f"{context_length}")
  return int(context_length)


def from_config(t, captions_fn):
  """The tokenizer a `model.text` section describes. The word tokenizer's vocabulary is built
  from the training captions (`captions_fn()`, read only here); BPE reads tokenizer_path (CLIP's
  published vocabulary, a Stable Diffusion tokenizer/ folder), or without one learns byte-level
  merges (at most `bpe_merges`) from the training captions: no word is then unknown. A run stores
  its tokenizer in its workdir (jaxgen.weights), so loading a run never calls this."""
  if t.tokenizer == "words":
    from jaxgen.text.words import WordTokenizer
    return WordTokenizer.build(captions_fn(), context_length=t.context_length)
  if t.tokenizer == "bpe":
    if not t.tokenizer_path:
      from jaxgen.text.bpe import BPETokenizer
      captions = [str(c) for c in captions_fn()]
      tok = BPETokenizer.learn(captions, t.get("bpe_merges", 2000),
                               context_length=t.context_length, html_unescape=t.html_unescape)
      log.info("Learned %d byte-level BPE merges from %d training captions (vocabulary %d).",
               len(tok.ranks), len(captions), tok.vocab_size)
      return tok
    from jaxgen.convert.clip_text import load_tokenizer
    return load_tokenizer(t.tokenizer_path, context_length=t.context_length,
                          html_unescape=t.html_unescape)
  raise ConfigError(f"model.text.tokenizer must be 'words' or 'bpe'; got {t.tokenizer!r}.")

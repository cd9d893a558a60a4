"""A word-level tokenizer built from a data set's captions, for small text-conditioned models."""
from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

from jaxgen.errors import DataError
from jaxgen.text import as_batch, check_context_length, pack

log = logging.getLogger(__name__)

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIALS = (PAD, UNK, START, END)
FORMAT = "jaxgen.words/1"
_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script, not '_'


def split_words(text: str) -> list[str]:
  return _WORD.findall(unicodedata.normalize("NFC", text).lower())


class WordTokenizer:
  """`tokenizer(texts)` -> dict(input_ids, attention_mask, lengths, eos_positions) of numpy int32
  arrays, with the over-length policy of `jaxgen.text.pack` (the BPE tokenizer's call API).

  Words are the runs of letters and digits of the lower-cased, NFC-normalised text (anything else,
  '_' included, separates words). Ids 0-3 are <pad>, <unk>, <start>, <end>; the words follow.
  """
  pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

  def __init__(self, words: Sequence[str], *, context_length: int = 16, truncate: bool = False):
    words = list(words)
    bad = [w for w in words if not isinstance(w, str) or split_words(w) != [w]]
    if bad:
      raise DataError(f"{len(bad)} vocabulary entries are not lower-case words, e.g. {bad[0]!r}")
    if len(set(words)) != len(words):
      dup = next(w for w, n in collections.Counter(words).items() if n > 1)
      raise DataError(f"the word {dup!r} appears twice in the vocabulary")
    self.words = words
    self.tokens = [*SPECIALS, *words]
    self.ids = {w: i for i, w in enumerate(self.tokens)}
    self.context_length = check_context_length(context_length)
    self.truncate = truncate
    self._warned: set[str] = set()

  @classmethod
  def build(cls, captions: Iterable[str], *, context_length: int = 16, min_count: int = 1,
            max_words: int | None = None, truncate: bool = False) -> WordTokenizer:
    """Vocabulary of the words seen at least `min_count` times, most frequent first (ties in
    alphabetical order, so the ids do not depend on caption order), at most `max_words`."""
    counts = collections.Counter(w for c in captions for w in split_words(c))
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    if max_words is not None:
      words = words[:max_words]
    return cls(words, context_length=context_length, truncate=truncate)

  @property
  def vocab_size(self) -> int:
    return len(self.tokens)

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without the start and end tokens; unknown words -> <unk>."""
    return [self.ids.get(w, self.unk_id) for w in split_words(text)]

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
    """Words of the ids joined by spaces; skip_special drops <pad>, <start> and <end>."""
    skip = {self.pad_id, self.bos_id, self.eos_id} if skip_special else set()
    return " ".join(self.tokens[int(i)] for i in ids if int(i) not in skip)

  def __call__(self, texts: str | Sequence[str], *, truncate: bool | None = None
               ) -> dict[str, np.ndarray]:
    texts = as_batch(texts)
    unknown = sorted({w for t in texts for w in split_words(t) if w not in self.ids}
                     - self._warned)
    if unknown:
      # Once per word: a prompt whose words the model never saw is silently another prompt.
      self._warned.update(unknown)
      log.warning("%d word(s) are not in the vocabulary of %d words and become <unk>: %s",
                  len(unknown), len(self.words), ", ".join(repr(w) for w in unknown[:20])
                  + (" ..." if len(unknown) > 20 else ""))
    return pack([self.encode(t) for t in texts], texts, bos_id=self.bos_id, eos_id=self.eos_id,
                pad_id=self.pad_id, context_length=self.context_length,
                truncate=self.truncate if truncate is None else truncate)

  def save(self, path: str | os.PathLike) -> None:
    """JSON with the words (ids from 4 on) and the context length; written then renamed, so an
    interrupted save never leaves a half file at `path`."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(format=FORMAT, context_length=self.context_length,
                                   words=self.words), ensure_ascii=False, indent=0) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike, *, truncate: bool = False) -> WordTokenizer:
    try:
      data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise DataError(f"cannot read the word vocabulary {path}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
      raise DataError(f"{path} is not a jaxgen word vocabulary (expected format {FORMAT!r})")
    if not isinstance(data.get("words"), list) or not isinstance(data.get("context_length"), int):
      raise DataError(f"{path} lacks its 'words' list or integer 'context_length'")
    return cls(data["words"], context_length=data["context_length"], truncate=truncate)

  def __repr__(self) -> str:
    return f"WordTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"

"""CLIP's byte-level BPE tokenizer in pure Python, reading OpenAI's merges file or Hugging Face's
vocab.json + merges.txt (the `tokenizer/` folder of a Stable Diffusion checkpoint)."""
from __future__ import annotations

import copy
import gzip
import html
import json
import os
import re
import unicodedata
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxgen.errors import DataError
from jaxgen.text import as_batch, check_context_length, pack

# OpenAI's merges file lists more merges than CLIP uses; its 49,408-token vocabulary is 256 byte
# characters, the same with '</w>', these many merges, and the two special tokens.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI's merges-only file
END_OF_WORD = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Unicode's White_Space property: what `\s` means in CLIP's `regex` pattern and in Hugging Face's
# tokenizers. Python's str.isspace() differs (it adds U+001C..U+001F).
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                       + "".join(chr(c) for c in range(0x2000, 0x200B)))
_WHITESPACE_RUN = re.compile("[" + "".join(WHITESPACE) + "]+")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable characters.

  Printable Latin-1 bytes map to themselves; the others (controls, space, soft hyphen) to
  U+0100 onwards, so no BPE symbol is whitespace. The dict's order is CLIP's vocabulary order.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  table = {b: chr(b) for b in printable}
  for n, b in enumerate(b for b in range(256) if b not in table):
    table[b] = chr(256 + n)
  return table


def _kind(c: str) -> str:
  """' ' whitespace, 'L' letter, 'N' number, 'P' anything else (the pattern's third class)."""
  if c in WHITESPACE:
    return " "
  cat = unicodedata.category(c)[0]
  return cat if cat in ("L", "N") else "P"


def read_merges(path: str | os.PathLike, num_merges: int | None = None) -> list[tuple[str, str]]:
  """Merge pairs in rank order from merges.txt or OpenAI's .txt.gz (a '#version' first line and
  blank lines are skipped)."""
  path = os.fspath(path)
  try:
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz")
          else open(path, encoding="utf-8")) as f:
      lines = f.read().split("\n")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read the BPE merges file {path}: {e}") from e
  start = 1 if lines and "#version" in lines[0] else 0
  merges = []
  for n, line in enumerate(lines[start:], start + 1):
    line = line.rstrip("\r")
    if not line:
      continue
    parts = line.split(" ")
    if len(parts) != 2 or not all(parts):
      raise DataError(f"{path}, line {n}: expected a merge 'left right', got {line!r}")
    merges.append((parts[0], parts[1]))
  return merges if num_merges is None else merges[:num_merges]


def clip_vocab(merges: Sequence[tuple[str, str]], specials: Sequence[str] = (BOS, EOS)
               ) -> dict[str, int]:
  """CLIP's vocabulary derived from its merges: bytes, bytes + '</w>', merge results, specials."""
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + END_OF_WORD for c in chars] + [a + b for a, b in merges] + list(specials)
  vocab = {}
  for t in tokens:
    vocab.setdefault(t, len(vocab))
  if len(vocab) != len(tokens):
    raise DataError("the merges produce the same token twice: not a CLIP merges file")
  return vocab


def learn_merges(texts: Sequence[str], num_merges: int, *, min_frequency: int = 2,
                 html_unescape: bool = True) -> list[tuple[str, str]]:
  """Byte-level BPE merges learned from `texts` in CLIP's format (Sennrich et al. 2016 on the
  pieces of CLIP's cleaning and pre-tokenisation, bytes as GPT-2's printable characters, '</w>'
  on each piece's last symbol): repeatedly the most frequent adjacent pair, counted over all
  pieces, is merged everywhere, until `num_merges` merges or no pair occurs `min_frequency`
  times. A pair whose result is already a token is skipped (the vocabulary would hold it twice);
  ties go to the pair that sorts last, so the result does not depend on the texts' order. With
  `clip_vocab(merges)` every byte is a token: no text has unknown words."""
  if num_merges < 0:
    raise DataError(f"num_merges must be >= 0; got {num_merges}")
  reader = BPETokenizer(clip_vocab([]), [], html_unescape=html_unescape)
  table = reader.byte_encoder
  counts: dict[tuple[str, ...], int] = {}
  for text in texts:
    for piece in reader.pre_tokenize(reader.clean(str(text))):
      if piece in reader._specials:
        continue
      chars = [table[b] for b in piece.encode("utf-8")]
      word = (*chars[:-1], chars[-1] + END_OF_WORD)
      counts[word] = counts.get(word, 0) + 1
  merges: list[tuple[str, str]] = []
  made = set(table.values()) | {c + END_OF_WORD for c in table.values()}
  words = list(counts.items())
  while len(merges) < num_merges:
    pairs: dict[tuple[str, str], int] = {}
    for word, n in words:
      for pair in zip(word, word[1:]):
        if pair[0] + pair[1] not in made:
          pairs[pair] = pairs.get(pair, 0) + n
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    if pairs[best] < min_frequency:
      break
    merges.append(best)
    joined = best[0] + best[1]
    made.add(joined)
    new_words = []
    for word, n in words:
      if best[0] in word:
        out, i = [], 0
        while i < len(word):  # every non-overlapping occurrence, left to right, as `bpe` does
          if i + 1 < len(word) and (word[i], word[i + 1]) == best:
            out.append(joined)
            i += 2
          else:
            out.append(word[i])
            i += 1
        word = tuple(out)
      new_words.append((word, n))
    words = new_words
  return merges


class BPETokenizer:
  r"""CLIP's tokenizer. `tokenizer(texts)` -> dict(input_ids, attention_mask, lengths,
  eos_positions) of numpy int32 arrays, as described in `jaxgen.text.pack`; `encode`/`decode` for
  one text without the start/end tokens.

  Encoding, as CLIP's:
    1. cleaning: NFC, HTML entities unescaped (twice, as CLIP does), runs of Unicode whitespace
       collapsed to one space, ends stripped, lower case. CLIP also runs `ftfy.fix_text` (mojibake
       repair, curly quotes to straight, ligatures and full-width forms to plain letters); ftfy is
       not a dependency: pass `fix_text=ftfy.fix_text` for OpenAI's exact behaviour on such text.
    2. pre-tokenisation with CLIP's pattern
         <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
       scanned by hand with `unicodedata` (the standard `re` has no \p{...} classes): runs of
       letters, single digits, runs of other non-space characters, English contractions. The
       special-token strings typed in a prompt become the special tokens, as in CLIP.
    3. each piece's UTF-8 bytes mapped to printable characters (GPT-2's byte-to-unicode table),
       the last one marked with '</w>', then merged pair by pair, lowest merge rank first (cached).

  transformers' (fast) CLIPTokenizer does not unescape HTML: `html_unescape=False` matches it
  (text without '&' encodes the same either way). Two deliberate differences remain: the pad
  token only pads (SD 2.x pads with '!', id 0, and transformers then also turns every '!' typed in
  a prompt into it, diffusers issue 4153; OpenCLIP, which SD 2.x was trained with, does not), and
  lower-casing is Python's (a word-final 'Σ' becomes 'ς'; transformers maps it to 'σ').

  pad_token: Stable Diffusion 1.x pads with '<|endoftext|>', 2.x with '!'. Tokens missing from a
  small vocabulary become `unk_token`, as in transformers (CLIP's own vocabulary holds every byte,
  so it never needs it). truncate: the default over-length policy (False: raise TokenError).
  """

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
               context_length: int = 77, bos_token: str = BOS, eos_token: str = EOS,
               pad_token: str = EOS, unk_token: str = EOS, html_unescape: bool = True,
               fix_text: Callable[[str], str] | None = None, truncate: bool = False):
    self.vocab = dict(vocab)
    self.context_length = check_context_length(context_length)
    for role, tok in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token),
                      ("unk", unk_token)):
      if tok not in self.vocab:
        raise DataError(f"the {role} token {tok!r} is not in the vocabulary")
    missing = [f"{a} {b}" for a, b in merges
               if a not in self.vocab or b not in self.vocab or a + b not in self.vocab]
    if missing:
      raise DataError(f"{len(missing)} merges use tokens missing from the vocabulary, e.g. "
                      f"{missing[0]!r}: the vocabulary and merges files do not belong together")
    self.ranks = {pair: r for r, pair in enumerate(merges)}
    self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
    self.bos_id, self.eos_id = self.vocab[bos_token], self.vocab[eos_token]
    self.pad_id, self.unk_id = self.vocab[pad_token], self.vocab[unk_token]
    # Typed in a prompt, the special tokens are matched after lower-casing (CLIP's pattern is
    # case-insensitive).
    self._specials = {bos_token.lower(): self.bos_id, eos_token.lower(): self.eos_id}
    self.html_unescape, self.fix_text, self.truncate = html_unescape, fix_text, truncate
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    self.id_to_token = {i: t for t, i in self.vocab.items()}
    self._cache: dict[str, tuple[str, ...]] = {}

  @classmethod
  def from_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike,
                 **kwargs) -> BPETokenizer:
    """Hugging Face's vocab.json + merges.txt."""
    try:
      with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f"cannot read the vocabulary {vocab_file}: {e}") from e
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
      raise DataError(f"{vocab_file} is not a JSON object of token -> id")
    return cls(vocab, read_merges(merges_file), **kwargs)

  @classmethod
  def from_clip_merges(cls, merges_file: str | os.PathLike, num_merges: int | None = None,
                       **kwargs) -> BPETokenizer:
    """OpenAI's merges-only file; pass num_merges=CLIP_NUM_MERGES for bpe_simple_vocab_16e6's
    first 48,894 merges, which give CLIP's 49,408 tokens (None takes every merge in the file)."""
    merges = read_merges(merges_file, num_merges)
    return cls(clip_vocab(merges), merges, **kwargs)

  @classmethod
  def learn(cls, texts: Sequence[str], num_merges: int, *, min_frequency: int = 2,
            **kwargs) -> BPETokenizer:
    """A byte-level BPE tokenizer with merges learned from `texts` (`learn_merges`)."""
    merges = learn_merges(texts, num_merges, min_frequency=min_frequency,
                          html_unescape=kwargs.get("html_unescape", True))
    return cls(clip_vocab(merges), merges, **kwargs)

  def save(self, folder: str | os.PathLike) -> None:
    """Writes Hugging Face's vocab.json + merges.txt into `folder` (each written then renamed);
    `from_files` and transformers' CLIPTokenizer read them back."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    merges = sorted(self.ranks, key=self.ranks.get)
    files = {"vocab.json": json.dumps(self.vocab, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)}
    for name, text in files.items():
      tmp = os.path.join(folder, name + ".tmp")
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(tmp, os.path.join(folder, name))

  @property
  def vocab_size(self) -> int:
    return max(self.vocab.values()) + 1

  def clean(self, text: str) -> str:
    if self.fix_text is not None:
      text = self.fix_text(text)
    text = unicodedata.normalize("NFC", text)
    if self.html_unescape:
      text = html.unescape(html.unescape(text))
    return _WHITESPACE_RUN.sub(" ", text).strip(" ").lower()

  def pre_tokenize(self, text: str) -> list[str]:
    """Splits cleaned text as CLIP's pattern does: at each position its alternatives are tried in
    order and the first that matches is taken whole; whitespace between matches is dropped."""
    pieces, i, n = [], 0, len(text)
    while i < n:
      special = next((s for s in self._specials if text.startswith(s, i)), None)
      if special is not None:
        pieces.append(special)
        i += len(special)
        continue
      if text[i] == "'":
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if contraction is not None:
          pieces.append(contraction)
          i += len(contraction)
          continue
      kind = _kind(text[i])
      j = i + 1
      if kind == " ":
        i = j
        continue
      if kind != "N":  # digits are split one by one; letters and the rest come in runs
        while j < n and _kind(text[j]) == kind:
          j += 1
      pieces.append(text[i:j])
      i = j
    return pieces

  def bpe(self, piece: str) -> tuple[str, ...]:
    """BPE symbols of one byte-encoded piece, the last one carrying '</w>'."""
    cached = self._cache.get(piece)
    if cached is not None:
      return cached
    word = [*piece[:-1], piece[-1] + END_OF_WORD]
    inf = len(self.ranks)
    while len(word) > 1:
      best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, inf))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):  # every non-overlapping occurrence, left to right
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    out = tuple(word)
    if len(self._cache) < 100_000:  # prompts reuse few words; bound memory on odd input
      self._cache[piece] = out
    return out

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without the start and end tokens."""
    ids = []
    for piece in self.pre_tokenize(self.clean(text)):
      if piece in self._specials:
        ids.append(self._specials[piece])
        continue
      encoded = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
      ids.extend(self.vocab.get(s, self.unk_id) for s in self.bpe(encoded))
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
    """Text of token ids ('</w>' becomes a space). With skip_special, start/end tokens are dropped
    (not a '!' pad: slice by `lengths` to drop padding)."""
    skip = {self.bos_id, self.eos_id} if skip_special else set()
    data = bytearray()
    for i in ids:
      tok = self.id_to_token.get(int(i), "")
      if int(i) in skip or not tok:
        continue
      word = tok.endswith(END_OF_WORD)
      body = tok[:-len(END_OF_WORD)] if word else tok
      if all(c in self.byte_decoder for c in body):
        data += bytes(self.byte_decoder[c] for c in body)
      else:  # an added token that is not byte-level text
        data += body.encode("utf-8")
      if word:
        data += b" "
    return data.decode("utf-8", errors="replace").strip()

  def __call__(self, texts: str | Sequence[str], *, truncate: bool | None = None
               ) -> dict[str, np.ndarray]:
    texts = as_batch(texts)
    return pack([self.encode(t) for t in texts], texts, bos_id=self.bos_id, eos_id=self.eos_id,
                pad_id=self.pad_id, context_length=self.context_length,
                truncate=self.truncate if truncate is None else truncate)

  def with_pad_token(self, pad_token: str) -> BPETokenizer:
    """The same tokenizer padding with `pad_token` (SDXL's second tokenizer pads with '!')."""
    if pad_token not in self.vocab:
      raise DataError(f"the pad token {pad_token!r} is not in the vocabulary")
    other = copy.copy(self)
    other.pad_token, other.pad_id = pad_token, self.vocab[pad_token]
    return other

  def __repr__(self) -> str:
    return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.ranks)}, "
            f"context_length={self.context_length}, pad_token={self.pad_token!r})")

"""A run's tokenizer inside its workdir (WORKDIR/tokenizer/): `words.json` for the word
tokenizer, CLIP's vocab.json + merges.txt (and its config files) for BPE. A run then loads the
same ids after `mv` or a copy to another machine, without the data its vocabulary came from."""
from __future__ import annotations

import pathlib
import shutil

from jaxgen.errors import CheckpointError

TOKENIZER_DIR = "tokenizer"
WORDS_FILE = "words.json"
BPE_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
             "bpe_simple_vocab_16e6.txt.gz")


def _text_section(config) -> dict | None:
  model = config["model"] if isinstance(config, dict) else config.model.to_dict()
  text = model.get("text") if isinstance(model, dict) else None
  return text if isinstance(text, dict) and "tokenizer" in text else None


def tokenizer_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir) / TOKENIZER_DIR


def load_tokenizer(workdir: str | pathlib.Path, config, *, missing_ok: bool = False):
  """The tokenizer saved in WORKDIR/tokenizer for a config with a `model.text` section; None for
  a config without text, or (missing_ok) when the workdir holds none yet."""
  text = _text_section(config)
  if text is None:
    return None
  d = tokenizer_dir(workdir)
  if text["tokenizer"] == "words":
    if (d / WORDS_FILE).exists():
      from jaxgen.text.words import WordTokenizer
      return WordTokenizer.load(d / WORDS_FILE)
  elif any((d / name).exists() for name in BPE_FILES):
    from jaxgen.convert.clip_text import load_tokenizer as load_bpe
    return load_bpe(d, context_length=text["context_length"],
                    html_unescape=text.get("html_unescape", True))
  if missing_ok:
    return None
  raise CheckpointError(f"{workdir} holds no tokenizer ({d} is missing or incomplete).")


def save_tokenizer(workdir: str | pathlib.Path, config, tokenizer, source: str | None = None
                   ) -> pathlib.Path | None:
  """Stores the run's tokenizer in WORKDIR/tokenizer (atomic per file). A word tokenizer is
  saved from `tokenizer`; a BPE one is copied from `source`, the folder it was read from (default:
  the config's model.text.tokenizer_path), so `tokenizer` may be None when `source` is given, or
  written from `tokenizer` when it was learned (no tokenizer_path)."""
  text = _text_section(config)
  if text is None or (tokenizer is None and source is None):
    return None
  d = tokenizer_dir(workdir)
  if text["tokenizer"] == "words":
    d.mkdir(parents=True, exist_ok=True)
    tokenizer.save(d / WORDS_FILE)
    return d
  if not (source or text["tokenizer_path"]):  # merges learned from the training captions
    tokenizer.save(d)
    return d
  src = pathlib.Path(source or text["tokenizer_path"])
  if src.resolve() == d.resolve():
    return d
  d.mkdir(parents=True, exist_ok=True)
  for name in BPE_FILES:
    if (src / name).exists():
      tmp = d / (name + ".tmp")
      shutil.copyfile(src / name, tmp)
      tmp.replace(d / name)
  return d

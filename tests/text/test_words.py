"""Word-level tokenizer: building from captions, encoding, save/load, errors."""
import json
import logging

import numpy as np
import pytest

from jaxgen.errors import DataError, TokenError
from jaxgen.text.words import WordTokenizer, split_words

CAPTIONS = ["A red circle.", "a blue square", "A red square!", "the_red triangle", "Ünïcode café"]


def test_split_words():
  # lower case; anything but letters and digits separates, '_' included
  assert split_words("A red-circle, 2nd_try!") == ["a", "red", "circle", "2nd", "try"]
  assert split_words("  ") == []
  assert split_words("Ünïcode CAFÉ") == ["ünïcode", "café"]


def test_build_orders_by_count_then_alphabet():
  tok = WordTokenizer.build(CAPTIONS, context_length=6)
  # counts: a 3, red 3, square 2, then 1 each in alphabetical order
  assert tok.words == ["a", "red", "square", "blue", "café", "circle", "the", "triangle",
                       "ünïcode"]
  assert tok.tokens[:4] == ["<pad>", "<unk>", "<start>", "<end>"] and tok.vocab_size == 13
  assert WordTokenizer.build(CAPTIONS, min_count=2).words == ["a", "red", "square"]
  assert WordTokenizer.build(CAPTIONS, max_words=2).words == ["a", "red"]
  assert WordTokenizer.build(reversed(CAPTIONS)).words == tok.words  # caption order is irrelevant


def test_encode_call_and_unknown_words():
  tok = WordTokenizer.build(CAPTIONS, context_length=6)
  # a=4, red=5, square=6; 'green' is unknown (1)
  assert tok.encode("A green square") == [4, 1, 6]
  out = tok(["A green square", ""])
  np.testing.assert_array_equal(out["input_ids"], [[2, 4, 1, 6, 3, 0], [2, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out["lengths"], [5, 2])
  np.testing.assert_array_equal(out["eos_positions"], [4, 1])
  assert out["input_ids"].dtype == np.int32
  assert tok.decode(out["input_ids"][0]) == "a <unk> square"
  assert tok.decode([2, 4, 3], skip_special=False) == "<start> a <end>"


def test_over_length_policy(caplog):
  tok = WordTokenizer.build(CAPTIONS, context_length=4)
  with pytest.raises(TokenError, match=r"prompt 0 \('a red square'\) has 5 tokens, counting the "
                     r"start and end tokens, but the context length is 4"):
    tok(["a red square"])
  with caplog.at_level(logging.WARNING, logger="jaxgen.text"):
    out = tok(["a red square"], truncate=True)
  assert "truncated 1 of 1 prompts" in caplog.text
  np.testing.assert_array_equal(out["input_ids"], [[2, 4, 5, 3]])  # the end token is kept
  lenient = WordTokenizer.build(CAPTIONS, context_length=4, truncate=True)
  np.testing.assert_array_equal(lenient(["a red square"])["input_ids"], [[2, 4, 5, 3]])


def test_save_load_round_trip(tmp_path):
  tok = WordTokenizer.build(CAPTIONS, context_length=7)
  tok.save(tmp_path / "words.json")
  back = WordTokenizer.load(tmp_path / "words.json")
  assert back.tokens == tok.tokens and back.context_length == 7
  np.testing.assert_array_equal(back(CAPTIONS)["input_ids"], tok(CAPTIONS)["input_ids"])
  assert [p.name for p in tmp_path.iterdir()] == ["words.json"]  # no temporary file left


def test_bad_vocabularies(tmp_path):
  with pytest.raises(DataError, match="not lower-case words, e.g. 'Red'"):
    WordTokenizer(["Red"])
  with pytest.raises(DataError, match="'red' appears twice"):
    WordTokenizer(["red", "red"])
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"words": ["a"]}))
  with pytest.raises(DataError, match="not a jaxgen word vocabulary"):
    WordTokenizer.load(bad)
  bad.write_text("{not json")
  with pytest.raises(DataError, match="cannot read the word vocabulary"):
    WordTokenizer.load(bad)
  with pytest.raises(TypeError, match="prompt 1 is of type int, not str"):
    WordTokenizer(["a"])(["a", 3])

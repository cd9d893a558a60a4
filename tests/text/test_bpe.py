"""CLIP BPE tokenizer: hand-worked encodings, the call API, and parity with transformers' CLIP
tokenizer on vocabulary/merges files built here in the standard formats."""
import collections
import gzip
import json
import logging
import re

import numpy as np
import pytest

from jaxgen.errors import DataError, TokenError
from jaxgen.text.bpe import BOS, EOS, BPETokenizer, bytes_to_unicode, clip_vocab

# A tiny merges list, ranks in this order. Worked examples below.
HAND_MERGES = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>"), ("lo", "w"), ("low", "er</w>"),
               ("i", "t</w>")]


def write_hf_files(path, vocab, merges):
  (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (path / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
  return path / "vocab.json", path / "merges.txt"


@pytest.fixture
def hand():
  return BPETokenizer(clip_vocab(HAND_MERGES), HAND_MERGES, context_length=8)


def test_byte_table_is_gpt2s():
  table = bytes_to_unicode()
  assert len(set(table.values())) == 256
  # printable ASCII maps to itself and comes first (so '!' is id 0, SD 2.x's pad token)
  assert list(table.values())[0] == "!" and table[ord("a")] == "a"
  # space (0x20) is the 33rd non-printable byte counted from 0x00: U+0100 + 32 = 'Ġ'
  assert table[ord(" ")] == "Ġ" and table[0] == "Ā"


def test_hand_worked_bpe(hand):
  # 'low': l o w</w> -> rank 0 merges (l, o): lo w</w> -> rank 1 (lo, w</w>): low</w>
  assert hand.bpe("low") == ("low</w>",)
  # 'lower': l o w e r</w> -> (l, o) rank 0: lo w e r</w>; of the pairs left, (e, r</w>) has
  # rank 2 and (lo, w) rank 3: lo w er</w> -> low er</w> -> (low, er</w>) rank 4: lower</w>
  assert hand.bpe("lower") == ("lower</w>",)
  # 'slow': s l o w</w> -> s lo w</w> -> s low</w>; (s, low</w>) is no merge
  assert hand.bpe("slow") == ("s", "low</w>")
  # 'lowest': lo w e s t</w> -> low e s t</w> (rank 3); no other pair is a merge
  assert hand.bpe("lowest") == ("low", "e", "s", "t</w>")
  # a single character still gets its end-of-word mark
  assert hand.bpe("x") == ("x</w>",)


def test_hand_worked_encode(hand):
  v = hand.vocab
  # cleaned to 'low, lower!' and split by CLIP's pattern into letters / punctuation runs
  assert hand.pre_tokenize(hand.clean("  Low,  LOWER!")) == ["low", ",", "lower", "!"]
  assert hand.encode("  Low,  LOWER!") == [v["low</w>"], v[",</w>"], v["lower</w>"], v["!</w>"]]
  # contractions are their own pieces; digits are split one by one
  assert hand.pre_tokenize("it's 42") == ["it", "'s", "4", "2"]
  assert hand.encode("it's 42") == [v["it</w>"], v["'"], v["s</w>"], v["4</w>"], v["2</w>"]]
  # 'é' is the UTF-8 bytes c3 a9, shown as 'Ã' and '©' by the byte table
  assert hand.encode("é") == [v["Ã"], v["©</w>"]]
  # CLIP unescapes HTML entities (transformers' fast tokenizer does not)
  assert hand.encode("&amp;") == [v["&</w>"]]
  raw = BPETokenizer(clip_vocab(HAND_MERGES), HAND_MERGES, html_unescape=False)
  assert raw.pre_tokenize(raw.clean("&amp;")) == ["&", "amp", ";"]
  # the special-token strings typed in a prompt are the special tokens
  assert hand.encode("low<|endoftext|>") == [v["low</w>"], v[EOS]]
  assert hand.decode(hand.encode("Lower, slow!")) == "lower , slow !"


def test_call_pads_and_reports_lengths(hand):
  v = hand.vocab
  out = hand(["low", "", "lower slow"])
  bos, eos = v[BOS], v[EOS]
  assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (3, 8)
  np.testing.assert_array_equal(out["input_ids"], [
      [bos, v["low</w>"], eos, eos, eos, eos, eos, eos],
      # the empty prompt is start + end: Stable Diffusion's unconditional prompt
      [bos, eos, eos, eos, eos, eos, eos, eos],
      [bos, v["lower</w>"], v["s"], v["low</w>"], eos, eos, eos, eos]])
  np.testing.assert_array_equal(out["attention_mask"].sum(1), [3, 2, 5])
  np.testing.assert_array_equal(out["lengths"], [3, 2, 5])
  np.testing.assert_array_equal(out["eos_positions"], [2, 1, 4])
  assert hand("low")["input_ids"].shape == (1, 8)  # one string is a batch of one


def test_pad_token_choice():
  # SD 2.x pads with '!', id 0 in CLIP's vocabulary order
  tok = BPETokenizer(clip_vocab(HAND_MERGES), HAND_MERGES, context_length=5, pad_token="!")
  ids = tok(["low"])["input_ids"][0]
  np.testing.assert_array_equal(ids, [tok.bos_id, tok.vocab["low</w>"], tok.eos_id, 0, 0])
  with pytest.raises(DataError, match="pad token '<pad>' is not in the vocabulary"):
    BPETokenizer(clip_vocab(HAND_MERGES), HAND_MERGES, pad_token="<pad>")


def test_over_long_prompt_raises_or_truncates(hand, caplog):
  text = "low " * 7  # 7 tokens + start + end = 9 > 8
  with pytest.raises(TokenError, match=r"prompt 1 \('low low .*'\) has 9 tokens, counting the "
                     r"start and end tokens, but the context length is 8"):
    hand(["low", text])
  with caplog.at_level(logging.WARNING, logger="jaxgen.text"):
    out = hand(["low", text], truncate=True)
  assert ("truncated 1 of 2 prompts to the context length 8 (the longest had 9 tokens)"
          in caplog.text)
  low = hand.vocab["low</w>"]
  np.testing.assert_array_equal(out["input_ids"][1], [hand.bos_id] + [low] * 6 + [hand.eos_id])
  assert out["lengths"][1] == 8 and out["eos_positions"][1] == 7
  exact = "low " * 6  # exactly the context length: no error
  assert hand([exact])["lengths"][0] == 8


def test_bad_files(tmp_path):
  vocab_file, merges_file = write_hf_files(tmp_path, clip_vocab(HAND_MERGES), HAND_MERGES)
  merges_file.write_text("#version: 0.2\nl o\nthree parts here\n")
  with pytest.raises(DataError, match="line 3: expected a merge 'left right'"):
    BPETokenizer.from_files(vocab_file, merges_file)
  merges_file.write_text("#version: 0.2\nq z\n")
  with pytest.raises(DataError, match="1 merges use tokens missing from the vocabulary"):
    BPETokenizer.from_files(vocab_file, merges_file)


# --- parity with transformers on a vocabulary trained here --------------------------------------

CORPUS = """A photo of a cat sitting on the lower shelf, slowly looking at the lowest one.
Photographs of dogs and cats; the dog's photo was taken in 2023 at 3.14 pm!!! It's a
beautiful painting of mountains, rivers and forests in the style of an old master.
Café naïve résumé: 日本語のテキスト and Привет мир. Hello world, hello again, don't stop.
An astronaut riding a horse on the moon, highly detailed, 4k, trending on artstation."""

STRINGS = [
    "a photo of a cat", "A PHOTO OF A DOG", "Hello, world!", "hello   world\t\nagain",
    "  leading and trailing  ", "it's", "IT'S", "don't stop",
    "we're here, they've gone, I'm sure you'll see, he'd go", "'s'", "rock'n'roll",
    "123 456", "3.14159", "R2-D2 and C-3PO", "$100 or 50%", "e-mail: someone@example.com",
    "!!!???", "...", "(parentheses) [brackets] {braces}", "café naïve résumé", "CAFÉ",
    "e\u0301cole", "日本語のテキスト", "🙂🎉 emoji", "Ünïcödé Straße", "line\nbreak",
    "non\u00a0breaking\u2003space", "snake_case and kebab-case", "#hashtag @mention",
    "a <|endoftext|> b", "x² and ½ cup", "ﬁne ligature", "lowest lower low slow", "", "   ",
    "\u3000ideographic space", "mixed123abc456", "ÀÉÎÕÜ", "quotes “curly” ‘single’",
    "Ελληνικά", "Привет мир", "a&b",
    2 * ("an astronaut riding a horse on the moon, highly detailed, 4k, trending on artstation, "
         "by greg rutkowski and alphonse mucha, octane render. "),  # over 77 tokens
]


def train_merges(text, n):
  """Greedy BPE on CLIP-style pieces: the most frequent adjacent pair (ties by the pair itself),
  skipping pairs whose result is already a token so the vocabulary has no duplicates."""
  enc = bytes_to_unicode()
  pieces = re.findall(r"[^\W\d_]+|\d|[^\s\w]+|_+", text.lower())
  words = collections.Counter()
  for p in pieces:
    s = "".join(enc[b] for b in p.encode("utf-8"))
    words[tuple(s[:-1]) + (s[-1] + "</w>",)] += 1
  made = set(enc.values()) | {c + "</w>" for c in enc.values()}
  merges = []
  for _ in range(n):
    pairs = collections.Counter()
    for w, c in words.items():
      for p in zip(w, w[1:]):
        if p[0] + p[1] not in made:
          pairs[p] += c
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    made.add(best[0] + best[1])
    new = collections.Counter()
    for w, c in words.items():
      out, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == best:
          out.append(w[i] + w[i + 1])
          i += 2
        else:
          out.append(w[i])
          i += 1
      new[tuple(out)] += c
    words = new
  return merges


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  path = tmp_path_factory.mktemp("bpe")
  merges = train_merges(CORPUS, 300)
  assert len(merges) > 150  # the corpus runs out of pairs at about 190
  write_hf_files(path, clip_vocab(merges), merges)
  with gzip.open(path / "clip_merges.txt.gz", "wt", encoding="utf-8") as f:
    f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges)
            + "\n")
  return path, merges


def test_clip_merges_file_gives_the_same_tokenizer(trained):
  path, merges = trained
  hf = BPETokenizer.from_files(path / "vocab.json", path / "merges.txt")
  clip = BPETokenizer.from_clip_merges(path / "clip_merges.txt.gz")
  assert clip.vocab == hf.vocab and clip.vocab_size == 512 + len(merges) + 2
  assert len(BPETokenizer.from_clip_merges(path / "clip_merges.txt.gz", 10).ranks) == 10
  for s in STRINGS[:10]:
    assert clip.encode(s) == hf.encode(s)


@pytest.mark.parametrize("pad", [EOS, "!"])
def test_matches_transformers(trained, pad):
  transformers = pytest.importorskip("transformers")
  path, _ = trained
  ref = transformers.CLIPTokenizer.from_pretrained(str(path), pad_token=pad)
  ours = BPETokenizer.from_files(path / "vocab.json", path / "merges.txt", pad_token=pad,
                                 html_unescape=False, truncate=True)
  ours_clip = BPETokenizer.from_files(path / "vocab.json", path / "merges.txt", pad_token=pad,
                                      truncate=True)
  # transformers turns a '!' typed in the prompt into its pad token when that is '!' (diffusers
  # issue 4153); OpenCLIP, which SD 2.x was trained with, and we do not: see the next test.
  strings = [s for s in STRINGS if pad != "!" or "!" not in s]
  assert not any("&" in s and ";" in s for s in strings)  # so CLIP's unescaping changes nothing
  want = ref(strings, padding="max_length", max_length=77, truncation=True)
  got = ours(strings)
  np.testing.assert_array_equal(got["input_ids"], np.array(want["input_ids"]))
  np.testing.assert_array_equal(got["attention_mask"], np.array(want["attention_mask"]))
  np.testing.assert_array_equal(ours_clip(strings)["input_ids"], got["input_ids"])
  # the long prompt really was truncated, keeping its end token
  assert got["lengths"].max() == 77 and got["input_ids"][-1, -1] == ours.eos_id
  for s in strings:
    assert ours.encode(s) == ref(s, add_special_tokens=False)["input_ids"], s
  # html entities: transformers' fast tokenizer leaves them, html_unescape=False does too
  s = "fish &amp; chips &lt;3"
  assert ours.encode(s) == ref(s, add_special_tokens=False)["input_ids"]
  assert ours_clip.decode(ours_clip.encode(s)) == "fish & chips < 3"


def test_bang_padding_leaves_typed_bangs_alone(trained):
  path, _ = trained
  tok = BPETokenizer.from_files(path / "vocab.json", path / "merges.txt", pad_token="!",
                                context_length=8)
  ids = tok(["wow!"])["input_ids"][0]
  assert tok.pad_id == 0 and ids[-1] == 0
  assert tok.vocab["!</w>"] in ids[:tok(["wow!"])["lengths"][0]]


# --- merges learned from captions (no vocabulary given) -----------------------------------------

def test_learned_merges_equal_the_reference_trainer():
  from jaxgen.text.bpe import learn_merges
  corpus = CORPUS.replace("'", " ")  # the reference's pattern has no contractions
  lines = corpus.split("\n")
  want = train_merges(corpus, 300)
  assert len(want) > 150
  assert learn_merges(lines, 300, min_frequency=1) == want
  # the order of the texts does not matter; min_frequency stops early
  assert learn_merges(lines[::-1], 300, min_frequency=1) == want
  few = learn_merges(lines, 300, min_frequency=3)
  assert 0 < len(few) < 100 and few == want[:len(few)]


def test_hand_worked_learning():
  """Sennrich et al.'s example with CLIP's '</w>' on the last symbol: e s (9) and s t</w> (9)
  tie, and the pair that sorts last wins; then es t</w>, l o (7), then e w, n e and w est</w>
  tie at 6."""
  from jaxgen.text.bpe import learn_merges
  texts = ["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3
  assert learn_merges(texts, 4) == [("s", "t</w>"), ("e", "st</w>"), ("l", "o"),
                                    ("w", "est</w>")]


def test_a_learned_tokenizer_has_no_unknown_words_and_saves_for_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  from jaxgen.data import shapes
  _, captions, _ = shapes.make_scenes(500, seed=0)
  tok = BPETokenizer.learn(list(captions), 2000, context_length=32, html_unescape=False)
  assert 20 < len(tok.ranks) < 2000  # the captions run out of pairs seen twice
  for s in ["a large red circle left of a small blue square", "a huge crimson hexagon!",
            "Ελληνικά 日本語 café", "circles and squares, 3 of them"]:
    ids = tok.encode(s)
    assert tok.unk_id not in ids or s.count("<|endoftext|>")
    assert tok.decode(ids).replace(" ", "") == tok.clean(s).replace(" ", "")
  assert len(tok.encode("a large red circle")) == 4  # whole words of the captions
  tok.save(tmp_path)
  ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=32)
  again = BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt",
                                  context_length=32, html_unescape=False)
  for s in STRINGS[:25]:
    assert again.encode(s) == tok.encode(s) == ref(s, add_special_tokens=False)["input_ids"], s

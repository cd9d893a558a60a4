"""BLEU-4 and CIDEr-D against independent references: NLTK's corpus_bleu on random corpora, and
the COCO caption evaluation's CIDEr-D scorer (pycocoevalcap 1.2, run once on the example below;
it ships Java jars and a 100 MB wheel, so its value is recorded here) plus properties that follow
from the definitions."""
import numpy as np
import pytest

from jaxgen.errors import ConfigError
from jaxgen.eval.captions import bleu, cider_d, tokenize

CANDS = ["a large red circle above a small blue square", "a small green triangle",
         "a blue square left of a red circle", "two dogs play in the park"]
REFS = [["a large red circle above a small blue square",
         "a big red circle over a little blue square"],
        ["a small green triangle", "a tiny green triangle on the left"],
        ["a red circle right of a blue square", "a blue square to the left of a red circle"],
        ["a dog runs on the grass", "dogs playing in a park", "two dogs in a park"]]


def _tok(cands, refs):
  return [tokenize(c) for c in cands], [[tokenize(r) for r in rs] for rs in refs]


def test_cider_d_matches_the_coco_scorer_and_its_definition():
  c, r = _tok(CANDS, REFS)
  # pycocoevalcap.cider.cider_scorer.CiderScorer(n=4, sigma=6.0) on the same tokens
  assert cider_d(c, r) == pytest.approx(4.539487132140063, rel=1e-12)
  # a candidate equal to its only reference, n-grams found nowhere else: every cosine is 1
  # (10 for that image), the other image shares nothing (0); with 3 tokens there is no 4-gram
  assert cider_d([["a", "red", "cat", "sat"], ["two", "dogs"]],
                 [[["a", "red", "cat", "sat"]], [["blue", "birds"]]]) == pytest.approx(5.0)
  assert cider_d([["a", "red", "cat"], ["two", "dogs"]],
                 [[["a", "red", "cat"]], [["blue", "birds"]]]) == pytest.approx(3.75)
  # no shared n-gram: 0; longer than the reference: the Gaussian length penalty
  assert cider_d([["blue", "birds"]], [[["a", "cat"]]]) == 0.0
  assert cider_d(*_tok(["a red cat sat on a mat today"], [["a red cat"]])) == 0.0  # idf of 1 doc


def test_bleu_matches_nltk():
  nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
  c, r = _tok(CANDS, REFS)
  assert bleu(c, r) == pytest.approx(nltk_bleu.corpus_bleu(r, c), rel=1e-12)
  rng = np.random.default_rng(0)
  words = "a the red blue big small cat dog on of left".split()
  for _ in range(20):
    cands = [list(rng.choice(words, rng.integers(4, 12))) for _ in range(5)]
    refs = [[list(rng.choice(words, rng.integers(4, 12))) for _ in range(rng.integers(1, 4))]
            for _ in range(5)]
    ref = nltk_bleu.corpus_bleu(refs, cands)
    assert bleu(cands, refs) == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_tokenize_and_bad_input():
  assert tokenize("A red CAT, left of the dog's bowl.") == ["a", "red", "cat", "left", "of",
                                                           "the", "dog's", "bowl"]
  with pytest.raises(ConfigError, match="2 candidates for 1 reference sets"):
    bleu([["a"], ["b"]], [[["a"]]])
  with pytest.raises(ConfigError, match="at least one reference"):
    cider_d([["a"]], [[]])


def test_attribute_accuracy_counts_each_attribute_where_it_applies():
  from jaxgen.data.shapes import parse_caption
  from jaxgen.eval.captions import attribute_accuracy, caption_metrics
  truth = dict(shape=np.array(["circle", "square", "circle"]),
               colour=np.array(["red", "blue", "green"]),
               relation=np.array(["", "above", "left of"]),
               shape2=np.array(["", "circle", "diamond"]))
  said = ["a small red circle", "a large blue square below a red circle",
          "a small green square left of a cyan diamond"]
  acc = attribute_accuracy([parse_caption(c) for c in said], truth)
  # shape: 2 of 3; colour: 3 of 3; relation: 1 of the 2 two-object scenes; shape2: 2 of 2;
  # objects: every caption names the right number of objects
  assert acc == dict(shape=2 / 3, colour=1.0, relation=0.5, shape2=1.0, objects=1.0)
  m = caption_metrics(said, [[c] for c in said])
  assert m == dict(bleu4=100.0, cider_d=pytest.approx(m["cider_d"]), exact_match=1.0)
  assert caption_metrics(["a red circle"], [["a blue square"]])["bleu4"] == 0.0

"""Caption metrics written from the papers: corpus BLEU-4 (Papineni et al. 2002) and CIDEr-D
(Vedantam et al. 2015, as the COCO caption evaluation computes it).

Captions are compared as token lists; `tokenize` lower-cases and splits off punctuation (a
simple stand-in for the PTB tokenizer the COCO toolkit runs first, which needs Java).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

from jaxgen.errors import ConfigError

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
  return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
  return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _check(candidates, references):
  if len(candidates) != len(references) or not candidates:
    raise ConfigError(f"{len(candidates)} candidates for {len(references)} reference sets: give "
                      f"one candidate and at least one reference per image")
  if any(not refs for refs in references):
    raise ConfigError("every image needs at least one reference caption")


def bleu(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
         max_n: int = 4) -> float:
  """Corpus BLEU: the geometric mean of the modified n-gram precisions (n = 1..max_n, each
  candidate n-gram count clipped by its largest count in any reference, summed over the corpus)
  times the brevity penalty exp(1 - r / c) when the candidates' total length c is below r, the
  sum of the reference lengths closest to each candidate's (the shorter on ties). 0 when some
  precision is 0 (no smoothing)."""
  _check(candidates, references)
  matched, total = [0] * max_n, [0] * max_n
  c_len = r_len = 0
  for cand, refs in zip(candidates, references):
    c_len += len(cand)
    r_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    for n in range(1, max_n + 1):
      counts = _ngrams(cand, n)
      best = Counter()
      for r in refs:
        best |= _ngrams(r, n)
      matched[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
      total[n - 1] += max(len(cand) - n + 1, 0)
  if min(matched) == 0 or c_len == 0:
    return 0.0
  log_p = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
  bp = 1.0 if c_len > r_len else math.exp(1 - r_len / c_len)
  return bp * math.exp(log_p)


def cider_d(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            max_n: int = 4, sigma: float = 6.0) -> float:
  """CIDEr-D: for n = 1..max_n, TF-IDF vectors of n-grams (document frequency over the images'
  reference sets, idf = log(N_images / df)), the candidate's counts clipped by each reference's,
  cosine similarity with each reference times the length penalty exp(-(len_c - len_r)^2 /
  (2 sigma^2)), averaged over references and n, times 10; the mean over images."""
  _check(candidates, references)
  num = len(candidates)
  df = Counter()
  for refs in references:
    df.update({g for r in refs for n in range(1, max_n + 1) for g in _ngrams(r, n)})
  log_num = math.log(float(num))

  def vec(tokens):
    out = []
    for n in range(1, max_n + 1):
      counts = _ngrams(tokens, n)
      # COCO's scorer: term frequency times idf with df floored at 1
      v = {g: c * (log_num - math.log(max(1.0, df[g]))) for g, c in counts.items()}
      out.append((v, math.sqrt(sum(x * x for x in v.values()))))
    return out

  scores = []
  for cand, refs in zip(candidates, references):
    vc = vec(cand)
    total = [0.0] * max_n
    for r in refs:
      vr = vec(r)
      delta = len(cand) - len(r)
      for n in range(max_n):
        (c, norm_c), (rr, norm_r) = vc[n], vr[n]
        dot = sum(min(x, rr[g]) * rr[g] for g, x in c.items() if g in rr)
        if norm_c and norm_r:
          total[n] += dot / (norm_c * norm_r) * math.exp(-(delta ** 2) / (2 * sigma ** 2))
    scores.append(10.0 * sum(t / len(refs) for t in total) / max_n)
  return sum(scores) / num


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
  """Corpus BLEU-4 and CIDEr-D (both x 100, as caption papers report them) of caption strings
  against each image's reference strings, and the fraction of exact matches."""
  cands = [tokenize(c) for c in candidates]
  refs = [[tokenize(r) for r in rs] for rs in references]
  exact = sum(c in r for c, r in zip(cands, refs)) / len(cands)
  return dict(bleu4=100.0 * bleu(cands, refs), cider_d=100.0 * cider_d(cands, refs),
              exact_match=float(exact))


def attribute_accuracy(predicted: Sequence[dict], truth: dict) -> dict:
  """Per attribute, the fraction of images whose caption states the true value: predicted is
  one dict of attribute -> value per image (e.g. jaxgen.data.shapes.parse_caption), truth a dict
  of attribute -> array of true values. An attribute counts only on the images where it has a
  true value (the relation and the second object's attributes on two-object scenes); `objects`
  is whether the caption names the right number of objects (one, or two with a relation)."""
  out = {}
  n = len(predicted)
  for attr in predicted[0] if predicted else ():
    if attr not in truth:
      continue
    values = [str(v) for v in truth[attr]]
    rows = [i for i in range(n) if values[i]]
    if rows:
      out[attr] = sum(predicted[i][attr] == values[i] for i in rows) / len(rows)
  if "relation" in truth and predicted and "relation" in predicted[0]:
    out["objects"] = sum(bool(p["relation"]) == bool(str(t))
                         for p, t in zip(predicted, truth["relation"])) / n
  return out

"""How faithful image variations are to their sources, read by a network other than the one that
conditioned them (the offline metric's classifier, jaxgen.eval.quality.FeatureNet).

For sources x_i with labels y_i and k variations v_ij of each:
  class_agreement   share of variations the classifier puts in their source's class y_i
  chance            the same share against the label of another source (a random pairing): what
                    agreement would be if variations ignored their source
  similarity        mean cosine of the classifier's features of v_ij and of x_i
  random_similarity the mean cosine of v_ij with another source's features
"""
from __future__ import annotations

import numpy as np


def _unit(f: np.ndarray) -> np.ndarray:
  f = np.asarray(f, np.float64)
  return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def faithfulness(source_features, source_labels, variation_features, variation_logits,
                 *, seed: int = 0) -> dict:
  """source_features [N, D], source_labels [N] (int), variation_features [N, k, D],
  variation_logits [N, k, K] -> the scores above (floats). The random pairing is a
  derangement of the sources (no source paired with itself), fixed by `seed`."""
  src = _unit(source_features)
  var = _unit(variation_features)
  labels = np.asarray(source_labels)
  n, k = var.shape[:2]
  if src.shape[0] != n or labels.shape != (n,) or np.shape(variation_logits)[:2] != (n, k):
    raise ValueError(f"faithfulness: {src.shape[0]} sources, {labels.shape} labels, "
                     f"{var.shape[:2]} variations and {np.shape(variation_logits)[:2]} logits "
                     "do not agree")
  if n < 2:
    raise ValueError("faithfulness needs at least 2 sources (the random pairing)")
  rng = np.random.default_rng(seed)
  other = (np.arange(n) + rng.integers(1, n, size=n)) % n   # never i itself
  pred = np.argmax(np.asarray(variation_logits), axis=-1)   # [N, k]
  return dict(
      sources=int(n), per_source=int(k),
      class_agreement=float(np.mean(pred == labels[:, None])),
      chance=float(np.mean(pred == labels[other][:, None])),
      similarity=float(np.mean(np.einsum("nkd,nd->nk", var, src))),
      random_similarity=float(np.mean(np.einsum("nkd,nd->nk", var, src[other]))),
  )

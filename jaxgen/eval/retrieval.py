"""Zero-shot classification and cross-modal retrieval (recall@k) from frozen embeddings.

Embeddings are compared by cosine similarity. Work is chunked over queries with `lax.map`, so a
[queries, gallery] similarity matrix never has to fit in memory at once.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxgen.errors import ShapeError


def l2_normalize(x, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def _dot(a, b) -> jax.Array:
  return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def _check_dims(a, b, what: str):
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ShapeError(f"{what}: expected [N, D] and [M, D] embeddings, got {a.shape} and "
                     f"{b.shape}")


def class_embeddings(template_emb) -> jax.Array:
  """Per-class text embedding from several prompt templates (CLIP's prompt ensembling):
  [K, T, D] -> [K, D], each template embedding normalised, averaged, then re-normalised."""
  template_emb = jnp.asarray(template_emb, jnp.float32)
  if template_emb.ndim != 3:
    raise ShapeError(f"expected [classes, templates, D] embeddings, got {template_emb.shape}")
  return l2_normalize(jnp.mean(l2_normalize(template_emb), axis=1))


@jax.jit
def zero_shot_logits(image_emb, class_text_emb) -> jax.Array:
  """Cosine similarities [B, K] between images [B, D] and class embeddings [K, D]."""
  return _dot(l2_normalize(image_emb), l2_normalize(class_text_emb))


def zero_shot_classify(image_emb, class_text_emb) -> jax.Array:
  """The class whose text embedding is nearest (cosine) to each image: [B, D], [K, D] -> [B]."""
  _check_dims(jnp.asarray(image_emb), jnp.asarray(class_text_emb), "zero_shot_classify")
  return jnp.argmax(zero_shot_logits(image_emb, class_text_emb), axis=-1)


def zero_shot_accuracy(image_emb, class_text_emb, labels, k: int = 1) -> jax.Array:
  """Fraction of images whose label is among the k nearest class embeddings."""
  _check_dims(jnp.asarray(image_emb), jnp.asarray(class_text_emb), "zero_shot_accuracy")
  _, top = jax.lax.top_k(zero_shot_logits(image_emb, class_text_emb), k)
  return jnp.mean(jnp.any(top == jnp.asarray(labels)[:, None], axis=-1).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("ks", "batch_size"))
def _recall(query_emb, gallery_emb, query_ids, gallery_ids, *, ks, batch_size):
  gallery = l2_normalize(gallery_emb)

  def one(args):
    q, qid = args
    _, top = jax.lax.top_k(_dot(l2_normalize(q)[None], gallery)[0], max(ks))
    hit = gallery_ids[top] == qid  # [max k]
    return jnp.stack([jnp.any(hit[:k]) for k in ks])

  hits = jax.lax.map(one, (query_emb, query_ids), batch_size=batch_size)  # [Q, len(ks)]
  return jnp.mean(hits.astype(jnp.float32), axis=0)


def recall_at_k(query_emb, gallery_emb, k: int | Sequence[int] = 1, *, query_ids=None,
                gallery_ids=None, batch_size: int = 1024):
  """Fraction of queries with a matching gallery item among their k nearest (cosine).

  By default query i matches gallery item i. With several items per concept (e.g. 5 captions
  per image), give integer ids: a query matches every gallery item with its id. `k` an int
  gives one recall; a sequence gives a dict {k: recall}.
  """
  query_emb, gallery_emb = jnp.asarray(query_emb), jnp.asarray(gallery_emb)
  _check_dims(query_emb, gallery_emb, "recall_at_k")
  ks = (k,) if isinstance(k, int) else tuple(int(v) for v in k)
  if max(ks) > gallery_emb.shape[0] or min(ks) < 1:
    raise ShapeError(f"k={ks} must lie in [1, {gallery_emb.shape[0]}] (the gallery size)")
  if query_ids is None and gallery_ids is None and query_emb.shape[0] != gallery_emb.shape[0]:
    raise ShapeError(f"without ids, query {query_emb.shape[0]} and gallery "
                     f"{gallery_emb.shape[0]} sizes must agree (query i matches item i)")
  qids = jnp.arange(query_emb.shape[0]) if query_ids is None else jnp.asarray(query_ids)
  gids = jnp.arange(gallery_emb.shape[0]) if gallery_ids is None else jnp.asarray(gallery_ids)
  r = _recall(query_emb, gallery_emb, qids, gids, ks=ks,
              batch_size=min(batch_size, query_emb.shape[0]))
  return r[0] if isinstance(k, int) else {kk: r[i] for i, kk in enumerate(ks)}


def image_text_retrieval(image_emb, text_emb, *, text_image_ids=None,
                         ks: Sequence[int] = (1, 5, 10)) -> dict:
  """Both directions at once: {'i2t_recall@k', 't2i_recall@k'} for each k.

  `text_image_ids` [T] gives the image each caption belongs to (several captions per image, as
  in COCO and Flickr30k); by default caption i describes image i.
  """
  image_emb, text_emb = jnp.asarray(image_emb), jnp.asarray(text_emb)
  if text_image_ids is None:
    ids = None, None
  else:
    ids = jnp.arange(image_emb.shape[0]), jnp.asarray(text_image_ids)
  ks = tuple(k for k in ks if k <= min(image_emb.shape[0], text_emb.shape[0]))
  i2t = recall_at_k(image_emb, text_emb, ks, query_ids=ids[0], gallery_ids=ids[1])
  t2i = recall_at_k(text_emb, image_emb, ks, query_ids=ids[1], gallery_ids=ids[0])
  out = {f"i2t_recall@{k}": v for k, v in i2t.items()}
  out.update({f"t2i_recall@{k}": v for k, v in t2i.items()})
  return out


def twin_preference(image_emb, embed_texts, captions, kinds=None) -> dict:
  """How often an image scores its own caption above the caption's hard-negative twin
  (jaxgen.text.negatives: the relation inverted, or two objects' colours, shapes or sizes
  exchanged), per kind, over the images whose caption has such a twin (chance 0.5; a tie counts
  half), and the mean cosine between the caption's and its twin's text embeddings (1: the text
  tower does not tell them apart). image_emb [N, D] unit norm."""
  import numpy as np

  from jaxgen.text import negatives
  out = {}
  for kind in kinds or negatives.KINDS:
    pairs = [(i, str(c), t) for i, c in enumerate(captions)
             if (t := negatives.twin(str(c), kind)) is not None]
    if not pairs:
      continue
    idx = np.array([p[0] for p in pairs])
    own = np.asarray(embed_texts([p[1] for p in pairs]))
    other = np.asarray(embed_texts([p[2] for p in pairs]))
    e = np.asarray(image_emb)[idx]
    diff = (e * own).sum(-1) - (e * other).sum(-1)
    out[f"twin_{kind}_preference"] = float(np.mean((diff > 0) + 0.5 * (diff == 0)))
    out[f"twin_{kind}_text_cosine"] = float(np.mean((own * other).sum(-1)))
    out[f"twin_{kind}_num"] = len(pairs)
  return out


def dual_encoder_metrics(embed_images, embed_texts, images, captions=None,
                         zero_shot: dict | None = None) -> dict:
  """Held-out metrics of a dual encoder given as predict functions (big_vision's evaluator
  style): embed_images(images) -> [N, D], embed_texts(list of str) -> [M, D].

  zero_shot: name -> (prompts per class, true class index per image): the zero-shot accuracy
  with prompt ensembles, beside chance. captions [N] (str): image<->text recall@1/5, where the
  gallery holds each distinct caption once and a hit is any item with the query's caption
  (several images share "a small red circle"), and `twin_preference` on the captions.
  """
  import numpy as np
  emb = embed_images(images)
  out = {"num_images": len(emb)}
  for name, (prompts, labels) in (zero_shot or {}).items():
    classes = class_embeddings(np.stack([embed_texts(p) for p in prompts]))
    out[f"zero_shot_{name}"] = float(zero_shot_accuracy(emb, classes, labels))
    out[f"zero_shot_{name}_chance"] = 1.0 / len(prompts)
  if captions is not None:
    unique, caption_id = np.unique(np.asarray(captions), return_inverse=True)
    texts = embed_texts(list(unique))
    ids = np.arange(len(unique))
    for name, q, g, qid, gid in (("i2t", emb, texts, caption_id, ids),
                                 ("t2i", texts, emb, ids, caption_id)):
      for k, v in recall_at_k(q, g, (1, 5), query_ids=qid, gallery_ids=gid).items():
        out[f"{name}_recall@{k}"] = float(v)
    out["i2t_chance@1"] = 1.0 / len(unique)
    out["t2i_chance@1"] = float(np.mean(np.bincount(caption_id) / len(captions)))
    out.update(twin_preference(emb, embed_texts, captions))
  return out

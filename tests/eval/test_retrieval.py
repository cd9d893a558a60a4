"""Zero-shot classification and recall@k against NumPy implementations."""
import numpy as np
import pytest

from jaxgen.errors import ShapeError
from jaxgen.eval import retrieval


def normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_recall(q, g, k, qids, gids):
  sims = normalize(q) @ normalize(g).T
  hits = [np.any(gids[np.argsort(-row, kind="stable")[:k]] == qid)
          for row, qid in zip(sims, qids)]
  return np.mean(hits)


def noisy_pairs(n=40, d=8, noise=1.2, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, d))
  return a.astype(np.float32), (a + noise * rng.normal(size=(n, d))).astype(np.float32)


def test_recall_at_k_matches_numpy_both_directions():
  img, txt = noisy_pairs()
  ids = np.arange(40)
  for k in (1, 5, 10):
    for q, g in ((img, txt), (txt, img)):
      ref = numpy_recall(q.astype(np.float64), g, k, ids, ids)
      assert 0.0 < ref < 1.0 or k == 10
      np.testing.assert_allclose(retrieval.recall_at_k(q, g, k, batch_size=16), ref)
  out = retrieval.image_text_retrieval(img, txt, ks=(1, 5))
  assert set(out) == {"i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5"}
  np.testing.assert_allclose(out["t2i_recall@5"], numpy_recall(txt, img, 5, ids, ids))
  with pytest.raises(ShapeError, match="gallery size"):
    retrieval.recall_at_k(img, txt, 41)


def test_recall_with_several_captions_per_image():
  rng = np.random.default_rng(1)
  img = rng.normal(size=(12, 8)).astype(np.float32)
  owner = np.repeat(np.arange(12), 5)  # 5 captions per image, as in COCO
  txt = (img[owner] + 1.5 * rng.normal(size=(60, 8))).astype(np.float32)
  out = retrieval.image_text_retrieval(img, txt, text_image_ids=owner, ks=(1, 5, 10))
  for k in (1, 5, 10):
    np.testing.assert_allclose(out[f"i2t_recall@{k}"],
                               numpy_recall(img, txt, k, np.arange(12), owner))
    np.testing.assert_allclose(out[f"t2i_recall@{k}"],
                               numpy_recall(txt, img, k, owner, np.arange(12)))
  assert float(out["i2t_recall@1"]) < float(out["i2t_recall@5"]) <= 1.0


def test_zero_shot_picks_the_nearest_class_and_ensembles_templates():
  rng = np.random.default_rng(2)
  templates = rng.normal(size=(5, 3, 8)).astype(np.float32)  # 5 classes x 3 prompts
  ref_classes = normalize(normalize(templates.astype(np.float64)).mean(axis=1))
  classes = retrieval.class_embeddings(templates)
  np.testing.assert_allclose(classes, ref_classes, rtol=1e-5, atol=1e-6)
  images = rng.normal(size=(30, 8)).astype(np.float32)
  sims = normalize(images) @ ref_classes.T
  np.testing.assert_array_equal(retrieval.zero_shot_classify(images, classes), sims.argmax(1))
  labels = rng.integers(0, 5, 30)
  np.testing.assert_allclose(retrieval.zero_shot_accuracy(images, classes, labels),
                             np.mean(sims.argmax(1) == labels))
  top2 = np.argsort(-sims, axis=1)[:, :2]
  np.testing.assert_allclose(retrieval.zero_shot_accuracy(images, classes, labels, k=2),
                             np.mean(np.any(top2 == labels[:, None], axis=1)))
  # An image that is a scaled copy of a class embedding is classified as that class.
  np.testing.assert_array_equal(retrieval.zero_shot_classify(3.0 * ref_classes, classes),
                                np.arange(5))
  with pytest.raises(ShapeError, match="embeddings"):
    retrieval.zero_shot_classify(images, classes[:, :4])


def test_twin_preference_of_an_oracle_and_of_a_bag_of_words_tower():
  from jaxgen.data import shapes
  from jaxgen.eval.retrieval import twin_preference
  _, captions, _ = shapes.make_scenes(200, seed=1)
  vocab = sorted({w for c in captions for w in str(c).split()} | {"right", "below", "left",
                                                                   "above"})

  def bag(texts, ignore=("left", "right", "above", "below")):  # a tower blind to relations
    out = np.array([[float(w in t.split() and w not in ignore) for w in vocab] for t in texts])
    return out / np.linalg.norm(out, axis=1, keepdims=True)

  def exact(texts):  # a tower that tells every caption apart: one direction per caption
    out = np.array([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=64) for t in texts])
    return out / np.linalg.norm(out, axis=1, keepdims=True)

  blind = twin_preference(bag(captions), bag, captions)
  assert blind["twin_relation_preference"] == 0.5
  np.testing.assert_allclose(blind["twin_relation_text_cosine"], 1.0)
  assert blind["twin_colour_preference"] == 0.5  # same bag of words, colours exchanged
  assert blind["twin_relation_num"] == sum("of" in c or "above" in c or "below" in c
                                           for c in captions)
  oracle = twin_preference(exact(list(map(str, captions))), exact, captions)
  assert all(oracle[f"twin_{k}_preference"] == 1.0 for k in ("relation", "colour", "shape"))

"""Zero-shot prompt-following of generated images, read by a CLIP-style judge given as predict
functions: does each picture show what its prompt names?"""
from __future__ import annotations

import numpy as np

from jaxgen.data import shapes
from jaxgen.eval.retrieval import class_embeddings


def prompt_following(embed_images, embed_texts, images, data: dict, class_names=None) -> dict:
  """embed_images(images) -> [N, D], embed_texts(list of str) -> [M, D] (unit norm). On the
  shapes data (`data` has 'shape' and 'colour' columns): the accuracy of the first object's
  shape and colour; on class data (`class_names`, data['label']): the class accuracy."""
  emb = embed_images(images)
  out = {}
  if "shape" in data and "colour" in data:
    for attr, (prompts, names) in shapes.attribute_prompts().items():
      classes = class_embeddings(np.stack([embed_texts(p) for p in prompts]))
      pred = np.asarray(emb @ np.asarray(classes).T).argmax(1)
      out[f"{attr}_accuracy"] = float(np.mean(np.array(names)[pred] == data[attr]))
  elif "label" in data and class_names:
    classes = class_embeddings(np.stack([embed_texts([f"a photo of a {n}"])
                                         for n in class_names]))
    out["class_accuracy"] = float(np.mean(np.asarray(emb @ np.asarray(classes).T).argmax(1)
                                          == data["label"]))
  return out

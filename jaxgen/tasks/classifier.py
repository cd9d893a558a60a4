"""Supervised image classification through the one loop.

Its main use is the feature network of the offline sample-quality metric (jaxgen.eval.quality):
a classifier trained on the real data, whose penultimate features stand in for Inception's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxgen.errors import ConfigError, DataError
from jaxgen.images import to_signed
from jaxgen.models import build
from jaxgen.models.classifier import ImageClassifier
from jaxgen.tasks.base import Task

TRAINING_KEYS = ("random_flip",)


class ClassifierTask(Task):
  name = "classifier"

  @staticmethod
  def default_config():
    return {"model": build.section(ImageClassifier, exclude=("dtype",), num_classes=10,
                                   random_flip=False)}

  @staticmethod
  def validate(config):
    m = config.model
    if m.num_classes < 2:
      raise ConfigError(f"model.num_classes must be at least 2; got {m.num_classes}.")
    if m.norm not in ("group", "batch"):
      raise ConfigError(f"model.norm must be 'group' or 'batch'; got {m.norm!r}.")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.module = build.build(ImageClassifier, config.model, skip=TRAINING_KEYS)

  def init(self, key, batch):
    if "label" not in batch:
      raise DataError("The classifier task needs labelled data; this data set has no labels.")
    variables = self.module.init(key, to_signed(batch["image"]))
    params = {"params": variables["params"]}
    return params, {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(self, params, model_state, batch, key):
    x = to_signed(batch["image"])
    if self.config.model.random_flip:
      flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
      x = jnp.where(flip, x[:, :, ::-1], x)
    (_, logits), updates = self.module.apply({**params, **model_state}, x, train=True,
                                             mutable=list(model_state.keys()))
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (logits.argmax(-1) == labels).mean()
    return loss, (dict(accuracy=accuracy), {**model_state, **updates})

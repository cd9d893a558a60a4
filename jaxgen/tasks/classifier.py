"""Supervised image classification through the one loop.

Its main use is the feature network of the offline sample-quality metric (jaxgen.eval.quality):
a classifier trained on the real data, whose penultimate features stand in for Inception's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxgen.data import load_all, load_source
from jaxgen.errors import ConfigError, DataError
from jaxgen.eval.batching import map_batches
from jaxgen.models.classifier import ImageClassifier
from jaxgen.pipelines.autoencoder import to_unit
from jaxgen.tasks.base import Task


class ClassifierTask(Task):
  name = "classifier"

  @staticmethod
  def default_config():
    return {"model": dict(num_classes=10, stage_sizes=(1, 1, 1), width=16, norm="group",
                          groups=8, cifar_stem=True, random_flip=False)}

  @staticmethod
  def validate(config):
    m = config.model
    if m.num_classes < 2:
      raise ConfigError(f"model.num_classes must be at least 2; got {m.num_classes}.")
    if m.norm not in ("group", "batch"):
      raise ConfigError(f"model.norm must be 'group' or 'batch'; got {m.norm!r}.")

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.module = ImageClassifier(m.num_classes, tuple(m.stage_sizes), m.width, m.norm, m.groups,
                                  m.cifar_stem)

  def _inputs(self, images):
    return 2.0 * to_unit(images) - 1.0

  def init(self, key, batch):
    if "label" not in batch:
      raise DataError("The classifier task needs labelled data; this data set has no labels.")
    variables = self.module.init(key, self._inputs(batch["image"]))
    params = {"params": variables["params"]}
    return params, {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(self, params, model_state, batch, key):
    x = self._inputs(batch["image"])
    if self.config.model.random_flip:
      flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
      x = jnp.where(flip, x[:, :, ::-1], x)
    (_, logits), updates = self.module.apply({**params, **model_state}, x, train=True,
                                             mutable=list(model_state.keys()))
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (logits.argmax(-1) == labels).mean()
    return loss, (dict(accuracy=accuracy), {**model_state, **updates})

  def apply(self, params, model_state, images):
    """-> (features, logits) in eval mode; images uint8 or [0, 1]."""
    return self.module.apply({**params, **model_state}, self._inputs(images), train=False)

  @staticmethod
  def add_eval_args(parser) -> None:
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate on the first N held-out images only")

  def evaluate(self, params, model_state, key, limit=None, **unused):
    d = self.config.data
    data = load_all(load_source(d, d.eval_split), limit=limit)
    if "label" not in data:
      raise DataError("The eval split has no labels.")
    fn = jax.jit(lambda b, k: {"correct": self.apply(params, model_state, b["image"])[1]
                                          .argmax(-1) == b["label"]})
    r = map_batches(fn, {"image": data["image"], "label": data["label"]},
                    min(d.batch_size, len(data["image"])))
    return dict(num_images=int(len(r["correct"])), accuracy=float(r["correct"].mean()))

"""Sample quality that runs offline: Frechet distance, precision/recall and (for conditional
models) the share of samples classified as the requested class, all in the feature space of a
classifier trained on the real data.

No Inception or CLIP weights can be assumed offline, so the feature network is a small ResNet
trained through the one loop on the generator's own data set and image size (by the app layer:
`jaxgen.app.load_feature_net`), then cached in $JAXGEN_CACHE (default ~/.cache/jaxgen)/
feature_nets. Numbers are comparable between models evaluated with the same feature network,
not with published FIDs (use --inception for those).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib

import jax
import numpy as np

from jaxgen.data import load_all, load_source
from jaxgen.errors import CheckpointError, DataError
from jaxgen.eval.fid import density_coverage, feature_stats, frechet_distance, precision_recall
from jaxgen.images import map_batches, to_signed
from jaxgen.models import build
from jaxgen.models.classifier import ImageClassifier

DATA_KEYS = ("source", "name", "path", "tfds_data_dir", "image_key", "label_key", "train_split",
             "eval_split", "holdout_fraction", "image_size", "channels")


def cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("JAXGEN_CACHE", pathlib.Path.home() / ".cache" / "jaxgen"))


@functools.partial(jax.jit, static_argnums=0)
def classify(module: ImageClassifier, variables, images):
  """(features, logits) of uint8 or [0, 1] images, in eval mode."""
  return module.apply(variables, to_signed(images), train=False)


@dataclasses.dataclass
class FeatureNet:
  """A trained classifier: images -> (features [N, D], logits [N, K]), batched and jitted."""
  module: ImageClassifier
  variables: dict
  data: dict                     # the data section it was trained on
  workdir: pathlib.Path | None = None

  @classmethod
  def from_weights(cls, w) -> FeatureNet:
    """From a classifier run's weights (jaxgen.weights.load_weights)."""
    if w.task != "classifier":
      raise CheckpointError(f"{w.workdir} holds a {w.task} run; the feature network must be a "
                            "classifier run.")
    module = build.build(ImageClassifier, w.config["model"], skip=("random_flip",))
    return cls(module, {**w.params, **w.model_state}, w.config["data"], w.workdir)

  @property
  def num_classes(self) -> int:
    return self.module.num_classes

  def __call__(self, images: np.ndarray, batch_size: int = 256):
    out = map_batches(lambda x: np.concatenate(
        [np.asarray(a) for a in classify(self.module, self.variables, x)], -1), images, batch_size)
    k = self.num_classes
    return out[:, :-k], out[:, -k:]


def fill_classifier_config(c, data_cfg, num_classes: int, steps: int = 600) -> None:
  """The feature network's recipe, on a classifier-task config `c`."""
  for k in DATA_KEYS:
    c.data[k] = data_cfg[k]
  c.data.batch_size = 128
  c.model.update(num_classes=num_classes, stage_sizes=(1, 1, 1), width=16, norm="group",
                 groups=8)
  c.optim.update(lr=3e-3, warmup_steps=50, weight_decay=1e-4, ema_decay=0.99)
  c.train.update(num_steps=steps, log_every=50, sample_every=0, ckpt_every=steps)


def num_classes_of(data_cfg) -> int:
  source = load_source(data_cfg, data_cfg.train_split)
  probe = source.get(np.arange(min(len(source), 4096)))
  if "label" not in probe:
    raise DataError("The offline metric trains a classifier on the real data, but this data "
                    "set has no labels: use --inception with FID weights instead.")
  return len(source.class_names or ()) or int(probe["label"].max()) + 1


def feature_net_dir(data_cfg) -> pathlib.Path:
  key = "|".join(str(data_cfg[k]) for k in DATA_KEYS)
  digest = hashlib.sha256(key.encode()).hexdigest()[:10]
  name = data_cfg.name if data_cfg.source in ("embedded", "tfds") else data_cfg.source
  return cache_root() / "feature_nets" / (
      f"{name}-{data_cfg.image_size}px-{data_cfg.channels}ch-{digest}")


def load_feature_net(data_cfg, workdir: str | pathlib.Path | None = None) -> FeatureNet:
  """The classifier in `workdir`, else the cached one for this data set and size; an error
  saying how to make it when there is none (`jaxgen.app.load_feature_net` trains it)."""
  from jaxgen.weights import load_weights
  path = pathlib.Path(workdir) if workdir is not None else feature_net_dir(data_cfg)
  if workdir is None and not (path / "checkpoints").exists():
    raise CheckpointError(f"No feature network in {path}: jaxgen.app.load_feature_net (or "
                          "`jaxgen eval` on a diffusion run) trains it.")
  return FeatureNet.from_weights(load_weights(path))


def quality(samples: np.ndarray, reference: np.ndarray, net, *, labels=None, k: int = 3,
            reference_features=None) -> dict:
  """Metrics of `samples` against held-out `reference` images (uint8 or [0, 1])."""
  fake, fake_logits = net(samples)
  real = reference_features if reference_features is not None else net(reference)[0]
  fd = frechet_distance(*feature_stats(real), *feature_stats(fake))
  precision, recall = precision_recall(real, fake, k)
  density, coverage = density_coverage(real, fake, 5)
  out = dict(frechet_distance=fd, precision=precision, recall=recall, density=density,
             coverage=coverage, num_samples=len(fake), num_reference=len(real))
  if labels is not None:
    out["class_accuracy"] = float(np.mean(fake_logits.argmax(-1) == np.asarray(labels)))
  return out


def baselines(data_cfg, net, num: int, seed: int = 0) -> dict:
  """Reference points for the metric, each named by what it scores, against the first half of
  the held-out split (images the feature network never saw in training):

    heldout_vs_heldout   the other half of the held-out split: real images the feature network
                         never saw, the honest best a generator can hope for
    train_vs_heldout     training images, which the feature network was trained on (its own
                         training set scores better than any unseen image would: shown so that
                         no one mistakes it for the real-data baseline)
    uniform_noise        the worst
  """
  test = load_all(load_source(data_cfg, data_cfg.eval_split), limit=2 * num)
  if len(test["image"]) < 4:
    raise DataError(f"The held-out split has {len(test['image'])} images; the baselines need "
                    "at least 4.")
  half = len(test["image"]) // 2
  ref, other = test["image"][:half], test["image"][half:2 * half]
  reference = net(ref)[0]
  train = load_source(data_cfg, data_cfg.train_split)
  idx = np.random.default_rng(seed).choice(len(train), min(half, len(train)), replace=False)
  seen = train.get(np.sort(idx))
  noise = np.random.default_rng(seed).integers(0, 256, other.shape, dtype=np.uint8)
  other_labels = test["label"][half:2 * half] if "label" in test else None
  return {"heldout_vs_heldout": quality(other, ref, net, labels=other_labels,
                                        reference_features=reference),
          "train_vs_heldout": quality(seen["image"], ref, net, labels=seen.get("label"),
                                      reference_features=reference),
          "uniform_noise": quality(noise, ref, net, reference_features=reference)}

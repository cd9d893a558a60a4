"""Sample quality that runs offline: Frechet distance, precision/recall and (for conditional
models) the share of samples classified as the requested class, all in the feature space of a
classifier trained on the real data.

No Inception or CLIP weights can be assumed offline, so the feature network is a small ResNet
trained through the one loop on the generator's own data set and image size, then cached in
$JAXGEN_CACHE (default ~/.cache/jaxgen)/feature_nets. Numbers are comparable between models
evaluated with the same feature network, not with published FIDs (use --inception for those).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib

import jax
import numpy as np

from jaxgen.data import load_all, load_source
from jaxgen.errors import DataError
from jaxgen.eval.fid import (
  batched_features,
  density_coverage,
  feature_stats,
  frechet_distance,
  precision_recall,
)

log = logging.getLogger(__name__)

DATA_KEYS = ("source", "name", "path", "tfds_data_dir", "image_key", "label_key", "train_split",
             "eval_split", "holdout_fraction", "image_size", "channels")


def cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("JAXGEN_CACHE", pathlib.Path.home() / ".cache" / "jaxgen"))


@dataclasses.dataclass
class FeatureNet:
  """A trained classifier: images -> (features [N, D], logits [N, K]), batched and jitted."""
  task: object
  params: object
  model_state: object

  def __post_init__(self):
    self._fn = jax.jit(lambda x: self.task.apply(self.params, self.model_state, x))

  def __call__(self, images: np.ndarray, batch_size: int = 256):
    out = batched_features(lambda x: np.concatenate([np.asarray(a) for a in self._fn(x)], -1),
                           images, batch_size)
    k = self.task.config.model.num_classes
    feats, logits = out[:, :-k], out[:, -k:]
    return feats, logits


def classifier_config(data_cfg, num_classes: int, steps: int = 600):
  from jaxgen import config as config_lib
  c = config_lib.base_config("classifier")
  for k in DATA_KEYS:
    c.data[k] = data_cfg[k]
  c.data.batch_size = 128
  c.model.update(num_classes=num_classes, stage_sizes=(1, 1, 1), width=16, norm="group",
                 groups=8)
  c.optim.update(lr=3e-3, warmup_steps=50, weight_decay=1e-4, ema_decay=0.99)
  c.train.update(num_steps=steps, log_every=50, sample_every=0, ckpt_every=steps)
  return c


def feature_net_dir(data_cfg) -> pathlib.Path:
  key = "|".join(str(data_cfg[k]) for k in DATA_KEYS)
  digest = hashlib.sha256(key.encode()).hexdigest()[:10]
  name = data_cfg.name if data_cfg.source in ("embedded", "tfds") else data_cfg.source
  return cache_root() / "feature_nets" / (
      f"{name}-{data_cfg.image_size}px-{data_cfg.channels}ch-{digest}")


def load_feature_net(data_cfg, workdir: str | pathlib.Path | None = None, *,
                     train_if_missing: bool = True, progress: bool = True,
                     steps: int = 600) -> FeatureNet:
  """The classifier in `workdir` (any classifier-task workdir), else the cached one for this
  data set and size, trained first (about a minute on 2 CPU cores) if there is none."""
  from jaxgen import train
  if workdir is None:
    workdir = feature_net_dir(data_cfg)
    if not (workdir / "checkpoints").exists():
      if not train_if_missing:
        raise DataError(f"No feature network in {workdir}.")
      source = load_source(data_cfg, data_cfg.train_split)
      probe = source.get(np.arange(min(len(source), 4096)))
      if "label" not in probe:
        raise DataError("The offline metric trains a classifier on the real data, but this data "
                        "set has no labels: use --inception with FID weights instead.")
      num_classes = len(source.class_names or ()) or int(probe["label"].max()) + 1
      log.info("Training the metric's feature network in %s (once per data set and size).",
               workdir)
      train.train(classifier_config(data_cfg, num_classes, steps), workdir, progress=progress)
  run = train.restore_run(workdir)
  return FeatureNet(run.task, run.params, run.model_state)


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
  """Reference points for the metric: real training images against the held-out set (the best a
  generator can hope for) and uniform noise (the worst)."""
  test = load_all(load_source(data_cfg, data_cfg.eval_split), limit=num)["image"]
  train = load_source(data_cfg, data_cfg.train_split)
  idx = np.random.default_rng(seed).choice(len(train), min(num, len(train)), replace=False)
  real = train.get(np.sort(idx))
  reference = net(test)[0]
  noise = np.random.default_rng(seed).integers(0, 256, real["image"].shape, dtype=np.uint8)
  out = {"real_vs_heldout": quality(real["image"], test, net, labels=real.get("label"),
                                    reference_features=reference),
         "uniform_noise": quality(noise, test, net, reference_features=reference)}
  return out

"""SimCLR: contrastive representation learning from two augmented views of each image.

Views are made on the device inside the train step (jaxgen.contrastive.augment); the encoder and
projection head see both views as one batch (one set of BatchNorm statistics over the global
batch); NT-Xent uses every other view in the global batch as a negative. Evaluation freezes the
encoder and fits a linear probe and a k-NN classifier on held-out labels, beside the same probes
on raw pixels and on a randomly initialised encoder.
"""
from __future__ import annotations

import argparse
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import images as img
from jaxgen.contrastive import augment
from jaxgen.contrastive.losses import nt_xent
from jaxgen.data import load_all, load_source
from jaxgen.errors import ConfigError
from jaxgen.eval.fid import batched_features
from jaxgen.eval.probe import knn_accuracy, linear_probe
from jaxgen.models.heads import ProjectionHead
from jaxgen.pipelines.autoencoder import to_unit
from jaxgen.tasks.base import Task
from jaxgen.tasks.encoders import build_image_encoder, image_encoder_section, validate_image_encoder


class SimCLRModel(nn.Module):
  encoder: nn.Module
  head: nn.Module

  def __call__(self, x, *, train: bool = False):
    h = self.encoder(x, train=train)
    return h, self.head(h, train=train)

  def features(self, x):
    return self.encoder(x, train=False)


class SimCLRTask(Task):
  name = "simclr"

  @staticmethod
  def default_config():
    return {"model": dict(
        encoder=image_encoder_section(),
        proj_hidden=256,
        proj_dim=64,
        proj_layers=2,
        proj_bn=True,
        temperature=0.2,
        # augmentations (SimCLR recipe; strength 0.5 and no blur as for CIFAR-10)
        aug_strength=0.5,
        aug_blur=False,
        crop_min_scale=0.08,
    )}

  @staticmethod
  def validate(config):
    m = config.model
    validate_image_encoder(m.encoder, config.data.image_size)
    if m.temperature <= 0:
      raise ConfigError(f"model.temperature must be positive; got {m.temperature}.")
    if not 0.0 < m.crop_min_scale <= 1.0:
      raise ConfigError(f"model.crop_min_scale must be in (0, 1]; got {m.crop_min_scale}.")

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.module = SimCLRModel(
        build_image_encoder(m.encoder),
        ProjectionHead(m.proj_hidden, m.proj_dim, m.proj_layers, batch_norm=m.proj_bn))

  def views(self, key, images):
    """Two augmented views (float [0, 1]) of uint8 images [B, H, W, C]."""
    m = self.config.model
    x = to_unit(images)
    return augment.two_views(key, x, size=self.config.data.image_size, strength=m.aug_strength,
                             blur=m.aug_blur, crop_scale=(m.crop_min_scale, 1.0))

  @staticmethod
  def _inputs(x):
    return 2.0 * x - 1.0

  def init(self, key, batch):
    variables = self.module.init(key, self._inputs(to_unit(batch["image"])))
    return {"params": variables["params"]}, {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(self, params, model_state, batch, key):
    v1, v2 = self.views(key, batch["image"])
    n = v1.shape[0]
    both = self._inputs(jnp.concatenate([v1, v2]))
    (_, z), updates = self.module.apply({**params, **model_state}, both, train=True,
                                        mutable=list(model_state.keys()))
    loss, metrics = nt_xent(z[:n], z[n:], self.config.model.temperature)
    return loss, (metrics, {**model_state, **updates})

  def features(self, params, model_state, images, batch_size: int = 250) -> np.ndarray:
    fn = jax.jit(lambda x: self.module.apply({**params, **model_state},
                                             self._inputs(to_unit(x)), method=SimCLRModel.features))
    return batched_features(fn, images, batch_size)

  # -- pictures: augmented views -----------------------------------------------------------
  def view_strip(self, key, images) -> np.ndarray:
    """Rows: the images, then two augmented views of each."""
    v1, v2 = self.views(key, images)
    return img.rows(to_unit(images), v1, v2, scale=img.display_scale(self.config.data.image_size))

  def _examples(self, n: int):
    d = self.config.data
    return load_all(load_source(d, d.eval_split), limit=n)["image"]

  def pictures(self, params, model_state, key):
    return {"views": self.view_strip(key, self._examples(12))}

  @staticmethod
  def add_sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=int, default=12, help="images whose views to show")

  def sample(self, params, model_state, args, outdir: pathlib.Path):
    path = pathlib.Path(args.out_file) if args.out_file else outdir / "augmented_views.png"
    strip = self.view_strip(jax.random.PRNGKey(args.seed), self._examples(args.num))
    return [img.save_png(strip, path)]

  # -- evaluation --------------------------------------------------------------------------
  @staticmethod
  def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=None, help="training images for the probes")
    parser.add_argument("--baselines", action="store_true",
                        help="also probe raw pixels and a randomly initialised encoder")

  def evaluate(self, params, model_state, key, *, limit=None, baselines=False, **unused):
    d = self.config.data
    train = load_all(load_source(d, d.train_split), limit=limit)
    test = load_all(load_source(d, d.eval_split))
    k = len(load_source(d, d.train_split).class_names or ()) or int(train["label"].max()) + 1

    def probes(ftr, fte):
      lin = linear_probe(ftr, train["label"], fte, test["label"], num_classes=k, l2=1e-3)
      knn = knn_accuracy(ftr, train["label"], fte, test["label"], num_classes=k)
      return dict(linear_probe=float(lin["accuracy"]), knn=float(knn))

    out = probes(self.features(params, model_state, train["image"]),
                 self.features(params, model_state, test["image"]))
    if baselines:
      flat = lambda x: (x.reshape(len(x), -1) / 255.0).astype(np.float32)
      out["raw_pixels"] = probes(flat(train["image"]), flat(test["image"]))
      rand, rand_state = jax.jit(self.init)(jax.random.PRNGKey(12345),
                                            {"image": train["image"][:2]})
      out["random_encoder"] = probes(self.features(rand, rand_state, train["image"]),
                                     self.features(rand, rand_state, test["image"]))
    out.update(num_train=len(train["image"]), num_test=len(test["image"]))
    return out

"""SimCLR: contrastive representation learning from two augmented views of each image.

Views are made on the device inside the train step (jaxgen.contrastive.augment); the encoder and
projection head see both views as one batch (one set of BatchNorm statistics over the global
batch); NT-Xent uses every other view in the global batch as a negative. Evaluation (jaxgen.eval.
probe) freezes the encoder and fits a linear probe and a k-NN classifier on held-out labels.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxgen.contrastive.losses import nt_xent
from jaxgen.data import load_all, load_source
from jaxgen.errors import ConfigError
from jaxgen.images import to_signed
from jaxgen.models import build
from jaxgen.models.heads import ProjectionHead
from jaxgen.models.simclr import SimCLRModel
from jaxgen.pipelines import contrastive as pipe
from jaxgen.tasks.base import Task


class SimCLRTask(Task):
  name = "simclr"

  @staticmethod
  def default_config():
    return {"model": dict(
        encoder=build.image_encoder_section(),
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
    build.validate_image_encoder(m.encoder, config.data.image_size)
    if m.temperature <= 0:
      raise ConfigError(f"model.temperature must be positive; got {m.temperature}.")
    if not 0.0 < m.crop_min_scale <= 1.0:
      raise ConfigError(f"model.crop_min_scale must be in (0, 1]; got {m.crop_min_scale}.")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.module = simclr_module(config.model)

  def init(self, key, batch):
    variables = self.module.init(key, to_signed(batch["image"]))
    return {"params": variables["params"]}, {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(self, params, model_state, batch, key):
    v1, v2 = pipe.views(key, batch["image"], self.config.model, self.config.data.image_size)
    n = v1.shape[0]
    (_, z), updates = self.module.apply({**params, **model_state},
                                        to_signed(jnp.concatenate([v1, v2])), train=True,
                                        mutable=list(model_state.keys()))
    loss, metrics = nt_xent(z[:n], z[n:], self.config.model.temperature)
    return loss, (metrics, {**model_state, **updates})

  def pictures(self, params, model_state, key):
    d = self.config.data
    images = load_all(load_source(d, d.eval_split), limit=12)["image"]
    return {"views": pipe.view_strip(key, images, self.config.model, d.image_size)}


def simclr_module(m) -> SimCLRModel:
  """The SimCLRModel of a simclr model section."""
  return SimCLRModel(build.image_encoder(m.encoder),
                     ProjectionHead(m.proj_hidden, m.proj_dim, m.proj_layers, batch_norm=m.proj_bn))

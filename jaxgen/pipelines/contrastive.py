"""Inference of a SimCLR run: frozen encoder features, and pictures of the augmented views the
loss compares."""
from __future__ import annotations

import functools

import jax
import numpy as np

from jaxgen import images as img
from jaxgen.contrastive import augment
from jaxgen.images import map_batches, to_signed, to_unit
from jaxgen.models.simclr import SimCLRModel


def views(key, images, model_cfg, size: int):
  """Two augmented views (float [0, 1]) of uint8 images [B, H, W, C], with a simclr model
  section's augmentation settings."""
  m = model_cfg
  return augment.two_views(key, to_unit(images), size=size, strength=m.aug_strength,
                           blur=m.aug_blur, crop_scale=(m.crop_min_scale, 1.0))


def view_strip(key, images, model_cfg, size: int) -> np.ndarray:
  """Rows: the images, then two augmented views of each."""
  v1, v2 = views(key, images, model_cfg, size)
  return img.rows(to_unit(images), v1, v2, scale=img.display_scale(size))


@functools.partial(jax.jit, static_argnums=0)
def _features(module: SimCLRModel, variables, x):
  return module.apply(variables, to_signed(x), method=SimCLRModel.features)


def features(module: SimCLRModel, params, model_state, images, batch_size: int = 250
             ) -> np.ndarray:
  """The frozen encoder's pooled features [N, D] of uint8 or [0, 1] images."""
  variables = {**params, **model_state}
  return map_batches(lambda x: _features(module, variables, x), images, batch_size)

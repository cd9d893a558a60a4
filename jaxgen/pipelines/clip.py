"""A trained dual encoder, used from Python: embed images and texts in the shared space,
per-token text states for conditioning generation, zero-shot classification and CLIP score.

Tokenising happens on the host (`DualEncoder.tokenize`); everything else is jitted.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.contrastive.losses import l2_normalize
from jaxgen.errors import ShapeError
from jaxgen.eval.fid import batched_features


class DualEncoderModule(nn.Module):
  """Image tower + projection, text tower (with its projection), learnable temperature."""
  image_encoder: nn.Module
  text_encoder: nn.Module
  embed_dim: int
  loss: str = "clip"                 # clip | siglip
  init_logit_scale: float = 2.6593   # log(1 / 0.07), CLIP's initial temperature
  init_bias: float = -10.0           # SigLIP's initial bias
  lock_image: bool = False           # LiT: the image tower runs frozen (eval mode, no gradient)
  lock_text: bool = False

  def setup(self):
    self.image_proj = nn.Dense(self.embed_dim, use_bias=False,
                               kernel_init=nn.initializers.lecun_normal(), name="image_proj")
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.init_logit_scale),
                                  ())
    if self.loss == "siglip":
      self.bias = self.param("bias", nn.initializers.constant(self.init_bias), ())

  def embed_image(self, x, *, train: bool = False):
    h = self.image_encoder(x, train=train and not self.lock_image)
    if self.lock_image:
      h = jax.lax.stop_gradient(h)
    return self.image_proj(h)

  def text_outputs(self, input_ids, attention_mask=None):
    out = self.text_encoder(input_ids, attention_mask)
    return jax.lax.stop_gradient(out) if self.lock_text else out

  def embed_text(self, input_ids, attention_mask=None):
    return self.text_outputs(input_ids, attention_mask)["text_embeds"]

  def __call__(self, x, input_ids, attention_mask=None, *, train: bool = False):
    return self.embed_image(x, train=train), self.embed_text(input_ids, attention_mask)


@dataclasses.dataclass(frozen=True)
class DualEncoder:
  """A module, its image shape and the tokenizer (a hashable handle; pass params separately)."""
  module: DualEncoderModule
  image_shape: tuple[int, int, int]
  tokenize: Callable = dataclasses.field(compare=False, hash=False)

  def __hash__(self):
    return hash((self.module, self.image_shape))

  def check_images(self, images):
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.image_shape):
      raise ShapeError(f"images: this dual encoder takes [batch, "
                       f"{', '.join(map(str, self.image_shape))}] (NHWC); got "
                       f"{list(images.shape)}.")


def _variables(params, model_state):
  return {**params, **(model_state or {})}


@functools.partial(jax.jit, static_argnums=0)
def _embed_images(model: DualEncoder, params, model_state, images):
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  emb = model.module.apply(_variables(params, model_state), 2.0 * x - 1.0,
                           method=DualEncoderModule.embed_image)
  return l2_normalize(emb)


def embed_images(model: DualEncoder, params, model_state, images, batch_size: int = 256):
  """Unit-norm image embeddings [N, D] (uint8 or [0, 1] images)."""
  images = np.asarray(images)
  model.check_images(images)
  return batched_features(lambda x: _embed_images(model, params, model_state, x), images,
                          batch_size)


@functools.partial(jax.jit, static_argnums=0)
def _embed_tokens(model: DualEncoder, params, input_ids, attention_mask):
  emb = model.module.apply(params, input_ids, attention_mask,
                           method=DualEncoderModule.embed_text)
  return l2_normalize(emb)


def embed_texts(model: DualEncoder, params, texts: Sequence[str]) -> np.ndarray:
  """Unit-norm text embeddings [N, D]; over-long prompts raise a TokenError naming them."""
  tok = model.tokenize(list(texts))
  return np.asarray(_embed_tokens(model, params, tok["input_ids"], tok["attention_mask"]))


@functools.partial(jax.jit, static_argnums=0)
def text_states(model: DualEncoder, params, input_ids, attention_mask=None):
  """Per-token states [N, L, W] of the text tower (what a diffusion U-Net attends to)."""
  out = model.module.apply(params, input_ids, attention_mask,
                           method=DualEncoderModule.text_outputs)
  return out["last_hidden_state"]


def zero_shot_classifier(model: DualEncoder, params, class_prompts: Sequence[Sequence[str]]):
  """Class embeddings [K, D]: each class's prompt embeddings averaged and re-normalised
  (CLIP's prompt ensembling)."""
  embs = [embed_texts(model, params, prompts).mean(0) for prompts in class_prompts]
  return np.asarray(l2_normalize(jnp.stack(embs)))


def clip_score(model: DualEncoder, params, model_state, images, prompts: Sequence[str]) -> dict:
  """CLIP score (Hessel et al. 2021): 100 * max(cos(image, prompt), 0) per pair; mean and the
  per-image values."""
  img = embed_images(model, params, model_state, images)
  txt = embed_texts(model, params, prompts)
  per_image = 100.0 * np.maximum(np.sum(img * txt, axis=-1), 0.0)
  return dict(clip_score=float(per_image.mean()), per_image=per_image)

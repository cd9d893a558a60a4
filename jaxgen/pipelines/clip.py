"""A trained dual encoder, used from Python: embed images and texts in the shared space,
per-token text states for conditioning generation, zero-shot classification and CLIP score.

Tokenising happens on the host (`DualEncoder.tokenize`); everything else is jitted.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.contrastive.losses import l2_normalize
from jaxgen.errors import ConfigError
from jaxgen.images import check_images, map_batches, to_signed
from jaxgen.models.dual_encoder import DualEncoderModule


@dataclasses.dataclass(frozen=True)
class DualEncoder:
  """A module, its image shape and the tokenizer (a hashable handle; pass params separately)."""
  module: DualEncoderModule
  image_shape: tuple[int, int, int]
  tokenize: Callable = dataclasses.field(compare=False, hash=False)

  def __hash__(self):
    return hash((self.module, self.image_shape))

  def check_images(self, images):
    check_images(images, self.image_shape, model="this dual encoder takes")


def _variables(params, model_state):
  return {**params, **(model_state or {})}


@functools.partial(jax.jit, static_argnums=0)
def _embed_images(model: DualEncoder, params, model_state, images):
  emb = model.module.apply(_variables(params, model_state), to_signed(images),
                           method=DualEncoderModule.embed_image)
  return l2_normalize(emb)


def embed_images(model: DualEncoder, params, model_state, images, batch_size: int = 256):
  """Unit-norm image embeddings [N, D] (uint8 or [0, 1] images)."""
  images = np.asarray(images)
  model.check_images(images)
  return map_batches(lambda x: _embed_images(model, params, model_state, x), images, batch_size)


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


def nearest_captions(model: DualEncoder, params, model_state, images, gallery: Sequence[str]
                     ) -> list[str]:
  """Retrieval captioning: for each image, the caption of `gallery` nearest in the shared
  space."""
  gallery = list(gallery)
  texts = embed_texts(model, params, gallery)
  best = np.argmax(embed_images(model, params, model_state, images) @ texts.T, axis=1)
  return [gallery[int(b)] for b in best]


def from_weights(w) -> tuple[DualEncoder, dict, dict]:
  """(DualEncoder, params, model_state) of a clip run's weights (jaxgen.weights.load_weights):
  built from its saved config and tokenizer, without its task or its data."""
  from jaxgen.models import build
  if w.tokenizer is None:
    raise ConfigError(f"{w.workdir} holds no tokenizer/ folder; run `jaxgen train` on it once "
                      "with this jaxgen version to store it.")
  d = w.section("data")
  module = build.dual_encoder(w.section("model"), w.tokenizer)
  return DualEncoder(module, (d.image_size, d.image_size, d.channels), w.tokenizer), \
      w.params, w.model_state


@functools.lru_cache(maxsize=8)
def load_dual_encoder(workdir: str, what: str = "") -> tuple[DualEncoder, dict, dict]:
  """(DualEncoder, params, model_state) of a trained clip workdir, for scoring other runs."""
  from jaxgen.weights import load_weights
  return from_weights(load_weights(workdir, expect_task="clip", what=what))

"""A trained captioner, used from Python: captions for images by greedy decoding, sampling
(temperature, top-k, top-p) or beam search, in one jitted call per batch of images.

    model, params, state = load_captioner("runs/captioner")
    caption(model, params, state, images)                       # greedy
    caption(model, params, state, images, beam=4)               # beam search
    caption(model, params, state, images, key, temperature=0.8, top_p=0.9)

Images, keys, temperatures, top_k and top_p are traced: changing them never recompiles (the
number of beams and the batch size fix the shapes). The image is encoded once; each new token
costs one decoder position through the key/value cache.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError
from jaxgen.images import check_images, map_batches, to_signed
from jaxgen.models.captioner import CaptionerModule
from jaxgen.text import decoding


@dataclasses.dataclass(frozen=True)
class Captioner:
  """A module, its image shape and the tokenizer (a hashable handle; pass params separately)."""
  module: CaptionerModule
  image_shape: tuple[int, int, int]
  tokenizer: Callable = dataclasses.field(compare=False, hash=False)

  def __hash__(self):
    return hash((self.module, self.image_shape))

  @property
  def max_len(self) -> int:
    return self.module.decoder.max_positions

  def check_images(self, images):
    check_images(images, self.image_shape, model="this captioner reads")

  def ids_to_text(self, ids) -> list[str]:
    """Caption strings of ids [N, L] (start token first): the tokens up to the end token."""
    out = []
    for row in np.asarray(ids):
      row = row[1:]
      ends = np.flatnonzero(row == self.tokenizer.eos_id)
      out.append(self.tokenizer.decode(row[:ends[0]] if len(ends) else row).strip())
    return out


def _step_fn(model: Captioner, variables, memory) -> decoding.Step:
  def step(tokens, pos, cache):
    logits, _, cache = model.module.apply(variables, tokens[:, None], memory, cache, pos,
                                          method=CaptionerModule.decode)
    return logits[:, 0], cache
  return step


def _encode(model: Captioner, variables, images):
  memory, _ = model.module.apply(variables, images, method=CaptionerModule.encode)
  return memory


def _ids(tok):
  return dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)


@functools.partial(jax.jit, static_argnums=0)
def sample_ids(model: Captioner, params, model_state, images, key, temperature=0.0, top_k=0,
               top_p=1.0):
  """Token ids [B, L] of one caption per image: greedy at temperature 0, else sampled."""
  variables = {**params, **(model_state or {})}
  memory = _encode(model, variables, to_signed(images))
  cache = model.module.decoder.init_cache(images.shape[0])
  return decoding.sample(_step_fn(model, variables, memory), cache, images.shape[0], key,
                         max_len=model.max_len, temperature=temperature, top_k=top_k,
                         top_p=top_p, **_ids(model.tokenizer))


@functools.partial(jax.jit, static_argnums=(0, 5))
def beam_ids(model: Captioner, params, model_state, images, length_penalty, beams: int):
  """(ids [B, beams, L] best first, scores [B, beams]) of beam search per image."""
  variables = {**params, **(model_state or {})}
  b = images.shape[0]
  memory = jnp.repeat(_encode(model, variables, to_signed(images)), beams, axis=0)
  cache = model.module.decoder.init_cache(b * beams)
  return decoding.beam_search(_step_fn(model, variables, memory), cache, b, beams,
                              max_len=model.max_len, length_penalty=length_penalty,
                              **_ids(model.tokenizer))


def caption(model: Captioner, params, model_state, images, key=None, *, beam: int = 0,
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            length_penalty: float = 1.0, batch_size: int = 64) -> list[str]:
  """One caption per image (uint8 or [0, 1] images [N, H, W, C]): beam search with `beam` > 0
  beams, else greedy (temperature 0) or sampling (temperature > 0; `key` required)."""
  images = np.asarray(images)
  model.check_images(images)
  if beam < 0 or temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ConfigError(f"decoding options out of range: beam={beam} (>= 0), temperature="
                      f"{temperature} (>= 0), top_k={top_k} (>= 0), top_p={top_p} (in (0, 1])")
  if beam and temperature:
    raise ConfigError("beam search is deterministic: give either beam or temperature")
  if temperature > 0 and key is None:
    raise ConfigError("sampling (temperature > 0) needs a PRNG key")
  key = jax.random.PRNGKey(0) if key is None else key
  batch_size = min(batch_size, len(images))
  if beam:
    fn = lambda x: beam_ids(model, params, model_state, x, jnp.float32(length_penalty),
                            beam)[0][:, 0]
    ids = map_batches(fn, images, batch_size)
  else:
    fn = lambda b, k: {"ids": sample_ids(model, params, model_state, b["x"], k,
                                         jnp.float32(temperature), jnp.int32(top_k),
                                         jnp.float32(top_p))}
    ids = map_batches(fn, {"x": images}, batch_size, key)["ids"]
  return model.ids_to_text(ids)


def caption_log_likelihood(model: Captioner, params, model_state, images, captions
                           ) -> np.ndarray:
  """Summed log-probability of each caption given its image (teacher forcing), [N]."""
  tok = model.tokenizer(list(captions))
  variables = {**params, **(model_state or {})}
  logits = _forward(model, variables, to_signed(np.asarray(images)), tok["input_ids"])
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  target = tok["input_ids"][:, 1:]
  per_token = np.take_along_axis(np.asarray(logp), target[..., None], -1)[..., 0]
  return (per_token * tok["attention_mask"][:, 1:]).sum(-1)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: Captioner, variables, images, input_ids):
  memory = _encode(model, variables, images)
  return model.module.apply(variables, input_ids, memory, method=CaptionerModule.decode)[0]


def from_weights(w) -> tuple[Captioner, dict, dict]:
  """(Captioner, params, model_state) of a captioner run's weights (jaxgen.weights)."""
  from jaxgen.models import build
  if w.tokenizer is None:
    raise ConfigError(f"{w.workdir} holds no tokenizer/ folder; run `jaxgen train` on it once "
                      "with this jaxgen version to store it.")
  d = w.section("data")
  module = build.captioner(w.section("model"), w.tokenizer)
  return Captioner(module, (d.image_size, d.image_size, d.channels), w.tokenizer), \
      w.params, w.model_state


def load_captioner(workdir: str, step: int | None = None) -> tuple[Captioner, dict, dict]:
  """(Captioner, params, model_state) of a trained captioner workdir."""
  from jaxgen.weights import load_weights
  return from_weights(load_weights(workdir, step, expect_task="captioner"))

"""Image captioning: an image encoder and an autoregressive text decoder with cross-attention to
the image tokens, trained by teacher forcing (next-token cross-entropy over the caption).

The encoder may start from a CLIP or SimCLR run (`model.image_init`) and stay locked
(`model.lock_image`, as LiT does); with `model.contrastive_dim > 0` CoCa's contrastive loss
between the pooled image and the unimodal text embedding is added to the captioning loss.
Decoding (greedy, sampling, beam search) is in jaxgen.pipelines.captioning; BLEU-4, CIDEr-D and
the shapes attribute accuracies in jaxgen.eval.captions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.contrastive.losses import clip_loss
from jaxgen.errors import ConfigError
from jaxgen.images import to_signed
from jaxgen.models import build
from jaxgen.pipelines import captioning as pipe
from jaxgen.tasks.base import CaptionedTask


def caption_loss(logits, input_ids, attention_mask, label_smoothing=0.0):
  """Next-token cross-entropy of teacher forcing, averaged over the real target tokens (the
  caption's words and its end token; not the start token, not padding). logits [B, L, V] at
  every input position; -> (loss, token accuracy)."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = input_ids[:, 1:]
  mask = attention_mask[:, 1:].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  count = jnp.maximum(mask.sum(), 1.0)
  accuracy = ((jnp.argmax(logits, -1) == targets) * mask).sum() / count
  return (nll * mask).sum() / count, accuracy


class CaptionerTask(CaptionedTask):
  name = "captioner"

  @staticmethod
  def default_config():
    return {"model": dict(
        encoder=build.image_encoder_section(norm="group"),
        text=build.captioner_text_section(),
        image_init="",            # a clip or simclr workdir whose image encoder to start from
        lock_image=False,         # keep the image encoder fixed (LiT); with no image_init: a
                                  # locked random encoder (a baseline)
        contrastive_dim=0,        # CoCa: > 0 adds the contrastive loss in a space of this size
        contrastive_weight=1.0,   # CoCa's weight of the contrastive loss
        label_smoothing=0.0,
        caption_template="a photo of a {}",
    )}

  @staticmethod
  def validate(config):
    m = config.model
    build.validate_image_encoder(m.encoder, config.data.image_size)
    t = m.text
    if t.width % t.heads:
      raise ConfigError(f"model.text.width={t.width} must be divisible by "
                        f"model.text.heads={t.heads}.")
    if not 0 <= t.unimodal_layers < t.layers:
      raise ConfigError(f"model.text.unimodal_layers={t.unimodal_layers} must lie in [0, "
                        f"model.text.layers={t.layers}): the last layers attend to the image.")
    if m.contrastive_dim and not t.unimodal_layers:
      raise ConfigError("model.contrastive_dim > 0 (CoCa) needs model.text.unimodal_layers > 0: "
                        "the text embedding is the unimodal layers' state at the end token.")
    if m.contrastive_dim < 0 or m.contrastive_weight < 0:
      raise ConfigError("model.contrastive_dim and model.contrastive_weight must be >= 0.")
    if not 0.0 <= m.label_smoothing < 1.0:
      raise ConfigError(f"model.label_smoothing must lie in [0, 1); got {m.label_smoothing}.")
    if "{}" not in m.caption_template:
      raise ConfigError("model.caption_template needs a '{}' for the class name.")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    d = config.data
    self.module = build.captioner(config.model, self.tokenizer)
    self.model = pipe.Captioner(self.module, (d.image_size, d.image_size, d.channels),
                                self.tokenizer)

  def init(self, key, batch):
    variables = self.module.init(key, to_signed(batch["image"]), jnp.asarray(batch["input_ids"]),
                                 jnp.asarray(batch["eos_positions"]))
    return {"params": variables["params"]}, {k: v for k, v in variables.items() if k != "params"}

  def frozen(self, path: str) -> bool:
    return self.config.model.lock_image and "'image_encoder'" in path

  def loss_fn(self, params, model_state, batch, key):
    m = self.config.model
    (logits, embeddings), updates = self.module.apply(
        {**params, **model_state}, to_signed(batch["image"]), batch["input_ids"],
        batch["eos_positions"], train=True, mutable=list(model_state.keys()))
    loss, accuracy = caption_loss(logits, batch["input_ids"], batch["attention_mask"],
                                  m.label_smoothing)
    metrics = dict(caption_loss=loss, token_accuracy=accuracy)
    if m.contrastive_dim:
      c_loss, c_metrics = clip_loss(*embeddings, params["params"]["logit_scale"])
      metrics.update(contrastive_loss=c_loss,
                     **{f"contrastive_{k}": v for k, v in c_metrics.items()})
      loss = loss + m.contrastive_weight * c_loss
    return loss, (metrics, {**model_state, **updates})

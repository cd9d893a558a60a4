"""CLIP-style dual encoder: image tower + text tower trained with the symmetric InfoNCE loss
(or SigLIP's sigmoid loss) over the global batch, with a learnable temperature.

Captions come from the data (the procedural `shapes` set has exact ones) or, for labelled data
without captions, from the class names ("a photo of a sneaker"). Evaluation (jaxgen.eval.
retrieval) is zero-shot classification with prompt ensembles and image<->text retrieval; the
text tower's per-token states condition latent diffusion (jaxgen.tasks.ldm).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxgen.contrastive.losses import clip_loss, siglip_loss
from jaxgen.errors import ConfigError
from jaxgen.images import to_signed
from jaxgen.models import build
from jaxgen.pipelines import clip as pipe
from jaxgen.tasks.base import CaptionedTask


class CLIPTask(CaptionedTask):
  name = "clip"
  image_init_tasks = ("simclr",)

  @staticmethod
  def default_config():
    return {"model": dict(
        encoder=build.image_encoder_section(norm="group"),
        text=build.text_section(),
        embed_dim=64,
        loss="clip",              # clip | siglip
        lock_image=False,         # LiT: keep the image tower fixed (with image_init)
        lock_text=False,
        image_init="",            # a simclr workdir to initialise the image tower from
        caption_template="a photo of a {}",
    )}

  @staticmethod
  def validate(config):
    m = config.model
    build.validate_image_encoder(m.encoder, config.data.image_size)
    if m.loss not in ("clip", "siglip"):
      raise ConfigError(f"model.loss must be 'clip' or 'siglip'; got {m.loss!r}.")
    if m.text.width % m.text.heads:
      raise ConfigError(f"model.text.width={m.text.width} must be divisible by "
                        f"model.text.heads={m.text.heads}.")
    if "{}" not in m.caption_template:
      raise ConfigError("model.caption_template needs a '{}' for the class name.")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    m, d = config.model, config.data
    self.module = build.dual_encoder(m, self.tokenizer)
    self.model = pipe.DualEncoder(self.module, (d.image_size, d.image_size, d.channels),
                                  self.tokenizer)

  def init(self, key, batch):
    variables = self.module.init(key, to_signed(batch["image"]), jnp.asarray(batch["input_ids"]),
                                 jnp.asarray(batch["attention_mask"]))
    params = {"params": variables["params"]}
    return params, {k: v for k, v in variables.items() if k != "params"}

  def frozen(self, path: str) -> bool:
    m = self.config.model
    return ((m.lock_image and "'image_encoder'" in path)
            or (m.lock_text and "'text_encoder'" in path))

  def loss_fn(self, params, model_state, batch, key):
    (img_emb, txt_emb), updates = self.module.apply(
        {**params, **model_state}, to_signed(batch["image"]), batch["input_ids"],
        batch["attention_mask"], train=True, mutable=list(model_state.keys()))
    p = params["params"]
    if self.config.model.loss == "clip":
      loss, metrics = clip_loss(img_emb, txt_emb, p["logit_scale"])
    else:
      loss, metrics = siglip_loss(img_emb, txt_emb, p["logit_scale"], p["bias"])
    return loss, (metrics, {**model_state, **updates})

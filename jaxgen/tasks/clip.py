"""CLIP-style dual encoder: image tower + text tower trained with the symmetric InfoNCE loss
(or SigLIP's sigmoid loss) over the global batch, with a learnable temperature.

Captions come from the data (the procedural `shapes` set has exact ones) or, for labelled data
without captions, from the class names ("a photo of a sneaker"). Evaluation (jaxgen.eval.
retrieval) is zero-shot classification with prompt ensembles and image<->text retrieval; the
text tower's per-token states condition latent diffusion (jaxgen.tasks.ldm).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxgen.contrastive.losses import clip_loss, siglip_loss
from jaxgen.errors import ConfigError
from jaxgen.images import to_signed
from jaxgen.models import build
from jaxgen.pipelines import clip as pipe
from jaxgen.tasks.base import CaptionedTask
from jaxgen.text import negatives


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
        hard_negatives=(),        # NegCLIP: twins of each caption as extra negatives, of the
                                  # kinds in jaxgen.text.negatives (relation, colour, shape,
                                  # size)
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
    unknown = [k for k in m.hard_negatives if k not in negatives.KINDS]
    if unknown:
      raise ConfigError(f"model.hard_negatives: unknown kind(s) {', '.join(map(repr, unknown))}; "
                        f"expected some of {', '.join(negatives.KINDS)}.")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    m, d = config.model, config.data
    self.module = build.dual_encoder(m, self.tokenizer)
    self.model = pipe.DualEncoder(self.module, (d.image_size, d.image_size, d.channels),
                                  self.tokenizer)

  def preprocess(self, batch):
    """Tokens of the captions and, with model.hard_negatives, of their twins: twin_ids and
    twin_mask [B, K, L], twin_valid [B, K] (False where a caption has no twin of that kind)."""
    out = super().preprocess(batch)
    kinds = tuple(self.config.model.hard_negatives)
    if not kinds:
      return out
    captions = self.batch_captions(batch)
    rows = negatives.twins(captions, kinds)
    valid = np.array([[t is not None for t in r] for r in rows])
    texts = [t if t is not None else c for r, c in zip(rows, captions) for t in r]
    tok = self.tokenizer(texts, truncate=True)
    b, k = valid.shape
    return dict(out, twin_ids=tok["input_ids"].reshape(b, k, -1),
                twin_mask=tok["attention_mask"].reshape(b, k, -1), twin_valid=valid)

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
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = ids.shape[0]
    twins = "twin_ids" in batch
    if twins:  # one pass of the text tower over the captions and their twins
      ids = jnp.concatenate([ids, batch["twin_ids"].reshape(-1, ids.shape[1])])
      mask = jnp.concatenate([mask, batch["twin_mask"].reshape(-1, mask.shape[1])])
    (img_emb, txt_emb), updates = self.module.apply(
        {**params, **model_state}, to_signed(batch["image"]), ids, mask, train=True,
        mutable=list(model_state.keys()))
    hard = dict(negatives=txt_emb[n:], negative_mask=batch["twin_valid"].reshape(-1)) if twins \
        else {}
    p = params["params"]
    if self.config.model.loss == "clip":
      loss, metrics = clip_loss(img_emb, txt_emb[:n], p["logit_scale"], **hard)
    else:
      loss, metrics = siglip_loss(img_emb, txt_emb[:n], p["logit_scale"], p["bias"], **hard)
    return loss, (metrics, {**model_state, **updates})

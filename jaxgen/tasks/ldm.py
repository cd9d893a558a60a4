"""Latent diffusion, text to image: a U-Net with cross-attention denoises the latents of a KL
autoencoder, conditioned on a text tower's per-token states; in the spirit of Stable Diffusion.

params      {"unet": ..., "text": ...}           the text tower is trained, or frozen (LiT-like)
model_state {"vae": ..., "latent": {"scale"}}    the autoencoder is frozen and travels with the
                                                 checkpoint, so a run is self-contained
A fresh run loads the autoencoder from `ldm.autoencoder` (a vae-task workdir) and, optionally,
the text tower from a clip workdir (`model.text.init`), both through jaxgen.weights (no task, no
data). With `ldm.cache_latents` the training set is encoded once and the batches carry the
latents' mean and std (`cached_inputs`) instead of the images. Captions are dropped to the empty
prompt with probability `model.prompt_dropout`, which trains the unconditional model for
guidance.
"""
from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen import diffusion
from jaxgen import images as img
from jaxgen import text as text_lib
from jaxgen import weights as weights_lib
from jaxgen.data import load_source
from jaxgen.data.captions import captions_of
from jaxgen.errors import ConfigError
from jaxgen.images import map_batches, to_signed
from jaxgen.models import build
from jaxgen.models.autoencoder import Autoencoder
from jaxgen.models.dit import DiT
from jaxgen.pipelines import text_to_image as t2i
from jaxgen.pipelines.autoencoder import latent_scale
from jaxgen.tasks.base import Task, zeros_like
from jaxgen.tasks.diffusion import (
  diffusion_section,
  objective_loss,
  schedule_kwargs,
  validate_diffusion,
)
from jaxgen.tasks.vae import architecture_keys, autoencoder_module, autoencoder_section

log = logging.getLogger(__name__)

# DiT fields the latent DiT takes from elsewhere: the latents fix out_channels, the text tower
# context_dim; it has no class labels.
_DIT_FIXED = ("out_channels", "context_dim", "num_classes")


def text_2_section(**overrides) -> dict:
  """model.text_2: SDXL's second text tower (OpenCLIP bigG), reading the first tower's tokens
  re-padded with pad_token; layers=0: none. Its `layer`'s states (-2: penultimate, without the
  final LayerNorm unless layer_norm) are concatenated to the first tower's per token, and its
  pooled output projected to `projection` features conditions the U-Net (with
  model.unet.addition_time_embed_dim)."""
  d = dict(layers=0, width=64, heads=4, mlp_ratio=4.0, activation="gelu", layer=-2,
           layer_norm=False, projection=32, pad_token="!")
  d.update(overrides)
  return d


def vae_section(**overrides) -> dict:
  d = autoencoder_section(latent_dim=0, quant_conv=True, mid_attention=True)
  d.update(overrides)
  return d


class LatentDiffusionTask(Task):
  name = "ldm"

  @staticmethod
  def default_config():
    return {
        "model": dict(backbone="unet",  # unet | dit (model.dit: a latent DiT; text by
                                        # cross-attention or MMDiT's joint attention)
                      unet=build.conditional_unet_section(),
                      dit=build.section(DiT, exclude=_DIT_FIXED, patch_size=2, depth=4,
                                        hidden_size=128, heads=4, text_mode="cross"),
                      vae=vae_section(),
                      text=build.text_section(init="", freeze=True, layer=0,
                                              attention_mask=True,  # False: SD's pipelines
                                              layer_norm=True),     # give the tower none
                      text_2=text_2_section(), prompt_dropout=0.1),
        "diffusion": diffusion_section(),
        "ldm": dict(
            autoencoder="",       # vae-task workdir whose weights a fresh run loads
            latent_scale=0.0,     # 0: the autoencoder's measured 1/std of its latents
            cache_latents=True,   # encode the training set once instead of every step
            judge="",             # clip workdir that scores generated images (`jaxgen eval`)
            vae_output="auto",    # auto (from model.vae.likelihood) | signed ([-1, 1], SD)
            timestep_spacing="trailing",  # sampling grid: trailing | leading | linspace
            steps_offset=0,       # added to 'leading' timesteps (Stable Diffusion: 1)
            force_zeros_for_empty_prompt=False,  # SDXL: zeros as the unconditional embeddings
                                                 # when no negative prompt is given
        ),
    }

  @staticmethod
  def validate(config):
    validate_diffusion(config)
    m, d = config.model, config.data
    u = m.unet
    t2 = m.text_2
    if m.backbone not in ("unet", "dit"):
      raise ConfigError(f"model.backbone must be 'unet' or 'dit'; got {m.backbone!r}.")
    if m.backbone == "dit":
      if t2.layers:
        raise ConfigError("model.backbone=dit takes one text tower (model.text_2.layers=0).")
      if m.dit.text_mode not in ("cross", "joint"):
        raise ConfigError(f"model.dit.text_mode must be cross or joint; got "
                          f"{m.dit.text_mode!r}.")
      width, heads = m.dit.hidden_size, m.dit.heads
      if m.dit.size:
        from jaxgen.models.dit import SIZES
        if m.dit.size not in SIZES:
          raise ConfigError(f"model.dit.size must be one of {', '.join(SIZES)} or ''.")
        _, width, heads = SIZES[m.dit.size]
      if width % heads or width % 4:
        raise ConfigError(f"the DiT width {width} must be divisible by its heads ({heads}) and "
                          "by 4.")
    if bool(t2.layers) != bool(u.addition_time_embed_dim):
      raise ConfigError("model.text_2 (a second text tower, SDXL) and model.unet."
                        "addition_time_embed_dim (the U-Net's added conditioning) go together: "
                        "set both or neither.")
    if t2.layers:
      if not t2.projection:
        raise ConfigError("model.text_2.projection must be > 0: its pooled projection is the "
                          "U-Net's added text conditioning.")
      want = t2.projection + 6 * u.addition_time_embed_dim
      if u.addition_embed_dim != want:
        raise ConfigError(f"model.unet.addition_embed_dim={u.addition_embed_dim} must be "
                          f"model.text_2.projection + 6 x addition_time_embed_dim = {want}.")
    if u.transformer_depth_per_level and len(u.transformer_depth_per_level) != len(
        u.block_channels):
      raise ConfigError("model.unet.transformer_depth_per_level needs one entry per "
                        "model.unet.block_channels (or none).")
    if len(u.attn_levels) != len(u.block_channels):
      raise ConfigError("model.unet.attn_levels needs one entry per model.unet.block_channels.")
    if u.num_heads_per_level and len(u.num_heads_per_level) != len(u.block_channels):
      raise ConfigError("model.unet.num_heads_per_level needs one entry per "
                        "model.unet.block_channels (or none: num_heads everywhere).")
    if config.ldm.timestep_spacing not in diffusion.SPACINGS:
      raise ConfigError(f"ldm.timestep_spacing must be one of {', '.join(diffusion.SPACINGS)}; "
                        f"got {config.ldm.timestep_spacing!r}.")
    if config.ldm.steps_offset < 0:
      raise ConfigError(f"ldm.steps_offset must be >= 0; got {config.ldm.steps_offset}.")
    f = 2 ** (len(m.vae.ch_mult) - 1)
    if d.image_size % f:
      raise ConfigError(f"data.image_size={d.image_size} must be divisible by the autoencoder's "
                        f"downsampling factor {f}.")
    latent = d.image_size // f
    if latent % 2 ** (len(u.block_channels) - 1):
      raise ConfigError(f"latents of {latent}x{latent} cannot be halved "
                        f"{len(u.block_channels) - 1} times (model.unet.block_channels).")
    if m.vae.latent_dim or m.vae.kind != "vae":
      raise ConfigError("model.vae must be a VAE with spatial latents (kind=vae, latent_dim=0).")
    if config.ldm.vae_output not in ("auto", "signed"):
      raise ConfigError(f"ldm.vae_output must be 'auto' or 'signed'; got "
                        f"{config.ldm.vae_output!r}.")
    if not 0.0 <= m.prompt_dropout < 1.0:
      raise ConfigError(f"model.prompt_dropout must be in [0, 1); got {m.prompt_dropout}.")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    m, d = config.model, config.data
    self._train_source = None
    t, v = m.text, m.vae
    if self.tokenizer is None and t.init and (pathlib.Path(t.init) / "config.json").is_file():
      # The text tower comes from a clip run: so do the ids it was trained on. (Without the run,
      # e.g. to benchmark the step, the tokenizer is built from the captions; training from it
      # then stops in `pretrained`, which needs the run.)
      self.tokenizer = weights_lib.load_tokenizer(t.init, weights_lib.read_config(t.init),
                                                  missing_ok=True)
    if self.tokenizer is None:
      self.tokenizer = text_lib.from_config(t, self._train_captions)
    self.text = build.text_tower(t, self.tokenizer)
    t2 = m.text_2
    self.tokenizer_2 = self.text_2 = None
    if t2.layers:
      self.tokenizer_2 = self.tokenizer
      if t2.pad_token:
        if not hasattr(self.tokenizer, "with_pad_token"):
          raise ConfigError("model.text_2.pad_token needs the bpe tokenizer.")
        self.tokenizer_2 = self.tokenizer.with_pad_token(t2.pad_token)
      self.text_2 = build.text_tower(
          ml_collections.ConfigDict(dict(t2.to_dict(), context_length=t.context_length)),
          self.tokenizer_2, t2.projection or None)
    self.vae = autoencoder_module(v, d)
    vae_output = config.ldm.vae_output
    if vae_output == "auto":
      vae_output = "sigmoid" if v.likelihood == "bernoulli" else "unit"
    if m.backbone == "dit":
      self.unet = build.build(DiT, m.dit, where="model.dit", out_channels=v.z_channels,
                              context_dim=t.width, num_classes=0)
    else:
      self.unet = build.conditional_unet(m.unet, v.z_channels,
                                         t.width + (t2.width if t2.layers else 0))
    self.model = t2i.LatentDiffusionModel(
        self.unet, self.text, self.vae, (d.image_size, d.image_size, d.channels),
        text_layer=t.layer or None, text_mask=t.attention_mask, vae_output=vae_output,
        spacing=config.ldm.timestep_spacing, steps_offset=config.ldm.steps_offset,
        text_layer_norm=t.layer_norm, text_2=self.text_2, text_2_layer=t2.layer or None,
        text_2_layer_norm=t2.layer_norm,
        force_zeros_for_empty_prompt=config.ldm.force_zeros_for_empty_prompt,
        tokenize=self.tokenizer, tokenize_2=self.tokenizer_2,
        **schedule_kwargs(config.diffusion))
    self.schedule = self.model.make_schedule()
    self.empty = self._tokens([""])
    self.empty = {k: v[0] for k, v in self.empty.items()}

  def _tokens(self, captions) -> dict:
    tok = self.tokenizer(list(captions), truncate=True)
    out = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
    if self.tokenizer_2 is not None:
      out["input_ids_2"] = self.tokenizer_2(list(captions), truncate=True)["input_ids"]
    return out

  def _source(self, split):
    d = self.config.data
    if split != d.train_split:
      return load_source(d, split)
    if self._train_source is None:
      self._train_source = load_source(d, split)
    return self._train_source

  def _train_captions(self):
    src = self._source(self.config.data.train_split)
    return captions_of(src.get(np.arange(len(src))), src.class_names, "a photo of a {}")

  # -- weights from other runs -------------------------------------------------------------
  def init(self, key, batch):
    k_unet, k_text, k_vae, k_text_2 = jax.random.split(key, 4)
    ids = jnp.asarray(batch["input_ids"])
    params = {"text": self.text.init(k_text, ids)}
    if self.text_2 is not None:
      params["text_2"] = self.text_2.init(k_text_2, jnp.asarray(batch["input_ids_2"]))
    cond = self.model.condition(params, {k: jnp.asarray(v) for k, v in batch.items()
                                         if k.startswith(("input_ids", "attention_mask"))})
    n = ids.shape[0]
    z = jnp.zeros((n, *self.model.latent_shape))
    unet_vars = self.unet.init(k_unet, z, jnp.zeros((n,), jnp.int32),
                               **self._unet_kwargs(cond))
    x = jnp.zeros((n, *self.model.image_shape))
    vae_vars = self.vae.init(k_vae, x)
    scale = jnp.float32(self.config.ldm.latent_scale or 1.0)
    return (dict(params, unet=unet_vars), {"vae": vae_vars, "latent": {"scale": scale}})

  def zeros_for_pretrained(self, params, model_state):
    if self.config.model.text.init:
      params = dict(params, text=zeros_like(params["text"]))
    return params, dict(model_state, vae=zeros_like(model_state["vae"]))

  @staticmethod
  def _unet_kwargs(cond) -> dict:
    if isinstance(cond, dict):
      return dict(context=cond["context"],
                  added={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]})
    return dict(context=cond)

  def pretrained(self, params, model_state):
    """Loads the autoencoder (required) and the text tower (optional) of other runs."""
    lc, m = self.config.ldm, self.config.model
    if not lc.autoencoder:
      raise ConfigError("ldm.autoencoder must name a trained autoencoder workdir (e.g. "
                        "runs/ldm_autoencoder from configs/ldm_autoencoder.py).")
    ae = weights_lib.load_weights(lc.autoencoder, expect_task="vae", what="ldm.autoencoder")
    saved_model, saved_data = ae.config["model"], ae.config["data"]
    mismatch = [k for k in architecture_keys(m.vae) if saved_model.get(k) != _plain(m.vae[k])]
    image = (saved_data["image_size"], saved_data["channels"])
    if mismatch or image != (self.config.data.image_size, self.config.data.channels):
      raise ConfigError(f"ldm.autoencoder: the run's model differs from model.vae in "
                        f"{mismatch or 'image size/channels'}; copy its model section.")
    vae_params = {"params": ae.params["params"]}  # the discriminator sits apart, in ["disc"]
    scale = lc.latent_scale or float(latent_scale(ae.model_state))
    log.info("Latent scale %.5f (%s).", scale,
             "from the config" if lc.latent_scale else "measured by the autoencoder")
    model_state = dict(model_state, vae=vae_params, latent={"scale": jnp.float32(scale)})
    if m.text.init:
      clip = weights_lib.load_weights(m.text.init, expect_task="clip", what="model.text.init")
      src = clip.params["params"]["text_encoder"]
      text = {k: v for k, v in src.items() if k != "text_projection"}
      shapes = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)
      if (jax.tree.structure(text) != jax.tree.structure(params["text"]["params"])
          or shapes(text) != shapes(params["text"]["params"])):
        raise ConfigError("model.text.init: the clip run's text tower differs from model.text "
                          "(width, layers, heads, context length or vocabulary).")
      causal = clip.config["model"]["text"].get("causal", True)
      if causal != m.text.causal:
        raise ConfigError(f"model.text.init: the clip run's text tower is "
                          f"{'causal' if causal else 'bidirectional'}; set model.text.causal="
                          f"{causal}.")
      params = dict(params, text={"params": text})
    return params, model_state

  def frozen(self, path: str) -> bool:
    return self.config.model.text.freeze and path.startswith(("['text']", "['text_2']"))

  # -- training ----------------------------------------------------------------------------
  def preprocess(self, batch):
    # Captions need no data set (restoring an imported run must not load one); labels need the
    # class names.
    names = None if "caption" in batch else self._source(self.config.data.train_split).class_names
    out = {k: v for k, v in batch.items() if v.dtype.kind not in "USO"}
    out.update(self._tokens(captions_of(batch, names, "a photo of a {}")))
    if "latent_mean" in out:  # the batch carries cached latents: the images are not needed
      del out["image"]
    return out

  def cached_inputs(self, state, source):
    """With ldm.cache_latents: the training set encoded once by the frozen autoencoder (posterior
    mean and std, unscaled), which the loader joins to each batch by index."""
    if not self.config.ldm.cache_latents:
      return None
    vae = state.model_state["vae"]

    @jax.jit
    def enc(images):
      mean, logvar = self.vae.apply(vae, to_signed(images), method=Autoencoder.encode)
      return {"latent_mean": mean, "latent_std": jnp.exp(0.5 * logvar)}

    # Images are read batch by batch (a TFDS set need not fit in memory; its latents do).
    return map_batches(lambda b, _: enc(source.get(b["index"])["image"]),
                       {"index": np.arange(len(source))}, min(256, len(source)))

  def loss_fn(self, params, model_state, batch, key):
    m, d = self.config.model, self.config.diffusion
    k_drop, k_z, k_loss, k_dropout = jax.random.split(key, 4)
    scale = model_state["latent"]["scale"]
    if "latent_mean" in batch:
      mean, std = batch["latent_mean"], batch["latent_std"]
      z0 = (mean + std * jax.random.normal(k_z, mean.shape)) * scale
    else:
      z0 = self.model.encode_images(model_state, batch["image"], key=k_z)
    z0 = jax.lax.stop_gradient(z0)
    drop = jax.random.bernoulli(k_drop, m.prompt_dropout, (z0.shape[0], 1))
    tokens = {k: jnp.where(drop, self.empty[k][None], batch[k]) for k in self.empty}
    cond = self.model.condition(params, tokens)
    net = self.model.denoise_fn(params, train=True, key=k_dropout)
    per_example = objective_loss(lambda z_t, t: net(z_t, t, cond), self.schedule, z0, k_loss, d)
    return per_example.mean(), ({}, model_state)

  # -- pictures ----------------------------------------------------------------------------
  def prompts(self, split: str, n: int) -> list[str]:
    """The first n captions of a split (held-out prompts for pictures and evaluation)."""
    src = self._source(split)
    data = src.get(np.arange(min(n, len(src))))
    return [str(c) for c in captions_of(data, src.class_names, "a photo of a {}")]

  def pictures(self, params, model_state, key):
    d = self.config.diffusion
    prompts = self.prompts(self.config.data.eval_split, 8)
    x = t2i.text_to_image(self.model, params, model_state, prompts, key, steps=d.sample_steps,
                          guidance_scale=d.guidance_scale, sampler=d.sampler, num_per_prompt=4)
    scale = img.display_scale(self.config.data.image_size)
    return {"text_to_image": img.labelled_grid(x, prompts, scale=scale)}


def _plain(value):
  return list(value) if isinstance(value, tuple) else value

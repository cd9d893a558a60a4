"""Latent diffusion, text to image: a U-Net with cross-attention denoises the latents of a KL
autoencoder, conditioned on a text tower's per-token states; in the spirit of Stable Diffusion.

params      {"unet": ..., "text": ...}           the text tower is trained, or frozen (LiT-like)
model_state {"vae": ..., "latent": {"scale"}}    the autoencoder is frozen and travels with the
                                                 checkpoint, so a run is self-contained
A fresh run loads the autoencoder from `ldm.autoencoder` (a vae-task workdir) and, optionally,
the text tower from a clip workdir (`model.text.init`). Captions are dropped to the empty prompt
with probability `model.prompt_dropout`, which trains the unconditional model for guidance.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import diffusion
from jaxgen import images as img
from jaxgen.data import load_all, load_source
from jaxgen.data import shapes as shapes_data
from jaxgen.errors import ConfigError
from jaxgen.models.autoencoder import Autoencoder
from jaxgen.models.unet import UNet
from jaxgen.pipelines import text_to_image as t2i
from jaxgen.tasks.base import Task
from jaxgen.tasks.clip import build_text_tower, build_tokenizer, captions_of, text_section
from jaxgen.tasks.diffusion import diffusion_section, schedule_kwargs, validate_diffusion
from jaxgen.tasks.vae import ARCHITECTURE_KEYS, AutoencoderTask, autoencoder_module, latent_scale

log = logging.getLogger(__name__)


def unet_section(**overrides) -> dict:
  d = dict(block_channels=(64, 128), layers_per_block=1, attn_levels=(True, True),
           mid_attention=True, num_heads=4, transformer_depth=1, use_linear_projection=True,
           dropout=0.0, groups=16, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0.0,
           dtype="float32", remat=False,
           num_heads_per_level=())  # (): num_heads at every level; else one count per level
                                    # (SD 2.x: 5, 10, 20, 20), the middle block takes the last
  d.update(overrides)
  return d


def vae_section(**overrides) -> dict:
  d = dict(AutoencoderTask.default_config()["model"])
  d.update(latent_dim=0, quant_conv=True, mid_attention=True)
  d.update(overrides)
  return d


class LatentDiffusionTask(Task):
  name = "ldm"

  @staticmethod
  def default_config():
    return {
        "model": dict(unet=unet_section(), vae=vae_section(),
                      text=text_section(init="", freeze=True, layer=0,
                                        attention_mask=True),  # False: Stable Diffusion's
                      prompt_dropout=0.1),                     # pipelines give the tower none
        "diffusion": diffusion_section(),
        "ldm": dict(
            autoencoder="",       # vae-task workdir whose weights a fresh run loads
            latent_scale=0.0,     # 0: the autoencoder's measured 1/std of its latents
            cache_latents=True,   # encode the training set once instead of every step
            judge="",             # clip workdir that scores generated images (`jaxgen eval`)
            vae_output="auto",    # auto (from model.vae.likelihood) | signed ([-1, 1], SD)
            timestep_spacing="trailing",  # sampling grid: trailing | leading | linspace
            steps_offset=0,       # added to 'leading' timesteps (Stable Diffusion: 1)
        ),
    }

  @staticmethod
  def validate(config):
    validate_diffusion(config)
    m, d = config.model, config.data
    u = m.unet
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

  def __init__(self, config):
    super().__init__(config)
    m, d = config.model, config.data
    self._train_source = None
    self.tokenizer = build_tokenizer(m.text, self._train_captions)
    t = m.text
    self.text = build_text_tower(t, self.tokenizer)
    v = m.vae
    self.vae = autoencoder_module(v, d)
    vae_output = config.ldm.vae_output
    if vae_output == "auto":
      vae_output = "sigmoid" if v.likelihood == "bernoulli" else "unit"
    u = m.unet
    self.unet = UNet(out_channels=v.z_channels, block_channels=tuple(u.block_channels),
                     layers_per_block=u.layers_per_block, attn_levels=tuple(u.attn_levels),
                     mid_attention=u.mid_attention, attention="transformer",
                     num_heads=tuple(u.num_heads_per_level) or u.num_heads,
                     transformer_depth=u.transformer_depth,
                     context_dim=t.width, use_linear_projection=u.use_linear_projection,
                     dropout=u.dropout, groups=u.groups, norm_eps=u.norm_eps,
                     flip_sin_to_cos=u.flip_sin_to_cos, freq_shift=u.freq_shift,
                     dtype=jnp.dtype(u.dtype), remat=u.remat)
    self.model = t2i.LatentDiffusionModel(
        self.unet, self.text, self.vae, (d.image_size, d.image_size, d.channels),
        text_layer=t.layer or None, text_mask=t.attention_mask, vae_output=vae_output,
        spacing=config.ldm.timestep_spacing, steps_offset=config.ldm.steps_offset,
        tokenize=self.tokenizer, **schedule_kwargs(config.diffusion))
    self.schedule = self.model.make_schedule()
    empty = self.tokenizer([""])
    self.empty_ids, self.empty_mask = empty["input_ids"][0], empty["attention_mask"][0]
    self._latents = None

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
    k_unet, k_text, k_vae = jax.random.split(key, 3)
    ids = jnp.asarray(batch["input_ids"])
    text_vars = self.text.init(k_text, ids)
    ctx = self.text.apply(text_vars, ids)["last_hidden_state"]
    n = ids.shape[0]
    z = jnp.zeros((n, *self.model.latent_shape))
    unet_vars = self.unet.init(k_unet, z, jnp.zeros((n,), jnp.int32), context=ctx)
    x = jnp.zeros((n, *self.model.image_shape))
    vae_vars = self.vae.init(k_vae, x)
    scale = jnp.float32(self.config.ldm.latent_scale or 1.0)
    return ({"unet": unet_vars, "text": text_vars},
            {"vae": vae_vars, "latent": {"scale": scale}})

  def pretrained(self, params, model_state):
    """Loads the autoencoder (required) and the text tower (optional) of other runs."""
    from jaxgen.train import restore_run
    lc, m = self.config.ldm, self.config.model
    if not lc.autoencoder:
      raise ConfigError("ldm.autoencoder must name a trained autoencoder workdir (e.g. "
                        "runs/ldm_autoencoder from configs/ldm_autoencoder.py).")
    ae = restore_run(lc.autoencoder)
    if ae.config.task != "vae":
      raise ConfigError(f"ldm.autoencoder: {lc.autoencoder} holds a {ae.config.task} run.")
    mismatch = [k for k in ARCHITECTURE_KEYS if ae.config.model.get(k) != m.vae[k]]
    image = (ae.config.data.image_size, ae.config.data.channels)
    if mismatch or image != (self.config.data.image_size, self.config.data.channels):
      raise ConfigError(f"ldm.autoencoder: the run's model differs from model.vae in "
                        f"{mismatch or 'image size/channels'}; copy its model section.")
    vae_params = {"params": ae.params["params"]}  # the discriminator sits apart, in ["disc"]
    scale = lc.latent_scale or float(latent_scale(ae.model_state))
    log.info("Latent scale %.5f (%s).", scale,
             "from the config" if lc.latent_scale else "measured by the autoencoder")
    model_state = dict(model_state, vae=vae_params, latent={"scale": jnp.float32(scale)})
    if m.text.init:
      clip = restore_run(m.text.init)
      if clip.config.task != "clip":
        raise ConfigError(f"model.text.init: {m.text.init} holds a {clip.config.task} run.")
      src = clip.params["params"]["text_encoder"]
      text = {k: v for k, v in src.items() if k != "text_projection"}
      shapes = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)
      if (jax.tree.structure(text) != jax.tree.structure(params["text"]["params"])
          or shapes(text) != shapes(params["text"]["params"])):
        raise ConfigError("model.text.init: the clip run's text tower differs from model.text "
                          "(width, layers, heads, context length or vocabulary).")
      params = dict(params, text={"params": text})
    return params, model_state

  def frozen(self, path: str) -> bool:
    return self.config.model.text.freeze and path.startswith("['text']")

  # -- training ----------------------------------------------------------------------------
  def preprocess(self, batch):
    # Captions need no data set (restoring an imported run must not load one); labels need the
    # class names.
    names = None if "caption" in batch else self._source(self.config.data.train_split).class_names
    tok = self.tokenizer(list(captions_of(batch, names, "a photo of a {}")), truncate=True)
    out = {k: v for k, v in batch.items() if v.dtype.kind not in "USO"}
    out.update(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    if self._latents is not None:
      idx = batch["index"]
      out["latent_mean"], out["latent_std"] = self._latents[0][idx], self._latents[1][idx]
      del out["image"]
    return out

  def prepare(self, state) -> None:
    if self.config.ldm.cache_latents:
      self.cache_latents(state.model_state)

  def cache_latents(self, model_state) -> None:
    """Encodes the training set once (posterior mean and std, unscaled) for training on latents;
    the loop's reader then sends latents instead of images."""
    src = self._source(self.config.data.train_split)

    @jax.jit
    def enc(x):
      mean, logvar = self.vae.apply(model_state["vae"], 2.0 * x.astype(jnp.float32) / 255.0 - 1.0,
                                    method=Autoencoder.encode)
      return mean, jnp.exp(0.5 * logvar)

    means, stds = [], []
    for lo in range(0, len(src), 256):
      idx = np.arange(lo, min(lo + 256, len(src)))
      m, s = enc(src.get(idx)["image"])
      means.append(np.asarray(m))
      stds.append(np.asarray(s))
    self._latents = (np.concatenate(means), np.concatenate(stds))

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
    ids, mask = batch["input_ids"], batch["attention_mask"]
    drop = jax.random.bernoulli(k_drop, m.prompt_dropout, (ids.shape[0], 1))
    ids = jnp.where(drop, self.empty_ids[None], ids)
    mask = jnp.where(drop, self.empty_mask[None], mask)
    context = self.model.encode_text(params, ids, mask)
    net = self.model.denoise_fn(params, train=True, key=k_dropout)
    per_example = diffusion.diffusion_loss(lambda z_t, t: net(z_t, t, context), self.schedule,
                                           z0, k_loss, prediction=d.prediction,
                                           weighting=d.weighting, gamma=d.min_snr_gamma)
    return per_example.mean(), ({}, model_state)

  # -- pictures ----------------------------------------------------------------------------
  def prompts(self, split: str, n: int) -> list[str]:
    src = self._source(split)
    data = src.get(np.arange(min(n, len(src))))
    return [str(c) for c in captions_of(data, src.class_names, "a photo of a {}")]

  def pictures(self, params, model_state, key):
    d = self.config.diffusion
    prompts = self.prompts(self.config.data.eval_split, 8)
    x = t2i.text_to_image(self.model, params, model_state, prompts, key, steps=d.sample_steps,
                          guidance_scale=d.guidance_scale, sampler=d.sampler, num_per_prompt=4)
    scale = img.display_scale(self.config.data.image_size)
    return {"text_to_image": img.grid(x.reshape(len(prompts), 4, *x.shape[1:]).swapaxes(0, 1)
                                      .reshape(x.shape), ncols=len(prompts), scale=scale)}

  # -- jaxgen generate / sample ------------------------------------------------------------
  @staticmethod
  def add_sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt (repeat for several); default: held-out captions")
    parser.add_argument("--negative", default=None, help="negative prompt (default: empty)")
    parser.add_argument("--num", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--sampler", choices=diffusion.SAMPLERS, default=None)

  def sample(self, params, model_state, args, outdir: pathlib.Path):
    d = self.config.diffusion
    if not args.prompt and not self.config.ldm.autoencoder:
      # Only imported runs (jaxgen import) have no autoencoder run: their data section is a
      # placeholder, not data to draw held-out captions from.
      raise ConfigError("This run holds imported weights and no data set: give --prompt.")
    prompts = args.prompt or self.prompts(self.config.data.eval_split, 4)
    t0 = time.perf_counter()
    x = t2i.text_to_image(self.model, params, model_state, prompts,
                          jax.random.PRNGKey(args.seed), steps=args.steps or d.sample_steps,
                          guidance_scale=d.guidance_scale if args.guidance is None
                          else args.guidance, negative_prompt=args.negative,
                          sampler=args.sampler or d.sampler, num_per_prompt=args.num)
    x = jax.block_until_ready(x)
    log.info("%d images in %.1f s (compile included)", len(x), time.perf_counter() - t0)
    for i, p in enumerate(prompts):
      log.info("row %d: %s", i, p)
    path = pathlib.Path(args.out_file) if args.out_file else outdir / "text_to_image.png"
    return [img.save_png(img.grid(x, ncols=args.num,
                                  scale=img.display_scale(self.config.data.image_size)), path)]

  # -- jaxgen eval -------------------------------------------------------------------------
  @staticmethod
  def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=int, default=200, help="held-out prompts to draw")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--judge", default=None,
                        help="clip workdir that scores the images (default: ldm.judge, else "
                             "model.text.init)")

  def evaluate(self, params, model_state, key, *, num=200, steps=None, guidance=None,
               judge=None, **unused):
    """CLIP score and zero-shot prompt-following of images drawn for held-out prompts, beside
    the same measures for the real held-out images and for unconditional samples."""
    from jaxgen.pipelines import clip as clip_pipe
    from jaxgen.tasks.clip import load_dual_encoder
    judge = judge or self.config.ldm.judge or self.config.model.text.init
    if not judge:
      raise ConfigError("Scoring needs a trained clip run: pass --judge WORKDIR or set ldm.judge.")
    jm, jp, js = load_dual_encoder(str(judge))
    d = self.config.diffusion
    data = load_all(self._source(self.config.data.eval_split), limit=num)
    prompts = self.prompts(self.config.data.eval_split, num)
    g = d.guidance_scale if guidance is None else guidance
    steps = steps or d.sample_steps

    def draw(prompt_list, k):
      out = []
      for i in range(0, len(prompt_list), 50):
        out.append(np.asarray(t2i.text_to_image(
            self.model, params, model_state, prompt_list[i:i + 50], jax.random.fold_in(k, i),
            steps=steps, guidance_scale=g, sampler=d.sampler)))
      return np.concatenate(out)

    t0 = time.perf_counter()
    generated = draw(prompts, key)
    seconds = time.perf_counter() - t0
    # Unconditional: the empty prompt both as condition and as guidance reference.
    unconditional = draw([""] * len(prompts), jax.random.fold_in(key, 1))
    out = dict(num_prompts=len(prompts), steps=steps, guidance_scale=g, sampling_seconds=seconds)
    for name, images in (("generated", generated), ("real", data["image"]),
                         ("unconditional", unconditional)):
      score = clip_pipe.clip_score(jm, jp, js, images, prompts)["clip_score"]
      out[name] = dict(clip_score=score, **self._prompt_following(jm, jp, js, images, data))
    return out

  def _prompt_following(self, jm, jp, js, images, data) -> dict:
    """Zero-shot: does the picture show the first object's shape and colour that its prompt
    names (shapes data), or the prompt's class (class data)?"""
    from jaxgen.pipelines import clip as clip_pipe
    emb = clip_pipe.embed_images(jm, jp, js, images)
    d = self.config.data
    out = {}
    if d.source == "embedded" and d.name == "shapes":
      s = shapes_data
      for attr, names, prompts in (
          ("shape", s.SHAPES, [[f"a {z} {c} {k}" for z in s.SIZE_NAMES for c in s.COLOUR_NAMES]
                               for k in s.SHAPES]),
          ("colour", s.COLOUR_NAMES, [[f"a {z} {c} {k}" for z in s.SIZE_NAMES for k in s.SHAPES]
                                      for c in s.COLOUR_NAMES])):
        classes = clip_pipe.zero_shot_classifier(jm, jp, prompts)
        pred = np.asarray(emb @ classes.T).argmax(1)
        out[f"{attr}_accuracy"] = float(np.mean(np.array(names)[pred] == data[attr]))
    elif "label" in data and self._source(d.train_split).class_names:
      names = self._source(d.train_split).class_names
      classes = clip_pipe.zero_shot_classifier(jm, jp, [[f"a photo of a {n}"] for n in names])
      out["class_accuracy"] = float(np.mean(np.asarray(emb @ classes.T).argmax(1)
                                            == data["label"]))
    return out


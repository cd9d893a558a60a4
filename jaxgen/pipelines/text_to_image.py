"""Text to image with a latent diffusion model: tokenise on the host, then one jitted call
encodes the prompts, samples latents with classifier-free guidance through the shared lax.scan
samplers, and decodes them with the autoencoder. Also img2img and inpainting in latent space,
and batched or tiled decoding for large latents.

Prompts (as token arrays of fixed length), seeds, the guidance scale and eta are traced: new
values never recompile. The sampler, the step count and the number of images are static.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import diffusion
from jaxgen.diffusion.process import expand
from jaxgen.errors import ConfigError, ShapeError
from jaxgen.images import check_images, from_signed, to_signed, to_unit
from jaxgen.models.autoencoder import Autoencoder
from jaxgen.models.text import TextTransformer
from jaxgen.models.unet import UNet


@dataclasses.dataclass(frozen=True)
class LatentDiffusionModel:
  """U-Net, text encoder, autoencoder and the diffusion process (hashable; the tokenizer is
  carried along but not hashed). Parameters travel separately:
    params      {"unet": ..., "text": ...}
    model_state {"vae": autoencoder variables, "latent": {"scale": f32[]}}
  """
  unet: UNet
  text: TextTransformer
  vae: Autoencoder
  image_shape: tuple[int, int, int]
  schedule: str = "scaled_linear"
  num_timesteps: int = 1000
  beta_start: float | None = None
  beta_end: float | None = None
  prediction: str = "eps"
  clip_x0: float | None = None
  text_layer: int | None = None          # None: last_hidden_state; -2: penultimate (clip skip)
  text_mask: bool = True                 # give the text tower the prompts' attention mask;
                                         # Stable Diffusion's pipelines give none
  vae_output: str = "signed"             # decoder output: signed [-1, 1] images (Stable
                                         # Diffusion), sigmoid logits, or unit [0, 1] values
  spacing: str = "trailing"              # the samplers' default timestep spacing
  steps_offset: int = 0                  # added to 'leading' timesteps (Stable Diffusion: 1)
  set_alpha_to_one: bool = True          # False: DDIM's last step ends at abar[0] (SD's configs)
  use_clipped_model_output: bool = True  # re-derive eps from a clipped x0 (diffusers: False)
  threshold: float | None = None         # dynamic thresholding's quantile (None: off)
  sample_max_value: float = 1.0          # dynamic thresholding's largest scale
  karras: bool = False                   # Karras sigmas for the euler and dpmpp_2m samplers
  final_sigmas: str = "zero"             # euler/dpmpp_2m's last level: zero | sigma_min
  text_layer_norm: bool = True           # text_layer's states through the final LayerNorm
  # SDXL: a second text tower (OpenCLIP bigG) whose states are concatenated to the first's per
  # token and whose projected pooled output, with the micro-conditioning ids (original size,
  # crop, target size), is the U-Net's added conditioning. It reads the first tower's tokens
  # re-padded with its own pad token (`tokenize_2`).
  text_2: TextTransformer | None = None
  text_2_layer: int | None = -2
  text_2_layer_norm: bool = False
  force_zeros_for_empty_prompt: bool = False  # no negative prompt: zeros as the unconditional
                                              # embeddings (SDXL's pipelines)
  objective: str = "diffusion"           # diffusion | flow (rectified flow: the network sees
                                         # num_timesteps * t, predicts the velocity; euler/heun)
  flow_shift: float = 1.0                # flow: SD3's time shift of the sampling grid
  tokenize: Callable = dataclasses.field(default=None, compare=False, hash=False)
  tokenize_2: Callable = dataclasses.field(default=None, compare=False, hash=False)

  def __hash__(self):
    return hash((self.unet, self.text, self.vae, self.image_shape, self.schedule,
                 self.num_timesteps, self.beta_start, self.beta_end, self.prediction,
                 self.clip_x0, self.text_layer, self.text_mask, self.vae_output, self.spacing,
                 self.steps_offset, self.set_alpha_to_one, self.use_clipped_model_output,
                 self.threshold, self.sample_max_value, self.karras, self.final_sigmas,
                 self.text_layer_norm, self.text_2, self.text_2_layer, self.text_2_layer_norm,
                 self.force_zeros_for_empty_prompt, self.objective, self.flow_shift))

  @property
  def is_flow(self) -> bool:
    return self.objective == "flow"

  @property
  def default_sampler(self) -> str:
    """What the pipelines sample with when no sampler is named."""
    return "euler" if self.is_flow else "ddim"

  def refuse_flow(self, what: str) -> None:
    if self.is_flow:
      raise ConfigError(f"{what} is implemented for diffusion models; this is a flow-matching "
                        "model (diffusion.objective=flow): use text_to_image")

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return tuple(self.vae.latent_shape)

  def make_schedule(self) -> diffusion.Schedule:
    return diffusion.make_schedule(self.schedule, self.num_timesteps, self.beta_start,
                                   self.beta_end)

  def latent_shape_for(self, height: int | None = None, width: int | None = None
                       ) -> tuple[int, int, int]:
    """Latent shape of images `height` x `width` (default: the trained size). The networks are
    convolutional, so any size works whose latents the U-Net can halve at each level."""
    h = self.image_shape[0] if height is None else int(height)
    w = self.image_shape[1] if width is None else int(width)
    f = self.vae.downsample_factor
    unit = f * self.unet.downsample_factor
    if h <= 0 or w <= 0 or h % unit or w % unit:
      raise ShapeError(f"height and width must be positive multiples of {unit} (the autoencoder "
                       f"downsamples {f}x and the denoising network needs latent sides that are "
                       f"multiples of {self.unet.downsample_factor}); got {h} x {w}.")
    return (h // f, w // f, self.vae.z_channels)

  def sampling_options(self, sampler: str, spacing: str | None = None) -> dict:
    """The keyword arguments of diffusion.sample that follow this model's scheduler settings,
    on its timestep grid (`spacing`, None: the model's, with its steps_offset)."""
    return diffusion.sampling_options(
        self.make_schedule(), sampler, clip_x0=self.clip_x0,
        threshold=None if self.threshold is None else (self.threshold, self.sample_max_value),
        set_alpha_to_one=self.set_alpha_to_one, final_sigmas=self.final_sigmas,
        use_clipped_model_output=self.use_clipped_model_output, karras=self.karras,
        spacing=spacing or self.spacing, offset=self.steps_offset)

  def grid(self, sampler: str, num_steps: int, spacing: str | None = None) -> diffusion.Grid:
    """The grid `sampler` visits on this model's timesteps (see diffusion.make_grid)."""
    opts = self.sampling_options(sampler, spacing)
    return diffusion.make_grid(self.make_schedule(), sampler, num_steps=num_steps,
                               **{k: v for k, v in opts.items() if k in diffusion.GRID_OPTIONS})

  # -- the pieces, as pure functions of the parameters -------------------------------------
  def encode_text(self, params, input_ids, attention_mask=None):
    """Per-token states [B, L, W] of the (first) text tower."""
    return _tower_states(self.text, params["text"], input_ids,
                         attention_mask if self.text_mask else None, self.text_layer,
                         self.text_layer_norm)["states"]

  def condition(self, params, tokens, image_hw=None):
    """What the U-Net is conditioned on for `tokens` ({"input_ids", "attention_mask"}, and
    "input_ids_2" with a second tower): the per-token states [B, L, W] (SD 1.x/2.x), or
    {"context", "text_embeds", "time_ids"} (SDXL: both towers' states per token, the second's
    pooled projection, and the micro-conditioning ids of images `image_hw` = (height, width):
    original size = target size = the image's, no crop)."""
    context = self.encode_text(params, tokens["input_ids"], tokens.get("attention_mask"))
    if self.text_2 is None:
      return context
    out = _tower_states(self.text_2, params["text_2"], tokens["input_ids_2"],
                        tokens.get("attention_mask") if self.text_mask else None,
                        self.text_2_layer, self.text_2_layer_norm)
    h, w = image_hw or self.image_shape[:2]
    b = context.shape[0]
    ids = jnp.broadcast_to(jnp.asarray([h, w, 0, 0, h, w], jnp.float32), (b, 6))
    return {"context": jnp.concatenate([context, out["states"]], axis=-1),
            "text_embeds": out["text_embeds"], "time_ids": ids}

  def denoise_fn(self, params, *, train: bool = False, key=None):
    """denoise(z_t, t, cond) with cond from `condition` (states, or SDXL's dict)."""
    rngs = {"dropout": key} if train else None

    def denoise(z_t, t, cond):
      if self.is_flow:  # flow time in [0, 1] -> the network's timestep scale
        t = jnp.asarray(t, jnp.float32) * self.num_timesteps
      if isinstance(cond, dict):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.unet.apply(params["unet"], z_t, t, context=cond["context"], added=added,
                               train=train, rngs=rngs)
      return self.unet.apply(params["unet"], z_t, t, context=cond, train=train, rngs=rngs)

    return denoise

  def encode_images(self, model_state, images, key=None):
    """Images (uint8 or [0, 1]) -> scaled latents; the posterior mean, or a sample with key."""
    mean, logvar = self.vae.apply(model_state["vae"], to_signed(images), method=Autoencoder.encode)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key,
                                                                                  mean.shape)
    return z * model_state["latent"]["scale"]

  def decode_latents(self, model_state, z, *, batch_size: int | None = None,
                     tile: int | None = None, overlap: int = 2):
    """Scaled latents [B, h, w, c] -> images [B, H, W, C] in [0, 1]. `batch_size` decodes in
    chunks (lax.map) and `tile` in overlapping spatial tiles blended linearly, so that peak
    memory does not grow with the batch or the latent size."""
    z = z / model_state["latent"]["scale"]
    dec = lambda zz: self.vae.apply(model_state["vae"], zz, method=Autoencoder.decode)
    if tile is not None:
      dec = functools.partial(_tiled, dec, tile=tile, overlap=overlap,
                              factor=self.vae.downsample_factor)
    if batch_size is not None and z.shape[0] > batch_size:
      if z.shape[0] % batch_size:
        raise ShapeError(f"decode batch_size {batch_size} must divide the {z.shape[0]} latents")
      chunks = z.reshape(-1, batch_size, *z.shape[1:])
      x = jax.lax.map(dec, chunks)
      x = x.reshape(z.shape[0], *x.shape[2:])
    else:
      x = dec(z)
    if self.vae_output == "sigmoid":
      return jax.nn.sigmoid(x)
    if self.vae_output == "unit":
      return jnp.clip(x, 0.0, 1.0)
    return from_signed(x)


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
  starts = list(range(0, max(n - tile, 0) + 1, stride))
  if starts[-1] + tile < n:
    starts.append(n - tile)
  return starts


def _ramp(n: int, overlap: int, first: bool, last: bool) -> np.ndarray:
  """Blending weights along one axis of a tile: rising over the overlap, except at the image
  border. Overlapping ramps of neighbouring tiles are normalised by their sum."""
  r = np.ones(n, np.float32)
  if overlap:
    edge = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
    if not first:
      r[:overlap] = edge
    if not last:
      r[-overlap:] = edge[::-1]
  return r


def _tiled(decode, z, *, tile: int, overlap: int, factor: int):
  """Decodes overlapping latent tiles and blends them, so that peak activation memory follows
  the tile size rather than the whole image (attention in the decoder's mid block then sees one
  tile: results differ slightly from whole-image decoding, as in other tiled VAEs)."""
  b, h, w, _ = z.shape
  if tile >= h and tile >= w:
    return decode(z)
  if not 0 <= overlap < tile:
    raise ConfigError(f"tile overlap {overlap} must be in [0, tile={tile})")
  ys, xs = _tile_starts(h, tile, tile - overlap), _tile_starts(w, tile, tile - overlap)
  th, tw = min(tile, h), min(tile, w)
  starts = [(y, x) for y in ys for x in xs]
  # Every tile has the same size: decode them one after another (lax.map), so that one tile's
  # activations are live at a time; an unrolled loop lets XLA overlap them all.
  pieces = jax.lax.map(decode, jnp.stack([z[:, y:y + th, x:x + tw] for y, x in starts]))
  out = jnp.zeros((b, h * factor, w * factor, pieces.shape[-1]), pieces.dtype)
  weight = jnp.zeros((1, h * factor, w * factor, 1), jnp.float32)
  for piece, (y, x) in zip(pieces, starts):
    wy = _ramp(th * factor, overlap * factor, y == ys[0], y == ys[-1])
    wx = _ramp(tw * factor, overlap * factor, x == xs[0], x == xs[-1])
    wgt = jnp.asarray(wy[:, None] * wx[None, :])[None, :, :, None]
    win = (slice(None), slice(y * factor, (y + th) * factor),
           slice(x * factor, (x + tw) * factor))
    out = out.at[win].add(piece * wgt)
    weight = weight.at[win].add(wgt)
  return out / weight


def _tower_states(tower, params, ids, mask, layer, norm):
  if layer is None:
    out = tower.apply(params, ids, mask)
    return dict(out, states=out["last_hidden_state"])
  out = tower.apply(params, ids, mask, layer_index=layer, norm_layer=norm)
  return dict(out, states=out["layer_hidden_state"])


_STATIC = ("model", "sampler", "num_steps", "spacing")


def _context(model, params, tok, neg, image_hw=None, zero_uncond=False):
  """(cond, uncond) for classifier-free guidance; zero_uncond: zeros for the unconditional
  embeddings (SDXL without a negative prompt)."""
  cond = model.condition(params, tok, image_hw)
  uncond = model.condition(params, neg, image_hw)
  if zero_uncond:
    uncond = jax.tree.map(jnp.zeros_like, uncond)
    if isinstance(uncond, dict):  # the micro-conditioning ids stay
      uncond["time_ids"] = cond["time_ids"]
  return cond, uncond


@functools.partial(jax.jit, static_argnames=_STATIC + ("decode_batch", "tile", "return_latents",
                                                      "latent_shape", "zero_uncond"))
def _generate(model: LatentDiffusionModel, params, model_state, tok, neg, key, guidance_scale,
              eta, latents=None, *, sampler, num_steps, spacing, decode_batch, tile,
              return_latents=False, latent_shape=None, zero_uncond=False):
  latent_shape = latent_shape or model.latent_shape
  f = model.vae.downsample_factor
  cond, uncond = _context(model, params, tok, neg, (latent_shape[0] * f, latent_shape[1] * f),
                          zero_uncond)
  den = diffusion.guided_denoiser(model.denoise_fn(params), cond, uncond, guidance_scale)
  shape = None if latents is not None else (tok["input_ids"].shape[0], *latent_shape)
  if model.is_flow:
    grid = diffusion.flow_grid(num_steps, model.flow_shift, model.num_timesteps)
    z = diffusion.sample(den, None, key, shape, x_T=latents, sampler=sampler,
                         prediction="flow", grid=grid)
  else:
    z = diffusion.sample(den, model.make_schedule(), key, shape, x_T=latents,
                         sampler=sampler, num_steps=num_steps, prediction=model.prediction,
                         eta=eta, **model.sampling_options(sampler, spacing))
  images = model.decode_latents(model_state, z, batch_size=decode_batch, tile=tile)
  return (images, z) if return_latents else images


def _tokens(model: LatentDiffusionModel, prompts: Sequence[str], negative_prompt, n: int,
            truncate: bool = False):
  """(tokens of the prompts, tokens of the negative prompts), each {"input_ids",
  "attention_mask"[, "input_ids_2"]} repeated n times per prompt; the empty prompt stands for
  no negative prompt."""
  if model.tokenize is None:
    raise ConfigError("This model has no tokenizer; pass token ids to the jitted functions.")
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if not prompts:
    raise ConfigError("No prompts given.")
  negative = negative_prompt if negative_prompt is not None else ""
  negs = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
  if len(negs) != len(prompts):
    raise ConfigError(f"{len(negs)} negative prompts for {len(prompts)} prompts.")

  def encode(texts):
    tok = model.tokenize(texts, truncate=truncate)
    out = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
    if model.text_2 is not None:
      out["input_ids_2"] = (model.tokenize_2 or model.tokenize)(texts, truncate=truncate)[
          "input_ids"]
    return {k: np.repeat(v, n, axis=0) for k, v in out.items()}

  return encode(prompts), encode(negs)


def text_to_image(model: LatentDiffusionModel, params, model_state, prompts: Sequence[str], key,
                  *, steps: int = 50, guidance_scale=5.0, negative_prompt=None,
                  sampler: str | None = None, num_per_prompt: int = 1, eta=0.0,
                  spacing: str | None = None, decode_batch: int | None = None,
                  tile: int | None = None, truncate: bool = False, latents=None,
                  return_latents: bool = False, height: int | None = None,
                  width: int | None = None):
  """Images [len(prompts) * num_per_prompt, H, W, C] in [0, 1], prompt-major.

  The empty prompt is the unconditional embedding (SDXL-like models with
  force_zeros_for_empty_prompt: zeros, as diffusers' SDXL pipelines); `negative_prompt` (one
  string or one per prompt) replaces it in classifier-free guidance. An over-long prompt is a
  TokenError. spacing=None samples on the model's timestep grid (its spacing and
  steps_offset). truncate cuts over-long prompts to the context (with a warning) instead of
  raising. `latents` [N, h, w, c] are the starting noise (diffusers' `latents` argument; a
  seed's latents reused), else drawn from `key`; return_latents also returns the final latents
  (scaled, before decoding). height, width: the images' size (default the trained one; one
  compile per size; SDXL's micro-conditioning takes it as original and target size).
  """
  tok, neg = _tokens(model, prompts, negative_prompt, num_per_prompt, truncate)
  latent_shape = model.latent_shape_for(height, width)
  if latents is not None:
    latents = jnp.asarray(latents, jnp.float32)
    want = (tok["input_ids"].shape[0], *latent_shape)
    if tuple(latents.shape) != want:
      raise ShapeError(f"latents: expected shape {list(want)} (one per image: prompts x "
                       f"num_per_prompt), got {list(latents.shape)}.")
  return _generate(model, params, model_state, tok, neg, key, guidance_scale, eta, latents,
                   sampler=sampler or model.default_sampler, num_steps=steps, spacing=spacing,
                   decode_batch=decode_batch,
                   tile=tile, return_latents=return_latents, latent_shape=tuple(latent_shape),
                   zero_uncond=_zero_uncond(model, negative_prompt))


text_to_image.jitted = _generate


def _zero_uncond(model: LatentDiffusionModel, negative_prompt) -> bool:
  return model.force_zeros_for_empty_prompt and negative_prompt is None


@functools.partial(jax.jit, static_argnames=_STATIC + ("strength", "zero_uncond"))
def _img2img(model, params, model_state, images, tok, neg, key, guidance_scale, eta, *,
             strength, sampler, num_steps, spacing, zero_uncond=False):
  cond, uncond = _context(model, params, tok, neg, images.shape[1:3], zero_uncond)
  den = diffusion.guided_denoiser(model.denoise_fn(params), cond, uncond, guidance_scale)
  k_enc, k_run = jax.random.split(key)
  z0 = model.encode_images(model_state, images)
  if model.is_flow:
    z = diffusion.flow_img2img(den, k_run, z0, strength, sampler=sampler, num_steps=num_steps,
                               shift=model.flow_shift, num_timesteps=model.num_timesteps)
  else:
    z = diffusion.img2img(den, model.make_schedule(), k_run, z0, strength,
                          num_steps=num_steps, sampler=sampler, prediction=model.prediction,
                          eta=eta, **model.sampling_options(sampler, spacing))
  return model.decode_latents(model_state, z)


def image_to_image(model: LatentDiffusionModel, params, model_state, prompts, images, key, *,
                   strength: float = 0.6, steps: int = 50, guidance_scale=5.0,
                   negative_prompt=None, sampler: str | None = None, eta=0.0,
                   spacing: str | None = None):
  """SDEdit in latent space: encode `images` (one per prompt), noise them to `strength`, denoise
  towards the prompts, decode."""
  images = np.asarray(images)
  _check_images(model, images, len([prompts] if isinstance(prompts, str) else prompts))
  tok, neg = _tokens(model, prompts, negative_prompt, 1)
  return _img2img(model, params, model_state, images, tok, neg, key, guidance_scale, eta,
                  strength=strength, sampler=sampler or model.default_sampler,
                  num_steps=steps, spacing=spacing,
                  zero_uncond=_zero_uncond(model, negative_prompt))


@functools.partial(jax.jit, static_argnames=_STATIC + ("zero_uncond",))
def _inpaint(model, params, model_state, images, mask_px, tok, neg, key, guidance_scale, eta, *,
             sampler, num_steps, spacing, zero_uncond=False):
  cond, uncond = _context(model, params, tok, neg, images.shape[1:3], zero_uncond)
  den = diffusion.guided_denoiser(model.denoise_fn(params), cond, uncond, guidance_scale)
  z0 = model.encode_images(model_state, images)
  f = model.vae.downsample_factor
  b, h, w, _ = mask_px.shape
  # A latent is known only if every pixel it covers is known (min-pooling the mask).
  known = mask_px.reshape(b, h // f, f, w // f, f, 1).min(axis=(2, 4))
  if model.is_flow:
    z = diffusion.inpaint(den, None, key, z0, known, sampler=sampler, prediction="flow",
                          grid=diffusion.flow_grid(num_steps, model.flow_shift,
                                                   model.num_timesteps))
  else:
    z = diffusion.inpaint(den, model.make_schedule(), key, z0, known, sampler=sampler,
                          num_steps=num_steps, prediction=model.prediction, eta=eta,
                          **model.sampling_options(sampler, spacing))
  out = model.decode_latents(model_state, z)
  return mask_px * to_unit(images) + (1.0 - mask_px) * out  # known pixels exactly as given


def inpaint(model: LatentDiffusionModel, params, model_state, prompts, images, mask, key, *,
            steps: int = 50, guidance_scale=5.0, negative_prompt=None,
            sampler: str | None = None, eta=0.0, spacing: str | None = None):
  """Fills the pixels where mask == 0 (mask [B, H, W, 1], 1 = keep) to match the prompts."""
  images = np.asarray(images)
  n = len([prompts] if isinstance(prompts, str) else prompts)
  _check_images(model, images, n)
  mask = np.asarray(mask, np.float32)
  if mask.shape != images.shape[:3] + (1,):
    raise ShapeError(f"mask must have shape {list(images.shape[:3]) + [1]}, got "
                     f"{list(mask.shape)}.")
  tok, neg = _tokens(model, prompts, negative_prompt, 1)
  return _inpaint(model, params, model_state, images, mask, tok, neg, key, guidance_scale, eta,
                  sampler=sampler or model.default_sampler, num_steps=steps, spacing=spacing,
                  zero_uncond=_zero_uncond(model, negative_prompt))


def _check_images(model: LatentDiffusionModel, images, n: int):
  check_images(images, model.image_shape)
  if images.shape[0] != n:
    raise ShapeError(f"{images.shape[0]} images for {n} prompts: give one image per prompt.")


@functools.partial(jax.jit, static_argnames=_STATIC[:1] + ("probes",))
def _latent_noise(model, model_state, images, sigma, key, *, probes):
  """Scaled latents of `images` [B, H, W, C] in [0, 1] (posterior means) and, per image, the
  standard deviation of how much fresh pixel noise of `sigma` [B] moves them."""
  z = model.encode_images(model_state, images)

  def moved(k):
    extra = expand(sigma, images) * jax.random.normal(k, images.shape)
    # the encoder's input is signed: [0, 1] noise of sigma is 2 sigma there, as in the picture
    return model.encode_images(model_state, images + extra) - z

  deltas = jax.lax.map(moved, jax.random.split(key, probes))  # [probes, B, h, w, c]
  return z, jnp.sqrt(jnp.mean(jnp.square(deltas), axis=(0, 2, 3, 4)))


@functools.partial(jax.jit, static_argnames=_STATIC[:1] + ("num",))
def _latent_denoise(model, params, model_state, z, tok, neg, key, timesteps, guidance_scale, *,
                    num):
  cond, uncond = _context(model, params, tok, neg, (z.shape[1] * model.vae.downsample_factor,
                                                    z.shape[2] * model.vae.downsample_factor))
  den = diffusion.guided_denoiser(model.denoise_fn(params), cond, uncond, guidance_scale)
  opts = model.sampling_options("ddim")
  opts = {k: v for k, v in opts.items() if k not in diffusion.GRID_OPTIONS}
  out = diffusion.denoise(den, model.make_schedule(), key, z, timesteps,
                          prediction=model.prediction, **opts)
  return model.decode_latents(model_state, out)


def denoise(model: LatentDiffusionModel, params, model_state, images, key, *, sigma=None,
            prompt: str = "", steps: int = 50, guidance_scale=1.0, probes: int = 4):
  """A latent diffusion model as a denoiser of the user's pictures [B, H, W, C] (uint8 or
  [0, 1]) -> (pictures in [0, 1], pixel sigmas [B], latent sigmas [B]).

  What it does to pixel noise: the encoder, trained on clean pictures, already drops part of it;
  what is left shows as latent noise. Its size is measured, not assumed: the pictures are
  encoded again with `probes` fresh draws of pixel noise of the same sigma (given, or estimated
  with jaxgen.images.estimate_noise_sigma), and the spread of the latent change is taken as the
  latent noise level, matched to the diffusion step of the same noise-to-signal ratio; the
  reverse process (DDIM, conditioned on `prompt`, guided when guidance_scale > 1) runs from
  there and the result is decoded. Detail the autoencoder cannot represent is lost either way;
  heavy pixel noise partly survives as texture the model may read as content. Sizes must be
  multiples of what the autoencoder and U-Net halve (ShapeError otherwise)."""
  model.refuse_flow("denoise")
  from jaxgen.images import estimate_noise_sigma
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] != model.image_shape[-1]:
    raise ShapeError(f"images: expected [batch, height, width, {model.image_shape[-1]}], got "
                     f"{list(x.shape)}")
  model.latent_shape_for(x.shape[1], x.shape[2])  # sizes the networks can take
  b = x.shape[0]
  sig = estimate_noise_sigma(x) if sigma is None else np.broadcast_to(
      np.asarray(sigma, np.float64), (b,))
  if np.any(~np.isfinite(sig)) or np.any(sig <= 0):
    raise ConfigError(f"sigma must be positive; got {sig.tolist()}")
  k_probe, k_run = jax.random.split(key)
  unit = to_unit(x)
  z, sig_z = _latent_noise(model, model_state, unit, jnp.asarray(sig, jnp.float32), k_probe,
                           probes=probes)
  sig_z = np.asarray(sig_z, np.float64)
  tok, neg = _tokens(model, [prompt] * b, None, 1)
  schedule = model.make_schedule()
  t_of = np.array([diffusion.timestep_for_sigma(schedule, max(s, 1e-6)) for s in sig_z])
  out = np.empty(x.shape, np.float32)
  for i, t in enumerate(np.unique(t_of)):
    idx = np.flatnonzero(t_of == t)
    sub = lambda d: {k: v[idx] for k, v in d.items()}
    out[idx] = np.asarray(_latent_denoise(
        model, params, model_state, z[idx], sub(tok), sub(neg), jax.random.fold_in(k_run, i),
        diffusion.denoising_timesteps(int(t), steps), jnp.float32(guidance_scale),
        num=len(idx)))
  return out, np.asarray(sig), sig_z

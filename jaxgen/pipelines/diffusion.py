"""Jitted user-facing functions for a trained pixel-space diffusion model: generate, inpaint,
img2img and interpolation. Images go in as uint8 or [0, 1] floats (NHWC) and come out in [0, 1].

Everything a user changes between calls — key, labels, guidance scale, eta, timestep values —
is a traced array: changing it never recompiles. Shapes, the sampler and the step count are
static.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import diffusion
from jaxgen.errors import ConfigError, ShapeError
from jaxgen.images import check_images as _check_shape
from jaxgen.images import from_signed, to_signed
from jaxgen.models.unet import UNet


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
  """A denoising network (a U-Net or a DiT, in the field `unet`) and the process it was trained
  for (hashable: a static jit argument). objective="flow": a rectified-flow model, which sees
  the time t in [0, 1] as num_timesteps * t and predicts the velocity; it samples with the
  euler or heun ODE step on diffusion.flow_grid(steps, flow_shift)."""
  unet: UNet
  image_shape: tuple[int, int, int]
  schedule: str = "linear"
  num_timesteps: int = 1000
  beta_start: float | None = None
  beta_end: float | None = None
  prediction: str = "eps"
  clip_x0: float | None = 1.0
  set_alpha_to_one: bool = True           # False: DDIM's last step ends at abar[0] (diffusers)
  use_clipped_model_output: bool = True   # re-derive eps from a clipped x0
  threshold: float | None = None          # dynamic thresholding's quantile (None: off)
  sample_max_value: float = 1.0           # dynamic thresholding's largest scale
  karras: bool = False                    # Karras sigmas for the euler and dpmpp_2m samplers
  final_sigmas: str = "zero"              # euler/dpmpp_2m's last level: zero | sigma_min
  objective: str = "diffusion"            # diffusion | flow
  flow_shift: float = 1.0                 # flow models: SD3's time shift of the sampling grid
  # The frozen image embedder (jaxgen.models.embedder) of a model conditioned on image
  # embeddings; its variables are model_state["embedder"].
  embedder: Any = None

  @property
  def num_classes(self) -> int:
    return self.unet.num_classes

  @property
  def embedding_dim(self) -> int:
    """The size of the image embedding the network is conditioned on (0: none)."""
    return getattr(self.unet, "embedding_dim", 0)

  def sampling_options(self, sampler: str) -> dict:
    """The keyword arguments of diffusion.sample that follow this model's scheduler settings."""
    return diffusion.sampling_options(
        self.make_schedule(), sampler, clip_x0=self.clip_x0,
        threshold=None if self.threshold is None else (self.threshold, self.sample_max_value),
        set_alpha_to_one=self.set_alpha_to_one, final_sigmas=self.final_sigmas,
        use_clipped_model_output=self.use_clipped_model_output, karras=self.karras)

  def make_schedule(self) -> diffusion.Schedule:
    return diffusion.make_schedule(self.schedule, self.num_timesteps, self.beta_start,
                                   self.beta_end)

  @property
  def is_flow(self) -> bool:
    return self.objective == "flow"

  def apply(self, params, x_t, t, labels=None, *, train: bool = False, key=None,
            embeddings=None):
    """The network's output; labels for a class-conditional model, embeddings [B, D] for an
    embedding-conditioned one (zeros: unconditional)."""
    rngs = {"dropout": key} if train else None
    if self.is_flow:  # flow time in [0, 1] -> the network's timestep scale
      t = jnp.asarray(t, jnp.float32) * self.num_timesteps
    extra = {"embedding": embeddings} if self.embedding_dim else {}
    return self.unet.apply(params, x_t, t, labels=labels, train=train, rngs=rngs, **extra)

  def refuse_flow(self, what: str) -> None:
    if self.is_flow:
      raise ConfigError(f"{what} is implemented for diffusion models; this is a flow-matching "
                        "model (diffusion.objective=flow): use generate")


def check_images(model: DiffusionModel, images, what: str = "images") -> None:
  _check_shape(images, model.image_shape, what)


def _check_conditioning(model: DiffusionModel, num: int, labels, guidance_scale,
                        embeddings=None) -> None:
  if model.embedding_dim:
    if labels is not None:
      raise ConfigError("This model is conditioned on image embeddings, not labels: pass "
                        "embeddings (e.g. from embed_images).")
    if embeddings is None:
      if guidance_scale is not None:
        raise ConfigError("guidance_scale needs embeddings: classifier-free guidance pushes "
                          "samples towards an embedding.")
      return
    if jnp.shape(embeddings) != (num, model.embedding_dim):
      raise ShapeError(f"embeddings must have shape [{num}, {model.embedding_dim}] (one per "
                       f"image), got {list(jnp.shape(embeddings))}.")
    return
  if embeddings is not None:
    raise ConfigError("This model takes no image embeddings (it was not trained on them: "
                      "model.embedding.init is empty).")
  if labels is None:
    if guidance_scale is not None:
      raise ConfigError("guidance_scale needs labels: classifier-free guidance pushes samples "
                        "towards a class.")
    return
  if model.num_classes == 0:
    raise ConfigError("This model is unconditional (model.num_classes=0): it takes no labels "
                      "and no guidance.")
  if jnp.shape(labels) != (num,):
    raise ShapeError(f"labels must have shape [{num}] (one per image), got {jnp.shape(labels)}.")
  try:
    concrete = np.asarray(labels)
  except jax.errors.TracerArrayConversionError:
    return  # traced: values known only at run time
  if concrete.min() < 0 or concrete.max() >= model.num_classes:
    raise ConfigError(f"labels must lie in [0, {model.num_classes - 1}]; got "
                      f"{sorted(set(concrete.tolist()))}.")


def denoiser(model: DiffusionModel, params, num: int, labels=None, guidance_scale=None,
             embeddings=None):
  """denoise(x_t, t) for the samplers: unconditional (null label on a class-conditional
  model, zero embedding on an embedding-conditioned one), conditional, or with classifier-free
  guidance when guidance_scale is given."""
  _check_conditioning(model, num, labels, guidance_scale, embeddings)
  if model.embedding_dim:
    null = jnp.zeros((num, model.embedding_dim), jnp.float32)
    fn = lambda x_t, t, e: model.apply(params, x_t, t, embeddings=e)
    if embeddings is None:
      return lambda x_t, t: fn(x_t, t, null)
    embeddings = jnp.asarray(embeddings, jnp.float32)
    if guidance_scale is None:
      return lambda x_t, t: fn(x_t, t, embeddings)
    return diffusion.guided_denoiser(fn, embeddings, null, guidance_scale)
  null = jnp.full((num,), model.unet.null_label_id, jnp.int32) if model.num_classes else None
  if labels is None:
    return lambda x_t, t: model.apply(params, x_t, t, null)
  labels = jnp.asarray(labels, jnp.int32)
  if guidance_scale is None:
    return lambda x_t, t: model.apply(params, x_t, t, labels)
  return diffusion.guided_denoiser(lambda x_t, t, y: model.apply(params, x_t, t, y), labels,
                                   null, guidance_scale)


_STATIC = ("model", "num", "sampler", "num_steps", "return_trajectory", "spacing")


def _checked(jitted):
  """The user-facing function: checks the request where its values are known (outside any
  trace), then calls the jitted program. `.jitted` exposes it (e.g. to count compilations)."""
  @functools.wraps(jitted)
  def call(model, params, *args, num: int, labels=None, guidance_scale=None, embeddings=None,
           **kwargs):
    _check_conditioning(model, num, labels, guidance_scale, embeddings)
    return jitted(model, params, *args, num=num, labels=labels, guidance_scale=guidance_scale,
                  embeddings=embeddings, **kwargs)
  call.jitted = jitted
  return call


@_checked
@functools.partial(jax.jit, static_argnames=_STATIC)
def generate(model: DiffusionModel, params, key, *, num: int, labels=None, guidance_scale=None,
             embeddings=None, sampler: str = "ddim", num_steps: int = 50, eta=0.0,
             timesteps=None, spacing: str = "trailing", return_trajectory: bool = False):
  """`num` images [num, H, W, C] in [0, 1] (and the trajectory [steps+1, num, H, W, C] in model
  space if asked). labels: int [num] for a class-conditional model; embeddings [num, D] for an
  embedding-conditioned one; guidance_scale turns on classifier-free guidance (a scalar or one
  per image)."""
  den = denoiser(model, params, num, labels, guidance_scale, embeddings)
  shape = (num, *model.image_shape)
  if model.is_flow:
    if timesteps is not None:
      raise ConfigError("a flow model's grid comes from num_steps and flow_shift, not timesteps")
    grid = diffusion.flow_grid(num_steps, model.flow_shift, model.num_timesteps)
    out = diffusion.sample(den, None, key, shape, sampler=sampler, prediction="flow", grid=grid,
                           return_trajectory=return_trajectory)
  else:
    out = diffusion.sample(den, model.make_schedule(), key, shape, sampler=sampler,
                           num_steps=num_steps, prediction=model.prediction, eta=eta,
                           timesteps=timesteps, spacing=spacing,
                           **model.sampling_options(sampler),
                           return_trajectory=return_trajectory)
  if return_trajectory:
    return from_signed(out[0]), out[1]
  return from_signed(out)


@_checked
@functools.partial(jax.jit, static_argnames=_STATIC[:4] + ("spacing",))
def inpaint(model: DiffusionModel, params, key, images, mask, *, num: int, labels=None,
            guidance_scale=None, embeddings=None, sampler: str = "ddim", num_steps: int = 50,
            eta=0.0, spacing: str = "trailing"):
  """Fills the pixels where mask == 0; mask [num, H, W, 1 or C] is 1 on the known pixels."""
  model.refuse_flow("inpaint")
  check_images(model, images)
  if images.shape[0] != num:
    raise ShapeError(f"inpaint: {images.shape[0]} images given for num={num}.")
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), images.shape)
  den = denoiser(model, params, num, labels, guidance_scale, embeddings)
  out = diffusion.inpaint(den, model.make_schedule(), key, to_signed(images), mask,
                          sampler=sampler, num_steps=num_steps, prediction=model.prediction,
                          eta=eta, spacing=spacing, **model.sampling_options(sampler))
  return from_signed(out)


@_checked
@functools.partial(jax.jit, static_argnames=_STATIC[:4] + ("spacing", "strength"))
def img2img(model: DiffusionModel, params, key, images, *, strength: float, num: int,
            labels=None, guidance_scale=None, embeddings=None, sampler: str = "ddim",
            num_steps: int = 50, eta=0.0, spacing: str = "trailing"):
  """SDEdit: noise the images to `strength` (0..1] of the schedule and denoise them back."""
  model.refuse_flow("img2img")
  check_images(model, images)
  den = denoiser(model, params, num, labels, guidance_scale, embeddings)
  out = diffusion.img2img(den, model.make_schedule(), key, to_signed(images), strength,
                          sampler=sampler, num_steps=num_steps, prediction=model.prediction,
                          eta=eta, spacing=spacing, **model.sampling_options(sampler))
  return from_signed(out)


@functools.partial(jax.jit, static_argnames=("model", "num", "num_steps", "label"))
def interpolate(model: DiffusionModel, params, image_a, image_b, *, num: int = 8,
                num_steps: int = 50, label: int | None = None):
  """Deterministic DDIM inversion of two images [H, W, C], slerp of their noises, decoding:
  [num, H, W, C] in [0, 1]. A class-conditional model uses `label` (or the null label)."""
  model.refuse_flow("interpolate")
  check_images(model, image_a[None], "image_a")
  check_images(model, image_b[None], "image_b")
  if label is not None:
    _check_conditioning(model, 1, jnp.full((1,), label), None)
  fill = None
  if model.num_classes:
    fill = model.unet.null_label_id if label is None else label

  def den(x_t, t):  # inversion runs on 2 images, decoding on `num`: labels follow the batch
    y = None if fill is None else jnp.full(x_t.shape[:1], fill, jnp.int32)
    e = jnp.zeros((x_t.shape[0], model.embedding_dim)) if model.embedding_dim else None
    return model.apply(params, x_t, t, y, embeddings=e)

  out = diffusion.interpolate(den, model.make_schedule(), to_signed(image_a),
                              to_signed(image_b), num, num_steps,
                              prediction=model.prediction)
  return from_signed(out)


# -- image embeddings: variations ----------------------------------------------------------------
def _require_embedder(model: DiffusionModel, what: str) -> None:
  if model.embedder is None:
    raise ConfigError(f"{what} needs a model conditioned on image embeddings (a ddpm run "
                      "trained with model.embedding.init, e.g. configs/vary.py); this one is not.")


@functools.partial(jax.jit, static_argnums=0)
def _embed(model: DiffusionModel, embedder_vars, images):
  return model.embedder.apply(embedder_vars, to_signed(images))


def embed_images(model: DiffusionModel, model_state, images, batch_size: int = 256) -> np.ndarray:
  """The frozen embedder's embeddings [N, D] (unit norm x sqrt(D)) of images [N, H, W, C]
  (uint8 or [0, 1]) of the model's shape: what the model was conditioned on in training."""
  from jaxgen.images import map_batches
  _require_embedder(model, "embed_images")
  images = np.asarray(images)
  check_images(model, images)
  return map_batches(lambda x: _embed(model, model_state["embedder"], x), images, batch_size)


def vary(model: DiffusionModel, params, model_state, key, images, *, num: int = 8,
         guidance_scale=3.0, sampler: str | None = None, num_steps: int = 50) -> np.ndarray:
  """Image variations: `num` samples [B, num, H, W, C] in [0, 1] for each of the images
  [B, H, W, C], conditioned on the image's embedding (what the frozen encoder sees in it) with
  classifier-free guidance `guidance_scale` (None: the conditional model alone). The rest (what
  the encoder is invariant to) varies from sample to sample."""
  _require_embedder(model, "vary")
  emb = embed_images(model, model_state, images)
  b = emb.shape[0]
  emb = np.repeat(emb, num, axis=0)
  g = None if guidance_scale is None else jnp.float32(guidance_scale)
  sampler = sampler or ("euler" if model.is_flow else "ddim")
  x = generate(model, params, key, num=b * num, embeddings=jnp.asarray(emb), guidance_scale=g,
               sampler=sampler, num_steps=num_steps)
  return np.asarray(x).reshape(b, num, *model.image_shape)


def grid_labels(model: DiffusionModel, n: int):
  """n labels cycling through the classes (a grid then shows each class in its own column);
  None for an unconditional model."""
  k = model.num_classes
  return jnp.arange(n, dtype=jnp.int32) % k if k else None


def draw(model: DiffusionModel, params, key, num: int, *, sampler: str, steps: int,
         guidance=None, batch: int = 250):
  """`num` samples (uint8 [num, H, W, C]) in calls of `batch` images, and their labels
  (class-conditional: cycling through the classes, with `guidance`; else None)."""
  from jaxgen.images import to_uint8
  labels_all = grid_labels(model, num)
  out = []
  for i, lo in enumerate(range(0, num, batch)):
    n = min(batch, num - lo)
    labels = None if labels_all is None else labels_all[lo:lo + n]
    g = None if labels is None else jnp.float32(guidance)
    x = generate(model, params, jax.random.fold_in(key, i), num=n, labels=labels,
                 guidance_scale=g, sampler=sampler, num_steps=steps)
    out.append(to_uint8(np.asarray(x)))
  return np.concatenate(out), (None if labels_all is None else np.asarray(labels_all))


@functools.partial(jax.jit, static_argnames=("model", "num", "steps"))
def _flow_denoise(model: DiffusionModel, params, x_start, start, *, num: int, steps: int):
  return diffusion.sample(denoiser(model, params, num), None, jax.random.PRNGKey(0), None,
                          x_T=x_start, sampler="euler", prediction="flow",
                          grid=diffusion.flow_grid_from(start, steps))


@functools.partial(jax.jit, static_argnames=("model", "num", "draws", "sampler"))
def _denoise(model: DiffusionModel, params, key, y, timesteps, *, num: int, draws: int,
             sampler: str):
  den = denoiser(model, params, num)
  opts = model.sampling_options(sampler)
  opts.pop("final_abar", None)  # the estimate of the clean image ends at the data
  return diffusion.denoise(den, model.make_schedule(), key, y, timesteps, draws=draws,
                           sampler=sampler, prediction=model.prediction, **opts)


def denoise(model: DiffusionModel, params, images, key, *, sigma=None, steps: int = 50,
            draws: int = 1):
  """A user's noisy pictures [B, H, W, C] (uint8 or [0, 1]) -> denoised pictures in [0, 1], and
  the noise levels used [B] (on the [0, 1] scale).

  sigma: the standard deviation of the (additive Gaussian) noise on the [0, 1] scale, one for
  all or one per image; None estimates it per image (jaxgen.images.estimate_noise_sigma). In the
  model's [-1, 1] space the noise is 2 sigma, mapped to the timestep of the same noise-to-signal
  ratio; the reverse process runs from there in `steps` steps: deterministic DDIM (draws=1), or
  the mean of `draws` ancestral draws (an estimate of the posterior mean: smoother, higher
  PSNR). Pictures of any size are reflect-padded to a multiple the U-Net can halve and cropped
  back. Images with the same noise level share one call; new levels do not recompile."""
  from jaxgen.images import estimate_noise_sigma
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] != model.image_shape[-1]:
    raise ShapeError(f"images: expected [batch, height, width, {model.image_shape[-1]}] (this "
                     f"model's channels), got {list(x.shape)}")
  if not isinstance(draws, int) or draws < 1:
    raise ConfigError(f"draws must be a positive int, got {draws!r}")
  b, h, w, _ = x.shape
  sig = estimate_noise_sigma(x) if sigma is None else np.broadcast_to(
      np.asarray(sigma, np.float64), (b,))
  if np.any(~np.isfinite(sig)) or np.any(sig <= 0):
    raise ConfigError(f"sigma must be positive; got {sig.tolist()} (an image without noise "
                      f"needs no denoising)")
  f = model.unet.downsample_factor
  ph, pw = -h % f, -w % f
  if ph >= h or pw >= w:
    raise ShapeError(f"images of {h}x{w} are too small for this U-Net (it halves them "
                     f"{model.unet.levels - 1} times)")
  y = np.asarray(to_signed(x), np.float32)
  y = np.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
  out = np.empty_like(y)
  if model.is_flow:
    # y = x + 2 sigma n in [-1, 1]; (1 - s) y is the flow point at time s = 2 sigma / (1 + 2
    # sigma), whose noise-to-signal ratio s / (1 - s) is 2 sigma. The ODE is deterministic.
    if draws != 1:
      raise ConfigError("a flow model denoises along its deterministic ODE: draws must be 1")
    for s in np.unique(sig):
      idx = np.flatnonzero(sig == s)
      start = 2 * s / (1 + 2 * s)
      out[idx] = np.asarray(_flow_denoise(model, params, y[idx] * (1 - start),
                                          jnp.float32(start), num=len(idx), steps=steps))
    return np.asarray(from_signed(out[:, :h, :w])), np.asarray(sig)
  schedule = model.make_schedule()
  t_of = np.array([diffusion.timestep_for_sigma(schedule, 2 * s) for s in sig])
  sampler = "ddim" if draws == 1 else "ddpm"
  for i, t in enumerate(np.unique(t_of)):
    idx = np.flatnonzero(t_of == t)
    ts = diffusion.denoising_timesteps(int(t), steps)
    out[idx] = np.asarray(_denoise(model, params, jax.random.fold_in(key, i), y[idx], ts,
                                   num=len(idx), draws=draws, sampler=sampler))
  return np.asarray(from_signed(out[:, :h, :w])), np.asarray(sig)

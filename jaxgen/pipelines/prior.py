"""A diffusion prior over image embeddings, used from Python: sample embeddings (RCG's
representation generator; unCLIP's text -> image-embedding prior), and decode them into images
with an embedding-conditioned pixel diffusion run (jaxgen.pipelines.diffusion).

The prior models standardised embeddings (z - mean) / std, the statistics of the training set's
embeddings (model_state["stats"]); samples are mapped back and put on the sphere of radius
sqrt(D) on which every embedding of the frozen tower lies. It uses the one sampler core: any
sampler of jaxgen.diffusion (or euler/heun for a flow prior).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import diffusion
from jaxgen.errors import ConfigError, ShapeError
from jaxgen.pipelines.diffusion import DiffusionModel


def _denoiser(model: DiffusionModel, params, num: int, cond, guidance_scale):
  net = model.unet

  def apply(x_t, t, c):
    if model.is_flow:
      t = jnp.asarray(t, jnp.float32) * model.num_timesteps
    return net.apply(params, x_t, t, cond=c)

  if not net.cond_dim:
    if cond is not None or guidance_scale is not None:
      raise ConfigError("This prior is unconditional: it takes no condition and no guidance.")
    return lambda x_t, t: apply(x_t, t, None)
  null = jnp.zeros((num, net.cond_dim), jnp.float32)
  if cond is None:
    if guidance_scale is not None:
      raise ConfigError("guidance_scale needs a condition (e.g. text embeddings).")
    return lambda x_t, t: apply(x_t, t, null)
  if jnp.shape(cond) != (num, net.cond_dim):
    raise ShapeError(f"cond must have shape [{num}, {net.cond_dim}], got {list(jnp.shape(cond))}")
  cond = jnp.asarray(cond, jnp.float32)
  if guidance_scale is None:
    return lambda x_t, t: apply(x_t, t, cond)
  return diffusion.guided_denoiser(apply, cond, null, guidance_scale)


def to_embeddings(x, stats):
  """Standardised prior samples -> embeddings on the sphere of radius sqrt(D)."""
  e = x * stats["std"] + stats["mean"]
  norm = jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True) + 1e-12)
  return e / norm * math.sqrt(e.shape[-1])


@functools.partial(jax.jit, static_argnames=("model", "num", "sampler", "num_steps"))
def _sample(model: DiffusionModel, params, stats, key, cond, guidance_scale, *, num: int,
            sampler: str, num_steps: int):
  den = _denoiser(model, params, num, cond, guidance_scale)
  shape = (num, *model.image_shape)
  if model.is_flow:
    grid = diffusion.flow_grid(num_steps, model.flow_shift, model.num_timesteps)
    x = diffusion.sample(den, None, key, shape, sampler=sampler, prediction="flow", grid=grid)
  else:
    x = diffusion.sample(den, model.make_schedule(), key, shape, sampler=sampler,
                         num_steps=num_steps, prediction=model.prediction,
                         **model.sampling_options(sampler))
  return to_embeddings(x, stats)


def sample_embeddings(model: DiffusionModel, params, model_state, key, *, num: int, cond=None,
                      guidance_scale=None, sampler: str = "ddim", num_steps: int = 50):
  """`num` embeddings [num, D] drawn from the prior (conditioned on `cond` [num, C] for a
  conditional prior, with classifier-free guidance when guidance_scale is given)."""
  g = None if guidance_scale is None else jnp.float32(guidance_scale)
  return _sample(model, params, model_state["stats"], key, cond, g, num=num, sampler=sampler,
                 num_steps=num_steps)


def generate(prior: DiffusionModel, prior_params, prior_state, decoder: DiffusionModel,
             decoder_params, key, *, num: int, cond=None, prior_guidance=None,
             decoder_guidance=3.0, prior_sampler: str = "ddim", prior_steps: int = 50,
             decoder_sampler: str = "ddim", decoder_steps: int = 50, batch: int = 250
             ) -> np.ndarray:
  """Images [num, H, W, C] in [0, 1]: embeddings from the prior, decoded by the embedding-
  conditioned `decoder` (guidance decoder_guidance; None: the conditional model alone), in
  calls of `batch` images."""
  from jaxgen.pipelines import diffusion as pixel
  if decoder.embedding_dim != prior.image_shape[-1]:
    raise ConfigError(f"the prior samples {prior.image_shape[-1]}-d embeddings; the decoder "
                      f"takes {decoder.embedding_dim}")
  out = []
  for i, lo in enumerate(range(0, num, batch)):
    n = min(batch, num - lo)
    k_prior, k_dec = jax.random.split(jax.random.fold_in(key, i))
    c = None if cond is None else jnp.asarray(cond)[lo:lo + n]
    emb = sample_embeddings(prior, prior_params, prior_state, k_prior, num=n, cond=c,
                            guidance_scale=prior_guidance, sampler=prior_sampler,
                            num_steps=prior_steps)
    g = None if decoder_guidance is None else jnp.float32(decoder_guidance)
    out.append(np.asarray(pixel.generate(decoder, decoder_params, k_dec, num=n, embeddings=emb,
                                         guidance_scale=g, sampler=decoder_sampler,
                                         num_steps=decoder_steps)))
  return np.concatenate(out)

"""Autoencoders and VAEs: deterministic or Gaussian latents, Bernoulli or Gaussian likelihood.

Loss per image, in nats: -log p(x | z) + beta * KL(q(z | x) || N(0, I)); with beta = 1 this is
the negative ELBO. Images are scaled to [0, 1] for the likelihood and to [-1, 1] for the encoder.
"""
from __future__ import annotations

import argparse
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import images as img
from jaxgen.data import load_all, load_source
from jaxgen.distributions import bernoulli_log_prob, gaussian_kl, gaussian_log_prob, reparameterize
from jaxgen.errors import ConfigError
from jaxgen.eval.batching import map_batches
from jaxgen.eval.image_metrics import psnr, ssim
from jaxgen.models.autoencoder import Autoencoder
from jaxgen.pipelines import autoencoder as pipe
from jaxgen.tasks.base import Task


class AutoencoderTask(Task):
  name = "vae"

  @staticmethod
  def default_config():
    return {"model": dict(
        kind="vae",               # vae | ae (deterministic)
        likelihood="bernoulli",   # bernoulli | gaussian
        gaussian_scale=0.0,       # fixed output std for gaussian; 0 learns one per channel
        beta=1.0,                 # KL weight (beta-VAE)
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        z_channels=4,
        latent_dim=32,            # > 0: vector latents; 0: spatial [H/f, W/f, z_channels]
        groups=8,
        mid_attention=False,
        quant_conv=True,
    )}

  @staticmethod
  def validate(config):
    m, d = config.model, config.data
    if m.kind not in ("vae", "ae"):
      raise ConfigError(f"model.kind must be 'vae' or 'ae'; got {m.kind!r}.")
    if m.likelihood not in ("bernoulli", "gaussian"):
      raise ConfigError(f"model.likelihood must be 'bernoulli' or 'gaussian'; got "
                        f"{m.likelihood!r}.")
    if m.gaussian_scale < 0 or m.beta < 0:
      raise ConfigError("model.gaussian_scale and model.beta must be >= 0.")
    f = 2 ** (len(m.ch_mult) - 1)
    if d.image_size % f:
      raise ConfigError(f"data.image_size={d.image_size} must be divisible by the downsampling "
                        f"factor {f} (2 ** (len(model.ch_mult) - 1)).")
    bad = [m.ch * k for k in m.ch_mult if (m.ch * k) % m.groups]
    if bad:
      raise ConfigError(f"model.groups={m.groups} must divide every level's channels; "
                        f"{bad} are not divisible.")
    if m.latent_dim < 0 or m.z_channels <= 0:
      raise ConfigError("model.latent_dim must be >= 0 and model.z_channels > 0.")

  def __init__(self, config):
    super().__init__(config)
    m, d = config.model, config.data
    self.module = Autoencoder(
        in_channels=d.channels, out_channels=d.channels, image_size=d.image_size, ch=m.ch,
        ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks, z_channels=m.z_channels,
        latent_dim=m.latent_dim, variational=m.kind == "vae", groups=m.groups,
        mid_attention=m.mid_attention, quant_conv=m.quant_conv,
        learn_output_scale=m.likelihood == "gaussian" and m.gaussian_scale == 0)
    self.model = pipe.AutoencoderModel(self.module, m.likelihood)
    self._eval_data = None

  # -- training ----------------------------------------------------------------------------
  def init(self, key, batch):
    x = 2.0 * pipe.to_unit(batch["image"]) - 1.0
    return self.module.init(key, x), {}

  def log_likelihood(self, params, x, out):
    if self.config.model.likelihood == "bernoulli":
      return bernoulli_log_prob(x, out)
    s = self.config.model.gaussian_scale
    log_scale = params["params"]["log_scale"] if s == 0 else jnp.float32(math.log(s))
    return gaussian_log_prob(x, out, log_scale)

  def terms(self, params, images, key):
    """Per-image nll and kl (nats) and the decoder output, for a batch of uint8 images."""
    x = pipe.to_unit(images)
    mean, logvar = self.module.apply(params, 2.0 * x - 1.0, method=Autoencoder.encode)
    if logvar is None:
      z, kl = mean, jnp.zeros(mean.shape[0])
    else:
      z, kl = reparameterize(key, mean, logvar), gaussian_kl(mean, logvar)
    out = self.module.apply(params, z, method=Autoencoder.decode)
    return -self.log_likelihood(params, x, out), kl, out

  def loss_fn(self, params, model_state, batch, key):
    nll, kl, _ = self.terms(params, batch["image"], key)
    loss = jnp.mean(nll + self.config.model.beta * kl)
    dims = math.prod(batch["image"].shape[1:])
    metrics = dict(nll=nll.mean(), kl=kl.mean(),
                   neg_elbo_bits_per_dim=(nll + kl).mean() / (dims * math.log(2.0)))
    return loss, (metrics, model_state)

  # -- pictures ----------------------------------------------------------------------------
  def eval_images(self, n: int) -> np.ndarray:
    if self._eval_data is None:
      self._eval_data = load_all(load_source(self.config.data, self.config.data.eval_split),
                                 limit=1024)["image"]
    return self._eval_data[:n]

  def pictures(self, params, model_state, key):
    n = self.config.train.num_samples
    scale = img.display_scale(self.config.data.image_size)
    x = self.eval_images(16)
    out = {"reconstructions": img.rows(x, pipe.reconstruct(self.model, params, x), scale=scale)}
    if self.config.model.kind == "vae":
      out["prior_samples"] = img.grid(pipe.sample_prior(self.model, params, key, n), scale=scale)
    return out

  def interpolation_strip(self, params, image_a, image_b, num: int = 10) -> np.ndarray:
    """Row 1: linear, row 2: spherical interpolation of the latents, each framed by the two
    original images."""
    ends = pipe.to_unit(np.stack([image_a, image_b]))
    lin = pipe.interpolate(self.model, params, image_a, image_b, num, "lerp")
    sph = pipe.interpolate(self.model, params, image_a, image_b, num, "slerp")
    frame = lambda r: np.concatenate([ends[:1], r, ends[1:]])
    return img.rows(frame(lin), frame(sph), scale=img.display_scale(self.config.data.image_size))

  # -- jaxgen sample -----------------------------------------------------------------------
  @staticmethod
  def add_sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=int, default=64, help="prior samples in the grid")
    parser.add_argument("--pairs", type=int, default=4,
                        help="held-out image pairs to interpolate between")
    parser.add_argument("--steps", type=int, default=10, help="points per interpolation")

  def sample(self, params, model_state, args, outdir: pathlib.Path):
    key = jax.random.PRNGKey(args.seed)
    scale = img.display_scale(self.config.data.image_size)
    main = pathlib.Path(args.out_file) if args.out_file else None
    name = lambda default, suffix: (main.with_name(main.stem + suffix + ".png") if main
                                    else outdir / f"{default}.png")
    paths = []
    if self.config.model.kind == "vae":
      samples = pipe.sample_prior(self.model, params, key, args.num)
      paths.append(img.save_png(img.grid(samples, scale=scale), main or name("prior_samples", "")))
    x = self.eval_images(max(16, 2 * args.pairs))
    paths.append(img.save_png(img.rows(x[:16], pipe.reconstruct(self.model, params, x[:16]),
                                       scale=scale), name("reconstructions", "_reconstructions")))
    strips = [self.interpolation_strip(params, x[2 * i], x[2 * i + 1], args.steps)
              for i in range(args.pairs)]
    paths.append(img.save_png(np.concatenate(strips, axis=0),
                              name("interpolations", "_interpolations")))
    return paths

  @staticmethod
  def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate on the first N held-out images only")

  # -- jaxgen eval -------------------------------------------------------------------------
  def evaluate(self, params, model_state, key, limit: int | None = None, **unused):
    d = self.config.data
    data = load_all(load_source(d, d.eval_split), limit=limit)
    dims = math.prod(data["image"].shape[1:])

    @jax.jit
    def per_batch(batch, k):
      nll, kl, _ = self.terms(params, batch["image"], k)
      x = pipe.to_unit(batch["image"])
      recon = pipe.reconstruct(self.model, params, batch["image"])
      out = dict(nll=nll, kl=kl, psnr=psnr(x, recon))
      if min(x.shape[1:3]) >= 11:  # SSIM's 11x11 window
        out["ssim"] = ssim(x, recon)
      return out

    r = map_batches(per_batch, {"image": data["image"]}, min(d.batch_size, len(data["image"])),
                    key)
    neg_elbo = r["nll"] + r["kl"]
    out = dict(num_images=len(neg_elbo), psnr=float(r["psnr"].mean()),
               nll=float(r["nll"].mean()), kl=float(r["kl"].mean()))
    if "ssim" in r:
      out["ssim"] = float(r["ssim"].mean())
    if self.config.model.kind == "vae":
      out["neg_elbo"] = float(neg_elbo.mean())
      out["neg_elbo_bits_per_dim"] = float(neg_elbo.mean() / (dims * math.log(2.0)))
    return out

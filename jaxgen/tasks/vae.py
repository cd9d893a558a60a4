"""Autoencoders and VAEs: deterministic or Gaussian latents, Bernoulli or Gaussian likelihood,
and the KL autoencoder that is latent diffusion's first stage.

Loss per image: rec(x, x_hat) + beta * KL(q(z | x) || N(0, I)) [+ perceptual] [+ GAN]. With
rec_loss="likelihood" rec is -log p(x | z) in nats (beta = 1: the negative ELBO); "l1"/"l2" sum
the pixel errors in [-1, 1] units as the LDM autoencoder does (its KL weight is 1e-6). Images are
scaled to [0, 1] for the likelihood and to [-1, 1] for the encoder and the discriminator.

params: {"params": autoencoder} (+ "disc": patch discriminator); model_state: {"latent_stats":
{"mean", "var"} (running, of the sampled latents), "step"}. latent_scale(model_state) is the
factor latent diffusion multiplies the latents by (Stable Diffusion's scaling_factor).
"""
from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp

from jaxgen import images as img
from jaxgen import losses
from jaxgen.data import heldout_images
from jaxgen.distributions import bernoulli_log_prob, gaussian_kl, gaussian_log_prob, reparameterize
from jaxgen.errors import ConfigError
from jaxgen.images import to_signed, to_unit
from jaxgen.models import build
from jaxgen.models.autoencoder import Autoencoder
from jaxgen.models.discriminator import PatchDiscriminator
from jaxgen.pipelines import autoencoder as pipe
from jaxgen.tasks.base import Task

# The model keys that shape training only; the others are the Autoencoder's fields or decide them.
TRAINING_KEYS = ("kind", "likelihood", "gaussian_scale", "rec_loss", "beta",
                 "latent_stats_momentum", "perceptual_net", "perceptual_weight", "disc_weight",
                 "disc_start", "disc_adaptive", "disc_ch", "disc_layers")


def architecture_keys(model_cfg) -> list[str]:
  """The model keys that define the autoencoder's parameters (a loaded run must match them)."""
  shaping = ("kind", "likelihood", "gaussian_scale", "rec_loss")  # decide learn_output_scale
  return [k for k in model_cfg if k not in TRAINING_KEYS or k in shaping]


def autoencoder_section(**overrides) -> dict:
  """A vae-task model section: the Autoencoder's fields (those the data does not fix) and the
  training keys."""
  training = dict(
      kind="vae",               # vae | ae (deterministic)
      # How decoder outputs become images: bernoulli = logits (sigmoid), gaussian = the
      # pixel values themselves; with rec_loss="likelihood" also the likelihood.
      likelihood="bernoulli",   # bernoulli | gaussian
      gaussian_scale=0.0,       # fixed output std for gaussian; 0 learns one per channel
      rec_loss="likelihood",    # likelihood (-log p(x|z), nats) | l1 | l2 (summed, [-1, 1])
      beta=1.0,                 # KL weight (beta-VAE; LDM's KL autoencoders use 1e-6)
      latent_stats_momentum=0.99,  # running mean/var of the sampled latents (model_state)
      perceptual_net="",        # "" off | auto (the metric's cached classifier) | a workdir
      perceptual_weight=1.0,    # LPIPS-style distance, added to every pixel's loss (as LDM)
      disc_weight=0.0,          # > 0: a patch discriminator (hinge loss) with this weight
      disc_start=0,             # steps before the discriminator and its loss are switched on
      disc_adaptive=True,       # scale disc_weight by |grad rec| / |grad gan| (taming)
      disc_ch=64,
      disc_layers=3,            # stride-2 convs; the patch is 34 px for 2, 70 px for 3
  )
  d = build.section(Autoencoder, exclude=("in_channels", "out_channels", "image_size",
                                          "variational", "learn_output_scale", "dtype"),
                    ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, latent_dim=32,
                    groups=8, mid_attention=False, quant_conv=True, **training)
  d.update(overrides)
  return d


def autoencoder_module(model_cfg, data_cfg) -> Autoencoder:
  """The Autoencoder a vae-task model section describes (also for tasks that load one)."""
  m, d = model_cfg, data_cfg
  return build.build(
      Autoencoder, m, skip=TRAINING_KEYS, where="model", in_channels=d.channels,
      out_channels=d.channels, image_size=d.image_size, variational=m.kind == "vae",
      learn_output_scale=(m.likelihood == "gaussian" and m.gaussian_scale == 0
                          and m.rec_loss == "likelihood"))


class AutoencoderTask(Task):
  name = "vae"

  @staticmethod
  def default_config():
    return {"model": autoencoder_section()}

  @staticmethod
  def validate(config):
    m, d = config.model, config.data
    if m.kind not in ("vae", "ae"):
      raise ConfigError(f"model.kind must be 'vae' or 'ae'; got {m.kind!r}.")
    if m.likelihood not in ("bernoulli", "gaussian"):
      raise ConfigError(f"model.likelihood must be 'bernoulli' or 'gaussian'; got "
                        f"{m.likelihood!r}.")
    if m.rec_loss not in ("likelihood", "l1", "l2"):
      raise ConfigError(f"model.rec_loss must be 'likelihood', 'l1' or 'l2'; got "
                        f"{m.rec_loss!r}.")
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
    if not 0.0 <= m.latent_stats_momentum < 1.0:
      raise ConfigError(f"model.latent_stats_momentum must be in [0, 1); got "
                        f"{m.latent_stats_momentum}.")
    if m.perceptual_weight < 0 or m.disc_weight < 0 or m.disc_start < 0:
      raise ConfigError("model.perceptual_weight, model.disc_weight and model.disc_start must "
                        "be >= 0.")
    if m.disc_weight > 0:
      if m.disc_layers < 1 or m.disc_ch < 1:
        raise ConfigError("model.disc_layers and model.disc_ch must be >= 1.")
      # disc_layers stride-2 convs, then two 4x4 convs that each take one pixel off.
      if d.image_size // 2 ** m.disc_layers < 3:
        raise ConfigError(f"model.disc_layers={m.disc_layers} leaves no patch of a "
                          f"{d.image_size}px image; use at most "
                          f"{max(1, int(math.log2(max(d.image_size // 3, 1))))}.")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    m = config.model
    self.module = autoencoder_module(m, config.data)
    self.model = pipe.AutoencoderModel(self.module, m.likelihood)
    self.disc = (PatchDiscriminator(ch=m.disc_ch, num_layers=m.disc_layers)
                 if m.disc_weight > 0 else None)
    self._feature_distance = None
    self._eval_images = None

  @staticmethod
  def autoencoder_params(params) -> dict:
    """The autoencoder's variables alone (what Autoencoder.apply and the pipelines take)."""
    return {"params": params["params"]}

  # -- training ----------------------------------------------------------------------------
  def init(self, key, batch):
    x = to_signed(batch["image"])
    params = self.module.init(key, x)
    if self.disc is not None:
      params = {**params, "disc": self.disc.init(jax.random.fold_in(key, 1), x)["params"]}
    model_state = {"latent_stats": {"mean": jnp.zeros((), jnp.float32),
                                    "var": jnp.ones((), jnp.float32)},
                   "step": jnp.zeros((), jnp.int32)}
    return params, model_state

  def prepare(self, state) -> None:
    """Loads the perceptual loss's feature network before the loss is traced."""
    self.feature_distance()

  def feature_distance(self) -> losses.FeatureDistance | None:
    """The frozen network of the perceptual loss, loaded on first use; None when it is off."""
    m = self.config.model
    if not m.perceptual_net or m.perceptual_weight == 0:
      return None
    if self._feature_distance is None:
      from jaxgen.eval.quality import load_feature_net
      from jaxgen.weights import read_config
      workdir = None if m.perceptual_net == "auto" else pathlib.Path(m.perceptual_net)
      if workdir is not None and not (workdir / "config.json").is_file():
        raise ConfigError(f"model.perceptual_net: {workdir} is not a jaxgen workdir; give a "
                          "classifier run's workdir, or 'auto'.")
      d = self.config.data
      if workdir is not None:
        c = read_config(workdir)
        if c["task"] != "classifier" or (c["data"]["image_size"], c["data"]["channels"]) != (
            d.image_size, d.channels):
          raise ConfigError(
              f"model.perceptual_net: {workdir} holds a {c['task']} run on "
              f"{c['data']['image_size']}px, {c['data']['channels']}-channel images; it must be "
              f"a classifier on {d.image_size}px, {d.channels}-channel images.")
      # Loading runs eagerly even when it first happens while loss_fn is being traced.
      with jax.ensure_compile_time_eval():
        net = load_feature_net(d, workdir)
      self._feature_distance = losses.FeatureDistance.from_feature_net(net)
    return self._feature_distance

  def log_likelihood(self, params, x, out):
    if self.config.model.likelihood == "bernoulli":
      return bernoulli_log_prob(x, out)
    s = self.config.model.gaussian_scale
    log_scale = params["params"]["log_scale"] if s == 0 else jnp.float32(math.log(s))
    return gaussian_log_prob(x, out, log_scale)

  def output_images(self, out):
    """Decoder output -> images in [0, 1] units, not clipped (the losses need the gradient)."""
    return jax.nn.sigmoid(out) if self.config.model.likelihood == "bernoulli" else out

  def reconstruction_loss(self, params, x, out):
    """Per-image reconstruction loss [B] of images x in [0, 1] from decoder outputs."""
    kind = self.config.model.rec_loss
    if kind == "likelihood":
      return -self.log_likelihood(params, x, out)
    pixel_loss = losses.l1_loss if kind == "l1" else losses.l2_loss
    # In [-1, 1] units, the LDM autoencoder's, so that its loss weights carry over.
    return pixel_loss(to_signed(x), to_signed(self.output_images(out)))

  def _forward(self, params, x, key):
    """Images in [0, 1] -> (sampled latents z, KL per image [B], decoder output)."""
    ae = self.autoencoder_params(params)
    mean, logvar = self.module.apply(ae, to_signed(x), method=Autoencoder.encode)
    if logvar is None:
      z, kl = mean, jnp.zeros(mean.shape[0])
    else:
      z, kl = reparameterize(key, mean, logvar), gaussian_kl(mean, logvar)
    return z, kl, self.module.apply(ae, z, method=Autoencoder.decode)

  def terms(self, params, images, key):
    """Per-image reconstruction loss (nats for the likelihood) and KL (nats), and the decoder
    output, for a batch of uint8 images."""
    x = to_unit(images)
    _, kl, out = self._forward(params, x, key)
    return self.reconstruction_loss(params, x, out), kl, out

  def loss_parts(self, params, model_state, batch, key):
    """-> (generator loss, discriminator loss, metrics, new model_state).

    There is one optimizer over all params, so both players train on the sum of the two losses.
    What keeps them apart is stop_gradient: the generator loss sees the discriminator's params
    through stop_gradient (the autoencoder is trained to fool a fixed discriminator), and the
    discriminator loss sees the reconstructions through stop_gradient (the discriminator learns
    to tell them apart without moving the autoencoder). The two parameter sets are disjoint, so
    the gradient of the sum is the generator's gradient for the autoencoder and the
    discriminator's for the discriminator: the alternating updates of taming/LDM, done at once.
    """
    m = self.config.model
    x = to_unit(batch["image"])
    z, kl, out = self._forward(params, x, key)
    dims = math.prod(x.shape[1:])
    feature_distance = self.feature_distance()

    def rec_fn(o):  # the mean reconstruction terms as a function of the decoder output
      rec = self.reconstruction_loss(params, x, o)
      parts = {"rec": rec}
      if feature_distance is not None:
        parts["perceptual"] = feature_distance(x, self.output_images(o))
        # LDM adds the distance to every pixel's loss before summing over the pixels.
        rec = rec + m.perceptual_weight * dims * parts["perceptual"]
      return rec.mean(), parts

    adaptive = self.disc is not None and m.disc_adaptive
    if adaptive:  # the GAN weight needs this term's gradient at the decoder output
      rec, rec_vjp, parts = jax.vjp(rec_fn, out, has_aux=True)
    else:
      rec, parts = rec_fn(out)
    generator = rec + m.beta * kl.mean()
    metrics = dict(rec=parts["rec"].mean(), kl=kl.mean())
    if m.rec_loss == "likelihood":
      metrics.update(nll=parts["rec"].mean(), neg_elbo_bits_per_dim=(
          (parts["rec"] + kl).mean() / (dims * math.log(2.0))))
    if "perceptual" in parts:
      metrics["perceptual"] = parts["perceptual"].mean()

    step = model_state["step"]
    discriminator = jnp.zeros((), jnp.float32)
    if self.disc is not None:
      # Both GAN terms are off (weight 0) before disc_start, as taming's adopt_weight does.
      on = jnp.where(step >= m.disc_start, 1.0, 0.0)
      to_disc = lambda o: to_signed(self.output_images(o))
      fixed_disc = {"params": jax.lax.stop_gradient(params["disc"])}
      g_fn = lambda o: losses.hinge_g_loss(self.disc.apply(fixed_disc, to_disc(o)))
      g_loss, g_vjp = jax.vjp(g_fn, out)
      weight = jnp.float32(m.disc_weight)
      if adaptive:
        # taming compares the gradients at the decoder's last conv weights; those at the
        # decoder output need no access to the decoder's inside and serve the same end.
        one = jnp.ones((), jnp.float32)
        weight = weight * losses.adaptive_weight(rec_vjp(one), g_vjp(one))
      generator = generator + on * weight * g_loss
      real_fake = jax.lax.stop_gradient(jnp.concatenate([to_signed(x), to_disc(out)]))
      logits_real, logits_fake = jnp.split(
          self.disc.apply({"params": params["disc"]}, real_fake), 2)
      d_loss = losses.hinge_d_loss(logits_real, logits_fake)
      discriminator = on * d_loss
      metrics.update(g_loss=g_loss, d_loss=d_loss, disc_weight=on * weight,
                     logits_real=logits_real.mean(), logits_fake=logits_fake.mean())

    stats = losses.update_latent_stats(model_state["latent_stats"], z, step,
                                       m.latent_stats_momentum)
    metrics.update(latent_mean=stats["mean"], latent_std=jnp.sqrt(stats["var"]))
    return generator, discriminator, metrics, dict(model_state, latent_stats=stats, step=step + 1)

  def loss_fn(self, params, model_state, batch, key):
    generator, discriminator, metrics, model_state = self.loss_parts(params, model_state, batch,
                                                                     key)
    return generator + discriminator, (metrics, model_state)

  @property
  def feature_net_data(self):
    m = self.config.model
    auto = m.perceptual_net == "auto" and m.perceptual_weight > 0
    return self.config.data if auto else None

  # -- pictures ----------------------------------------------------------------------------
  def pictures(self, params, model_state, key):
    n = self.config.train.num_samples
    scale = img.display_scale(self.config.data.image_size)
    ae = self.autoencoder_params(params)
    if self._eval_images is None:
      self._eval_images = heldout_images(self.config.data, 16)
    x = self._eval_images
    out = {"reconstructions": img.rows(x, pipe.reconstruct(self.model, ae, x), scale=scale)}
    if self.config.model.kind == "vae":
      out["prior_samples"] = img.grid(pipe.sample_prior(self.model, ae, key, n), scale=scale)
    return out

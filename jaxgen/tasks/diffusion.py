"""Denoising diffusion in pixel space (DDPM): a U-Net trained on the forward process, optionally
class-conditional with label dropout for classifier-free guidance.
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
from jaxgen.errors import ConfigError
from jaxgen.models.unet import UNet
from jaxgen.pipelines import diffusion as pipe
from jaxgen.tasks.base import Task

log = logging.getLogger(__name__)


def diffusion_section() -> dict:
  """Config of the diffusion process and of sampling; shared with latent diffusion."""
  return dict(
      schedule="linear",          # linear | cosine | scaled_linear
      num_timesteps=1000,
      beta_start=0.0,             # 0: the schedule's default
      beta_end=0.0,
      prediction="eps",           # eps | x0 | v
      weighting="uniform",        # uniform | min_snr
      min_snr_gamma=5.0,
      clip_x0=1.0,                # clip predicted x0 to [-c, c] while sampling; 0: off
      sampler="ddim",             # pictures during training and the default of `jaxgen sample`
      sample_steps=50,
      guidance_scale=3.0,         # classifier-free guidance for conditional pictures
  )


def validate_diffusion(config) -> None:
  d = config.diffusion
  for key, valid in (("schedule", diffusion.SCHEDULES), ("prediction", diffusion.PREDICTIONS),
                     ("weighting", diffusion.WEIGHTINGS), ("sampler", diffusion.SAMPLERS)):
    if d[key] not in valid:
      raise ConfigError(f"diffusion.{key} must be one of {', '.join(valid)}; got {d[key]!r}.")
  if not 1 <= d.sample_steps <= d.num_timesteps:
    raise ConfigError(f"diffusion.sample_steps must be in [1, {d.num_timesteps}] "
                      f"(diffusion.num_timesteps); got {d.sample_steps}.")


def schedule_kwargs(d) -> dict:
  return dict(schedule=d.schedule, num_timesteps=d.num_timesteps,
              beta_start=d.beta_start or None, beta_end=d.beta_end or None,
              prediction=d.prediction, clip_x0=d.clip_x0 or None)


class DiffusionTask(Task):
  name = "ddpm"

  @staticmethod
  def default_config():
    return {
        "model": dict(
            block_channels=(32, 64, 64),
            layers_per_block=1,
            attn_levels=(False, True, False),
            mid_attention=True,
            num_heads=1,
            dropout=0.1,
            groups=8,
            norm_eps=1e-5,
            flip_sin_to_cos=True,
            freq_shift=0.0,
            asymmetric_downsample=False,
            num_classes=0,            # > 0: class-conditional
            class_dropout=0.1,        # share of labels replaced by the null label in training
            random_flip=False,        # horizontal-flip augmentation
            dtype="float32",          # compute dtype: float32 | bfloat16 (params stay float32)
            remat=False,
        ),
        "diffusion": diffusion_section(),
    }

  @staticmethod
  def validate(config):
    m, d = config.model, config.data
    validate_diffusion(config)
    levels = len(m.block_channels)
    if len(m.attn_levels) != levels:
      raise ConfigError(f"model.attn_levels has {len(m.attn_levels)} entries for {levels} levels "
                        "(model.block_channels).")
    f = 2 ** (levels - 1)
    if d.image_size % f:
      raise ConfigError(f"data.image_size={d.image_size} must be divisible by {f} "
                        f"(2 ** (levels - 1) for model.block_channels={tuple(m.block_channels)}).")
    bad = [c for c in m.block_channels if c % m.groups]
    if bad:
      raise ConfigError(f"model.groups={m.groups} must divide every level's channels; {bad} "
                        "are not divisible.")
    if m.dtype not in ("float32", "bfloat16"):
      raise ConfigError(f"model.dtype must be float32 or bfloat16; got {m.dtype!r}.")
    if not 0.0 <= m.class_dropout < 1.0:
      raise ConfigError(f"model.class_dropout must be in [0, 1); got {m.class_dropout}.")

  def __init__(self, config):
    super().__init__(config)
    m, d = config.model, config.data
    self.unet = UNet(out_channels=d.channels, block_channels=tuple(m.block_channels),
                     layers_per_block=m.layers_per_block, attn_levels=tuple(m.attn_levels),
                     mid_attention=m.mid_attention, attention="self", num_heads=m.num_heads,
                     num_classes=m.num_classes, dropout=m.dropout, groups=m.groups,
                     norm_eps=m.norm_eps, flip_sin_to_cos=m.flip_sin_to_cos,
                     freq_shift=m.freq_shift, asymmetric_downsample=m.asymmetric_downsample,
                     dtype=jnp.dtype(m.dtype), remat=m.remat)
    self.model = pipe.DiffusionModel(self.unet, (d.image_size, d.image_size, d.channels),
                                     **schedule_kwargs(config.diffusion))
    self.schedule = self.model.make_schedule()
    self._eval_cache = {}

  # -- training ----------------------------------------------------------------------------
  def init(self, key, batch):
    x = pipe.to_model_space(batch["image"])
    n = x.shape[0]
    labels = jnp.zeros((n,), jnp.int32) if self.model.num_classes else None
    return self.unet.init(key, x, jnp.zeros((n,), jnp.int32), labels=labels), {}

  def loss_fn(self, params, model_state, batch, key):
    m, d = self.config.model, self.config.diffusion
    x0 = pipe.to_model_space(batch["image"])
    k_flip, k_drop, k_loss, k_dropout = jax.random.split(key, 4)
    if m.random_flip:
      flip = jax.random.bernoulli(k_flip, 0.5, (x0.shape[0], 1, 1, 1))
      x0 = jnp.where(flip, x0[:, :, ::-1], x0)
    labels = None
    if m.num_classes:
      labels = batch["label"].astype(jnp.int32)
      drop = jax.random.bernoulli(k_drop, m.class_dropout, labels.shape)
      labels = jnp.where(drop, self.unet.null_label_id, labels)

    def model_fn(x_t, t):
      return self.model.apply(params, x_t, t, labels, train=True, key=k_dropout)

    per_example = diffusion.diffusion_loss(model_fn, self.schedule, x0, k_loss,
                                           prediction=d.prediction, weighting=d.weighting,
                                           gamma=d.min_snr_gamma)
    return per_example.mean(), ({}, model_state)

  # -- pictures ----------------------------------------------------------------------------
  def _grid_labels(self, n: int):
    """n labels cycling through the classes, so a grid shows each class in its own column."""
    k = self.model.num_classes
    return jnp.arange(n, dtype=jnp.int32) % k if k else None

  def pictures(self, params, model_state, key):
    d = self.config.diffusion
    n = self.config.train.num_samples
    labels = self._grid_labels(n)
    guidance = jnp.float32(d.guidance_scale) if labels is not None else None
    x = pipe.generate(self.model, params, key, num=n, labels=labels, guidance_scale=guidance,
                      sampler=d.sampler, num_steps=d.sample_steps)
    ncols = self.model.num_classes or None
    return {"samples": img.grid(x, ncols=ncols, scale=img.display_scale(self.model.image_shape[0]))}

  # -- jaxgen sample -----------------------------------------------------------------------
  @staticmethod
  def add_sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=int, default=64, help="images to draw")
    parser.add_argument("--sampler", choices=diffusion.SAMPLERS, default=None,
                        help="default: the config's diffusion.sampler")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the "
                        "config's diffusion.sample_steps; ddpm usually 1000)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 deterministic)")
    parser.add_argument("--label", type=int, default=None,
                        help="class to draw (class-conditional models); default: every class")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the config's)")
    parser.add_argument("--out", dest="out_file", default=None,
                        help="PNG file for the grid (default OUTDIR/samples_<sampler>.png)")
    parser.add_argument("--trajectory", action="store_true",
                        help="also write the denoising trajectory of the first images")

  def sample(self, params, model_state, args, outdir: pathlib.Path):
    d = self.config.diffusion
    sampler = args.sampler or d.sampler
    steps = args.steps or (d.num_timesteps if sampler == "ddpm" else d.sample_steps)
    labels, guidance = None, None
    if self.model.num_classes:
      labels = (jnp.full((args.num,), args.label, jnp.int32) if args.label is not None
                else self._grid_labels(args.num))
      guidance = jnp.float32(d.guidance_scale if args.guidance is None else args.guidance)
    elif args.label is not None or args.guidance is not None:
      raise ConfigError("This model is unconditional (model.num_classes=0): --label and "
                        "--guidance do not apply.")
    key = jax.random.PRNGKey(args.seed)
    t0 = time.perf_counter()
    out = pipe.generate(self.model, params, key, num=args.num, labels=labels,
                        guidance_scale=guidance, sampler=sampler, num_steps=steps,
                        eta=jnp.float32(args.eta), return_trajectory=args.trajectory)
    x = jax.block_until_ready(out[0] if args.trajectory else out)
    log.info("%d images, %s %d steps: %.1f s (compile included)", args.num, sampler, steps,
             time.perf_counter() - t0)
    scale = img.display_scale(self.model.image_shape[0])
    ncols = self.model.num_classes if (self.model.num_classes and args.label is None) else None
    path = pathlib.Path(args.out_file) if args.out_file else outdir / f"samples_{sampler}.png"
    paths = [img.save_png(img.grid(x, ncols=ncols, scale=scale), path)]
    if args.trajectory:
      traj = out[1]
      picks = np.linspace(0, traj.shape[0] - 1, 10).round().astype(int)
      rows = [pipe.to_images(traj[picks, i]) for i in range(min(4, args.num))]
      paths.append(img.save_png(img.rows(*rows, scale=scale),
                                path.with_name(path.stem + "_trajectory.png")))
    return paths

  # -- jaxgen eval -------------------------------------------------------------------------
  @staticmethod
  def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=int, default=1000, help="samples to score")
    parser.add_argument("--sampler", choices=diffusion.SAMPLERS, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--batch", type=int, default=250, help="images per sampler call")
    parser.add_argument("--feature-net", dest="feature_net", default=None,
                        help="classifier workdir for the features (default: train/cache one)")
    parser.add_argument("--inception", default=None,
                        help="pt_inception-2015-12-05 weights file: also report standard FID")
    parser.add_argument("--baselines", action="store_true",
                        help="also score real held-out images and uniform noise")

  def draw(self, params, key, num: int, *, sampler: str, steps: int, guidance=None,
           batch: int = 250):
    """`num` samples (uint8) and their labels (class-conditional: cycling through classes)."""
    labels_all = self._grid_labels(num)
    out = []
    for i, lo in enumerate(range(0, num, batch)):
      n = min(batch, num - lo)
      labels = None if labels_all is None else labels_all[lo:lo + n]
      g = None if labels is None else jnp.float32(guidance)
      x = pipe.generate(self.model, params, jax.random.fold_in(key, i), num=n, labels=labels,
                        guidance_scale=g, sampler=sampler, num_steps=steps)
      out.append(np.asarray(img.to_uint8(np.asarray(x))))
    return np.concatenate(out), (None if labels_all is None else np.asarray(labels_all))

  def evaluate(self, params, model_state, key, *, num=1000, sampler=None, steps=None,
               guidance=None, batch=250, feature_net=None, inception=None, baselines=False,
               progress=True, **unused):
    from jaxgen.eval import quality
    d = self.config.diffusion
    sampler = sampler or d.sampler
    steps = steps or (d.num_timesteps if sampler == "ddpm" else d.sample_steps)
    guidance = d.guidance_scale if guidance is None else guidance
    net = quality.load_feature_net(self.config.data, feature_net, progress=progress)
    reference = load_all(load_source(self.config.data, self.config.data.eval_split),
                         limit=num)["image"]
    t0 = time.perf_counter()
    samples, labels = self.draw(params, key, num, sampler=sampler, steps=steps,
                                guidance=guidance, batch=batch)
    seconds = time.perf_counter() - t0
    out = dict(sampler=sampler, steps=steps, sampling_seconds=seconds,
               **quality.quality(samples, reference, net, labels=labels))
    if labels is not None:
      out["guidance_scale"] = guidance
    if inception:
      from jaxgen.eval.fid import InceptionFeatures, feature_stats, frechet_distance
      inc = InceptionFeatures.from_file(inception)
      from jaxgen.eval.fid import batched_features
      real_f = batched_features(inc, reference, 100)
      fake_f = batched_features(inc, samples, 100)
      out["inception_fid"] = frechet_distance(*feature_stats(real_f), *feature_stats(fake_f))
    if baselines:
      out["baselines"] = quality.baselines(self.config.data, net, num)
    return out

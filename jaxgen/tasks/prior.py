"""A diffusion prior over image embeddings (RCG, Li et al. 2023): a residual MLP denoises the
frozen image embeddings of an embedding-conditioned pixel diffusion run (`prior.decoder`, e.g.
configs/vary.py), trained through the one loop on the same sampler core and losses. Sampling an
embedding from the prior and decoding it with that run generates images without any condition.

params      {"params": the MLP}
model_state {"stats": {"mean", "std"}}   per-coordinate statistics of the training embeddings:
                                         the prior models standardised embeddings
The embeddings are those the decoder was conditioned on: its frozen tower (the decoder run's
model_state["embedder"]) embeds the training set once (`cached_inputs`).
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import config as config_lib
from jaxgen import diffusion
from jaxgen import images as img
from jaxgen.errors import ConfigError
from jaxgen.models.mlp_denoiser import MLPDenoiser
from jaxgen.pipelines import prior as prior_pipe
from jaxgen.pipelines.diffusion import DiffusionModel
from jaxgen.tasks.base import Task
from jaxgen.tasks.diffusion import (
  DiffusionTask,
  diffusion_section,
  embed_source,
  schedule_kwargs,
  validate_diffusion,
)

# data keys that must equal the decoder's: the prior models the embeddings of the same images
_DATA_KEYS = ("source", "name", "path", "image_size", "channels", "train_split")


def decoder_task(workdir: str, what: str = "prior.decoder") -> DiffusionTask:
  """The DiffusionTask of an embedding-conditioned ddpm run, from its saved config."""
  from jaxgen import weights as weights_lib
  if not (pathlib.Path(workdir) / "config.json").is_file():
    raise ConfigError(f"{what}: no run in {workdir!r} (train an embedding-conditioned ddpm run "
                      "there first, e.g. configs/vary.py).")
  saved = weights_lib.read_config(workdir)
  if saved["task"] != "ddpm" or not saved["model"].get("embedding", {}).get("init"):
    raise ConfigError(f"{what}: {workdir} holds a {saved['task']} run that is not conditioned on "
                      "image embeddings (a ddpm run with model.embedding.init, e.g. "
                      "configs/vary.py).")
  config = config_lib.fill(config_lib.compose("ddpm", DiffusionTask.default_config()), saved)
  return DiffusionTask(config)


class PriorTask(Task):
  name = "prior"

  @staticmethod
  def default_config():
    d = diffusion_section()
    # v-prediction: eps-prediction divides by sqrt(abar), ~0 at the cosine schedule's end, and
    # unlike images embeddings have no range to clip x0 to.
    d.update(schedule="cosine", prediction="v", sample_steps=50, clip_x0=0.0)
    return {
        "model": dict(width=512, depth=6, dropout=0.0),
        "diffusion": d,
        "prior": dict(
            decoder="",            # embedding-conditioned ddpm workdir (e.g. runs/vary)
            decoder_guidance=3.0,  # its classifier-free guidance when decoding samples
            decoder_sampler="",    # "": the decoder run's diffusion.sampler
            decoder_steps=0,       # 0: the decoder run's diffusion.sample_steps
        ),
    }

  @staticmethod
  def validate(config):
    validate_diffusion(config)
    m, p = config.model, config.prior
    if not p.decoder:
      raise ConfigError("prior.decoder must name an embedding-conditioned ddpm workdir (e.g. "
                        "runs/vary from configs/vary.py).")
    if m.width < 1 or m.depth < 1 or not 0.0 <= m.dropout < 1.0:
      raise ConfigError("model.width and model.depth must be >= 1, model.dropout in [0, 1).")
    if p.decoder_steps < 0:
      raise ConfigError(f"prior.decoder_steps must be >= 0; got {p.decoder_steps}.")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.decoder = decoder_task(config.prior.decoder)
    theirs, ours = self.decoder.config.data, config.data
    differ = [k for k in _DATA_KEYS if theirs[k] != ours[k]]
    if differ:
      raise ConfigError(f"prior.decoder was trained on other data: data.{', data.'.join(differ)} "
                        "differ; copy its data section.")
    dim = self.decoder.unet.embedding_dim
    m = config.model
    self.net = MLPDenoiser(dim, m.width, m.depth, m.dropout)
    self.model = DiffusionModel(self.net, (dim,), **schedule_kwargs(config.diffusion))
    self.schedule = self.model.make_schedule()
    self._decoder_weights = None
    self._embeddings = None

  # -- the decoder run and its embeddings ----------------------------------------------------
  def decoder_weights(self):
    """(params, model_state) of the decoder run (its latest checkpoint), loaded once."""
    if self._decoder_weights is None:
      from jaxgen import weights as weights_lib
      w = weights_lib.load_weights(self.config.prior.decoder, expect_task="ddpm",
                                   what="prior.decoder")
      self._decoder_weights = (w.params, w.model_state)
    return self._decoder_weights

  def train_embeddings(self, source=None) -> np.ndarray:
    if self._embeddings is None:
      if source is None:
        from jaxgen.data import load_source
        source = load_source(self.config.data, self.config.data.train_split)
      _, state = self.decoder_weights()
      self._embeddings = embed_source(self.decoder.embedder, state["embedder"], source)
    return self._embeddings

  # -- training ----------------------------------------------------------------------------
  def init(self, key, batch):
    d = self.model.image_shape[-1]
    params = self.net.init(key, jnp.zeros((1, d)), jnp.zeros((1,), jnp.int32))
    stats = {"mean": jnp.zeros((d,), jnp.float32), "std": jnp.ones((d,), jnp.float32)}
    return params, {"stats": stats}

  def pretrained(self, params, model_state):
    """The standardisation statistics of the training embeddings."""
    e = self.train_embeddings()
    stats = {"mean": jnp.asarray(e.mean(0), jnp.float32),
             "std": jnp.asarray(np.maximum(e.std(0), 1e-3), jnp.float32)}
    return params, dict(model_state, stats=stats)

  def cached_inputs(self, state, source):
    return {"embedding": self.train_embeddings(source)}

  def preprocess(self, batch):
    return {k: v for k, v in batch.items() if k in ("embedding", "index")} \
        if "embedding" in batch else batch

  def loss_fn(self, params, model_state, batch, key):
    d = self.config.diffusion
    stats = model_state["stats"]
    x0 = (batch["embedding"] - stats["mean"]) / stats["std"]
    k_loss, k_dropout = jax.random.split(key)

    def model_fn(x_t, t):
      if d.objective == "flow":
        t = jnp.asarray(t, jnp.float32) * d.num_timesteps
      return self.net.apply(params, x_t, t, train=True, rngs={"dropout": k_dropout})

    if d.objective == "flow":
      per_example = diffusion.flow.flow_loss(
          model_fn, x0, k_loss, sampling=d.flow_time, mean=d.flow_logit_mean,
          std=d.flow_logit_std, mode_scale=d.flow_mode_scale, shift=d.flow_shift)
    else:
      per_example = diffusion.diffusion_loss(model_fn, self.schedule, x0, k_loss,
                                             prediction=d.prediction, weighting=d.weighting,
                                             gamma=d.min_snr_gamma)
    return per_example.mean(), ({}, model_state)

  # -- pictures ----------------------------------------------------------------------------
  def generate(self, params, model_state, key, num: int, *, steps=None, guidance=None,
               decoder_steps=None, batch: int = 250) -> np.ndarray:
    """`num` unconditional images [num, H, W, C] in [0, 1]: prior samples, decoded."""
    d, p = self.config.diffusion, self.config.prior
    dec = self.decoder.config.diffusion
    dec_params, _ = self.decoder_weights()
    return prior_pipe.generate(
        self.model, params, model_state, self.decoder.model, dec_params, key, num=num,
        decoder_guidance=p.decoder_guidance if guidance is None else guidance,
        prior_sampler=d.sampler, prior_steps=steps or d.sample_steps,
        decoder_sampler=p.decoder_sampler or dec.sampler,
        decoder_steps=decoder_steps or p.decoder_steps or dec.sample_steps, batch=batch)

  def pictures(self, params, model_state, key):
    x = self.generate(params, model_state, key, self.config.train.num_samples)
    return {"samples": img.grid(x, scale=img.display_scale(self.config.data.image_size))}

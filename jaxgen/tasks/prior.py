"""A diffusion prior over image embeddings (RCG, Li et al. 2023): a residual MLP denoises the
frozen image embeddings of an embedding-conditioned pixel diffusion run (`prior.decoder`, e.g.
configs/vary.py), trained through the one loop on the same sampler core and losses. Sampling an
embedding from the prior and decoding it with that run generates images without any condition.

With `prior.text` (a clip run) the prior is conditioned on the CLIP text embedding of each
image's caption (dropped to zeros with probability model.cond_dropout, for guidance): text ->
image embedding -> decoder is unCLIP (Ramesh et al. 2022) through the shared space.

params      {"params": the MLP}
model_state {"stats": {"mean", "std"}}   per-coordinate statistics of the training embeddings:
                                         the prior models standardised embeddings
The embeddings are those the decoder was conditioned on: its frozen tower (the decoder run's
model_state["embedder"]) embeds the training set once (`cached_inputs`), and so does the clip
run's text tower the training captions (unit norm x sqrt(D), like the image embeddings).
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import config as config_lib
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
  objective_loss,
  schedule_kwargs,
  validate_diffusion,
)

# data keys that must equal the decoder's: the prior models the embeddings of the same images
_DATA_KEYS = ("source", "name", "path", "image_size", "channels", "train_split")


def decoder_task(workdir: str, what: str = "prior.decoder") -> DiffusionTask:
  """The DiffusionTask of an embedding-conditioned ddpm run, from its saved config."""
  from jaxgen import weights as weights_lib
  if not (pathlib.Path(workdir) / "config.json").is_file():
    raise ConfigError(f"{what}: no run in {workdir!r} (from {str(pathlib.Path.cwd())!r}; train an "
                      "embedding-conditioned ddpm run there first, e.g. configs/vary.py).")
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
        "model": dict(width=512, depth=6, dropout=0.0,
                      cond_dropout=0.1),  # with prior.text: captions dropped for guidance
        "diffusion": d,
        "prior": dict(
            decoder="",            # embedding-conditioned ddpm workdir (e.g. runs/vary)
            text="",               # clip workdir: condition on its text embeddings of the
                                   # captions (unCLIP); "": unconditional (RCG)
            guidance=3.0,          # with text: the prior's classifier-free guidance
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
    if not 0.0 <= m.cond_dropout < 1.0:
      raise ConfigError(f"model.cond_dropout must be in [0, 1); got {m.cond_dropout}.")
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
    self.text_dim = 0
    if config.prior.text:
      from jaxgen import weights as weights_lib
      saved = weights_lib.read_config(config.prior.text)
      if saved["task"] != "clip":
        raise ConfigError(f"prior.text: {config.prior.text} holds a {saved['task']} run, not a "
                          "clip run.")
      self.text_dim = saved["model"]["embed_dim"]
    self.net = MLPDenoiser(dim, m.width, m.depth, m.dropout, cond_dim=self.text_dim)
    self.model = DiffusionModel(self.net, (dim,), **schedule_kwargs(config.diffusion))
    self.schedule = self.model.make_schedule()
    self._decoder_weights = None
    self._embeddings = None
    self._text_embeddings = None

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

  def embed_texts(self, texts) -> np.ndarray:
    """The clip run's text embeddings [N, D] of `texts`, unit norm x sqrt(D)."""
    from jaxgen.pipelines import clip as clip_pipe
    model, params, _ = clip_pipe.load_dual_encoder(str(self.config.prior.text), "prior.text")
    out = [clip_pipe.embed_texts(model, params, list(texts[i:i + 512]))
           for i in range(0, len(texts), 512)]
    return np.concatenate(out) * np.sqrt(self.text_dim)

  def train_text_embeddings(self, source=None) -> np.ndarray:
    if self._text_embeddings is None:
      from jaxgen.data import load_all, load_source
      from jaxgen.data.captions import captions_of
      if source is None:
        source = load_source(self.config.data, self.config.data.train_split)
      captions = captions_of(load_all(source), source.class_names, "a photo of a {}")
      self._text_embeddings = self.embed_texts([str(c) for c in captions])
    return self._text_embeddings

  # -- training ----------------------------------------------------------------------------
  def init(self, key, batch):
    d = self.model.image_shape[-1]
    cond = jnp.zeros((1, self.text_dim)) if self.text_dim else None
    params = self.net.init(key, jnp.zeros((1, d)), jnp.zeros((1,), jnp.int32), cond=cond)
    stats = {"mean": jnp.zeros((d,), jnp.float32), "std": jnp.ones((d,), jnp.float32)}
    return params, {"stats": stats}

  def pretrained(self, params, model_state):
    """The standardisation statistics of the training embeddings."""
    e = self.train_embeddings()
    stats = {"mean": jnp.asarray(e.mean(0), jnp.float32),
             "std": jnp.asarray(np.maximum(e.std(0), 1e-3), jnp.float32)}
    return params, dict(model_state, stats=stats)

  def cached_inputs(self, state, source):
    out = {"embedding": self.train_embeddings(source)}
    if self.text_dim:
      out["cond"] = self.train_text_embeddings(source)
    return out

  def preprocess(self, batch):
    return {k: v for k, v in batch.items() if k in ("embedding", "cond", "index")} \
        if "embedding" in batch else batch

  def loss_fn(self, params, model_state, batch, key):
    d = self.config.diffusion
    stats = model_state["stats"]
    x0 = (batch["embedding"] - stats["mean"]) / stats["std"]
    k_loss, k_dropout, k_drop = jax.random.split(key, 3)
    cond = None
    if self.text_dim:
      drop = jax.random.bernoulli(k_drop, self.config.model.cond_dropout, (x0.shape[0], 1))
      cond = jnp.where(drop, 0.0, batch["cond"])

    def model_fn(x_t, t):
      if d.objective == "flow":
        t = jnp.asarray(t, jnp.float32) * d.num_timesteps
      return self.net.apply(params, x_t, t, cond=cond, train=True, rngs={"dropout": k_dropout})

    per_example = objective_loss(model_fn, self.schedule, x0, k_loss, d)
    return per_example.mean(), ({}, model_state)

  # -- pictures ----------------------------------------------------------------------------
  def generate(self, params, model_state, key, num: int, *, steps=None, guidance=None,
               decoder_steps=None, batch: int = 250, prompts=None,
               prior_guidance=None) -> np.ndarray:
    """`num` images [num, H, W, C] in [0, 1]: prior samples, decoded (guidance: the decoder's).
    A text prior draws them for `prompts` (one per image; None: unconditional, the zero
    condition) with the prior's guidance (default prior.guidance)."""
    d, p = self.config.diffusion, self.config.prior
    dec = self.decoder.config.diffusion
    dec_params, _ = self.decoder_weights()
    cond = g_prior = None
    if prompts is not None:
      if not self.text_dim:
        raise ConfigError("This prior is unconditional (prior.text is empty): it takes no "
                          "prompts.")
      if len(prompts) != num:
        raise ConfigError(f"{len(prompts)} prompts for {num} images.")
      cond = self.embed_texts(list(prompts))
      g_prior = p.guidance if prior_guidance is None else prior_guidance
    elif self.text_dim:
      cond = np.zeros((num, self.text_dim), np.float32)
    return prior_pipe.generate(
        self.model, params, model_state, self.decoder.model, dec_params, key, num=num,
        cond=cond, prior_guidance=g_prior,
        decoder_guidance=p.decoder_guidance if guidance is None else guidance,
        prior_sampler=d.sampler, prior_steps=steps or d.sample_steps,
        decoder_sampler=p.decoder_sampler or dec.sampler,
        decoder_steps=decoder_steps or p.decoder_steps or dec.sample_steps, batch=batch)

  def prompts(self, split: str, n: int) -> list[str]:
    """The first n captions of a split (held-out prompts for pictures and evaluation)."""
    from jaxgen.data import load_all, load_source
    from jaxgen.data.captions import captions_of
    src = load_source(self.config.data, split)
    data = load_all(src, limit=n)
    return [str(c) for c in captions_of(data, src.class_names, "a photo of a {}")]

  def pictures(self, params, model_state, key):
    n = self.config.train.num_samples
    scale = img.display_scale(self.config.data.image_size)
    if not self.text_dim:
      return {"samples": img.grid(self.generate(params, model_state, key, n), scale=scale)}
    prompts = self.prompts(self.config.data.eval_split, max(n // 4, 1))
    x = self.generate(params, model_state, key, 4 * len(prompts),
                      prompts=[q for q in prompts for _ in range(4)])
    return {"text_to_image": img.labelled_grid(x, prompts, scale=scale)}

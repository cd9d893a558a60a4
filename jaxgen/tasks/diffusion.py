"""Denoising diffusion in pixel space (DDPM): a U-Net trained on the forward process, optionally
class-conditional with label dropout for classifier-free guidance, or conditioned on the frozen
image embedding of a SimCLR or CLIP run (`model.embedding`: image variations), with embedding
dropout for guidance.

An embedding-conditioned run keeps the frozen embedder in model_state["embedder"] (loaded from
model.embedding.init when the run starts), so it samples without the source run. Embeddings are
computed from the images by that tower, on the device: once for the training set when
model.embedding.cache (the loader joins them to each batch by index), else in every step.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import diffusion
from jaxgen import images as img
from jaxgen.errors import ConfigError
from jaxgen.images import to_signed
from jaxgen.models import build
from jaxgen.models.unet import UNet
from jaxgen.pipelines import diffusion as pipe
from jaxgen.tasks.base import Task, zeros_like

# Keys of the model section that shape training only; every other key is a UNet field.
TRAINING_KEYS = ("class_dropout", "random_flip", "embedding")
# UNet fields a pixel-space DDPM does not set from its config: the data fixes out_channels, and
# it has no text to attend to; the embedder fixes embedding_dim.
_NOT_CONFIGURED = ("out_channels", "attention", "context_dim", "use_linear_projection",
                   "transformer_depth", "embedding_dim")
# The tasks whose runs can give the embedding, and their image towers' names in the params.
EMBEDDING_TASKS = ("simclr", "clip")


def embedding_section(**overrides) -> dict:
  """model.embedding: the frozen image tower whose embeddings condition the generator."""
  d = dict(
      init="",                    # simclr or clip workdir whose image tower gives the
                                  # embeddings ("": none); its model.encoder must equal `encoder`
      encoder=build.image_encoder_section(),
      projection=0,               # clip runs: their embed_dim (the image projection); simclr: 0
      image_size=0,               # the tower's input size (its run's data.image_size); 0: ours
      dropout=0.1,                # share of embeddings replaced by zeros (guidance) in training
      cache=True,                 # embed the training set once instead of in every step
  )
  d.update(overrides)
  return d


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
      use_clipped_model_output=True,  # with clip_x0: eps re-derived from the clipped x0
      set_alpha_to_one=True,      # False: DDIM's last step ends at abar[0], as diffusers' DDIM
                                  # with set_alpha_to_one=False (Stable Diffusion's configs)
      threshold=0.0,              # dynamic thresholding's quantile of |x0| (e.g. 0.995); 0: off
      sample_max_value=1.0,       # dynamic thresholding's largest scale
      karras=False,               # Karras et al.'s sigmas for the euler and dpmpp_2m samplers
      final_sigmas="zero",        # euler/euler_a/dpmpp_2m's last level: zero | sigma_min
      sampler="ddim",             # ddpm | ddim | plms | euler | euler_a | dpmpp_2m (flow models:
                                  # euler | heun): pictures during training and the default of
                                  # `jaxgen sample`
      sample_steps=50,
      guidance_scale=3.0,         # classifier-free guidance for conditional pictures
      objective="diffusion",      # diffusion (the noise schedule and prediction above) | flow
                                  # (rectified flow: velocity target, ODE sampling)
      flow_time="logit_normal",   # flow training times: uniform | logit_normal | mode
      flow_logit_mean=0.0,
      flow_logit_std=1.0,
      flow_mode_scale=1.29,
      flow_shift=1.0,             # SD3's time shift, in training and sampling (> 1: more noise;
                                  # jaxgen.diffusion.resolution_shift gives sqrt(m / n))
  )


OBJECTIVES = ("diffusion", "flow")


def validate_diffusion(config) -> None:
  d = config.diffusion
  if d.objective not in OBJECTIVES:
    raise ConfigError(f"diffusion.objective must be one of {', '.join(OBJECTIVES)}; got "
                      f"{d.objective!r}.")
  flow = d.objective == "flow"
  samplers = diffusion.FLOW_SAMPLERS if flow else diffusion.SAMPLERS
  if flow and d.sampler not in samplers:
    raise ConfigError(f"diffusion.objective=flow samples with {' or '.join(samplers)}; got "
                      f"diffusion.sampler={d.sampler!r}.")
  if d.flow_time not in diffusion.flow.TIME_SAMPLINGS:
    raise ConfigError(f"diffusion.flow_time must be one of "
                      f"{', '.join(diffusion.flow.TIME_SAMPLINGS)}; got {d.flow_time!r}.")
  if d.flow_shift <= 0 or d.flow_logit_std <= 0:
    raise ConfigError("diffusion.flow_shift and diffusion.flow_logit_std must be positive.")
  for key, valid in (("schedule", diffusion.SCHEDULES), ("prediction", diffusion.PREDICTIONS),
                     ("weighting", diffusion.WEIGHTINGS), ("sampler", samplers)):
    if d[key] not in valid:
      raise ConfigError(f"diffusion.{key} must be one of {', '.join(valid)}; got {d[key]!r}.")
  if d.final_sigmas not in ("zero", "sigma_min"):
    raise ConfigError(f"diffusion.final_sigmas must be zero or sigma_min; got "
                      f"{d.final_sigmas!r}.")
  if not 0.0 <= d.threshold < 1.0:
    raise ConfigError(f"diffusion.threshold is a quantile in (0, 1), or 0 for off; got "
                      f"{d.threshold}.")
  if d.threshold and d.clip_x0:
    raise ConfigError("diffusion.threshold and diffusion.clip_x0 are alternatives: set one of "
                      "them to 0.")
  if d.sample_max_value < 1.0:
    raise ConfigError(f"diffusion.sample_max_value must be >= 1; got {d.sample_max_value}.")
  if not 1 <= d.sample_steps <= d.num_timesteps:
    raise ConfigError(f"diffusion.sample_steps must be in [1, {d.num_timesteps}] "
                      f"(diffusion.num_timesteps); got {d.sample_steps}.")


def objective_loss(model_fn, schedule, x0, key, d):
  """Per-example loss [B] of model_fn(x_t, t) on clean x0 for a diffusion section `d`: the
  rectified-flow velocity loss (objective=flow; t in [0, 1]) or the noise-schedule loss."""
  if d.objective == "flow":
    return diffusion.flow.flow_loss(model_fn, x0, key, sampling=d.flow_time,
                                    mean=d.flow_logit_mean, std=d.flow_logit_std,
                                    mode_scale=d.flow_mode_scale, shift=d.flow_shift)
  return diffusion.diffusion_loss(model_fn, schedule, x0, key, prediction=d.prediction,
                                  weighting=d.weighting, gamma=d.min_snr_gamma)


def schedule_kwargs(d) -> dict:
  """The DiffusionModel and LatentDiffusionModel fields of a diffusion section."""
  return dict(schedule=d.schedule, num_timesteps=d.num_timesteps,
              beta_start=d.beta_start or None, beta_end=d.beta_end or None,
              prediction=d.prediction, clip_x0=d.clip_x0 or None,
              set_alpha_to_one=d.set_alpha_to_one,
              use_clipped_model_output=d.use_clipped_model_output,
              threshold=d.threshold or None, sample_max_value=d.sample_max_value,
              karras=d.karras, final_sigmas=d.final_sigmas, objective=d.objective,
              flow_shift=d.flow_shift)


def embedding_of_run(workdir: str, **overrides) -> dict:
  """model.embedding for the image tower of the simclr or clip run in `workdir`, its encoder
  section, projection and image size read from the run's config.json (a run not yet trained:
  SimCLR's default encoder, checked against the run when training starts)."""
  from jaxgen import weights as weights_lib
  d = embedding_section(init=str(workdir), **overrides)
  if (pathlib.Path(workdir) / "config.json").is_file():
    c = weights_lib.read_config(workdir)
    if c["task"] not in EMBEDDING_TASKS:
      raise ConfigError(f"{workdir} holds a {c['task']} run; the embedding comes from a "
                        f"{' or '.join(EMBEDDING_TASKS)} run.")
    d.update(encoder=build.image_encoder_section(**c["model"]["encoder"]),
             projection=c["model"]["embed_dim"] if c["task"] == "clip" else 0,
             image_size=c["data"]["image_size"])
  return d


class DiffusionTask(Task):
  name = "ddpm"

  @staticmethod
  def default_config():
    return {
        "model": build.section(
            UNet, exclude=_NOT_CONFIGURED, block_channels=(32, 64, 64), layers_per_block=1,
            attn_levels=(False, True, False), mid_attention=True, num_heads=1, dropout=0.1,
            groups=8,
            class_dropout=0.1,        # share of labels replaced by the null label in training
            random_flip=False,        # horizontal-flip augmentation
            embedding=embedding_section()),
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
    e = m.embedding
    if e.init:
      if m.num_classes:
        raise ConfigError("model.embedding (image-embedding conditioning) and model.num_classes "
                          "(class labels) are alternatives: set num_classes=0.")
      build.validate_image_encoder(e.encoder, e.image_size or d.image_size,
                                   "model.embedding.encoder")
      if not 0.0 <= e.dropout < 1.0:
        raise ConfigError(f"model.embedding.dropout must be in [0, 1); got {e.dropout}.")
      if e.projection < 0 or e.image_size < 0:
        raise ConfigError("model.embedding.projection and model.embedding.image_size must be "
                          ">= 0.")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    d = config.data
    self.embedder = embedder_module(config)
    self.unet = self.build_network(config)
    if self.embedder is not None:
      self.unet = self.unet.clone(embedding_dim=self.embedding_dim())
    self.model = pipe.DiffusionModel(self.unet, (d.image_size, d.image_size, d.channels),
                                     embedder=self.embedder, **schedule_kwargs(config.diffusion))
    self.schedule = self.model.make_schedule()

  @staticmethod
  def build_network(config):
    """The denoising network of the config's model section (a U-Net here; DiT in tasks.dit)."""
    return build.build(UNet, config.model, skip=TRAINING_KEYS, out_channels=config.data.channels,
                       attention="self")

  def embedding_dim(self) -> int:
    d = self.config.data
    x = jax.ShapeDtypeStruct((1, d.image_size, d.image_size, d.channels), jnp.float32)
    out = jax.eval_shape(lambda v: self.embedder.init_with_output(jax.random.PRNGKey(0), v)[0],
                         x)
    return out.shape[-1]

  def pretrained(self, params, model_state):
    """Loads the frozen image tower of model.embedding.init (a simclr or clip run)."""
    if self.embedder is None:
      return params, model_state
    from jaxgen import weights as weights_lib
    e = self.config.model.embedding
    what = "model.embedding.init"
    enc, enc_state = weights_lib.image_encoder_of(e.init, e.encoder, what, tasks=EMBEDDING_TASKS)
    source = weights_lib.read_config(e.init)
    size = source["data"]["image_size"]
    if size != (e.image_size or self.config.data.image_size):
      raise ConfigError(f"{what}: the {source['task']} run's images are {size}x{size}; set "
                        f"model.embedding.image_size={size}.")
    if source["data"]["channels"] != self.config.data.channels:
      raise ConfigError(f"{what}: the {source['task']} run's images have "
                        f"{source['data']['channels']} channels, this data "
                        f"{self.config.data.channels}.")
    variables = {"params": {"encoder": enc}}
    for col, tree in enc_state.items():
      variables[col] = {"encoder": tree}
    if source["task"] == "clip":
      dim = source["model"]["embed_dim"]
      if e.projection != dim:
        raise ConfigError(f"{what}: a clip run's embeddings are its image projection: set "
                          f"model.embedding.projection={dim} (its model.embed_dim).")
      w = weights_lib.load_weights(e.init, what=what)
      variables["params"]["image_proj"] = w.params["params"]["image_proj"]
    elif e.projection:
      raise ConfigError(f"{what}: a simclr run's embeddings are its encoder's features: set "
                        "model.embedding.projection=0.")
    return params, dict(model_state, embedder=variables)

  def zeros_for_pretrained(self, params, model_state):
    if self.embedder is None:
      return params, model_state
    return params, dict(model_state, embedder=zeros_like(model_state["embedder"]))

  def cached_inputs(self, state, source):
    """With model.embedding.cache: the training set embedded once by the frozen tower, which
    the loader joins to each batch by index."""
    if self.embedder is None or not self.config.model.embedding.cache:
      return None
    return {"embedding": embed_source(self.embedder, state.model_state["embedder"], source)}

  # -- training ----------------------------------------------------------------------------
  def init(self, key, batch):
    x = to_signed(batch["image"])
    n = x.shape[0]
    labels = jnp.zeros((n,), jnp.int32) if self.model.num_classes else None
    if self.embedder is None:
      return self.unet.init(key, x, jnp.zeros((n,), jnp.int32), labels=labels), {}
    k_unet, k_emb = jax.random.split(key)
    emb_vars = self.embedder.init(k_emb, x)  # replaced by the source run's in `pretrained`
    params = self.unet.init(k_unet, x, jnp.zeros((n,), jnp.int32),
                            embedding=jnp.zeros((n, self.unet.embedding_dim)))
    return params, {"embedder": emb_vars}

  def loss_fn(self, params, model_state, batch, key):
    m, d = self.config.model, self.config.diffusion
    x0 = to_signed(batch["image"])
    k_flip, k_drop, k_loss, k_dropout = jax.random.split(key, 4)
    if m.random_flip:
      flip = jax.random.bernoulli(k_flip, 0.5, (x0.shape[0], 1, 1, 1))
      x0 = jnp.where(flip, x0[:, :, ::-1], x0)
    labels = None
    if m.num_classes:
      labels = batch["label"].astype(jnp.int32)
      drop = jax.random.bernoulli(k_drop, m.class_dropout, labels.shape)
      labels = jnp.where(drop, self.unet.null_label_id, labels)

    embeddings = None
    if self.embedder is not None:
      if "embedding" in batch:
        embeddings = batch["embedding"]
      else:
        embeddings = self.embedder.apply(model_state["embedder"], to_signed(batch["image"]))
      embeddings = jax.lax.stop_gradient(embeddings)
      drop = jax.random.bernoulli(k_drop, m.embedding.dropout, (embeddings.shape[0], 1))
      embeddings = jnp.where(drop, 0.0, embeddings)

    def model_fn(x_t, t):
      return self.model.apply(params, x_t, t, labels, train=True, key=k_dropout,
                              embeddings=embeddings)

    per_example = objective_loss(model_fn, self.schedule, x0, k_loss, d)
    return per_example.mean(), ({}, model_state)

  # -- pictures ----------------------------------------------------------------------------
  def pictures(self, params, model_state, key):
    d = self.config.diffusion
    n = self.config.train.num_samples
    if self.embedder is not None:
      return {"variations": self.variation_grid(params, model_state, key, rows=8, num=n // 8)}
    labels = pipe.grid_labels(self.model, n)
    guidance = jnp.float32(d.guidance_scale) if labels is not None else None
    x = pipe.generate(self.model, params, key, num=n, labels=labels, guidance_scale=guidance,
                      sampler=d.sampler, num_steps=d.sample_steps)
    ncols = self.model.num_classes or None
    return {"samples": img.grid(x, ncols=ncols, scale=img.display_scale(self.model.image_shape[0]))}

  def variation_grid(self, params, model_state, key, *, rows: int = 8, num: int = 8,
                     images=None, guidance=None, steps=None, sampler=None) -> np.ndarray:
    """A picture: each row a source image (the eval split's first `rows`, or `images`), a gap,
    and `num` variations of it."""
    d = self.config.diffusion
    if images is None:
      from jaxgen.data import load_all, load_source
      images = load_all(load_source(self.config.data, self.config.data.eval_split),
                        limit=rows)["image"]
    x = pipe.vary(self.model, params, model_state, key, images, num=max(num, 1),
                  guidance_scale=d.guidance_scale if guidance is None else guidance,
                  sampler=sampler or d.sampler, num_steps=steps or d.sample_steps)
    src = img.to_unit(np.asarray(images))[:, None]
    blank = np.ones_like(src)
    cells = np.concatenate([src, blank, x], axis=1)
    return img.grid(cells.reshape(-1, *cells.shape[2:]), ncols=cells.shape[1],
                    scale=img.display_scale(self.model.image_shape[0]))


def embed_source(embedder, variables, source) -> np.ndarray:
  """The frozen embedder's embeddings [N, D] of every image of a data source, batch by batch (a
  TFDS set need not fit in memory; its embeddings do)."""
  from jaxgen.images import map_batches
  enc = jax.jit(lambda images: {"e": embedder.apply(variables, to_signed(images))})
  return map_batches(lambda b, _: enc(source.get(b["index"])["image"]),
                     {"index": np.arange(len(source))}, min(256, len(source)))["e"]


def embedder_module(config):
  """The frozen image embedder of a diffusion config's model.embedding (None without init)."""
  m = config.model
  e = m.get("embedding")
  if e is None or not e.init:
    return None
  from jaxgen.models.embedder import ImageEmbedder
  return ImageEmbedder(build.image_encoder(e.encoder), e.image_size or config.data.image_size,
                       e.projection)

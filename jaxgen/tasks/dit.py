"""Diffusion Transformers in pixel space: the DDPM task with a DiT as the denoising network,
trained with flow matching by default (diffusion.objective=flow) or the diffusion objective.

Everything but the network is the ddpm task's: the diffusion section, the loss, label dropout
for classifier-free guidance, the pictures, `jaxgen sample` and `jaxgen eval`.
"""
from __future__ import annotations

from jaxgen.errors import ConfigError
from jaxgen.models import build
from jaxgen.models.dit import SIZES, DiT
from jaxgen.tasks.diffusion import (
  TRAINING_KEYS,
  DiffusionTask,
  diffusion_section,
  validate_diffusion,
)

# DiT fields a pixel-space DiT does not set from its config: the data fixes out_channels; text
# conditioning belongs to latent text-to-image.
_NOT_CONFIGURED = ("out_channels", "context_dim", "text_mode")


class DiTTask(DiffusionTask):
  name = "dit"

  @staticmethod
  def default_config():
    d = diffusion_section()
    d.update(objective="flow", sampler="euler", flow_time="logit_normal")
    return {
        "model": build.section(
            DiT, exclude=_NOT_CONFIGURED, patch_size=2, depth=6, hidden_size=192, heads=3,
            class_dropout=0.1,        # share of labels replaced by the null label in training
            random_flip=False),
        "diffusion": d,
    }

  @staticmethod
  def validate(config):
    m, d = config.model, config.data
    validate_diffusion(config)
    if m.size and m.size not in SIZES:
      raise ConfigError(f"model.size must be one of {', '.join(SIZES)} or '' (then model.depth, "
                        f"model.hidden_size and model.heads); got {m.size!r}.")
    depth, width, heads = SIZES[m.size] if m.size else (m.depth, m.hidden_size, m.heads)
    if width % heads or width % 4:
      raise ConfigError(f"the DiT width {width} must be divisible by the heads ({heads}) and by "
                        "4 (the 2D position table).")
    if d.image_size % m.patch_size:
      raise ConfigError(f"data.image_size={d.image_size} must be divisible by "
                        f"model.patch_size={m.patch_size}.")
    if m.dtype not in ("float32", "bfloat16"):
      raise ConfigError(f"model.dtype must be float32 or bfloat16; got {m.dtype!r}.")
    if not 0.0 <= m.class_dropout < 1.0:
      raise ConfigError(f"model.class_dropout must be in [0, 1); got {m.class_dropout}.")

  @staticmethod
  def build_network(config):
    return build.build(DiT, config.model, skip=TRAINING_KEYS, out_channels=config.data.channels)

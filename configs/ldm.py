"""Latent text-to-image diffusion on the procedural captioned shapes (32x32 RGB -> 8x8x4
latents): a cross-attention U-Net on the latents of configs/ldm_autoencoder.py, conditioned on
the frozen text tower of configs/clip.py. Train those two first:

  jaxgen train --config configs/ldm_autoencoder.py --workdir runs/ldm_autoencoder
  jaxgen train --config configs/clip.py --workdir runs/clip
  jaxgen train --config configs/ldm.py --workdir runs/ldm
  jaxgen generate --workdir runs/ldm --prompt "a large red circle left of a small blue square"

The U-Net is trained with rectified flow at uniformly drawn times (Euler sampler), and its
transformer blocks add a fixed 2D position embedding to their positions: with eps-prediction the
layout, decided at high noise, weighs little in the loss. On the plain causal CLIP tower the
prompt's spatial relation was drawn at chance whatever the objective; on the NegCLIP
bidirectional tower of configs/clip.py, flow at uniform times gets it right in 90% of held-out
prompts, and with the position embedding (the cross-attention queries then know where they
are) in 97% (README, "Prompt following").

Arguments: smoke; ae=WORKDIR and clip=WORKDIR (other runs than runs/...); scratch (train the text
tower with the U-Net instead of loading and freezing the clip run's); causal (a causal text tower,
CLIP's, as clip runs trained with configs/clip.py:causal have; the default tower attends both
ways, as configs/clip.py's does); eps (the earlier recipe: eps-prediction, DDIM, no position
embedding).
"""
import pathlib

from jaxgen import app

HERE = pathlib.Path(__file__).resolve().parent


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "ae", "clip", "scratch", "causal", "eps"])
  smoke = ":smoke" if flags.get("smoke") else ""
  c = app.base_config("ldm")
  c.data.update(source="embedded", name="shapes", image_size=32, channels=3, batch_size=64)
  # The autoencoder's and the text tower's architecture come from their own configs.
  c.model.vae.update(app.load_config(f"{HERE / 'ldm_autoencoder.py'}{smoke}").model.to_dict())
  clip = app.load_config(f"{HERE / 'clip.py'}{smoke}")
  c.model.text.update(clip.model.text.to_dict())
  c.model.text.update(init=str(flags.get("clip", "runs/clip")), freeze=True)
  c.ldm.update(autoencoder=str(flags.get("ae", "runs/ldm_autoencoder")), cache_latents=True)
  c.ldm.judge = c.model.text.init
  if flags.get("scratch"):
    c.model.text.update(init="", freeze=False)
  if flags.get("causal"):
    c.model.text.causal = True
  c.model.unet.update(block_channels=(64, 128), layers_per_block=1, attn_levels=(True, True),
                      num_heads=4, groups=16, position_embedding=True)
  c.model.prompt_dropout = 0.1
  c.diffusion.update(schedule="scaled_linear", num_timesteps=1000, prediction="eps",
                     clip_x0=0.0, objective="flow", flow_time="uniform", sampler="euler",
                     sample_steps=50, guidance_scale=4.0)
  if flags.get("eps"):
    c.model.unet.position_embedding = False
    c.diffusion.update(objective="diffusion", sampler="ddim")
  c.optim.update(lr=1e-3, warmup_steps=200, weight_decay=0.0, ema_decay=0.995, grad_clip=1.0)
  c.train.update(num_steps=3000, log_every=50, sample_every=1000, ckpt_every=500)
  if flags.get("smoke"):
    c.model.unet.update(block_channels=(8, 16), attn_levels=(False, True), num_heads=2, groups=4)
    c.data.batch_size = 8
    c.diffusion.update(num_timesteps=100, sample_steps=3)
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2)
  return c

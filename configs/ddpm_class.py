"""Class-conditional DDPM with classifier-free guidance on the embedded Fashion-MNIST, 16x16.

jaxgen train --config configs/ddpm_class.py --workdir runs/ddpm_class
jaxgen sample --workdir runs/ddpm_class --label 7 --guidance 3      (sneakers)
Arguments: smoke; size=N (16 or 28).
"""
from jaxgen import app


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "size"])
  c = app.base_config("ddpm")
  c.data.image_size = int(flags.get("size", 16))
  c.data.channels, c.data.batch_size = 1, 64
  c.model.update(block_channels=(16, 32, 64), layers_per_block=1, attn_levels=(False, True, False),
                 mid_attention=True, dropout=0.1, groups=8, num_classes=10, class_dropout=0.1)
  c.diffusion.update(schedule="linear", num_timesteps=1000, prediction="eps", sampler="ddim",
                     sample_steps=50, guidance_scale=3.0)
  c.optim.update(lr=2e-3, warmup_steps=200, weight_decay=0.0, ema_decay=0.995, grad_clip=1.0)
  c.train.update(num_steps=2500, log_every=50, sample_every=500, ckpt_every=500, num_samples=80)
  if flags.get("smoke"):
    c.model.update(block_channels=(8, 16), attn_levels=(False, True), groups=4)
    c.data.batch_size = 8
    c.diffusion.update(num_timesteps=100, sample_steps=5)
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2, num_samples=10)
  return c

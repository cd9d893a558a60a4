"""VAE with spatial latents [7, 7, 4] (the layout latent diffusion uses) on the embedded data.

jaxgen train --config configs/vae_spatial.py --workdir runs/vae_spatial
Arguments: smoke, gaussian (Gaussian likelihood with a learned scale), beta=B (KL weight).
"""
from jaxgen import app


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "gaussian", "beta"])
  c = app.base_config("vae")
  c.data.image_size, c.data.channels, c.data.batch_size = 28, 1, 64
  c.model.update(kind="vae", likelihood="bernoulli", ch=16, ch_mult=(1, 2, 2), latent_dim=0,
                 z_channels=4, groups=8, mid_attention=True)
  c.optim.update(lr=2e-3, warmup_steps=100, ema_decay=0.99)
  c.train.update(num_steps=700, log_every=50, sample_every=350, ckpt_every=350)
  if flags.get("gaussian"):
    c.model.likelihood = "gaussian"
  if "beta" in flags:
    c.model.beta = float(flags["beta"])
  if flags.get("smoke"):
    c.model.update(ch=8, ch_mult=(1, 2), z_channels=2, groups=4)
    c.data.batch_size = 8
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2, num_samples=4)
  return c

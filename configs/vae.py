"""Gaussian VAE with 32-d vector latents on the embedded Fashion-MNIST, Bernoulli likelihood.

jaxgen train --config configs/vae.py --workdir runs/vae          (about 4 min on 2 CPU cores)
Arguments: smoke (a few steps of a tiny model), gaussian (Gaussian likelihood, learned scale).
"""
from jaxgen import app


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "gaussian"])
  c = app.base_config("vae")
  # Sized for a 2-core CPU: ~0.3 s a step, recognisable samples after 700 steps (~4 min).
  c.data.image_size, c.data.channels, c.data.batch_size = 28, 1, 64
  c.model.update(kind="vae", likelihood="bernoulli", ch=16, ch_mult=(1, 2, 2), latent_dim=32,
                 groups=8)
  c.optim.update(lr=2e-3, warmup_steps=100, weight_decay=0.0, ema_decay=0.99)
  c.train.update(num_steps=700, log_every=50, sample_every=350, ckpt_every=350)
  if flags.get("gaussian"):
    c.model.likelihood = "gaussian"
  if flags.get("smoke"):
    c.model.update(ch=8, ch_mult=(1, 2), latent_dim=4, groups=4)
    c.data.batch_size = 8
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2, num_samples=4)
  return c

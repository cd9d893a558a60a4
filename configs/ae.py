"""Deterministic convolutional autoencoder (no KL, no prior) with 32-d codes on the embedded data.

jaxgen train --config configs/ae.py --workdir runs/ae
Arguments: smoke, gaussian (squared-error reconstruction instead of Bernoulli cross-entropy).
"""
from jaxgen import app


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "gaussian"])
  c = app.base_config("vae")
  c.data.image_size, c.data.channels, c.data.batch_size = 28, 1, 64
  c.model.update(kind="ae", likelihood="bernoulli", ch=16, ch_mult=(1, 2, 2), latent_dim=32,
                 groups=8)
  c.optim.update(lr=2e-3, warmup_steps=100, ema_decay=0.99)
  c.train.update(num_steps=700, log_every=50, sample_every=350, ckpt_every=350)
  if flags.get("gaussian"):
    c.model.update(likelihood="gaussian", gaussian_scale=0.1)
  if flags.get("smoke"):
    c.model.update(ch=8, ch_mult=(1, 2), latent_dim=4, groups=4)
    c.data.batch_size = 8
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2, num_samples=4)
  return c

"""Unconditional DDPM on the embedded Fashion-MNIST, resized to 16x16 (a CPU-sized U-Net).

jaxgen train --config configs/ddpm.py --workdir runs/ddpm
Arguments: smoke; size=N (image size: 16 or 28); cifar10 (the DDPM paper's 35.7M-parameter
CIFAR-10 model on TFDS cifar10 at 32x32: for accelerators, not for a CPU).
"""
from jaxgen import app


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "size", "cifar10"])
  c = app.base_config("ddpm")
  c.data.image_size = int(flags.get("size", 16))
  c.data.channels, c.data.batch_size = 1, 64
  c.model.update(block_channels=(16, 32, 64), layers_per_block=1, attn_levels=(False, True, False),
                 mid_attention=True, dropout=0.1, groups=8)
  c.diffusion.update(schedule="linear", num_timesteps=1000, prediction="eps", sampler="ddim",
                     sample_steps=50)
  c.optim.update(lr=2e-3, warmup_steps=200, weight_decay=0.0, ema_decay=0.995, grad_clip=1.0)
  c.train.update(num_steps=2500, log_every=50, sample_every=500, ckpt_every=500)
  if flags.get("cifar10"):
    # Ho et al. 2020, CIFAR-10: ch 128, mults (1, 2, 2, 2), 2 res blocks, attention at 16x16,
    # dropout 0.1, linear betas 1e-4..0.02, lr 2e-4, batch 128, EMA 0.9999, 800k steps.
    c.data.update(source="tfds", name="cifar10", image_size=32, channels=3, batch_size=128)
    c.model.update(block_channels=(128, 256, 256, 256), layers_per_block=2,
                   attn_levels=(False, True, False, False), dropout=0.1, groups=32,
                   norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1.0,
                   asymmetric_downsample=True, random_flip=True)
    c.optim.update(lr=2e-4, warmup_steps=5000, ema_decay=0.9999, schedule="constant")
    c.train.update(num_steps=800_000, log_every=100, sample_every=10_000, ckpt_every=10_000)
  if flags.get("smoke"):
    c.model.update(block_channels=(8, 16), attn_levels=(False, True), groups=4)
    c.data.batch_size = 8
    c.diffusion.update(num_timesteps=100, sample_steps=5)
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2, num_samples=4)
  return c

"""Representation-conditioned generation (RCG, Li et al. 2023): a diffusion prior (a residual
MLP) over the frozen SimCLR embeddings that condition configs/vary.py's pixel diffusion run.
Sampling an embedding and decoding it generates images without any condition.

jaxgen train --config configs/simclr.py:size=16 --workdir runs/simclr16
jaxgen train --config configs/vary.py --workdir runs/vary
jaxgen train --config configs/rcg.py --workdir runs/rcg
jaxgen sample --workdir runs/rcg --num 64
jaxgen eval --workdir runs/rcg --num 1000     (compare: jaxgen eval --workdir runs/ddpm)
Arguments: smoke; decoder=WORKDIR (the embedding-conditioned ddpm run; default runs/vary; its
data section is read from the run).
"""
import pathlib

from jaxgen import app
from jaxgen.weights import read_config


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "decoder"])
  decoder = str(flags.get("decoder", "runs/vary"))
  c = app.base_config("prior")
  c.data.update(image_size=16, channels=1, batch_size=256)
  if (pathlib.Path(decoder) / "config.json").is_file():
    c.data.update({k: v for k, v in read_config(decoder)["data"].items() if k != "batch_size"})
  c.prior.update(decoder=decoder, decoder_guidance=3.0)
  c.model.update(width=256, depth=4, dropout=0.0)
  c.diffusion.update(schedule="cosine", num_timesteps=1000, prediction="v", sampler="ddim",
                     sample_steps=50, clip_x0=0.0)
  c.optim.update(lr=1e-3, warmup_steps=200, weight_decay=0.0, ema_decay=0.995, grad_clip=1.0)
  c.train.update(num_steps=3000, log_every=100, sample_every=1000, ckpt_every=1000,
                 num_samples=64)
  if flags.get("smoke"):
    c.model.update(width=32, depth=2)
    c.data.batch_size = 8
    c.diffusion.update(num_timesteps=100, sample_steps=5)
    c.prior.decoder_steps = 2
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2, num_samples=8)
  return c

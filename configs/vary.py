"""Image variations: a DDPM on the embedded Fashion-MNIST (16x16) conditioned on the frozen image
embedding of a SimCLR (or CLIP) run, with embedding dropout for classifier-free guidance.

jaxgen train --config configs/simclr.py:size=16 --workdir runs/simclr16
jaxgen train --config configs/vary.py --workdir runs/vary
jaxgen vary --workdir runs/vary --image picture.png --num 8 --guidance 3
Arguments: smoke; encoder=WORKDIR (the simclr or clip run whose image tower gives the embeddings;
default runs/simclr16; its encoder section, projection and image size are read from the run);
shapes (the captioned shapes at 32x32 RGB, conditioned on the CLIP image embeddings of
configs/clip.py's run runs/clip: the decoder of unCLIP, configs/unclip.py).
"""
from jaxgen import app
from jaxgen.tasks.diffusion import embedding_of_run


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "encoder", "shapes"])
  c = app.base_config("ddpm")
  c.data.update(image_size=16, channels=1, batch_size=64)
  c.model.update(block_channels=(16, 32, 64), layers_per_block=1, attn_levels=(False, True, False),
                 mid_attention=True, dropout=0.1, groups=8, num_classes=0)
  encoder = "runs/simclr16"
  if flags.get("shapes"):
    c.data.update(name="shapes", image_size=32, channels=3)
    c.model.update(block_channels=(16, 32, 64), attn_levels=(False, False, False))
    c.data.batch_size = 32
    encoder = "runs/clip"
  c.model.embedding.update(embedding_of_run(str(flags.get("encoder", encoder)), dropout=0.1,
                                            cache=True))
  c.diffusion.update(schedule="linear", num_timesteps=1000, prediction="eps", sampler="ddim",
                     sample_steps=50, guidance_scale=3.0)
  if flags.get("shapes"):
    # v-prediction: with eps-prediction this U-Net left the high-noise steps, where the black
    # background and the layout are decided, unlearnt after 2,500 steps (x0 error 0.67 at t=800)
    c.diffusion.prediction = "v"
  c.optim.update(lr=2e-3, warmup_steps=200, weight_decay=0.0, ema_decay=0.995, grad_clip=1.0)
  c.train.update(num_steps=2500, log_every=50, sample_every=500, ckpt_every=500, num_samples=64)
  if flags.get("smoke"):
    c.model.update(block_channels=(8, 16), attn_levels=(False, True), groups=4)
    c.data.batch_size = 8
    c.diffusion.update(num_timesteps=100, sample_steps=5)
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2, num_samples=16)
  return c

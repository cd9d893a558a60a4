"""The first stage of latent diffusion: a KL autoencoder (Stable Diffusion's AutoencoderKL layout:
quant convs, mid-block attention) from the procedural captioned shapes, 32x32 RGB, to spatial
latents 8x8x4 (downsampling factor 4), with a small KL weight as in LDM.

jaxgen train --config configs/ldm_autoencoder.py --workdir runs/ldm_autoencoder
jaxgen eval --workdir runs/ldm_autoencoder
Arguments: smoke (a few steps of a tiny model); gan (a patch discriminator from half-way);
perceptual (LPIPS-style loss in the offline metric's classifier, trained first if not cached);
rec=likelihood|l1|l2; beta=B (KL weight); steps=N.
"""
from jaxgen import app


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "gan", "perceptual", "rec", "beta", "steps"])
  c = app.base_config("vae")
  c.data.update(source="embedded", name="shapes", image_size=32, channels=3, batch_size=32)
  # Sized for a 2-core CPU: ~0.27 s a step, 3.6 min for 600 steps (compiles included) to 36.2 dB
  # held-out PSNR. The Bernoulli likelihood (sigmoid outputs) beat an L1 loss (linear outputs,
  # beta 1e-6) by 11 dB at equal steps. beta=1e-4 leaves ~6 nats of KL per latent element.
  c.model.update(kind="vae", likelihood="bernoulli", rec_loss="likelihood", beta=1e-4, ch=16,
                 ch_mult=(1, 2, 4), num_res_blocks=1, latent_dim=0, z_channels=4, groups=8,
                 mid_attention=True, quant_conv=True, disc_ch=32, disc_layers=2)
  c.optim.update(lr=2e-3, warmup_steps=100, weight_decay=0.0, ema_decay=0.99, grad_clip=1.0)
  c.train.update(num_steps=600, log_every=50, sample_every=300, ckpt_every=300, num_samples=16)
  if "rec" in flags:
    c.model.rec_loss = str(flags["rec"])
  if "beta" in flags:
    c.model.beta = float(flags["beta"])
  if "steps" in flags:
    c.train.num_steps = int(flags["steps"])
  if flags.get("gan"):
    # LDM's weight with the adaptive scaling, switched on half-way (LDM: after 50k steps).
    c.model.update(disc_weight=0.5, disc_start=c.train.num_steps // 2, disc_adaptive=True)
  if flags.get("perceptual"):
    # LDM's weight 1.0 let the distance, in the features of a classifier of shapes that cares
    # little for colour, swamp the likelihood: wrong colours, 27.8 dB. 0.1 keeps 35.8 dB.
    c.model.update(perceptual_net="auto", perceptual_weight=0.1)
  if flags.get("smoke"):
    c.model.update(ch=8, ch_mult=(1, 2, 2), z_channels=4, groups=4, mid_attention=True,
                   disc_ch=8)
    c.data.batch_size = 8
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2, num_samples=4)
    if flags.get("gan"):
      c.model.disc_start = 2
  return c

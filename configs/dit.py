"""Class-conditional Diffusion Transformer trained with flow matching on the embedded
Fashion-MNIST, 16x16: patch 2 (64 tokens), 6 blocks of width 128, logit-normal training times,
Euler sampling with classifier-free guidance.

jaxgen train --config configs/dit.py --workdir runs/dit
jaxgen sample --workdir runs/dit --sampler heun --steps 20 --label 7 --guidance 3   (sneakers)
jaxgen eval --workdir runs/dit --num 1000
Arguments: smoke; size=S|B|L|XL (the paper's sizes); patch=N; eps (the diffusion objective with
eps prediction and DDIM instead of flow matching, for comparison); shift=X (SD3's time shift).

latent: text to image with a latent DiT instead of the U-Net, cross-attending to the text (the
ldm task of configs/ldm.py: train runs/ldm_autoencoder and runs/clip first, or give ae= and
clip=); mmdit: the same with MMDiT's joint attention over image and text tokens.
  jaxgen train --config configs/dit.py:mmdit --workdir runs/mmdit
  jaxgen generate --workdir runs/mmdit --prompt "a large red circle above a small blue square"
"""
import pathlib

from jaxgen import app

HERE = pathlib.Path(__file__).resolve().parent


def latent_config(flags):
  """configs/ldm.py with a latent DiT as the denoising network."""
  passed = [k if v is True else f"{k}={v}" for k, v in flags.items()
            if k in ("smoke", "ae", "clip")]
  c = app.load_config(str(HERE / "ldm.py") + (":" + ",".join(passed) if passed else ""))
  c.model.backbone = "dit"
  # rectified flow, as SD3 trains its MMDiT
  c.diffusion.update(objective="flow", flow_time="logit_normal", sampler="euler")
  c.model.dit.update(patch_size=2, depth=6, hidden_size=128, heads=4,
                     text_mode="joint" if flags.get("mmdit") else "cross",
                     size=str(flags.get("size", "")))
  if flags.get("smoke"):
    c.model.dit.update(depth=1, hidden_size=16, heads=2)
  return c


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "size", "patch", "eps", "shift", "latent", "mmdit", "ae",
                              "clip"])
  if flags.get("latent") or flags.get("mmdit"):
    return latent_config(flags)
  c = app.base_config("dit")
  c.data.update(image_size=16, channels=1, batch_size=64)
  c.model.update(patch_size=int(flags.get("patch", 2)), depth=6, hidden_size=128, heads=4,
                 num_classes=10, class_dropout=0.1, size=str(flags.get("size", "")))
  c.diffusion.update(objective="flow", flow_time="logit_normal", sampler="euler",
                     sample_steps=50, guidance_scale=3.0,
                     flow_shift=float(flags.get("shift", 1.0)))
  if flags.get("eps"):
    c.diffusion.update(objective="diffusion", prediction="eps", schedule="linear",
                       sampler="ddim")
  c.optim.update(lr=1e-3, warmup_steps=200, weight_decay=0.0, ema_decay=0.995, grad_clip=1.0)
  c.train.update(num_steps=2500, log_every=50, sample_every=500, ckpt_every=500, num_samples=80)
  if flags.get("smoke"):
    c.model.update(depth=1, hidden_size=16, heads=2, patch_size=4)
    c.data.batch_size = 8
    c.diffusion.update(num_timesteps=100, sample_steps=3)
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2, num_samples=10)
  return c

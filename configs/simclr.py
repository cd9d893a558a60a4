"""SimCLR with a small ResNet (BatchNorm over the global batch) on the embedded Fashion-MNIST.

jaxgen train --config configs/simclr.py --workdir runs/simclr
jaxgen eval --workdir runs/simclr --baselines      (linear probe and k-NN vs pixels, random)
Arguments: smoke; vit (a small ViT encoder instead); lars (LARS with the paper's lr scaling);
size=N (image size; 16 for configs/vary.py).
"""
from jaxgen import app
from jaxgen.models.build import image_encoder_section


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "vit", "lars", "size"])
  c = app.base_config("simclr")
  c.data.update(image_size=int(flags.get("size", 28)), channels=1, batch_size=256)
  c.model.encoder = image_encoder_section(kind="resnet", stage_sizes=(1, 1, 1), width=16,
                                          norm="batch", cifar_stem=True)
  c.model.update(proj_hidden=128, proj_dim=64, temperature=0.2, aug_strength=0.5,
                 aug_blur=False, crop_min_scale=0.2)
  c.optim.update(name="adamw", lr=2e-3, weight_decay=1e-4, warmup_steps=100, ema_decay=0.0)
  c.train.update(num_steps=1500, log_every=50, sample_every=500, ckpt_every=500)
  if flags.get("vit"):
    c.model.encoder = image_encoder_section(kind="vit", patch_size=4, width=64, depth=4, heads=4)
  if flags.get("lars"):
    # Chen et al. 2020: LARS, lr = 0.3 x batch / 256, weight decay 1e-6, 10 warm-up epochs.
    c.optim.update(name="lars", lr=0.3 * c.data.batch_size / 256, weight_decay=1e-6,
                   momentum=0.9, warmup_steps=230)
  if flags.get("smoke"):
    c.model.encoder.update(width=4, groups=4, depth=1, heads=2, patch_size=7)
    c.model.update(proj_hidden=16, proj_dim=8)
    c.data.batch_size = 8
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2)
  return c

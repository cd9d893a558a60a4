"""A small ResNet classifier on the embedded Fashion-MNIST (the offline metric's feature net).

jaxgen train --config configs/classifier.py --workdir runs/classifier     (about 1 min)
Arguments: smoke, size=N (image size; the metric trains one per size automatically).
"""
from jaxgen import app


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "size"])
  c = app.base_config("classifier")
  c.data.image_size = int(flags.get("size", 28))
  c.data.batch_size = 128
  c.model.update(num_classes=10, stage_sizes=(1, 1, 1), width=16, norm="group", groups=8)
  c.optim.update(lr=3e-3, warmup_steps=50, weight_decay=1e-4, ema_decay=0.99)
  c.train.update(num_steps=600, log_every=50, sample_every=0, ckpt_every=600)
  if flags.get("smoke"):
    c.model.width = 4
    c.model.groups = 4
    c.data.batch_size = 8
    c.train.update(num_steps=3, log_every=1, ckpt_every=3)
  return c

"""Image captioning on the procedural captioned shapes (32x32 RGB): a small ResNet image encoder
whose 8x8 feature map the text decoder (3 layers, word-level vocabulary) attends to.

jaxgen train --config configs/captioner.py --workdir runs/captioner
jaxgen caption --workdir runs/captioner --image picture.png [--beam 4 | --temperature 0.8]
jaxgen eval --workdir runs/captioner --baselines [--retrieval runs/clip]
                         (BLEU-4, CIDEr-D, attribute accuracies, with the baselines beside)
Arguments: smoke; vit (ViT encoder); coca (CoCa: 1 unimodal layer + contrastive loss);
init=WORKDIR (start the encoder from a clip or simclr run with the same model.encoder, locked:
configs/clip.py's encoder is this one); random_encoder (a locked random encoder: the baseline
that shows what the decoder reads from the image).
"""
from jaxgen import app
from jaxgen.models.build import image_encoder_section


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "vit", "coca", "init", "random_encoder"])
  c = app.base_config("captioner")
  c.data.update(source="embedded", name="shapes", image_size=32, channels=3, batch_size=128)
  # configs/clip.py's image tower, so that init=runs/clip fits
  c.model.encoder = image_encoder_section(kind="resnet", stage_sizes=(1, 1, 1), width=16,
                                          norm="group", groups=8)
  c.model.text.update(tokenizer="words", context_length=16, width=128, layers=3, heads=4)
  c.optim.update(name="adamw", lr=1e-3, weight_decay=1e-4, warmup_steps=100, ema_decay=0.999)
  c.train.update(num_steps=2000, log_every=100, sample_every=0, ckpt_every=500)
  if flags.get("vit"):
    c.model.encoder = image_encoder_section(kind="vit", patch_size=4, width=64, depth=4, heads=4)
  if flags.get("coca"):
    c.model.text.unimodal_layers = 1
    c.model.contrastive_dim = 64
  if "init" in flags:
    c.model.update(image_init=str(flags["init"]), lock_image=True)
  if flags.get("random_encoder"):
    c.model.lock_image = True
  if flags.get("smoke"):
    c.model.encoder.update(width=4, groups=4, depth=1, heads=2, patch_size=8)
    c.model.text.update(width=16, layers=2, heads=2)
    if flags.get("coca"):
      c.model.contrastive_dim = 8
    c.data.batch_size = 8
    c.optim.ema_decay = 0.0
    c.train.update(num_steps=4, log_every=2, ckpt_every=2)
  return c

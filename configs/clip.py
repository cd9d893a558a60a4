"""CLIP-style dual encoder on the procedural captioned shapes (32x32 RGB): a small ResNet image
tower, a 2-layer text transformer over byte-level BPE learned from the training captions (no word
of a new caption is unknown; `words` for the word-level vocabulary of the captions). On the
shapes the text tower attends both ways and every caption's twins (relation inverted; colours,
shapes, sizes exchanged between the objects) are extra negatives (NegCLIP): a causal tower
trained on plain CLIP batches scores "X left of Y" and "X right of Y" alike (twin preference
49% against 72%; benchmarks/relations.py).

jaxgen train --config configs/clip.py --workdir runs/clip
jaxgen eval --workdir runs/clip          (zero-shot shape/colour accuracy, retrieval R@1/R@5,
                                          how often an image prefers its caption to each twin)
Arguments: smoke; siglip (sigmoid loss); vit (ViT image tower); fashion (Fashion-MNIST with
captions made from the class names); lit=WORKDIR (LiT: lock an image tower from a SimCLR run);
negatives=K1+K2 (the kinds of twins, jaxgen.text.negatives; negatives=none: plain CLIP); causal
(CLIP's causal text tower instead of the bidirectional one); words (the word tokenizer).
"""
from jaxgen import app
from jaxgen.models.build import image_encoder_section


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "siglip", "vit", "fashion", "lit", "negatives",
                              "causal", "words"])
  c = app.base_config("clip")
  c.data.update(source="embedded", name="shapes", image_size=32, channels=3, batch_size=128)
  c.model.encoder = image_encoder_section(kind="resnet", stage_sizes=(1, 1, 1), width=16,
                                          norm="group", groups=8)
  c.model.update(embed_dim=64, loss="clip")
  c.model.text.update(tokenizer="words" if flags.get("words") else "bpe", context_length=16,
                      width=64, layers=2, heads=4)
  c.optim.update(name="adamw", lr=2e-3, weight_decay=1e-4, warmup_steps=100, ema_decay=0.0)
  c.train.update(num_steps=1200, log_every=50, sample_every=0, ckpt_every=400)
  kinds = str(flags.get("negatives", "relation+colour+shape+size"))
  c.model.hard_negatives = () if kinds == "none" else tuple(kinds.split("+"))
  c.model.text.causal = bool(flags.get("causal", False))
  if flags.get("siglip"):
    c.model.loss = "siglip"
  if flags.get("vit"):
    c.model.encoder = image_encoder_section(kind="vit", patch_size=4, width=64, depth=4, heads=4)
  if flags.get("fashion") or "lit" in flags:
    c.model.hard_negatives = ()  # captions from class names have no twins
  if flags.get("fashion"):
    c.data.update(name="fashion_mnist_small", image_size=28, channels=1)
    c.model.text.context_length = 8 if flags.get("words") else 16
  if "lit" in flags:
    # The image tower must match the SimCLR run's encoder: that config is configs/simclr.py.
    c.data.update(name="fashion_mnist_small", image_size=28, channels=1)
    c.model.encoder = image_encoder_section(kind="resnet", stage_sizes=(1, 1, 1), width=16,
                                            norm="batch", cifar_stem=True)
    c.model.update(image_init=str(flags["lit"]), lock_image=True)
    c.model.text.context_length = 8 if flags.get("words") else 16
  if flags.get("smoke"):
    c.model.encoder.update(width=4, groups=4, depth=1, heads=2, patch_size=8)
    c.model.text.update(width=8, layers=1, heads=2)
    c.model.embed_dim = 8
    c.data.batch_size = 8
    c.train.update(num_steps=4, log_every=2, ckpt_every=2)
  return c

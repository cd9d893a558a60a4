"""Text to image through the shared space (unCLIP, Ramesh et al. 2022): a diffusion prior maps
the CLIP text embedding of a caption to a CLIP image embedding, which the embedding-conditioned
pixel diffusion run of configs/vary.py:shapes decodes. Captioned shapes, 32x32.

jaxgen train --config configs/clip.py --workdir runs/clip
jaxgen train --config configs/vary.py:shapes --workdir runs/vary_shapes
jaxgen train --config configs/unclip.py --workdir runs/unclip
jaxgen generate --workdir runs/unclip --prompt "a large red circle above a small blue square"
jaxgen eval --workdir runs/unclip --num 200     (compare: jaxgen eval --workdir runs/ldm)
Arguments: smoke; decoder=WORKDIR (default runs/vary_shapes); text=WORKDIR (the clip run whose
text tower embeds the captions; default: the decoder's image tower's run).
"""
import pathlib

from jaxgen import app
from jaxgen.weights import read_config


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "decoder", "text"])
  decoder = str(flags.get("decoder", "runs/vary_shapes"))
  text = flags.get("text")
  c = app.base_config("prior")
  c.data.update(name="shapes", image_size=32, channels=3, batch_size=256)
  if (pathlib.Path(decoder) / "config.json").is_file():
    saved = read_config(decoder)
    c.data.update({k: v for k, v in saved["data"].items() if k != "batch_size"})
    text = text or saved["model"]["embedding"]["init"]
  c.prior.update(decoder=decoder, text=str(text or "runs/clip"), guidance=3.0,
                 decoder_guidance=3.0)
  c.model.update(width=512, depth=4, dropout=0.0, cond_dropout=0.1)
  c.diffusion.update(schedule="cosine", num_timesteps=1000, prediction="v", sampler="ddim",
                     sample_steps=50, clip_x0=0.0)
  c.optim.update(lr=1e-3, warmup_steps=200, weight_decay=0.0, ema_decay=0.995, grad_clip=1.0)
  c.train.update(num_steps=3000, log_every=100, sample_every=1000, ckpt_every=1000,
                 num_samples=32)
  if flags.get("smoke"):
    c.model.update(width=32, depth=2)
    c.data.batch_size = 8
    c.diffusion.update(num_timesteps=100, sample_steps=5)
    c.prior.decoder_steps = 2
    c.train.update(num_steps=4, log_every=2, sample_every=4, ckpt_every=2, num_samples=8)
  return c

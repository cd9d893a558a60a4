"""LoRA fine-tuning of a trained or imported run on a handful of captioned images: only the
low-rank adapters of the U-Net's attention projections train (the base stays frozen, and the
optimizer holds state for the adapters alone). The run's architecture, schedule and tokenizer
come from the base run; the adapters are written as WORKDIR/lora.safetensors in diffusers' LoRA
layout when training ends (an ldm base), which `jaxgen generate --lora` and diffusers'
load_lora_weights read.

  jaxgen import --diffusers ~/models/stable-diffusion-v1-5 --workdir runs/sd15
  jaxgen train --config configs/lora.py:base=runs/sd15,images=~/my_dog --workdir runs/sd15_dog
  jaxgen generate --workdir runs/sd15_dog --prompt "a photo of my dog on the beach"

`images` is a folder of pictures with a caption file beside each (dog1.png, dog1.txt), resized
to the base's image size. Arguments: base=WORKDIR (default runs/ldm, configs/ldm.py's run),
images=FOLDER (default: the base's own data set), rank=R (default 4), steps=N, smoke.
"""
from jaxgen import app


def get_config(arg=None):
  flags = app.check_arg(arg, ["smoke", "base", "images", "rank", "steps"])
  c = app.lora_config(flags.get("base", "runs/ldm"), rank=int(flags.get("rank", 4)))
  if flags.get("images"):
    c.data.update(source="folder", path=str(flags["images"]), holdout_fraction=0.25,
                  train_split="train", eval_split="test")
  c.data.batch_size = 4
  c.optim.update(name="adamw", lr=1e-3, warmup_steps=10, weight_decay=0.0, schedule="constant",
                 grad_clip=1.0)
  c.train.update(num_steps=int(flags.get("steps", 300)), log_every=10, sample_every=100,
                 ckpt_every=100)
  if flags.get("smoke"):
    c.data.batch_size = 2
    c.train.update(num_steps=int(flags.get("steps", 4)), log_every=2, sample_every=0,
                   ckpt_every=2)
  return c

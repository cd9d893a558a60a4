"""The rows of the performance suite: which config, which batch, which sampler settings, and the
PyTorch (diffusers) counterpart of each U-Net. Shared by bench_jax.py, bench_torch.py and run.py.
"""
from __future__ import annotations

import dataclasses
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  what: str
  config: str                          # configs/FILE.py[:ARG], relative to the repository
  overrides: tuple[str, ...] = ()      # --config.KEY=VALUE overrides (without the prefix)
  batch: int = 64                      # training images per step
  quick_batch: int | None = None       # --quick: a smaller batch (None: the same)
  sample_batch: int = 0                # images per sampler call; 0: no sampler columns
  quick_sample_batch: int | None = None  # --quick: fewer (None: the same)
  sample_steps: tuple[int, ...] = ()
  quick_sample_steps: tuple[int, ...] | None = None
  repeats: int = 5                     # timed train steps (median)
  quick_repeats: int = 3
  torch: str = ""                      # "unet2d" | "unet2d_condition" | "dit" | "" (none)
  quick: bool = True                   # part of --quick
  devices: int | None = None           # host devices on the CPU backend (XLA_FLAGS); None:
                                       # the CLI's default (jaxgen.runtime), where it splits
                                       # the batches
  group: str = "speed"                 # "speed": the main table; "memory": the variants table

  def config_spec(self) -> str:
    path, _, arg = self.config.partition(":")
    return str(ROOT / path) + (f":{arg}" if arg else "")

  def train_batch(self, quick: bool) -> int:
    return self.quick_batch if quick and self.quick_batch else self.batch

  def sample_n(self, quick: bool) -> int:
    return self.quick_sample_batch if quick and self.quick_sample_batch else self.sample_batch

  def steps(self, quick: bool) -> tuple[int, ...]:
    if quick and self.quick_sample_steps is not None:
      return self.quick_sample_steps
    return self.sample_steps


# Stable-Diffusion-like U-Net for this CPU: SD 1.x's layout (4 levels, 2 ResBlocks each,
# Transformer2D with cross-attention on the first three, 8 heads, 1x1-conv projections, context
# of 77 tokens of width 768) at 2/5 of SD's widths, (128, 256, 512, 512) instead of
# (320, 640, 1280, 1280), on 32x32x4 latents (256x256 images in SD's VAE). SD itself (860M
# parameters, 14 GB of float32 AdamW state) does not fit a 2-core, 23 GB machine shared with other
# work; this one (~146M parameters) trains at about 1 image/s.
SD_LIKE = (
    "model.unet.block_channels=128,256,512,512", "model.unet.layers_per_block=2",
    "model.unet.attn_levels=True,True,True,False", "model.unet.num_heads=8",
    "model.unet.groups=32", "model.unet.use_linear_projection=False",
    # latents 32x32: the shapes autoencoder (factor 4) on 128x128 images
    "data.image_size=128",
    # the text tower gives the 77 x 768 context; one layer: SD's is frozen and cheap next to
    # the U-Net, and jaxgen's loss runs it every step
    "model.text.width=768", "model.text.heads=12", "model.text.layers=1",
    "model.text.context_length=77",
)

# Stable Diffusion's AutoencoderKL (sd-vae: 4 levels 128-256-512-512, 2 ResBlocks each, 4 latent
# channels, factor 8) on 64x64 images of the captioned shapes.
VAE_SD = ("model.ch=128", "model.ch_mult=1,2,4,4", "model.num_res_blocks=2", "model.groups=32",
          "model.z_channels=4", "data.image_size=64")

# CLIP ViT-B/32: 224x224 images in 32x32 patches, 12 layers of width 768 and 12 heads; text
# transformer 12 layers, width 512, 8 heads, 77 tokens; 512-d joint embedding.
CLIP_B32 = ("model.encoder.patch_size=32", "model.encoder.width=768", "model.encoder.depth=12",
            "model.encoder.heads=12", "data.image_size=224", "model.text.width=512",
            "model.text.layers=12", "model.text.heads=8", "model.text.context_length=77",
            "model.embed_dim=512")
# Plain CLIP as published: a causal text tower and no hard negatives (the default config's
# NegCLIP twins run the text tower on five captions per image).
CLIP_B32_CONFIG = "configs/clip.py:vit,negatives=none,causal"

# Paper-size rows for one GPU, in bfloat16 (benchmarks/gpu.py): the DDPM paper's CIFAR-10 U-Net
# at its batch of 128; Stable Diffusion 1.5's U-Net widths (320, 640, 1280, 1280; 860M) on its
# 64x64x4 latents (here of 256x256 images through the factor-4 shapes autoencoder); DiT-XL/2
# (675M) on 256 tokens (32x32x3 pixels in 2x2 patches) with 1000 classes; CLIP ViT-B/32 at a batch
# of 256 (float32: the towers have no bfloat16 switch). quick_batch: a dry run on the CPU.
SD15 = ("model.unet.block_channels=320,640,1280,1280", "model.unet.layers_per_block=2",
        "model.unet.attn_levels=True,True,True,False", "model.unet.num_heads=8",
        "model.unet.groups=32", "model.unet.use_linear_projection=False", "data.image_size=256",
        "model.text.width=768", "model.text.heads=12", "model.text.layers=1",
        "model.text.context_length=77", "model.unet.dtype=bfloat16")
GPU_ROWS = [
    Row("gpu_ddpm_cifar10", "DDPM paper CIFAR-10 U-Net (35.7M), batch 128, bfloat16",
        "configs/ddpm.py:cifar10", overrides=("model.dtype=bfloat16",), batch=128,
        quick_batch=2, sample_batch=128, quick_sample_batch=1, sample_steps=(50,),
        quick_sample_steps=(2,), repeats=10, torch="unet2d", quick=False,
        group="gpu"),
    Row("gpu_ldm_sd15", "SD 1.5-size U-Net (860M) on 64x64x4 latents, 77x768 context, batch 16, "
        "bfloat16", "configs/ldm.py", overrides=SD15, batch=16, quick_batch=1, sample_batch=8,
        quick_sample_batch=1, sample_steps=(50,), quick_sample_steps=(2,), repeats=5,
        torch="unet2d_condition", quick=False, group="gpu"),
    Row("gpu_dit_xl2", "DiT-XL/2 (675M) on 32x32x3 (256 tokens), 1000 classes, batch 64, "
        "bfloat16", "configs/dit.py:size=XL", overrides=(
            "data.image_size=32", "data.channels=3", "model.num_classes=1000",
            "model.dtype=bfloat16"), batch=64, quick_batch=2, repeats=5, torch="dit", quick=False,
        group="gpu"),
    Row("gpu_clip_b32", "CLIP ViT-B/32 at 224x224 + 12-layer text tower, batch 256",
        CLIP_B32_CONFIG, overrides=CLIP_B32, batch=256, quick_batch=2, repeats=5,
        quick=False, group="gpu"),
]

ROWS = {r.name: r for r in [
    Row("vae", "VAE, 28x28x1, configs/vae.py", "configs/vae.py", batch=64),
    Row("ddpm_small", "class-cond. DDPM U-Net 16x16x1, configs/ddpm_class.py",
        "configs/ddpm_class.py", batch=64, sample_batch=64, sample_steps=(10, 50, 1000),
        quick_sample_steps=(10, 50), torch="unet2d"),
    Row("ddpm_cifar10", "DDPM paper CIFAR-10 U-Net 32x32x3 (35.7M), configs/ddpm.py:cifar10",
        "configs/ddpm.py:cifar10", batch=16, quick_batch=4, sample_batch=4,
        sample_steps=(10, 50), quick_sample_steps=(10,), repeats=3, quick_repeats=2,
        torch="unet2d"),
    Row("ldm_small", "cross-attn U-Net on 8x8x4 latents, 16x64 context, configs/ldm.py",
        "configs/ldm.py", batch=64, sample_batch=16, sample_steps=(10, 50, 1000),
        quick_sample_steps=(10, 50), torch="unet2d_condition"),
    Row("ldm_sd_like", "SD-1.x-like U-Net at 2/5 width, 32x32x4 latents, 77x768 context",
        "configs/ldm.py", overrides=SD_LIKE, batch=4, sample_batch=2, sample_steps=(10,),
        repeats=3, torch="unet2d_condition", quick=False),
    # One host device, the comparison for the CLI's default of two (one per core, the batch
    # split between them): jaxgen before it ran data parallel on the CPU.
    Row("ddpm_small_1dev", "ddpm_small on 1 host device", "configs/ddpm_class.py", batch=64,
        sample_batch=64, sample_steps=(10, 50), torch="", devices=1, quick=False),
    Row("ldm_small_1dev", "ldm_small on 1 host device", "configs/ldm.py", batch=64,
        sample_batch=16, sample_steps=(10, 50), devices=1, quick=False),
    Row("dit_small", "class-cond. flow-matching DiT 16x16x1, patch 2, 6x128, configs/dit.py",
        "configs/dit.py", batch=64, torch="dit"),
    # DiT-S/2 (the paper's smallest: 12 blocks of width 384, 6 heads) on 32x32x3 pixels with
    # 1000 classes: the 256 tokens of the paper's 32x32x4 latents; random images as data.
    Row("dit_s2", "DiT-S/2 (33M) on 32x32x3, 256 tokens, 1000 classes, flow matching",
        "configs/dit.py:size=S", overrides=("data.image_size=32", "data.channels=3",
                                            "model.num_classes=1000"),
        batch=8, repeats=3, torch="dit", quick=False),
    Row("clip", "CLIP-style dual encoder 32x32x3 + 16 tokens, configs/clip.py", "configs/clip.py",
        batch=128),
    Row("vae_sd", "Stable Diffusion's AutoencoderKL (83.7M: 128,256,512,512 x2 blocks) on "
        "64x64x3", "configs/ldm_autoencoder.py", overrides=VAE_SD, batch=4, repeats=3,
        quick=False),
    Row("clip_b32", "CLIP ViT-B/32 image tower at 224x224 + 12-layer 512-wide text tower, "
        "77 tokens", CLIP_B32_CONFIG, overrides=CLIP_B32, batch=16, repeats=3,
        quick=False),
    # Memory and precision variants of the DDPM paper's CIFAR-10 U-Net (train step only).
    *[Row(f"ddpm_cifar10_{tag}", f"ddpm_cifar10 with {what}", "configs/ddpm.py:cifar10",
          overrides=ov, batch=16, quick_batch=8, repeats=3, quick_repeats=2, devices=dev,
          group="memory")
      for tag, what, ov, dev in [
          ("f32", "float32 (the reference of this table)", (), 1),
          ("bf16", "bfloat16 compute", ("model.dtype=bfloat16",), 1),
          ("remat", "rematerialised ResBlocks and attention", ("model.remat=true",), 1),
          ("accum4", "4 accumulated micro-batches", ("optim.grad_accum_steps=4",), 1),
          ("dp8", "data parallel over 8 simulated devices", (), 8),
          ("fsdp8", "FSDP over 8 simulated devices", ("train.fsdp=true",), 8)]],
    *GPU_ROWS,
]}

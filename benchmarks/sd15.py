"""Real-size Stable Diffusion 1.5 without downloads: the published U-Net and VAE configs with
random weights, jaxgen and diffusers side by side on this machine.

Rows: one U-Net step (batch 1, 77 x 768 context) on 32x32x4 and 64x64x4 latents (256 and 512
pixel images), with jaxgen's default attention ("auto": chunked at 64x64) and with the
materialised one ("xla"); the VAE decode of the same latents, whole and in 32x32 latent tiles
(overlap 8). Each measurement runs in its own process: time is the median of 3 warm calls,
compile is the first call's extra time, peak memory is the process's peak resident set
(parameters included), and for jaxgen also XLA's scratch memory of the compiled function.

python benchmarks/sd15.py [--only unet|vae] [--sides 32 64] [--no-torch]
Writes benchmarks/results/sd15.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The published configs (runwayml/stable-diffusion-v1-5 unet/config.json and vae/config.json),
# the keys that differ from diffusers' defaults.
UNET = dict(in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2,
            norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
            sample_size=64, attention_head_dim=8, cross_attention_dim=768)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512],
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512)
TILE, OVERLAP = 32, 8


def _peak_rss_mib() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _random_like(shapes, seed=0):
  """Random float32 parameters of the given shapes (numpy: compiling init at this size takes
  minutes), scaled like a fan-in initialisation."""
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)

  def fill(leaf):
    shape = leaf.shape
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    scale = 1.0 / np.sqrt(max(fan_in, 1)) if len(shape) > 1 else 0.02
    return (rng.standard_normal(shape, np.float32) * scale).astype(np.float32)
  return jax.tree.map(fill, shapes)


def jax_worker(what: str, side: int, attention: str, tiled: bool) -> dict:
  import jax
  import jax.numpy as jnp
  from common import median_time

  from jaxgen.convert.diffusers import autoencoder_kl_from_config, unet2d_condition_from_config
  from jaxgen.models import layers
  from jaxgen.models.autoencoder import Autoencoder
  from jaxgen.pipelines.text_to_image import _tiled
  layers.set_attention(attention)
  key = jax.random.PRNGKey(0)
  z = jax.random.normal(key, (1, side, side, 4))
  if what == "unet":
    net = unet2d_condition_from_config(UNET)
    ctx = jax.random.normal(key, (1, 77, 768))
    t = jnp.array([500])
    params = _random_like(jax.eval_shape(net.init, key, z, t, context=ctx))
    fn = jax.jit(lambda p, z: net.apply(p, z, t, context=ctx))
  else:
    net = autoencoder_kl_from_config(VAE)
    params = _random_like(jax.eval_shape(lambda: net.init(key, jnp.zeros((1, 64, 64, 3)))))
    dec = lambda p: lambda zz: net.apply(p, zz, method=Autoencoder.decode)
    if tiled:
      fn = jax.jit(lambda p, z: _tiled(dec(p), z, tile=TILE, overlap=OVERLAP, factor=8))
    else:
      fn = jax.jit(lambda p, z: dec(p)(z))
  params = jax.device_put(params)
  t0 = time.perf_counter()
  compiled = fn.lower(params, z).compile()
  compile_s = time.perf_counter() - t0
  scratch = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
  timing = median_time(compiled, params, z, repeats=3)
  n = sum(x.size for x in jax.tree.leaves(params))
  return dict(seconds=timing["median_s"], compile_s=compile_s, xla_scratch_mib=scratch,
              peak_rss_mib=_peak_rss_mib(), params=n)


def torch_worker(what: str, side: int, tiled: bool) -> dict:
  import torch
  from common import median_time
  from diffusers import AutoencoderKL, UNet2DConditionModel
  torch.manual_seed(0)
  z = torch.randn(1, 4, side, side)
  with torch.no_grad():
    if what == "unet":
      net = UNet2DConditionModel(**UNET).eval()
      ctx, t = torch.randn(1, 77, 768), torch.tensor([500])
      fn = lambda: net(z, t, encoder_hidden_states=ctx).sample
    else:
      net = AutoencoderKL(**VAE).eval()
      if tiled:  # diffusers tiles in sample_size // 8 latents with a 25% overlap
        net.tile_latent_min_size = TILE
        net.tile_sample_min_size = TILE * 8
        net.enable_tiling()
      fn = lambda: net.decode(z).sample
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    timing = median_time(fn, repeats=3, warmup=0, block=lambda x: x)
  n = sum(p.numel() for p in net.parameters())
  return dict(seconds=timing["median_s"], compile_s=first - timing["median_s"],
              peak_rss_mib=_peak_rss_mib(), params=n)


def _run(args: list[str], timeout: float = 900) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  try:
    p = subprocess.run([sys.executable, __file__, "--worker", *args, "--out", out],
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode:
      return dict(error=" | ".join((p.stderr or p.stdout).strip().splitlines()[-4:]))
    with open(out) as fh:
      return json.load(fh)
  except subprocess.TimeoutExpired:
    return dict(error=f"timed out after {timeout:.0f} s")
  finally:
    os.unlink(out)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", choices=["unet", "vae"], default=None)
  p.add_argument("--sides", type=int, nargs="*", default=[32, 64])
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--framework", default="jax", help=argparse.SUPPRESS)
  p.add_argument("--what", default="unet", help=argparse.SUPPRESS)
  p.add_argument("--side", type=int, default=64, help=argparse.SUPPRESS)
  p.add_argument("--attention", default="auto", help=argparse.SUPPRESS)
  p.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--out", default="", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    res = (jax_worker(a.what, a.side, a.attention, a.tiled) if a.framework == "jax"
           else torch_worker(a.what, a.side, a.tiled))
    with open(a.out, "w") as fh:
      json.dump(res, fh)
    return

  from common import write
  rows = []
  for what in ("unet", "vae"):
    if a.only and a.only != what:
      continue
    for side in a.sides:
      variants = ([("auto", False), ("xla", False)] if what == "unet"
                  else [("auto", False), ("auto", True)])
      for attention, tiled in variants:
        row = dict(what="U-Net step" if what == "unet" else "VAE decode", pixels=side * 8,
                   latents=f"{side}x{side}x4", attention=attention, tiled=tiled)
        args = ["--what", what, "--side", str(side), "--attention", attention]
        args += ["--tiled"] if tiled else []
        j = _run(["--framework", "jax", *args])
        row.update({f"jaxgen_{k}": v for k, v in j.items()})
        if not a.no_torch and attention == "auto":
          t = _run(["--framework", "torch", *args])
          row.update({f"torch_{k}": v for k, v in t.items()})
          if "seconds" in j and "seconds" in t:
            row["speed_ratio"] = t["seconds"] / j["seconds"]  # > 1: jaxgen faster
        rows.append(row)
        print(json.dumps(row), flush=True)
  cols = ["what", "pixels", "latents", "attention", "tiled", "jaxgen_seconds", "jaxgen_compile_s",
          "jaxgen_peak_rss_mib", "jaxgen_xla_scratch_mib", "torch_seconds",
          "torch_peak_rss_mib", "speed_ratio"]
  path, table = write("sd15", rows, cols, dict(unet_params=rows[0].get("jaxgen_params")))
  print(path)
  print(table)


if __name__ == "__main__":
  main()

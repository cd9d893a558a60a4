"""PyTorch side of the suite: the diffusers U-Net of one row, built with jaxgen's architecture
(run by benchmarks/run.py in its own process, so that OpenMP threads and XLA's thread pool never
compete; torch and diffusers are benchmark references only, never jaxgen dependencies).

python benchmarks/bench_torch.py ROW [--quick] --expect-params N --out FILE.json
python benchmarks/bench_torch.py peak --out FILE.json

Train step: forward, MSE to the noise, backward, global-norm clipping and EMA when the config has
them (as jaxgen's step does), torch.optim.AdamW (fused when this torch has it for CPU tensors).
Sampler: a DDIM loop of N network calls (batched classifier-free guidance where jaxgen guides)
with the DDIM update, under inference_mode. Threads: torch.set_num_threads(os.cpu_count()).
On a GPU (benchmarks/gpu.py): JAXGEN_BENCH_DEVICE=cuda places model and data there and
synchronises before each clock read; JAXGEN_BENCH_BF16=1 runs the network under bfloat16
autocast, as jaxgen's bfloat16 compute.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import host_malloc, peak_rss_bytes
from common import median_time as _median_time
from rows import ROWS

DEVICE = os.environ.get("JAXGEN_BENCH_DEVICE", "cpu")
BF16 = os.environ.get("JAXGEN_BENCH_BF16", "") == "1"


def _sync(result):
  if DEVICE.startswith("cuda"):
    torch.cuda.synchronize()
  return result


def median_time(fn, repeats: int = 5, warmup: int = 1, min_seconds: float = 0.0) -> dict:
  return _median_time(fn, repeats=repeats, warmup=warmup, min_seconds=min_seconds,
                      block=_sync)


def _autocast():
  return torch.autocast(device_type=DEVICE.split(":")[0], dtype=torch.bfloat16, enabled=BF16)


def matmul_peak(n: int = 3072) -> dict:
  a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
  t = median_time(lambda: a @ b, repeats=7, warmup=2)
  return dict(n=n, median_s=t["median_s"], flops_per_s=2.0 * n ** 3 / t["median_s"])


# -- diffusers models with jaxgen's architecture --------------------------------------------------

def unet2d(config):
  """diffusers UNet2DModel equal to the DDPM task's UNet (attention="self")."""
  from diffusers import UNet2DModel
  m, d = config.model, config.data
  levels = len(m.block_channels)
  down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in m.attn_levels)
  up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(m.attn_levels))
  if m.num_heads != 1:
    raise NotImplementedError("the suite's DDPM rows use one attention head")
  return UNet2DModel(
      sample_size=d.image_size, in_channels=d.channels, out_channels=d.channels,
      block_out_channels=tuple(m.block_channels), layers_per_block=m.layers_per_block,
      down_block_types=down, up_block_types=up, add_attention=m.mid_attention,
      attention_head_dim=None,  # one head over all channels, as jaxgen's num_heads=1
      norm_num_groups=m.groups, norm_eps=m.norm_eps, dropout=m.dropout,
      flip_sin_to_cos=m.flip_sin_to_cos, freq_shift=int(m.freq_shift),
      downsample_padding=0 if m.asymmetric_downsample else 1,
      # jaxgen keeps one more embedding row: the null label of classifier-free guidance
      num_class_embeds=(m.num_classes + 1) if m.num_classes else None), levels


def unet2d_condition(config, latent_shape):
  """diffusers UNet2DConditionModel equal to the latent-diffusion task's transformer UNet."""
  from diffusers import UNet2DConditionModel
  u, t = config.model.unet, config.model.text
  down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attn_levels)
  up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attn_levels))
  h, _, c = latent_shape
  return UNet2DConditionModel(
      sample_size=h, in_channels=c, out_channels=c, block_out_channels=tuple(u.block_channels),
      layers_per_block=u.layers_per_block, down_block_types=down, up_block_types=up,
      # diffusers' naming quirk: in this class attention_head_dim is the number of heads
      attention_head_dim=u.num_heads, transformer_layers_per_block=u.transformer_depth,
      cross_attention_dim=t.width, use_linear_projection=u.use_linear_projection,
      norm_num_groups=u.groups, norm_eps=u.norm_eps, dropout=u.dropout,
      flip_sin_to_cos=u.flip_sin_to_cos, freq_shift=int(u.freq_shift)), len(u.block_channels)


def dit(config):
  """diffusers DiTTransformer2DModel equal to the dit task's DiT (its blocks each hold a copy of
  the timestep/class embedder: returns that copy's size too)."""
  from diffusers import DiTTransformer2DModel

  from jaxgen.models.dit import SIZES
  m, d = config.model, config.data
  depth, width, heads = SIZES[m.size] if m.size else (m.depth, m.hidden_size, m.heads)
  model = DiTTransformer2DModel(
      num_attention_heads=heads, attention_head_dim=width // heads, in_channels=d.channels,
      out_channels=d.channels, num_layers=depth, sample_size=d.image_size,
      patch_size=m.patch_size, num_embeds_ada_norm=m.num_classes, norm_eps=m.mlp_eps)
  copy = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
  return model, (depth - 1) * copy


def abar(config) -> torch.Tensor:
  from jaxgen import diffusion
  d = config.diffusion
  s = diffusion.make_schedule(d.schedule, d.num_timesteps, d.beta_start or None,
                              d.beta_end or None)
  return torch.from_numpy(np.asarray(s.abar, np.float32))


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
  ts = np.round(num_timesteps - np.arange(steps) * (num_timesteps / steps)) - 1
  return [int(t) for t in ts]


# -- the row --------------------------------------------------------------------------------------

def run_row(name: str, quick: bool, expect_params: int | None) -> dict:
  from jaxgen import app
  row = ROWS[name]
  bs = row.train_batch(quick)
  config = app.load_config(row.config_spec(),
                           list(row.overrides) + [f"data.batch_size={bs}"])
  torch.manual_seed(0)
  conditional = row.torch == "unet2d_condition"
  is_dit = row.torch == "dit"
  duplicated = 0
  if is_dit:
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    model, duplicated = dit(config)
  elif conditional:
    v = config.model.vae
    f = 2 ** (len(v.ch_mult) - 1)
    shape = (config.data.image_size // f, config.data.image_size // f, v.z_channels)
    model, _ = unet2d_condition(config, shape)
    ctx_len, ctx_dim = config.model.text.context_length, config.model.text.width
  else:
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    model, _ = unet2d(config)
  # a diffusers DiT holds one embedder per block; jaxgen's, like the paper's, one in all
  n_params = sum(p.numel() for p in model.parameters()) - duplicated
  model = model.to(DEVICE)
  out = dict(row=name, framework="pytorch", batch=bs, params=n_params,
             torch=torch.__version__, threads=torch.get_num_threads(), device=DEVICE,
             bf16_autocast=BF16)
  if expect_params:
    rel = abs(n_params - expect_params) / expect_params
    out["params_rel_diff"] = rel
    assert rel <= 0.01, (f"{name}: diffusers model has {n_params:,} parameters, jaxgen's "
                         f"{expect_params:,} ({100 * rel:.2f}% apart; the suite needs <= 1%)")
  o = config.optim
  try:
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay, fused=True)
    out["adamw"] = "fused"
  except (RuntimeError, TypeError, ValueError):
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay)
    out["adamw"] = "default"
  params = [p for p in model.parameters()]
  ema = [p.detach().clone() for p in params]
  ab = abar(config).to(DEVICE)
  h, w, c = shape
  num_classes = 0 if conditional else config.model.num_classes
  x0 = torch.randn(bs, c, h, w, device=DEVICE)
  labels = torch.arange(bs, device=DEVICE) % max(num_classes, 1)
  context = torch.randn(bs, ctx_len, ctx_dim, device=DEVICE) if conditional else None

  def net(x, t, y=None, ctx=None):
    with _autocast():
      if conditional:
        return model(x, t, encoder_hidden_states=ctx).sample.float()
      return model(x, t, class_labels=y).sample.float()

  def train_step():
    model.train()
    eps = torch.randn_like(x0)
    y = None
    if num_classes:
      drop = torch.rand(bs, device=DEVICE) < config.model.class_dropout
      y = torch.where(drop, torch.full_like(labels, num_classes), labels)
    if config.diffusion.objective == "flow":  # rectified flow, logit-normal times
      s = torch.sigmoid(torch.randn(bs, device=DEVICE)).view(-1, 1, 1, 1)
      x_t = (1 - s) * x0 + s * eps
      loss = F.mse_loss(net(x_t, 1000 * s.flatten(), y, context), eps - x0)
    else:
      t = torch.randint(0, ab.shape[0], (bs,), device=DEVICE)
      a = ab[t].view(-1, 1, 1, 1)
      x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
      loss = F.mse_loss(net(x_t, t, y, context), eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
    opt.step()
    if o.ema_decay > 0:
      with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - o.ema_decay)
    return loss

  t0 = time.perf_counter()
  _sync(train_step())
  out["first_step_s"] = time.perf_counter() - t0
  r = median_time(train_step, repeats=row.quick_repeats if quick else row.repeats, warmup=1,
                  min_seconds=2.0)
  out.update(step_s=r["median_s"], step_min_s=r["min_s"], step_repeats=r["repeats"],
             train_images_per_s=bs / r["median_s"], rss_peak_bytes=peak_rss_bytes())

  if row.sample_batch:
    n = row.sample_n(quick)
    guided = conditional or num_classes > 0
    g = config.diffusion.guidance_scale
    m = 2 if guided else 1
    ys = torch.cat([labels[:n] % max(num_classes, 1),
                    torch.full((n,), num_classes, device=DEVICE)]) if num_classes else None
    ctxs = torch.randn(m * n, ctx_len, ctx_dim, device=DEVICE) if conditional else None
    clip = config.diffusion.clip_x0 or None

    def eps_of(x, t):
      xin = torch.cat([x, x]) if guided else x
      out_ = net(xin, torch.full((xin.shape[0],), t, device=DEVICE), ys, ctxs)
      if not guided:
        return out_
      cond, uncond = out_.chunk(2)
      return uncond + g * (cond - uncond)

    def sample(steps):
      model.eval()
      with torch.inference_mode():
        x = torch.randn(n, c, h, w, device=DEVICE)
        ts = trailing_timesteps(ab.shape[0], steps)
        for i, t in enumerate(ts):
          eps = eps_of(x, t)
          a_t = ab[t]
          a_s = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=DEVICE)
          x0_ = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
          if clip:
            x0_ = x0_.clamp(-clip, clip)
            eps = (x - a_t.sqrt() * x0_) / (1 - a_t).sqrt()
          x = a_s.sqrt() * x0_ + (1 - a_s).sqrt() * eps
        return x

    model.eval()
    xb = torch.randn(n, c, h, w, device=DEVICE)
    with torch.inference_mode():
      one = median_time(lambda: eps_of(xb, 500), repeats=5 if quick else 10, warmup=1,
                        min_seconds=1.0)
    out.update(sample_batch=n, net_eval_s=one["median_s"], net_eval_batch=m * n)
    for steps in row.steps(quick):
      reps = 1 if steps >= 1000 or quick else 3
      s = median_time(lambda: sample(steps), repeats=reps, warmup=0)
      out[f"ddim{steps}_s"] = s["median_s"]
      out[f"ddim{steps}_images_per_s"] = n / s["median_s"]
      out[f"ddim{steps}_overhead_pct"] = 100.0 * (s["median_s"] / (steps * one["median_s"]) - 1)
  out["rss_peak_end_bytes"] = peak_rss_bytes()
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("row")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--expect-params", type=int, default=None,
                 help="jaxgen's U-Net parameter count: asserted equal within 1%%")
  p.add_argument("--out", required=True)
  a = p.parse_args()
  malloc = host_malloc()
  torch.set_num_threads(os.cpu_count())
  if a.row == "peak":
    res = dict(row="peak", framework="pytorch", threads=torch.get_num_threads(), **matmul_peak())
  else:
    res = run_row(a.row, a.quick, a.expect_params)
  res["malloc"] = malloc
  with open(a.out, "w") as f:
    json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()

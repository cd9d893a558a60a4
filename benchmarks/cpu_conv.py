"""Where the time goes in the small DDPM U-Net's train step on a CPU, and what changes it.

python benchmarks/cpu_conv.py [--quick] [--parts profile,layers,flags,model]

profile  per-thunk time of the jitted train step (jax.profiler trace, each thunk mapped to its
         HLO instruction: convolution forward / input-gradient / filter-gradient, dot, reduction,
         elementwise fusion, copy), beside torch.profiler's per-op time for the same diffusers
         model's step
layers   isolated layers at the U-Net's shapes, jaxgen/XLA against PyTorch: 3x3 convolution
         forward and forward+backward in NHWC (XLA's default), NCHW, im2col + one matmul, nine
         shifted matmuls, bfloat16; GroupNorm+SiLU; attention
flags    XLA CPU flags (each in its own process): the layers' convolutions and the whole step
model    the whole train step with model-level changes: bfloat16 compute, convolutions lowered
         as im2col + matmul or nine shifted matmuls (flax's nn.Conv replaced in the process)

Writes benchmarks/results/cpu_conv.json and .md. Every jaxgen and PyTorch measurement runs in a
process of its own; times are medians after a warm-up. Needs torch for the PyTorch columns.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results"
ROW = "ddpm_small"

# (name, batch, height=width, in channels, out channels): the small DDPM U-Net's three levels at
# its training batch, and two levels of the DDPM paper's CIFAR-10 model at a small batch.
CONVS = [("c16@16x16 b64", 64, 16, 16, 16), ("c32@8x8 b64", 64, 8, 32, 32),
         ("c64@4x4 b64", 64, 4, 64, 64), ("c128@32x32 b8", 8, 32, 128, 128),
         ("c256@16x16 b8", 8, 16, 256, 256)]
QUICK_CONVS = CONVS[:3]

# XLA flag sets tried on the whole step and on the convolutions. The names are the flags of
# jaxlib 0.10.2 (see xla/debug_options_flags.cc); a flag this jaxlib does not know is an error.
FLAGS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "ynnpack_off": "--xla_cpu_experimental_ynn_fusion_type=",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "eigen_single_thread": "--xla_cpu_multi_thread_eigen=false",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
}
QUICK_FLAGS = ["default", "onednn", "ynnpack_off", "fast_math"]


def _median(fn, repeats=7, warmup=2, min_seconds=0.5, block=None):
  from common import median_time
  return median_time(fn, repeats=repeats, warmup=warmup, min_seconds=min_seconds,
                     block=block or (lambda r: r))["median_s"]


# -- jaxgen / XLA side ----------------------------------------------------------------------------

def conv_lowerings():
  """name -> conv(x [B,H,W,C], w [3,3,C,O]) -> [B,H,W,O], 'SAME' padding, stride 1."""
  import jax
  import jax.numpy as jnp
  lax = jax.lax

  def nhwc(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO",
                                                                              "NHWC"))

  def nchw(x, w):  # x and w given NCHW / OIHW: the transposes stay outside the timed function
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW",
                                                                              "NCHW"))

  def patches(x, kh, kw):
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    return [xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)]

  def im2col(x, w):
    kh, kw, c, o = w.shape
    cols = jnp.concatenate(patches(x, kh, kw), axis=-1)  # [B, H, W, kh*kw*C], (i, j, c) order
    return jnp.dot(cols, w.reshape(kh * kw * c, o))

  def shift9(x, w):
    kh, kw, c, o = w.shape
    taps = patches(x, kh, kw)
    return sum(jnp.dot(t, w[k // kw, k % kw]) for k, t in enumerate(taps))

  def bf16(x, w):
    return nhwc(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))

  # The library convolution forward and for the input gradient, but the filter gradient as one
  # matmul of the im2col patches with the output gradient (contracting over batch and space),
  # instead of XLA's 16x16-window convolution between two transposed copies.
  @jax.custom_vjp
  def wgrad_dot(x, w):
    return nhwc(x, w)

  def wgrad_fwd(x, w):
    return nhwc(x, w), (x, w)

  def wgrad_bwd(res, g):
    x, w = res
    kh, kw, c, o = w.shape
    dx = jax.vjp(lambda x: nhwc(x, w), x)[1](g)[0]
    cols = jnp.concatenate(patches(x, kh, kw), axis=-1).reshape(-1, kh * kw * c)
    dw = jnp.dot(cols.T, g.reshape(-1, o)).reshape(kh, kw, c, o)
    return dx, dw.astype(w.dtype)

  wgrad_dot.defvjp(wgrad_fwd, wgrad_bwd)
  return dict(xla_nhwc=nhwc, xla_nchw=nchw, im2col=im2col, shift9=shift9, xla_bf16=bf16,
              wgrad_dot=wgrad_dot)


def jax_layers(convs, lowerings=None) -> dict:
  import jax
  import jax.numpy as jnp
  out = {}
  lows = conv_lowerings()
  for name, b, hw, c, o in convs:
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (b, hw, hw, c))
    w = 0.05 * jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, o))
    g = jax.random.normal(jax.random.PRNGKey(2), (b, hw, hw, o))
    for low in lowerings or lows:
      f = lows[low]
      xa, wa, ga = x, w, g
      if low == "xla_nchw":
        xa, wa, ga = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), g.transpose(0, 3, 1, 2)
      if low == "xla_bf16":
        ga = g.astype(jnp.bfloat16)
      fwd = jax.jit(f)

      @jax.jit
      def fwd_bwd(x, w, g, f=f):
        y, vjp = jax.vjp(f, x, w)
        return vjp(g.astype(y.dtype))

      flops = 2.0 * b * hw * hw * c * o * 9
      tf = _median(lambda: fwd(xa, wa), block=jax.block_until_ready)
      tb = _median(lambda: fwd_bwd(xa, wa, ga), block=jax.block_until_ready)
      out[f"conv {name} {low}"] = dict(fwd_ms=1e3 * tf, fwd_bwd_ms=1e3 * tb,
                                       fwd_gflops=flops / tf / 1e9,
                                       fwd_bwd_gflops=3 * flops / tb / 1e9)
  return out


# GroupNorm(8 groups) shapes of the small DDPM U-Net's three levels at its training batch.
NORMS = [(64, 16, 16, 16), (64, 8, 8, 32), (64, 4, 4, 64)]


def jax_other_layers() -> dict:
  """GroupNorm(8)+SiLU (flax's modules with autodiff against jaxgen's fused ops), dropout(0.1)
  (flax's against jaxgen's masks), nearest x2 upsampling (jax.image.resize against jaxgen's
  broadcast) and single-head attention on the 8x8x32 level; forward and forward+backward."""
  import flax.linen as nn
  import jax

  from jaxgen.models import ops
  from jaxgen.models.layers import attention, repeat_2x2
  out = {}

  def both(name, f, *args):
    fwd = jax.jit(f)
    y = fwd(*args)
    fb = jax.jit(lambda *a: jax.vjp(f, *a)[1](y))
    out[name] = dict(fwd_ms=1e3 * _median(lambda: fwd(*args), block=jax.block_until_ready),
                     fwd_bwd_ms=1e3 * _median(lambda: fb(*args), block=jax.block_until_ready))

  key = jax.random.PRNGKey(0)
  for shape in NORMS:
    x = jax.random.normal(key, shape)
    tag = "x".join(map(str, shape))
    for impl, gn in (("flax", nn.GroupNorm(num_groups=8, epsilon=1e-5)),
                     ("jaxgen", ops.GroupNorm(num_groups=8, epsilon=1e-5, act="silu"))):
      p = gn.init(key, x)
      f = (lambda p, x, gn=gn: nn.silu(gn.apply(p, x))) if impl == "flax" else \
          (lambda p, x, gn=gn: gn.apply(p, x))
      both(f"groupnorm+silu {tag} {impl}", f, p, x)
  x = jax.random.normal(key, NORMS[0])
  for impl, drop in (("flax", nn.Dropout(0.1)), ("jaxgen", ops.Dropout(0.1))):
    both(f"dropout 0.1 {'x'.join(map(str, NORMS[0]))} {impl}",
         lambda x, drop=drop: drop.apply({}, x, deterministic=False, rngs={"dropout": key}), x)
  x = jax.random.normal(key, NORMS[1])
  b, h, w, c = x.shape
  both(f"upsample x2 {'x'.join(map(str, NORMS[1]))} jax.image.resize",
       lambda x: jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest"), x)
  both(f"upsample x2 {'x'.join(map(str, NORMS[1]))} jaxgen", repeat_2x2, x)
  q = jax.random.normal(jax.random.PRNGKey(2), (128, 64, 1, 32))
  both("attention 128x64 tokens x32 jaxgen", lambda q: attention(q, q, q), q)
  return out


def patch_conv(lowering: str) -> None:
  """Replaces flax.linen.Conv in this process by a module with the same parameters whose 3x3
  stride-1 'SAME' convolutions use `lowering` (others stay lax convolutions)."""
  import flax.linen as nn
  import jax.numpy as jnp
  low = conv_lowerings()[lowering]
  base = nn.Conv

  class LoweredConv(base):
    @nn.compact
    def __call__(self, x):
      ks = tuple(self.kernel_size)
      same = (self.padding == "SAME" or self.padding == ((1, 1), (1, 1))
              or self.padding == [(1, 1), (1, 1)])
      strides = self.strides or (1, 1)
      strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
      if ks != (3, 3) or strides != (1, 1) or not same or self.feature_group_count != 1:
        return super().__call__(x)
      kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                          self.param_dtype)
      dtype = self.dtype or jnp.float32
      y = low(x.astype(dtype), kernel.astype(dtype))
      if self.use_bias:
        y = y + self.param("bias", self.bias_init, (self.features,),
                           self.param_dtype).astype(dtype)
      return y

  LoweredConv.__name__ = "Conv"  # same parameter scope names as nn.Conv
  nn.Conv = LoweredConv
  import flax.linen.linear
  flax.linen.linear.Conv = LoweredConv


def _ddpm_step(overrides=()):
  import bench_jax as bj
  import jax
  import numpy as np
  from rows import ROWS

  from jaxgen import app
  from jaxgen.train.optim import make_optimizer
  from jaxgen.train.step import make_train_step
  row = ROWS[ROW]
  config = app.load_config(row.config_spec(),
                           [f"data.batch_size={row.batch}", *overrides])
  task = app.build_task(config)
  tx, schedule = make_optimizer(config.optim, config.train.num_steps, task.frozen)
  example = {k: np.asarray(v)[:1] for k, v in task.example_batch().items()
             if np.asarray(v).dtype.kind not in "USO"}
  state = bj._init_state(task, example, tx, jax.random.PRNGKey(0))
  batch = bj._batch(task, config, row.batch, None)
  step = make_train_step(task.loss_fn, ema_decay=config.optim.ema_decay, schedule=schedule,
                         frozen=task.frozen)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  return compiled, state, batch, compile_s


def patch_ops(which: list[str]) -> None:
  """Puts back in this process what jaxgen's U-Net layers used before their CPU rewrites:
  'groupnorm': flax's GroupNorm then nn.silu, differentiated by autodiff; 'dropout': flax's
  Dropout (jax.random.bernoulli masks); 'upsample': jax.image.resize for nearest x2."""
  import flax.linen as nn
  import jax

  from jaxgen.models import attention as attention_lib
  from jaxgen.models import autoencoder as autoencoder_lib
  from jaxgen.models import layers
  from jaxgen.models import unet as unet_lib

  if "groupnorm" in which:
    def flax_group_norm(groups, eps, name=None, act=None):
      gn = nn.GroupNorm(num_groups=groups, epsilon=eps, name=name)
      return (lambda x: nn.silu(gn(x))) if act == "silu" else gn

    for module in (layers, attention_lib, autoencoder_lib, unet_lib):
      module.group_norm = flax_group_norm
  if "dropout" in which:
    layers.Dropout = nn.Dropout
    attention_lib.Dropout = nn.Dropout
  if "upsample" in which:
    def resize(x):
      b, h, w, c = x.shape
      return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
    layers.repeat_2x2 = resize


def jax_step(overrides=(), conv_lowering=None, old_ops=()) -> dict:
  import jax
  if conv_lowering:
    patch_conv(conv_lowering)
  if old_ops:
    patch_ops(list(old_ops))
  compiled, state, batch, compile_s = _ddpm_step(overrides)
  holder = [state]

  def one():
    holder[0], m = compiled(holder[0], batch)
    return m

  t = _median(one, repeats=7, warmup=2, min_seconds=3.0, block=jax.block_until_ready)
  return dict(step_ms=1e3 * t, images_per_s=64 / t, compile_s=compile_s)


def _categorise(hlo_text: str) -> dict:
  """HLO instruction name -> category, from the optimized module's text."""
  comps, cur = {}, None
  for line in hlo_text.splitlines():
    if not line.startswith(" "):
      m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
      cur = m.group(1) if m and line.rstrip().endswith("{") else None
      if cur:
        comps[cur] = []
    elif cur:
      comps[cur].append(line)

  def ops_of(comp):
    return [m.group(1) for m in (re.search(r"= \S+ ([\w\-]+)\(", ln) for ln in comps.get(comp, []))
            if m]

  def conv_kind(line):
    win = re.search(r"window=\{size=(\d+)x(\d+)", line)
    if win and (int(win.group(1)) > 3 or int(win.group(2)) > 3):
      return "conv filter-grad"
    return "conv input-grad" if "transpose(" in line else "conv forward"

  cat = {}
  for lines in comps.values():
    for line in lines:
      m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", line)
      if not m:
        continue
      name, op = m.groups()
      bwd = "transpose(" in line
      if op == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", line).group(1)
        inner = ops_of(called)
        conv_lines = [ln for ln in comps.get(called, []) if " convolution(" in ln]
        if conv_lines:
          c = conv_kind(conv_lines[0] + (" transpose(" if bwd else ""))
        elif "dot" in inner:
          c = "dot (matmul)"
        elif any(o in ("reduce", "reduce-window") for o in inner):
          c = "reduction fusion (norms, sums)"
        elif all(o in ("parameter", "copy", "transpose", "bitcast") for o in inner):
          c = "copy/transpose"
        else:
          c = "elementwise fusion"
      elif op == "convolution":
        c = conv_kind(line)
      elif op == "dot":
        c = "dot (matmul)"
      elif op in ("copy", "transpose"):
        c = "copy/transpose"
      elif op in ("while", "call", "conditional"):
        c = None  # containers: their thunks are counted inside
      else:
        c = "other"
      if c:
        cat[name] = c
  return cat


def trace_steps(compiled, state, batch, steps: int, warmup: int = 2):
  """Runs a compiled train step under jax.profiler: (traced wall seconds per step, Counter of
  milliseconds per step by HLO instruction name, summed over threads)."""
  import jax
  holder = [state]
  for _ in range(warmup):
    holder[0], m = compiled(holder[0], batch)
  jax.block_until_ready(m)
  d = tempfile.mkdtemp(prefix="jaxgen_trace_")
  t0 = time.perf_counter()
  with jax.profiler.trace(d):
    for _ in range(steps):
      holder[0], m = compiled(holder[0], batch)
    jax.block_until_ready(m)
  wall = (time.perf_counter() - t0) / steps
  f = sorted(glob.glob(d + "/**/*.xplane.pb", recursive=True))[-1]
  per = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(f).planes:
    for line in plane.lines:
      for ev in line.events:
        per[ev.name] += ev.duration_ns / 1e6 / steps
  shutil.rmtree(d, ignore_errors=True)  # traces of large steps take hundreds of MB
  return wall, per


def jax_profile() -> dict:
  compiled, state, batch, _ = _ddpm_step()
  cat = _categorise(compiled.as_text())
  wall, thunks = trace_steps(compiled, state, batch, steps=5, warmup=3)
  per = collections.Counter()
  for name, ms in thunks.items():
    if name in cat:
      per[cat[name]] += ms
  return dict(wall_ms_per_step_traced=1e3 * wall, thread_ms_per_step=dict(per))


# -- PyTorch side ---------------------------------------------------------------------------------

def torch_layers(convs) -> dict:
  import torch
  import torch.nn.functional as F
  out = {}
  for name, b, hw, c, o in convs:
    for fmt in ("nchw", "channels_last"):
      x = torch.randn(b, c, hw, hw)
      w = 0.05 * torch.randn(o, c, 3, 3)
      g = torch.randn(b, o, hw, hw)
      if fmt == "channels_last":
        x, w, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, g))
      with torch.no_grad():
        tf = _median(lambda: F.conv2d(x, w, padding=1))
      xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

      def fb():
        y = F.conv2d(xr, wr, padding=1)
        return torch.autograd.grad(y, (xr, wr), g)

      tb = _median(fb)
      flops = 2.0 * b * hw * hw * c * o * 9
      out[f"conv {name} torch_{fmt}"] = dict(fwd_ms=1e3 * tf, fwd_bwd_ms=1e3 * tb,
                                             fwd_gflops=flops / tf / 1e9,
                                             fwd_bwd_gflops=3 * flops / tb / 1e9)
  return out


def torch_other_layers() -> dict:
  """The same layers in PyTorch (NCHW), names ending in 'torch'."""
  import torch
  import torch.nn.functional as F
  out = {}

  def both(name, f, x, *params):
    with torch.no_grad():
      tf = _median(lambda: f(x))
    xr = x.clone().requires_grad_(True)
    g = f(x).detach()
    tb = _median(lambda: torch.autograd.grad(f(xr), (xr, *params), g))
    out[name] = dict(fwd_ms=1e3 * tf, fwd_bwd_ms=1e3 * tb)

  for n, h, w, c in NORMS:
    gn = torch.nn.GroupNorm(8, c, eps=1e-5)
    both(f"groupnorm+silu {n}x{h}x{w}x{c} torch", lambda x, gn=gn: F.silu(gn(x)),
         torch.randn(n, c, h, w), *gn.parameters())
  n, h, w, c = NORMS[0]
  both(f"dropout 0.1 {n}x{h}x{w}x{c} torch", lambda x: F.dropout(x, 0.1, training=True),
       torch.randn(n, c, h, w))
  n, h, w, c = NORMS[1]
  both(f"upsample x2 {n}x{h}x{w}x{c} torch",
       lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"), torch.randn(n, c, h, w))
  q = torch.randn(128, 1, 64, 32)
  both("attention 128x64 tokens x32 torch", lambda q: F.scaled_dot_product_attention(q, q, q), q)
  return out


def _torch_step_fn(channels_last=False):
  import bench_torch as bt
  import torch
  import torch.nn.functional as F
  from rows import ROWS

  from jaxgen import app
  row = ROWS[ROW]
  config = app.load_config(row.config_spec(), [f"data.batch_size={row.batch}"])
  model, _ = bt.unet2d(config)
  o = config.optim
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay, fused=True)
  b, s, c = row.batch, config.data.image_size, config.data.channels
  x0 = torch.randn(b, c, s, s)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x0 = x0.contiguous(memory_format=torch.channels_last)
  ab = bt.abar(config)
  labels = torch.arange(b) % 10
  params = list(model.parameters())
  ema = [p.detach().clone() for p in params]

  def step():
    model.train()
    t = torch.randint(0, 1000, (b,))
    eps = torch.randn_like(x0)
    a = ab[t].view(-1, 1, 1, 1)
    loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t,
                            class_labels=labels).sample, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - o.ema_decay)
  return step


def torch_step(channels_last=False) -> dict:
  step = _torch_step_fn(channels_last)
  t = _median(step, repeats=7, warmup=2, min_seconds=3.0)
  return dict(step_ms=1e3 * t, images_per_s=64 / t)


def torch_profile() -> dict:
  import torch
  step = _torch_step_fn()
  for _ in range(3):
    step()
  steps = 5
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  # Inclusive time of the convolution ops (their oneDNN kernels are children), and the ops with
  # the most self time.
  per = collections.Counter()
  names = {"aten::convolution": "conv forward (inclusive)",
           "aten::convolution_backward": "conv backward, input + filter grad (inclusive)",
           "aten::native_group_norm": "group norm forward",
           "aten::native_group_norm_backward": "group norm backward"}
  for e in prof.key_averages():
    if e.key in names:
      per[names[e.key]] += e.cpu_time_total / 1e3 / steps
  leaves = collections.Counter()
  for e in prof.key_averages():
    if e.key.startswith("aten::") or e.key.startswith("Optimizer") or "AdamW" in e.key:
      leaves[e.key] += e.self_cpu_time_total / 1e3 / steps
  return dict(inclusive_ms_per_step=dict(per),
              top_self_ms_per_step=dict(leaves.most_common(25)))


# -- orchestration --------------------------------------------------------------------------------

def _run(kind: str, args: dict, xla_flags: str | None = None, timeout=1800) -> dict:
  env = dict(os.environ)
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  cmd = [sys.executable, __file__, "--worker", kind, "--args", json.dumps(args), "--out", out]
  try:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
      tail = (p.stderr or p.stdout).strip().splitlines()[-4:]
      return dict(error=" | ".join(tail))
    return json.loads(pathlib.Path(out).read_text())
  except subprocess.TimeoutExpired:
    return dict(error="timeout")
  finally:
    os.unlink(out)


def worker(kind: str, args: dict) -> dict:
  import logging
  logging.basicConfig(level=logging.WARNING)
  if kind.startswith("torch"):
    import torch
    torch.set_num_threads(os.cpu_count())
  convs = [c for c in CONVS if c[0] in args.get("convs", [c[0] for c in CONVS])]
  if kind == "jax_layers":
    r = jax_layers(convs, args.get("lowerings"))
    if args.get("other", True):
      r.update(jax_other_layers())
    return r
  if kind == "jax_step":
    return jax_step(args.get("overrides", ()), args.get("conv_lowering"), args.get("old_ops", ()))
  if kind == "jax_profile":
    return jax_profile()
  if kind == "torch_layers":
    r = torch_layers(convs)
    r.update(torch_other_layers())
    return r
  if kind == "torch_step":
    return torch_step(args.get("channels_last", False))
  if kind == "torch_profile":
    return torch_profile()
  raise ValueError(kind)


def _fmt(v):
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
  return "" if v is None else str(v)


def _table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def report(res: dict) -> str:
  out = []
  if "profile" in res:
    jp, tp = res["profile"].get("jax", {}), res["profile"].get("torch", {})
    per = jp.get("thread_ms_per_step", {})
    total = sum(per.values()) or 1.0
    out += ["## Profile of the ddpm_small train step (batch 64, 16x16x1)", "",
            f"XLA: traced wall {_fmt(jp.get('wall_ms_per_step_traced'))} ms/step; thunk time "
            f"summed over both threads {_fmt(total)} ms/step.", "",
            _table(["XLA thunk category", "ms/step (thread time)", "share %"],
                   [[k, v, 100 * v / total] for k, v in sorted(per.items(),
                                                               key=lambda kv: -kv[1])])]
    if tp and "error" not in tp:
      out += ["", "PyTorch (torch.profiler, per step):", "",
              _table(["PyTorch op", "ms/step"],
                     [[k, v] for k, v in tp.get("inclusive_ms_per_step", {}).items()]
                     + [[f"self: {k}", v] for k, v in
                        list(tp.get("top_self_ms_per_step", {}).items())[:12]])]
  if "layers" in res:
    rows = []
    for k, v in {**res["layers"].get("jax", {}), **res["layers"].get("torch", {})}.items():
      if isinstance(v, dict) and "fwd_ms" in v:
        rows.append([k, v["fwd_ms"], v["fwd_bwd_ms"], v.get("fwd_gflops"),
                     v.get("fwd_bwd_gflops")])
    rows.sort(key=lambda r: r[0])
    out += ["", "## Isolated layers (median ms; GFLOP/s counts 3 convolutions for fwd+bwd)", "",
            _table(["layer / lowering", "fwd ms", "fwd+bwd ms", "fwd GFLOP/s",
                    "fwd+bwd GFLOP/s"], rows)]
  if "flags" in res:
    rows = []
    base = res["flags"].get("default", {}).get("step", {}).get("step_ms")
    for name, v in res["flags"].items():
      st = v.get("step", {})
      convs = v.get("convs", {})
      fb = [c.get("fwd_bwd_ms") for c in convs.values() if isinstance(c, dict)]
      rows.append([name, FLAGS[name] or "(none)", st.get("step_ms"),
                   base / st["step_ms"] if base and st.get("step_ms") else None,
                   st.get("compile_s"), sum(fb) if fb and None not in fb else None,
                   (st.get("error") or v.get("error") or "")[:100]])
    out += ["", "## XLA flags: whole ddpm_small step, and the sum of the conv layers' fwd+bwd",
            "", _table(["flags", "XLA_FLAGS", "step ms", "speed-up", "compile s",
                        "convs fwd+bwd ms", "error"], rows)]
  if "model" in res:
    rows = []
    base = res["model"].get("jaxgen default", {}).get("step_ms")
    for name, v in res["model"].items():
      rows.append([name, v.get("step_ms"), v.get("images_per_s"),
                   base / v["step_ms"] if base and v.get("step_ms") else None,
                   v.get("compile_s"), (v.get("error") or "")[:100]])
    out += ["", "## Whole ddpm_small train step (batch 64) with model-level changes", "",
            _table(["variant", "step ms", "images/s", "speed-up vs jaxgen default",
                    "compile s", "error"], rows)]
  return "\n".join(out)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--parts", default="profile,layers,flags,model")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--args", default="{}", help=argparse.SUPPRESS)
  p.add_argument("--out", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    res = worker(a.worker, json.loads(a.args))
    pathlib.Path(a.out).write_text(json.dumps(res))
    return
  import importlib.util
  has_torch = importlib.util.find_spec("torch") is not None
  parts = a.parts.split(",")
  convs = [c[0] for c in (QUICK_CONVS if a.quick else CONVS)]
  t0 = time.perf_counter()
  path = RESULTS / "cpu_conv.json"
  res = json.loads(path.read_text()) if path.exists() else {}
  res["meta"] = dict(date=time.strftime("%Y-%m-%d %H:%M"), cpu_count=os.cpu_count(),
                     quick=a.quick, load_start=os.getloadavg()[0])
  if "profile" in parts:
    print("profile ...", flush=True)
    res["profile"] = dict(jax=_run("jax_profile", {}))
    if has_torch:
      res["profile"]["torch"] = _run("torch_profile", {})
  if "layers" in parts:
    print("layers ...", flush=True)
    res["layers"] = dict(jax=_run("jax_layers", dict(convs=convs)))
    if has_torch:
      res["layers"]["torch"] = _run("torch_layers", dict(convs=convs))
  if "flags" in parts:
    res["flags"] = {}
    for name in (QUICK_FLAGS if a.quick else FLAGS):
      print(f"flags {name} ...", flush=True)
      extra = (os.environ.get("XLA_FLAGS", "") + " " + FLAGS[name]).strip()
      res["flags"][name] = dict(
          step=_run("jax_step", {}, xla_flags=extra),
          convs=_run("jax_layers", dict(convs=convs, lowerings=["xla_nhwc"], other=False),
                     xla_flags=extra))
  if "model" in parts:
    res["model"] = {}
    variants = [("jaxgen default", "jax_step", {}),
                ("bfloat16 compute (model.dtype)", "jax_step",
                 dict(overrides=["model.dtype=bfloat16"])),
                ("3x3 convs as im2col + matmul", "jax_step", dict(conv_lowering="im2col")),
                ("3x3 convs as 9 shifted matmuls", "jax_step", dict(conv_lowering="shift9")),
                ("filter gradient as im2col matmul", "jax_step",
                 dict(conv_lowering="wgrad_dot")),
                ("no dropout (model.dropout=0; PyTorch keeps 0.1)", "jax_step",
                 dict(overrides=["model.dropout=0.0"])),
                ("before: autodiff flax GroupNorm+SiLU", "jax_step",
                 dict(old_ops=["groupnorm"])),
                ("before: flax Dropout masks", "jax_step", dict(old_ops=["dropout"])),
                ("before: jax.image.resize upsampling", "jax_step", dict(old_ops=["upsample"])),
                ("before: all three", "jax_step",
                 dict(old_ops=["groupnorm", "dropout", "upsample"]))]
    if has_torch:
      variants += [("PyTorch (diffusers), NCHW", "torch_step", {}),
                   ("PyTorch (diffusers), channels_last", "torch_step",
                    dict(channels_last=True))]
    for name, kind, args in variants:
      print(f"model {name} ...", flush=True)
      res["model"][name] = _run(kind, args)
  res["meta"]["wall_s"] = time.perf_counter() - t0
  res["meta"]["load_end"] = os.getloadavg()[0]
  RESULTS.mkdir(exist_ok=True)
  path.write_text(json.dumps(res, indent=1) + "\n")
  md = report(res)
  header = ", ".join(f"{k}={_fmt(v)}" for k, v in res["meta"].items())
  (RESULTS / "cpu_conv.md").write_text(f"# CPU speed of the small DDPM U-Net\n\n{header}\n\n"
                                       f"{md}\n")
  print(md)
  print(path)


if __name__ == "__main__":
  main()

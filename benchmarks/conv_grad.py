"""Convolution filter gradients on the CPU: XLA's lowering against matmuls (jaxgen.models.ops,
config `conv`), isolated at the U-Nets' shapes and inside whole train steps.

python benchmarks/conv_grad.py [--parts layers,steps] [--steps-rows ldm_sd_like,ddpm_cifar10]
                               [--rounds 3]

layers  each shape of SHAPES (NHWC batch, size, in and out channels, kernel): the forward
        convolution, the filter gradient as XLA lowers it (jax.vjp of lax.conv_general_dilated)
        and as jaxgen computes it under conv=matmul, and PyTorch's filter gradient
        (torch.nn.grad.conv2d_weight, channels-last) when torch is installed; median ms and
        GFLOP/s (2 * B * H * W * I * O * k * k per convolution)
steps   each row's real train step (benchmarks/rows.py: its batch and overrides; one host
        device unless XLA_FLAGS forces more, the batch split over them) compiled under conv=xla,
        conv=matmul and conv=matmul with the matmul forms for every kernel width
        (ops.SMALL_MATMUL_MIN_KERNEL = 0) and run alternately in one process, so that the
        machine's drift falls on all; the rows of --steps-rows replace their earlier results,
        the others' are kept; XLA's temporaries of each

The allocator is set as in the suite ($JAXGEN_MALLOC, default keep). Writes
benchmarks/results/conv_grad.{json,md}; the rows of a part not run are kept from the file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

# (batch, height = width, in channels, out channels, kernel): the SD-like U-Net's (batch 4) and
# the DDPM paper's CIFAR-10 U-Net's (batch 8 a device) convolutions
SHAPES = [(4, 32, 128, 128, 3), (4, 32, 384, 128, 3), (4, 32, 256, 256, 3), (4, 16, 768, 256, 3),
          (4, 16, 512, 512, 3), (4, 8, 1024, 512, 3), (4, 4, 1024, 512, 3), (4, 32, 384, 128, 1),
          (8, 32, 128, 128, 3), (8, 16, 256, 256, 3), (8, 32, 256, 128, 1)]


def _times_of(fn, args, calls: int = 3) -> list[float]:
  import jax
  out = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t0)
  return out


def layers(rounds: int) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from jaxgen.models import ops
  rows = []
  for b, hw, ci, co, k in SHAPES:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (b, hw, hw, ci))
    w = jax.random.normal(keys[1], (k, k, ci, co)) / (k * k * ci) ** 0.5
    g = jax.random.normal(keys[2], (b, hw, hw, co))
    conv = lambda x, w: ops.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=jax.lax.conv_dimension_numbers(
            x.shape, w.shape, ("NHWC", "HWIO", "NHWC")))
    fns = {}
    for name, impl, what in (("forward", "xla", "y"), ("filter_grad_xla", "xla", "dw"),
                             ("filter_grad_matmul", "matmul", "dw")):
      ops.set_conv(impl)
      f = (lambda x, w, g: conv(x, w)) if what == "y" else \
          (lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
      fns[name] = jax.jit(f).lower(x, w, g).compile()
    ops.set_conv("auto")
    ref = fns["filter_grad_xla"](x, w, g)
    err = float(jnp.abs(fns["filter_grad_matmul"](x, w, g) - ref).max() / jnp.abs(ref).max())
    times = {name: [] for name in fns}
    for _ in range(rounds):  # alternated, after one warm-up call each
      for name, f in fns.items():
        jax.block_until_ready(f(x, w, g))
        times[name] += _times_of(f, (x, w, g))
    flops = 2 * b * hw * hw * ci * co * k * k
    row = dict(shape=f"{ci}->{co} {k}x{k} @{hw}x{hw} b{b}", rel_err=err)
    for name, ts in times.items():
      row[f"{name}_ms"] = 1e3 * statistics.median(ts)
      row[f"{name}_gflops"] = flops / statistics.median(ts) / 1e9
    row["speedup"] = row["filter_grad_xla_ms"] / row["filter_grad_matmul_ms"]
    row.update(_torch_filter_grad(b, hw, ci, co, k, rounds, flops))
    rows.append(row)
    print(row, flush=True)
  return rows


def _torch_filter_grad(b, hw, ci, co, k, rounds, flops) -> dict:
  try:
    import torch
  except ImportError:
    return {}
  x = torch.randn(b, ci, hw, hw).to(memory_format=torch.channels_last)
  g = torch.randn(b, co, hw, hw).to(memory_format=torch.channels_last)
  f = lambda: torch.nn.grad.conv2d_weight(x, (co, ci, k, k), g, padding=k // 2)
  f()
  ts = []
  for _ in range(3 * rounds):
    t0 = time.perf_counter()
    f()
    ts.append(time.perf_counter() - t0)
  return dict(torch_filter_grad_ms=1e3 * statistics.median(ts),
              torch_filter_grad_gflops=flops / statistics.median(ts) / 1e9)


def steps(row_names: list[str], rounds: int) -> list[dict]:
  import bench_jax
  import jax
  from rows import ROWS

  from jaxgen import app
  from jaxgen.models import ops

  out = []
  for row_name in row_names:
    row = ROWS[row_name]
    held = {}
    for impl in ("xla", "matmul", "matmul, every width"):
      # the config key, as a run sets it (app.build_task); the last also takes the matmul forms
      # for the narrow kernels below 16x16 positions that the default leaves to XLA
      config = app.load_config(row.config_spec(),
                               [*row.overrides, f"conv={impl.split(',')[0]}"])
      task = app.build_task(config)
      default_min = ops.SMALL_MATMUL_MIN_KERNEL
      ops.SMALL_MATMUL_MIN_KERNEL = 0 if impl.endswith("every width") else default_min
      try:  # the loop's step, the batch split over this process's devices
        state, batch, fn = bench_jax.train_setup(task, config, row.batch)
        t0 = time.perf_counter()
        compiled = fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
      finally:
        ops.SMALL_MATMUL_MIN_KERNEL = default_min
      temp = compiled.memory_analysis().temp_size_in_bytes
      held[impl] = dict(fn=compiled, state=state, batch=batch, compile_s=compile_s, temp=temp,
                        times=[])

    def step(h):
      h["state"], m = h["fn"](h["state"], h["batch"])
      jax.block_until_ready(m)

    for _ in range(rounds):
      for h in held.values():
        step(h)  # one step after the switch, not timed
        for _ in range(2):
          t0 = time.perf_counter()
          step(h)
          h["times"].append(time.perf_counter() - t0)
    for impl, h in held.items():
      out.append(dict(row=row_name, shape=f"{row_name} train step (batch {row.batch}, "
                            f"{jax.device_count()} device)", conv=impl,
                      step_median_ms=1e3 * statistics.median(h["times"]),
                      step_min_ms=1e3 * min(h["times"]), steps=len(h["times"]),
                      compile_s=h["compile_s"], xla_temp_mb=h["temp"] / 2 ** 20))
      print(out[-1], flush=True)
    del held
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", default="layers,steps")
  p.add_argument("--steps-rows", default="ldm_sd_like,ddpm_cifar10")
  p.add_argument("--rounds", type=int, default=3)
  a = p.parse_args()
  malloc = common.host_malloc()  # before JAX starts its threads
  parts = a.parts.split(",")
  old = common.RESULTS / "conv_grad.json"
  kept = [] if not old.is_file() else json.loads(old.read_text())["rows"]
  part_of = lambda r: "steps" if "conv" in r else "layers"
  rows = []
  for part in ("layers", "steps"):
    if part not in parts:
      rows += [r for r in kept if part_of(r) == part]
    elif part == "layers":
      rows += layers(a.rounds)
    else:  # the rows not re-run are kept
      names = a.steps_rows.split(",")
      rows += [r for r in kept if part_of(r) == "steps"
               and r.get("row", r["shape"].split()[0]) not in names]
      rows += steps(names, a.rounds)
  cols = ["shape", "forward_ms", "filter_grad_xla_ms", "filter_grad_matmul_ms", "speedup",
          "torch_filter_grad_ms", "forward_gflops", "filter_grad_xla_gflops",
          "filter_grad_matmul_gflops", "torch_filter_grad_gflops", "rel_err", "conv",
          "step_median_ms", "step_min_ms", "steps", "compile_s", "xla_temp_mb"]
  _, table = common.write("conv_grad", rows, cols, dict(malloc=malloc, rounds=a.rounds,
                                                         parts=a.parts))
  print(table)


if __name__ == "__main__":
  main()

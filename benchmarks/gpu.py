"""The GPU benchmark: paper-size rows in bfloat16 on one GPU, beside PyTorch on the same GPU.

python benchmarks/gpu.py [--only ROW[,ROW...]] [--no-torch] [--peak-tflops T] [--budget 450]
python benchmarks/gpu.py --quick --allow-cpu       (a dry run of every code path on the CPU)

Rows (benchmarks/rows.py, GPU_ROWS): the DDPM paper's CIFAR-10 U-Net at batch 128, a Stable
Diffusion 1.5-size U-Net (860M) on 64x64x4 latents, DiT-XL/2 on 256 tokens, CLIP ViT-B/32.
Per row, in its own process (benchmarks/bench_jax.py, the suite's worker): training images/s
through the loop's real step, compile time, XLA's FLOPs per step (cost analysis of the compiled
step) over the median step time as a share of the chip's dense bfloat16 peak (model FLOP
utilisation), device peak memory, and DDIM-50 images/s where the row samples; then the same
model in diffusers under bfloat16 autocast on the GPU (bench_torch.py, JAXGEN_BENCH_DEVICE=cuda).
Rows whose process would start after --budget seconds are skipped, so that the whole run stays
inside a fixed time (8 minutes by default with headroom).

Writes benchmarks/results/gpu.json and gpu.md (--quick: gpu_quick.*).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS
from rows import GPU_ROWS, ROWS
from run import _worker

# Dense bfloat16 tensor-core peaks (TFLOP/s, without sparsity), by device-name fragment.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
                    "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def bf16_peak(device_kind: str) -> float | None:
  for name, tflops in BF16_PEAK_TFLOPS.items():  # longest names are listed first where it matters
    if name in device_kind:
      return tflops * 1e12
  return None


def _device() -> dict:
  import jax
  d = jax.devices()[0]
  return dict(platform=d.platform, device_kind=d.device_kind, jax=jax.__version__)


def _ddim(res: dict, with_steps: bool) -> str | None:
  """The sampler's images/s at the row's number of DDIM steps, e.g. '41.2 (50)'."""
  for key, value in res.items():
    if key.startswith("ddim") and key.endswith("_images_per_s"):
      steps = key[4:-len("_images_per_s")]
      return f"{value:.4g} ({steps})" if with_steps else f"{value:.4g}"
  return None


def row_table(rows: list[dict], peak: float | None) -> str:
  head = ["row", "batch", "params", "train img/s", "step ms", "compile s", "GFLOP/step",
          "TFLOP/s", "MFU %", "device peak GB", "DDIM img/s (steps)", "PyTorch img/s",
          "PyTorch DDIM img/s", "jaxgen/PyTorch train"]
  fmt = lambda v: "" if v is None else (f"{v:,.4g}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    j, t = r.get("jaxgen", {}), r.get("torch", {})
    if "error" in j:
      lines.append(f"| {r['row']} | error: {j['error'][:160]} |" + " |" * (len(head) - 2))
      continue
    fl = j.get("achieved_flops_per_s")
    mem = j.get("device_peak_bytes")
    ti = t.get("train_images_per_s")
    vals = [r["row"], j.get("batch"), j.get("params"), j.get("train_images_per_s"),
            1e3 * j["step_s"], j.get("lower_s", 0) + j.get("compile_s", 0),
            (j.get("flops_per_step") or 0) / 1e9, (fl or 0) / 1e12,
            100 * fl / peak if fl and peak else None, mem / 1e9 if mem else None,
            _ddim(j, True),
            ti if ti else (("error: " + t["error"][:80]) if "error" in t else None),
            _ddim(t, False),
            j["train_images_per_s"] / ti if ti else None]
    lines.append("| " + " | ".join(fmt(v) for v in vals) + " |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="", help="comma-separated rows of " +
                 ", ".join(r.name for r in GPU_ROWS))
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--quick", action="store_true", help="the rows' small CPU batches")
  p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a dry run)")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="the chip's dense bfloat16 peak (default: by device name)")
  p.add_argument("--budget", type=float, default=450.0,
                 help="seconds after which no further row starts")
  p.add_argument("--timeout", type=float, default=300.0, help="seconds per process")
  a = p.parse_args()
  t_start = time.perf_counter()
  dev = _device()
  if dev["platform"] != "gpu" and not a.allow_cpu:
    p.error(f"no GPU: JAX runs on {dev['platform']}. Install JAX's CUDA build, or pass "
            f"--allow-cpu --quick for a dry run.")
  names = [n for n in a.only.split(",") if n] or [r.name for r in GPU_ROWS]
  unknown = [n for n in names if n not in ROWS or ROWS[n].group != "gpu"]
  if unknown:
    p.error(f"unknown GPU rows {unknown}; known: {', '.join(r.name for r in GPU_ROWS)}")
  peak = a.peak_tflops * 1e12 if a.peak_tflops else bf16_peak(dev["device_kind"])
  use_torch = not a.no_torch and all(importlib.util.find_spec(m) for m in ("torch", "diffusers"))
  torch_env = dict(os.environ)
  if use_torch:
    import torch
    if torch.cuda.is_available():
      torch_env["JAXGEN_BENCH_DEVICE"] = "cuda"
    elif not a.allow_cpu:
      use_torch = False
  quick = ["--quick"] if a.quick else []
  rows = []
  for name in names:
    row = ROWS[name]
    if time.perf_counter() - t_start > a.budget:
      rows.append(dict(row=name, jaxgen=dict(error="skipped: the time budget was spent")))
      continue
    print(f"{name}: jaxgen ...", flush=True)
    res = dict(row=name, what=row.what,
               jaxgen=_worker("bench_jax.py", [name, *quick], dict(os.environ), a.timeout))
    j = res["jaxgen"]
    print("  " + (j.get("error") or f"{j['train_images_per_s']:.4g} img/s"), flush=True)
    if use_torch and row.torch and "error" not in j and \
        time.perf_counter() - t_start < a.budget:
      env = dict(torch_env)
      if any("bfloat16" in o for o in row.overrides):
        env["JAXGEN_BENCH_BF16"] = "1"
      print(f"{name}: PyTorch ...", flush=True)
      res["torch"] = _worker("bench_torch.py", [name, *quick, "--expect-params",
                                                str(j["unet_params"])], env, a.timeout)
      t = res["torch"]
      print("  " + (t.get("error") or f"{t['train_images_per_s']:.4g} img/s"), flush=True)
    rows.append(res)
  meta = dict(dev, date=time.strftime("%Y-%m-%d %H:%M"), bf16_peak_tflops=(peak or 0) / 1e12,
              quick=a.quick, wall_s=time.perf_counter() - t_start)
  stem = "gpu_quick" if a.quick else "gpu"
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
  table = row_table(rows, peak)
  header = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in meta.items())
  what = "\n".join(f"- `{r.name}`: {r.what}" for r in GPU_ROWS if r.name in names)
  (RESULTS / f"{stem}.md").write_text(f"# jaxgen GPU benchmark\n\n{header}\n\n{what}\n\n"
                                      f"{table}\n")
  print(header)
  print(table)


if __name__ == "__main__":
  main()

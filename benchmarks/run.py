"""jaxgen's performance suite, side by side with PyTorch (diffusers) where it is installed.

python benchmarks/run.py [--quick] [--only ROW[,ROW...]] [--no-torch] [--xla-flags FLAGS]
                         [--malloc keep|system] [--pairs N]

Rows (benchmarks/rows.py): vae, ddpm_small, ddpm_cifar10, ldm_small, ldm_sd_like, clip.
Per row: training images/s through the real `make_train_step` (the task's loss, AdamW), the
achieved FLOP/s (XLA's cost analysis of the compiled step over its median time) as a share of
the float32 matmul peak measured in the same run, compile time, memory (XLA's memory analysis of
the step; device.memory_stats() where the backend has it, which the CPU backend does not; the
process's peak RSS), and for the U-Nets DDIM images/s at 10, 50 and 1000 steps with the
sampler's overhead over steps x one network call. With torch + diffusers installed, the same
U-Net in diffusers (parameter counts asserted equal within 1%) is timed the same way and the
jaxgen/PyTorch ratios are reported.

Every measurement runs in its own process (jaxgen and PyTorch never share one: OpenMP's spinning
threads and XLA's pool would slow each other). Times are medians of repeats after a warm-up.
The speed of a shared machine drifts over minutes (the small DDPM U-Net trained at 0.58 of
PyTorch in one pair of processes and at 1.06 in the next, 2026-12-07), so `--pairs N` runs each
row that has a PyTorch counterpart as N processes per side, alternated jaxgen, PyTorch, PyTorch,
jaxgen, ... (a drift then falls on both sides alike): each figure is the median over its side's
processes, and the tables list the ratio of each pass.
Writes benchmarks/results/suite.json and suite.md (--quick: suite_quick.*; --only merges its
rows into the existing file) and prints the tables.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rows import ROWS  # noqa: E402

RESULTS = HERE / "results"


def _worker(script: str, args: list[str], env: dict, timeout: float) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  cmd = [sys.executable, str(HERE / script), *args, "--out", out]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(error=f"timed out after {timeout:.0f} s")
  wall = time.perf_counter() - t0
  try:
    if proc.returncode != 0:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
      return dict(error=f"exit {proc.returncode}: " + " | ".join(tail))
    with open(out) as fh:
      res = json.load(fh)
    res["process_wall_s"] = wall
    return res
  finally:
    os.unlink(out)


# Figures of a worker's result that are timings (medians over the passes of --pairs); the rest
# (parameter counts, memory, batch sizes) is the first pass's.
_TIMED = ("_s", "_pct")


def combine(passes: list[dict]) -> dict:
  """One side's results of a row's passes as one: each timing figure the median over the passes
  that have it, everything else the first good pass's; the passes kept under "passes" when
  there are several. A side whose every pass failed is its first error."""
  good = [r for r in passes if "error" not in r]
  if not good:
    return passes[0]
  if len(passes) == 1:
    return good[0]
  out = dict(good[0])
  for k, v in good[0].items():
    if k.endswith(_TIMED) and isinstance(v, (int, float)) and not isinstance(v, bool):
      out[k] = statistics.median(r[k] for r in good if isinstance(r.get(k), (int, float)))
  out["passes"] = passes
  return out


def pass_order(pairs: int) -> list[str]:
  """The sides' processes of a row in running order: jaxgen, torch, torch, jaxgen, ..."""
  return [side for i in range(pairs)
          for side in (("jaxgen", "torch") if i % 2 == 0 else ("torch", "jaxgen"))]


def passes_text(rows: list[dict]) -> str:
  """The jaxgen/PyTorch ratio of each pass (pass i of jaxgen against pass i of PyTorch) of the
  rows run with --pairs; empty when none was."""
  lines = []
  for r in rows:
    j, t = r.get("jaxgen", {}), r.get("torch", {})
    if "passes" not in j or "passes" not in t:
      continue
    keys = ["train_images_per_s"] + sorted(
        (k for k in j if k.startswith("ddim") and k.endswith("_images_per_s")),
        key=lambda k: int(k[4:].split("_")[0]))
    parts = []
    for k in keys:
      ratios = [_ratio(a.get(k), b.get(k)) for a, b in zip(j["passes"], t["passes"])]
      if any(x is not None for x in ratios):
        name = "training" if k == "train_images_per_s" else f"DDIM {k[4:].split('_')[0]}"
        parts.append(f"{name} " + " / ".join(_fmt(x) for x in ratios))
    lines.append(f"- `{r['row']}`, {len(j['passes'])} jaxgen and {len(t['passes'])} PyTorch "
                 "processes, jaxgen/PyTorch per pass: " + "; ".join(parts))
  if not lines:
    return ""
  return ("Rows run as alternated processes (--pairs: jaxgen, PyTorch, PyTorch, jaxgen, ...); "
          "the tables above give each side's median over its passes.\n\n" + "\n".join(lines))


def _wait_idle(limit: float) -> None:
  t0 = time.time()
  while os.getloadavg()[0] > 0.5 and time.time() - t0 < limit:
    time.sleep(10)


def _cpu_model() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor()


def _fmt(v, digits=3):
  if v is None or v == "":
    return ""
  if isinstance(v, float):
    if abs(v) >= 100:
      return f"{v:,.0f}"
    return f"{v:.{digits}g}"
  if isinstance(v, int):
    return f"{v:,}"
  return str(v)


def _table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def _mb(v):
  return None if v is None else v / 2 ** 20


def _ratio(a, b):
  return None if not a or not b else a / b


def _run(row: dict, meta: dict) -> dict:
  """The run a row was measured in (rows merged from an earlier run keep theirs)."""
  return row.get("run") or dict(date=meta.get("date"),
                                matmul_peak_flops_per_s=meta.get("matmul_peak_flops_per_s"))


def tables(data: dict) -> str:
  meta, rows = data["meta"], data["rows"]
  train_h = ["row", "devices", "batch", "params", "train img/s", "step ms", "GFLOP/step", "GFLOP/s",
             "% matmul peak", "compile s", "XLA peak MB", "RSS peak MB"]
  has_torch = any("torch" in r for r in rows)
  if has_torch:
    train_h += ["PyTorch img/s", "jaxgen/PyTorch"]
  memory_rows = [r for r in rows if r.get("group") == "memory"]
  rows = [r for r in rows if r.get("group", "speed") == "speed"]
  train = []
  for r in rows:
    j = r.get("jaxgen", {})
    if "error" in j:
      train.append([r["row"], "error: " + j["error"][:120]] + [""] * (len(train_h) - 2))
      continue
    fl = j.get("achieved_flops_per_s")
    peak = _run(r, meta).get("matmul_peak_flops_per_s")  # measured in the row's own run
    line = [r["row"], j.get("devices"), j.get("batch"), j.get("params"),
            j.get("train_images_per_s"),
            1e3 * j["step_s"], (j.get("flops_per_step") or 0) / 1e9, (fl or 0) / 1e9,
            100 * fl / peak if fl and peak else None, j.get("lower_s", 0) + j.get("compile_s", 0),
            _mb(j.get("xla_peak_bytes")), _mb(j.get("rss_peak_bytes"))]
    if has_torch:
      t = r.get("torch", {})
      if "error" in t:
        line += ["error: " + t["error"][:120], ""]
      else:
        line += [t.get("train_images_per_s"),
                 _ratio(j.get("train_images_per_s"), t.get("train_images_per_s"))]
    train.append(line)
  out = ["## Training step (jaxgen: make_train_step + task loss + AdamW)", "",
         _table(train_h, train)]

  steps = sorted({int(k[4:-2]) for r in rows for k in r.get("jaxgen", {})
                  if k.startswith("ddim") and k.endswith("_s") and k[4:-2].isdigit()})
  samp_rows = [r for r in rows if r.get("jaxgen", {}).get("sample_batch")]
  if samp_rows:
    h = ["row", "devices", "batch", "net call ms (batch)"]
    for s in steps:
      h += [f"DDIM {s} img/s", f"{s}: overhead %"]
    if has_torch:
      h += ["PyTorch net call ms"] + [f"PyTorch DDIM {s} img/s" for s in steps] + \
          [f"jaxgen/PyTorch {s}" for s in steps]
    lines = []
    for r in samp_rows:
      j, t = r["jaxgen"], r.get("torch", {})
      line = [r["row"], j.get("sample_devices", j.get("devices")), j["sample_batch"],
              f"{1e3 * j['net_eval_s']:.4g} ({j['net_eval_batch']})"]
      for s in steps:
        line += [j.get(f"ddim{s}_images_per_s"), j.get(f"ddim{s}_overhead_pct")]
      if has_torch:
        line += [1e3 * t["net_eval_s"] if t.get("net_eval_s") else None]
        line += [t.get(f"ddim{s}_images_per_s") for s in steps]
        line += [_ratio(j.get(f"ddim{s}_images_per_s"), t.get(f"ddim{s}_images_per_s"))
                 for s in steps]
      lines.append(line)
    out += ["", "## Sampling (DDIM; guided models evaluate a doubled batch per step)", "",
            _table(h, lines)]
  alternated = passes_text(rows)
  if alternated:
    out += ["", "## Alternated passes", "", alternated]
  out += ["", "## Weak scaling, on paper", "", WEAK_SCALING_TEXT, "", weak_scaling(rows)]
  if memory_rows:
    out += ["", "## Memory and precision (per device; XLA's memory analysis of the compiled step)",
            "", memory_table(memory_rows)]
  return "\n".join(out)


# Links of the estimate (assumed, not measured here): hosts on 10 and 100 Gbit/s Ethernet.
LINKS_GB_S = {"10 GbE": 1.25, "100 GbE": 12.5}
SCALE_DEVICES = (8, 64, 512)
WEAK_SCALING_TEXT = (
    "Data parallel with the per-device batch fixed: each step adds a ring all-reduce of the "
    "float32 gradients, 2(N-1)/N x 4 bytes x parameters per device, at the link's bandwidth "
    "(assumed, listed in the header of each column), to the step time measured above on one "
    "device (rows measured on one device only). Efficiency = compute / (compute + all-reduce), "
    "i.e. no overlap of the two (XLA overlaps part of it, so this is a floor). FSDP moves 1.5x "
    "the bytes of this all-reduce (all-gather of parameters forward and backward, reduce-scatter "
    "of gradients).")


def weak_scaling(rows: list[dict]) -> str:
  h = ["row", "grad MB", "step s (1 device)"] + [f"N={n}, {link}" for link in LINKS_GB_S
                                                 for n in SCALE_DEVICES]
  lines = []
  for r in rows:
    j = r.get("jaxgen", {})
    if "error" in j or not j.get("params") or j.get("devices", 1) != 1:
      continue
    grad = 4.0 * j["params"]
    line = [r["row"], grad / 2 ** 20, j["step_s"]]
    for bw in LINKS_GB_S.values():
      for n in SCALE_DEVICES:
        comm = 2 * (n - 1) / n * grad / (bw * 1e9)
        line.append(f"{100 * j['step_s'] / (j['step_s'] + comm):.0f}%")
    lines.append(line)
  return _table(h, lines)


def memory_table(rows: list[dict]) -> str:
  h = ["row", "devices", "batch (global)", "train img/s", "step ms", "compile s",
       "params+opt MB / device", "temporaries MB / device", "XLA peak MB / device",
       "peak vs f32", "JAX residuals MB (global)"]
  ref = next((r["jaxgen"].get("xla_peak_bytes") for r in rows
              if r["row"].endswith("_f32") and "error" not in r["jaxgen"]), None)
  lines = []
  for r in rows:
    j = r["jaxgen"]
    if "error" in j:
      lines.append([r["row"], "error: " + j["error"][:120]] + [""] * (len(h) - 2))
      continue
    peak = j.get("xla_peak_bytes")
    lines.append([r["row"], j.get("devices"), j.get("batch"), j.get("train_images_per_s"),
                  1e3 * j["step_s"], j.get("lower_s", 0) + j.get("compile_s", 0),
                  _mb(j.get("xla_argument_bytes")), _mb(j.get("xla_temp_bytes")), _mb(peak),
                  f"{peak / ref:.2f}x" if peak and ref else None,
                  _mb(j.get("jax_residual_bytes"))])
  return _table(h, lines)


def header(meta: dict) -> str:
  keys = ["date", "cpu", "cpu_count", "platform", "jax", "torch", "torch_threads", "xla_flags",
          "malloc", "quick", "pairs", "matmul_peak_gflops", "torch_matmul_peak_gflops", "wall_s",
          "load_start", "load_end"]
  return ", ".join(f"{k}={_fmt(meta[k])}" for k in keys if k in meta)


def row_devices(row, quick: bool) -> tuple[int, int]:
  """(host devices of the row's process, devices it trains on): the row's own count for both,
  else as the CLI picks them (jaxgen.runtime): `jaxgen train` by the batch and the parameter
  count, `jaxgen sample` all of default_cpu_devices()."""
  if row.devices is not None:
    return row.devices, row.devices
  from jaxgen import app
  from jaxgen.runtime import cpu_devices_for_batch, cpu_split_pays, default_cpu_devices
  from jaxgen.train.loop import param_count
  batch = row.train_batch(quick)
  train = cpu_devices_for_batch(batch)
  if train > 1 and not cpu_split_pays(
      param_count(app.build_task(app.load_config(row.config_spec(), list(row.overrides)))), batch):
    train = 1
  return (max(train, default_cpu_devices()) if row.sample_batch else train), train


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="the rows marked quick, smaller settings "
                 "(about 5 minutes on 2 cores)")
  p.add_argument("--only", default="", help="comma-separated rows")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
  p.add_argument("--xla-flags", default=None,
                 help="XLA_FLAGS for the jaxgen processes (default: the environment's)")
  p.add_argument("--malloc", choices=("keep", "system"), default="keep",
                 help="the C allocator of both sides' processes (jaxgen.host_memory): keep freed "
                      "memory for reuse (the CLI's default) or glibc's default")
  p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
  p.add_argument("--stem", default=None,
                 help="results file name (default suite, or suite_quick with --quick)")
  p.add_argument("--tables", action="store_true",
                 help="only re-write the markdown tables from the last JSON results "
                      "(of --stem, else suite and suite_quick)")
  p.add_argument("--pairs", type=int, default=1, metavar="N",
                 help="for rows with a PyTorch counterpart: N processes a side, alternated "
                      "jaxgen, PyTorch, PyTorch, jaxgen, ...; figures are medians over them")
  p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                 help="first wait up to SECONDS for the 1-minute load average to fall below 0.5 "
                      "(the timings assume the cores are free)")
  a = p.parse_args()
  if a.pairs < 1:
    p.error(f"--pairs must be at least 1, got {a.pairs}")
  if a.tables:
    for stem in [a.stem] if a.stem else ("suite", "suite_quick"):
      path = RESULTS / f"{stem}.json"
      if path.exists():
        write_tables(stem, json.loads(path.read_text()))
    return
  t_start = time.perf_counter()
  names = [n for n in a.only.split(",") if n] or [
      n for n, r in ROWS.items() if (r.quick or not a.quick) and r.group != "gpu"]
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
  use_torch = (not a.no_torch and importlib.util.find_spec("torch") is not None
               and importlib.util.find_spec("diffusers") is not None)
  os.environ["JAXGEN_MALLOC"] = a.malloc  # both sides' workers inherit it
  jax_env = dict(os.environ)
  if a.xla_flags is not None:
    jax_env["XLA_FLAGS"] = a.xla_flags
  quick = ["--quick"] if a.quick else []

  if a.wait_idle:
    _wait_idle(a.wait_idle)
  import jax
  meta = dict(load_start=os.getloadavg()[0], date=time.strftime("%Y-%m-%d %H:%M"),
              cpu=_cpu_model(), cpu_count=os.cpu_count(),
              platform=jax.default_backend(), jax=jax.__version__, quick=a.quick,
              xla_flags=jax_env.get("XLA_FLAGS", ""), malloc=a.malloc, pairs=a.pairs)
  print("matmul peak ...", flush=True)
  peak = _worker("bench_jax.py", ["peak"], jax_env, a.timeout)
  meta["matmul_peak_flops_per_s"] = peak.get("flops_per_s")
  meta["matmul_peak_gflops"] = (peak.get("flops_per_s") or 0) / 1e9
  if use_torch:
    tpeak = _worker("bench_torch.py", ["peak"], dict(os.environ), a.timeout)
    meta["torch_matmul_peak_gflops"] = (tpeak.get("flops_per_s") or 0) / 1e9
    meta["torch_threads"] = tpeak.get("threads")
    import torch
    meta["torch"] = torch.__version__

  rows = []
  for name in names:
    row = ROWS[name]
    env = dict(jax_env)
    devices, train_devices = row_devices(row, a.quick)
    args = [name, *quick]
    if devices > 1 and "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={devices}").strip()
      args += ["--train-devices", str(train_devices)]
    runs = {"jaxgen": [], "torch": []}
    for side in pass_order(a.pairs) if use_torch and row.torch else ["jaxgen"]:
      if side == "jaxgen":
        print(f"{name}: jaxgen ...", flush=True)
        j = _worker("bench_jax.py", args, env, a.timeout)
        print(f"  {j['error']}" if "error" in j else
              f"  {j['train_images_per_s']:.4g} img/s, {j['process_wall_s']:.0f} s", flush=True)
      else:
        print(f"{name}: PyTorch ...", flush=True)
        first = next((r for r in runs["jaxgen"] if "error" not in r), None)
        expect = ["--expect-params", str(first["unet_params"])] if first else []
        j = _worker("bench_torch.py", [name, *quick, *expect], dict(os.environ), a.timeout)
        print(f"  {j['error']}" if "error" in j else f"  {j['train_images_per_s']:.4g} img/s",
              flush=True)
      runs[side].append(j)
    res = dict(row=name, what=row.what, group=row.group, jaxgen=combine(runs["jaxgen"]))
    if runs["torch"]:
      res["torch"] = combine(runs["torch"])
    res["run"] = dict(date=meta["date"], cpu=meta["cpu"],
                      matmul_peak_flops_per_s=meta["matmul_peak_flops_per_s"])
    rows.append(res)

  stem = a.stem or ("suite_quick" if a.quick else "suite")
  path = RESULTS / f"{stem}.json"
  if a.only and path.exists():  # merge: keep the other rows of the last full run
    old = json.loads(path.read_text())
    done = {r["row"] for r in rows}
    kept = [dict(r, run=_run(r, old["meta"])) for r in old["rows"] if r["row"] not in done]
    rows = kept + rows
    order = list(ROWS)
    rows.sort(key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
  meta["wall_s"] = time.perf_counter() - t_start
  meta["load_end"] = os.getloadavg()[0]
  data = dict(meta=meta, rows=rows)
  RESULTS.mkdir(exist_ok=True)
  path.write_text(json.dumps(data, indent=1) + "\n")
  write_tables(stem, data)
  print(path)


def write_tables(stem: str, data: dict) -> None:
  body = tables(data)
  date = data["meta"].get("date")
  what = "\n".join(f"- `{r['row']}`: {r['what']}" + (
      f" (measured in the run of {_run(r, data['meta'])['date']}, not this one)"
      if _run(r, data["meta"])["date"] != date else "") for r in data["rows"])
  (RESULTS / f"{stem}.md").write_text(
      f"# jaxgen performance suite\n\n{header(data['meta'])}\n\n{what}\n\n{body}\n")
  print(header(data["meta"]))
  print(body)


if __name__ == "__main__":
  main()

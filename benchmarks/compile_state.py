"""Does compiling in a process slow the programs it runs afterwards? The small DDPM U-Net's train
step (the suite's ddpm_small row, two host devices) is loaded from a persistent compilation cache
and timed, then the process compiles another program (the small latent U-Net's train step, kept
out of the cache so that every run compiles it) and times the same loaded step again.

Per step it also counts the process's minor page faults and context switches (getrusage). A
first process fills a private cache with the step; each run is a process of its own.

python benchmarks/compile_state.py [--runs 3] [--steps 20]
Writes benchmarks/results/compile_state.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
MAIN, OTHER = "ddpm_small", "ldm_small"


def _setup(row_name: str):
  import bench_jax
  from rows import ROWS

  from jaxgen import app
  row = ROWS[row_name]
  config = app.load_config(row.config_spec(),
                           [*row.overrides, f"data.batch_size={row.batch}"])
  task = app.build_task(config)
  return bench_jax.train_setup(task, config, row.batch)


def _timed_steps(compiled, holder, batch, steps: int) -> dict:
  import resource

  import jax
  import numpy as np

  def one():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics

  jax.block_until_ready(one())
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(one())
    times.append(time.perf_counter() - t0)
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  return dict(step_ms=1000 * float(np.median(times)), min_ms=1000 * min(times),
              faults=(r1.ru_minflt - r0.ru_minflt) / steps,
              switches=(r1.ru_nvcsw - r0.ru_nvcsw + r1.ru_nivcsw - r0.ru_nivcsw) / steps,
              sys_ms=1000 * (r1.ru_stime - r0.ru_stime) / steps)


def child(mode: str, cache: str, steps: int) -> dict:
  from jaxgen import host_memory
  host_memory.keep_freed_memory()   # as jaxgen's commands and the suite run
  import jax

  from jaxgen import runtime
  runtime.enable_compilation_cache(cache)
  state, batch, step = _setup(MAIN)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  out = dict(main_compile_s=time.perf_counter() - t0)
  if mode == "prime":
    return out
  holder = dict(state=state)
  before = _timed_steps(compiled, holder, batch, steps)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)   # never written
  other_state, other_batch, other_step = _setup(OTHER)
  t0 = time.perf_counter()
  other_step.lower(other_state, other_batch).compile()
  out["other_compile_s"] = time.perf_counter() - t0
  del other_state, other_batch
  after = _timed_steps(compiled, holder, batch, steps)
  out.update({f"{k}_before": v for k, v in before.items()})
  out.update({f"{k}_after": v for k, v in after.items()})
  out["slowdown"] = after["step_ms"] / before["step_ms"]
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(args.child[0], args.child[1], args.steps)))
    return
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                      "--xla_force_host_platform_device_count=2").strip()

  def run(mode, cache):
    proc = subprocess.run([sys.executable, __file__, "--child", mode, cache, "--steps",
                           str(args.steps)], env=env, capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(f"{mode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])

  from common import write
  rows = []
  with tempfile.TemporaryDirectory() as cache:
    print("prime:", run("prime", cache), flush=True)
    for i in range(args.runs):
      rows.append(dict(run=i + 1, **run("measure", cache)))
      print(rows[-1], flush=True)
  cols = ["run", "main_compile_s", "step_ms_before", "step_ms_after", "slowdown",
          "min_ms_before", "min_ms_after", "faults_before", "faults_after", "switches_before",
          "switches_after", "sys_ms_before", "sys_ms_after", "other_compile_s"]
  path, table = write("compile_state", rows, cols,
                      dict(main=MAIN, other=OTHER, steps=args.steps, devices=2,
                           note="main_compile_s: loading the step from the private cache; "
                                "faults, switches and sys_ms are per step"))
  print(path)
  print(table)


if __name__ == "__main__":
  main()

"""The start of a fresh training run: compiling and running the train state's init, as the loop
does it (runtime.run_once: LLVM's cheapest code generation on the CPU) against plain `jax.jit`.

A model's init draws every parameter array from its own random initialiser, and each draw is an
unrolled threefry hash in the program, so the program is large, slow to compile and runs once.
Per config, in a process of its own with the compilation cache off, the program is lowered once
and compiled both ways (run_once's options first); each is run once on the same key.

python benchmarks/init_compile.py [--configs vae,ddpm_class,clip,dit,ldm,sd_like]
Writes benchmarks/results/init_compile.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def one(name: str) -> dict:
  import jax
  import numpy as np

  from jaxgen import app, runtime
  from jaxgen.train import loop
  if name == "sd_like":
    from rows import SD_LIKE
    config = app.load_config(f"{REPO}/configs/ldm.py", list(SD_LIKE))
  else:
    config = app.load_config(f"{REPO}/configs/{name}.py")
  task = app.build_task(config)
  init, _ = loop._state_factory(task, config, task.example_batch())
  key = jax.random.PRNGKey(0)
  lowered = jax.jit(init).lower(key)
  row = dict(config=name, hlo_lines=len(lowered.as_text().splitlines()))
  out = {}
  for label, options in (("run_once", runtime.RUN_ONCE_COMPILER_OPTIONS), ("jit", None)):
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    t1 = time.perf_counter()
    out[label] = jax.block_until_ready(compiled(key))
    t2 = time.perf_counter()
    row.update({f"{label}_compile_s": t1 - t0, f"{label}_run_s": t2 - t1,
                f"{label}_total_s": t2 - t0})
  row["speedup"] = row["jit_total_s"] / row["run_once_total_s"]
  a, b = (jax.tree.leaves(out[k]) for k in ("run_once", "jit"))
  row["params"] = int(sum(x.size for x in jax.tree.leaves(out["jit"].params)))
  row["max_abs_diff"] = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))
                            for x, y in zip(a, b) if np.asarray(x).size)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="vae,ddpm_class,clip,dit,ldm,sd_like")
  p.add_argument("--one", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.one:
    print(json.dumps(one(args.one)))
    return
  from common import write
  env = dict(os.environ, JAXGEN_COMPILATION_CACHE="off")
  rows = []
  for name in args.configs.split(","):
    proc = subprocess.run([sys.executable, __file__, "--one", name], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(f"{name}: {proc.stderr[-2000:]}")
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(rows[-1], flush=True)
  cols = ["config", "params", "hlo_lines", "run_once_compile_s", "run_once_run_s",
          "run_once_total_s", "jit_compile_s", "jit_run_s", "jit_total_s", "speedup",
          "max_abs_diff"]
  path, table = write("init_compile", rows, cols,
                      dict(xla_flags=os.environ.get("XLA_FLAGS", "")))
  print(path)
  print(table)


if __name__ == "__main__":
  main()

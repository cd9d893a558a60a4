"""What the C allocator costs a big step on the CPU: glibc's default against
jaxgen.host_memory.keep_freed_memory() (the CLI's and the suite's default).

In one process on one host device, alternating the two settings round by round (so that the
machine's drift falls on both alike): a 1024-token self-attention forward (batch 4, 8 heads of
16: the SD-like U-Net's 32x32 level), one network call of the row's U-Net (the row's batch) and
its real train step (make_train_step, the row's optimizer). Per part and setting: the median
and best wall time, minor page faults and kernel CPU seconds per call (getrusage). glibc's
mallopt switches between the settings at run time; M_ARENA_MAX = 1 holds for both (an arena
cannot be taken back from a thread), so "system" here is glibc's mmap and trim defaults.

python benchmarks/host_memory.py [--row ldm_sd_like] [--rounds 3] [--calls 3]

Writes benchmarks/results/host_memory.{json,md}.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("JAXGEN_CPU_DEVICES", "1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from jaxgen import host_memory  # noqa: E402

# glibc's defaults (mallopt(3)): mmap threshold and trim threshold 128 KiB, 65,536 maps
SYSTEM = ((host_memory.M_MMAP_MAX, 65536), (host_memory.M_TRIM_THRESHOLD, 128 * 1024),
          (host_memory.M_MMAP_THRESHOLD, 128 * 1024))
KEEP = tuple(kv for kv in host_memory.KEEP if kv[0] != host_memory.M_ARENA_MAX)


def _mallopt(settings) -> None:
  mallopt = ctypes.CDLL("libc.so.6").mallopt
  for param, value in settings:
    assert mallopt(param, value) == 1, (param, value)


def _calls(fn, n: int) -> dict:
  times = []
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  return dict(times=times, faults=(r1.ru_minflt - r0.ru_minflt) / n,
              sys_s=(r1.ru_stime - r0.ru_stime) / n)


def parts(row_name: str) -> dict:
  """name -> a function running the part once (blocked on)."""
  import cpu_conv
  import jax
  import jax.numpy as jnp
  from rows import ROWS

  from jaxgen import app
  from jaxgen.models.chunked_attention import chunked_attention
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (4, 1024, 8, 16)) for i in range(3))
  attn = jax.jit(chunked_attention)

  cpu_conv.ROW = row_name
  row = ROWS[row_name]
  compiled, state, batch, _ = cpu_conv._ddpm_step(row.overrides)
  holder = [state]

  def step():
    holder[0], m = compiled(holder[0], batch)
    jax.block_until_ready(m)

  config = app.load_config(row.config_spec(), list(row.overrides))
  model = app.build_task(config).model
  x = jnp.zeros((row.batch, *model.latent_shape))
  t = jnp.full((row.batch,), 500, jnp.int32)
  ctx = jax.random.normal(jax.random.PRNGKey(3), (row.batch, config.model.text.context_length,
                                                  config.model.text.width))
  net = jax.jit(lambda p, x, t, c: model.denoise_fn(p)(x, t, c))
  return {"attention": lambda: jax.block_until_ready(attn(q, k, v)),
          "net_call": lambda: jax.block_until_ready(net(holder[0].params, x, t, ctx)),
          "train_step": step}


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--row", default="ldm_sd_like")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--calls", type=int, default=3)
  a = p.parse_args()
  _mallopt(((host_memory.M_ARENA_MAX, 1),))  # before JAX starts its threads
  fns = parts(a.row)
  rows = []
  for name, fn in fns.items():
    calls = a.calls * (4 if name == "attention" else 1)
    got = {"system": [], "keep": []}
    for _ in range(a.rounds):
      for setting, values in (("system", SYSTEM), ("keep", KEEP)):
        _mallopt(values)
        fn()  # the first call after a switch settles the heap
        got[setting].append(_calls(fn, calls))
    for setting, runs in got.items():
      times = [s for r in runs for s in r["times"]]
      rows.append(dict(part=name, malloc=setting, median_ms=1e3 * statistics.median(times),
                       min_ms=1e3 * min(times), calls=len(times),
                       faults_per_call=statistics.mean(r["faults"] for r in runs),
                       kernel_s_per_call=statistics.mean(r["sys_s"] for r in runs)))
      print(rows[-1], flush=True)
  rows.append(dict(part="process", malloc="both",
                   peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
  from common import write
  _, table = write("host_memory", rows, ["part", "malloc", "median_ms", "min_ms", "calls",
                                         "faults_per_call", "kernel_s_per_call", "peak_rss_mb"],
                   dict(row=a.row, rounds=a.rounds))
  print(table)


if __name__ == "__main__":
  main()

"""Shared by the benchmarks: timing, the machine's description, JSON + markdown output."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import time

import jax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def timed(fn, *args, repeats: int = 3, **kwargs) -> dict:
  """Wall seconds of the first call (compile included) and the best of `repeats` warm calls."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args, **kwargs))
  first = time.perf_counter() - t0
  warm = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    warm.append(time.perf_counter() - t0)
  return dict(first_call_s=first, warm_s=min(warm))


def machine() -> dict:
  dev = jax.devices()[0]
  return dict(platform=dev.platform, device=dev.device_kind, device_count=jax.device_count(),
              cpu_count=os.cpu_count(), python=platform.python_version(), jax=jax.__version__,
              date=time.strftime("%Y-%m-%d %H:%M"))


def write(name: str, rows: list[dict], columns: list[str], meta: dict) -> tuple[str, str]:
  RESULTS.mkdir(exist_ok=True)
  data = dict(meta=dict(machine(), **meta), rows=rows)
  (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  table = "\n".join(lines)
  header = ", ".join(f"{k}={v}" for k, v in data["meta"].items())
  (RESULTS / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n{table}\n")
  return str(RESULTS / f"{name}.json"), table


def median_time(fn, *args, repeats: int = 5, warmup: int = 1, min_seconds: float = 0.0,
                block=jax.block_until_ready) -> dict:
  """Median wall seconds of `repeats` calls after `warmup` calls (results blocked on).

  `fn` may carry state between calls (e.g. a donated train state): it is called as fn(*args)
  and what it returns is passed to `block` (jax.block_until_ready; for PyTorch, which runs
  synchronously on the CPU, the identity). With min_seconds, repeats grow until their sum
  reaches it, so that fast functions get enough samples on a noisy machine.
  """
  import statistics
  for _ in range(warmup):
    block(fn(*args))
  times = []
  while len(times) < repeats or sum(times) < min_seconds:
    t0 = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - t0)
    if len(times) >= 50 * max(repeats, 1):
      break
  return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
              repeats=len(times))


def host_malloc() -> str:
  """Applies $JAXGEN_MALLOC to this process's allocator (jaxgen.host_memory; the suite sets
  the same for its jaxgen and PyTorch workers) before any work: 'keep' or 'system'."""
  from jaxgen.host_memory import keep_freed_memory
  return "keep" if keep_freed_memory() else "system"


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (Linux reports KiB)."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

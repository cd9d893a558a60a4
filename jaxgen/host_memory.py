"""How the process's C allocator hands out large host buffers (glibc on Linux).

By default glibc serves each allocation above its mmap threshold (128 KB, rising to at most
32 MB as mapped buffers are freed; from a thread's own arena anything above 64 MB) with a fresh
mmap and returns it to the kernel on free. XLA:CPU allocates each execution's temporaries (1.6
GB for the SD-like train step) and PyTorch each large tensor that way, so every call page-faults
its buffers in again. Measured on a 2-core CPU, alternating the two settings in one process
(benchmarks/results/host_memory.md): the SD-like train step took 420,000 minor faults and 1.15 s
of kernel CPU time per step with glibc's defaults, none kept, and 6.15 against 5.43 s; a
1024-token attention call 103 against 50 ms.

keep_freed_memory() makes the allocator keep what it frees for the next allocation: no mmap
per allocation (M_MMAP_MAX = 0), no trimming of the heap's top (M_TRIM_THRESHOLD), and one
arena for all threads (M_ARENA_MAX = 1: a thread arena's heaps are capped at 64 MB, past which
glibc maps anyway). The cost is resident memory: the process keeps its peak heap.

No JAX import here, so that a PyTorch process can call it too.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
KEEP = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_ARENA_MAX, 1))
ENV = "JAXGEN_MALLOC"  # "system" leaves the allocator as it is


def keep_freed_memory() -> bool:
  """Sets glibc's allocator to reuse freed memory instead of returning it (see the module's
  docstring). Call it before JAX starts its backends (threads that already have an arena keep
  it). A no-op returning False off glibc or with $JAXGEN_MALLOC=system; True when set."""
  raw = os.environ.get(ENV, "")
  setting = raw.strip().lower()
  if setting == "system":
    return False
  if setting not in ("", "keep"):
    from jaxgen.errors import ConfigError
    raise ConfigError(f"{ENV} must be 'keep' (the default) or 'system', got {raw!r}")
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # each one applied even where another is refused; -1 as the trim threshold: never trim
  done = [mallopt(param, v) == 1 for param, v in KEEP]
  return all(done)

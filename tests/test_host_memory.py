"""jaxgen.host_memory: freed host memory is reused instead of being faulted in again."""
import os
import platform
import subprocess
import sys

import pytest

from jaxgen import host_memory
from jaxgen.errors import ConfigError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates, writes and frees a 256 MB buffer with the C allocator four times; prints the minor
# page faults of the last three rounds (the first one faults the pages in whatever it does).
PROBE = """
import ctypes, resource
from jaxgen.host_memory import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 2 ** 28, []
for _ in range(4):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  libc.free(p)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(sum(faults[1:]))
"""


def _probe(mode: str) -> tuple[str, int]:
  env = dict(os.environ, JAXGEN_MALLOC=mode)
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_freed_buffers_are_reused_not_faulted_again():
  set_system, faults_system = _probe("system")
  set_keep, faults_keep = _probe("keep")
  assert (set_system, set_keep) == ("False", "True")
  pages = 3 * 2 ** 28 // os.sysconf("SC_PAGE_SIZE")
  assert faults_system > 0.5 * pages  # glibc's default maps each 256 MB buffer afresh
  assert faults_keep < 0.05 * pages


def test_unknown_setting_is_named(monkeypatch):
  monkeypatch.setenv("JAXGEN_MALLOC", "jemalloc")
  with pytest.raises(ConfigError, match="JAXGEN_MALLOC.*'jemalloc'"):
    host_memory.keep_freed_memory()


def test_system_leaves_the_allocator(monkeypatch):
  monkeypatch.setenv("JAXGEN_MALLOC", "system")
  assert host_memory.keep_freed_memory() is False

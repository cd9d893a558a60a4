"""Test set-up: CPU only, one persistent compilation cache shared by all xdist workers."""
import atexit
import os
import pathlib
import shutil
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import TEST_XLA_FLAGS  # noqa: E402

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles hundreds of small programs and runs each a few times, so compiling is most
# of its time: LLVM's cheapest code generation (the flag sets LLVM's -O level only; XLA's HLO
# passes stay as they are) halves it (tests/tasks/test_contrastive.py with an empty cache:
# 150 s -> 71 s). Subprocesses inherit it; scripts that force a device count append to it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# jaxgen's own cache (the metric's feature networks) in a folder of this run, not ~/.cache/jaxgen:
# the tests must neither leave nets in the user's cache nor use theirs.
if "JAXGEN_CACHE" not in os.environ:
  os.environ["JAXGEN_CACHE"] = tempfile.mkdtemp(prefix="jaxgen-test-cache-")
  atexit.register(shutil.rmtree, os.environ["JAXGEN_CACHE"], ignore_errors=True)
CACHE = os.environ.setdefault(
    "JAXGEN_COMPILATION_CACHE", str(pathlib.Path(tempfile.gettempdir()) / "jaxgen-test-xla"))

import pytest  # noqa: E402

from jaxgen import host_memory, runtime  # noqa: E402

host_memory.keep_freed_memory()  # as every jaxgen command does, before JAX starts its threads
runtime.enable_compilation_cache(CACHE)
runtime.setup_logging()


@pytest.fixture
def repo() -> pathlib.Path:
  return REPO


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops this module's compiled programs once its tests are done, so that an xdist worker
  does not hold every program of the few hundred modules it runs. Twice (CI and a local run of
  2026-12-06) a worker aborted late in the suite inside deserialize_executable, loading the VAE
  train step from the persistent cache, while the same test passed alone with the same cache:
  the cause is not known (pytest's capture hid the native message), and what a worker holds
  (memory, and about three memory mappings per executable, 2,609 for tests/train and
  tests/test_cli.py in one process) is the suspect this removes. The next module reloads what it
  needs from the persistent compilation cache."""
  yield
  import gc

  import jax
  jax.clear_caches()
  gc.collect()

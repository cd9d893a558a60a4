"""Test set-up: CPU only, one persistent compilation cache shared by all xdist workers."""
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
CACHE = os.environ.setdefault(
    "JAXGEN_COMPILATION_CACHE", str(pathlib.Path(tempfile.gettempdir()) / "jaxgen-test-xla"))

import pytest  # noqa: E402

from jaxgen import runtime  # noqa: E402

runtime.enable_compilation_cache(CACHE)
runtime.setup_logging()

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


@pytest.fixture
def repo() -> pathlib.Path:
  return REPO

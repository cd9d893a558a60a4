"""Small shared helpers for the tests."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"  # what conftest.py adds to XLA_FLAGS


def config(name: str, *overrides: str, arg: str = "smoke"):
  from jaxgen import app
  spec = f"{REPO / 'configs' / name}.py" + (f":{arg}" if arg else "")
  return app.load_config(spec, list(overrides))


def files_under(path: pathlib.Path) -> dict[str, int]:
  """Every file below `path` with its size: to assert that nothing was deleted or changed."""
  return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
          if p.is_file()}


def run_python(code: str, *, env: dict | None = None, timeout: int = 600,
               cwd: pathlib.Path = REPO, devices: int | None = None
               ) -> subprocess.CompletedProcess:
  """`python -c code` in the repository; `devices` splits its CPU backend into that many
  devices, keeping the tests' XLA_FLAGS (conftest.py)."""
  full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
  if devices is not None:
    full_env["XLA_FLAGS"] = (f"{full_env.get('XLA_FLAGS', '')} "
                             f"--xla_force_host_platform_device_count={devices}").strip()
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, timeout=timeout,
                        capture_output=True, text=True)


def params_of(state):
  import jax
  import numpy as np
  return jax.tree.map(np.asarray, jax.device_get(state))


def check_zeros_for_pretrained(task) -> None:
  """`task.zeros_for_pretrained` zeroes some arrays, and only arrays that `task.pretrained`
  replaces: from a drawn state and from that state zeroed, `pretrained` gives the same state."""
  import jax
  import numpy as np
  rng = np.random.default_rng(0)
  example = task.example_batch()
  shapes = jax.eval_shape(lambda k: task.init(k, example), jax.random.PRNGKey(0))
  drawn = jax.tree.map(lambda s: (rng.normal(size=s.shape) + 2).astype(s.dtype), shapes)
  zeroed = jax.tree.map(np.asarray, task.zeros_for_pretrained(*drawn))
  changed = [b for a, b in zip(jax.tree.leaves(drawn), jax.tree.leaves(zeroed))
             if not np.array_equal(a, b)]
  assert changed and not any(np.any(b) for b in changed)
  for a, b in zip(jax.tree.leaves(task.pretrained(*drawn)),
                  jax.tree.leaves(task.pretrained(*zeroed)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

"""The persistent compilation cache keeps every program, the quickest to compile included."""
from helpers import run_python


def test_small_programs_are_cached_and_read_back(tmp_path):
  """A program that compiles in milliseconds (as each of flax's eager `init` operations does) is
  written to the cache in one process and read from it in the next, which compiles nothing."""
  code = """
import jax, jax.numpy as jnp
from jaxgen import runtime
assert runtime.enable_compilation_cache() == {path!r}
from jax import monitoring
hits = []
HIT = "/jax/compilation_cache/cache_hits"
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event == HIT else None)
print(float(jax.jit(lambda x: x * 3 + 1)(jnp.float32(2))), len(hits))
"""
  cache = tmp_path / "xla"
  env = {"JAXGEN_COMPILATION_CACHE": str(cache)}
  first = run_python(code.format(path=str(cache)), env=env)
  assert first.returncode == 0, first.stderr
  assert first.stdout.split() == ["7.0", "0"]
  written = sorted(p.name for p in cache.iterdir())
  assert any(name.startswith("jit__lambda") for name in written), written
  second = run_python(code.format(path=str(cache)), env=env)
  assert second.returncode == 0, second.stderr
  value, hits = second.stdout.split()
  assert value == "7.0" and int(hits) == len(written)  # each program read back, none compiled
  assert sorted(p.name for p in cache.iterdir()) == written

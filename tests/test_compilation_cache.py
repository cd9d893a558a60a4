"""The persistent compilation cache keeps every program, the quickest to compile included; a
program that runs once compiles with LLVM's cheapest code generation on the CPU."""
import jax
import numpy as np

from helpers import run_python
from jaxgen import runtime
from jaxgen.train.mesh import single_device

# Counts, in a subprocess, the programs it reads from the persistent cache (into `hits`).
COUNT_CACHE_HITS = """from jax import monitoring
hits = []
HIT = "/jax/compilation_cache/cache_hits"
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event == HIT else None)
"""


def test_small_programs_are_cached_and_read_back(tmp_path):
  """A program that compiles in milliseconds (as each of flax's eager `init` operations does) is
  written to the cache in one process and read from it in the next, which compiles nothing."""
  cache = tmp_path / "xla"
  code = f"""
import jax, jax.numpy as jnp
from jaxgen import runtime
from jaxgen.train.mesh import single_device
assert runtime.enable_compilation_cache() == {str(cache)!r}
{COUNT_CACHE_HITS}
print(float(jax.jit(lambda x: x * 3 + 1)(jnp.float32(2))), len(hits))
"""
  env = {"JAXGEN_COMPILATION_CACHE": str(cache)}
  first = run_python(code, env=env)
  assert first.returncode == 0, first.stderr
  assert first.stdout.split() == ["7.0", "0"]
  written = sorted(p.name for p in cache.iterdir())
  assert any(name.startswith("jit__lambda") for name in written), written
  second = run_python(code, env=env)
  assert second.returncode == 0, second.stderr
  value, hits = second.stdout.split()
  assert value == "7.0" and int(hits) == len(written)  # each program read back, none compiled
  assert sorted(p.name for p in cache.iterdir()) == written


def _init_like(key):
  """Random initialisers of several shapes, as a model's init has."""
  keys = jax.random.split(key, 3)
  return {"w": jax.random.truncated_normal(keys[0], -2.0, 2.0, (16, 8)),
          "b": jax.random.normal(keys[1], (8,)),
          "u": jax.random.uniform(keys[2], (3, 5), minval=-1.0)}


def test_run_once_compiles_cheaply_and_gives_jits_values(monkeypatch):
  """runtime.run_once compiles with RUN_ONCE_COMPILER_OPTIONS on the CPU up to
  RUN_ONCE_MAX_ELEMENTS output values, keeps jit's keyword arguments (out_shardings), and its
  values are jit's up to the last bit."""
  seen = []
  compile_ = jax.stages.Lowered.compile

  def spy(self, compiler_options=None, **kw):
    seen.append(compiler_options)
    return compile_(self, compiler_options=compiler_options, **kw)

  monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
  sharding = single_device(jax.devices()[0])
  key = jax.random.PRNGKey(3)
  got = runtime.run_once(_init_like, key, out_shardings=sharding)
  assert seen == [runtime.RUN_ONCE_COMPILER_OPTIONS]
  assert runtime.RUN_ONCE_COMPILER_OPTIONS == {"xla_backend_optimization_level": 0}
  want = jax.jit(_init_like)(key)
  for name in want:
    assert got[name].sharding == sharding
    np.testing.assert_allclose(got[name], want[name], rtol=2e-7, atol=2e-7)
  assert not np.array_equal(got["w"], jax.jit(_init_like)(jax.random.PRNGKey(4))["w"])
  monkeypatch.setattr(runtime, "RUN_ONCE_MAX_ELEMENTS", 16 * 8 + 8 + 3 * 5 - 1)
  runtime.run_once(_init_like, key)  # one value too many: compiled as jit compiles it
  assert seen == [runtime.RUN_ONCE_COMPILER_OPTIONS, None]


def test_run_once_programs_are_cached(tmp_path):
  """A run_once program goes through the persistent cache like any other: the second process
  reads it back and compiles nothing."""
  code = f"""
import jax
from jaxgen import runtime
from jaxgen.train.mesh import single_device
runtime.enable_compilation_cache()
{COUNT_CACHE_HITS}
x = runtime.run_once(lambda k: jax.random.normal(k, (4, 3)) * 2, jax.random.PRNGKey(0))
print(float(x.sum()), len(hits))
"""
  env = {"JAXGEN_COMPILATION_CACHE": str(tmp_path / "xla")}
  first = run_python(code, env=env)
  assert first.returncode == 0, first.stderr
  written = len(list((tmp_path / "xla").iterdir()))
  second = run_python(code, env=env)
  assert second.returncode == 0, second.stderr
  assert second.stdout.split()[0] == first.stdout.split()[0]
  assert int(second.stdout.split()[1]) == written and written >= 1

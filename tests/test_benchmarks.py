"""The benchmark scripts run with benchmarks/ first on sys.path: none may take the name of an
installed module (a benchmarks/tokenizers.py once hid Hugging Face's tokenizers from diffusers)."""
import importlib.util
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_no_benchmark_script_hides_an_installed_module(monkeypatch):
  bench = str(REPO / "benchmarks")
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p != bench])
  stems = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
  assert "run" in stems and "bench_torch" in stems
  for name in ("tokenizers", "torch", "diffusers", "jax"):  # the check itself finds modules
    assert importlib.util.find_spec(name) is not None, name
  clashes = [s for s in stems if s not in sys.modules and importlib.util.find_spec(s)]
  clashes += [s for s in stems if s in sys.modules and s != "__main__"]
  assert not clashes, f"benchmarks/ scripts named like installed modules: {clashes}"

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


def test_alternated_passes_combine_as_medians_and_list_each_ratio(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import run

  assert run.pass_order(1) == ["jaxgen", "torch"]
  assert run.pass_order(3) == ["jaxgen", "torch", "torch", "jaxgen", "jaxgen", "torch"]
  jax_passes = [dict(train_images_per_s=10.0, step_s=6.4, unet_params=7, ddim10_images_per_s=2.0),
                dict(train_images_per_s=16.0, step_s=4.0, unet_params=7, ddim10_images_per_s=3.0),
                dict(train_images_per_s=12.0, step_s=5.3, unet_params=7),
                dict(error="exit 1: killed")]
  torch_passes = [dict(train_images_per_s=8.0, ddim10_images_per_s=4.0),
                  dict(train_images_per_s=20.0, ddim10_images_per_s=2.0)]
  j, t = run.combine(jax_passes), run.combine(torch_passes)
  # timings: the median of the good passes that have the figure; the rest from the first
  assert (j["train_images_per_s"], j["step_s"], j["ddim10_images_per_s"]) == (12.0, 5.3, 2.5)
  assert j["unet_params"] == 7 and j["passes"] == jax_passes
  assert t["train_images_per_s"] == 14.0
  assert run.combine([dict(error="a"), dict(error="b")]) == dict(error="a")
  assert run.combine(jax_passes[:1]) == jax_passes[0]  # one pass: as it came, no "passes"
  text = run.passes_text([dict(row="r", jaxgen=j, torch=t), dict(row="s", jaxgen=jax_passes[0])])
  line = [x for x in text.splitlines() if x.startswith("- ")]
  assert line == ["- `r`, 4 jaxgen and 2 PyTorch processes, jaxgen/PyTorch per pass: "
                  "training 1.25 / 0.8; DDIM 10 0.5 / 1.5"]
  assert run.passes_text([dict(row="s", jaxgen=jax_passes[0])]) == ""


def test_tables_rewrites_the_named_results_only(monkeypatch, tmp_path):
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import run

  results = REPO / "benchmarks" / "results"
  (tmp_path / "cores.json").write_text((results / "cores.json").read_text())
  (tmp_path / "suite.json").write_text((results / "suite.json").read_text())
  monkeypatch.setattr(run, "RESULTS", tmp_path)
  monkeypatch.setattr(sys, "argv", ["run.py", "--stem", "cores", "--tables"])
  run.main()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cores.json", "cores.md", "suite.json"]
  assert (tmp_path / "cores.md").read_text() == (results / "cores.md").read_text()

"""The module layers: imports only go down. Nothing below the tasks knows the tasks or the app
layer (the registry), not even inside a function."""
import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
# Top: the CLI and the command wiring, the app layer (registry, configs, runs), then the tasks.
ABOVE_TASKS = {"jaxgen.cli", "jaxgen.commands", "jaxgen.app", "jaxgen.__main__"}
UPPER = ("jaxgen.tasks", "jaxgen.app", "jaxgen.commands", "jaxgen.cli")


def imports_of(path: pathlib.Path) -> set[str]:
  """Every module a file imports, at the top or inside functions."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(REPO).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


def test_nothing_below_the_tasks_imports_tasks_or_the_app_layer():
  offenders = []
  for path in sorted((REPO / "jaxgen").rglob("*.py")):
    name = module_name(path)
    if name in ABOVE_TASKS or name.startswith("jaxgen.tasks"):
      continue
    bad = sorted(m for m in imports_of(path) if m.startswith(UPPER))
    if bad:
      offenders.append(f"{name}: {bad}")
  assert not offenders, "\n".join(offenders)


def test_tasks_do_not_import_the_app_layer():
  for path in sorted((REPO / "jaxgen" / "tasks").rglob("*.py")):
    bad = sorted(m for m in imports_of(path) if m.startswith(UPPER[1:]))
    assert not bad, f"{module_name(path)}: {bad}"


def test_models_import_no_training_plumbing():
  """models/ holds flax modules: no orbax, tfds, mesh or train loop there."""
  for path in sorted((REPO / "jaxgen" / "models").rglob("*.py")):
    bad = sorted(m for m in imports_of(path)
                 if m.startswith(("orbax", "tensorflow_datasets", "jaxgen.train", "jaxgen.data")))
    assert not bad, f"{module_name(path)}: {bad}"

"""Executes every notebook on the smoke configs, as CI does."""
import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXGEN_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("JAXGEN_NOTEBOOK_SMOKE", "1")
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook shows no picture"

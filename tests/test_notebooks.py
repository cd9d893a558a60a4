"""Executes every notebook on the smoke configs, as CI does."""
import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO

pytestmark = pytest.mark.slow

NOTEBOOKS = REPO / "notebooks"
# Run in this order in one runs folder, as a user runs them: each notebook's own run is the
# folder named first (its default under runs/), and it trains only the runs that the notebooks
# before it did not (text_to_image reuses clip's run; image_to_text reuses clip's, the
# autoencoder's and the latent model's).
CHAIN = {"clip": ("clip",), "text_to_image": ("ldm", "ldm_autoencoder"),
         "image_to_text": ("captioner", "ddpm")}


def _execute(stem: str, workdir, monkeypatch) -> None:
  monkeypatch.setenv("JAXGEN_WORKDIR", str(workdir))
  monkeypatch.setenv("JAXGEN_NOTEBOOK_SMOKE", "1")
  path = NOTEBOOKS / f"{stem}.ipynb"
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"], stem
  assert any("image/png" in o.get("data", {}) for o in outputs), f"{stem} shows no picture"


@pytest.mark.parametrize("stem", sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")
                                        if p.stem not in CHAIN))
def test_notebook_runs(stem, tmp_path, monkeypatch):
  _execute(stem, tmp_path / "run", monkeypatch)


def test_text_notebooks_reuse_each_others_runs(tmp_path, monkeypatch):
  assert set(CHAIN) <= {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
  runs = lambda: {p.parent.name for p in tmp_path.glob("*/checkpoints")}
  for stem, trains in CHAIN.items():
    before = runs()
    _execute(stem, tmp_path / trains[0], monkeypatch)
    assert runs() - before == set(trains), f"{stem} trained {sorted(runs() - before)}"

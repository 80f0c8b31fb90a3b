"""notebooks/exploration.ipynb runs headless (nbclient) on the tiny config and shows its plots."""

import os
import time

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "exploration.ipynb"


def test_exploration_notebook_runs_headless(monkeypatch):
    monkeypatch.setenv("ADREC_NOTEBOOK_CONFIG", "configs/tiny.yaml")
    monkeypatch.setenv("ADREC_NOTEBOOK_MOVIELENS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    started = time.monotonic()
    NotebookClient(nb, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    elapsed = time.monotonic() - started
    print(f"notebook executed in {elapsed:.0f}s")

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4, f"expected the data, training, Recall@K + reliability and score figures, got {len(images)}"
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "config configs/tiny.yaml: encoder 'tiny'" in text
    assert "server stopped: True" in text
    if os.path.isdir(ROOT.parent / "shared" / "data" / "ml-latest-small"):
        assert "label rates: click" in text and "ml-latest-small" in text

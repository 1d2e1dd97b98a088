"""The notebooks in ``notebooks/`` execute headless against a tiny ablation trained in the session.

They are run as ``pytest --nbmake`` runs them (``nbclient``, the notebook's folder as working
directory), pointed at the tiny ablation through ``ENERGYLAB_RUN_DIR`` / ``ENERGYLAB_ABLATION_DIR``;
one run reads the default ``../data/reference/ablation`` of a copy of the notebook laid out as in
the repository.
"""

from __future__ import annotations

import base64
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_figures import tiny_study

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_latent_covariance_over_epochs", "02_ablation", "03_paper_figures"]
FIGURES = {"01_latent_covariance_over_epochs": 3, "02_ablation": 4, "03_paper_figures": 8}
"""Figures each notebook shows for the tiny ablation (not an R-D sweep)."""


@pytest.fixture(scope="session")
def tiny_ablation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_study(tmp_path_factory, "ablation")


def _execute(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def _images(nb: nbformat.NotebookNode) -> int:
    pngs = [o["data"]["image/png"] for c in nb.cells for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert all(base64.b64decode(p)[:4] == b"\x89PNG" for p in pngs)
    return len(pngs)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_clean_with_a_parameters_cell(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert "../data/reference/ablation" in params[0].source
    variable = "ENERGYLAB_RUN_DIR" if name.startswith("01") else "ENERGYLAB_ABLATION_DIR"
    assert f'os.environ.get("{variable}"' in params[0].source


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_headless(name: str, tiny_ablation: Path, monkeypatch) -> None:
    monkeypatch.setenv("ENERGYLAB_RUN_DIR", str(tiny_ablation / "auxt" / "seed0"))
    monkeypatch.setenv("ENERGYLAB_ABLATION_DIR", str(tiny_ablation))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend
    nb = _execute(NOTEBOOKS / f"{name}.ipynb")
    assert _images(nb) == FIGURES[name]


def test_notebook_reads_the_reference_path_by_default(tiny_ablation: Path, tmp_path: Path,
                                                      monkeypatch) -> None:
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "data" / "reference").mkdir(parents=True)
    (tmp_path / "data" / "reference" / "ablation").symlink_to(tiny_ablation)
    name = "01_latent_covariance_over_epochs.ipynb"
    (tmp_path / "notebooks" / name).write_bytes((NOTEBOOKS / name).read_bytes())
    monkeypatch.delenv("ENERGYLAB_RUN_DIR", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = _execute(tmp_path / "notebooks" / name)
    assert _images(nb) == FIGURES["01_latent_covariance_over_epochs"]

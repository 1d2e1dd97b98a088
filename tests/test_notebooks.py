"""The notebooks in ``notebooks/`` are stored clean, declare a Python 3 kernel, and execute headless.

Execution is ``slow``: against the session's tiny ablation through ``ENERGYLAB_RUN_DIR`` /
``ENERGYLAB_ABLATION_DIR`` with the notebook's folder as working directory (as ``pytest --nbmake``
runs them), and notebook 01 on its default input (the repository's reference run) with the
repository root as working directory (as ``jupyter nbconvert --execute notebooks/01_...`` or
papermill from the root run it).
"""

from __future__ import annotations

import base64
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from energylab.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_latent_covariance_over_epochs", "02_ablation", "03_paper_figures", "04_analyze_checkpoints"]
FIGURES = {"01_latent_covariance_over_epochs": 3, "02_ablation": 5, "03_paper_figures": 11,
           "04_analyze_checkpoints": 3}
"""Figures each notebook shows for an ablation that is not an R-D sweep."""


def _execute(path: Path, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
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
    assert "reference_dir()" in params[0].source and "../" not in params[0].source
    variables = {"01": "ENERGYLAB_RUN_DIR", "04": "ENERGYLAB_ANALYSIS_DIR"}
    variable = variables.get(name[:2], "ENERGYLAB_ABLATION_DIR")
    assert f'os.environ.get("{variable}")' in params[0].source


@pytest.mark.parametrize("name", NAMES)
def test_notebook_declares_a_python3_kernel(name: str) -> None:
    meta = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4).metadata
    assert meta.kernelspec.name == "python3" and meta.kernelspec.language == "python"
    assert meta.language_info.name == "python"


def test_reference_dir_is_found_from_the_package(tmp_path: Path, monkeypatch) -> None:
    from energylab.figures import reference_dir

    monkeypatch.chdir(tmp_path)
    assert reference_dir() == ROOT / "data" / "reference"
    assert (reference_dir() / "ablation" / "auxt" / "seed0").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_headless(name: str, tiny_ablation: Path, monkeypatch) -> None:
    # notebook 04 reads its default input, the committed reference analysis
    monkeypatch.delenv("ENERGYLAB_ANALYSIS_DIR", raising=False)
    monkeypatch.setenv("ENERGYLAB_RUN_DIR", str(tiny_ablation / "auxt" / "seed0"))
    monkeypatch.setenv("ENERGYLAB_ABLATION_DIR", str(tiny_ablation))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend
    nb = _execute(NOTEBOOKS / f"{name}.ipynb", NOTEBOOKS)
    assert _images(nb) == FIGURES[name]


@pytest.mark.slow
def test_notebook_01_reads_the_reference_run_from_the_repository_root(monkeypatch) -> None:
    monkeypatch.delenv("ENERGYLAB_RUN_DIR", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = _execute(NOTEBOOKS / "01_latent_covariance_over_epochs.ipynb", ROOT)
    assert _images(nb) == FIGURES["01_latent_covariance_over_epochs"]
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    captures = len(RunDir(ROOT / "data" / "reference" / "ablation" / "auxt" / "seed0").capture_files())
    assert captures >= 2 and f"variant auxt, {captures} captures" in printed

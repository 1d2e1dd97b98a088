"""``energylab.summary``: the committed reference ablation's summary is reproduced number for number
(its ``summary.*`` were written by the code before the summary had its own module), the legacy
energy records get their roles, and the crossing interpolates."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from energylab import ablate, summary
from energylab.rundir import AblationDir

REFERENCE = Path(__file__).resolve().parent.parent / "data" / "reference" / "ablation"


@pytest.fixture(scope="module")
def reference() -> dict:
    return AblationDir(REFERENCE).summary()


def test_summarize_reproduces_the_reference(reference: dict) -> None:
    meta = AblationDir(REFERENCE).meta()
    cells = {(c.variant, c.lmbda, c.seed): summary.CellLogs.of(c.run)
             for c in ablate.plan_cells(REFERENCE, meta["variants"], meta["seeds"], meta.get("lmbdas"))}
    result = summary.summarize(cells, list(meta["variants"]), meta["seeds"], meta["lmbda"],
                               meta.get("lmbdas"), reference["root"])
    assert result == reference


def test_formats_reproduce_the_reference_files(reference: dict) -> None:
    assert summary.format_markdown(reference) == (REFERENCE / AblationDir.SUMMARY_MD).read_text()
    assert summary.format_csv(reference) == (REFERENCE / AblationDir.SUMMARY_CSV).read_bytes().decode()
    assert json.loads(summary.format_json(reference)) == reference
    rows = list(csv.DictReader(io.StringIO(summary.format_csv(reference))))
    assert [r["variant"] for r in rows] == ["baseline", "auxt", "auxt-no-scaling"]


def test_table_rows_are_the_markdown_cells(reference: dict) -> None:
    rows = summary.table_rows(reference)
    lines = summary.format_table(reference).splitlines()[2:]
    for row, line in zip(rows, lines, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["variant"] and cells[3:] == [row[t] for _, t in summary.TABLE]
    assert summary.format_value(None, None) == "—"
    assert summary.format_value(12.3456, 0.0) == "12.35"
    assert summary.format_value(1.5, 0.25) == "1.5000 ± 0.2500"


@pytest.mark.parametrize(
    ("layer", "role", "merge"),
    [("y", "y", None), ("y_hat", "y_hat", None), ("g_a.stage2", "stage", None),
     ("g_a.main3", "main", 3), ("g_a.aux4", "aux", 4)],
)
def test_with_roles_reads_legacy_layer_names(layer: str, role: str, merge: int | None) -> None:
    record = summary.with_roles({"layer": layer, "step": 0})
    assert (record["role"], record["merge"], record["layer"]) == (role, merge, layer)


def test_with_roles_keeps_new_records_and_rejects_unknown_layers() -> None:
    new = {"layer": "anything", "role": "aux", "merge": 2}
    assert summary.with_roles(new) is new
    with pytest.raises(ValueError, match="unknown layer 'g_s.aux1'"):
        summary.with_roles({"layer": "g_s.aux1"})


def test_no_baseline_is_an_error() -> None:
    logs = summary.CellLogs(evals=[{"step": 0, "loss": 1.0, "bpp": 1.0, "psnr": 20.0,
                                    "wall_time": 0.0}], energy=[])
    with pytest.raises(summary.SummaryError, match="no baseline cell"):
        summary.summarize({("auxt", None, 0): logs}, ["baseline", "auxt"], [0], 0.013)


def test_crossing_interpolates() -> None:
    x = np.array([0.0, 10.0, 20.0])
    assert summary._crossing(x, np.array([5.0, 3.0, 1.0]), 2.0) == pytest.approx(15.0)
    assert summary._crossing(x, np.array([5.0, 3.0, 2.5]), 2.0) is None

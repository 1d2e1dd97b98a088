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
CAUSAL = REFERENCE.parent / "causal"


@pytest.fixture(scope="module")
def reference() -> dict:
    return AblationDir(REFERENCE).summary()


@pytest.mark.parametrize("root", [REFERENCE, CAUSAL], ids=["ablation", "causal"])
def test_summarize_reproduces_the_reference(root: Path) -> None:
    # the committed summary is what `ablate --collect` wrote from the committed cells
    committed = AblationDir(root).summary()
    result = ablate.summarize_ablation(AblationDir(root))
    assert {k: v for k, v in result.items() if k != "root"} == {
        k: v for k, v in committed.items() if k != "root"}
    assert ("causal" in result) == (root == CAUSAL)
    # the matched-loss baseline is read at its final capture: the rows' final_<stat>
    base = next(e for e in result["matched_loss"]["entries"] if e["variant"] == "baseline")
    row = next(r for r in result["rows"] if r["variant"] == "baseline")
    assert base["statistics"]["total_correlation"]["mean"] == pytest.approx(
        row["final_total_correlation_mean"])


def test_causal_reference_judges_every_cell_of_the_grid() -> None:
    causal = AblationDir(CAUSAL).summary()["causal"]
    cells = {c["variant"]: c for c in causal["cells"]}
    assert set(cells) == {ablate.variant_name(**o) for o in ablate.causal_variants()} - {"auxt"}
    assert all(c["ratio_to_auxt"]["n"] == 3 and c["verdict"] != "cannot tell" for c in cells.values())
    listed = dict(part.rsplit(": ", 1) for part in causal["verdict"].split("; "))
    named = {name for names in listed.values() for name in names.split(", ")}
    assert {v for v, c in cells.items() if c["verdict"] != "reproduces"} <= named


def test_formats_reproduce_the_reference_files(reference: dict) -> None:
    assert summary.format_markdown(reference).startswith((REFERENCE / AblationDir.SUMMARY_MD).read_text())
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


def test_loss_curve_interpolates_in_log_step_without_step_zero() -> None:
    # L = 4 (t / 10)^-1 after step 0 (whose loss enters nothing): exact in (log step, log loss)
    evals = [{"step": t, "loss": loss, "wall_time": t / 10} for t, loss in ((0, 1e3), (10, 4.0), (40, 1.0))]
    curve = summary.loss_curve(evals)
    assert curve.steps.tolist() == [10.0, 40.0] and curve.first == 10.0
    assert curve.reach(2.0) == (pytest.approx(20.0), False)
    assert curve.at(20.0) == pytest.approx(2.0) and curve.at(40.0) == 1.0
    assert curve.at(5.0) is None  # no extrapolation towards step 0
    assert curve.reach(5.0) == (10.0, True)  # already there at the first evaluation: t' <= 10
    assert curve.reach(0.5) == (None, False)
    assert curve.wall_at(20.0) == pytest.approx(2.0)
    # made non-increasing by pooling adjacent violators
    bumpy = summary.loss_curve([{"step": t, "loss": v} for t, v in ((1, 5.0), (2, 3.0), (3, 4.0), (4, 1.0))])
    assert bumpy.loss.tolist() == [5.0, 3.5, 3.5, 1.0]


# --- issue 11: budget-free speed-ups, convergence, paired intervals ------------------------------

def linear_cell(slope: float, steps: int = 1000, every: int = 100, start: float = 100.0) -> summary.CellLogs:
    """A cell whose test loss falls linearly, ``start - slope * t``; wall time 0.1 s per step."""
    evals = [{"step": t, "loss": start - slope * t, "bpp": 1.0, "psnr": 20.0, "wall_time": 0.1 * t}
             for t in range(0, steps + 1, every)]
    return summary.CellLogs(evals=evals, energy=[])


def power_cell(factor: float, steps: int = 1000, every: int = 100) -> summary.CellLogs:
    """A cell ``factor`` times faster than ``100 (t / 100)^-1/2`` (the rule's log-log interpolation
    is exact on it; the step-0 loss, 1000, enters nothing); wall time 0.1 s per step."""
    evals = [{"step": t, "loss": 100 * (factor * t / 100) ** -0.5 if t else 1000.0, "bpp": 1.0,
              "psnr": 20.0, "wall_time": 0.1 * t} for t in range(0, steps + 1, every)]
    return summary.CellLogs(evals=evals, energy=[])


def test_step_equivalence_of_a_twice_as_fast_variant(monkeypatch):
    monkeypatch.setattr(summary, "SMOOTH", 1)  # exact for power laws: t' = t / 2 everywhere
    cells = {}
    for seed, factor in ((0, 2.0), (1, 2.0), (2, 2.0)):
        cells["baseline", None, seed] = power_cell(1.0)
        cells["fast", None, seed] = power_cell(factor)
    result = summary.summarize(cells, ["baseline", "fast"], [0, 1, 2], 0.013)
    row = next(r for r in result["rows"] if r["variant"] == "fast")
    for p in summary.BUDGET_FRACTIONS:
        assert row[f"speedup_at_{p}_mean"] == pytest.approx(2.0)
    curve = next(c for c in result["step_equivalence"] if c["variant"] == "fast")
    assert curve["t"] == [float(t) for t in range(100, 1001, 100)]
    # at t = 100, t' = 50 lies before the variant's first evaluation: only t' <= 100 is known
    assert curve["speedup"] == pytest.approx([1.0] + [2.0] * 9)
    assert curve["bound"] == ["lower"] + [None] * 9
    # relative targets: the baseline reaches (1 + m %) x its final loss at 1000 (1 + m %)^-2
    base = next(r for r in result["rows"] if r["variant"] == "baseline")
    for m in summary.TARGET_MARGINS:
        assert base[f"steps_to_target_{m}pct_mean"] == pytest.approx(1000 * (1 + m / 100) ** -2)
        assert row[f"speedup_steps_{m}pct_mean"] == pytest.approx(2.0)
        assert row[f"speedup_time_{m}pct_mean"] == pytest.approx(2.0)
    # no spread over seeds: the interval collapses onto the ratio
    entry = next(e for e in result["paired"] if e["variant"] == "fast" and e["key"] == "speedup_at_50")
    assert (entry["kind"], entry["n"]) == ("ratio", 3)
    assert (entry["mean"], entry["low"], entry["high"]) == pytest.approx((2.0, 2.0, 2.0))


def test_paired_speedups_are_geometric_means_with_log_intervals(monkeypatch):
    monkeypatch.setattr(summary, "SMOOTH", 1)
    factors = (1.5, 2.0, 3.0)
    cells = {}
    for seed, factor in enumerate(factors):
        cells["baseline", None, seed] = power_cell(1.0)
        cells["fast", None, seed] = power_cell(factor)
    result = summary.summarize(cells, ["baseline", "fast"], [0, 1, 2], 0.013)
    entry = next(e for e in result["paired"] if e["variant"] == "fast" and e["key"] == "speedup_at_100")
    logs = np.log(factors)
    half = 4.302652729911275 * logs.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    assert entry["mean"] == pytest.approx(np.exp(logs.mean()))
    assert (entry["low"], entry["high"]) == pytest.approx(np.exp([logs.mean() - half, logs.mean() + half]))
    loss = next(e for e in result["paired"] if e["variant"] == "fast" and e["key"] == "test_loss")
    assert loss["kind"] == "difference"
    assert loss["mean"] == pytest.approx(np.mean([100 * 10 ** -0.5 * (f ** -0.5 - 1) for f in factors]))
    text = summary.format_markdown(result)
    assert "## Speed-ups paired over seeds" in text and "×" in text


def test_convergence_check_names_an_unconverged_baseline(monkeypatch):
    cells = {("baseline", None, 0): linear_cell(0.05), ("baseline", None, 1): linear_cell(0.05)}
    result = summary.summarize(cells, ["baseline"], [0, 1], 0.013)
    conv = result["convergence"]
    # the loss curve (no trailing mean) at 1000 is 50, at 800 60: a fall of 10 from 60
    assert conv["relative_change_mean"] == pytest.approx(10 / 60)
    assert not conv["converged"] and "has not converged" in conv["message"]
    assert "has not converged" in summary.format_markdown(result)
    flat = {("baseline", None, 0): linear_cell(0.0)}
    result = summary.summarize(flat, ["baseline"], [0], 0.013)
    assert result["convergence"]["converged"] and result["convergence"]["message"] is None
    assert "has not converged" not in summary.format_markdown(result)


def test_causal_verdict(monkeypatch):
    monkeypatch.setattr(summary, "SMOOTH", 1)
    cells = {}
    speed = {"auxt": (2.0, 2.2, 1.9), "same": (2.05, 2.15, 1.9), "slow": (1.0, 1.05, 0.95),
             "fast": (4.0, 4.5, 3.7), "wide": (3.0, 1.5, 2.0)}
    for seed in range(3):
        cells["baseline", None, seed] = linear_cell(0.05)
        for variant, factors in speed.items():
            cells[variant, None, seed] = linear_cell(0.05 * factors[seed])
    result = summary.summarize(cells, ["baseline", *speed], [0, 1, 2], 0.013, causal=True)
    verdicts = {c["variant"]: c["verdict"] for c in result["causal"]["cells"]}
    assert verdicts == {"same": "reproduces", "slow": "falls short", "fast": "exceeds",
                        "wide": "inconclusive"}
    ratios = {c["variant"]: c["ratio_to_auxt"] for c in result["causal"]["cells"]}
    margin = summary.CAUSAL_MARGIN
    assert 1 / margin <= ratios["same"]["low"] < 1 < ratios["same"]["high"] <= margin
    assert ratios["wide"]["low"] < 1 / margin or ratios["wide"]["high"] > margin
    parts = result["causal"]["verdict"].split("; ")
    assert parts[0].startswith("reproduce AuxT's speed-up") and parts[0].endswith(": same")
    assert parts[1:3] == ["exceed it: fast", "fall short of it: slow"]
    assert parts[3].startswith("inconclusive") and parts[3].endswith(": wide")
    one_seed = {k: v for k, v in cells.items() if k[2] == 0}
    result = summary.summarize(one_seed, ["baseline", *speed], [0], 0.013, causal=True)
    assert result["causal"]["verdict"].startswith("the intervals cannot tell")

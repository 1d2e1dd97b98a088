"""Matched-loss statistics (``summary["matched_loss"]``) and the paper's Fig. 1 compaction curves
(``stats.compaction_curves``, ``figures.plot_compaction_curves``), on a synthetic ablation with
known answers, written through the run directory's own writers (no training).

The synthetic cells (:func:`fake_ablation`): the baseline's test loss is ``100 (t / 100)^-1/2``
(exact under the summary's log-log interpolation), a variant ``k`` times faster is the baseline at
``k·t``, so with ``SMOOTH = 1`` it reaches the baseline's final loss (step 1000) at ``1000 / k``.
Captures at steps 0, 250, 500, 750, 1000 hold ``y`` with channel variances ``g·[16, 9, 4, 1]``
(``g = 1 + t/1000 + seed``; white ``g·[1, 1, 1, 1]`` at step 0), zero means and equicorrelation
``ρ = 0.1 + t/2000``: total correlation ``-½ log((1-ρ)³(1+3ρ))``, coding gain 7.5 / 576^¼, top-1
L2 share 4/10, energy per position 30·g, and the compaction curve of the L2 norms
[0.4, 0.7, 0.9, 1.0] (at step 0 [0.25, 0.5, 0.75, 1.0]).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from energylab import ablate, figures, stats, summary
from energylab.config import TrainConfig
from energylab.rundir import AblationDir, RunDir, json_safe, to_json

SEEDS = (0, 1)
CAPTURES = (0, 250, 500, 750, 1000)
BASE = np.array([16.0, 9.0, 4.0, 1.0])
COUNT, IMAGES = 1024, 8
SPEED = {"baseline": (1.0, 1.0), "fast": (3.0, 5.0), "instant": (20.0, 20.0), "never": (None, None)}
"""Variant -> speed-up factor per seed (None: the baseline's loss + 1, never reaching its target)."""


def loss(t: int, factor: float | None) -> float:
    if t == 0:
        return 1000.0
    return 100 * (t / 100) ** -0.5 + 1.0 if factor is None else 100 * (factor * t / 100) ** -0.5


def rho(t: int) -> float:
    return 0.1 + t / 2000


def variances(t: int, seed: int) -> np.ndarray:
    g = 1 + t / 1000 + seed
    return g * (BASE if t else np.ones(4))


def tc(t: int) -> float:
    r = rho(t)
    return -0.5 * math.log((1 - r) ** 3 * (1 + 3 * r))


def capture(t: int, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """The energy record of ``y`` and the archive arrays of one capture (module docstring)."""
    d = variances(t, seed)
    corr = np.full((4, 4), rho(t))
    np.fill_diagonal(corr, 1.0)
    cov = np.sqrt(np.outer(d, d)) * corr
    mean = np.zeros(4)
    record = {"step": t, "layer": "y", "role": "y", "merge": None, "channels": 4, "count": COUNT,
              "images": IMAGES, "bias_correction": "plug-in",
              **stats.energy_statistics(cov, d), **stats.energy_shares(mean, d, COUNT)}
    return record, {"cov/y": cov, "mean/y": mean, "energies/y": d}


def write_cell(run: RunDir, factor: float | None, seed: int, captures=CAPTURES) -> None:
    run.write_config(TrainConfig(out=run.path, N=8, M=4, seed=seed), {})
    for t in range(0, 1001, 100):
        run.log_eval({"step": t, "loss": loss(t, factor), "bpp": 1.0, "mse": 0.01, "psnr": 20.0,
                      "wall_time": 0.1 * t})
    for t in captures:
        record, arrays = capture(t, seed)
        run.log_capture(t, [record], arrays)
    run.close()


def fake_ablation(root: Path, variants=tuple(SPEED)) -> Path:
    ablation = AblationDir(root)
    ablation.write_meta({"variants": {v: {} for v in variants}, "seeds": list(SEEDS), "lmbda": 0.013,
                         "lmbdas": None})
    for v in variants:
        for i, seed in enumerate(SEEDS):
            write_cell(ablation.cell(v, seed), SPEED[v][i], seed)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_ablation(tmp_path_factory.mktemp("matched"))


@pytest.fixture
def result(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(summary, "SMOOTH", 1)  # the target is the baseline's loss at step 1000
    return ablate.summarize_ablation(AblationDir(root))


def entry(result: dict, variant: str) -> dict:
    return next(e for e in result["matched_loss"]["entries"] if e["variant"] == variant)


# --- the compaction curve -------------------------------------------------------------------


def test_compaction_curve_of_known_energies():
    curve = stats.compaction_curves(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(curve, torch.tensor([0.4, 0.7, 0.9, 1.0], dtype=torch.float64))
    # sorted descending first, one curve per row, a zero row white, float32 kept
    batch = stats.compaction_curves(torch.tensor([[1.0, 4.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]]))
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, torch.tensor([[0.4, 0.7, 0.9, 1.0], [0.25, 0.5, 0.75, 1.0]]))
    assert stats.compaction_curves(torch.tensor([2, 2])).dtype == torch.float64
    # the numpy form and the top-k share are points of the same curve
    e = np.array([1.0, 6.0, 0.0, 3.0])
    np.testing.assert_allclose(stats.energy_compaction_curve(e),
                               stats.compaction_curves(torch.from_numpy(e)).numpy())
    assert stats.topk_energy_share(e, 2) == pytest.approx(0.9)
    for bad in (torch.tensor([1.0, -1.0]), torch.tensor([1.0, float("nan")]), torch.tensor(1.0),
                torch.zeros(3, 0)):
        with pytest.raises(ValueError):
            stats.compaction_curves(bad)


# --- matched-loss statistics ----------------------------------------------------------------


def test_matched_step_capture_and_statistics(result: dict):
    fast = entry(result, "fast")
    assert (fast["seeds"], fast["reached"]) == (2, 2)
    seed0, seed1 = fast["per_seed"]
    # factor 3: t' = 1000 / 3, between evaluations; the next capture is 500
    assert seed0["target"] == pytest.approx(loss(1000, 1.0))
    assert seed0["steps_to_target"] == pytest.approx(1000 / 3)
    assert seed0["bound"] is None and seed0["reason"] is None
    assert seed0["capture_step"] == 500 and seed0["capture_gap"] == pytest.approx(500 - 1000 / 3)
    # factor 5: t' = 200, the next capture 250
    assert seed1["steps_to_target"] == pytest.approx(200) and seed1["capture_step"] == 250
    # the same step as the summary's own steps-to-target
    cells = {(c["variant"], c["seed"]): c for c in result["cells"]}
    assert seed0["steps_to_target"] == cells["fast", 0]["steps_to_target"]
    for e, (t, seed) in ((seed0, (500, 0)), (seed1, (250, 1))):
        assert e["total_correlation"] == pytest.approx(tc(t))
        assert e["coding_gain"] == pytest.approx(7.5 / 576 ** 0.25)
        assert e["topk_share.l2"] == pytest.approx(0.4) and e["topk_k"] == 1
        assert e["energy_per_position"] == pytest.approx(30 * (1 + t / 1000 + seed))
        assert (e["count"], e["images"], e["bias_correction"]) == (COUNT, IMAGES, "plug-in")
    assert fast["statistics"]["energy_per_position"] == {
        "mean": pytest.approx(np.mean([45.0, 67.5])), "std": pytest.approx(np.std([45.0, 67.5], ddof=1)),
        "n": 2}


def test_baseline_at_its_final_capture_and_paired_differences(result: dict):
    base = entry(result, "baseline")
    assert [e["capture_step"] for e in base["per_seed"]] == [1000, 1000]
    assert [e["energy_per_position"] for e in base["per_seed"]] == pytest.approx([60.0, 90.0])
    assert base["per_seed"][0]["total_correlation"] == pytest.approx(tc(1000))
    # the baseline's numbers are those of the summary's final_<stat>
    row = next(r for r in result["rows"] if r["variant"] == "baseline")
    assert base["statistics"]["total_correlation"]["mean"] == pytest.approx(
        row["final_total_correlation_mean"])
    fast = entry(result, "fast")
    energy = fast["paired"]["energy_per_position"]
    expected = stats.paired_difference([45.0, 67.5], [60.0, 90.0])
    assert energy["kind"] == "difference" and energy["n"] == 2
    assert (energy["mean"], energy["low"], energy["high"]) == pytest.approx(
        (expected.mean, expected.low, expected.high))
    assert energy["mean"] == pytest.approx(-18.75)
    tc_diff = fast["paired"]["total_correlation"]
    assert tc_diff["mean"] == pytest.approx(np.mean([tc(500) - tc(1000), tc(250) - tc(1000)]))


def test_bounded_and_unreached_variants(result: dict):
    # already below the target at its first evaluation: t' <= 100, a bound; the capture after it
    instant = entry(result, "instant")
    for e in instant["per_seed"]:
        assert (e["steps_to_target"], e["bound"], e["capture_step"]) == (100.0, "upper", 250)
    never = entry(result, "never")
    assert (never["seeds"], never["reached"]) == (2, 0)
    for e in never["per_seed"]:
        assert e["steps_to_target"] is None and e["capture_step"] is None and e["capture_gap"] is None
        assert all(e[stat] is None for stat, _ in summary.MATCHED_STATS)
        assert "never reaches the target" in e["reason"]
    assert never["statistics"]["total_correlation"] == {"mean": None, "std": None, "n": 0}
    assert never["paired"]["total_correlation"]["mean"] is None
    assert never["paired"]["total_correlation"]["n"] == 0


def test_missing_capture_and_archive_give_none_with_a_reason(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(summary, "SMOOTH", 1)
    ablation = AblationDir(tmp_path)
    ablation.write_meta({"variants": {"baseline": {}, "fast": {}}, "seeds": [0], "lmbda": 0.013})
    write_cell(ablation.cell("baseline", 0), 1.0, 0)
    write_cell(ablation.cell("fast", 0), 3.0, 0, captures=(0, 250))  # reaches at 333: none after
    logs = {("baseline", None, 0): summary.CellLogs.of(ablation.cell("baseline", 0)),
            ("fast", None, 0): summary.CellLogs.of(ablation.cell("fast", 0))}
    result = summary.summarize(logs, ["baseline", "fast"], [0], 0.013)
    (late,) = entry(result, "fast")["per_seed"]
    assert late["steps_to_target"] == pytest.approx(1000 / 3) and late["capture_step"] is None
    assert late["reason"] == "seed 0: no capture at or after step 333 (its last capture is at step 250)"
    # a capture whose archive is gone: the recorded statistics stay, energy per position is None
    logs["baseline", None, 0] = replace(logs["baseline", None, 0], captures={})
    result = summary.summarize(logs, ["baseline", "fast"], [0], 0.013)
    (base,) = entry(result, "baseline")["per_seed"]
    assert base["total_correlation"] == pytest.approx(tc(1000)) and base["energy_per_position"] is None
    assert "energy_per_position (no capture archive)" in base["reason"]
    assert json.loads(summary.format_json(result))["matched_loss"] == json_safe(result["matched_loss"])


def test_matched_loss_section_of_the_markdown(result: dict):
    text = summary.format_matched_loss(result)
    assert text.startswith("## Statistics of y at matched loss\n")
    assert all(len(line) <= summary.MATCHED_WIDTH for line in text.splitlines())
    assert "**fast**: 2 of 2 seeds reach the target" in text
    assert "333\u00a0→\u00a0500, 200\u00a0→\u00a0250" in text
    assert "≤\u00a0100\u00a0→\u00a0250" in text
    assert "**never**: 0 of 2 seeds reach the target" in text
    assert "- seeds 0, 1: never reaches the target 31.62 (its test loss ends at 32.62" in text
    assert "| energy / position | 56.25 ± 15.91 | 75.00 ± 21.21 | -18.75 [" in text
    assert text in summary.format_paired(result) and text in summary.format_markdown(result)
    # a summary written before the section existed is written as it was
    assert summary.format_matched_loss({k: v for k, v in result.items() if k != "matched_loss"}) == ""
    assert to_json(result["matched_loss"])


# --- the figure -----------------------------------------------------------------------------


def test_compaction_curve_frame_and_figure(root: Path, tmp_path: Path):
    study = figures.load(root)
    frame = figures.compaction_curve_frame(study)
    steps = frame.groupby("stage")["step"].unique()
    assert {s: list(v) for s, v in steps.items()} == {0: [0], 25: [250], 50: [500], 100: [1000]}
    for stage, expected in ((0, [0.25, 0.5, 0.75, 1.0]), (50, [0.4, 0.7, 0.9, 1.0])):
        rows = frame[(frame["variant"] == "fast") & (frame["stage"] == stage)].sort_values(["seed", "k"])
        np.testing.assert_allclose(rows["cumulative"], expected * len(SEEDS))
    fig = figures.plot_compaction_curves(study)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == list(SPEED)
    labels = panels[1].get_legend_handles_labels()[1]
    assert labels == ["step 0 (0 %)", "step 250 (25 %)", "step 500 (50 %)", "step 1000 (100 %)",
                      "baseline, final", "equal energies"]
    assert "compaction_curves" in figures.ABLATION_FIGURES
    written = figures.write_figures(study, tmp_path, ["compaction_curves"])
    assert sorted(p.name for p in written) == ["compaction_curves.pdf", "compaction_curves.png"]
    assert (tmp_path / "compaction_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

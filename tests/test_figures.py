"""``energylab.figures``: every figure from the session's tiny ablation and tiny R-D sweep
(``conftest.ABLATION`` and ``conftest.SWEEP``), ``--list``, skips."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from energylab import figures
from energylab.stats import correlation_matrix

ALL = [spec.name for spec in figures.FIGURES]
SWEEP_ONLY = ["rd_curves", "bd_rate"]
VARIANTS = ["baseline", "auxt", "auxt-no-scaling"]


def _check_files(out: Path, names: list[str]) -> None:
    for name in names:
        png, pdf = out / f"{name}.png", out / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert pdf.read_bytes()[:5] == b"%PDF-", pdf
        assert png.stat().st_size > 5000 and pdf.stat().st_size > 1000


def test_every_figure_of_an_ablation(tiny_ablation: Path, tmp_path: Path, capsys) -> None:
    written = figures.all_figures(tiny_ablation, tmp_path)
    expected = [n for n in ALL if n not in SWEEP_ONLY]
    assert sorted(p.name for p in written) == sorted(f"{n}.{s}" for n in expected
                                                      for s in ("png", "pdf"))
    _check_files(tmp_path, expected)
    err = capsys.readouterr().err
    assert "skipping figure rd_curves: not an R-D sweep" in err
    assert "skipping figure bd_rate:" in err
    assert len(err.strip().splitlines()) == 2


def test_every_figure_of_an_rd_sweep(tiny_sweep: Path, tmp_path: Path, capsys) -> None:
    assert figures.main([str(tiny_sweep), "--out", str(tmp_path)]) == 0
    _check_files(tmp_path, ALL)
    assert "skipping" not in capsys.readouterr().err


def test_ablation_figures_next_to_the_summary(tiny_ablation: Path) -> None:
    written = figures.ablation_figures(tiny_ablation)
    assert {p.parent for p in written} == {tiny_ablation}
    assert sorted(p.stem for p in written) == sorted(2 * list(figures.ABLATION_FIGURES))
    _check_files(tiny_ablation, list(figures.ABLATION_FIGURES))


def test_list_says_what_it_can_draw_and_writes_nothing(tiny_sweep: Path, tiny_ablation: Path,
                                                       tmp_path: Path, capsys) -> None:
    before = sorted(tiny_sweep.rglob("*"))
    assert figures.main([str(tiny_sweep), "--list", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "variants baseline, auxt" in out and "λ 0.0035, 0.025" in out
    for name in ALL:
        assert f"yes {name}" in out
    assert sorted(tiny_sweep.rglob("*")) == before and not list(tmp_path.iterdir())
    assert figures.main([str(tiny_ablation), "--list"]) == 0
    out = capsys.readouterr().out
    assert "no  rd_curves" in out and "[skipped: not an R-D sweep" in out


@pytest.mark.parametrize("removed", [["captures"], ["captures", "energy.jsonl"]])
def test_a_run_without_captures_still_gives_the_loss_figures(
        tiny_ablation: Path, tmp_path: Path, capsys, removed: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_ablation / "auxt" / "seed0", run,
                    ignore=shutil.ignore_patterns("*.pt", "tensorboard", *removed))
    assert figures.main([str(run), "--out", str(tmp_path / "figs")]) == 0
    drawn = ["loss_curves"] + ([] if "energy.jsonl" in removed else
                               ["compaction_and_loss", "energy_split", "subband_energy",
                                "aux_energy_share"])
    _check_files(tmp_path / "figs", drawn)
    assert sorted(p.stem for p in (tmp_path / "figs").glob("*.png")) == sorted(drawn)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(ALL) - len(drawn)
    assert ("skipping figure correlation_heatmaps: no capture archives (captures/)"
            in err)
    assert "skipping figure ablation_summary: no summary.json" in "\n".join(err)


def test_not_a_run_directory(tmp_path: Path, capsys) -> None:
    assert figures.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "neither a run directory" in err


def test_loaders(tiny_ablation: Path, tiny_sweep: Path) -> None:
    study = figures.load(tiny_ablation)
    assert study.kind == "ablation" and study.variants == VARIANTS
    assert sorted(study.cells) == [(v, 0.013, s) for v in sorted(VARIANTS) for s in (0, 1)]
    for frame in (study.evals, study.metrics, study.energy, study.bitstream):
        assert list(frame.columns[:3]) == ["variant", "lmbda", "seed"]
    assert sorted(set(study.evals["step"])) == [0, 4, 8]
    assert list(figures.summary_table(study).index) == VARIANTS

    sweep = figures.load_ablation(tiny_sweep)
    assert sweep.lmbdas == [0.0035, 0.025] and sweep.default_lmbda == 0.0035
    assert len(sweep.bitstream) == 4

    run = figures.load_run(tiny_ablation / "auxt" / "seed1")
    assert run.kind == "run" and list(run.cells) == [("auxt", 0.013, 1)]
    captures = figures.load_captures(run.root, layers=["y"])
    assert sorted(captures) == [0, 4, 8]
    assert sorted(captures[8]) == ["cov/y", "energies/y", "mean/y", "probe_y"]
    assert captures[8]["cov/y"].shape == (12, 12)
    assert "g_a.aux1" in figures.layers_of(figures.load_captures(run.root))


def test_heatmaps_order_channels_by_energy_on_a_fixed_scale(tiny_ablation: Path) -> None:
    study = figures.load(tiny_ablation)
    fig = figures.plot_correlation_heatmaps(study)
    panels = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert len(panels) == len(VARIANTS) * 3
    step, path = study.captures(("baseline", 0.013, 0))[-1]
    with np.load(path) as z:
        cov, energies = z["cov/y"], z["energies/y"]
    order = np.argsort(energies)[::-1]
    final = panels[2]
    assert final.get_title() == f"final: step {step}"
    np.testing.assert_allclose(final.images[0].get_array(),
                               correlation_matrix(cov[np.ix_(order, order)]), atol=1e-6)
    assert final.images[0].get_clim() == (-1.0, 1.0)


def test_variant_colours() -> None:
    one = figures.variant_colors(["auxt"])
    many = figures.variant_colors(["baseline", "auxt", "auxt-no-scaling", "auxt-db4"])
    assert one["auxt"] == many["auxt"] and len(set(many.values())) == 4


def test_step_equivalence_draws_the_summary_curves(tiny_ablation: Path) -> None:
    study = figures.load_ablation(tiny_ablation)
    curve = {"lmbda": None, "t": [4.0, 8.0], "t_variant": [2.0, 4.0], "speedup": [2.0, 2.0]}
    study.summary = {**study.summary, "step_equivalence": [
        {"variant": "auxt", "seed": s, **curve} for s in (0, 1)]}
    fig = figures.plot_step_equivalence(study)
    drawn = [line.get_ydata() for line in fig.axes[1].get_lines() if len(line.get_xdata()) == 2]
    assert any(np.allclose(y, [2.0, 2.0]) for y in drawn)
    study.summary = {**study.summary, "step_equivalence": []}
    with pytest.raises(figures.MissingInput, match="no variant reaches"):
        figures.plot_step_equivalence(study)

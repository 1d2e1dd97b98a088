"""``energylab.figures``: every figure from the session's tiny ablation and tiny R-D sweep
(``conftest.ABLATION`` and ``conftest.SWEEP``), ``--list``, skips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.colors
import numpy as np
import pytest

from energylab import figures
from energylab.figures import __main__ as figures_cli
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_every_figure_of_an_rd_sweep(tiny_sweep: Path, tmp_path: Path, capsys) -> None:
    assert figures_cli.main([str(tiny_sweep), "--out", str(tmp_path)]) == 0
    _check_files(tmp_path, ALL)
    assert "skipping" not in capsys.readouterr().err


@pytest.mark.slow
def test_ablation_figures_next_to_the_summary(tiny_ablation: Path) -> None:
    written = figures.ablation_figures(tiny_ablation)
    assert {p.parent for p in written} == {tiny_ablation}
    assert sorted(p.stem for p in written) == sorted(2 * list(figures.ABLATION_FIGURES))
    _check_files(tiny_ablation, list(figures.ABLATION_FIGURES))


def test_list_says_what_it_can_draw_and_writes_nothing(tiny_sweep: Path, tiny_ablation: Path,
                                                       tmp_path: Path, capsys) -> None:
    before = sorted(tiny_sweep.rglob("*"))
    assert figures_cli.main([str(tiny_sweep), "--list", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "variants baseline, auxt" in out and "λ 0.0035, 0.025" in out
    for name in ALL:
        assert f"yes {name}" in out
    assert sorted(tiny_sweep.rglob("*")) == before and not list(tmp_path.iterdir())
    assert figures_cli.main([str(tiny_ablation), "--list"]) == 0
    out = capsys.readouterr().out
    assert "no  rd_curves" in out and "[skipped: not an R-D sweep" in out


@pytest.mark.slow
@pytest.mark.parametrize("removed", [["captures"], ["captures", "energy.jsonl"]])
def test_a_run_without_captures_still_gives_the_loss_figures(
        tiny_ablation: Path, tmp_path: Path, capsys, removed: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_ablation / "auxt" / "seed0", run,
                    ignore=shutil.ignore_patterns("*.pt", "tensorboard", *removed))
    assert figures_cli.main([str(run), "--out", str(tmp_path / "figs")]) == 0
    drawn = ["loss_curves"] + ([] if "energy.jsonl" in removed else
                               ["compaction_and_loss", "energy_split", "subband_energy",
                                "modulation", "aux_energy_share"])
    _check_files(tmp_path / "figs", drawn)
    assert sorted(p.stem for p in (tmp_path / "figs").glob("*.png")) == sorted(drawn)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(ALL) - len(drawn)
    assert ("skipping figure correlation_heatmaps: no capture archives (captures/)"
            in err)
    assert "skipping figure ablation_summary: no summary.json" in "\n".join(err)


def test_not_a_run_directory(tmp_path: Path, capsys) -> None:
    assert figures_cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "neither a run directory" in err


def test_loaders(tiny_ablation: Path, tiny_sweep: Path) -> None:
    study = figures.load(tiny_ablation)
    assert study.kind == "ablation" and study.variants == VARIANTS
    assert sorted(study.cells) == [(v, 0.013, s) for v in sorted(VARIANTS) for s in (0, 1)]
    for frame in (study.evals, study.metrics, study.energy, study.bitstream):
        assert list(frame.columns[:3]) == ["variant", "lmbda", "seed"]
    # the ablation evaluates dense-early: every max(1, 4 // 4) steps up to 5 x eval_every (4)
    assert sorted(set(study.evals["step"])) == list(range(9))
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


def _y_records(root: Path, variant: str) -> list[dict]:
    return [r for seed in sorted((root / variant).glob("seed*"))
            for line in (seed / "energy.jsonl").read_text().splitlines()
            if (r := json.loads(line))["layer"] == "y"]


def _hex(line) -> str:
    return matplotlib.colors.to_hex(line.get_color())


def _mean_line(ax, color) -> tuple[np.ndarray, np.ndarray]:
    """The solid line of one colour (seaborn's mean over seeds)."""
    lines = [ln for ln in ax.get_lines()
             if _hex(ln) == color and ln.get_linestyle() == "-" and len(ln.get_xdata())]
    assert len(lines) == 1
    return np.asarray(lines[0].get_xdata(), float), np.asarray(lines[0].get_ydata(), float)


def test_energy_split_draws_total_correlation_and_the_neighbourhood_split_with_intervals(
        tiny_ablation: Path) -> None:
    study = figures.load(tiny_ablation)
    fig = figures.plot_energy_split(study)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [p[2] for p in figures.ENERGY_SPLIT]
    assert "bootstrap intervals" in fig.get_suptitle() and "s.d. over seeds" in fig.get_suptitle()
    # the channel panel: mean over seeds of the records' total correlation, and dotted intervals
    color = matplotlib.colors.to_hex(study.colors["auxt"])
    records = _y_records(tiny_ablation, "auxt")
    steps = sorted({r["step"] for r in records})
    x, y = _mean_line(panels[1], color)
    want = [np.mean([r["total_correlation"] for r in records if r["step"] == t]) for t in steps]
    np.testing.assert_allclose(x, steps)
    np.testing.assert_allclose(y, want, rtol=1e-9)
    dotted = [np.asarray(ln.get_ydata(), float) for ln in panels[1].get_lines()
              if _hex(ln) == color and ln.get_linestyle() == ":"]
    low = [np.mean([r["total_correlation_ci_low"] for r in records if r["step"] == t]) for t in steps]
    assert any(np.allclose(d, low) for d in dotted) and len(dotted) == 2
    # there is no decorrelation gain panel: total correlation is the one decorrelation number
    assert not any("decorrelation gain" in ax.get_ylabel() for ax in panels)


def test_energy_split_skips_null_values(tiny_ablation: Path) -> None:
    study = figures.load(tiny_ablation)
    energy = study.energy.astype(object)
    y = energy["role"] == "y"
    energy.loc[y & (energy["variant"] == "baseline"), "total_correlation"] = None
    energy.loc[y & (energy["seed"] == 0) & (energy["variant"] == "auxt"), "total_correlation"] = None
    energy.loc[y, "neighbourhood_tc.across_positions"] = None
    study.energy = energy
    fig = figures.plot_energy_split(study)
    panels = [ax for ax in fig.axes if ax.get_title()]
    base = matplotlib.colors.to_hex(study.colors["baseline"])
    assert not [ln for ln in panels[1].get_lines() if _hex(ln) == base]
    seed1 = [json.loads(line) for line in (tiny_ablation / "auxt" / "seed1" / "energy.jsonl")
             .read_text().splitlines()]
    want = [r["total_correlation"] for r in seed1 if r["layer"] == "y"]
    _, y1 = _mean_line(panels[1], matplotlib.colors.to_hex(study.colors["auxt"]))
    np.testing.assert_allclose(y1, want, rtol=1e-9)
    assert any("singular" in t.get_text() for t in panels[3].texts)


def _legacy(record: dict) -> dict | None:
    """A record as written before roles, intervals, explicit energies and modulation existed."""
    if record.get("role") not in ("stage", "y", "y_hat", "main", "aux"):
        return None
    new = ("_ci_", "topk_share.", "neighbourhood_tc.", "subband_energy_centred.", "rate_share",
           "std_in_steps", "active_channels", "bits_per_position", "total_correlation_plugin",
           "numerical_rank", "mean_energy_fraction", "nonfinite")
    return {k: v for k, v in record.items()
            if k not in ("role", "merge") and not any(n in k for n in new)}


@pytest.mark.slow
def test_legacy_records_still_draw(tiny_ablation: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_ablation / "auxt" / "seed0", run,
                    ignore=shutil.ignore_patterns("*.pt", "tensorboard"))
    lines = [_legacy(json.loads(line)) for line in (run / "energy.jsonl").read_text().splitlines()]
    (run / "energy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines if r))
    written = figures.all_figures(run, tmp_path / "figs")
    drawn = {p.stem for p in written}
    assert {"energy_split", "compaction_and_loss", "subband_energy", "aux_energy_share"} <= drawn
    assert "modulation" not in drawn
    assert "skipping figure modulation: no modulation statistics of y_hat" in capsys.readouterr().err
    study = figures.load(run)
    fig = figures.plot_energy_split(study)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert panels[1].get_lines() and not panels[2].get_lines()
    assert any("not in these records" in t.get_text() for t in panels[2].texts)
    assert "bootstrap" not in fig.get_suptitle()
    compaction = figures.plot_compaction_and_loss(study)
    assert "mean square" in compaction.axes[0].get_ylabel()
    assert "L2 norm" in figures.plot_compaction_and_loss(figures.load(tiny_ablation)).axes[0].get_ylabel()


def test_modulation_draws_rate_shares_and_learned_gains(tiny_ablation: Path) -> None:
    study = figures.load(tiny_ablation)
    fig = figures.plot_modulation(study)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 4 and panels[2].get_title() == "subband gains of g_a (auxt)"
    gains = [json.loads(line) for seed in ("seed0", "seed1")
             for line in (tiny_ablation / "auxt" / seed / "energy.jsonl").read_text().splitlines()]
    ll = [r["exp_s.LL"] for r in gains if r["layer"] == "g_a.gain1"]
    drawn = [np.asarray(ln.get_ydata(), float) for ln in panels[2].get_lines()]
    assert any(len(d) == len(ll) // 2 and np.allclose(d, np.mean(np.reshape(ll, (2, -1)), 0))
               for d in drawn)
    study.energy = study.energy[study.energy["variant"] != "auxt"]
    study.variants = [v for v in study.variants if v != "auxt"]
    fig = figures.plot_modulation(study)
    assert any("no learned subband gains" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_analysis_energy_split_shows_total_correlation_skips_nulls_and_notes_missing() -> None:
    layers = {"y": {"coding_gain": 10.0, "total_correlation": 3.0},
              "g_a.stage1": {"coding_gain": 100.0, "total_correlation": None}}
    analysis = {"data": {"images": ["a.png"], "source": "/x/kodak"},
                "models": [{"name": "one", "layers": layers}, {"name": "two", "layers": layers}]}
    fig = figures.plot_analysis_energy_split(analysis)
    gain, tc, spatial = (ax for ax in fig.axes if ax.get_title())
    assert sorted(round(p.get_height(), 9) for p in gain.patches if p.get_height()) == [10, 10, 20, 20]
    assert [p.get_height() for p in tc.patches if p.get_height()] == [3.0, 3.0]
    assert "total correlation" in tc.get_ylabel()
    assert [t.get_text() for t in spatial.texts] == ["not in this analysis"]


def test_energy_spectra_share_the_l2_norms(tiny_ablation: Path) -> None:
    study = figures.load(tiny_ablation)
    fig = figures.plot_energy_spectra(study)
    spectrum = next(ax for ax in fig.axes if ax.get_title() == "energy spectrum")
    shares = []
    for seed in (0, 1):
        _, path = study.captures(("auxt", 0.013, seed))[-1]
        with np.load(path) as z:
            norms = np.sort(np.sqrt(z["energies/y"]))[::-1]  # ||y_c|| ∝ sqrt(E[y_c²])
        shares.append(norms / norms.sum())
    _, y = _mean_line(spectrum, matplotlib.colors.to_hex(study.colors["auxt"]))
    np.testing.assert_allclose(y, np.mean(shares, axis=0), rtol=1e-9)

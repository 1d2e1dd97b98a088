"""``energylab.ablate`` on the session's tiny ablation (``conftest.ABLATION``: baseline, auxt and
auxt-no-scaling, two seeds); the end-to-end re-run cell by cell is ``slow``."""

import json

import numpy as np
import pytest
from conftest import ABLATION, TINY, ablation_argv, flags

from energylab import ablate
from energylab.runlog import read_jsonl

TIME_KEYS = ("time_to_target", "speedup_time")


def untimed(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in rows]


def test_writes_every_output(tiny_ablation):
    for name in ("ablation.json", "summary.md", "summary.csv", "summary.json"):
        assert (tiny_ablation / name).stat().st_size > 0
    summary = json.loads((tiny_ablation / "summary.json").read_text())
    assert [r["variant"] for r in summary["rows"]] == ["baseline", "auxt", "auxt-no-scaling"]
    for variant in ("baseline", "auxt", "auxt-no-scaling"):
        for seed in (0, 1):
            cell = tiny_ablation / variant / f"seed{seed}"
            assert (cell / "final.pt").exists() and (cell / "bitstream.json").exists()
    csv_header = (tiny_ablation / "summary.csv").read_text().splitlines()[0].split(",")
    assert csv_header[0] == "variant" and "test_loss_mean" in csv_header
    assert "| auxt-no-scaling |" in (tiny_ablation / "summary.md").read_text()
    for figure in ("loss_curves", "energy_split", "correlation_heatmaps"):
        for ext in ("png", "pdf"):
            assert (tiny_ablation / f"{figure}.{ext}").stat().st_size > 0


def test_summary_matches_run_files(tiny_ablation):
    summary = json.loads((tiny_ablation / "summary.json").read_text())
    rows = {r["variant"]: r for r in summary["rows"]}
    for variant, row in rows.items():
        finals = [read_jsonl(tiny_ablation / variant / f"seed{s}" / "eval.jsonl")[-1] for s in (0, 1)]
        losses = [f["loss"] for f in finals]
        assert row["test_loss_mean"] == pytest.approx(np.mean(losses))
        assert row["test_loss_std"] == pytest.approx(np.std(losses, ddof=1))
        real = [json.loads((tiny_ablation / variant / f"seed{s}" / "bitstream.json").read_text())
                ["results"]["bpp"] for s in (0, 1)]
        assert row["real_bpp_mean"] == pytest.approx(np.mean(real))
        y_last = [[r for r in read_jsonl(tiny_ablation / variant / f"seed{s}" / "energy.jsonl")
                   if r["layer"] == "y"][-1]["coding_gain"] for s in (0, 1)]
        assert row["final_coding_gain_mean"] == pytest.approx(np.mean(y_last))
    base_evals = read_jsonl(tiny_ablation / "baseline" / "seed0" / "eval.jsonl")
    target = np.mean([r["loss"] for r in base_evals[-3:]])
    assert summary["targets"]["seed0"] == pytest.approx(target)
    assert all(r["aux_share_1_mean"] is not None for v, r in rows.items() if v != "baseline")


@pytest.mark.slow
def test_only_and_collect_equal_full_run(tiny_ablation, tmp_path):
    out = tmp_path / "split"
    for variant in ("auxt-no-scaling", "baseline", "auxt"):
        for seed in (1, 0):
            argv = [*ablation_argv(out, **ABLATION), "--only", variant, "--seed", str(seed)]
            assert ablate.main(argv) == 0
    assert ablate.main(["--collect", str(out)]) == 0
    a = json.loads((tiny_ablation / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert untimed(a["rows"]) == untimed(b["rows"])


def test_resume_skips_finished_cells(tiny_ablation, capsys):
    assert ablate.main([*ablation_argv(tiny_ablation, **ABLATION), "--resume"]) == 0
    assert "seed" not in capsys.readouterr().err  # nothing was retrained


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--remove", "scale"], "valid names are: wavelet, orthogonal, scaling"),
        (["--only", "auxt-no-wavelet", "--seed", "0"], "unknown variant 'auxt-no-wavelet'"),
        (["--collect", "/nonexistent"], "holds no ablation"),
        (["--wavelets", "nope"], "unknown wavelet 'nope'"),
    ],
)
def test_bad_arguments(tmp_path, capsys, argv, message):
    assert ablate.main([*argv, "--out", str(tmp_path / "x"), *flags(**TINY)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_existing_directory_needs_resume(tiny_ablation, capsys):
    assert ablate.main(ablation_argv(tiny_ablation, **ABLATION)) == 2
    assert "add --resume" in capsys.readouterr().err


def test_variants():
    names = ablate.variants(["scaling", "wavelet"], combined=True, wavelets=["db4"])
    assert list(names) == ["baseline", "auxt", "auxt-no-wavelet", "auxt-no-scaling",
                           "auxt-no-wavelet+scaling", "auxt-db4"]
    assert names["auxt-no-wavelet+scaling"]["remove"] == ["wavelet", "scaling"]
    assert names["auxt-db4"] == {"auxt": True, "remove": [], "wavelet": "db4"}



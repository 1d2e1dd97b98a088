import numpy as np
import pytest

from energylab import ablate
from energylab.config import TrainConfig
from energylab.rundir import AblationDir

TINY = ["--steps", "12", "--eval-every", "3", "--capture-every", "6", "--N", "8", "--M", "12",
        "--batch-size", "2", "--test-size", "64", "--probe-count", "2", "--probe-size", "64",
        "--log-every", "3"]
TIME_KEYS = ("time_to_target", "speedup_time")


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation") / "full"
    assert ablate.main(["--remove", "scaling", "--seeds", "0", "1", "--out", str(out), *TINY]) == 0
    return out


def untimed(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in rows]


def test_writes_every_output(full):
    ablation = AblationDir(full)
    assert ablation.meta()["variants"]["auxt-no-scaling"]["remove"] == ["scaling"]
    for name in (ablation.SUMMARY_MD, ablation.SUMMARY_CSV, ablation.SUMMARY_JSON):
        assert (full / name).stat().st_size > 0
    summary = ablation.summary()
    assert [r["variant"] for r in summary["rows"]] == ["baseline", "auxt", "auxt-no-scaling"]
    for variant in ("baseline", "auxt", "auxt-no-scaling"):
        for seed in (0, 1):
            cell = AblationDir(full).cell(variant, seed)
            assert cell.is_finished() and cell.has_bitstream()
            config = cell.train_config()
            assert (config.seed, config.auxt, config.steps, config.N) == (
                seed, variant != "baseline", 12, 8)
            assert config.remove == (("scaling",) if variant == "auxt-no-scaling" else ())
    csv_header = (full / ablation.SUMMARY_CSV).read_text().splitlines()[0].split(",")
    assert csv_header[0] == "variant" and "test_loss_mean" in csv_header
    assert "| auxt-no-scaling |" in (full / ablation.SUMMARY_MD).read_text()
    for figure in ("loss_curves", "energy_split", "correlation_heatmaps"):
        for ext in ("png", "pdf"):
            assert (full / f"{figure}.{ext}").stat().st_size > 0


def test_summary_matches_run_files(full):
    summary = AblationDir(full).summary()
    rows = {r["variant"]: r for r in summary["rows"]}
    cells = {(v, s): AblationDir(full).cell(v, s) for v in rows for s in (0, 1)}
    for variant, row in rows.items():
        finals = [cells[variant, s].evals()[-1] for s in (0, 1)]
        losses = [f["loss"] for f in finals]
        assert row["test_loss_mean"] == pytest.approx(np.mean(losses))
        assert row["test_loss_std"] == pytest.approx(np.std(losses, ddof=1))
        real = [cells[variant, s].bitstream()["bpp"] for s in (0, 1)]
        assert row["real_bpp_mean"] == pytest.approx(np.mean(real))
        y_last = [[r for r in cells[variant, s].energy() if r["layer"] == "y"][-1]["coding_gain"]
                  for s in (0, 1)]
        assert row["final_coding_gain_mean"] == pytest.approx(np.mean(y_last))
    base_evals = cells["baseline", 0].evals()
    target = np.mean([r["loss"] for r in base_evals[-3:]])
    assert summary["targets"]["seed0"] == pytest.approx(target)
    assert all(r["aux_share_1_mean"] is not None for v, r in rows.items() if v != "baseline")


@pytest.mark.slow
def test_only_and_collect_equal_full_run(full, tmp_path):
    out = tmp_path / "split"
    for variant in ("auxt-no-scaling", "baseline", "auxt"):
        for seed in (1, 0):
            argv = ["--remove", "scaling", "--seeds", "0", "1", "--out", str(out),
                    "--only", variant, "--seed", str(seed), *TINY]
            assert ablate.main(argv) == 0
    assert ablate.main(["--collect", str(out)]) == 0
    a = AblationDir(full).summary()
    b = AblationDir(out).summary()
    assert untimed(a["rows"]) == untimed(b["rows"])


def test_resume_skips_finished_cells(full, capsys):
    assert ablate.main(["--remove", "scaling", "--seeds", "0", "1", "--out", str(full),
                        "--resume", *TINY]) == 0
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
    assert ablate.main([*argv, "--out", str(tmp_path / "x"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_existing_directory_needs_resume(full, capsys):
    assert ablate.main(["--remove", "scaling", "--seeds", "0", "1", "--out", str(full),
                        *TINY]) == 2
    assert "add --resume" in capsys.readouterr().err


def test_variants():
    names = ablate.variants(["scaling", "wavelet"], combined=True, wavelets=["db4"])
    assert list(names) == ["baseline", "auxt", "auxt-no-wavelet", "auxt-no-scaling",
                           "auxt-no-wavelet+scaling", "auxt-db4"]
    assert names["auxt-no-wavelet+scaling"]["remove"] == ["wavelet", "scaling"]
    assert names["auxt-db4"] == {"auxt": True, "remove": [], "wavelet": "db4"}


def test_crossing_interpolates():
    x = np.array([0.0, 10.0, 20.0])
    assert ablate._crossing(x, np.array([5.0, 3.0, 1.0]), 2.0) == pytest.approx(15.0)
    assert ablate._crossing(x, np.array([5.0, 3.0, 2.5]), 2.0) is None


def test_defaults_and_cell_configs(tmp_path):
    args = ablate.build_parser().parse_args(["--out", str(tmp_path)])
    base = ablate.base_config(args)
    assert (base.steps, base.eval_every, base.capture_every, base.N, base.M, base.test_size) == (
        1500, 100, 250, 32, 48, 256)
    cell = ablate.plan_cells(tmp_path, ["auxt-no-scaling"], [2], [0.0067])[0]
    config = ablate.cell_config(base, cell, {"auxt": True, "remove": ["scaling"], "wavelet": "haar"})
    assert config == TrainConfig(**{**base.__dict__, "out": cell.dir, "seed": 2, "auxt": True,
                                           "remove": ("scaling",), "lmbda": 0.0067})

"""``energylab.ablate`` on the session's tiny ablation (``conftest.ABLATION``: baseline, auxt and
auxt-no-scaling, two seeds); the end-to-end re-run cell by cell is ``slow``."""

import re

import numpy as np
import pytest
from conftest import ABLATION, TINY, ablation_argv, flags

from energylab import ablate
from energylab.ablate import __main__ as ablate_cli
from energylab.config import TrainConfig
from energylab.rundir import AblationDir

TIME_KEYS = ("time_to_target", "speedup_time")


def untimed(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in rows]


def test_writes_every_output(tiny_ablation):
    ablation = AblationDir(tiny_ablation)
    assert ablation.meta()["variants"]["auxt-no-scaling"]["remove"] == ["scaling"]
    for name in (ablation.SUMMARY_MD, ablation.SUMMARY_CSV, ablation.SUMMARY_JSON):
        assert (tiny_ablation / name).stat().st_size > 0
    summary = ablation.summary()
    assert [r["variant"] for r in summary["rows"]] == ["baseline", "auxt", "auxt-no-scaling"]
    for variant in ("baseline", "auxt", "auxt-no-scaling"):
        for seed in (0, 1):
            cell = AblationDir(tiny_ablation).cell(variant, seed)
            assert cell.is_finished() and cell.has_bitstream()
            config = cell.train_config()
            assert (config.seed, config.auxt, config.steps, config.N) == (
                seed, variant != "baseline", TINY["steps"], TINY["N"])
            assert config.remove == (("scaling",) if variant == "auxt-no-scaling" else ())
    csv_header = (tiny_ablation / ablation.SUMMARY_CSV).read_text().splitlines()[0].split(",")
    assert csv_header[0] == "variant" and "test_loss_mean" in csv_header
    assert "| auxt-no-scaling |" in (tiny_ablation / ablation.SUMMARY_MD).read_text()
    for figure in ("loss_curves", "energy_split", "correlation_heatmaps", "step_equivalence"):
        for ext in ("png", "pdf"):
            assert (tiny_ablation / f"{figure}.{ext}").stat().st_size > 0


def test_summary_matches_run_files(tiny_ablation):
    summary = AblationDir(tiny_ablation).summary()
    rows = {r["variant"]: r for r in summary["rows"]}
    cells = {(v, s): AblationDir(tiny_ablation).cell(v, s) for v in rows for s in (0, 1)}
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
def test_only_and_collect_equal_full_run(tiny_ablation, tmp_path):
    out = tmp_path / "split"
    for variant in ("auxt-no-scaling", "baseline", "auxt"):
        for seed in (1, 0):
            argv = [*ablation_argv(out, **ABLATION), "--only", variant, "--seed", str(seed)]
            assert ablate_cli.main(argv) == 0
    assert ablate_cli.main(["--collect", str(out)]) == 0
    a = AblationDir(tiny_ablation).summary()
    b = AblationDir(out).summary()
    assert untimed(a["rows"]) == untimed(b["rows"])


def test_resume_skips_finished_cells(tiny_ablation, capsys):
    assert ablate_cli.main([*ablation_argv(tiny_ablation, **ABLATION), "--resume"]) == 0
    assert not re.search(r"\[\d+/\d+\] \S+ seed", capsys.readouterr().out)  # nothing was retrained


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
    out = [] if "--collect" in argv else ["--out", str(tmp_path / "x")]
    assert ablate_cli.main([*argv, *out, *flags(**TINY)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_existing_directory_needs_resume(tiny_ablation, capsys):
    assert ablate_cli.main(ablation_argv(tiny_ablation, **ABLATION)) == 2
    assert "add --resume" in capsys.readouterr().err


def test_variants():
    names = ablate.variants(["scaling", "wavelet"], combined=True, wavelets=["db4"])
    assert list(names) == ["baseline", "auxt", "auxt-no-wavelet", "auxt-no-scaling",
                           "auxt-no-wavelet+scaling", "auxt-db4"]
    assert names["auxt-no-wavelet+scaling"]["remove"] == ["wavelet", "scaling"]
    assert names["auxt-db4"] == {**ablate.OPTION_DEFAULTS, "wavelet": "db4"}


def test_defaults_and_cell_configs(tmp_path):
    args = ablate_cli.build_parser().parse_args(["--out", str(tmp_path)])
    base = ablate_cli.base_config(args)
    assert (base.steps, base.eval_every, base.capture_every, base.N, base.M, base.test_size) == (
        1500, 100, 500, 32, 48, 256)
    cell = ablate.plan_cells(tmp_path, ["auxt-no-scaling"], [2], [0.0067])[0]
    config = ablate.cell_config(base, cell, {"auxt": True, "remove": ["scaling"], "wavelet": "haar"})
    assert config == TrainConfig(**{**base.__dict__, "out": cell.dir, "seed": 2, "auxt": True,
                                           "remove": ("scaling",), "lmbda": 0.0067})


def test_freeze_scaling_init_and_causal_variants(tmp_path):
    args = ablate_cli.build_parser().parse_args(["--freeze", "scaling", "--freeze", "orthogonal",
                                             "--scaling-init", "zero", "--out", str(tmp_path)])
    names = ablate.variants(args.remove, freeze=args.freezes, scaling_init=args.scaling_inits)
    assert list(names) == ["baseline", "auxt", "auxt-frozen-orthogonal", "auxt-frozen-scaling",
                           "auxt-scaling-init-zero"]
    base = ablate_cli.base_config(args)
    cell = ablate.plan_cells(tmp_path, ["auxt-frozen-scaling"], [0], None)[0]
    config = ablate.cell_config(base, cell, names["auxt-frozen-scaling"])
    assert (config.auxt, config.freeze, config.scaling_init) == (True, ("scaling",), "release")
    causal = ablate.variants([], causal=True)
    assert list(causal) == [
        "baseline", "auxt", "auxt-frozen-scaling", "auxt-no-scaling", "auxt-frozen-orthogonal",
        "auxt-frozen-orthogonal+scaling", "auxt-no-scaling-frozen-orthogonal", "auxt-frozen-klt",
        "auxt-frozen-klt+scaling", "auxt-no-scaling-frozen-klt"]
    assert causal["auxt-frozen-klt+scaling"]["projection_init"] == "klt"
    with pytest.raises(ValueError, match="the causal grid is a study of its own"):
        ablate.variants(["scaling"], causal=True)


@pytest.mark.slow
def test_causal_grid_end_to_end(tmp_path, capsys):
    out = tmp_path / "causal"
    assert ablate_cli.main([*ablation_argv(out, seeds=[0, 1]), "--causal"]) == 0
    summary = AblationDir(out).summary()
    assert len(summary["rows"]) == 10
    causal = summary["causal"]
    assert {c["variant"] for c in causal["cells"]} == set(ablate.variants([], causal=True)) - {
        "baseline", "auxt"}
    assert causal["verdict"]
    rows = {r["variant"]: r for r in summary["rows"]}
    assert rows["auxt-frozen-klt+scaling"]["trainable_parameters_mean"] < rows["auxt"][
        "trainable_parameters_mean"] == rows["auxt"]["parameters_mean"]
    text = (out / AblationDir.SUMMARY_MD).read_text()
    assert "## Causal test of the split" in text and "**Verdict:**" in text
    for figure in ("step_equivalence", "loss_curves"):
        assert (out / f"{figure}.png").stat().st_size > 0


def test_collect_refuses_an_out_it_would_ignore(tmp_path, capsys):
    assert ablate_cli.main(["--collect", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "leave out --out" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

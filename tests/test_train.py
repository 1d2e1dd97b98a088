import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import interrupted_at

from energylab import train as train_mod
from energylab.capture import LatentProbe
from energylab.config import TrainConfig
from energylab.models import build_model
from energylab.rundir import RunDir
from energylab.train import __main__ as train_cli

TINY_CONFIG = dict(N=8, M=12, batch_size=2, patch_size=64, test_size=64, probe_count=2, probe_size=64,
                   log_every=2, eval_every=4, capture_every=4)
TINY = ["--N", "8", "--M", "12", "--batch-size", "2", "--patch-size", "64", "--test-size", "64",
        "--probe-count", "2", "--probe-size", "64", "--log-every", "2", "--eval-every", "4",
        "--capture-every", "4"]


def run(out, *extra, steps=8):
    return train_cli.main(["--out", str(out), "--steps", str(steps), *TINY, *extra])


def strip_time(records):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


def load_run(out):
    run = RunDir(out)
    logs = {"metrics": strip_time(run.metrics()), "evals": strip_time(run.evals()),
            "energy": strip_time(run.energy())}
    return logs, run.captures()


@pytest.fixture(scope="module")
def auxt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "auxt"
    assert run(out, "--auxt") == 0
    return out


def test_run_directory_is_complete(auxt_run):
    run = RunDir(auxt_run)
    config = run.config()
    assert config["args"]["auxt"] is True and config["versions"]["torch"]
    assert run.train_config() == TrainConfig(out=auxt_run, steps=8, auxt=True, **TINY_CONFIG)
    for records in (run.metrics(), run.evals(), run.energy()):
        assert records and all("step" in r for r in records)
    assert [r["step"] for r in run.evals()] == [0, 4, 8]
    assert [r["step"] for r in run.metrics()] == [2, 4, 6, 8]
    energy = run.energy()
    layers = {r["layer"] for r in energy}
    assert {"g_a.stage1", "g_a.stage2", "g_a.stage3", "y", "y_hat", "g_a.aux4"} <= layers
    assert all(np.isfinite(r["coding_gain"]) for r in energy if r["role"] != "gain")
    gains = [r for r in energy if r["role"] == "gain"]  # 4 WLS + 4 iWLS at each of the 3 captures
    assert len(gains) == 3 * 8 and all(r["exp_s.LL"] > 0 for r in gains)
    (y_hat,) = [r for r in energy if r["layer"] == "y_hat" and r["step"] == 8]
    assert 1 <= y_hat["active_channels"] <= 12 and 0 <= y_hat["rate_share_entropy"] <= np.log2(12)
    assert all(0 <= r["aux_energy_share"] for r in energy if r["layer"].startswith("g_a.aux"))
    captures = run.captures()
    assert list(captures) == [0, 4, 8]
    assert captures[8]["cov/y"].shape == (12, 12) and captures[8]["cov/y"].dtype == np.float64
    assert captures[8]["probe_y"].shape == (12, 4, 4)
    final = torch.load(run.final_path, weights_only=False)
    assert final["step"] == 8 and "g_a.auxiliary_layers.0.olp.linear.weight" in final["model"]
    assert run.load_checkpoint()["step"] == 8
    assert list(run.tensorboard_dir.glob("events.*"))


@pytest.mark.parametrize("auxt", [False, True])
def test_hooks_see_expected_layers_and_shapes(auxt):
    model = build_model("mbt2018-mean", N=8, M=12, auxt=auxt).eval()
    probe = LatentProbe(model)
    x = torch.rand(2, 3, 64, 64)
    with probe, torch.no_grad():
        y = model.g_a(x)
        model(x)
    shapes = {name: m.channel.channels for name, m in probe.metrics.items()}
    expected = {"g_a.stage1": 8, "g_a.stage2": 8, "g_a.stage3": 8, "y": 12, "y_hat": 12, "y_residual": 12}
    if auxt:
        expected |= {f"g_a.{b}{k}": c for k, c in zip(range(1, 5), (8, 8, 8, 12), strict=True)
                     for b in ("main", "aux")}
    assert shapes == expected
    assert probe.first["y"].shape == (12, 4, 4)
    torch.testing.assert_close(probe.first["y"], y[0])
    # two forwards of 2 images of 4x4 latents each
    assert probe.metrics["y"].channel.compute()["count"] == 2 * 2 * 16
    assert not model.g_a._forward_hooks  # handles removed on exit


def test_same_seed_same_captures(auxt_run, tmp_path):
    assert run(tmp_path / "again", "--auxt") == 0
    logs_a, caps_a = load_run(auxt_run)
    logs_b, caps_b = load_run(tmp_path / "again")
    assert logs_a == logs_b
    assert caps_a.keys() == caps_b.keys()
    for step in caps_a:
        assert caps_a[step].keys() == caps_b[step].keys()
        for key in caps_a[step]:
            np.testing.assert_array_equal(caps_a[step][key], caps_b[step][key])


def test_resume_equals_uninterrupted(auxt_run, tmp_path):
    out = tmp_path / "killed"
    with interrupted_at(6):  # killed during step 7, after the checkpoint at step 4
        assert run(out, "--auxt") == 130  # Ctrl-C: one line, the run directory kept
    assert RunDir(out).load_checkpoint()["step"] == 4
    assert max(r["step"] for r in RunDir(out).metrics()) == 6
    assert run(out, "--auxt", "--resume") == 0
    logs_a, caps_a = load_run(auxt_run)
    logs_b, caps_b = load_run(out)
    assert logs_a == logs_b
    assert caps_a.keys() == caps_b.keys()
    final_a = torch.load(RunDir(auxt_run).final_path, weights_only=False)["model"]
    final_b = torch.load(RunDir(out).final_path, weights_only=False)["model"]
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=0, atol=0)


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    real = train_mod.ortho_loss
    calls = {"n": 0}

    def poisoned(model):
        calls["n"] += 1
        value = real(model)
        return value * float("nan") if calls["n"] > 5 else value

    monkeypatch.setattr(train_mod, "ortho_loss", poisoned)
    assert run(tmp_path / "nan", "--auxt") == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # progress lines come before
    assert last.startswith("error: loss is nan at step 6")
    assert RunDir(tmp_path / "nan").load_checkpoint()["step"] == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
        (["--auxt", "--remove", "scale"], "valid names are: wavelet, orthogonal, scaling"),
        (["--resume"], "no checkpoint"),
        (["--patch-size", "512"], "smaller than the 512x512 training patch"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, capsys, extra, message):
    assert run(tmp_path / "bad", *extra) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--eval-every", "0", "must be >= 1"), ("--patch-size", "96", "must be a multiple of 64"),
     ("--probe-size", "32", "must be >= 64"), ("--steps", "-3", "must be >= 1")],
)
def test_bad_numbers_are_rejected_naming_the_flag(tmp_path, capsys, flag, value, message):
    assert train_cli.main(["--out", str(tmp_path / "bad"), flag, value]) == 2
    assert capsys.readouterr().err == f"error: {flag} {message}, got {value}\n"
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_two_process_gloo_ddp(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "energylab.train", "--out", str(out), "--steps", "4", "--device", "cpu",
           "--auxt", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert RunDir(out).config()["world_size"] == 2
    energy = RunDir(out).energy()
    # the probe set (2 crops) is split over the ranks and the statistics all-reduced:
    # y of two 64x64 crops is 2 * 4 * 4 samples, and every layer is written once per capture
    y = [r for r in energy if r["layer"] == "y"]
    assert [r["step"] for r in y] == [0, 4] and all(r["count"] == 32 for r in y)
    assert RunDir(out).is_finished()


def test_existing_run_is_not_overwritten_and_resume_checks_settings(auxt_run, capsys):
    before = RunDir(auxt_run).evals()
    assert run(auxt_run, "--auxt") == 2
    assert "already holds a run; resume it" in capsys.readouterr().err
    assert run(auxt_run, "--auxt", "--test-size", "1000") != 0  # fails before touching anything
    assert run(auxt_run, "--resume", "--auxt", "--lmbda", "0.5") == 2
    assert "error: --lmbda was 0.013 in the run being resumed" in capsys.readouterr().err
    assert run(auxt_run, "--resume") == 2  # without --auxt: another architecture
    assert "error: --auxt was True in the run being resumed" in capsys.readouterr().err
    assert RunDir(auxt_run).evals() == before


def test_capture_reads_every_probe_region_at_y_resolution():
    # 40 regions of 256 px: 40 * 16 * 16 = 10240 positions of y, more than the 8192 floor
    model = build_model("mbt2018-mean", N=8, M=12)
    probe = torch.rand(40, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        records = {r["layer"]: r for r in train_mod.capture(model, probe, train_mod.Dist()).records(0)}
    assert records["y"]["images"] == 40 and records["y"]["count"] == 40 * 16 * 16
    # above y's resolution: 8 regions, a centred window holding at least as many positions
    assert records["g_a.stage1"]["images"] == 8 and records["g_a.stage1"]["count"] >= 40 * 16 * 16

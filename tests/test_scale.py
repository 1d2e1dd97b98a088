"""Issue 12: streaming a folder in training, learning-rate schedules, mixed precision, launchers."""

import json
import os
import stat
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from energylab import train as train_mod
from energylab.ablate import Cell, run_cell
from energylab.ablate.__main__ import main as ablate
from energylab.config import ConfigError, TrainConfig
from energylab.data import TrainStream
from energylab.launch import CellJob, LaunchOptions, make_executor
from energylab.models import build_model
from energylab.precision import MixedPrecision
from energylab.rundir import AblationDir, RunDir
from energylab.train import __main__ as train_cli

TINY = dict(N=8, M=12, batch_size=2, patch_size=64, test_size=64, probe_count=2, probe_size=64,
            log_every=1, eval_every=4, capture_every=4, steps=8, device="cpu")


def logs(out):
    run = RunDir(out)
    strip = lambda records: [{k: v for k, v in r.items() if k != "wall_time"} for r in records]  # noqa: E731
    return strip(run.metrics()), strip(run.evals()), strip(run.energy())


def final_weights(out):
    return torch.load(RunDir(out).final_path, weights_only=False)["model"]


def assert_same_weights(a, b):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A flat folder of 7 noise PNGs (one smaller than the patch: skipped with a warning)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(96, 128), (80, 100), (64, 64), (128, 96), (100, 80), (70, 90),
                                (40, 50)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    return root


# -- streaming ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::energylab.data.DataWarning")
def test_folder_training_same_logs_for_workers_and_cache(folder, tmp_path):
    base = TrainConfig(out=tmp_path / "w0", data=str(folder), workers=0, **TINY)
    train_mod.train(base)
    assert RunDir(base.out).data_index_path.is_file()
    assert "im6.png" not in RunDir(base.out).config()["data"]["train"]  # 40x50 < 64: skipped
    for name, options in (("w2", dict(workers=2)), ("cache", dict(workers=0, cache=True))):
        train_mod.train(replace(base, out=tmp_path / name, **options))
        assert logs(tmp_path / name) == logs(base.out)
        assert_same_weights(tmp_path / name, base.out)
    with pytest.raises(ValueError, match="smaller than the 64x64"):
        train_mod.train(replace(base, out=tmp_path / "strict", small_images="error"))


@pytest.mark.filterwarnings("ignore::energylab.data.DataWarning")
def test_folder_training_resumes_exactly(folder, tmp_path, monkeypatch):
    config = TrainConfig(out=tmp_path / "whole", data=str(folder), workers=0, **TINY)
    train_mod.train(config)
    real = TrainStream.batch

    def dying(self, step):
        if step == 6:
            raise KeyboardInterrupt
        return real(self, step)

    killed = replace(config, out=tmp_path / "killed")
    monkeypatch.setattr(TrainStream, "batch", dying)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(killed)
    monkeypatch.setattr(TrainStream, "batch", real)
    train_mod.train(replace(killed, workers=2), resume=True)
    assert logs(killed.out) == logs(config.out)
    assert_same_weights(killed.out, config.out)


# -- learning-rate schedules --------------------------------------------------------------------


def test_multistep_rates_and_exact_resume(tmp_path, monkeypatch):
    config = TrainConfig(out=tmp_path / "whole", lr=1e-3, lr_schedule="multistep", lr_milestones=(3, 5),
                         lr_gamma=0.5, **TINY)
    train_mod.train(config)
    rates = {r["step"]: r["lr"] for r in RunDir(config.out).metrics()}
    # the steps after each milestone run at gamma times the rate before
    expected = {t: 1e-3 * 0.5 ** sum(m < t for m in (3, 5)) for t in range(1, 9)}
    assert rates == pytest.approx(expected, rel=1e-12)
    # killed at step 7, after the checkpoint at 4: the milestone at 5 lies between
    real = TrainStream.batch

    def dying(self, step):
        if step == 6:
            raise KeyboardInterrupt
        return real(self, step)

    killed = replace(config, out=tmp_path / "killed")
    monkeypatch.setattr(TrainStream, "batch", dying)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(killed)
    monkeypatch.setattr(TrainStream, "batch", real)
    assert RunDir(killed.out).load_checkpoint()["scheduler"]["last_epoch"] == 4
    train_mod.train(killed, resume=True)
    assert logs(killed.out) == logs(config.out)
    assert_same_weights(killed.out, config.out)


def test_plateau_lowers_the_rate_when_the_test_loss_stalls(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "evaluate",
                        lambda *a: {"loss": 1.0, "bpp": 1.0, "mse": 0.01, "psnr": 20.0})
    config = TrainConfig(out=tmp_path / "run", lr=1e-3, lr_schedule="plateau", lr_patience=0,
                         lr_gamma=0.1, **{**TINY, "eval_every": 2, "capture_every": 0})
    train_mod.train(config)
    rates = {r["step"]: r["lr"] for r in RunDir(config.out).metrics()}
    # evaluation at 2 sets the best loss; 4 and 6 do not improve on it (patience 0)
    assert rates == pytest.approx({1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 1e-3, 5: 1e-4, 6: 1e-4, 7: 1e-5,
                                   8: 1e-5}, rel=1e-9)
    aux = torch.load(RunDir(config.out).checkpoint_path, weights_only=False)["aux_optimizer"]
    assert aux["param_groups"][0]["lr"] == train_mod.AUX_LR


@pytest.mark.parametrize("values, message", [
    (dict(lr_schedule="multistep"), "lr_milestones must be given"),
    (dict(lr_milestones=(3,)), "lr_milestones must be given"),
    (dict(lr_schedule="multistep", lr_milestones=(5, 3)), "must be increasing"),
    (dict(lr_gamma=1.5), "lr_gamma must be a number in"),
    (dict(precision="fp8"), "precision must be one of"),
    (dict(small_images="keep"), "small_images must be one of"),
    (dict(workers=-1), "workers must be >= 0"),
])
def test_bad_scale_settings(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(out=tmp_path, **values)


def test_milestones_round_trip_through_the_dict(tmp_path):
    config = TrainConfig(out=tmp_path, lr_schedule="multistep", lr_milestones=[10, 20])
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# -- mixed precision ----------------------------------------------------------------------------


def test_autocast_covers_the_transforms_only():
    net = build_model("mbt2018-mean", N=8, M=12)
    mp = MixedPrecision("bf16", torch.device("cpu"))
    mp.attach(net)
    inner = {}
    net.g_a[0].register_forward_hook(lambda m, a, out: inner.__setitem__("g_a0", out.dtype))
    x = torch.rand(1, 3, 64, 64)
    with mp.active():
        out = net(x)
    assert inner["g_a0"] == torch.bfloat16
    assert out["x_hat"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out["likelihoods"].values())
    net(x)
    assert inner["g_a0"] == torch.float32  # evaluation and captures run outside autocast


def test_bf16_training_close_to_fp32_and_captures_unchanged(tmp_path):
    fp32 = TrainConfig(out=tmp_path / "fp32", auxt=True, **TINY)
    train_mod.train(fp32)
    bf16 = replace(fp32, out=tmp_path / "bf16", precision="bf16")
    train_mod.train(bf16)
    assert RunDir(bf16.out).train_config().precision == "bf16"
    loss32 = [r["loss"] for r in RunDir(fp32.out).metrics()]
    loss16 = [r["loss"] for r in RunDir(bf16.out).metrics()]
    # stated tolerance: every training loss of the first 8 steps within 5 % of fp32's
    np.testing.assert_allclose(loss16, loss32, rtol=0.05)
    assert loss16 != loss32  # autocast did act
    # captures are computed outside autocast: at step 0 (same weights) they are identical
    cap32, cap16 = RunDir(fp32.out).captures()[0], RunDir(bf16.out).captures()[0]
    for key in cap32:
        np.testing.assert_array_equal(cap16[key], cap32[key])


def test_fp16_on_cpu_trains_or_says_why(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "fp16"), "--precision", "fp16", *sum(
        ([f"--{k.replace('_', '-')}", str(v)] for k, v in {**TINY, "steps": 2}.items()), [])]
    status = train_cli.main(argv)
    err = capsys.readouterr().err
    if status == 0:
        assert torch.load(RunDir(tmp_path / "fp16").checkpoint_path,
                          weights_only=False)["scaler"]["scale"] > 0
    else:
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1


# -- launchers ----------------------------------------------------------------------------------


def test_slurm_job_description(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in (("srun", "exit 0"), ("sbatch", 'echo "Submitted batch job 4242"')):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    options = LaunchOptions("slurm", slurm_partition="gpu", gpus_per_cell=2, cpus_per_cell=6,
                            timeout_min=90, slurm_args={"account": "lab"})
    executor = make_executor(options, tmp_path / "launch")
    cell = Cell(tmp_path / "ablation", "auxt", 0, None)
    job = executor.submit(CellJob(TrainConfig(out=cell.dir), cell, run_cell, options.threads, True))
    assert job.job_id == "4242"
    script = job.paths.submission_file.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=6",
                 "#SBATCH --time=90", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --account=lab", "#SBATCH --signal=USR2@"):
        assert line in script
    resubmitted = CellJob(TrainConfig(out=cell.dir), cell, run_cell, 6, True).checkpoint()
    assert resubmitted.function.cell.dir == cell.dir  # preempted: the same cell again (it resumes)
    assert resubmitted.function.run_cell is run_cell


def _summary_without_time(root):
    """The summary without wall times, and without the step-equivalence numbers: a local job runs
    with cores // jobs torch threads, so its float sums differ from inline's in the last digits, and
    on this 4-step run the speed-ups turn on crossings of nearly equal losses."""
    text = (AblationDir(root).path / AblationDir.SUMMARY_JSON).read_text()

    def strip(value):
        if isinstance(value, dict):
            if "speedup" in str(value.get("key", "")):
                return None
            return {k: strip(v) for k, v in value.items()
                    if "time" not in k and "speedup" not in k and "steps_to" not in k
                    and k not in ("root", "bounds")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, float):
            return pytest.approx(value, rel=1e-5, abs=1e-9)
        return value

    return strip(json.loads(text))


@pytest.mark.slow
def test_local_launcher_gives_the_inline_summary(tmp_path):
    common = ["--seeds", "0", "--steps", "4", "--eval-every", "2", "--capture-every", "2", "--N", "8",
              "--M", "12", "--batch-size", "2", "--test-size", "64", "--probe-count", "2",
              "--probe-size", "64", "--device", "cpu"]
    assert ablate(["--out", str(tmp_path / "inline"), *common]) == 0
    assert ablate(["--out", str(tmp_path / "local"), "--launcher", "local", "--jobs", "2", *common]) == 0
    assert list((tmp_path / "local" / AblationDir.LAUNCH).glob("*_log.err"))
    assert _summary_without_time(tmp_path / "local") == _summary_without_time(tmp_path / "inline")

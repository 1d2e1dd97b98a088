import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from energylab.config import ConfigError, TrainConfig
from energylab.rundir import AblationDir, RunDir, RunDirError
from energylab.train import train

TINY = dict(N=8, M=12, batch_size=2, patch_size=64, test_size=64, probe_count=2, probe_size=64)


def record(step: int) -> dict:
    return {"step": step, "loss": 1.0 / (step + 1), "mse": 0.01, "bpp": 0.5, "psnr": 20.0,
            "ortho_loss": 0.0, "aux_loss": 1.0, "lr": 1e-4, "wall_time": float(step)}


def arrays(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    x = rng.standard_normal((3, 50)).astype(np.float32)
    return {"cov/y": np.cov(x).astype(np.float32), "energies/y": (x**2).mean(1),
            "probe_y": rng.standard_normal((3, 2, 2)).astype(np.float32)}


@pytest.fixture
def written(tmp_path):
    """A run directory written through RunDir: records at steps 0..12, captures every 4 steps."""
    run = RunDir(tmp_path / "run")
    config = TrainConfig(out=run.path, auxt=True, remove=["scaling"], steps=12)
    run.start(config, {"device": "cpu", "world_size": 1})
    for step in range(13):
        run.log_metrics(record(step))
        if step % 4 == 0:
            run.log_eval({"step": step, "loss": 2.0, "bpp": 0.5, "mse": 0.01, "psnr": 20.0,
                          "wall_time": 0.0})
            run.log_capture(step, [{"step": step, "layer": "y", "coding_gain": 1.5}], arrays(step))
    run.close()
    return run, config


def test_format_round_trip(written):
    run, config = written
    again = RunDir(run.path)
    assert again.is_run() and again.config()["device"] == "cpu"
    assert again.config()["args"] == json.loads(json.dumps(config.to_dict()))
    assert again.train_config() == config
    assert again.metrics() == [record(s) for s in range(13)]
    assert [r["step"] for r in again.evals()] == [0, 4, 8, 12]
    assert again.energy()[1] == {"step": 4, "layer": "y", "coding_gain": 1.5}
    captures = again.captures()
    assert list(captures) == [0, 4, 8, 12]
    for step, capture in captures.items():
        assert capture.keys() == arrays(step).keys()
        for key, value in arrays(step).items():
            np.testing.assert_array_equal(capture[key], value)
    assert again.captures(layers=["nothing"])[4].keys() == {"probe_y"}
    assert again.bitstream() is None
    again.write_bitstream({"bpp": 0.25, "psnr-rgb": 30.0}, [{"image": "a", "bpp": 0.25}])
    assert again.bitstream() == {"bpp": 0.25, "psnr-rgb": 30.0}
    assert again.weights_path() is None and not again.is_finished()


def test_non_writing_rundir_writes_nothing(tmp_path):
    run = RunDir(tmp_path / "rank1", write=False)
    run.start(TrainConfig(out=run.path), {})
    run.log_metrics(record(1))
    run.save_checkpoint({"step": 1})
    assert not run.path.exists()


def test_atomic_save_leaves_old_file_or_new_never_partial(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.save_checkpoint({"step": 4})
    real_save = torch.save

    def dying_save(obj, f):
        real_save({"step": "partial"}, f)
        raise KeyboardInterrupt  # killed after writing some bytes, before the rename

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint({"step": 8})
    monkeypatch.setattr(torch, "save", real_save)
    assert run.load_checkpoint()["step"] == 4
    assert [p.name for p in run.path.iterdir()] == [run.checkpoint_path.name]  # no temporary file


def test_resume_truncates_records_and_captures_after_the_step(written):
    run, _ = written
    run = RunDir(run.path)
    run.resume(6)
    run.close()
    assert [r["step"] for r in run.metrics()] == list(range(7))
    assert [r["step"] for r in run.evals()] == [0, 4]
    assert [r["step"] for r in run.energy()] == [0, 4]
    assert [step for step, _ in run.capture_files()] == [0, 4]


def test_a_torn_last_line_is_left_out_and_a_resume_drops_it(written):
    run, _ = written
    path = run.path / RunDir.ENERGY
    text = path.read_text()
    path.write_text(text + text.splitlines()[-1][:20])  # a killed writer's half line, no newline
    with pytest.warns(UserWarning, match=rf"{path.name}: line 5 is incomplete"):
        assert [r["step"] for r in RunDir(run.path).energy()] == [0, 4, 8, 12]
    run = RunDir(run.path)
    with pytest.warns(UserWarning, match="incomplete"):
        run.resume(12)
    run.close()
    assert path.read_text() == text


def test_a_bad_complete_line_names_the_file_and_line(written):
    run, _ = written
    path = run.path / RunDir.EVAL
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:15] + "\n"
    path.write_text("".join(lines))
    with pytest.raises(RunDirError, match=rf"{path.name}: line 2 is not JSON"):
        RunDir(run.path).evals()


def test_start_refuses_a_directory_holding_a_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_final({"step": 1})
    with pytest.raises(RunDirError, match="already holds a run"):
        run.start(TrainConfig(out=run.path), {})
    with pytest.raises(RunDirError, match="no checkpoint to resume from"):
        run.load_checkpoint()


def test_unknown_key_in_saved_config_names_the_file(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_config(TrainConfig(out=run.path), {})
    path = run.path / RunDir.CONFIG
    saved = json.loads(path.read_text())
    saved["args"]["momentum"] = 0.9
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError) as info:
        run.train_config()
    message = str(info.value)
    assert "\n" not in message and message.startswith("momentum is not a training setting")
    assert str(path) in message


def test_ablation_dir_layout_and_summary(tmp_path):
    ablation = AblationDir(tmp_path / "abl")
    assert not ablation.is_ablation()
    with pytest.raises(RunDirError, match="holds no ablation"):
        ablation.meta()
    ablation.write_meta({"seeds": [0], "variants": {"baseline": {}}})
    assert ablation.meta() == {"seeds": [0], "variants": {"baseline": {}}}
    assert ablation.cell("auxt", 1).path == ablation.path / "auxt" / "seed1"
    assert ablation.cell("auxt", 1, 0.0067).path == ablation.path / "auxt" / "lmbda0.0067" / "seed1"
    summary = {"rows": [{"variant": "baseline", "test_loss_mean": 1.5}]}
    ablation.write_summary(json.dumps(summary), "# table\n", "variant,test_loss_mean\nbaseline,1.5\n")
    assert ablation.summary() == summary
    assert (ablation.path / AblationDir.SUMMARY_MD).read_text() == "# table\n"
    assert (ablation.path / AblationDir.SUMMARY_CSV).read_text().splitlines() == [
        "variant,test_loss_mean", "baseline,1.5"]


def train_loss_steps(run: RunDir) -> list[int]:
    events = EventAccumulator(str(run.tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def test_tensorboard_resumed_from_an_earlier_checkpoint_holds_each_step_once(tmp_path):
    config = TrainConfig(out=tmp_path / "run", steps=6, log_every=1, eval_every=6, capture_every=0,
                         **TINY)
    run = train(config)
    step6 = run.checkpoint_path.read_bytes()
    train(replace(config, steps=12), resume=True)
    assert train_loss_steps(run) == list(range(1, 13))
    run.checkpoint_path.write_bytes(step6)  # put the step-6 checkpoint back
    train(replace(config, steps=12), resume=True)
    assert train_loss_steps(run) == list(range(1, 13))
    assert [r["step"] for r in run.metrics()] == list(range(1, 13))

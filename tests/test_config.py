import json
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest

from energylab import cli, evaluate
from energylab import train as train_mod
from energylab.config import RESUMABLE_CHANGES, ConfigError, TrainConfig
from energylab.data import DataError
from energylab.evaluate import __main__ as evaluate_cli
from energylab.rundir import RunDirError
from energylab.train import __main__ as train_cli


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patch_size": 100}, "patch_size must be a multiple of 64, got 100"),
        ({"probe_size": 32}, "probe_size must be >= 64, got 32"),
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"capture_every": -1}, "capture_every must be >= 0, got -1"),
        ({"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
        ({"test_size": 0}, "test_size must be >= 1, got 0"),
        ({"lmbda": 0.0}, "lmbda must be a finite number > 0, got 0.0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        ({"ortho_weight": -0.1}, "ortho_weight must be a finite number >= 0, got -0.1"),
        ({"model": "jpeg"}, "model must be one of "),
        ({"g_a_placement": "middle"}, "g_a_placement must be one of after_resample, stage_end"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda, got 'tpu'"),
        ({"auxt": True, "remove": ["scale"]}, "valid names are: wavelet, orthogonal, scaling"),
        ({"remove": ["scaling"]}, "remove scaling needs auxt"),
        ({"wavelet": "nope"}, "wavelet is not usable: unknown wavelet 'nope'"),
    ],
)
def test_invalid_settings_raise_one_line_config_errors(changes, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(out=Path("run"), **changes)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert info.value.field == ("remove" if "remove" in changes else next(iter(changes)))
    assert "--" not in str(info.value)  # library terms, not flags


def test_round_trip_through_json():
    config = TrainConfig(out=Path("runs/x"), auxt=True, remove=("scaling", "wavelet"), lmbda=0.0067,
                         test_size=128, capture_every=0, seed=3, wavelet="db2")
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["remove"] == ["wavelet", "scaling"] and saved["out"] == "runs/x"
    assert TrainConfig.from_dict(saved) == config
    assert set(saved) == {f.name for f in fields(TrainConfig)}
    with pytest.raises(FrozenInstanceError):
        config.seed = 4  # type: ignore[misc]


def test_from_dict_rejects_unknown_keys_naming_the_source():
    saved = TrainConfig(out=Path("r")).to_dict() | {"stepz": 3}
    with pytest.raises(ConfigError, match=r"^stepz is not a training setting in /x/config\.json"):
        TrainConfig.from_dict(saved, source="/x/config.json")
    # energylab 0.1 saved its --resume flag with the settings: read as the setting it is not
    legacy = TrainConfig(out=Path("r")).to_dict() | {"resume": True}
    assert TrainConfig.from_dict(legacy) == TrainConfig(out=Path("r"))
    with pytest.raises(ConfigError, match=r"steps must be >= 1, got 0 \(/x\)"):
        TrainConfig.from_dict({"out": "r", "steps": 0}, source="/x")


def test_changed_from_ignores_resumable_fields():
    saved = TrainConfig(out=Path("a"))
    assert TrainConfig(out=Path("b"), steps=5, device="cpu", log_every=3).changed_from(saved) == []
    assert TrainConfig(out=Path("a"), lmbda=0.5, seed=1).changed_from(saved) == ["lmbda", "seed"]
    assert RESUMABLE_CHANGES == {"out", "steps", "device", "log_every", "workers", "cache"}


def test_cli_defaults_are_the_config_defaults(tmp_path):
    args = train_cli.build_parser().parse_args(["--out", str(tmp_path)])
    assert cli.config_from_args(args) == TrainConfig(out=tmp_path)
    args = train_cli.build_parser().parse_args(
        ["--out", str(tmp_path), "--auxt", "--remove", "scaling", "--patch-size", "128"])
    assert cli.config_from_args(args) == TrainConfig(out=tmp_path, auxt=True, remove=("scaling",),
                                                     patch_size=128)


def test_evaluate_architecture_flags_come_from_the_shared_groups():
    args = evaluate_cli._parser().parse_args(["run", "--out", "o.json"])
    assert (args.model, args.N, args.auxt, args.remove, args.wavelet) == (None, None, False, None, None)
    args = evaluate_cli._parser().parse_args(["run", "--out", "o.json", "--model", "mbt2018", "--N", "8",
                                          "--auxt", "--remove", "scaling"])
    assert (args.model, args.N, args.auxt, args.remove) == ("mbt2018", 8, True, ["scaling"])


def test_config_errors_are_written_with_flags():
    err = ConfigError("remove", "scaling needs {auxt}")
    assert str(err) == "remove scaling needs auxt"
    assert cli.error_message(err) == "--remove scaling needs --auxt"
    assert cli.error_message(ConfigError("patch_size", "must be a multiple of 64, got 100")) == (
        "--patch-size must be a multiple of 64, got 100")


def raising(err: BaseException):
    def body() -> None:
        raise err

    return body


@pytest.mark.parametrize(
    ("err", "status"),
    [
        (ConfigError("steps", "must be >= 1, got 0"), 2),
        (DataError("/data: no such folder"), 2),
        (RunDirError("/run already holds a run"), 2),
        (evaluate.EvaluationError("x.pt: not a checkpoint"), 2),
        (train_mod.TrainingError("loss is nan at step 3"), 1),
    ],
)
def test_run_command_maps_errors_to_one_line_and_exit_status(capsys, err, status):
    assert cli.run_command(raising(err)) == status
    line = capsys.readouterr().err
    assert line == f"error: {cli.error_message(err)}\n"


def test_run_command_success_and_unexpected_errors(capsys):
    assert cli.run_command(lambda: None) == 0
    with pytest.raises(KeyError):  # a bug is not turned into a one-line error
        cli.run_command(raising(KeyError("bug")))
    assert capsys.readouterr().err == ""


def test_train_command_exit_status_for_bad_flags(tmp_path, capsys):
    assert train_cli.main(["--out", str(tmp_path / "r"), "--patch-size", "100"]) == 2
    assert capsys.readouterr().err == "error: --patch-size must be a multiple of 64, got 100\n"
    with pytest.raises(SystemExit) as info:  # not a number: argparse's own error, status 2
        train_cli.main(["--out", str(tmp_path / "r"), "--steps", "many"])
    assert info.value.code == 2

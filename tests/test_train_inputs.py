"""Issue 17: training inputs that failed in the real world -- fp16's skipped steps, a divergence
between logging steps, a full disk, resuming on a GPU, a data folder changed before a resume, two
processes on one run directory. Each kind is tested with its siblings; what the user sees is
tested through ``python -m energylab.train`` in a subprocess (one line on stderr, the exit status
of :mod:`energylab.cli`, no traceback)."""

from __future__ import annotations

import errno
import fcntl
import io
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from energylab import train as train_mod
from energylab.config import TrainConfig
from energylab.data import TrainStream
from energylab.rundir import RunDir, RunDirError
from energylab.train import __main__ as train_cli

TINY = ["--model", "bmshj2018-factorized", "--N", "8", "--M", "12", "--batch-size", "2",
        "--patch-size", "64", "--test-size", "64", "--probe-count", "2", "--probe-size", "64",
        "--capture-every", "0", "--device", "cpu"]
"""A tiny run without captures, in process (a small probe set warns, so subprocesses take
:data:`QUIET`'s default probe instead)."""
QUIET = ["--model", "bmshj2018-factorized", "--N", "8", "--M", "12", "--batch-size", "2",
         "--patch-size", "64", "--test-size", "64", "--capture-every", "0", "--device", "cpu"]
"""A tiny run that writes nothing on stderr but its progress lines and its error."""
ROOT = Path(__file__).resolve().parents[1]


def main(out: Path, *extra: str, steps: int = 10) -> int:
    return train_cli.main(["--out", str(out), "--steps", str(steps), *TINY, *extra])


def python(*args: str, cwd: Path, preexec_fn=None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=preexec_fn)


def one_line(result: subprocess.CompletedProcess, status: int) -> str:
    """The one stderr line of a failed command (after its progress lines, if any)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("step ")]
    assert result.returncode == status, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def strip_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


def finite_weights(path: Path) -> bool:
    state = torch.load(path, weights_only=False)["model"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# -- fp16: steps skipped by the gradient scaler -------------------------------------------------

FP16 = ["--precision", "fp16", "--lr-schedule", "multistep", "--lr-milestones", "3",
        "--log-every", "1", "--eval-every", "5"]


def test_fp16_skipped_steps_are_counted_and_not_scheduled(tmp_path, capsys, monkeypatch):
    out = tmp_path / "fp16"
    assert main(out, *FP16) == 0
    run = RunDir(out)
    records = run.metrics()
    assert [r["step"] for r in records] == list(range(1, 11))
    skipped = [r["skipped_steps"] for r in records]
    totals = [r["skipped_steps_total"] for r in records]
    assert totals == list(np.cumsum(skipped)) and set(skipped) <= {0, 1}
    ckpt = run.load_checkpoint()
    # every skip halved the scale (65536 at the start, never grown in 10 steps)
    assert totals[-1] == round(math.log2(65536 / ckpt["scaler"]["scale"])) > 0
    assert ckpt["skipped"] == {"total": totals[-1], "logged": totals[-1]}
    # the budget counts every step; the schedule only applied optimizer steps
    assert ckpt["step"] == 10 and ckpt["scheduler"]["last_epoch"] == 10 - totals[-1]
    for r, before in zip(records, [0, *totals[:-1]], strict=True):
        applied_before = r["step"] - 1 - before
        assert r["lr"] == pytest.approx(1e-4 * 0.1 ** (applied_before >= 3), rel=1e-12)
    shown = capsys.readouterr()  # progress lines: stdout (earlier: stderr)
    console = [line for line in (shown.out + shown.err).splitlines() if line.startswith("step ")]
    assert len(console) == 10
    for line, r in zip(console, records, strict=True):
        assert (f"skipped {r['skipped_steps']} step(s) since the last line, "
                f"{r['skipped_steps_total']} in all" in line) == (r["skipped_steps_total"] > 0)

    # killed after the checkpoint at step 5: the resumed run counts as the uninterrupted one
    killed = tmp_path / "killed"
    real = TrainStream.batch

    def dying(self, step):
        if step == 6:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(TrainStream, "batch", dying)
    assert main(killed, *FP16) == 130
    monkeypatch.setattr(TrainStream, "batch", real)
    assert main(killed, *FP16, "--resume") == 0
    assert strip_time(RunDir(killed).metrics()) == strip_time(records)


# -- divergence between logging steps ---------------------------------------------------------


def nan_gradient_at(step):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        calls["n"] += 1
        if calls["n"] == step:  # a gradient overflows; the loss of this step is still finite
            parameters[0].grad.fill_(float("inf"))
        return real(parameters, *args, **kwargs)

    return torch.nn.utils, "clip_grad_norm_", clip


def nan_weight_after(step):
    real = torch.optim.Adam.step
    calls = {"n": 0}

    def adam_step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        params = self.param_groups[0]["params"]
        if len(params) > 1:  # the main optimizer, not the quantiles'
            calls["n"] += 1
            if calls["n"] == step:  # g_s's last parameter: the loss and aux loss stay finite
                with torch.no_grad():
                    params[-1].view(-1)[0] = float("nan")
        return out

    return torch.optim.Adam, "step", adam_step


def nan_loss_at(step):
    real = train_mod.ortho_loss
    calls = {"n": 0}

    def ortho(model):
        calls["n"] += 1
        value = real(model)
        return value * float("nan") if calls["n"] == step else value

    return train_mod, "ortho_loss", ortho


@pytest.mark.parametrize(
    ("poison", "message", "good", "logged"),
    [
        # eval_every 3, log_every 2: the non-finite value comes on an evaluation step between
        # logging steps; the evaluation and checkpoint of step 3 are not written
        (nan_gradient_at(3), "error: the gradient norm is inf at step 3 (checked for step 3); stopped "
                             "before writing anything of them: the last good checkpoint", 0, [2]),
        (nan_weight_after(3), "error: parameter g_s.", 0, [2]),
        # a NaN loss at step 5 is found at the logging step 6, before its record is written
        (nan_loss_at(5), "error: loss is nan at step 5 (checked for steps 5\u20136); stopped", 3, [2, 4]),
    ],
    ids=["gradient", "weight", "loss"],
)
def test_divergence_is_found_before_anything_is_written(tmp_path, monkeypatch, capsys, poison, message,
                                                        good, logged):
    monkeypatch.setattr(*poison)
    out = tmp_path / "nan"
    assert main(out, "--log-every", "2", "--eval-every", "3", steps=8) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(message), last
    run = RunDir(out)
    assert f"({run.checkpoint_path}, step {good}) is kept" in last
    if "parameter" in message:
        assert "is not finite (checked for step 3)" in last
    assert run.load_checkpoint()["step"] == good and finite_weights(run.checkpoint_path)
    assert [r["step"] for r in run.evals()] == [0, 3][: 1 + (good == 3)]
    assert [r["step"] for r in run.metrics()] == logged


def test_a_step_between_boundaries_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """The check costs no host read per step: a step that is not a boundary turns no tensor into
    a Python value in energylab.train (on a GPU each would wait for the device)."""
    config = TrainConfig(out=tmp_path / "r", model="bmshj2018-factorized", N=8, M=12, batch_size=2,
                         test_size=64, probe_count=2, probe_size=64, capture_every=0, device="cpu",
                         log_every=2, steps=4)
    s = train_mod.setup(config)
    s.model.train()
    reads = []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == "energylab.train":
                reads.append(name)
            return real(self, *args, **kwargs)

        return read

    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    assert train_mod.train_step(s, 1, s.stream.batch(0)) is None
    assert reads == []
    assert train_mod.train_step(s, 2, s.stream.batch(1)) is not None  # a logging step reads its record
    assert "__float__" in reads


# -- a full disk ------------------------------------------------------------------------------


class FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC after ``room`` bytes, as on a full file system."""

    def __init__(self, f, room: int = 1000) -> None:
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)


def full_on_save(number: int):
    """``torch.save`` whose ``number``-th call runs out of space: torch's zip writer then raises
    a ``RuntimeError`` with the ``OSError`` as its context, as it does on a real disk."""
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        return real(obj, FullDisk(f) if calls["n"] == number else f, *args, **kwargs)

    return torch, "save", save


def full_on_config():
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name.startswith(f".{RunDir.CONFIG}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *args, **kwargs)

    return Path, "write_text", write_text


def full_on_metrics():
    import energylab.rundir as rundir

    def open_full(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115
        if Path(path).name != RunDir.METRICS or "a" not in mode:
            return f

        class Torn:  # half a line reaches the disk, then it is full
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, text):
                f.write(text[:10])
                f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def flush(self):
                f.flush()

        return Torn()

    return rundir, "open", open_full


@pytest.mark.parametrize(
    ("failure", "name", "kept"),
    [
        (full_on_save(2), RunDir.CHECKPOINT, "not written; the previous checkpoint.pt is kept"),
        (full_on_save(4), RunDir.FINAL, "final.pt was not written"),
        (full_on_config(), RunDir.CONFIG, "config.json was not written"),
        (full_on_metrics(), RunDir.METRICS, "the records were not appended"),
    ],
    ids=["checkpoint", "final", "config", "metrics"],
)
def test_full_disk_names_the_file_and_keeps_the_last_version(tmp_path, monkeypatch, capsys, failure,
                                                               name, kept):
    out = tmp_path / "run"
    monkeypatch.setattr(*failure, raising=False)
    assert main(out, "--log-every", "10", "--eval-every", "5") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {out / name}: No space left on device ({kept})"
    monkeypatch.undo()
    if out.exists():  # (a run that wrote nothing leaves no directory)
        leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or "tmp" in p.name]
        assert leftovers == []  # no temporary file
    if name == RunDir.CHECKPOINT:
        run = RunDir(out)
        assert run.load_checkpoint()["step"] == 0 and not run.is_finished()
        assert main(out, "--log-every", "10", "--eval-every", "5", "--resume") == 0
    if name == RunDir.METRICS:
        assert (out / name).read_text() == ""  # the torn half line was cut back


def unshared_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.parametrize("limit", ["file size limit", pytest.param("2.4 MB tmpfs", marks=pytest.mark.slow)])
def test_full_disk_in_a_real_process_is_one_line(tmp_path, limit):
    """A checkpoint that does not fit (the one at step 5 holds Adam's state, twice the model):
    the real kernel error through torch's real writer; the checkpoint at step 0 stays."""
    args = ["-m", "energylab.train", "--out", "run", "--steps", "10", "--log-every", "10",
            "--eval-every", "5", *QUIET]
    if limit == "file size limit":
        result = python(*args, cwd=tmp_path, preexec_fn=lambda: resource.setrlimit(
            resource.RLIMIT_FSIZE, (150_000, 150_000)))
        cause = "File too large"
    else:
        if not shutil.which("unshare") or not unshared_tmpfs():
            pytest.skip("no unprivileged mount namespace to mount a small tmpfs in")
        (tmp_path / "run").mkdir()
        script = (f"mount -t tmpfs -o size=300k tmpfs run && {sys.executable} "
                  + " ".join(args) + "; status=$?; cp -r run saved; exit $status")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path,
                                capture_output=True, text=True, timeout=600, env=env)
        cause = "No space left on device"
    line = one_line(result, 1)
    checkpoint = Path("run") / RunDir.CHECKPOINT
    assert line == f"error: {checkpoint}: {cause} (not written; the previous checkpoint.pt is kept)"
    run = RunDir(tmp_path / ("run" if limit == "file size limit" else "saved"))
    assert run.load_checkpoint()["step"] == 0
    assert not [p for p in run.path.iterdir() if p.name.startswith(".")]


# -- resuming on a GPU: the RNG states stay on the CPU -----------------------------------------


def test_resume_reads_the_checkpoint_on_the_cpu_whatever_the_device(tmp_path):
    out = tmp_path / "run"
    assert main(out, "--eval-every", "4", steps=4) == 0
    s = train_mod.setup(replace(RunDir(out).train_config(), steps=8))
    s.device = torch.device("meta")  # stands in for a GPU: a device whose tensors are not CPU tensors
    train_mod.resume_run(s)
    s.run.close()
    ckpt = RunDir(out).load_checkpoint()
    assert torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"]) and s.start == 4
    # a state mapped to another device is what torch.set_rng_state refused
    with pytest.raises((TypeError, RuntimeError, NotImplementedError)):
        torch.set_rng_state(RunDir(out).load_checkpoint("meta")["rng"]["torch"])


# -- the data folder changed before a resume --------------------------------------------------


def write_jpegs(folder: Path, names: list[str], seed: int = 0, height: int = 128) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (height, 128, 3), dtype=np.uint8)).save(folder / name)


DATA_RUN = ["--log-every", "5", "--eval-every", "5", "--probe-size", "64"]


@pytest.fixture
def five(tmp_path) -> Path:
    """Five JPEGs, flat: im0 is the test image, im1..im4 the training images."""
    folder = tmp_path / "data"
    write_jpegs(folder, [f"im{i}.jpg" for i in range(5)])
    return folder


def data_main(out: Path, folder: Path, *extra: str, steps: int) -> int:
    return main(out, "--data", str(folder), "--workers", "0", *DATA_RUN, *extra, steps=steps)


def test_resume_after_a_file_was_added_stops_in_one_line(five, tmp_path):
    out = tmp_path / "run"
    assert data_main(out, five, steps=5) == 0
    write_jpegs(five, ["im5.jpg"], seed=1)  # the sixth
    # (-W: the tiny probe set's warning is not what this test reads)
    result = python("-W", "ignore::UserWarning", "-m", "energylab.train", "--out", str(out),
                    "--steps", "10", "--resume", "--data", str(five), "--workers", "0", *TINY,
                    *DATA_RUN, cwd=tmp_path)
    line = one_line(result, 2)
    assert "the data changed since the checkpoint at step 5" in line and "added: test/im5.jpg" in line
    assert "--allow-data-change" in line and str(five.resolve()) in line
    run = RunDir(out)
    assert run.load_checkpoint()["step"] == 5 and torch.load(run.final_path, weights_only=False)["step"] == 5
    assert [r["step"] for r in run.metrics()] == [5] and "im5.jpg" not in str(run.config()["data"])


def test_data_change_siblings_and_the_flag_that_records_it(five, tmp_path, capsys):
    out = tmp_path / "run"
    assert data_main(out, five, steps=5) == 0
    before = (out / RunDir.CONFIG).read_text()
    (five / "im3.jpg").unlink()  # removed
    write_jpegs(five, ["im2.jpg"], seed=2, height=192)  # the same name, another image
    write_jpegs(five, ["im9.jpg"], seed=3)  # added
    assert data_main(out, five, "--resume", steps=10) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "added: train/im9.jpg; removed: train/im3.jpg; changed: train/im2.jpg;" in err
    assert (out / RunDir.CONFIG).read_text() == before  # nothing written

    # a checkpoint that predates data_files: the file names of its config are compared
    ckpt = RunDir(out).load_checkpoint()
    del ckpt["data_files"]
    torch.save(ckpt, out / RunDir.CHECKPOINT)
    assert data_main(out, five, "--resume", steps=10) == 2
    assert "removed: train/im3.jpg" in capsys.readouterr().err

    with pytest.warns(UserWarning, match="going on with the changed data"):
        assert data_main(out, five, "--resume", "--allow-data-change", steps=10) == 0
    config = RunDir(out).config()
    assert "im9.jpg" in config["data"]["test"] + config["data"]["train"]
    assert "im3.jpg" not in config["data"]["train"]
    (change,) = config["data_changes"]
    assert change["step"] == 5 and "train/im3.jpg" in change["removed"]
    assert RunDir(out).is_finished()
    assert RunDir(out).load_checkpoint()["data_files"]["train"][0][0] == "im1.jpg"


def test_allow_data_change_needs_resume(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(tmp_path / "r", "--allow-data-change")
    assert exit_.value.code == 2 and "--allow-data-change applies to --resume only" in capsys.readouterr().err


def test_data_changes_lists_each_kind():
    old = {"train": [["a.png", 10, 64, 64], ["b.png", 11, 64, 64]], "test": [["t.png", 5, 64, 64]]}
    new = {"train": [["a.png", 10, 64, 64], ["b.png", 11, 64, 96], ["c.png", 1, 64, 64]], "test": []}
    assert train_mod.data_changes(old, new) == {
        "added": ["train/c.png"], "removed": ["test/t.png"], "changed": ["train/b.png"]}
    assert train_mod.data_changes(old, old) == {"added": [], "removed": [], "changed": []}
    names_only = {"train": [["a.png"], ["b.png"]], "test": [["t.png"]]}
    assert train_mod.data_changes(names_only, old) == {"added": [], "removed": [], "changed": []}


# -- two processes on one run directory -------------------------------------------------------


def hold_lock(path: Path) -> int:
    """Lock ``path`` as another training process would (``<pid> <host>`` in it); the fd."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def test_a_locked_run_directory_is_refused_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tmp_path / "new", "--data", str(tmp_path / "missing"), steps=2) == 2
    assert not (tmp_path / "new").exists()  # a run that fails at once leaves no directory
    capsys.readouterr()
    fd = hold_lock(out / "run.lock")
    try:
        assert main(out, steps=2) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {out} is in use by another training process (pid {os.getpid()}); "
                       "wait for it to end, or choose another run directory")
        assert not RunDir(out).is_run()
    finally:
        os.close(fd)
    assert main(out, steps=2) == 0  # the holder gone, the run goes ahead
    assert not (out / "run.lock").exists()  # and removes its lock file at the end
    from energylab.rundir import RunLock

    with RunLock(out), pytest.raises(RunDirError, match=f"{out} is in use .* \\(pid {os.getpid()}\\)"):
        RunLock(out).acquire()  # another open file description: refused as well


WAITING = """
import sys, time, pathlib
import energylab.train as t
real, go = t.train_step, pathlib.Path(sys.argv[1])
def waiting(s, step, x):
    deadline = time.time() + 300
    while step == 1 and not go.exists() and time.time() < deadline:
        time.sleep(0.05)
    return real(s, step, x)
t.train_step = waiting
from energylab.train.__main__ import main
raise SystemExit(main(sys.argv[2:]))
"""


def test_two_processes_on_one_run_directory(tmp_path):
    args = ["--out", "run", "--steps", "2", "--log-every", "10", *QUIET]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", WAITING, "go", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        run = tmp_path / "run"
        while not ((run / "run.lock").exists() or (run / RunDir.CHECKPOINT).exists()):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        second = python("-m", "energylab.train", *args, cwd=tmp_path)
        line = one_line(second, 2)
        assert line == (f"error: run is in use by another training process (pid {first.pid}); "
                        "wait for it to end, or choose another run directory")
    finally:
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert RunDir(tmp_path / "run").is_finished()

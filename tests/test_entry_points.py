"""Every ``python -m energylab.<command>`` as a user runs it: a subprocess, on one bad input of each
kind it can meet (a bad flag, a missing file, a diverging run, an interrupted run). Each must end in
one line on stderr (``error: ...``), the exit status :mod:`energylab.cli` documents (2 bad input,
1 failed run, 130 interrupted) and no traceback.

``--help`` and Ctrl-C run in fresh ``python -m`` processes (the interpreter's start, the imports
and a signal from outside are what they show); the other runs are forked children of one Python
that imported the commands once (the ``entry_point`` fixture of ``conftest.py``), each run by
``runpy._run_module_as_main`` as ``python -m`` runs it, so that 20 runs pay 8 starts, not 20."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENTRY_POINTS

pytestmark = pytest.mark.slow  # every test starts processes

TINY_TRAIN = ["--model", "bmshj2018-factorized", "--N", "8", "--M", "12", "--batch-size", "2",
              "--patch-size", "64", "--test-size", "64", "--log-every", "1", "--eval-every", "3",
              "--capture-every", "0", "--device", "cpu"]
"""A tiny run with no captures (a small probe would warn on stderr)."""
TINY_ABLATION = [*TINY_TRAIN, "--seeds", "0"]
COMMANDS = ENTRY_POINTS  # ("train", "ablate", "evaluate", "analyze", "figures"), each imported by the server


def command(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"energylab.{name}", *args]


def check_one_line(result_stderr: str, returncode: int, expected: int, *words: str) -> None:
    lines = result_stderr.strip().splitlines()
    assert returncode == expected, result_stderr
    assert "Traceback" not in result_stderr
    assert len(lines) == 1, result_stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "default"})


BAD_FLAGS = {
    "train": ["--out", "r", "--steps", "many"],
    "ablate": ["--bogus-flag"],
    "evaluate": ["r", "--out", "o.json", "--padding", "mirror"],
    "analyze": ["r"],
    "figures": [".", "--bogus-flag"],
}
MISSING = {
    "train": (["--out", "r", "--data", "no-such-folder", *TINY_TRAIN], "no-such-folder"),
    "ablate": (["--collect", "no-such-ablation"], "no-such-ablation"),
    "evaluate": (["no-such-run", "--out", "o.json"], "no-such-run"),
    "analyze": (["no-such-run", "--out", "a"], "no-such-run"),
    "figures": (["no-such-dir"], "no-such-dir"),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_help_answers(name, tmp_path):
    """A fresh ``python -m``: it starts, imports quietly (nothing on stderr: no warning) and answers."""
    result = run(command(name, "--help"), tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert f"python -m energylab.{name}" in result.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_bad_flag(name, tmp_path, entry_point):
    result = entry_point(name, *BAD_FLAGS[name], cwd=tmp_path)
    check_one_line(result.stderr, result.returncode, 2, "--help")


@pytest.mark.parametrize("name", COMMANDS)
def test_missing_file(name, tmp_path, entry_point):
    args, word = MISSING[name]
    result = entry_point(name, *args, cwd=tmp_path)
    check_one_line(result.stderr, result.returncode, 2, word)


@pytest.mark.parametrize("name, args", [
    ("train", ["--out", "r", "--steps", "6", "--lr", "1e9", *TINY_TRAIN]),
    ("ablate", ["--out", "a", "--steps", "6", "--lr", "1e9", *TINY_ABLATION]),
])
def test_diverging_run(name, args, tmp_path, entry_point):
    """The README's promise: a run that diverges ends in one line (under ``python -m`` the error
    class is the library's, not a ``__main__`` copy), exit status 1, the checkpoint kept."""
    result = entry_point(name, *args, cwd=tmp_path)
    check_one_line(result.stderr, result.returncode, 1, "last good checkpoint")
    assert list(tmp_path.rglob("checkpoint.pt"))


@pytest.mark.parametrize("name, args", [
    ("train", ["--out", "r", "--steps", "100000", *TINY_TRAIN]),
    ("ablate", ["--out", "a", "--steps", "100000", *TINY_ABLATION]),
])
def test_interrupted_run(name, args, tmp_path):
    """Ctrl-C while training: one line, exit status 130, and the run continues with ``--resume``."""
    process = subprocess.Popen(
        command(name, *args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # a shell's background job ignores SIGINT, and so would the child: give it the default back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:
        if line.startswith("step 4:"):  # past the first checkpoint (step 3)
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    check_one_line(err, process.returncode, 130, "interrupted")
    assert list(tmp_path.rglob("checkpoint.pt"))


def test_slurm_launcher_without_slurm(tmp_path, entry_point):
    """submitit's "Could not detect srun" RuntimeError becomes one line, exit 2 (found by a newcomer)."""
    result = entry_point("ablate", "--out", "a", "--steps", "2", "--launcher", "slurm", *TINY_ABLATION,
                         cwd=tmp_path)
    check_one_line(result.stderr, result.returncode, 2, "--launcher slurm")

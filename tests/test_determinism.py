"""``TrainConfig.deterministic`` (``--deterministic``): one intra-op thread and the AVX2 code paths of
ATen, oneDNN and MKL, so a CPU run's numbers do not depend on the machine's core count or CPU.

The runs that check it start their own Python (``slow``): ATen, oneDNN and MKL fix their code paths
when they start, so the pins hold in a fresh process only, and this test process must keep its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from energylab import cli
from energylab.config import RESUMABLE_CHANGES, ConfigError, TrainConfig
from energylab.train import DETERMINISTIC_ENV, DETERMINISTIC_THREADS, deterministic_cpu, train
from energylab.train.__main__ import build_parser

TINY = ["--N", "8", "--M", "12", "--batch-size", "2", "--test-size", "64", "--probe-count", "2",
        "--probe-size", "64", "--capture-every", "3", "--eval-every", "3", "--log-every", "1"]
"""A tiny run: every step logged, evaluations and captures at steps 0, 3 and 6."""

RUNS = r"""
import json, sys, torch
from energylab.train.__main__ import main
for threads, argv in json.loads(sys.argv[1]):
    torch.set_num_threads(threads)  # the "machine's" thread count the run starts from
    status = main(argv)
    if status:
        raise SystemExit(status)
"""
"""A Python that trains ``[(threads, argv), ...]`` in turn, each from its own thread count."""


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def numbers(run: Path) -> dict:
    """Everything a run computed: its records without wall times, and its final weights."""
    def records(name: str) -> list[str]:  # as text: NaN statistics compare equal
        return [json.dumps({k: v for k, v in json.loads(line).items() if k != "wall_time"}, sort_keys=True)
                for line in (run / name).read_text().splitlines()]

    final = torch.load(run / "final.pt", map_location="cpu", weights_only=True)["model"]
    return {"metrics": records("metrics.jsonl"), "eval": records("eval.jsonl"),
            "energy": records("energy.jsonl"), "weights": {k: v.numpy().tobytes() for k, v in final.items()}}


def test_deterministic_is_a_setting_that_resume_keeps(tmp_path):
    config = TrainConfig(out=tmp_path, deterministic=True)
    assert TrainConfig(out=tmp_path).deterministic is False
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["deterministic"] is True and TrainConfig.from_dict(saved) == config
    legacy = {k: v for k, v in saved.items() if k != "deterministic"}  # saved before the field existed
    assert TrainConfig.from_dict(legacy).deterministic is False
    assert "deterministic" not in RESUMABLE_CHANGES
    assert replace(config, deterministic=False).changed_from(config) == ["deterministic"]
    with pytest.raises(ConfigError, match="deterministic must be true or false"):
        TrainConfig(out=tmp_path, deterministic="yes")
    with pytest.raises(ConfigError, match="deterministic pins CPU arithmetic.*device cuda") as err:
        TrainConfig(out=tmp_path, deterministic=True, device="cuda")
    assert "--device cuda" in err.value.render(cli.flag)


def test_the_flag_sets_it(tmp_path):
    parser = build_parser()
    assert cli.config_from_args(parser.parse_args(["--out", str(tmp_path), "--deterministic"])).deterministic
    assert not cli.config_from_args(parser.parse_args(["--out", str(tmp_path)])).deterministic


def test_unpinned_runs_record_their_compute_environment(tmp_path):
    threads = torch.get_num_threads()
    with deterministic_cpu(TrainConfig(out=tmp_path)) as pins:
        assert pins is None and torch.get_num_threads() == threads
    run = train(TrainConfig(out=tmp_path / "run", steps=1, N=8, M=12, batch_size=2, test_size=64,
                            probe_count=2, probe_size=64, capture_every=0))
    compute = run.config()["compute"]
    assert compute["threads"] == threads and compute["torch"] == str(torch.__version__)
    assert compute["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "deterministic" not in compute


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "AVX2",
                    reason="this process runs ATen's AVX2 kernels: the pins would hold for it")
def test_a_process_on_other_aten_kernels_is_refused_before_anything_changes(tmp_path):
    threads, environ = torch.get_num_threads(), dict(os.environ)
    with pytest.raises(ConfigError, match="ATEN_CPU_CAPABILITY=avx2"):
        with deterministic_cpu(TrainConfig(out=tmp_path, deterministic=True)):
            pass
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert dict(os.environ) == environ


@pytest.mark.slow
def test_deterministic_runs_are_bit_identical_whatever_the_thread_count(tmp_path):
    """Started from 1, 2 and 3 threads (as on machines of other core counts), interrupted and
    resumed or not: the same metrics, evaluations, captures and weights, bit for bit."""
    def argv(name: str, *extra: str, steps: int = 6) -> list[str]:
        return ["--out", str(tmp_path / name), "--steps", str(steps), *TINY, *extra]

    det = "--deterministic"
    one = run_python(RUNS, json.dumps([[1, argv("one", det)]]), env=DETERMINISTIC_ENV)
    assert one.returncode == 0, one.stderr
    more = run_python(RUNS, json.dumps([[2, argv("two", det)], [3, argv("resumed", det, steps=3)],
                                        [2, argv("resumed", det, "--resume")]]), env=DETERMINISTIC_ENV)
    assert more.returncode == 0, more.stderr
    reference = numbers(tmp_path / "one")
    assert numbers(tmp_path / "two") == reference
    assert numbers(tmp_path / "resumed") == reference
    for name in ("one", "two", "resumed"):
        compute = json.loads((tmp_path / name / "config.json").read_text())["compute"]
        assert compute["threads"] == DETERMINISTIC_THREADS
        pins = compute["deterministic"]
        assert pins["threads"] == DETERMINISTIC_THREADS and pins["aten"] == "AVX2"
        assert pins["onednn"] is None or "avx2" in pins["onednn"]

    # the same runs unpinned, from 1 and 2 threads: what the pins are for
    plain = run_python(RUNS, json.dumps([[1, argv("plain1")], [2, argv("plain2")]]))
    assert plain.returncode == 0, plain.stderr
    threads = [json.loads((tmp_path / n / "config.json").read_text())["compute"]["threads"]
               for n in ("plain1", "plain2")]
    assert threads == [1, 2]
    if numbers(tmp_path / "plain1") == numbers(tmp_path / "plain2"):
        warnings.warn("unpinned runs from 1 and 2 threads agreed here: this test shows less than it "
                      "could on this machine", stacklevel=1)


STARTED = {
    "oneDNN": ("torch.nn.functional.conv2d(torch.ones(2, 16, 8, 8), torch.ones(16, 16, 3, 3))",
               "ONEDNN_MAX_CPU_ISA=AVX2", {"ATEN_CPU_CAPABILITY": "avx2"}),
    "MKL": ("torch.sqrt(torch.rand(100000))", "MKL_CBWR=AVX2,STRICT",
            {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("library", sorted(STARTED))
def test_a_library_started_on_other_code_paths_is_refused(tmp_path, library):
    """A run in a process where oneDNN (a convolution) or MKL (a square root) already ran on the
    CPU's best code path stops with the variable to start Python with, instead of claiming pins it
    does not have."""
    first, remedy, env = STARTED[library]
    code = ("import sys, torch\n" + first + "\nfrom energylab.train import onednn_kernel\n"
            "print(onednn_kernel(), flush=True)\n" + RUNS)
    out = run_python(code, json.dumps([[1, ["--out", str(tmp_path / "run"), "--steps", "1", *TINY,
                                            "--deterministic"]]]), env=env)
    kernel = out.stdout.splitlines()[0] if out.stdout else ""
    if library == "oneDNN" and "avx512" not in kernel:
        pytest.skip(f"oneDNN's own choice here is {kernel or 'unknown'}: nothing to refuse")
    if library == "MKL" and not torch.backends.mkl.is_available():
        pytest.skip("torch without MKL")
    assert out.returncode == 2, out.stderr
    assert "--deterministic" in out.stderr and remedy in out.stderr and "already ran" in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_command_restarts_itself_with_the_pinned_kernels(tmp_path):
    """``python -m energylab.train --deterministic`` needs no environment prefix: without
    :data:`DETERMINISTIC_ENV` it restarts with it (on an AVX-512 CPU it would be refused otherwise)."""
    env = {k: v for k, v in os.environ.items() if k not in DETERMINISTIC_ENV}
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "energylab.train", "--deterministic", "--out", str(out),
                           "--steps", "3", *TINY], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    pins = json.loads((out / "config.json").read_text())["compute"]["deterministic"]
    assert pins["aten"] == "AVX2" and pins["threads"] == DETERMINISTIC_THREADS

"""Cost of latent capture: the capture's share of training time at the main command's defaults.

    python bench/bench_capture.py [--steps 1500] [--repeats 3] [--auxt]

Runs ``energylab.train`` with the defaults of ``python -m energylab.ablate`` (``--steps 1500 --N 32 --M 48
--test-size 256 --eval-every 100 --capture-every 500``; probe set and bootstrap replicates as
``TrainConfig`` / ``LatentProbe`` default them) and the same run with ``--capture-every 0`` (no
capture), after an untimed 20-step warm-up, alternating A B B A A B ..., and prints each run's
wall time and the capture's share of the run with capture, ``1 - off / on`` (median over repeats;
goal <= 5 %). Evaluation runs in both.
On a shared, loaded machine that difference drowns in noise, so each run with capture also times
its own capture calls (forward passes with hooks, ``records``, ``arrays``, ``log_capture``) and
prints their share of that run's wall time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import energylab.train
from energylab.capture import LatentProbe
from energylab.cli import config_from_args
from energylab.rundir import RunDir
from energylab.train import train
from energylab.train.__main__ import build_parser

ABLATE_DEFAULTS = ["--N", "32", "--M", "48", "--test-size", "256", "--eval-every", "100"]
"""The training flags ``energylab.ablate`` sets differently from ``energylab.train``."""


CAPTURE_CALLS = [(energylab.train, "capture"), (LatentProbe, "records"), (LatentProbe, "arrays"),
                 (RunDir, "log_capture")]
"""Everything a capture runs, timed in place."""
capture_seconds = [0.0]


def _timed(fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            capture_seconds[0] += time.perf_counter() - start

    return wrapper


def timed_run(out: Path, extra: list[str]) -> tuple[float, float]:
    """Wall time of one training run and the seconds spent in its captures."""
    config = config_from_args(build_parser().parse_args(["--out", str(out), *extra]))
    capture_seconds[0] = 0.0
    start = time.perf_counter()
    train(config)
    return time.perf_counter() - start, capture_seconds[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500, help="the ablation's default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--capture-every", type=int, default=500, help="the ablation's default")
    p.add_argument("--auxt", action="store_true", help="train with AuxT (more hook points)")
    opts = p.parse_args()
    for owner, name in CAPTURE_CALLS:
        setattr(owner, name, _timed(getattr(owner, name)))
    warnings.filterwarnings("ignore")
    common = [*ABLATE_DEFAULTS, "--steps", str(opts.steps), *(["--auxt"] if opts.auxt else [])]
    print(f"torch threads: {torch.get_num_threads()}; ablation defaults, --steps {opts.steps}, "
          f"--capture-every {opts.capture_every}{', --auxt' if opts.auxt else ''}")
    on, off, inside = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        # untimed warm-up: the first run of a process pays one-time costs (decoding the built-in
        # photographs, growing the allocator's pools) that would land on whichever run comes first
        timed_run(Path(tmp) / "warmup", [*common, "--steps", "20", "--capture-every", "10"])
        for i in range(opts.repeats):
            on_flags = [*common, "--capture-every", str(opts.capture_every)]
            if i % 2:  # alternate which goes first, so a drift of the machine's speed cancels
                off.append(timed_run(Path(tmp) / f"off{i}", [*common, "--capture-every", "0"])[0])
            wall, spent = timed_run(Path(tmp) / f"on{i}", on_flags)
            on.append(wall)
            inside.append(spent / wall)
            if not i % 2:
                off.append(timed_run(Path(tmp) / f"off{i}", [*common, "--capture-every", "0"])[0])
            print(f"repeat {i}: capture on {on[-1]:.1f} s, off {off[-1]:.1f} s, "
                  f"capture share {1 - off[-1] / on[-1]:.1%}; timed in the run: {spent:.1f} s = "
                  f"{inside[-1]:.1%}", flush=True)
    shares = [1 - b / a for a, b in zip(on, off, strict=True)]
    print(f"median wall time: on {statistics.median(on):.1f} s, off {statistics.median(off):.1f} s")
    print(f"capture share of training time: median {statistics.median(shares):.1%} "
          f"(min {min(shares):.1%}, max {max(shares):.1%}); goal <= 5 %")
    print(f"capture calls timed inside the runs: median {statistics.median(inside):.1%} of their wall time")


if __name__ == "__main__":
    main()

"""Cost of latent capture: a default training run with capture on versus off, in one process.

    python bench/bench_capture.py [--steps 300] [--repeats 3]

Runs ``energylab.train`` with its default flags (capture every ``--capture-every`` = 100 steps on
the default probe set) and the same run with ``--capture-every 0`` (no capture), alternating
A B A B ..., and prints each run's wall time and the median ratio on/off. Evaluation runs in both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from energylab.cli import config_from_args
from energylab.train import build_parser, train


def timed_run(out: Path, extra: list[str]) -> float:
    config = config_from_args(build_parser().parse_args(["--out", str(out), *extra]))
    start = time.perf_counter()
    train(config)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--auxt", action="store_true", help="train with AuxT (more hook points)")
    opts = p.parse_args()
    warnings.filterwarnings("ignore")
    common = ["--steps", str(opts.steps), *(["--auxt"] if opts.auxt else [])]
    print(f"torch threads: {torch.get_num_threads()}; train defaults, --steps {opts.steps}"
          f"{', --auxt' if opts.auxt else ''}")
    on, off = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.repeats):
            on.append(timed_run(Path(tmp) / f"on{i}", common))
            off.append(timed_run(Path(tmp) / f"off{i}", [*common, "--capture-every", "0"]))
            print(f"repeat {i}: capture on {on[-1]:.1f} s, off {off[-1]:.1f} s, "
                  f"ratio {on[-1] / off[-1]:.3f}", flush=True)
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    print(f"median wall time: on {statistics.median(on):.1f} s, off {statistics.median(off):.1f} s")
    print(f"capture on / off: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); goal <= 1.03")


if __name__ == "__main__":
    main()

"""Training-step cost of the causal grid's cells, side by side, as ratios to the baseline's.

    python bench/bench_causal.py [--steps 20] [--repeats 3]

Sets up one training session per cell of ``python -m energylab.ablate --causal`` at the ablation's
default model and batch (``mbt2018-mean`` N=32 M=48, batch 8 of 64×64 crops) and times
``energylab.train.train_step`` round-robin over the cells, ``--repeats`` rounds of ``--steps``
steps each, so every cell sees the same machine load. Prints each cell's median step time and its
ratio to the baseline's, and the grid's total in baseline steps: multiplied by the time of the
baseline's cells, that extrapolates the minutes of ``--causal`` (its evaluations, captures and
real-bitstream coding scale with the cells, too).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from energylab import ablate, train
from energylab.ablate import __main__ as ablate_cli


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    opts = p.parse_args()
    warnings.filterwarnings("ignore")
    names = ablate.variants([], causal=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = ablate_cli.base_config(ablate_cli.build_parser().parse_args(["--out", tmp, "--device", "cpu"]))
        sessions = {}
        for name, o in names.items():
            config = replace(base, out=Path(tmp) / name, auxt=o["auxt"], remove=tuple(o["remove"]),
                             freeze=tuple(o["freeze"]), projection_init=o["projection_init"])
            sessions[name] = train.setup(config)
            sessions[name].model.train()
            train.train_step(sessions[name], 1)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(opts.repeats):
            for name, s in sessions.items():
                tick = time.perf_counter()
                for step in range(opts.steps):
                    train.train_step(s, 2 + r * opts.steps + step)
                times[name].append((time.perf_counter() - tick) / opts.steps)
    baseline = float(np.median(times["baseline"]))
    total = 0.0
    print(f"{'cell':36s} {'ms/step':>8s} {'x baseline':>10s}")
    for name, t in times.items():
        ratio = float(np.median(t)) / baseline
        total += ratio
        print(f"{name:36s} {1000 * np.median(t):8.1f} {ratio:10.2f}")
    print(f"grid ({len(names)} cells per seed) = {total:.2f} baseline cells per seed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

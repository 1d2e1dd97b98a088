"""Benchmark the ablation launchers: wall time of ``--launcher local --jobs 2`` against ``inline``.

::

    python bench/bench_launcher.py [--root /tmp/energylab-bench-launcher] [--steps 300] [--seeds 0 1]

Runs the same reduced ablation (baseline and AuxT, ``--seeds``, ``--steps`` steps, the ablation's
other defaults) twice into fresh directories under ``--root``, first with ``--launcher inline``
(cells one after another, torch's default threads) and then with ``--launcher local --jobs 2``
(two cells at once, each with ``cores // 2`` threads), and prints both wall times (training,
real-bitstream coding and the summary included) and their ratio, inline / local: above 1 the
local launcher is faster. (That both give the same summary numbers is tested:
``tests/test_scale.py::test_local_launcher_gives_the_inline_summary``.)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(root: Path, steps: int, seeds: list[str], launcher: list[str]) -> float:
    shutil.rmtree(root, ignore_errors=True)
    argv = [sys.executable, "-m", "energylab.ablate", "--out", str(root), "--steps", str(steps),
            "--eval-every", str(max(1, steps // 3)), "--capture-every", str(max(1, steps // 3)),
            "--seeds", *seeds, "--device", "cpu", *launcher]
    tick = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - tick


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/energylab-bench-launcher"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", nargs="+", default=["0", "1"])
    args = p.parse_args()
    inline = run(args.root / "inline", args.steps, args.seeds, ["--launcher", "inline"])
    local = run(args.root / "local", args.steps, args.seeds, ["--launcher", "local", "--jobs", "2"])
    print(f"reduced ablation (baseline + auxt, seeds {' '.join(args.seeds)}, {args.steps} steps):")
    print(f"  inline            {inline:7.1f} s")
    print(f"  local --jobs 2    {local:7.1f} s")
    print(f"  ratio inline / local: {inline / local:.2f}x")


if __name__ == "__main__":
    main()

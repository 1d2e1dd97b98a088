"""Convergence speed-up of AuxT: the default ablation (baseline vs auxt, 3 seeds).

    python bench/bench_convergence.py [--out DIR] [extra energylab.ablate flags]

Runs ``python -m energylab.ablate`` with its defaults and no ``--remove`` (variants ``baseline``
and ``auxt``, seeds 0 1 2) and prints, per seed and as mean ± std, the steps and wall-time
speed-ups to the baseline's final test loss, with the final test loss, bpp and PSNR.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

from energylab.ablate import __main__ as ablate_cli
from energylab.rundir import AblationDir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="keep the ablation here")
    opts, extra = p.parse_known_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        out = opts.out or Path(tmp) / "ablation"
        argv = ["--out", str(out), "--seeds", "0", "1", "2", *extra]
        print("python -m energylab.ablate " + " ".join(argv), flush=True)
        if ablate_cli.main(argv) != 0:
            return 1
        summary = AblationDir(out).summary()
    print("\nper seed (auxt against the same seed's baseline):")
    for cell in summary["cells"]:
        if cell["variant"] == "auxt":
            print(f"  seed {cell['seed']}: steps to target {cell.get('steps_to_target')}, "
                  f"speedup steps {cell.get('speedup_steps')}, time {cell.get('speedup_time')}")
    row = next(r for r in summary["rows"] if r["variant"] == "auxt")
    for key in ("speedup_steps", "speedup_time", "test_loss", "real_bpp", "test_psnr"):
        mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
        text = "not reached" if mean is None else f"{mean:.3f} ± {std:.3f}"
        print(f"auxt {key}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

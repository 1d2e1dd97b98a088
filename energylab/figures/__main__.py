"""``python -m energylab.figures``: draw or list the figures of a run or an ablation directory.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from energylab import cli
from energylab.figures import FIGURES, available, load, write_figures

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.Parser(
        prog="python -m energylab.figures",
        description="Draw the figures of a run or an ablation directory (PNG and PDF).")
    p.add_argument("dir", type=Path, help="a run directory or an ablation directory")
    p.add_argument("--out", type=Path, help="folder of the figures (default: DIR)")
    p.add_argument("--list", action="store_true", help="only list the figures DIR can give")
    args = p.parse_args(argv)
    return cli.run_command(lambda: _draw(args))


def _draw(args: argparse.Namespace) -> None:
    study = load(args.dir)
    if args.list:
        seeds = sorted({s for _, _, s in study.cells})
        print(f"{study.root}: {study.kind}, variants {', '.join(study.variants)}; "
              f"λ {', '.join(f'{lm:g}' for lm in study.lmbdas)}; seeds "
              f"{', '.join(map(str, seeds))}")
        for spec, why in available(study):
            state = "yes" if why is None else "no "
            print(f"  {state} {spec.name:<21} {spec.description}"
                  + (f"  [skipped: {why}]" if why else ""))
        return
    written = write_figures(study, args.out or study.root, [spec.name for spec in FIGURES])
    names = sorted({p.stem for p in written})
    print(f"{len(names)} figure(s) in {args.out or args.dir}: {', '.join(names)}")


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m energylab.analyze``: the command line of :func:`energylab.analyze.analyze` (``--help``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from energylab import cli
from energylab.analyze import analyze
from energylab.rundir import AnalysisDir

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m energylab.analyze",
        description="Latent statistics of trained models: every statistic of every captured layer "
        "on a folder of images, written to the analysis directory OUT (statistics JSON, arrays, figures).",
    )
    p.add_argument("models", nargs="+", metavar="CKPT",
                   help="run directory, its final model or checkpoint, or a foreign checkpoint "
                   "(with --model and the architecture flags)")
    p.add_argument("--data", default="builtin",
                   help="'builtin' (default: its test photographs) or an image folder")
    p.add_argument("--out", required=True, help="the analysis directory to write")
    p.add_argument("--bitstream", action="store_true", help="also code the images for real (bpp)")
    p.add_argument("--limit", type=int, help="analyse only the first N images (by name)")
    p.add_argument("--no-figures", action="store_true", help="write the statistics JSON and arrays only")
    cli.add_device_arguments(p, default="cpu", choices=None)
    cli.add_model_arguments(p, defaults=False)
    cli.add_auxt_arguments(p, defaults=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 for bad input)."""
    args = _parser().parse_args(argv)

    def body() -> None:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            raise ValueError(f"--device {args.device}: not a torch device ({exc})") from None
        out = analyze(args.models, args.data, args.out, arch=cli.arch_from_args(args),
                      bitstream=args.bitstream, device=device, limit=args.limit,
                      figures=not args.no_figures)
        for model in out.analysis()["models"]:
            checkpoint = model["architecture"]["checkpoint"]
            print(f"{model['name']}: {model['label']}, {checkpoint['format']} layout read from "
                  f"{checkpoint['file']}")
        print(f"wrote {out.path / AnalysisDir.ANALYSIS}")

    return cli.run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m energylab.train``: the command line of :func:`energylab.train.train` (``--help``).

Multi-GPU: ``torchrun --nproc_per_node=K -m energylab.train ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from energylab import cli
from energylab.train import restart_deterministic, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m energylab.train",
        description="Train a CompressAI model (optionally with AuxT) and capture latent statistics.",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: go on although the data folder changed since the checkpoint "
                        "(files added, removed or changed; recorded in config.json)")
    cli.add_model_arguments(p)
    cli.add_auxt_arguments(p)
    cli.add_training_arguments(p)
    cli.add_data_arguments(p)
    cli.add_device_arguments(p)
    return p


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m energylab.train``; returns the exit status (:func:`energylab.cli.run_command`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.deterministic and argv is None:  # a command line: restart with the pinned kernels
        restart_deterministic("energylab.train", sys.argv[1:])
    if args.allow_data_change and not args.resume:
        parser.error("--allow-data-change applies to --resume only")
    try:
        return cli.run_command(lambda: train(cli.config_from_args(args), resume=args.resume,
                                             allow_data_change=args.allow_data_change))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())

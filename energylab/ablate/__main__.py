"""``python -m energylab.ablate``: the command line of :mod:`energylab.ablate` (``--help``): plan the
cells, check the ablation directory, launch the cells (:mod:`energylab.launch`) and collect.

``--split`` has its own defaults for ``--seeds`` and ``--steps`` (:data:`energylab.split.DEFAULT_SEEDS`,
:data:`energylab.split.DEFAULT_STEPS`), chosen for intervals of about ±10 % within 90 minutes on the
2-core CPU (the arithmetic is in :mod:`energylab.split` and ``--help``); every other ablation keeps
seeds 0 1 2 and 1500 steps.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from energylab import cli
from energylab.ablate import (
    CELL_FIELDS,
    DEFAULT_OUT,
    META_DEFAULTS,
    AblationError,
    Cell,
    cell_config,
    collect,
    plan_cells,
    run_cell,
    variants,
)
from energylab.auxt import COMPONENTS, FREEZABLE, SCALING_INITS
from energylab.config import ConfigError, TrainConfig
from energylab.launch import LAUNCHERS, LaunchOptions, launch_cells
from energylab.rundir import AblationDir
from energylab.split import (
    AUXT_STEP_UNITS,
    CAPTURE_S,
    CELL_OVERHEAD_S,
    COST_UNIT_S,
    DEFAULT_CAPTURE_EVERY,
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    format_split,
    grid_minutes,
)
from energylab.summary import format_paired, format_table
from energylab.train import restart_deterministic

ABLATION_SEEDS = (0, 1, 2)
"""Default seeds of every ablation but ``--split``."""
ABLATION_STEPS = 1500
"""Default steps of every ablation but ``--split``."""
ABLATION_CAPTURE_EVERY = 500
"""Default ``--capture-every`` of every ablation but ``--split``."""

__all__ = ["ABLATION_SEEDS", "ABLATION_STEPS", "base_config", "build_parser", "launch_options", "main",
           "resolve_defaults", "run"]


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m energylab.ablate",
        description="Train baseline, AuxT and AuxT-without-components on equal terms; summarise.",
    )
    p.add_argument("--remove", action="append", default=[], metavar="COMPONENT",
                   help=f"a component to ablate (repeatable): {', '.join(COMPONENTS)}")
    p.add_argument("--combined", action="store_true",
                   help="also train one variant with all the given components removed")
    p.add_argument("--wavelets", nargs="*", default=[], help="extra AuxT bases, e.g. db4 bior2.2")
    # own dests: ``freeze`` / ``scaling_init`` are the cells' settings (TrainConfig fields)
    p.add_argument("--freeze", dest="freezes", action="append", default=[], metavar="COMPONENT",
                   choices=FREEZABLE,
                   help=f"also train AuxT with this component frozen at its init (repeatable): "
                        f"{', '.join(FREEZABLE)}")
    p.add_argument("--scaling-init", dest="scaling_inits", action="append", default=[],
                   choices=SCALING_INITS[1:],
                   help="also train AuxT with the subband scaling s started at 0 (gain 1)")
    p.add_argument("--causal", action="store_true",
                   help="the causal grid: projection {learned, frozen orthogonal, frozen KLT} x "
                        "scaling {learned, frozen, none}, beside the baseline")
    split_help = (
        f"the split grid: baseline, auxt and split-A ... split-F (energylab.split): decorrelation x "
        f"unevenness of the shortcut's last stage at a fixed subspace and delivered energy, the earlier "
        f"stages frozen at the data's KLT, no scaling. Defaults --seeds {' '.join(map(str, DEFAULT_SEEDS))} "
        f"--steps {DEFAULT_STEPS} --capture-every {DEFAULT_CAPTURE_EVERY}: at the reference's seed "
        f"spreads (s.d. 0.045-0.19 of a per-seed log contrast) 95 %% intervals of ×1.04-1.18 either "
        f"way (t(0.975, 7) s / sqrt(8)); "
        f"cost here: {len(DEFAULT_SEEDS)} seeds x ({DEFAULT_STEPS} steps x (1 + 7 x {AUXT_STEP_UNITS:g}) "
        f"units x {COST_UNIT_S:g} s + 8 cells x ({CELL_OVERHEAD_S:g} s + "
        f"{DEFAULT_STEPS // DEFAULT_CAPTURE_EVERY + 1} captures x {CAPTURE_S:g} s)) = "
        f"{grid_minutes(len(DEFAULT_SEEDS), DEFAULT_STEPS):.0f} minutes")
    p.add_argument("--split", action="store_true", help=split_help)
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help=f"default {' '.join(map(str, ABLATION_SEEDS))} "
                        f"(--split: {' '.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--lmbdas", nargs="+", type=float, default=None,
                   help="several λ: an R-D sweep with BD-rates (overrides --lmbda)")
    p.add_argument("--out", type=Path, default=None, help="the ablation's directory (default runs/ablation)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted ablation")
    p.add_argument("--only", metavar="VARIANT", help="run this variant only (with --seed)")
    p.add_argument("--seed", type=int, help="with --only: the seed of the single cell")
    p.add_argument("--collect", type=Path, metavar="DIR", help="only summarise the cells in DIR")
    # training flags passed to every cell; the variants set auxt, remove and wavelet themselves
    cli.add_model_arguments(p)
    cli.add_auxt_arguments(p, exclude=("auxt", "remove", "wavelet", "freeze", "scaling_init",
                                       "projection_init"))
    cli.add_training_arguments(p, exclude=("seed",))
    cli.add_data_arguments(p)
    cli.add_device_arguments(p)
    g = p.add_argument_group("launcher (energylab.launch)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="inline",
                   help="inline: cells one after another here; local: --jobs cells at once as "
                        "processes; slurm: one Slurm job per cell")
    g.add_argument("--jobs", type=int, default=1, help="local: cells at once (threads = cores // jobs)")
    g.add_argument("--slurm-partition", help="slurm: partition")
    g.add_argument("--gpus-per-cell", type=int, default=0,
                   help="slurm: GPUs of one cell (one DDP process each)")
    g.add_argument("--cpus-per-cell", type=int, help="slurm: CPUs per process (its torch threads)")
    g.add_argument("--timeout-min", type=int, default=24 * 60,
                   help="time limit of a cell's job in minutes (slurm requeues it from its checkpoint)")
    g.add_argument("--slurm-args", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="slurm: further #SBATCH options, e.g. account=lab qos=high")
    # ablation defaults, tuned to finish within 15 minutes on a 2-core CPU (see README)
    # dense-early: t' of a fast variant is resolved early on (energylab.summary)
    # steps: ABLATION_STEPS, or DEFAULT_STEPS with --split (resolve_defaults)
    p.set_defaults(steps=None, eval_every=100, eval_schedule="dense-early", capture_every=None, N=32, M=48,
                   test_size=256)
    return p


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill ``--seeds``, ``--steps`` and ``--capture-every`` left out: ``--split``'s defaults
    (:mod:`energylab.split`) or every other ablation's (:data:`ABLATION_SEEDS`,
    :data:`ABLATION_STEPS`, :data:`ABLATION_CAPTURE_EVERY`)."""
    split = getattr(args, "split", False)
    if args.seeds is None:
        args.seeds = list(DEFAULT_SEEDS if split else ABLATION_SEEDS)
    if args.steps is None:
        args.steps = DEFAULT_STEPS if split else ABLATION_STEPS
    if args.capture_every is None:
        args.capture_every = DEFAULT_CAPTURE_EVERY if split else ABLATION_CAPTURE_EVERY


def base_config(args: argparse.Namespace) -> TrainConfig:
    """The training settings every cell shares (validated now, before anything is trained); each
    cell replaces ``out``, ``seed``, ``auxt``, ``remove``, ``wavelet`` and, in a sweep, ``lmbda``.
    Seeds and steps left out get their defaults first (:func:`resolve_defaults`).

    Raises:
        ConfigError: an invalid setting; a negative seed.
    """
    resolve_defaults(args)
    negative = [s for s in args.seeds if s < 0]
    if negative:
        raise ConfigError("seeds", f"must be >= 0, got {negative[0]}")
    # ``args.remove`` lists the components to ablate, not a setting of the shared config
    return cli.config_from_args(args, out=args.out or DEFAULT_OUT, seed=0, auxt=False, remove=(),
                                wavelet="haar")


def _check_out(args: argparse.Namespace, base: TrainConfig, names: dict) -> None:
    ablation = AblationDir(args.out)
    record = {"remove": args.remove, "combined": args.combined, "wavelets": args.wavelets,
              "freeze": args.freezes, "scaling_init": args.scaling_inits, "causal": args.causal,
              "split": args.split, "seeds": args.seeds, "lmbdas": args.lmbdas,
              **{k: v for k, v in base.to_dict().items() if k not in CELL_FIELDS}}
    if ablation.is_ablation():
        old = ablation.meta()
        if not (args.resume or args.only):
            raise AblationError(f"{args.out} already holds an ablation; add --resume to continue "
                                "it, or choose another --out")
        changed = sorted(k for k in record if old.get(k, META_DEFAULTS.get(k)) != record.get(k))
        if changed:
            raise AblationError(f"{args.out} was started with other settings ({', '.join(changed)});"
                                " use another --out")
    ablation.write_meta({**record, "variants": names})


def _label(cell: Cell) -> str:
    return f"{cell.variant} seed {cell.seed}" + (f" λ {cell.lmbda:g}" if cell.lmbda else "")


def launch_options(args: argparse.Namespace) -> LaunchOptions:
    """The launcher settings of the command line.

    Raises:
        AblationError: a ``--slurm-args`` item without ``=``, or an invalid number.
    """
    extra = {}
    for item in args.slurm_args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AblationError(f"--slurm-args takes KEY=VALUE items, got {item!r}")
        extra[key.removeprefix("--")] = value
    try:
        return LaunchOptions(args.launcher, args.jobs, args.slurm_partition, args.gpus_per_cell,
                             args.cpus_per_cell, args.timeout_min, extra)
    except ValueError as err:
        raise AblationError(str(err).replace("_", "-")) from None


def run(args: argparse.Namespace) -> dict:
    if args.causal and args.lmbdas:
        raise AblationError("--causal runs at one λ; leave out --lmbdas")
    if args.split and args.lmbdas:
        raise AblationError("--split runs at one λ; leave out --lmbdas")
    resolve_defaults(args)
    names = variants(args.remove, args.combined, args.wavelets, args.freezes, args.scaling_inits,
                     args.causal, args.split)
    if args.collect is not None:
        if args.out is not None:
            raise AblationError("--collect writes the summary and figures into DIR itself; leave out --out")
        return collect(args.collect)
    if args.out is None:
        args.out = DEFAULT_OUT
    base = base_config(args)
    cells = plan_cells(args.out, list(names), args.seeds, args.lmbdas)
    if args.only is not None:
        if args.only not in names:
            raise AblationError(f"unknown variant {args.only!r}; this ablation has: "
                                f"{', '.join(names)}")
        if args.seed is None:
            raise AblationError("--only needs --seed S")
        cells = [c for c in cells if c.variant == args.only and c.seed == args.seed]
    from energylab.train import open_data

    _, test, _, _ = open_data(replace(base, workers=0))  # bad data fails before anything is written
    launch = launch_options(args)
    _check_out(args, base, names)
    todo = [(c, cell_config(base, c, names[c.variant])) for c in cells if not c.done]
    launch_cells(todo, launch, AblationDir(args.out).launch_dir, run_cell=run_cell, test=test,
                 label=_label)
    if args.only is not None:
        return {}
    return collect(args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m energylab.ablate``; returns the exit status (:func:`energylab.cli.run_command`)."""
    args = build_parser().parse_args(argv)
    if args.deterministic and argv is None:  # a command line: restart with the pinned kernels
        restart_deterministic("energylab.ablate", sys.argv[1:])

    def body() -> None:
        summary = run(args)
        if summary:
            print(format_table(summary))
            print(format_paired(summary))
            if "split" in summary:
                print(format_split(summary["split"]))
            if summary["convergence"]["message"]:
                print(f"note: {summary['convergence']['message']}")
            print(f"summary and figures in {args.collect or args.out}")

    return cli.run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())

"""AuxT ablation: baseline, AuxT and AuxT without some components, trained on equal terms.

``python -m energylab.ablate --remove scaling`` trains ``baseline`` (no AuxT), ``auxt`` (full) and
``auxt-no-scaling`` for every seed, then writes a summary (``summary.md``, ``summary.csv``,
``summary.json``) and figures into ``--out``. Variants:

* ``baseline``, ``auxt``, and ``auxt-no-X`` for each ``--remove X``;
* ``--combined``: also one variant with every given component removed (``auxt-no-X+Y``);
* ``--wavelets db4 bior2.2``: one full-AuxT variant per other wavelet basis (``auxt-db4``, ...).

Equal terms: every cell of one seed has the same data order (the sampler is a pure function of
seed and step), the same probe set, the same step budget and the same initial weights for the
parts the variants share (the model is built right after ``torch.manual_seed(seed)`` and AuxT is
attached after the main transforms). Every cell is an ordinary run directory
``OUT/<variant>/seed<S>/`` (``OUT/<variant>/lmbda<λ>/seed<S>/`` in an R-D sweep with ``--lmbdas``),
so an interrupted ablation continues with ``--resume``; ``--only VARIANT --seed S`` runs one cell
and ``--collect OUT`` summarises whatever cells exist.

After training each cell its final model is coded for real (``energylab.evaluate``: actual
``compress``/``decompress``), so the rates in the summary and the BD-rates are those of real
bitstreams.

The summary (per variant and λ, mean ± std over seeds: final R-D numbers on the likelihoods and
on real bitstreams, steps and time to the baseline's final test loss and the speed-ups, the energy
statistics of ``y``, the AuxT branch's energy shares and, with ``--lmbdas``, BD-rates against the
baseline) is computed by :mod:`energylab.summary`, whose docstring defines every number.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from energylab.auxt import COMPONENTS, check_components, variant_name
from energylab.runlog import read_jsonl
from energylab.summary import CellLogs, format_csv, format_json, format_markdown, format_table, summarize
from energylab.wavelets import DWT2

__all__ = ["AblationError", "Cell", "collect", "main", "plan_cells", "variants"]

BITSTREAM_FILE = "bitstream.json"


class AblationError(ValueError):
    """Bad ablation arguments or directory; one-line message."""


def variants(remove: Sequence[str], combined: bool = False,
             wavelets: Sequence[str] = ()) -> dict[str, dict]:
    """Variant name -> training options (``auxt``, ``remove``, ``wavelet``), in order.

    Raises:
        ValueError: an unknown component name (listing the valid ones) or wavelet.
    """
    removed = [c for c in COMPONENTS if c in check_components(remove)]
    options = [{"auxt": False, "remove": [], "wavelet": "haar"},
               {"auxt": True, "remove": [], "wavelet": "haar"}]
    options += [{"auxt": True, "remove": [c], "wavelet": "haar"} for c in removed]
    if combined and len(removed) > 1:
        options.append({"auxt": True, "remove": removed, "wavelet": "haar"})
    for wavelet in wavelets:
        DWT2(wavelet)  # an unknown basis fails here, before anything is trained
        options.append({"auxt": True, "remove": [], "wavelet": wavelet})
    return {variant_name(**o): o for o in options}


class Cell:
    """One training run of the ablation: a variant at one λ and one seed."""

    def __init__(self, root: Path, variant: str, seed: int, lmbda: float | None) -> None:
        self.variant, self.seed, self.lmbda = variant, seed, lmbda
        sub = Path(variant) if lmbda is None else Path(variant) / f"lmbda{lmbda:g}"
        self.dir = root / sub / f"seed{seed}"

    @property
    def done(self) -> bool:
        return (self.dir / "final.pt").exists() and (self.dir / BITSTREAM_FILE).exists()


def plan_cells(root: Path, names: Sequence[str], seeds: Sequence[int],
               lmbdas: Sequence[float] | None) -> list[Cell]:
    return [Cell(root, v, s, lm) for lm in (lmbdas or [None]) for v in names for s in seeds]


# ---------------------------------------------------------------------------------------------
# Running


def build_parser() -> argparse.ArgumentParser:
    from energylab.train import NON_NEGATIVE, add_training_arguments

    p = argparse.ArgumentParser(
        prog="python -m energylab.ablate",
        description="Train baseline, AuxT and AuxT-without-components on equal terms; summarise.",
    )
    p.add_argument("--remove", action="append", default=[], metavar="COMPONENT",
                   help=f"a component to ablate (repeatable): {', '.join(COMPONENTS)}")
    p.add_argument("--combined", action="store_true",
                   help="also train one variant with all the given components removed")
    p.add_argument("--wavelets", nargs="*", default=[], help="extra AuxT bases, e.g. db4 bior2.2")
    p.add_argument("--seeds", nargs="+", type=NON_NEGATIVE, default=[0, 1, 2])
    p.add_argument("--lmbdas", nargs="+", type=float, default=None,
                   help="several λ: an R-D sweep with BD-rates (overrides --lmbda)")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--resume", action="store_true", help="continue an interrupted ablation")
    p.add_argument("--only", metavar="VARIANT", help="run this variant only (with --seed)")
    p.add_argument("--seed", type=int, help="with --only: the seed of the single cell")
    p.add_argument("--collect", type=Path, metavar="DIR", help="only summarise the cells in DIR")
    group = p.add_argument_group("training (passed to every cell)")
    add_training_arguments(group, exclude=("remove", "auxt", "wavelet", "seed"))
    # ablation defaults, tuned to finish within 15 minutes on a 2-core CPU (see README)
    p.set_defaults(steps=1500, eval_every=100, capture_every=250, N=32, M=48, test_size=256)
    return p


def _cell_args(args: argparse.Namespace, cell: Cell, options: dict) -> argparse.Namespace:
    from energylab.train import build_parser as train_parser

    base = vars(train_parser().parse_args(["--out", str(cell.dir)]))
    shared = {k: v for k, v in vars(args).items() if k in base}
    shared.update(out=cell.dir, seed=cell.seed, resume=(cell.dir / "checkpoint.pt").exists(),
                  auxt=options["auxt"], remove=list(options["remove"]),
                  wavelet=options["wavelet"], lmbda=cell.lmbda if cell.lmbda else args.lmbda)
    return argparse.Namespace(**{**base, **shared})


def run_cell(args: argparse.Namespace, cell: Cell, options: dict, test: list) -> None:
    """Train one cell (resuming it if it has a checkpoint), then code ``test`` — the dataset's
    ``(name, image)`` test list — for real."""
    from energylab.data import test_batches
    from energylab.evaluate import evaluate_model, load_model
    from energylab.train import train

    if not (cell.dir / "final.pt").exists():
        train(_cell_args(args, cell, options))
    model, _ = load_model(cell.dir)
    images = [(name, x[0, :, : hw[0], : hw[1]])
              for name, x, hw in test_batches(test, args.test_size, multiple=1)]
    averages, per_image = evaluate_model(model, images)
    (cell.dir / BITSTREAM_FILE).write_text(
        json.dumps({"results": averages, "per_image": per_image}, indent=2) + "\n")


def _check_out(args: argparse.Namespace, names: dict) -> None:
    meta = args.out / "ablation.json"
    record = {k: v for k, v in vars(args).items()
              if k not in ("resume", "only", "seed", "collect", "device", "out")}
    record = json.loads(json.dumps(record, default=str))
    if meta.exists():
        old = json.loads(meta.read_text())
        if not (args.resume or args.only):
            raise AblationError(f"{args.out} already holds an ablation; add --resume to continue "
                                "it, or choose another --out")
        changed = sorted(k for k in record if k != "variants" and old.get(k) != record.get(k))
        if changed:
            raise AblationError(f"{args.out} was started with other settings ({', '.join(changed)});"
                                " use another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({**record, "variants": names}, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict:
    names = variants(args.remove, args.combined, args.wavelets)
    if args.collect is not None:
        return collect(args.collect)
    cells = plan_cells(args.out, list(names), args.seeds, args.lmbdas)
    if args.only is not None:
        if args.only not in names:
            raise AblationError(f"unknown variant {args.only!r}; this ablation has: "
                                f"{', '.join(names)}")
        if args.seed is None:
            raise AblationError("--only needs --seed S")
        cells = [c for c in cells if c.variant == args.only and c.seed == args.seed]
    from energylab.data import load_dataset

    dataset = load_dataset(args.data, args.patch_size)  # bad data fails before anything is written
    _check_out(args, names)
    for i, cell in enumerate(cells, 1):
        if cell.done:
            continue
        print(f"[{i}/{len(cells)}] {cell.variant} seed {cell.seed}"
              + (f" λ {cell.lmbda:g}" if cell.lmbda else ""), file=sys.stderr, flush=True)
        run_cell(args, cell, names[cell.variant], dataset.test)
    if args.only is not None:
        return {}
    return collect(args.out)


# ---------------------------------------------------------------------------------------------
# Summary


def _cell_logs(cell: Cell) -> CellLogs:
    # TODO(lead): read through RunDir once rundir.py lands (file names live there only).
    bitstream = cell.dir / BITSTREAM_FILE
    return CellLogs(evals=read_jsonl(cell.dir / "eval.jsonl"),
                    energy=read_jsonl(cell.dir / "energy.jsonl"),
                    bitstream=json.loads(bitstream.read_text())["results"] if bitstream.exists()
                    else None)


def collect(root: Path) -> dict:
    """Summarise every finished cell under ``root`` (``energylab.summary``); writes
    ``summary.{md,csv,json}`` and the figures of :func:`energylab.figures.ablation_figures`.

    Raises:
        AblationError: no ``ablation.json``.
        SummaryError: no baseline cell with evaluations.
    """
    from energylab.figures import ablation_figures

    meta_path = root / "ablation.json"
    if not meta_path.exists():
        raise AblationError(f"{root} holds no ablation (no ablation.json)")
    meta = json.loads(meta_path.read_text())
    names = list(meta["variants"])
    cells = {(c.variant, c.lmbda, c.seed): _cell_logs(c)
             for c in plan_cells(root, names, meta["seeds"], meta.get("lmbdas"))
             if (c.dir / "eval.jsonl").exists()}
    result = summarize(cells, names, meta["seeds"], meta["lmbda"], meta.get("lmbdas"), str(root))
    # TODO(lead): these three paths belong to AblationDir.
    (root / "summary.json").write_text(format_json(result))
    (root / "summary.md").write_text(format_markdown(result))
    (root / "summary.csv").write_text(format_csv(result), newline="")
    result["figures"] = [str(p) for p in ablation_figures(root)]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from energylab.data import DataError
    from energylab.train import TrainingError

    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (AblationError, DataError, TrainingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, TrainingError) else 2
    if summary:
        print(format_table(summary))
        print(f"summary and figures in {args.collect or args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

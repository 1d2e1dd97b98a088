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

Summary, per variant (and λ), mean ± std over seeds:

* final test R-D loss, bpp and PSNR (``eval.jsonl``, likelihood bpp) and real-bitstream bpp/PSNR;
* ``steps_to_target`` / ``time_to_target``: the first step (wall-clock seconds of training) at
  which the variant's test loss, smoothed by a running mean over ``SMOOTH`` evaluations, reaches
  the target — the same seed's baseline's final test loss, the mean of its last ``SMOOTH``
  evaluations — linearly interpolated between evaluations; ``speedup_steps`` / ``speedup_time`` =
  baseline's value / variant's, per seed. A variant that never reaches the target gets none, and
  so does a speed-up whose variant is already below the target at step 0 (no finite ratio);
* the energy statistics of ``y`` at the last capture (``final_<stat>``) and their mean over training
  (``auc_<stat>``: the trapezoidal area under the curve divided by the number of steps);
* ``aux_energy_share`` at each merge point (``aux_share_<k>``) at the last capture;
* with ``--lmbdas``: the BD-rate of each variant against the baseline (bjontegaard, PCHIP), on real
  bitstream bpp against PSNR, per seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.integrate import trapezoid

from energylab.auxt import COMPONENTS, check_components
from energylab.runlog import read_jsonl
from energylab.wavelets import DWT2

__all__ = ["AblationError", "Cell", "collect", "main", "plan_cells", "variants"]

SMOOTH = 3
"""Evaluations averaged for the target and the smoothed test-loss curve."""
ENERGY_STATS = ("coding_gain", "decorrelation_gain", "total_correlation", "offdiag_energy_ratio",
                "topk_energy_share")
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
    out: dict[str, dict] = {"baseline": {"auxt": False, "remove": [], "wavelet": "haar"},
                            "auxt": {"auxt": True, "remove": [], "wavelet": "haar"}}
    for component in removed:
        out[f"auxt-no-{component}"] = {"auxt": True, "remove": [component], "wavelet": "haar"}
    if combined and len(removed) > 1:
        out["auxt-no-" + "+".join(removed)] = {"auxt": True, "remove": removed, "wavelet": "haar"}
    for wavelet in wavelets:
        DWT2(wavelet)  # an unknown basis fails here, before anything is trained
        out[f"auxt-{wavelet}"] = {"auxt": True, "remove": [], "wavelet": wavelet}
    return out


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


def _smoothed(values: np.ndarray) -> np.ndarray:
    """Running mean over the last ``SMOOTH`` values (fewer at the start)."""
    csum = np.cumsum(values)
    out = csum.copy()
    out[SMOOTH:] = csum[SMOOTH:] - csum[:-SMOOTH]
    return out / np.minimum(np.arange(1, len(values) + 1), SMOOTH)


def _crossing(x: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """First ``x`` where ``curve`` (decreasing towards the target) reaches ``target``,
    linearly interpolated between points; None if never."""
    hit = np.nonzero(curve <= target)[0]
    if not len(hit):
        return None
    i = hit[0]
    if i == 0:
        return float(x[0])
    frac = (curve[i - 1] - target) / (curve[i - 1] - curve[i])
    return float(x[i - 1] + frac * (x[i] - x[i - 1]))


def _energy_summary(run_dir: Path) -> dict[str, float]:
    energy = read_jsonl(run_dir / "energy.jsonl")
    out: dict[str, float] = {}
    y = sorted((r for r in energy if r["layer"] == "y"), key=lambda r: r["step"])
    if y:
        steps = np.array([r["step"] for r in y], dtype=float)
        for stat in ENERGY_STATS:
            values = np.array([r[stat] for r in y])
            out[f"final_{stat}"] = float(values[-1])
            span = steps[-1] - steps[0]
            out[f"auc_{stat}"] = float(trapezoid(values, steps) / span) if span else float(
                values[-1])
    last = max((r["step"] for r in energy), default=None)
    for r in energy:
        if r["step"] == last and "aux_energy_share" in r:
            out[f"aux_share_{r['layer'].removeprefix('g_a.aux')}"] = r["aux_energy_share"]
    return out


def _cell_summary(cell: Cell, target: float | None) -> dict[str, float | None]:
    evals = read_jsonl(cell.dir / "eval.jsonl")
    if not evals:
        return {}
    last = evals[-1]
    out: dict[str, float | None] = {"test_loss": last["loss"], "test_bpp": last["bpp"],
                                    "test_psnr": last["psnr"], "steps": last["step"]}
    bitstream = cell.dir / BITSTREAM_FILE
    if bitstream.exists():
        results = json.loads(bitstream.read_text())["results"]
        out["real_bpp"], out["real_psnr"] = results["bpp"], results["psnr-rgb"]
    if target is not None:
        steps = np.array([r["step"] for r in evals], dtype=float)
        times = np.array([r["wall_time"] for r in evals], dtype=float)
        curve = _smoothed(np.array([r["loss"] for r in evals]))
        out["steps_to_target"] = _crossing(steps, curve, target)
        out["time_to_target"] = _crossing(times, curve, target)
    out.update(_energy_summary(cell.dir))
    return out


def _target(cell: Cell) -> float | None:
    evals = read_jsonl(cell.dir / "eval.jsonl")
    if not evals:
        return None
    return float(np.mean([r["loss"] for r in evals[-SMOOTH:]]))


def _mean_std(values: list) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def collect(root: Path) -> dict:
    """Summarise every finished cell under ``root``; writes ``summary.{md,csv,json}`` and figures.

    Raises:
        AblationError: no ``ablation.json`` or no baseline cell with evaluations.
    """
    from energylab.bdrate import bd_rate
    from energylab.figures import ablation_figures

    meta_path = root / "ablation.json"
    if not meta_path.exists():
        raise AblationError(f"{root} holds no ablation (no ablation.json)")
    meta = json.loads(meta_path.read_text())
    names = list(meta["variants"])
    cells = [c for c in plan_cells(root, names, meta["seeds"], meta.get("lmbdas"))
             if (c.dir / "eval.jsonl").exists()]
    targets = {(c.seed, c.lmbda): _target(c) for c in cells if c.variant == "baseline"}
    if not targets:
        raise AblationError(f"{root}: no baseline cell has evaluations yet")
    per_cell = {(c.variant, c.lmbda, c.seed): _cell_summary(c, targets.get((c.seed, c.lmbda)))
                for c in cells}
    for (_variant, lmbda, seed), row in per_cell.items():
        base = per_cell.get(("baseline", lmbda, seed), {})
        for what in ("steps", "time"):
            b, v = base.get(f"{what}_to_target"), row.get(f"{what}_to_target")
            row[f"speedup_{what}"] = b / v if b and v else None
    rows = []
    for lmbda in meta.get("lmbdas") or [None]:
        for variant in names:
            group = {s: r for (v, lm, s), r in per_cell.items() if v == variant and lm == lmbda}
            if not group:
                continue
            keys = sorted({k for r in group.values() for k in r})
            row: dict = {"variant": variant, "lmbda": lmbda if lmbda else meta["lmbda"],
                         "seeds": len(group)}
            for key in keys:
                mean, std, n = _mean_std([r.get(key) for r in group.values()])
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
                if key.endswith("_to_target"):
                    row[f"{key}_reached"] = n
            rows.append(row)
    summary = {"root": str(root), "smooth": SMOOTH, "targets": {
        f"seed{s}" + (f"_lmbda{lm:g}" if lm else ""): t for (s, lm), t in targets.items()},
        "cells": [{"variant": v, "lmbda": lm, "seed": s, **r} for (v, lm, s), r in per_cell.items()],
        "rows": rows}
    if meta.get("lmbdas"):
        summary["bd_rate"] = _bd_rates(per_cell, names, meta["seeds"], bd_rate)
    _write_summary(root, summary)
    summary["figures"] = [str(p) for p in ablation_figures(root)]
    return summary


def _bd_rates(per_cell: dict, names: list[str], seeds: list[int], bd_rate) -> dict:
    from energylab.bdrate import METHOD

    out = {}
    for variant in names[1:]:
        values, intervals, errors = [], [], []
        for seed in seeds:
            def curve(v, seed=seed):
                pts = sorted((r["real_bpp"], r["real_psnr"]) for (vv, _, s), r in per_cell.items()
                             if vv == v and s == seed and r.get("real_bpp") is not None)
                return [p[0] for p in pts], [p[1] for p in pts]
            try:
                result = bd_rate(*curve("baseline"), *curve(variant))
                values.append(result.percent)
                intervals.append(list(result.interval))
            except ValueError as err:
                errors.append(f"seed {seed}: {err}")
        mean, std, n = _mean_std(values)
        out[variant] = {"mean": mean, "std": std, "seeds": n, "values": values, "errors": errors,
                        "method": METHOD, "intervals": intervals}
    return out


def _fmt(mean, std) -> str:
    if mean is None:
        return "—"
    digits = 2 if abs(mean) >= 10 else 4
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


TABLE = (("test_loss", "test loss"), ("test_bpp", "bpp (est.)"), ("real_bpp", "bpp (real)"),
         ("test_psnr", "PSNR dB"), ("steps_to_target", "steps to target"),
         ("speedup_steps", "speedup (steps)"), ("speedup_time", "speedup (time)"),
         ("final_coding_gain", "coding gain"), ("final_decorrelation_gain", "decorr. gain"),
         ("final_total_correlation", "TC nats"), ("final_topk_energy_share", "top-k share"))


def format_table(summary: dict) -> str:
    """The summary as a Markdown table (mean ± std over seeds)."""
    lines = ["| variant | λ | seeds | " + " | ".join(t for _, t in TABLE) + " |",
             "|---" * (len(TABLE) + 3) + "|"]
    for row in summary["rows"]:
        cells = [_fmt(row.get(f"{k}_mean"), row.get(f"{k}_std")) for k, _ in TABLE]
        lines.append(f"| {row['variant']} | {row['lmbda']:g} | {row['seeds']} | "
                     + " | ".join(cells) + " |")
    if "bd_rate" in summary:
        lines += ["", "| variant | BD-rate vs baseline (%) |", "|---|---|"]
        for variant, bd in summary["bd_rate"].items():
            text = _fmt(bd["mean"], bd["std"])
            if bd["errors"]:
                text += " (" + "; ".join(bd["errors"]) + ")"
            lines.append(f"| {variant} | {text} |")
    return "\n".join(lines) + "\n"


def _write_summary(root: Path, summary: dict) -> None:
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = format_table(summary)
    targets = ", ".join(f"{k}: {v:.4f}" for k, v in summary["targets"].items())
    (root / "summary.md").write_text(
        f"# Ablation summary\n\nTarget (baseline's final test loss, mean of its last "
        f"{SMOOTH} evaluations): {targets}\n\n{table}")
    keys = sorted({k for row in summary["rows"] for k in row} - {"variant"})
    with open(root / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", *keys])
        writer.writeheader()
        writer.writerows(summary["rows"])


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

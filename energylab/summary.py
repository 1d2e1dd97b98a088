"""The ablation summary: per-cell numbers, their mean ± s.d. over seeds, and its table.

Pure computation on records already read (no file access, no figures): ``energylab.ablate`` reads
each cell's logs, calls :func:`summarize` and writes the result with :func:`format_markdown`,
:func:`format_csv` and :func:`format_json`; ``energylab.figures`` draws it and shows
:func:`table_rows`.

Per cell (a variant at one λ and one seed):

* ``test_loss``, ``test_bpp``, ``test_psnr``, ``steps``: the last test evaluation (likelihood bpp);
  ``real_bpp``, ``real_psnr``: the real-bitstream results;
* ``steps_to_target`` / ``time_to_target``: the first step (wall-clock seconds of training) at which
  the test loss, smoothed by a running mean over :data:`SMOOTH` evaluations, reaches the target —
  the same seed's baseline's final test loss, the mean of its last :data:`SMOOTH` evaluations —
  linearly interpolated between evaluations; ``speedup_steps`` / ``speedup_time`` = baseline's
  value / the variant's. A variant that never reaches the target gets none, and so does a speed-up
  whose variant is already below the target at step 0 (no finite ratio);
* ``final_<stat>`` / ``auc_<stat>`` for each of :data:`ENERGY_STATS` of ``y``: the value at the last
  capture and the mean over training (trapezoidal area under the curve divided by the steps);
* ``aux_share_<k>``: the AuxT branch's ``aux_energy_share`` at merge point ``k``, last capture.

Per variant (and λ), every per-cell value as ``<key>_mean`` / ``<key>_std`` (sample s.d., ddof 1;
0 for one seed) over the seeds that have it, and ``<key>_reached`` for the ``*_to_target`` keys.
With an R-D sweep, ``bd_rate``: each variant's BD-rate (%) against the baseline on real-bitstream
bpp against PSNR (``energylab.bdrate.bd_rate``), per seed, then mean ± s.d.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.integrate import trapezoid

from energylab.bdrate import METHOD as BD_METHOD
from energylab.bdrate import bd_rate
from energylab.rundir import RunDir

__all__ = [
    "ENERGY_STATS",
    "SMOOTH",
    "TABLE",
    "CellLogs",
    "SummaryError",
    "format_csv",
    "format_json",
    "format_markdown",
    "format_table",
    "format_value",
    "summarize",
    "table_rows",
    "with_roles",
]

SMOOTH = 3
"""Evaluations averaged for the target and the smoothed test-loss curve."""
ENERGY_STATS = ("coding_gain", "decorrelation_gain", "total_correlation", "offdiag_energy_ratio",
                "topk_energy_share")
"""Energy statistics of ``y`` summarised as ``final_<stat>`` and ``auc_<stat>``."""
TABLE = (("test_loss", "test loss"), ("test_bpp", "bpp (est.)"), ("real_bpp", "bpp (real)"),
         ("test_psnr", "PSNR dB"), ("steps_to_target", "steps to target"),
         ("speedup_steps", "speedup (steps)"), ("speedup_time", "speedup (time)"),
         ("final_coding_gain", "coding gain"), ("final_decorrelation_gain", "decorr. gain"),
         ("final_total_correlation", "TC nats"), ("final_topk_energy_share", "top-k share"))
"""(summary key, column title) of the summary table, in order."""

Key = tuple[str, float | None, int]
"""A cell: (variant, λ of an R-D sweep or None, seed)."""

_LEGACY_LAYER = re.compile(r"g_a\.(stage|main|aux)(\d+)")


class SummaryError(ValueError):
    """The cells cannot be summarised (no baseline with evaluations); one-line message."""


@dataclass(frozen=True)
class CellLogs:
    """What the summary reads of one cell.

    Attributes:
        evals: the test evaluations in order (records with ``step``, ``loss``, ``bpp``, ``psnr``,
            ``wall_time``).
        energy: the energy records (with ``role`` and ``merge``; see :func:`with_roles`).
        bitstream: the real-bitstream averages (``bpp``, ``psnr-rgb``, ...), or None if not coded.
    """

    evals: Sequence[dict]
    energy: Sequence[dict]
    bitstream: Mapping | None = None

    @classmethod
    def of(cls, run: RunDir) -> CellLogs:
        """What the summary reads of the run directory ``run``."""
        return cls(evals=run.evals(), energy=run.energy(), bitstream=run.bitstream())


def with_roles(record: dict) -> dict:
    """An energy record with its ``role`` and ``merge`` fields, derived from the layer name if absent.

    The legacy reader: records written before these fields existed (the committed reference data)
    name their role only in ``layer`` (``g_a.stage<k>``, ``y``, ``y_hat``, ``g_a.main<k>``,
    ``g_a.aux<k>``); this is the one place that parses those names. Records that carry ``role``
    are returned unchanged.

    Raises:
        ValueError: a legacy record whose layer name is none of the above.
    """
    if "role" in record:
        return record
    layer = record["layer"]
    if layer in ("y", "y_hat"):
        return {**record, "role": layer, "merge": None}
    match = _LEGACY_LAYER.fullmatch(layer)
    if match is None:
        raise ValueError(f"energy record of unknown layer {layer!r} has no role field")
    role, k = match.groups()
    return {**record, "role": role, "merge": int(k) if role != "stage" else None}


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


def _energy_summary(energy: Sequence[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    y = sorted((r for r in energy if r["role"] == "y"), key=lambda r: r["step"])
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
        if r["step"] == last and r["role"] == "aux" and "aux_energy_share" in r:
            out[f"aux_share_{r['merge']}"] = r["aux_energy_share"]
    return out


def _cell_summary(logs: CellLogs, target: float | None) -> dict[str, float | None]:
    evals = logs.evals
    if not evals:
        return {}
    last = evals[-1]
    out: dict[str, float | None] = {"test_loss": last["loss"], "test_bpp": last["bpp"],
                                    "test_psnr": last["psnr"], "steps": last["step"]}
    if logs.bitstream is not None:
        out["real_bpp"], out["real_psnr"] = logs.bitstream["bpp"], logs.bitstream["psnr-rgb"]
    if target is not None:
        steps = np.array([r["step"] for r in evals], dtype=float)
        times = np.array([r["wall_time"] for r in evals], dtype=float)
        curve = _smoothed(np.array([r["loss"] for r in evals]))
        out["steps_to_target"] = _crossing(steps, curve, target)
        out["time_to_target"] = _crossing(times, curve, target)
    out.update(_energy_summary([with_roles(r) for r in logs.energy]))
    return out


def _target(evals: Sequence[dict]) -> float | None:
    if not evals:
        return None
    return float(np.mean([r["loss"] for r in evals[-SMOOTH:]]))


def _mean_std(values: list) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def summarize(cells: Mapping[Key, CellLogs], variants: Sequence[str], seeds: Sequence[int],
              lmbda: float, lmbdas: Sequence[float] | None = None, root: str = "") -> dict:
    """The summary of an ablation's cells (what the ablation directory stores as its JSON summary).

    Args:
        cells: (variant, λ or None, seed) -> the cell's logs, in the ablation's order (λ, variant,
            seed); only cells with evaluations need be given.
        variants: variant names in order, ``baseline`` first.
        seeds: the ablation's seeds.
        lmbda: the λ of an ablation without an R-D sweep.
        lmbdas: the λ of an R-D sweep (cells keyed by them), or None.
        root: the ablation directory, recorded as ``root``.

    Returns:
        ``{"root", "smooth", "targets", "cells", "rows"}`` and, with ``lmbdas``, ``"bd_rate"``
        (see the module docstring).

    Raises:
        SummaryError: no baseline cell is given.
    """
    targets = {(s, lm): _target(logs.evals) for (v, lm, s), logs in cells.items() if v == "baseline"}
    if not targets:
        raise SummaryError(f"{root}: no baseline cell has evaluations yet")
    per_cell = {key: _cell_summary(logs, targets.get((key[2], key[1]))) for key, logs in cells.items()}
    for (_variant, lm, seed), row in per_cell.items():
        base = per_cell.get(("baseline", lm, seed), {})
        for what in ("steps", "time"):
            b, v = base.get(f"{what}_to_target"), row.get(f"{what}_to_target")
            row[f"speedup_{what}"] = b / v if b and v else None
    rows = []
    for lm in lmbdas or [None]:
        for variant in variants:
            group = {s: r for (v, lm_, s), r in per_cell.items() if v == variant and lm_ == lm}
            if not group:
                continue
            keys = sorted({k for r in group.values() for k in r})
            row: dict = {"variant": variant, "lmbda": lm if lm else lmbda, "seeds": len(group)}
            for key in keys:
                mean, std, n = _mean_std([r.get(key) for r in group.values()])
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
                if key.endswith("_to_target"):
                    row[f"{key}_reached"] = n
            rows.append(row)
    summary = {"root": root, "smooth": SMOOTH, "targets": {
        f"seed{s}" + (f"_lmbda{lm:g}" if lm else ""): t for (s, lm), t in targets.items()},
        "cells": [{"variant": v, "lmbda": lm, "seed": s, **r} for (v, lm, s), r in per_cell.items()],
        "rows": rows}
    if lmbdas:
        summary["bd_rate"] = _bd_rates(per_cell, variants, seeds)
    return summary


def _bd_rates(per_cell: dict, names: Sequence[str], seeds: Sequence[int]) -> dict:
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
            except ValueError as err:
                errors.append(f"seed {seed}: {err}")
                continue
            values.append(result.percent)
            intervals.append(list(result.interval))
        mean, std, n = _mean_std(values)
        out[variant] = {"mean": mean, "std": std, "seeds": n, "values": values, "errors": errors,
                        "method": BD_METHOD, "intervals": intervals}
    return out


def format_value(mean: float | None, std: float | None) -> str:
    """``mean ± std`` as in the table: 2 decimals from 10 up, else 4; ``—`` for no value, and the
    mean alone when the s.d. is 0 or None."""
    if mean is None:
        return "—"
    digits = 2 if abs(mean) >= 10 else 4
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


def table_rows(summary: dict) -> list[dict[str, str | float | int]]:
    """The table's rows: ``variant``, ``λ``, ``seeds`` and one formatted ``mean ± std`` per
    :data:`TABLE` column title."""
    return [{"variant": r["variant"], "λ": r["lmbda"], "seeds": r["seeds"],
             **{title: format_value(r.get(f"{k}_mean"), r.get(f"{k}_std")) for k, title in TABLE}}
            for r in summary["rows"]]


def format_table(summary: dict) -> str:
    """The summary as a Markdown table (mean ± std over seeds), with the BD-rates of a sweep."""
    titles = [t for _, t in TABLE]
    lines = ["| variant | λ | seeds | " + " | ".join(titles) + " |", "|---" * (len(TABLE) + 3) + "|"]
    for row in table_rows(summary):
        lines.append(f"| {row['variant']} | {row['λ']:g} | {row['seeds']} | "
                     + " | ".join(str(row[t]) for t in titles) + " |")
    if "bd_rate" in summary:
        lines += ["", "| variant | BD-rate vs baseline (%) | method | PSNR interval per seed (dB) |",
                  "|---|---|---|---|"]
        for variant, bd in summary["bd_rate"].items():
            text = format_value(bd["mean"], bd["std"])
            if bd["errors"]:
                text += " (" + "; ".join(bd["errors"]) + ")"
            spans = ", ".join(f"{lo:.2f}–{hi:.2f}" for lo, hi in bd.get("intervals", [])) or "—"
            lines.append(f"| {variant} | {text} | {bd.get('method', '—')} | {spans} |")
    return "\n".join(lines) + "\n"


def format_markdown(summary: dict) -> str:
    """The summary as a Markdown document: the targets, then :func:`format_table`."""
    targets = ", ".join(f"{k}: {v:.4f}" for k, v in summary["targets"].items())
    return (f"# Ablation summary\n\nTarget (baseline's final test loss, mean of its last "
            f"{summary['smooth']} evaluations): {targets}\n\n{format_table(summary)}")


def format_csv(summary: dict) -> str:
    """The per-variant rows as CSV: ``variant`` first, then every key sorted."""
    keys = sorted({k for row in summary["rows"] for k in row} - {"variant"})
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=["variant", *keys])
    writer.writeheader()
    writer.writerows(summary["rows"])
    return buffer.getvalue()


def format_json(summary: dict) -> str:
    """The summary as indented JSON text."""
    return json.dumps(summary, indent=2) + "\n"

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
* ``final_<stat>`` / ``auc_<stat>`` for each of :data:`ENERGY_STATS` (of ``y``, and the rate
  statistics of ``y_hat``): the value at the last capture and the mean over training (trapezoidal
  area under the curve divided by the steps; None if a capture was None); ``final_<stat>_ci_low`` /
  ``_ci_high``: that capture's 95 % bootstrap interval over probe images, where recorded;
* ``aux_share_<k>``: the AuxT branch's ``aux_energy_share`` at merge point ``k``, last capture.

Per variant (and λ), every per-cell value as ``<key>_mean`` / ``<key>_std`` (sample s.d., ddof 1;
0 for one seed) over the seeds that have it, and ``<key>_reached`` for the ``*_to_target`` keys.
With an R-D sweep, ``bd_rate``: each variant's BD-rate (%) against the baseline on real-bitstream
bpp against PSNR (``energylab.bdrate.bd_rate``), per seed, then mean ± s.d.

Budget-free numbers (issue 11), per cell against the same seed's baseline:

* the *step-equivalence curve*: for every evaluation step ``t > 0`` of the baseline, the first step
  ``t'`` (interpolated) at which the variant's smoothed test loss reaches the baseline's smoothed
  loss at ``t``; ``speedup(t) = t / t'`` (the paper's "AuxT at k steps matches the baseline at 2k").
  ``speedup_at_<p>``: at ``p`` % of the baseline's last step (:data:`BUDGET_FRACTIONS`, the
  baseline's curve interpolated there); the whole curves are ``step_equivalence``;
* ``steps_to_target_<m>pct`` / ``time_to_target_<m>pct`` and ``speedup_steps_<m>pct`` /
  ``speedup_time_<m>pct``: as for the final-loss target, with the target ``(1 + m/100)`` times the
  baseline's final loss (:data:`TARGET_MARGINS`);
* ``parameters`` / ``trainable_parameters``: the model's parameter counts, when given.

``convergence``: the baseline's relative fall of its smoothed test loss over the last
:data:`CONVERGENCE_WINDOW` of its steps, per seed and mean; above :data:`CONVERGENCE_TOLERANCE` its
``message`` says the baseline has not converged and the speed-ups depend on the budget.

``paired``: every variant against the baseline, paired by seed (``stats.paired_difference``, a 95 %
Student-t interval over seeds): speed-ups as ratios — the mean and interval of the per-seed
log-speed-ups, exponentiated (a geometric mean with its interval) — and final numbers
(:data:`PAIRED_DIFFERENCES`) as differences variant − baseline. ``causal`` (with ``causal=True``):
each cell of the causal grid against AuxT at ``speedup_at_100`` (:data:`CAUSAL_KEY`), and which
cells reproduce AuxT's speed-up (within :data:`CAUSAL_MARGIN`), exceed it or fall short of it, or
that the intervals cannot tell.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.integrate import trapezoid

from energylab.bdrate import METHOD as BD_METHOD
from energylab.bdrate import bd_rate
from energylab.rundir import RunDir, to_json
from energylab.stats import paired_difference

__all__ = [
    "BUDGET_FRACTIONS",
    "CAUSAL_KEY",
    "CONVERGENCE_TOLERANCE",
    "CONVERGENCE_WINDOW",
    "ENERGY_STATS",
    "PAIRED_DIFFERENCES",
    "TARGET_MARGINS",
    "SMOOTH",
    "TABLE",
    "CellLogs",
    "SummaryError",
    "format_csv",
    "format_interval",
    "format_json",
    "format_markdown",
    "format_paired",
    "format_table",
    "format_value",
    "step_equivalence",
    "summarize",
    "table_rows",
    "with_roles",
]

SMOOTH = 3
"""Evaluations averaged for the target and the smoothed test-loss curve."""
ENERGY_STATS = (("y", "coding_gain"), ("y", "total_correlation"), ("y", "decorrelation_gain"),
                ("y", "offdiag_energy_ratio"), ("y", "effective_rank"),
                ("y", "neighbourhood_tc.joint"), ("y", "neighbourhood_tc.across_channels"),
                ("y", "neighbourhood_tc.across_positions"), ("y", "topk_energy_share"),
                ("y", "topk_share.l2"), ("y", "topk_share.l2_centred"), ("y", "mean_energy_fraction"),
                ("y_hat", "rate_share_entropy"), ("y_hat", "active_channels"),
                ("y_hat", "std_in_steps.median"))
"""``(role, statistic)`` of the energy records summarised as ``final_<stat>`` and ``auc_<stat>``
(statistics that a record lacks, e.g. in older runs, are left out). ``decorrelation_gain`` is
``exp(2 TC / C)``, the same evidence as ``total_correlation``: it stays in the JSON and CSV for
readers of the classical split, the table and the paired contrasts show total correlation."""
TABLE = (("test_loss", "test loss"), ("test_bpp", "bpp (est.)"), ("real_bpp", "bpp (real)"),
         ("test_psnr", "PSNR dB"), ("steps_to_target", "steps to target"),
         ("speedup_steps", "speedup (steps)"), ("speedup_time", "speedup (time)"),
         ("final_coding_gain", "coding gain"), ("final_total_correlation", "TC nats"),
         ("final_neighbourhood_tc.across_positions", "spatial TC nats"),
         ("final_topk_share.l2", "top-k L2 share"), ("final_rate_share_entropy", "rate-share entropy bits"))
"""(summary key, column title) of the summary table, in order."""
BUDGET_FRACTIONS = (25, 50, 75, 100)
"""Percentages of the baseline's budget at which the step-equivalence speed-up is reported."""
TARGET_MARGINS = (5, 2, 1)
"""Relative targets: within these percentages of the baseline's final test loss."""
CONVERGENCE_WINDOW = 0.2
"""Fraction of the baseline's steps (the last ones) over which its convergence is checked."""
CONVERGENCE_TOLERANCE = 0.01
"""A baseline whose smoothed test loss falls by more than this over the window has not converged."""
SPEEDUP_KEYS = ("speedup_steps", "speedup_time",
                *(f"speedup_at_{p}" for p in BUDGET_FRACTIONS),
                *(f"speedup_{w}_{m}pct" for m in TARGET_MARGINS for w in ("steps", "time")))
"""Per-cell speed-ups, paired over seeds as ratios (geometric mean and interval)."""
PAIRED_DIFFERENCES = ("test_loss", "real_bpp", "test_psnr", "steps_to_target", "final_coding_gain",
                      "final_total_correlation", "final_neighbourhood_tc.across_channels",
                      "final_neighbourhood_tc.across_positions", "final_topk_share.l2",
                      "final_topk_share.l2_centred", "final_rate_share_entropy", "final_active_channels")
"""Per-cell numbers paired over seeds as differences variant − baseline."""
CAUSAL_KEY = "speedup_at_100"
"""The speed-up the causal grid is judged on."""
CAUSAL_MARGIN = 1.25
"""Equivalence margin of the causal verdict: a cell *reproduces* AuxT's speed-up when the 95 %
interval of its ratio to AuxT's lies inside ``[1 / 1.25, 1.25]`` = [0.80, 1.25] (the log-symmetric
80–125 % limits of equivalence testing, D. J. Schuirmann, J. Pharmacokinet. Biopharm. 15, 1987;
a 95 % rather than the usual 90 % interval, so the test is conservative). An interval that contains
1 but reaches beyond the margin is *inconclusive*: it cannot tell the cell from AuxT, nor say they
match."""

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
        parameters: ``{"parameters": total, "trainable_parameters": n}`` of the cell's model, or
            None.
    """

    evals: Sequence[dict]
    energy: Sequence[dict]
    bitstream: Mapping | None = None
    parameters: Mapping[str, int] | None = None

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


def _energy_summary(energy: Sequence[dict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for role, stat in ENERGY_STATS:
        records = sorted((r for r in energy if r["role"] == role and stat in r), key=lambda r: r["step"])
        if not records:
            continue
        steps = np.array([r["step"] for r in records], dtype=float)
        values = [r[stat] for r in records]
        out[f"final_{stat}"] = values[-1]
        for bound in ("ci_low", "ci_high"):
            if f"{stat}_{bound}" in records[-1]:
                out[f"final_{stat}_{bound}"] = records[-1][f"{stat}_{bound}"]
        span = steps[-1] - steps[0]
        if any(v is None for v in values):  # infinite for a singular covariance
            out[f"auc_{stat}"] = None
        else:
            out[f"auc_{stat}"] = float(trapezoid(values, steps) / span) if span else float(values[-1])
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
        curve = _smoothed(np.array([r["loss"] for r in evals], dtype=float))  # null: NaN, never reached
        out["steps_to_target"] = _crossing(steps, curve, target)
        out["time_to_target"] = _crossing(times, curve, target)
        for m in TARGET_MARGINS:
            out[f"steps_to_target_{m}pct"] = _crossing(steps, curve, target * (1 + m / 100))
            out[f"time_to_target_{m}pct"] = _crossing(times, curve, target * (1 + m / 100))
    out.update(_energy_summary([with_roles(r) for r in logs.energy]))
    if logs.parameters is not None:
        out.update({k: logs.parameters[k] for k in ("parameters", "trainable_parameters")})
    return out


def _curve(evals: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation steps and the smoothed test loss."""
    return (np.array([r["step"] for r in evals], dtype=float),
            _smoothed(np.array([r["loss"] for r in evals], dtype=float)))


def _equivalent_step(base: tuple[np.ndarray, np.ndarray], variant: tuple[np.ndarray, np.ndarray],
                     t: float) -> float | None:
    """The first step at which the variant's smoothed loss reaches the baseline's at step ``t``."""
    return _crossing(variant[0], variant[1], float(np.interp(t, *base)))


def _ratio(t: float, t_variant: float | None) -> float | None:
    return t / t_variant if t_variant else None


def step_equivalence(base_evals: Sequence[dict], evals: Sequence[dict]) -> dict[str, list]:
    """The step-equivalence curve of a variant's evaluations against its baseline's:
    ``{"t": [...], "t_variant": [...], "speedup": [...]}`` over the baseline's evaluation steps
    ``t > 0`` (None where the variant never reaches the baseline's loss, or already does at 0)."""
    base, variant = _curve(base_evals), _curve(evals)
    ts = [float(t) for t in base[0] if t > 0]
    t_variant = [_equivalent_step(base, variant, t) for t in ts]
    return {"t": ts, "t_variant": t_variant,
            "speedup": [_ratio(t, tv) for t, tv in zip(ts, t_variant, strict=True)]}


def _budget_free(row: dict, base_evals: Sequence[dict], evals: Sequence[dict]) -> None:
    """The step-equivalence speed-ups at :data:`BUDGET_FRACTIONS` of the baseline's budget."""
    base, variant = _curve(base_evals), _curve(evals)
    for p in BUDGET_FRACTIONS:
        t = base[0][-1] * p / 100
        row[f"speedup_at_{p}"] = _ratio(t, _equivalent_step(base, variant, t))


def _convergence(base_evals: Mapping[str, Sequence[dict]]) -> dict:
    """The baseline's relative fall of its smoothed test loss over the last
    :data:`CONVERGENCE_WINDOW` of its steps, per seed (key) and mean, with the verdict."""
    changes = {}
    for key, evals in base_evals.items():
        steps, curve = _curve(evals)
        start = float(np.interp(steps[-1] * (1 - CONVERGENCE_WINDOW), steps, curve))
        changes[key] = (start - float(curve[-1])) / abs(float(curve[-1])) if curve[-1] else None
    mean, _, _ = _mean_std(list(changes.values()))
    converged = mean is not None and mean <= CONVERGENCE_TOLERANCE
    message = None if converged or mean is None else (
        f"the baseline has not converged: its smoothed test loss still fell by {100 * mean:.1f} % "
        f"over the last {100 * CONVERGENCE_WINDOW:.0f} % of its steps (> "
        f"{100 * CONVERGENCE_TOLERANCE:.0f} %), so the speed-ups depend on the step budget")
    return {"relative_change": changes, "relative_change_mean": mean, "window": CONVERGENCE_WINDOW,
            "tolerance": CONVERGENCE_TOLERANCE, "converged": converged, "message": message}


def _paired_entry(key: str, values: list, base_values: list) -> dict:
    """One paired comparison over seeds: log-ratio for speed-ups (exponentiated), else difference."""
    if key in SPEEDUP_KEYS:
        logs = [math.log(v) if v is not None and v > 0 else None for v in values]
        d = paired_difference(logs, [0.0] * len(logs))
        back = {f: (math.exp(getattr(d, f)) if getattr(d, f) is not None else None)
                for f in ("mean", "low", "high")}
        return {"key": key, "kind": "ratio", **back, "n": d.n, "inside_noise": d.inside_noise}
    d = paired_difference(values, base_values)
    return {"key": key, "kind": "difference", "mean": d.mean, "low": d.low, "high": d.high, "n": d.n,
            "inside_noise": d.inside_noise}


def _paired(per_cell: dict, variants: Sequence[str], seeds: Sequence[int],
            lmbdas: Sequence[float] | None) -> list[dict]:
    out = []
    for lm in lmbdas or [None]:
        base = [per_cell.get(("baseline", lm, s), {}) for s in seeds]
        for variant in variants:
            if variant == "baseline":
                continue
            rows = [per_cell.get((variant, lm, s), {}) for s in seeds]
            if not any(rows):
                continue
            for key in (*SPEEDUP_KEYS, *PAIRED_DIFFERENCES):
                out.append({"variant": variant, "lmbda": lm, **_paired_entry(
                    key, [r.get(key) for r in rows], [b.get(key) for b in base])})
    return out


CAUSAL_PROJECTIONS = (("learned", ""), ("frozen random orthogonal", "orthogonal"),
                      ("frozen at the KLT", "klt"))
"""The causal grid's projection levels: (description, name in ``-frozen-<...>``, '' if learned)."""
CAUSAL_SCALINGS = ("learned", "frozen at init", "none")
"""The causal grid's scaling levels."""


def _causal(per_cell: dict, variants: Sequence[str], seeds: Sequence[int]) -> dict:
    """Each causal cell's speed-up against the baseline and its ratio to AuxT's (paired), and the
    verdict: per cell ``exceeds`` / ``falls short`` (ratio interval above / below 1, even inside the
    margin: a difference outside the noise comes first), else ``reproduces`` (the interval, which
    contains 1, lies inside :data:`CAUSAL_MARGIN`'s limits) or ``inconclusive`` (it reaches beyond
    them), or ``cannot tell`` (fewer than two paired seeds); then every cell under its verdict, or
    that the intervals cannot tell."""
    def values(variant):
        return [per_cell.get((variant, None, s), {}).get(CAUSAL_KEY) for s in seeds]

    def logs(vals):
        return [math.log(v) if v else None for v in vals]

    auxt = values("auxt")
    reference = _paired_entry(CAUSAL_KEY, auxt, [])
    cells = []
    for variant in variants:
        if variant in ("baseline", "auxt"):
            continue
        own = values(variant)
        vs_auxt = paired_difference(logs(own), logs(auxt))
        exp = {f: (math.exp(getattr(vs_auxt, f)) if getattr(vs_auxt, f) is not None else None)
               for f in ("mean", "low", "high")}
        if vs_auxt.inside_noise is None:
            verdict = "cannot tell"
        elif not vs_auxt.inside_noise:
            verdict = "falls short" if exp["high"] < 1 else "exceeds"
        elif 1 / CAUSAL_MARGIN <= exp["low"] and exp["high"] <= CAUSAL_MARGIN:
            verdict = "reproduces"
        else:
            verdict = "inconclusive"
        cells.append({"variant": variant, "speedup": _paired_entry(CAUSAL_KEY, own, []),
                      "ratio_to_auxt": {**exp, "n": vs_auxt.n}, "verdict": verdict})
    if reference["inside_noise"] is None or any(c["verdict"] == "cannot tell" for c in cells):
        text = "the intervals cannot tell: fewer than two seeds pair every cell with AuxT"
    elif reference["inside_noise"]:
        text = (f"the intervals cannot tell: AuxT's own speed-up ({CAUSAL_KEY}) is inside the noise, "
                "so no factor can be said to reproduce it")
    else:
        def named(verdict: str) -> str:
            names = [c["variant"] for c in cells if c["verdict"] == verdict]
            return ", ".join(names) if names else "no cell"

        text = (f"reproduce AuxT's speed-up (ratio to AuxT's inside [{1 / CAUSAL_MARGIN:.2f}, "
                f"{CAUSAL_MARGIN:.2f}]): {named('reproduces')}; exceed it: {named('exceeds')}; "
                f"fall short of it: {named('falls short')}; inconclusive (the ratio's interval contains 1 "
                f"but reaches beyond that margin): {named('inconclusive')}")
    return {"key": CAUSAL_KEY, "auxt": reference, "cells": cells, "verdict": text}


def _target(evals: Sequence[dict]) -> float | None:
    if not evals:
        return None
    return float(np.mean(np.array([r["loss"] for r in evals[-SMOOTH:]], dtype=float)))  # null: NaN


def _mean_std(values: list) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def summarize(cells: Mapping[Key, CellLogs], variants: Sequence[str], seeds: Sequence[int],
              lmbda: float, lmbdas: Sequence[float] | None = None, root: str = "",
              causal: bool = False) -> dict:
    """The summary of an ablation's cells (what the ablation directory stores as its JSON summary).

    Args:
        cells: (variant, λ or None, seed) -> the cell's logs, in the ablation's order (λ, variant,
            seed); only cells with evaluations need be given.
        variants: variant names in order, ``baseline`` first.
        seeds: the ablation's seeds.
        lmbda: the λ of an ablation without an R-D sweep.
        lmbdas: the λ of an R-D sweep (cells keyed by them), or None.
        root: the ablation directory, recorded as ``root``.
        causal: the variants are the causal grid (``ablate --causal``): add ``"causal"``.

    Returns:
        ``{"root", "smooth", "targets", "cells", "rows", "step_equivalence", "convergence",
        "paired"}``, with ``lmbdas`` ``"bd_rate"`` and with ``causal`` ``"causal"`` (see the module
        docstring).

    Raises:
        SummaryError: no baseline cell is given.
    """
    targets = {(s, lm): _target(logs.evals) for (v, lm, s), logs in cells.items() if v == "baseline"}
    if not targets:
        raise SummaryError(f"{root}: no baseline cell has evaluations yet")
    per_cell = {key: _cell_summary(logs, targets.get((key[2], key[1]))) for key, logs in cells.items()}
    curves = []
    for (variant, lm, seed), row in per_cell.items():
        base = per_cell.get(("baseline", lm, seed), {})
        for what in ("steps", "time"):
            for suffix in ("", *(f"_{m}pct" for m in TARGET_MARGINS)):
                b, v = base.get(f"{what}_to_target{suffix}"), row.get(f"{what}_to_target{suffix}")
                row[f"speedup_{what}{suffix}"] = b / v if b and v else None
        base_logs = cells.get(("baseline", lm, seed))
        if base_logs is not None and base_logs.evals and cells[variant, lm, seed].evals:
            _budget_free(row, base_logs.evals, cells[variant, lm, seed].evals)
            curves.append({"variant": variant, "lmbda": lm, "seed": seed,
                           **step_equivalence(base_logs.evals, cells[variant, lm, seed].evals)})
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
        "rows": rows, "step_equivalence": curves,
        "convergence": _convergence({f"seed{s}" + (f"_lmbda{lm:g}" if lm else ""): logs.evals
                                     for (v, lm, s), logs in cells.items()
                                     if v == "baseline" and logs.evals}),
        "paired": _paired(per_cell, variants, seeds, lmbdas)}
    if causal:
        summary["causal"] = _causal(per_cell, variants, seeds)
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


def format_interval(entry: Mapping) -> str:
    """A paired entry as ``×m [low, high]`` (ratios) or ``m [low, high]`` (differences), ``~``
    after an interval containing no effect, ``(n seeds)`` without an interval, ``—`` without
    a value."""
    if entry.get("mean") is None:
        return "—"
    prefix = "×" if entry.get("kind", "ratio") == "ratio" else ""

    def number(v: float) -> str:
        return f"{v:.2f}" if abs(v) >= 10 or prefix else f"{v:.4f}"

    text = prefix + number(entry["mean"])
    if entry.get("low") is None:
        return f"{text} ({entry['n']} seed{'s' if entry['n'] != 1 else ''}, no interval)"
    return f"{text} [{number(entry['low'])}, {number(entry['high'])}]" + (
        " ~" if entry.get("inside_noise") else "")


PAIRED_SPEEDUP_COLUMNS = (*((f"speedup_at_{p}", f"t-equiv. at {p} %") for p in BUDGET_FRACTIONS),
                          ("speedup_steps", "steps to final loss"),
                          *((f"speedup_steps_{m}pct", f"steps to +{m} %") for m in TARGET_MARGINS),
                          ("speedup_time", "time to final loss"))
"""(paired key, column title) of the budget-free speed-up table."""
PAIRED_DIFFERENCE_TITLES = {"test_loss": "test loss", "real_bpp": "bpp (real)", "test_psnr": "PSNR dB",
                            "steps_to_target": "steps to target", "final_coding_gain": "coding gain",
                            "final_total_correlation": "TC nats",
                            "final_neighbourhood_tc.across_channels": "2×2 TC across channels",
                            "final_neighbourhood_tc.across_positions": "2×2 TC across positions",
                            "final_topk_share.l2": "top-k L2 share",
                            "final_topk_share.l2_centred": "top-k L2 share (centred)",
                            "final_rate_share_entropy": "rate-share entropy bits",
                            "final_active_channels": "active channels"}


def format_paired(summary: dict) -> str:
    """The paired tables (speed-ups as ratios, final numbers as differences against the baseline,
    with parameter counts) and the causal verdict, as Markdown."""
    paired = summary.get("paired", [])
    groups: dict = {}
    for e in paired:
        groups.setdefault((e["variant"], e["lmbda"]), {})[e["key"]] = e
    params = {(r["variant"], r["lmbda"]): r for r in summary["rows"]}
    lines = ["## Speed-ups paired over seeds", "",
             "Geometric mean over seeds of each seed's speed-up (the mean of the log-ratios, "
             "exponentiated) with its 95 % Student-t interval; `~`: the interval contains ×1 (inside "
             "the noise). *t-equiv. at p %*: the step-equivalence speed-up t/t′ at p % of the "
             "baseline's budget; *steps to +m %*: to within m % of the baseline's final loss.", "",
             "| variant | " + " | ".join(t for _, t in PAIRED_SPEEDUP_COLUMNS)
             + " | parameters (trainable / total) |",
             "|---" * (len(PAIRED_SPEEDUP_COLUMNS) + 2) + "|"]
    for (variant, lm), entries in groups.items():
        row = params.get((variant, lm if lm else summary["rows"][0]["lmbda"]), {})
        counts = "—" if row.get("parameters_mean") is None else (
            f"{row['trainable_parameters_mean']:,.0f} / {row['parameters_mean']:,.0f}")
        lines.append(f"| {variant}{f' (λ {lm:g})' if lm else ''} | "
                     + " | ".join(format_interval(entries.get(k, {})) for k, _ in PAIRED_SPEEDUP_COLUMNS)
                     + f" | {counts} |")
    base = params.get(("baseline", summary["rows"][0]["lmbda"])) if summary["rows"] else None
    if base and base.get("parameters_mean") is not None:
        lines.append(f"| baseline | {' | '.join('—' for _ in PAIRED_SPEEDUP_COLUMNS)} | "
                     f"{base['trainable_parameters_mean']:,.0f} / {base['parameters_mean']:,.0f} |")
    lines += ["", "## Differences against the baseline, paired over seeds", "",
              "Mean of variant − baseline per seed with its 95 % Student-t interval; `~`: the interval "
              "contains 0.", "",
              "| variant | " + " | ".join(PAIRED_DIFFERENCE_TITLES.values()) + " |",
              "|---" * (len(PAIRED_DIFFERENCE_TITLES) + 1) + "|"]
    for (variant, lm), entries in groups.items():
        lines.append(f"| {variant}{f' (λ {lm:g})' if lm else ''} | "
                     + " | ".join(format_interval(entries.get(k, {})) for k in PAIRED_DIFFERENCE_TITLES)
                     + " |")
    causal = summary.get("causal")
    if causal:
        lines += ["", "## Causal test of the split", "",
                  f"Judged on `{causal['key']}`. AuxT: {format_interval(causal['auxt'])}.", "",
                  "| cell | speed-up vs baseline | ratio to AuxT's | verdict |", "|---|---|---|---|"]
        for c in causal["cells"]:
            lines.append(f"| {c['variant']} | {format_interval(c['speedup'])} | "
                         f"{format_interval({**c['ratio_to_auxt'], 'kind': 'ratio'})} | {c['verdict']} |")
        lines += ["", f"**Verdict:** {causal['verdict']}."]
    return "\n".join(lines) + "\n"


def format_markdown(summary: dict) -> str:
    """The summary as a Markdown document: the targets, the convergence line (if the baseline has
    not converged), :func:`format_table`, then :func:`format_paired`."""
    targets = ", ".join(f"{k}: {v:.4f}" for k, v in summary["targets"].items())
    message = (summary.get("convergence") or {}).get("message")
    warning = f"**Note:** {message}.\n\n" if message else ""
    return (f"# Ablation summary\n\nTarget (baseline's final test loss, mean of its last "
            f"{summary['smooth']} evaluations): {targets}\n\n{warning}{format_table(summary)}\n"
            f"{format_paired(summary)}")


def format_csv(summary: dict) -> str:
    """The per-variant rows as CSV: ``variant`` first, then every key sorted."""
    keys = sorted({k for row in summary["rows"] for k in row} - {"variant"})
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=["variant", *keys])
    writer.writeheader()
    writer.writerows(summary["rows"])
    return buffer.getvalue()


def format_json(summary: dict) -> str:
    """The summary as indented strict JSON text: a value that is undefined (NaN, infinite) is
    ``null`` (:func:`energylab.rundir.to_json`)."""
    return to_json(summary, indent=2) + "\n"

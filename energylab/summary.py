"""The ablation summary: per-cell numbers, their mean ± s.d. over seeds, and its table.

Pure computation on records already read (no file access, no figures): ``energylab.ablate`` reads
each cell's logs, calls :func:`summarize` and writes the result with :func:`format_markdown`,
:func:`format_csv` and :func:`format_json`; ``energylab.figures`` draws it and shows
:func:`table_rows`.

Per cell (a variant at one λ and one seed):

* ``test_loss``, ``test_bpp``, ``test_psnr``, ``steps``: the last test evaluation (likelihood bpp);
  ``real_bpp``, ``real_psnr``: the real-bitstream results;
* ``steps_to_target`` / ``time_to_target``: the first step (wall-clock seconds of training) at which
  the variant's *loss curve* (below) reaches the target — the same seed's baseline's final test
  loss, the mean of its last :data:`SMOOTH` evaluations after step 0; ``speedup_steps`` /
  ``speedup_time`` = baseline's value / the variant's. The time is the wall time at that step,
  interpolated linearly in steps between evaluations. A variant that never reaches the target gets
  none; one already at or below it at its first evaluation after step 0 gets that evaluation's
  step as a bound (below);
* ``final_<stat>`` / ``auc_<stat>`` for each of :data:`ENERGY_STATS` (of ``y``, and the rate
  statistics of ``y_hat``): the value at the last capture and the mean over training (trapezoidal
  area under the curve divided by the steps; None if a capture was None); ``final_<stat>_ci_low`` /
  ``_ci_high``: that capture's 95 % bootstrap interval over probe images, where recorded;
* ``aux_share_<k>``: the AuxT branch's ``aux_energy_share`` at merge point ``k``, last capture.

Per variant (and λ), every per-cell value as ``<key>_mean`` / ``<key>_std`` (sample s.d., ddof 1;
0 for one seed) over the seeds that have it, and ``<key>_reached`` for the ``*_to_target`` keys.
With an R-D sweep, ``bd_rate``: each variant's BD-rate (%) against the baseline on real-bitstream
bpp against PSNR (``energylab.bdrate.bd_rate``), per seed, then mean ± s.d.

The loss curve (issue 19: the rule recovers a known speed-up). Every step-based number reads a
cell's test losses through one rule, :func:`loss_curve`:

* the evaluations after step 0 only (the step-0 loss, 100× the later ones, enters no mean and no
  interpolation), non-finite losses left out;
* made non-increasing by the least-squares isotonic fit (pool adjacent violators): noise can
  neither make a curve cross a level early nor lag it, as a trailing mean does (a trailing mean of
  ``n`` evaluations ``Δ`` apart delays every crossing by about ``(n − 1)Δ/2``);
* interpolated between evaluations linearly in (log step, log loss) — exact for a power law
  ``b·t^(−c)``; for ``a + b·(1 + t/t₀)^(−c)`` with evaluations every 100 steps the speed-ups stay
  within 2 % of the truth for t₀ = 20–100 (curves like the references'), within 8 % for a curve
  that flattens inside the first spacing (t₀ = 5).

A pure step speed-up ×k (the variant's loss at ``t`` is the baseline's at ``k·t``) then gives
``t′ = t / k`` and every speed-up below ≈ k (``tests/test_speedup_rule.py``: k = 1.5 … 5 within
10 % with 0.3 % noise, on the fixed, the dense-early and a dense schedule). Noise moves ``t′`` by
about (noise) / |d log L / d log t|: on a baseline that has converged (its loss falls by less than
about 1 % over the last 20 % of its steps) the targets near the final loss are set by the noise, and
so are the speed-ups to them.

*Resolution and bounds.* ``t′`` is known to within the spacing of the variant's evaluations
(``resolution`` below). When the variant's curve is already at or below the level at its first
evaluation after step 0 (step ``t₁``), ``t′ ≤ t₁`` is all the data say: the number reported is
``t / t₁``, a **lower bound** on the speed-up (an upper bound on ``steps_to_target``), flagged and
shown as ``≥ ×…`` (``≤ …``), never as a value. In the JSON:

* per cell, ``bounds``: ``{key: "lower" | "upper"}`` for each of its numbers that is a bound (an
  empty dict when none); ``"upper"`` on ``steps_to_target*`` / ``time_to_target*``, ``"lower"`` on
  a speed-up whose variant is bounded, ``"upper"`` on one whose baseline is (both bounded: no
  speed-up);
* per row, ``<key>_bounded`` (seeds whose value is a bound) and ``<key>_bound`` (their kind,
  ``"mixed"`` when both, None when none) beside ``<key>_mean``;
* per paired entry, ``bounded`` and ``bound``: the mean and interval are computed with the bounds
  in place of the values, so a ``"lower"`` entry's ``mean`` and ``low`` are lower limits and its
  ``high`` is None (``"upper"``: ``low`` None); ``inside_noise`` is False only if the kept limit
  excludes ×1, else None (a mixed entry has no numbers);
* ``step_equivalence`` curves carry ``bound`` per point;
* ``resolution``: one entry per distinct evaluation schedule of the cells: ``first`` (the first
  evaluation after step 0: the smallest ``t′`` that is a value), ``spacing`` (runs of equal
  spacing, ``{"every", "from", "to"}``), ``cells`` (how many cells have it) and ``text``.

Budget-free numbers (issue 11), per cell against the same seed's baseline:

* the *step-equivalence curve*: for every evaluation step ``t > 0`` of the baseline, the step
  ``t′`` at which the variant's loss curve reaches the baseline's loss curve at ``t``;
  ``speedup(t) = t / t′`` (the paper's "AuxT at k steps matches the baseline at 2k").
  ``speedup_at_<p>``: at ``p`` % of the baseline's last step (:data:`BUDGET_FRACTIONS`, the
  baseline's curve interpolated there; none before its first evaluation); the whole curves are
  ``step_equivalence``;
* ``steps_to_target_<m>pct`` / ``time_to_target_<m>pct`` and ``speedup_steps_<m>pct`` /
  ``speedup_time_<m>pct``: as for the final-loss target, with the target ``(1 + m/100)`` times the
  baseline's final loss (:data:`TARGET_MARGINS`);
* ``parameters`` / ``trainable_parameters``: the model's parameter counts, when given.

``convergence``: the baseline's relative fall of its loss curve over the last
:data:`CONVERGENCE_WINDOW` of its steps, per seed and mean; above :data:`CONVERGENCE_TOLERANCE` its
``message`` says the baseline has not converged and the speed-ups depend on the budget.

``paired``: every variant against the baseline, paired by seed (``stats.paired_difference``, a 95 %
Student-t interval over seeds): speed-ups as ratios — the mean and interval of the per-seed
log-speed-ups, exponentiated (a geometric mean with its interval) — and final numbers
(:data:`PAIRED_DIFFERENCES`) as differences variant − baseline. ``causal`` (with ``causal=True``):
each cell of the causal grid against AuxT at ``speedup_at_100`` (:data:`CAUSAL_KEY`), and which
cells reproduce AuxT's speed-up (within :data:`CAUSAL_MARGIN`), exceed it or fall short of it, are
known only as a bound, or that the intervals cannot tell.

``matched_loss`` (issue 19): the statistics of ``y`` (:data:`MATCHED_LAYER`) compared at equal
test loss instead of at equal steps — does a variant reach the baseline's final loss with a
differently organised latent? Per seed, the variant is read at the first capture at or after its
``steps_to_target`` (the step where its loss curve reaches the same seed's baseline's final test
loss: the rule and the target of the speed-ups above, so ``steps_to_target`` here is the cell's own),
the baseline at its final capture. ``{"layer", "statistics", "entries"}``, ``entries`` one per
variant and λ, the baseline's first:

* ``per_seed``: ``seed``; for a variant ``target``, ``steps_to_target`` and ``bound`` (``"upper"``
  when the variant is below the target at its first evaluation: the step is a bound, and the capture
  is the first at or after that evaluation), ``capture_step`` and ``capture_gap`` (capture step −
  ``steps_to_target``; a lower bound with ``bound``); then each of :data:`MATCHED_STATS` with its
  sample counts: ``total_correlation`` (nats), ``coding_gain`` and ``topk_share.l2`` (with
  ``topk_k``) as the capture's energy record holds them — computed at capture time by
  :mod:`energylab.stats` and bias-corrected as the record's ``bias_correction`` says (None in
  records older than that field), with their ``_ci_low`` / ``_ci_high`` where recorded, the same
  numbers as the ``final_<stat>`` above — and ``energy_per_position`` = Σ_c E[y_c²] from the
  capture archive's ``energies/y`` (the mean squared norm of ``y`` at one position, channel means
  in); ``count`` (positions) and ``images`` (probe images) are the samples behind all four;
  ``reason``: None, or why a statistic or the whole seed has no value — a variant that never
  reaches the target, a target that is undefined, no capture at or after the step, a capture
  without an archive or a statistic not recorded: None, never a made-up number;
* ``seeds`` (cells present), for a variant ``reached`` (seeds with a ``steps_to_target``);
* ``statistics``: per statistic ``{"mean", "std", "n"}`` over the seeds that have it;
* for a variant ``paired``: per statistic variant − baseline paired by seed, as ``paired`` above
  (a difference with its 95 % Student-t interval and ``n`` pairs).

The capture schedule sets how far a capture lies after the matched step (``capture_gap``): with
``--capture-every 500`` up to 500 steps, with the split grid's default 100 steps.
:func:`format_matched_loss` writes the section of the Markdown summary.
"""

from __future__ import annotations

import csv
import io
import math
import re
import textwrap
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
    "MATCHED_LAYER",
    "MATCHED_STATS",
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
    "format_matched_loss",
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
MATCHED_LAYER = "y"
"""The latent whose statistics the matched-loss comparison reads (:func:`summarize`'s
``matched_loss``)."""
MATCHED_STATS = (("total_correlation", "TC nats"), ("coding_gain", "coding gain"),
                 ("topk_share.l2", "top-k L2 share"), ("energy_per_position", "energy / position"))
"""(statistic, title) of the matched-loss comparison, in order: the first three from the capture's
energy record (as the capture computed and bias-corrected them), ``energy_per_position`` from its
archive."""
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
        captures: capture step -> that capture archive's arrays of :data:`MATCHED_LAYER`
            (:meth:`energylab.rundir.RunDir.captures`), for the matched-loss statistics; None (or
            a step missing): no archive.
    """

    evals: Sequence[dict]
    energy: Sequence[dict]
    bitstream: Mapping | None = None
    parameters: Mapping[str, int] | None = None
    captures: Mapping[int, Mapping[str, np.ndarray]] | None = None

    @classmethod
    def of(cls, run: RunDir) -> CellLogs:
        """What the summary reads of the run directory ``run``."""
        return cls(evals=run.evals(), energy=run.energy(), bitstream=run.bitstream(),
                   captures=run.captures(layers=(MATCHED_LAYER,)))


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


@dataclass(frozen=True)
class LossCurve:
    """A cell's test loss as every step-based number reads it (:func:`loss_curve`).

    Attributes:
        steps: the evaluation steps after step 0 with a finite loss, increasing.
        loss: the test loss there, fitted non-increasing (isotonic least squares).
        wall: the wall time (s) at ``steps``.
        log: interpolate the loss in log (every loss > 0), else linearly.
    """

    steps: np.ndarray
    loss: np.ndarray
    wall: np.ndarray
    log: bool

    @property
    def first(self) -> float | None:
        """The first evaluation after step 0: a ``t′`` at or before it is a bound."""
        return float(self.steps[0]) if len(self.steps) else None

    def _y(self, v):
        return np.log(v) if self.log else v

    def at(self, t: float) -> float | None:
        """The loss at step ``t``, interpolated in (log step, log loss); None outside the
        evaluations (no extrapolation, in particular none towards step 0)."""
        if not len(self.steps) or not self.steps[0] <= t <= self.steps[-1]:
            return None
        i = int(np.searchsorted(self.steps, t))
        if self.steps[i] == t:  # exactly, not through exp(log(·))
            return float(self.loss[i])
        y = float(np.interp(math.log(t), np.log(self.steps), self._y(self.loss)))
        return math.exp(y) if self.log else y

    def reach(self, level: float) -> tuple[float | None, bool]:
        """``(t′, bounded)``: the step at which the curve reaches ``level``, interpolated in (log
        step, log loss); ``(first, True)`` when it is already below ``level`` at its first
        evaluation (``t′ ≤ first``; exactly at it: ``(first, False)``); ``(None, False)`` if it
        never does."""
        hit = np.nonzero(self.loss <= level)[0]
        if not len(hit):
            return None, False
        i = int(hit[0])
        if i == 0:
            return float(self.steps[0]), bool(self.loss[0] < level)
        y0, y1, target = self._y(self.loss[i - 1]), self._y(self.loss[i]), self._y(level)
        frac = (y0 - target) / (y0 - y1)
        x0, x1 = math.log(self.steps[i - 1]), math.log(self.steps[i])
        return float(math.exp(x0 + frac * (x1 - x0))), False

    def wall_at(self, step: float | None) -> float | None:
        """The wall time at ``step``, linear in steps between evaluations (0 at step 0)."""
        if step is None:
            return None
        return float(np.interp(step, np.r_[0.0, self.steps], np.r_[0.0, self.wall]))


def _monotone(values: np.ndarray) -> np.ndarray:
    """The least-squares non-increasing fit of ``values`` (pool adjacent violators, equal weights)."""
    blocks: list[list[float]] = []  # [sum, count] of each pooled block
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(int(n), t / n) for t, n in blocks]) if blocks else np.array([])


def loss_curve(evals: Sequence[dict]) -> LossCurve:
    """The loss curve of a cell's evaluations (the module docstring's rule): steps after 0 with a
    finite loss, the loss fitted non-increasing, interpolated in (log step, log loss)."""
    kept = [r for r in evals if r["step"] > 0 and r["loss"] is not None and math.isfinite(r["loss"])]
    kept.sort(key=lambda r: r["step"])
    loss = _monotone(np.array([r["loss"] for r in kept], dtype=float))
    return LossCurve(steps=np.array([r["step"] for r in kept], dtype=float), loss=loss,
                     wall=np.array([r.get("wall_time") or 0.0 for r in kept], dtype=float),
                     log=bool(len(loss)) and bool((loss > 0).all()))


BOUNDED_KEYS = (*(f"{w}_to_target{s}" for w in ("steps", "time")
                  for s in ("", *(f"_{m}pct" for m in TARGET_MARGINS))),
                *(f"speedup_{w}{s}" for w in ("steps", "time")
                  for s in ("", *(f"_{m}pct" for m in TARGET_MARGINS))),
                *(f"speedup_at_{p}" for p in BUDGET_FRACTIONS))
"""Per-cell numbers that may be a bound (a ``t′`` at or before the first evaluation)."""


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


def _levels(target: float) -> list[tuple[str, float]]:
    """``(suffix, level)`` of the final-loss target and the relative ones."""
    return [("", target), *((f"_{m}pct", target * (1 + m / 100)) for m in TARGET_MARGINS)]


def _cell_summary(logs: CellLogs, curve: LossCurve, target: float | None) -> dict:
    evals = logs.evals
    if not evals:
        return {}
    last = evals[-1]
    out: dict = {"test_loss": last["loss"], "test_bpp": last["bpp"], "test_psnr": last["psnr"],
                 "steps": last["step"]}
    bounds: dict[str, str] = {}
    if logs.bitstream is not None:
        out["real_bpp"], out["real_psnr"] = logs.bitstream["bpp"], logs.bitstream["psnr-rgb"]
    if target is not None:
        for suffix, level in _levels(target):
            step, bounded = curve.reach(level)  # a null (NaN) target is never reached
            out[f"steps_to_target{suffix}"] = step
            out[f"time_to_target{suffix}"] = curve.wall_at(step)
            if bounded:
                bounds[f"steps_to_target{suffix}"] = bounds[f"time_to_target{suffix}"] = "upper"
    out.update(_energy_summary([with_roles(r) for r in logs.energy]))
    if logs.parameters is not None:
        out.update({k: logs.parameters[k] for k in ("parameters", "trainable_parameters")})
    out["bounds"] = bounds
    return out


def _combine(*kinds: str | None) -> str | None:
    """One bound kind of several (None: a value): the common kind, ``"mixed"`` if they differ."""
    present = {k for k in kinds if k}
    return None if not present else present.pop() if len(present) == 1 else "mixed"


def _flip(kind: str | None) -> str | None:
    return {"lower": "upper", "upper": "lower"}.get(kind or "", kind)


def _speedup_at(base: LossCurve, variant: LossCurve, t: float | None) -> tuple[float | None, str | None]:
    """``(t / t′, bound)``: the step-equivalence speed-up at the baseline's step ``t``; ``bound``
    ``"lower"`` when ``t′`` is at or before the variant's first evaluation."""
    level = None if t is None else base.at(t)
    if level is None:
        return None, None
    t_variant, bounded = variant.reach(level)
    if not t_variant:
        return None, None
    return t / t_variant, "lower" if bounded else None


def step_equivalence(base_evals: Sequence[dict], evals: Sequence[dict]) -> dict[str, list]:
    """The step-equivalence curve of a variant's evaluations against its baseline's:
    ``{"t": [...], "t_variant": [...], "speedup": [...], "bound": [...]}`` over the baseline's
    evaluation steps ``t > 0`` (:func:`loss_curve`): ``t_variant`` None where the variant never
    reaches the baseline's loss at ``t``; ``bound`` ``"lower"`` where it already has at its first
    evaluation (``t_variant`` is then that evaluation, ``t′ ≤ t_variant``, and ``speedup`` a lower
    bound), else None."""
    base, variant = loss_curve(base_evals), loss_curve(evals)
    ts = [float(t) for t in base.steps]
    reached = [variant.reach(float(base.at(t))) for t in ts]
    return {"t": ts, "t_variant": [tv for tv, _ in reached],
            "speedup": [t / tv if tv else None for t, (tv, _) in zip(ts, reached, strict=True)],
            "bound": ["lower" if tv and b else None for tv, b in reached]}


def _budget_free(row: dict, base: LossCurve, variant: LossCurve) -> None:
    """The step-equivalence speed-ups at :data:`BUDGET_FRACTIONS` of the baseline's budget."""
    for p in BUDGET_FRACTIONS:
        t = float(base.steps[-1]) * p / 100 if len(base.steps) else None
        row[f"speedup_at_{p}"], bound = _speedup_at(base, variant, t)
        if bound:
            row["bounds"][f"speedup_at_{p}"] = bound


def _convergence(base_evals: Mapping[str, Sequence[dict]]) -> dict:
    """The baseline's relative fall of its loss curve over the last :data:`CONVERGENCE_WINDOW` of
    its steps, ``(L(start) - L(end)) / L(start)`` (a share of the loss at the window's start), per
    seed (key) and mean, with the verdict."""
    changes = {}
    for key, evals in base_evals.items():
        curve = loss_curve(evals)
        start = curve.at(float(curve.steps[-1]) * (1 - CONVERGENCE_WINDOW)) if len(curve.steps) else None
        end = float(curve.loss[-1]) if len(curve.loss) else None
        changes[key] = (start - end) / abs(start) if start is not None and start else None
    mean, _, _ = _mean_std(list(changes.values()))
    converged = mean is not None and mean <= CONVERGENCE_TOLERANCE
    message = None if converged or mean is None else (
        f"the baseline has not converged: its test loss still fell by {100 * mean:.1f} % "
        f"over the last {100 * CONVERGENCE_WINDOW:.0f} % of its steps (> "
        f"{100 * CONVERGENCE_TOLERANCE:.0f} %), so the speed-ups depend on the step budget")
    return {"relative_change": changes, "relative_change_mean": mean, "window": CONVERGENCE_WINDOW,
            "tolerance": CONVERGENCE_TOLERANCE, "converged": converged, "message": message}


def _paired_entry(key: str, values: list, base_values: list, bounds: Sequence[str | None] = (),
                  base_bounds: Sequence[str | None] = ()) -> dict:
    """One paired comparison over seeds: log-ratio for speed-ups (exponentiated), else difference;
    ``bounds`` / ``base_bounds``: each seed's bound kind (module docstring)."""
    n = len(values)
    bounds, base_bounds = list(bounds) or [None] * n, list(base_bounds) or [None] * len(base_values)
    ratio = key in SPEEDUP_KEYS
    kinds = []
    values = list(values)
    for i, v in enumerate(values):
        kind = bounds[i] if ratio else _combine(bounds[i], _flip(base_bounds[i] if base_values else None))
        if kind == "mixed":
            values[i] = None  # a difference of two bounds in opposite directions: no number
        present = v is not None and (ratio or (base_values and base_values[i] is not None))
        kinds.append(kind if present and kind != "mixed" else None)
    if ratio:
        logs = [math.log(v) if v is not None and v > 0 else None for v in values]
        d = paired_difference(logs, [0.0] * len(logs))
        entry = {"key": key, "kind": "ratio",
                 **{f: (math.exp(getattr(d, f)) if getattr(d, f) is not None else None)
                    for f in ("mean", "low", "high")}, "n": d.n, "inside_noise": d.inside_noise}
        null = 1.0
    else:
        d = paired_difference(values, base_values)
        entry = {"key": key, "kind": "difference", "mean": d.mean, "low": d.low, "high": d.high,
                 "n": d.n, "inside_noise": d.inside_noise}
        null = 0.0
    kind = _combine(*kinds)
    entry["bounded"], entry["bound"] = sum(k is not None for k in kinds), kind
    if kind == "mixed":
        entry.update(mean=None, low=None, high=None, inside_noise=None)
    elif kind is not None:
        kept = "low" if kind == "lower" else "high"
        entry["high" if kind == "lower" else "low"] = None
        limit = entry[kept]
        entry["inside_noise"] = None if limit is None or not (
            limit > null if kind == "lower" else limit < null) else False
    return entry


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
                    key, [r.get(key) for r in rows], [b.get(key) for b in base],
                    [r.get("bounds", {}).get(key) for r in rows],
                    [b.get("bounds", {}).get(key) for b in base])})
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
    them), or ``cannot tell`` (fewer than two paired seeds), or ``bounded`` (the ratio is only a
    bound — a ``t′`` at or before a first evaluation — that does not decide); then every cell under
    its verdict, or that the intervals cannot tell."""
    def values(variant):
        rows = [per_cell.get((variant, None, s), {}) for s in seeds]
        return [r.get(CAUSAL_KEY) for r in rows], [r.get("bounds", {}).get(CAUSAL_KEY) for r in rows]

    auxt, auxt_bounds = values("auxt")
    reference = _paired_entry(CAUSAL_KEY, auxt, [], auxt_bounds)
    cells = []
    for variant in variants:
        if variant in ("baseline", "auxt"):
            continue
        own, own_bounds = values(variant)
        ratios = [o / a if o and a else None for o, a in zip(own, auxt, strict=True)]
        kinds = [_combine(o, _flip(a)) for o, a in zip(own_bounds, auxt_bounds, strict=True)]
        vs_auxt = _paired_entry(CAUSAL_KEY, ratios, [], kinds)
        if vs_auxt["bound"]:
            if vs_auxt["bound"] == "lower" and vs_auxt["inside_noise"] is False:
                verdict = "exceeds"
            elif vs_auxt["bound"] == "upper" and vs_auxt["inside_noise"] is False:
                verdict = "falls short"
            else:
                verdict = "bounded"
        elif vs_auxt["inside_noise"] is None:
            verdict = "cannot tell"
        elif not vs_auxt["inside_noise"]:
            verdict = "falls short" if vs_auxt["high"] < 1 else "exceeds"
        elif 1 / CAUSAL_MARGIN <= vs_auxt["low"] and vs_auxt["high"] <= CAUSAL_MARGIN:
            verdict = "reproduces"
        else:
            verdict = "inconclusive"
        cells.append({"variant": variant, "speedup": _paired_entry(CAUSAL_KEY, own, [], own_bounds),
                      "ratio_to_auxt": {k: vs_auxt[k] for k in ("mean", "low", "high", "n", "bounded",
                                                                 "bound")},
                      "verdict": verdict})
    if reference["bound"]:
        text = (f"the intervals cannot tell: AuxT's own speed-up ({CAUSAL_KEY}) is only a bound (t′ at "
                "or before its first evaluation), so no factor can be said to reproduce it")
    elif reference["inside_noise"] is None or any(c["verdict"] == "cannot tell" for c in cells):
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
        if any(c["verdict"] == "bounded" for c in cells):
            text += ("; known only as a bound (t′ at or before a first evaluation): "
                     f"{named('bounded')}")
    return {"key": CAUSAL_KEY, "auxt": reference, "cells": cells, "verdict": text}


def _capture_steps(energy: Sequence[dict]) -> list[int]:
    """The steps of a cell's captures of :data:`MATCHED_LAYER` (its energy records), ascending."""
    return sorted({int(r["step"]) for r in energy if r["role"] == MATCHED_LAYER})


def _at_capture(logs: CellLogs, energy: Sequence[dict], step: int) -> dict:
    """:data:`MATCHED_STATS` of the capture at ``step`` (module docstring), with its sample counts
    and what is missing (``reason``, None when nothing is)."""
    record = next(r for r in energy if r["role"] == MATCHED_LAYER and r["step"] == step)
    out: dict = {"capture_step": step, "count": record.get("count"), "images": record.get("images"),
                 "bias_correction": record.get("bias_correction"), "topk_k": record.get("topk_k")}
    missing = []
    for stat, _ in MATCHED_STATS:
        if stat == "energy_per_position":
            arrays = (logs.captures or {}).get(step, {})
            energies = arrays.get(f"energies/{MATCHED_LAYER}")
            out[stat] = None if energies is None else float(np.sum(energies, dtype=np.float64))
            if energies is None:
                missing.append(f"{stat} (no capture archive)")
            continue
        out[stat] = record.get(stat)
        for bound in ("ci_low", "ci_high"):
            if f"{stat}_{bound}" in record:
                out[f"{stat}_{bound}"] = record[f"{stat}_{bound}"]
        if out[stat] is None:
            missing.append(f"{stat} ({'undefined' if stat in record else 'not recorded'})")
    out["reason"] = (f"the capture at step {step} lacks " + ", ".join(missing)) if missing else None
    return out


def _no_statistics(reason: str) -> dict:
    return {"capture_step": None, **{stat: None for stat, _ in MATCHED_STATS}, "reason": reason}


def _statistics_over_seeds(per_seed: Sequence[dict]) -> dict:
    """Mean, s.d. (ddof 1) and seed count ``n`` of each :data:`MATCHED_STATS` over ``per_seed``."""
    out = {}
    for stat, _ in MATCHED_STATS:
        mean, std, n = _mean_std([e.get(stat) for e in per_seed])
        out[stat] = {"mean": mean, "std": std, "n": n}
    return out


def _matched_loss(cells: Mapping[Key, CellLogs], per_cell: dict, curves: Mapping[Key, LossCurve],
                  targets: Mapping, variants: Sequence[str], seeds: Sequence[int],
                  lmbdas: Sequence[float] | None) -> dict:
    """The matched-loss comparison (module docstring): per λ the baseline at its final capture,
    then each variant at its first capture at or after ``steps_to_target``, paired by seed."""
    energy = {key: [with_roles(r) for r in logs.energy] for key, logs in cells.items()}
    entries = []
    for lm in lmbdas or [None]:
        base: dict[int, dict] = {}
        for seed in seeds:
            key = ("baseline", lm, seed)
            if key not in cells:
                continue
            steps = _capture_steps(energy[key])
            base[seed] = {"seed": seed, **(_at_capture(cells[key], energy[key], steps[-1]) if steps else
                                           _no_statistics(f"no capture of {MATCHED_LAYER}"))}
            if base[seed]["reason"]:
                base[seed]["reason"] = f"seed {seed}: {base[seed]['reason']}"
        if base:
            entries.append({"variant": "baseline", "lmbda": lm, "seeds": len(base),
                            "per_seed": list(base.values()),
                            "statistics": _statistics_over_seeds(list(base.values()))})
        for variant in variants:
            if variant == "baseline":
                continue
            per_seed: dict[int, dict] = {}
            for seed in seeds:
                key = (variant, lm, seed)
                if key not in cells:
                    continue
                row, target = per_cell[key], targets.get((seed, lm))
                step = row.get("steps_to_target")
                entry = {"seed": seed, "target": target, "steps_to_target": step,
                         "bound": row.get("bounds", {}).get("steps_to_target"), "capture_step": None,
                         "capture_gap": None}
                steps = _capture_steps(energy[key])
                later = [c for c in steps if step is not None and c >= step]
                if target is None or not math.isfinite(target):
                    why = ("no baseline cell of this seed" if ("baseline", lm, seed) not in cells else
                           "the baseline has no evaluation after step 0" if target is None else
                           "the baseline's final test loss is undefined")
                    entry.update(_no_statistics(f"seed {seed}: no target ({why})"))
                elif step is None:
                    curve = curves[key]
                    ends = (f"its test loss ends at {curve.loss[-1]:.4g} at step {curve.steps[-1]:g}"
                            if len(curve.steps) else "it has no evaluation after step 0")
                    entry.update(_no_statistics(
                        f"seed {seed}: never reaches the target {target:.4g} ({ends})"))
                elif not later:
                    last = f"its last capture is at step {steps[-1]}" if steps else "it has no capture"
                    entry.update(_no_statistics(
                        f"seed {seed}: no capture at or after step {step:.0f} ({last})"))
                else:
                    entry.update(_at_capture(cells[key], energy[key], later[0]))
                    entry["capture_gap"] = later[0] - step
                    if entry["reason"]:
                        entry["reason"] = f"seed {seed}: {entry['reason']}"
                per_seed[seed] = entry
            if not per_seed:
                continue
            paired = {stat: _paired_entry(stat, [per_seed.get(s, {}).get(stat) for s in seeds],
                                          [base.get(s, {}).get(stat) for s in seeds])
                      for stat, _ in MATCHED_STATS}
            entries.append({"variant": variant, "lmbda": lm, "seeds": len(per_seed),
                            "reached": sum(e["steps_to_target"] is not None for e in per_seed.values()),
                            "per_seed": list(per_seed.values()),
                            "statistics": _statistics_over_seeds(list(per_seed.values())),
                            "paired": paired})
    return {"layer": MATCHED_LAYER, "statistics": [stat for stat, _ in MATCHED_STATS], "entries": entries}


def _target(evals: Sequence[dict]) -> float | None:
    """The mean of the last :data:`SMOOTH` test losses after step 0 (None without any; NaN, written
    as null, if one is undefined: never reached)."""
    losses = [r["loss"] for r in evals if r["step"] > 0]
    if not losses:
        return None
    return float(np.mean(np.array(losses[-SMOOTH:], dtype=float)))


def _segments(steps: Sequence[float]) -> list[dict]:
    """Runs of equal spacing of the evaluation steps (from step 0): ``{"every", "from", "to"}``."""
    points = [0.0, *steps]
    runs: list[dict] = []
    for a, b in zip(points, points[1:], strict=False):
        if runs and math.isclose(runs[-1]["every"], b - a):
            runs[-1]["to"] = b
        else:
            runs.append({"every": b - a, "from": a, "to": b})
    return runs


def _resolution(curves: Mapping[Key, LossCurve]) -> list[dict]:
    """One entry per distinct evaluation schedule of the cells (module docstring)."""
    schedules: dict[tuple, int] = {}
    for curve in curves.values():
        if len(curve.steps):
            key = tuple(float(t) for t in curve.steps)
            schedules[key] = schedules.get(key, 0) + 1
    out = []
    for steps, count in schedules.items():
        runs = _segments(steps)
        text = ", then ".join(f"every {r['every']:g} steps to {r['to']:g}" for r in runs)
        out.append({"first": steps[0], "spacing": runs, "cells": count,
                    "text": f"t′ is resolved to the evaluation spacing: {text}; a t′ at or before the "
                            f"first evaluation (step {steps[0]:g}) is a bound"})
    return out


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
        ``{"root", "smooth", "targets", "cells", "rows", "step_equivalence", "resolution",
        "convergence", "paired", "matched_loss"}``, with ``lmbdas`` ``"bd_rate"`` and with ``causal``
        ``"causal"``
        (see the module docstring).

    Raises:
        SummaryError: no baseline cell is given.
    """
    targets = {(s, lm): _target(logs.evals) for (v, lm, s), logs in cells.items() if v == "baseline"}
    if not targets:
        raise SummaryError(f"{root}: no baseline cell has evaluations yet")
    loss_curves = {key: loss_curve(logs.evals) for key, logs in cells.items()}
    per_cell = {key: _cell_summary(logs, loss_curves[key], targets.get((key[2], key[1])))
                for key, logs in cells.items()}
    curves = []
    for (variant, lm, seed), row in per_cell.items():
        base = per_cell.get(("baseline", lm, seed), {})
        for what in ("steps", "time"):
            for suffix in ("", *(f"_{m}pct" for m in TARGET_MARGINS)):
                key = f"{what}_to_target{suffix}"
                b, v = base.get(key), row.get(key)
                # the variant's value an upper bound: the speed-up a lower one; the baseline's: upper
                kind = _combine(_flip(row.get("bounds", {}).get(key)), base.get("bounds", {}).get(key))
                row[f"speedup_{what}{suffix}"] = b / v if b and v and kind != "mixed" else None
                if kind in ("lower", "upper") and b and v:
                    row["bounds"][f"speedup_{what}{suffix}"] = kind
        base_logs = cells.get(("baseline", lm, seed))
        if base_logs is not None and base_logs.evals and cells[variant, lm, seed].evals:
            _budget_free(row, loss_curves["baseline", lm, seed], loss_curves[variant, lm, seed])
            curves.append({"variant": variant, "lmbda": lm, "seed": seed,
                           **step_equivalence(base_logs.evals, cells[variant, lm, seed].evals)})
    rows = []
    for lm in lmbdas or [None]:
        for variant in variants:
            group = {s: r for (v, lm_, s), r in per_cell.items() if v == variant and lm_ == lm}
            if not group:
                continue
            keys = sorted({k for r in group.values() for k in r} - {"bounds"})
            row: dict = {"variant": variant, "lmbda": lm if lm else lmbda, "seeds": len(group)}
            for key in keys:
                mean, std, n = _mean_std([r.get(key) for r in group.values()])
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
                if key.endswith("_to_target"):
                    row[f"{key}_reached"] = n
                if key in BOUNDED_KEYS:
                    kinds = [r.get("bounds", {}).get(key) for r in group.values() if r.get(key) is not None]
                    row[f"{key}_bounded"] = sum(k is not None for k in kinds)
                    row[f"{key}_bound"] = _combine(*kinds)
            rows.append(row)
    summary = {"root": root, "smooth": SMOOTH, "targets": {
        f"seed{s}" + (f"_lmbda{lm:g}" if lm else ""): t for (s, lm), t in targets.items()},
        "cells": [{"variant": v, "lmbda": lm, "seed": s, **{k: x for k, x in r.items() if k != "bounds"},
                   "bounds": r.get("bounds", {})} for (v, lm, s), r in per_cell.items()],
        "rows": rows, "step_equivalence": curves, "resolution": _resolution(loss_curves),
        "convergence": _convergence({f"seed{s}" + (f"_lmbda{lm:g}" if lm else ""): logs.evals
                                     for (v, lm, s), logs in cells.items()
                                     if v == "baseline" and logs.evals}),
        "paired": _paired(per_cell, variants, seeds, lmbdas),
        "matched_loss": _matched_loss(cells, per_cell, loss_curves, targets, variants, seeds, lmbdas)}
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
             **{title: _bounded_value(r, k) for k, title in TABLE}}
            for r in summary["rows"]]


BOUND_SIGNS = {"lower": "≥ ", "upper": "≤ ", "mixed": "bounds both ways: "}
"""How a bound is written before its number."""


def _bounded_value(row: Mapping, key: str) -> str:
    """:func:`format_value` of a row's ``key``, after ``≥`` / ``≤`` and with ``(b/n bounds)`` when
    some seeds' values are bounds (module docstring)."""
    text = format_value(row.get(f"{key}_mean"), row.get(f"{key}_std"))
    bounded = row.get(f"{key}_bounded")
    if not bounded or row.get(f"{key}_mean") is None:
        return text
    n = row.get(f"{key}_reached", row.get("seeds"))
    return f"{BOUND_SIGNS[row[f'{key}_bound']]}{text} ({bounded}/{n} bounds)"


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
    if entry.get("bound"):  # the mean (and one limit) with bounds in place of values: a bound
        limit = entry["low"] if entry["bound"] == "lower" else entry["high"]
        limits = "" if limit is None else (f" [{number(limit)}, —]" if entry["bound"] == "lower"
                                           else f" [—, {number(limit)}]")
        return (f"{BOUND_SIGNS[entry['bound']]}{text}{limits} ({entry['bounded']}/{entry['n']} "
                "bounds)")
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


def _rule_lines(summary: dict) -> list[str]:
    """The speed-up rule and the resolution of ``t′`` (a summary written before they were recorded
    has neither, and is written as it was)."""
    if "resolution" not in summary:
        return []
    schedules = "; ".join(r["text"] + (f" ({r['cells']} cells)" if len(summary["resolution"]) > 1 else "")
                          for r in summary["resolution"]) or "no evaluations after step 0"
    return [f"*Rule:* t′ is where the variant's test loss (evaluations after step 0, fitted "
            f"non-increasing) reaches the level, interpolated linearly in (log step, log loss). "
            f"*Resolution:* {schedules}. `≥ ×…`: t′ lies at or before the variant's first evaluation, "
            f"so the speed-up is at least that (a bound, not a value; the mean puts the bound in place "
            f"of the value, `—`: no upper limit); `≤`: the same for steps.", ""]


def format_paired(summary: dict) -> str:
    """The paired tables (speed-ups as ratios, final numbers as differences against the baseline,
    with parameter counts), the matched-loss section (:func:`format_matched_loss`) and the causal
    verdict, as Markdown."""
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
             *_rule_lines(summary),
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
    matched = format_matched_loss(summary)
    if matched:
        lines += ["", *matched.rstrip("\n").split("\n")]
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


MATCHED_WIDTH = 100
"""Columns of the matched-loss section's text lines (its tables are narrower)."""


def _fill(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, MATCHED_WIDTH, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def _step_text(entry: Mapping) -> str:
    step = entry.get("steps_to_target")
    if step is None:
        return "never"
    text = f"{BOUND_SIGNS['upper'] if entry.get('bound') == 'upper' else ''}{step:.0f}"
    capture = entry.get("capture_step")
    # no-break spaces: a line is never broken inside "step → capture"
    return (text + f" → {'—' if capture is None else capture}").replace(" ", "\u00a0")


def _sample_sizes(entries: Sequence[Mapping]) -> list[str]:
    """The distinct ``count`` / ``images`` of the captures the entries read, as text."""
    counts = {(x.get("count"), x.get("images")) for e in entries for x in e["per_seed"]
              if x.get("capture_step") is not None}
    return [f"{c} positions of {i} images" for c, i in sorted(counts, key=str)]


def _grouped_reasons(per_seed: Sequence[Mapping]) -> list[str]:
    """The seeds' ``reason`` texts, seeds with the same one together (``seeds 0, 1: ...``)."""
    groups: dict[str, list[str]] = {}
    for x in per_seed:
        if x.get("reason"):
            seed, _, text = x["reason"].partition(": ")
            groups.setdefault(text, []).append(seed.removeprefix("seed "))
    return [f"seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}: {text}"
            for text, seeds in groups.items()]


def format_matched_loss(summary: dict) -> str:
    """The matched-loss section (``summary["matched_loss"]``, module docstring) as Markdown, every
    line at most :data:`MATCHED_WIDTH` columns; ``""`` for a summary without it."""
    matched = summary.get("matched_loss")
    if not matched or not matched.get("entries"):
        return ""
    layer, entries = matched["layer"], matched["entries"]
    common = len(_sample_sizes(entries)) == 1  # one probe set: its size said once
    lines = [f"## Statistics of {layer} at matched loss", "", *_fill(
        f"Each variant's {layer} at its first capture at or after the step where its test loss reaches "
        f"the same seed's baseline's final test loss (the steps-to-target rule above; `≤`: a bound), "
        f"beside the baseline's {layer} at its final capture: mean ± s.d. over seeds, and Δ = variant "
        f"− baseline paired over seeds with its 95 % Student-t interval (`~`: it contains 0). TC, "
        f"coding gain and the top-k L2 share are the capture's records (bias-corrected as recorded); "
        f"energy / position is Σ_c E[{layer}_c²]."
        + (f" Samples per capture: {_sample_sizes(entries)[0]}." if common else "")), ""]
    titles = dict(MATCHED_STATS)
    bases = {e["lmbda"]: e for e in entries if e["variant"] == "baseline"}
    for e in entries:
        name = f"**{e['variant']}**" + (f" (λ {e['lmbda']:g})" if e["lmbda"] else "")
        own = "" if common or not _sample_sizes([e]) else (
            f" Samples per capture: {'; '.join(_sample_sizes([e]))}.")
        if e["variant"] == "baseline":
            finals = sorted({x["capture_step"] for x in e["per_seed"] if x.get("capture_step") is not None})
            at = ("no capture" if not finals else f"final capture at step {finals[0]}" if len(finals) == 1
                  else "final captures at steps " + ", ".join(map(str, finals)))
            lines += _fill(f"{name}: {at} ({e['seeds']} seed{'s' if e['seeds'] != 1 else ''}).{own}")
        else:
            steps = ", ".join(_step_text(x) for x in e["per_seed"])
            lines += _fill(f"{name}: {e['reached']} of {e['seeds']} seed{'s' if e['seeds'] != 1 else ''} "
                           f"reach the target; step → capture: {steps}.{own}")
        lines += [line for reason in _grouped_reasons(e["per_seed"]) for line in _fill(f"- {reason}", "  ")]
        if e["variant"] == "baseline":
            lines.append("")
            continue
        base = bases.get(e["lmbda"], {}).get("statistics", {})
        lines += ["", "| statistic | at matched loss | baseline, final capture | Δ [95 % interval] |",
                  "|---|---|---|---|"]
        for stat, stats in e["statistics"].items():
            b = base.get(stat, {})
            lines.append(f"| {titles.get(stat, stat)} | {format_value(stats['mean'], stats['std'])} | "
                         f"{format_value(b.get('mean'), b.get('std'))} | "
                         f"{format_interval(e['paired'][stat])} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


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

"""The split grid: decorrelation × unevenness at a fixed subspace and a fixed delivered energy.

``python -m energylab.ablate --split`` trains the baseline, full AuxT and the six cells below, and
asks which of the paper's two parts of energy compaction -- **decorrelation** of the channels and
**uneven** energy across them -- speeds training when AuxT's shortcut supplies it. This module holds
the whole concept: the cells' weights, the energy matching, the step-0 manipulation checks, the
estimands and their verdicts. (:mod:`energylab.ablate` plans and runs the cells;
:mod:`energylab.summary` gives the per-cell speed-ups this module reads by key.)

**The cells.** In every cell AuxT's WLS stages before the last are frozen at the data's KLT
(:func:`energylab.klt.init_klt`), there is no subband scaling (``remove=("scaling",)``) and the OLP
biases are learned. The last stage's projection (``C_out x 4 C_in``: 48 x 128 at N=32/M=48) is
frozen at one of the weights below, with ``Sigma = U Lambda U^T`` the covariance of that stage's
subband vectors on the fitting crops (``U``, ``lambda_i``: its top ``k = min(C_out, 4 C_in)``
eigenpairs), ``lambda-bar`` the mean of the kept ``lambda_i``, ``Q`` a random ``k x k`` orthogonal
matrix, ``v_i`` the variances after rotating by ``Q U^T`` (``v = diag(Q Lambda Q^T)``) and ``pi`` a
random permutation (``Q``, ``pi`` and F's rows drawn from :func:`random_factors`, seeded by the
run's seed, the same for every cell of a seed):

* A: ``U^T`` -- decorrelated, uneven;
* B: ``diag(sqrt(lambda-bar / lambda_i)) U^T`` (PCA whitening) -- decorrelated, even;
* C: ``diag(sqrt(lambda_i / v_i)) Q U^T`` -- correlated, uneven (the KLT's spectrum);
* D: ``diag(sqrt(lambda-bar / v_i)) Q U^T`` -- correlated, even;
* E: ``diag(sqrt(lambda_pi(i) / lambda_i)) U^T`` -- decorrelated, unevenness misassigned;
* F: ``k`` random orthonormal rows of the full ``4 C_in`` space -- the control for the subspace.

Each weight is ``scale · diag(g) R`` (``R`` the rotation, ``g`` the gains above, 1 for A and F):
the gains are capped to ``[1/GAIN_CAP, GAIN_CAP]`` (:data:`GAIN_CAP` = 8: no component's amplitude
is changed more than 8x from what the KLT delivers; :func:`cap_gains`), which guards the smallest,
worst-estimated eigenvalues that whitening divides by, then one scalar ``scale > 0`` makes the
cell's shortcut deliver the same energy to ``y`` as cell A's on the fitting crops: the mean over
positions of ``||W v + b||^2``, the bias ``b`` as initialised (:func:`match_scale`, from the
vectors' moments). On the built-in data at N=32/M=48 (``lambda_1 / lambda_48`` about 2800; seed 0)
the cap leaves A, D and F alone and moves 5 of B's 48 gains (B stays white: coding gain 1.00), 5 of
C's (its coding gain 10.8 instead of A's 15.3) and 4 of E's (coding gain 2.9: misassigned *and*
less uneven than A; the alignment contrast carries both). Where the stage
widens (``C_out > 4 C_in``) the rows beyond ``k`` are zero. The mirrored synthesis stage (the first
iWLS) gets the Moore-Penrose pseudo-inverse of that weight (the transpose inverts only A and F); the
other iWLS the transposes of their mirrored KLT stages, as :func:`energylab.klt.init_klt` sets them.

``U``, ``Lambda`` and the energy are fitted on the first :data:`FIT_CROPS` = 8192 training crops of
the run's data order (1024 batches of 8, about 400 MB held on the CPU while the model is built), the
earlier stages' KLTs on the first :data:`EARLY_FIT_CROPS` = 1024 of them. Why so many: the cells
weight the spectrum differently (A's energy is mostly the top component and the means, B's the many
small components), so an energy matched on one set of crops holds on another only as far as the two
sets mix the photographs alike. Fitted on 128 crops the whitening gains spanned 0.28-15.3x and B's
held-out energy was off by +23 %; fitted and checked on 1024 crops each the cells' held-out energies
still spread by 3-8 % (seeds 0-3), on 4096 by 1.5-5.4 %, on 8192 by 2.0-3.0 % (seeds 0-5).

**Manipulation checks** (:func:`manipulation_checks`). When a cell is built, training measures the
shortcut's output at the last merge on :data:`CHECK_CROPS` = 8192 held-out crops (the training
batches right after the fitting ones): its energy per position, channel total correlation and
coding gain (``stats.total_correlation``, ``stats.coding_gain``, bias-corrected at the positions
counted) and top-k L2 share; and on the first :data:`CHECK_Y_CROPS` = 512 of them, through ``g_a``,
the share of ``y``'s energy it delivers (``stats.aux_energy_share``) and ``y``'s own statistics.
They are recorded in the run's ``config.json`` (``split_checks``). At seed 0 (N=32/M=48, built-in
data): total correlation 0.02 nats for A, B and E, 56-57 for C, D and F; coding gain 15.3 (A), 1.00
(B), 10.8 (C), 1.00 (D), 2.9 (E), 1.34 (F); delivered energy 134.7-137.5 per position (spread
2.1 %), 93-105 % of ``y``'s.

**Estimands** (:func:`estimands`), paired by seed, each the mean over seeds of a per-seed contrast
with its 95 % Student-t interval (``stats.paired_difference`` of the contrasts against 0), on the log
speed-ups against the baseline (:data:`SPEEDUP_KEYS`: step-equivalence at 25/50/100 % of the budget
and steps to +5/2/1 % of the baseline's final loss, as the summary computes them; the baseline
cancels in every contrast) and on the log final test loss. A seed drops out of an estimand where a
cell it weighs has no number: a speed-up never reached, or one the summary marks as a bound (a
``t′`` at or before the first evaluation); the entries count those (``bounded``).

* decorrelation ``1/2 [(A - C) + (B - D)]``; unevenness ``1/2 [(A - B) + (C - D)]``;
* interaction ``(A - B) - (C - D)``; alignment ``A - E``; subspace ``D - F``.

Verdicts (:func:`verdict`): *outside the noise* when the interval excludes 0; else *equivalent* when
the whole interval lies within the margin (:data:`SPEEDUP_MARGIN` = log 1.1 on a log speed-up: no
effect larger than ×1.1 either way; :data:`LOSS_MARGIN` = log 1.02 on the log test loss: no
difference larger than 2 %); else *inconclusive*; *cannot tell* with fewer than two paired seeds.
The paper predicts both main effects > 0; "only the delivered subspace matters" predicts the main
effects equivalent to 0 and the subspace effect > 0 (:func:`reading`).

**Defaults and cost** (:data:`DEFAULT_SEEDS`, :data:`DEFAULT_STEPS`, :func:`grid_minutes`). A
paired log speed-up has a seed s.d. of 0.07-0.12, i.e. about 0.05-0.085 per cell once the
baseline cancels; a main effect averages two differences of cells, so its s.d. is about that, a
pairwise contrast's (alignment, subspace) about 0.07-0.12. With 8 seeds the 95 % half-width is
``t_{0.975,7} s / sqrt(8) = 0.84 s``: at most 0.071 (×1.07) for a main effect and 0.10 (×1.10) for
a pairwise contrast. Cost on this 2-core machine: a plain N=32/M=48 step at batch 8 of 64x64 is
about 0.04 s (one unit), an AuxT step (every split cell) about 1.25 units; one seed of the grid's
8 variants costs ``1 + 7 × 1.25 = 9.75`` units a step, 1000 steps 9750 units = 390 s; each cell
adds about 30 s of evaluations, captures and real coding (about 20 s a cell in the causal
reference with 16 evaluations; the dense-early schedule adds about 10 more) and, for a split cell,
its fit and checks (16384 crops: about 7 s when the machine is quiet).
With a capture every 200 steps (6 captures of 0.9 s a cell), 8 seeds: ``8 × (390 + 8 × (27 + 5.4))
s = 5194 s`` = 87 minutes, within 90 (a capture every 100 steps would make it 92). The reference
result (``data/reference/split``: 4 seeds, ``--launcher local --jobs 2``, captures every 100 steps)
took 86 minutes while three other jobs shared the machine, so it does not test this estimate. Its
seed spreads were larger than assumed for the contrasts of the fastest cells (whose crossings sit
near the first evaluations): s.d. of the per-seed log contrast 0.145 (decorrelation), 0.11
(unevenness), 0.045 (subspace), 0.19 (A - C); with 8 seeds those give half-widths of ×1.13, ×1.10,
×1.04 and ×1.18.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from energylab.auxt import SPLIT_CELLS, SPLIT_INITS, WLS, iWLS
from energylab.klt import CHUNK_CROPS, Moments, covariance, init_klt, stage_moments
from energylab.stats import (
    AuxEnergyShare,
    ChannelStats,
    PairedDifference,
    coding_gain,
    energy_shares,
    paired_difference,
    total_correlation,
)

__all__ = [
    "AUXT_STEP_UNITS",
    "CAPTURE_CHECK_FIELDS",
    "CAPTURE_S",
    "CELLS",
    "CELL_LABELS",
    "CELL_OVERHEAD_S",
    "CHECK_CROPS",
    "CHECK_FIELDS",
    "CHECK_Y_CROPS",
    "COST_UNIT_S",
    "DEFAULT_CAPTURE_EVERY",
    "DEFAULT_SEEDS",
    "DEFAULT_STEPS",
    "EARLY_FIT_CROPS",
    "ESTIMANDS",
    "FIT_CROPS",
    "GAIN_CAP",
    "KEY_TITLES",
    "LOSS_KEY",
    "LOSS_MARGIN",
    "MIN_CROPS",
    "PRIMARY_KEY",
    "REFERENCE_PATCH",
    "SPEEDUP_KEYS",
    "SPEEDUP_MARGIN",
    "SPLIT_ENTROPY",
    "SPLIT_INITS",
    "CellWeight",
    "cap_gains",
    "cell_of",
    "check_batches",
    "capture_check_summary",
    "capture_checks",
    "check_summary",
    "contrast",
    "delivered_energy",
    "estimands",
    "fit_batches",
    "format_split",
    "grid_minutes",
    "init_split",
    "manipulation_checks",
    "match_scale",
    "random_factors",
    "reading",
    "set_last_stage",
    "split_summary",
    "split_weight",
    "variant_of",
    "verdict",
]

CELLS = SPLIT_CELLS
"""The split grid's cells, A to F; their variants are named ``split-<cell>``."""
CELL_LABELS = {"A": ("yes", "yes"), "B": ("yes", "no"), "C": ("no", "yes"), "D": ("no", "no"),
               "E": ("yes", "misassigned"), "F": ("no", "~no (random subspace)")}
"""Cell -> (decorrelated, uneven), by construction."""
FIT_CROPS = 8192
"""Training crops of 64 x 64 the last stage's ``U``, ``Lambda`` and energy are fitted on: the first
``ceil(FIT_CROPS / batch_size)`` batches of the run's data order (1024 of 8); for other patch sizes
as many pixels, but never fewer than :data:`MIN_CROPS` crops (:func:`fit_batches`)."""
EARLY_FIT_CROPS = 1024
"""The first of the fitting crops the KLTs of the stages before the last are fitted on (they are the
same in every cell; the last stage's ``U``, ``Lambda`` and energy take all :data:`FIT_CROPS`)."""
CHECK_CROPS = 8192
"""Held-out crops (of 64 x 64; scaled as :data:`FIT_CROPS`) of the step-0 manipulation checks of
the shortcut alone: the batches right after the fitting ones (:func:`check_batches`)."""
CHECK_Y_CROPS = 512
"""The first of those crops the checks that need ``y`` (the main branch) run on."""
MIN_CROPS = 512
"""The fewest crops a fit or a check reads, whatever the patch size."""
REFERENCE_PATCH = 64
"""The patch size :data:`FIT_CROPS` and :data:`CHECK_CROPS` count crops of."""
GAIN_CAP = 8.0
"""A cell's per-component gains are clipped to ``[1/GAIN_CAP, GAIN_CAP]`` times their geometric
mean before the energy matching."""
SPLIT_ENTROPY = 19
"""Mixed with the run's seed into the seed of :func:`random_factors` (issue 19)."""

SPEEDUP_KEYS = ("speedup_at_25", "speedup_at_50", "speedup_at_100", "speedup_steps_5pct",
                "speedup_steps_2pct", "speedup_steps_1pct")
"""The summary's per-cell speed-ups (against the same seed's baseline) the estimands read, by key."""
LOSS_KEY = "test_loss"
"""The summary's per-cell final test loss."""
KEY_TITLES = {"speedup_at_25": "t-equiv. at 25 %", "speedup_at_50": "t-equiv. at 50 %",
              "speedup_at_100": "t-equiv. at 100 %", "speedup_steps_5pct": "steps to +5 %",
              "speedup_steps_2pct": "steps to +2 %", "speedup_steps_1pct": "steps to +1 %",
              LOSS_KEY: "final test loss"}
PRIMARY_KEY = "speedup_at_100"
"""The speed-up of the headline verdict of each estimand (every key is in the table)."""
SPEEDUP_MARGIN = math.log(1.1)
"""Equivalence margin on a log speed-up: no effect larger than ×1.1 either way."""
LOSS_MARGIN = math.log(1.02)
"""Equivalence margin on the log final test loss: no difference larger than 2 %."""

ESTIMANDS: dict[str, tuple[str, dict[str, float]]] = {
    "decorrelation": ("½[(A−C)+(B−D)]", {"A": 0.5, "B": 0.5, "C": -0.5, "D": -0.5}),
    "unevenness": ("½[(A−B)+(C−D)]", {"A": 0.5, "C": 0.5, "B": -0.5, "D": -0.5}),
    "interaction": ("(A−B)−(C−D)", {"A": 1.0, "B": -1.0, "C": -1.0, "D": 1.0}),
    "alignment": ("A−E", {"A": 1.0, "E": -1.0}),
    "subspace": ("D−F", {"D": 1.0, "F": -1.0}),
    "decorrelation if uneven": ("A−C", {"A": 1.0, "C": -1.0}),
    "decorrelation if even": ("B−D", {"B": 1.0, "D": -1.0}),
    "unevenness if decorrelated": ("A−B", {"A": 1.0, "B": -1.0}),
    "unevenness if correlated": ("C−D", {"C": 1.0, "D": -1.0}),
}
"""Estimand -> (formula, weight of each cell in the per-seed contrast). The last four are the
simple effects: each main effect at one level of the other factor, which is what to read when the
interaction is outside the noise (a main effect then averages two different effects)."""
_SIDES = {
    "decorrelation": ("the decorrelated cells (A, B)", "the correlated ones (C, D)"),
    "unevenness": ("the uneven cells (A, C)", "the even ones (B, D)"),
    "alignment": ("the KLT's own spectrum (A)", "the misassigned one (E)"),
    "subspace": ("the principal subspace (D)", "a random one (F)"),
    "decorrelation if uneven": ("the decorrelated uneven cell (A)", "the correlated uneven one (C)"),
    "decorrelation if even": ("the decorrelated even cell (B)", "the correlated even one (D)"),
    "unevenness if decorrelated": ("the decorrelated uneven cell (A)", "the decorrelated even one (B)"),
    "unevenness if correlated": ("the correlated uneven cell (C)", "the correlated even one (D)"),
}

DEFAULT_SEEDS = tuple(range(8))
"""``--split``'s default seeds (the module docstring's arithmetic)."""
DEFAULT_STEPS = 1000
"""``--split``'s default steps per cell."""
DEFAULT_CAPTURE_EVERY = 200
"""``--split``'s default ``--capture-every``: the matched-loss statistics (the capture at or after
the step where a cell first reaches the baseline's final loss) sit within 200 steps of that step,
and the 6 captures of a cell keep the grid within 90 minutes (:func:`grid_minutes`)."""
COST_UNIT_S = 0.04
"""Seconds of one plain N=32/M=48 training step at batch 8 of 64x64 on the 2-core machine."""
AUXT_STEP_UNITS = 1.25
"""An AuxT step (full or a split cell) in cost units."""
CELL_OVERHEAD_S = 27.0
"""Seconds per cell beside its steps and captures: evaluations, real coding, the split fitting."""
CAPTURE_S = 0.9
"""Seconds of one capture of the 32-region probe (``bench/bench_capture.py``, quiet)."""


def grid_minutes(seeds: int, steps: int, variants: int = 2 + len(CELLS),
                 capture_every: int = DEFAULT_CAPTURE_EVERY) -> float:
    """Estimated wall minutes of the split grid on the quiet 2-core machine: ``seeds × (steps × (1 +
    (variants - 1) × AUXT_STEP_UNITS) × COST_UNIT_S + variants × (CELL_OVERHEAD_S + captures ×
    CAPTURE_S)) / 60`` with ``captures = steps // capture_every + 1`` (0 without captures).

    >>> round(grid_minutes(8, 1000), 1)
    86.6
    """
    units = 1 + (variants - 1) * AUXT_STEP_UNITS
    captures = steps // capture_every + 1 if capture_every else 0
    return seeds * (steps * units * COST_UNIT_S + variants * (CELL_OVERHEAD_S + captures * CAPTURE_S)) / 60


def variant_of(cell: str) -> str:
    """``"A"`` -> ``"split-A"``."""
    return f"split-{cell}"


def cell_of(variant: str) -> str | None:
    """``"split-A"`` -> ``"A"``; None for a variant outside the grid."""
    return variant.removeprefix("split-") if variant in SPLIT_INITS else None


def _batches(crops: int, batch_size: int, patch_size: int) -> int:
    crops = max(MIN_CROPS, crops * REFERENCE_PATCH**2 // patch_size**2)
    return -(-crops // batch_size)


def fit_batches(batch_size: int, patch_size: int = REFERENCE_PATCH) -> range:
    """The training batches the fit reads: the first ``ceil(FIT_CROPS / batch_size)`` at 64-pixel
    patches (as many pixels at other sizes, at least :data:`MIN_CROPS` crops).

    >>> fit_batches(8), fit_batches(8, 256)
    (range(0, 1024), range(0, 64))
    """
    return range(_batches(FIT_CROPS, batch_size, patch_size))


def check_batches(batch_size: int, patch_size: int = REFERENCE_PATCH) -> range:
    """The held-out batches of the manipulation checks: :data:`CHECK_CROPS` crops' worth right after
    the fitting ones.

    >>> check_batches(8)
    range(1024, 2048)
    """
    start = len(fit_batches(batch_size, patch_size))
    return range(start, start + _batches(CHECK_CROPS, batch_size, patch_size))


# ---------------------------------------------------------------------------------------------
# The cells' weights


def _orthogonal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """A Haar-random ``(rows, cols)`` matrix with orthonormal rows (``rows <= cols``), float64."""
    a = torch.randn(cols, rows, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))).T


def random_factors(k: int, dim: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(Q, pi, F)`` of a run seeded ``seed``: a random ``(k, k)`` orthogonal matrix, a random
    permutation of ``k`` and ``k`` random orthonormal rows of ``R^dim`` (float64), always drawn in
    that order from one generator seeded by ``SeedSequence([SPLIT_ENTROPY, seed])`` (the global RNG
    untouched), so the cells of a seed share them."""
    state = np.random.SeedSequence([SPLIT_ENTROPY, seed]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state) >> 1)
    q = _orthogonal(k, k, generator)
    perm = torch.randperm(k, generator=generator)
    f = _orthogonal(k, dim, generator)
    return q, perm, f


def cap_gains(gains: Tensor, cap: float = GAIN_CAP) -> tuple[Tensor, int]:
    """``gains`` clipped to ``[1/cap, cap]``; and how many were clipped.

    >>> capped, n = cap_gains(torch.tensor([0.01, 1.0, 1000.0]), cap=8)
    >>> capped.tolist(), n
    ([0.125, 1.0, 8.0], 2)
    """
    capped = gains.clamp(1 / cap, cap)
    return capped, int((capped != gains).sum())


def _moments(vectors: Tensor | Moments) -> Moments:
    if isinstance(vectors, Moments):
        return vectors
    if vectors.shape[0] < 2:
        raise ValueError(f"the split cells need at least two vectors, got {vectors.shape[0]}")
    v = vectors.detach().to(torch.float64)
    return Moments(v.shape[0], v.mean(0), covariance(v))


def _delivered(weight: Tensor, moments: Moments, bias: Tensor | None) -> tuple[float, float, float]:
    """``(a, beta, gamma)`` with ``E ||c W v + b||^2 = c^2 a + 2 c beta + gamma`` over the vectors
    of ``moments``."""
    w = weight.to(moments.mean)
    a = float(torch.trace(w @ moments.second @ w.T))
    if bias is None:
        return a, 0.0, 0.0
    b = bias.detach().to(moments.mean)
    return a, float(b @ (w @ moments.mean)), float(b @ b)


def delivered_energy(weight: Tensor, vectors: Tensor | Moments, bias: Tensor | None = None) -> float:
    """``E ||W v + b||^2`` over ``vectors`` ``(n, D)`` (or their :class:`~energylab.klt.Moments`):
    the energy per position a projection delivers, its bias included."""
    a, beta, gamma = _delivered(weight, _moments(vectors), bias)
    return a + 2 * beta + gamma


def match_scale(weight: Tensor, vectors: Tensor | Moments, bias: Tensor | None, target: float) -> float:
    """The scalar ``c > 0`` with ``E ||c W v + b||^2 = target`` over ``vectors`` ``(n, D)`` (or
    their :class:`~energylab.klt.Moments`).

    Raises:
        ValueError: no positive solution (the bias alone delivers more than ``target``).
    """
    a, beta, gamma = _delivered(weight, _moments(vectors), bias)
    disc = beta * beta + a * (target - gamma)
    if a <= 0 or disc < 0 or -beta + math.sqrt(disc) <= 0:
        raise ValueError(f"no positive scale delivers the energy {target:.4g} (weight {a:.4g}, bias "
                         f"{gamma:.4g})")
    return (-beta + math.sqrt(disc)) / a


class CellWeight(NamedTuple):
    """A split cell's last-stage weight and how it was made.

    ``weight`` ``(C_out, D)`` float64; ``gains`` the per-component gains after the cap, before the
    scale; ``capped`` how many the cap moved; ``scale`` the energy-matching scalar (1 for A);
    ``energy`` the energy per position it delivers on the fitting vectors (cell A's);
    ``eigenvalues`` the kept ``lambda_i``.
    """

    weight: Tensor
    gains: Tensor
    capped: int
    scale: float
    energy: float
    eigenvalues: Tensor


def split_weight(vectors: Tensor | Moments, out_features: int, cell: str, seed: int = 0,
                 bias: Tensor | None = None, cap: float = GAIN_CAP) -> CellWeight:
    """Cell ``cell``'s last-stage weight for the subband vectors ``vectors`` ``(n, D)`` (or their
    :class:`~energylab.klt.Moments`; the module docstring's table), energy-matched to cell A's with
    the bias ``bias`` (None: none).

    Raises:
        ValueError: an unknown cell, or fewer than two vectors.
    """
    if cell not in CELLS:
        raise ValueError(f"unknown split cell {cell!r}; valid: {', '.join(CELLS)}")
    moments = _moments(vectors)
    moments = Moments(moments.count, moments.mean.cpu(), moments.covariance.cpu())
    dim = moments.mean.shape[0]
    k = min(out_features, dim)
    lam, vecs = torch.linalg.eigh(moments.covariance)
    lam, u = lam.flip(0)[:k], vecs.flip(1)[:, :k]
    lam = lam.clamp_min(float(lam[0]) * 1e-12)
    q, perm, f = random_factors(k, dim, seed)
    mean = lam.mean()
    rotated = (q * q) @ lam  # v_i = diag(Q Lambda Q^T)
    rotation = {"A": u.T, "B": u.T, "C": q @ u.T, "D": q @ u.T, "E": u.T, "F": f}[cell]
    gains = {"A": torch.ones_like(lam), "B": (mean / lam).sqrt(), "C": (lam / rotated).sqrt(),
             "D": (mean / rotated).sqrt(), "E": (lam[perm] / lam).sqrt(), "F": torch.ones_like(lam)}[cell]
    gains, capped = cap_gains(gains, cap)

    def full(rows: Tensor) -> Tensor:
        w = torch.zeros(out_features, dim, dtype=torch.float64)
        w[:k] = rows
        return w

    b = None if bias is None else bias.detach().to(torch.float64).cpu()
    target = delivered_energy(full(u.T), moments, b)
    raw = full(gains[:, None] * rotation)
    scale = 1.0 if cell == "A" else match_scale(raw, moments, b, target)
    return CellWeight(scale * raw, gains, capped, scale, target, lam)


@torch.no_grad()
def init_split(analysis: Sequence[WLS], synthesis: Sequence[iWLS], x: Tensor, cell: str,
               seed: int = 0) -> CellWeight:
    """Set a model's AuxT to split cell ``cell``: every WLS of ``analysis`` (``g_a``'s auxiliary
    layers, in order) but the last, and its mirrored iWLS, at the KLT of its input on the first
    :data:`EARLY_FIT_CROPS` of the fitting crops ``x`` (:func:`energylab.klt.init_klt`), then the
    last stage at cell ``cell`` for the moments of its subband vectors on all of ``x``
    (:func:`set_last_stage`). Returns the :class:`CellWeight`.

    Raises:
        ValueError: an unknown cell; a WLS with subband scaling (the split cells have none); what
            :func:`energylab.klt.init_klt` raises.
    """
    if any(layer.scaling_factors is not None for layer in analysis):
        raise ValueError("the split cells have no subband scaling: build them with remove=('scaling',)")
    init_klt(analysis, synthesis, x[:EARLY_FIT_CROPS], stages=len(analysis) - 1)
    return set_last_stage(analysis, synthesis, stage_moments(analysis, len(analysis) - 1, x), cell, seed)


@torch.no_grad()
def set_last_stage(analysis: Sequence[WLS], synthesis: Sequence[iWLS], moments: Moments, cell: str,
                   seed: int = 0) -> CellWeight:
    """Set the last WLS of ``analysis`` to :func:`split_weight` of cell ``cell`` for the
    ``moments`` of its subband vectors (its bias as it is) and the first iWLS of ``synthesis`` to
    that weight's Moore-Penrose pseudo-inverse. Returns the :class:`CellWeight`."""
    last = analysis[-1]
    weight = last.olp.linear.weight
    fit = split_weight(moments, weight.shape[0], cell, seed, bias=last.olp.linear.bias)
    weight.copy_(fit.weight)
    synthesis[0].olp.linear.weight.copy_(torch.linalg.pinv(fit.weight))
    return fit


# ---------------------------------------------------------------------------------------------
# Manipulation checks


def _channel_summary(stats: ChannelStats, prefix: str) -> dict[str, float | None]:
    out = stats.compute()
    cov = out["covariance"].cpu().numpy()
    n = int(out["count"])
    channels = cov.shape[0]
    shares = energy_shares(out["mean"], out["energies"], n)
    return {f"{prefix}_energy": float(out["energies"].sum()),
            f"{prefix}_total_correlation": total_correlation(cov, n if n > channels else None),
            f"{prefix}_coding_gain": coding_gain(cov, n if n > channels else None),
            f"{prefix}_topk_share_l2": shares["topk_share.l2"]}


def _shortcut_stats(g_a: nn.Module, crops: Tensor, batch: int, device: torch.device) -> ChannelStats:
    """Channel statistics of the auxiliary chain's last output (what reaches the last merge)."""
    stats = None
    for part in crops.split(batch):
        a = part.to(device)
        for layer in g_a.auxiliary_layers:
            a = layer(a)
        if stats is None:
            stats = ChannelStats(a.shape[1])
        stats.update(a.double())
    return stats


@torch.no_grad()
def manipulation_checks(model: nn.Module, crops: Tensor, y_crops: int = CHECK_Y_CROPS,
                        batch: int = 64) -> dict[str, float | int | None]:
    """The shortcut's output at ``g_a``'s last merge on the held-out ``crops`` ``(B, 3, H, W)`` (on
    any device; the shortcut alone in chunks of :data:`energylab.klt.CHUNK_CROPS`, ``g_a`` in
    batches of ``batch``), beside ``y``:

    * on all ``crops``, the shortcut alone (its chain of WLS): ``aux_energy`` (per position: the
      sum over channels of the mean squares, the bias included), ``aux_total_correlation`` (nats)
      and ``aux_coding_gain`` (``stats.total_correlation`` / ``stats.coding_gain``, bias-corrected
      at the positions counted), ``aux_topk_share_l2`` (``stats.energy_shares``); ``crops``,
      ``positions``;
    * on the first ``y_crops`` of them, through ``g_a``: ``aux_share`` (``stats.aux_energy_share``
      of the shortcut against the merge's output, ``y`` when the last merge follows ``g_a``'s last
      layer, as in every registered model), ``y_energy``, ``y_total_correlation``,
      ``y_coding_gain``, ``y_topk_share_l2``; ``y_crops``.

    ``model`` is the bare model (``energylab.models.unwrap_model``: no DDP or ``torch.compile``
    wrapper), its ``g_a`` an ``energylab.models.AuxTransform`` (read through its
    ``auxiliary_layers`` and ``merges``; this module builds weights for :mod:`energylab.models` and
    imports nothing from it).

    Raises:
        ValueError: a model without AuxT.
    """
    g_a = getattr(model, "g_a", None)
    if not (hasattr(g_a, "auxiliary_layers") and hasattr(g_a, "merges")):
        raise ValueError("manipulation_checks needs a bare model with AuxT attached")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    aux_stats = _shortcut_stats(g_a, crops, CHUNK_CROPS, device)
    out: dict[str, float | int | None] = {"crops": len(crops), "positions": int(aux_stats.compute()["count"])}
    out |= _channel_summary(aux_stats, "aux")
    seen: dict[str, Tensor] = {}

    def hook(module, args, output):
        seen["aux"], seen["merged"] = args[1], output

    y_stats, share = None, AuxEnergyShare()
    handle = g_a.merges[-1].register_forward_hook(hook)
    try:
        for part in crops[:y_crops].split(batch):
            y = g_a(part.to(device)).double()
            if y_stats is None:
                y_stats = ChannelStats(y.shape[1])
            y_stats.update(y)
            share.update(seen["aux"].double(), seen["merged"].double())
    finally:
        handle.remove()
    out |= {"y_crops": min(y_crops, len(crops)), "aux_share": float(share.compute()["aux_energy_share"])}
    return out | _channel_summary(y_stats, "y")


# ---------------------------------------------------------------------------------------------
# Estimands and verdicts


def _log(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return math.log(v) if math.isfinite(v) and v > 0 else None


def contrast(values: Mapping[str, Sequence[float | None]],
             weights: Mapping[str, float]) -> list[float | None]:
    """The per-seed contrast ``sum_cell weight · value``: ``values`` maps each cell to its values
    aligned by seed; a seed where any weighted cell has None gets None."""
    n = len(next(iter(values.values()))) if values else 0
    out: list[float | None] = []
    for i in range(n):
        parts = [values.get(c, [None] * n)[i] for c in weights]
        out.append(None if any(p is None for p in parts)
                   else float(sum(w * p for w, p in zip(weights.values(), parts, strict=True))))
    return out


def verdict(d: PairedDifference, margin: float) -> str:
    """``"outside the noise"`` (the interval excludes 0), ``"equivalent"`` (it contains 0 and lies
    inside ``(-margin, margin)``), ``"inconclusive"`` (it contains 0 and reaches beyond the margin),
    or ``"cannot tell"`` (no interval: fewer than two seeds)."""
    if d.inside_noise is None:
        return "cannot tell"
    if not d.inside_noise:
        return "outside the noise"
    if -margin < d.low and d.high < margin:
        return "equivalent"
    return "inconclusive"


def _direction(name: str, speedup: bool, positive: bool) -> str:
    if name == "interaction":
        what = "speeds training up" if speedup else "lowers the final test loss"
        more = positive if speedup else not positive
        return (f"unevenness {what} {'more' if more else 'less'} with decorrelation (A vs B) than "
                f"without it (C vs D)")
    first, second = _SIDES[name]
    if speedup:
        verb = "train faster than" if positive else "train slower than"
    else:
        verb = "end at a higher test loss than" if positive else "end at a lower test loss than"
    return f"{first} {verb} {second}"


def _sentence(name: str, entry: Mapping) -> str:
    formula = ESTIMANDS[name][0]
    speedup = entry["key"] != LOSS_KEY
    head = f"{name} ({formula}) on {KEY_TITLES.get(entry['key'], entry['key'])}"
    if entry["mean"] is None:
        dropped = entry.get("bounded") or 0
        return f"{head}: no paired seed has every cell" + (
            f" as a value ({dropped} with a speed-up known only as a bound)" if dropped else "")
    ratio = f"×{entry['ratio']:.3f}"
    if entry["ratio_low"] is not None:
        ratio += f" [{entry['ratio_low']:.3f}, {entry['ratio_high']:.3f}]"
    margin = math.exp(entry["margin"])
    v = entry["verdict"]
    if v == "outside the noise":
        text = f"outside the noise: {_direction(name, speedup, entry['mean'] > 0)}"
    elif v == "equivalent":
        text = (f"equivalent within ×{margin:.2f}: the whole interval lies inside [×{1 / margin:.3f}, "
                f"×{margin:.3f}], so no effect larger than {100 * (margin - 1):.0f} % either way")
    elif v == "inconclusive":
        text = (f"inconclusive: the interval contains ×1 but reaches beyond the ×{margin:.2f} "
                f"equivalence margin")
    else:
        text = f"cannot tell: {entry['n']} paired seed(s), no interval"
    dropped = entry.get("bounded") or 0
    seeds = f"{entry['n']} seeds" + (f"; {dropped} left out, a speed-up there known only as a bound"
                                      if dropped else "")
    return f"{head}: {ratio} ({seeds}), {text}"


def _exp(x: float | None) -> float | None:
    return None if x is None else math.exp(x)


def estimands(rows: Sequence[Mapping], seeds: Sequence[int],
              keys: Sequence[str] = (*SPEEDUP_KEYS, LOSS_KEY)) -> list[dict]:
    """Every estimand of :data:`ESTIMANDS` on every key, from the summary's per-cell rows (dicts
    with ``variant``, ``seed`` and the per-cell numbers; other variants ignored), paired by seed.

    Each entry: ``estimand``, ``formula``, ``key``, ``kind`` (``"log_speedup"`` or
    ``"log_loss"``), ``mean`` / ``low`` / ``high`` (of the per-seed contrast of the logs, a 95 %
    interval by ``stats.paired_difference``), ``n``, ``inside_noise``, ``ratio`` / ``ratio_low`` /
    ``ratio_high`` (exponentiated), ``margin``, ``verdict`` (:func:`verdict`), ``sentence``,
    ``per_seed`` (the contrasts, None where dropped) and ``bounded`` (seeds dropped because a cell's
    number is only a bound). A seed drops out of an estimand when a cell it weighs has no number
    there: None, not finite or not positive (a speed-up never reached), or a bound (the summary's
    per-cell ``bounds``: a ``t′`` at or before the first evaluation is a limit, not a value, and a
    contrast of limits has no value either).
    """
    by_cell = {(cell_of(r["variant"]), r["seed"]): r for r in rows
               if cell_of(r["variant"]) is not None and r.get("lmbda") is None}

    def bounded(cell: str, seed: int, key: str) -> bool:
        return bool((by_cell.get((cell, seed), {}).get("bounds") or {}).get(key))

    out = []
    for name, (formula, weights) in ESTIMANDS.items():
        for key in keys:
            values = {c: [None if bounded(c, s, key) else _log(by_cell.get((c, s), {}).get(key))
                          for s in seeds] for c in weights}
            per_seed = contrast(values, weights)
            n_bounded = sum(any(bounded(c, s, key) for c in weights) for s in seeds)
            d = paired_difference(per_seed, [0.0] * len(per_seed))
            margin = LOSS_MARGIN if key == LOSS_KEY else SPEEDUP_MARGIN
            entry = {"estimand": name, "formula": formula, "key": key,
                     "kind": "log_loss" if key == LOSS_KEY else "log_speedup",
                     "mean": d.mean, "low": d.low, "high": d.high, "n": d.n,
                     "inside_noise": d.inside_noise, "ratio": _exp(d.mean), "ratio_low": _exp(d.low),
                     "ratio_high": _exp(d.high), "margin": margin, "verdict": verdict(d, margin),
                     "per_seed": per_seed, "bounded": n_bounded}
            entry["sentence"] = _sentence(name, entry)
            out.append(entry)
    return out


def reading(entries: Sequence[Mapping], key: str = PRIMARY_KEY) -> dict[str, str]:
    """What the estimands on ``key`` say of the two hypotheses: the paper's split (decorrelation
    > 0 and unevenness > 0) and "only the delivered subspace matters" (both main effects equivalent
    to 0 and subspace > 0). Each ``"supported"`` (every prediction met: an effect outside the noise
    in the predicted direction, or equivalence where none is predicted), ``"contradicted"`` (some
    prediction failed outright: an effect outside the noise against it, or equivalence where an
    effect is predicted, or an effect outside the noise where equivalence is predicted) or ``"not
    decided"``."""
    found = {e["estimand"]: e for e in entries if e["key"] == key}

    def judge(predictions: Mapping[str, str]) -> str:
        results = []
        for name, predicted in predictions.items():
            e = found.get(name)
            if e is None or e["verdict"] in ("cannot tell", "inconclusive"):
                results.append(None)
                continue
            observed = "equivalent" if e["verdict"] == "equivalent" else (
                "positive" if e["mean"] > 0 else "negative")
            results.append(observed == predicted)
        if any(r is False for r in results):
            return "contradicted"
        return "supported" if results and all(results) else "not decided"

    return {"key": key,
            "paper_split": judge({"decorrelation": "positive", "unevenness": "positive"}),
            "subspace_only": judge({"decorrelation": "equivalent", "unevenness": "equivalent",
                                    "subspace": "positive"})}


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


CHECK_FIELDS = ("aux_share", "aux_energy", "aux_total_correlation", "aux_coding_gain",
                "aux_topk_share_l2", "y_total_correlation", "y_coding_gain")
"""The manipulation checks' numbers summarised per cell."""


def check_summary(checks: Mapping[tuple[str, int], Mapping | None], seeds: Sequence[int]) -> dict:
    """The step-0 manipulation checks per cell (mean and s.d. over seeds of :data:`CHECK_FIELDS`)
    and, per seed, the spread across the cells (``max / min - 1``) of the energy the shortcut
    delivers on the held-out crops (``energy_spread``) and of its share of ``y``'s energy
    (``share_spread``)."""
    cells = []
    for cell in CELLS:
        per_seed = [checks.get((variant_of(cell), s)) for s in seeds]
        present = [c for c in per_seed if c]
        if not present:
            continue
        row: dict = {"cell": cell, "variant": variant_of(cell), "seeds": len(present),
                     "decorrelated": CELL_LABELS[cell][0], "uneven": CELL_LABELS[cell][1]}
        for field in CHECK_FIELDS:
            row[f"{field}_mean"], row[f"{field}_std"] = _mean_std([c.get(field) for c in present])
        cells.append(row)
    spreads: dict[str, dict[str, float | None]] = {"energy_spread": {}, "share_spread": {}}
    for s in seeds:
        for out_key, field in (("energy_spread", "aux_energy"), ("share_spread", "aux_share")):
            vals = [(checks.get((variant_of(c), s)) or {}).get(field) for c in CELLS]
            vals = [v for v in vals if v is not None]
            spread = max(vals) / min(vals) - 1 if len(vals) > 1 and min(vals) > 0 else None
            spreads[out_key][f"seed{s}"] = spread
    return {"cells": cells, **spreads}


CAPTURE_CHECK_FIELDS = ("aux_share", "aux_total_correlation", "aux_coding_gain", "y_total_correlation",
                        "y_coding_gain")
"""The manipulation checks followed through training, from the captures' energy records."""


def capture_checks(records: Sequence[Mapping]) -> dict[int, dict[str, float | None]]:
    """The manipulation checks at each capture of one cell, from its ``energy.jsonl`` records:
    ``{step: {field: value}}`` over :data:`CAPTURE_CHECK_FIELDS`, with ``aux_*`` read off the
    shortcut at the last merge (the role ``"aux"`` record of the largest ``merge``:
    ``aux_energy_share``, ``total_correlation``, ``coding_gain`` as the capture recorded them,
    bias-corrected at its positions) and ``y_*`` off ``y``'s record. Steps without an aux record
    (a cell without AuxT) are left out.

    >>> recs = [{"step": 0, "layer": "g_a.aux4", "role": "aux", "merge": 4, "aux_energy_share": 0.9,
    ...          "total_correlation": 0.1, "coding_gain": 15.0},
    ...         {"step": 0, "layer": "y", "role": "y", "total_correlation": 60.0, "coding_gain": 1.2}]
    >>> capture_checks(recs)[0]["aux_share"], capture_checks(recs)[0]["y_coding_gain"]
    (0.9, 1.2)
    """
    last = max((r.get("merge") or 0 for r in records if r.get("role") == "aux"), default=None)
    if last is None:
        return {}
    out: dict[int, dict[str, float | None]] = {}
    for r in records:
        if r.get("role") == "aux" and r.get("merge") == last:
            row = out.setdefault(int(r["step"]), dict.fromkeys(CAPTURE_CHECK_FIELDS))
            row.update(aux_share=r.get("aux_energy_share"), aux_total_correlation=r.get("total_correlation"),
                       aux_coding_gain=r.get("coding_gain"))
    for r in records:
        if r.get("role") == "y" and int(r["step"]) in out:
            out[int(r["step"])].update(y_total_correlation=r.get("total_correlation"),
                                       y_coding_gain=r.get("coding_gain"))
    return out


def capture_check_summary(per_cell: Mapping[tuple[str, int], Mapping[int, Mapping]],
                          seeds: Sequence[int]) -> list[dict]:
    """Per cell and capture step, the mean and s.d. over seeds of :func:`capture_checks`' fields
    (``seeds``: how many seeds had that capture)."""
    out = []
    for cell in CELLS:
        steps = sorted({t for s in seeds for t in per_cell.get((variant_of(cell), s), {})})
        for t in steps:
            present = [per_cell[variant_of(cell), s][t] for s in seeds
                       if t in per_cell.get((variant_of(cell), s), {})]
            row: dict = {"cell": cell, "step": t, "seeds": len(present)}
            for field in CAPTURE_CHECK_FIELDS:
                row[f"{field}_mean"], row[f"{field}_std"] = _mean_std([c.get(field) for c in present])
            out.append(row)
    return out


def split_summary(rows: Sequence[Mapping], seeds: Sequence[int],
                  checks: Mapping[tuple[str, int], Mapping | None] | None = None,
                  captured: Mapping[tuple[str, int], Mapping[int, Mapping]] | None = None) -> dict:
    """The ``split`` section of an ablation summary: :func:`estimands` of the per-cell ``rows``,
    the headline sentence of each estimand on :data:`PRIMARY_KEY` (``verdicts``), :func:`reading`,
    :func:`check_summary` of the cells' step-0 ``checks`` ((variant, seed) -> the ``split_checks``
    of its ``config.json``) and :func:`capture_check_summary` of the checks at each capture
    (``captured``: (variant, seed) -> :func:`capture_checks` of its energy records)."""
    entries = estimands(rows, seeds)
    return {"cells": {c: variant_of(c) for c in CELLS}, "keys": [*SPEEDUP_KEYS, LOSS_KEY],
            "primary": PRIMARY_KEY,
            "margins": {"log_speedup": SPEEDUP_MARGIN, "log_loss": LOSS_MARGIN},
            "gain_cap": GAIN_CAP, "fit_crops": FIT_CROPS, "check_crops": CHECK_CROPS,
            "estimands": entries,
            "verdicts": {e["estimand"]: e["sentence"] for e in entries if e["key"] == PRIMARY_KEY},
            "reading": reading(entries), "checks": check_summary(checks or {}, seeds),
            "capture_checks": capture_check_summary(captured or {}, seeds)}


def _interval(e: Mapping) -> str:
    if e["ratio"] is None:
        return f"— ({e['bounded']} bounded)" if e.get("bounded") else "—"
    text = f"×{e['ratio']:.3f}"
    if e["ratio_low"] is None:
        return f"{text} ({e['n']} seed{'s' if e['n'] != 1 else ''})"
    return f"{text} [{e['ratio_low']:.3f}, {e['ratio_high']:.3f}] {e['verdict']}"


def _number(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def format_split(section: Mapping) -> str:
    """The ``split`` section as Markdown: the estimand table, the verdict sentences, the reading
    and the manipulation checks."""
    keys = list(section["keys"])
    lines = ["## Split: decorrelation × unevenness at a fixed subspace and energy", "",
             "Per-seed contrasts of the cells' log speed-ups against the baseline (and of the log final "
             "test loss), exponentiated: mean with its 95 % Student-t interval over seeds and the verdict "
             f"(equivalence margins ×{math.exp(section['margins']['log_speedup']):.2f} on a speed-up, "
             f"×{math.exp(section['margins']['log_loss']):.2f} on the loss). Above ×1 a speed-up "
             "contrast favours the first side; a loss contrast above ×1 means a higher loss on it.", "",
             "| estimand | " + " | ".join(KEY_TITLES.get(k, k) for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    table: dict = {}
    for e in section["estimands"]:
        table.setdefault((e["estimand"], e["formula"]), {})[e["key"]] = e
    for (name, formula), entries in table.items():
        lines.append(f"| {name} {formula} | "
                     + " | ".join(_interval(entries[k]) if k in entries else "—" for k in keys) + " |")
    lines += ["", f"**Verdicts** (on {KEY_TITLES.get(section['primary'], section['primary'])}):", ""]
    lines += [f"- {sentence}." for sentence in section["verdicts"].values()]
    r = section["reading"]
    lines += ["", f"**Reading** (on {KEY_TITLES.get(r['key'], r['key'])}): the paper's split (both main "
              f"effects > 0): {r['paper_split']}; only the delivered subspace matters (main effects "
              f"equivalent to 0, subspace > 0): {r['subspace_only']}.", ""]
    checks = section["checks"]
    lines += ["### Manipulation checks at step 0", "",
              f"The shortcut's output at the last merge on {section['check_crops']} held-out training crops "
              f"(U, Λ fitted on {section['fit_crops']}; each component's gain capped to "
              f"[1/{section['gain_cap']:g}, {section['gain_cap']:g}] of what the KLT delivers, before the "
              "energy-matching scalar), mean over seeds.", "",
              "| cell | decorrelated | uneven | share of y's energy | energy / position | TC nats | "
              "coding gain | top-k L2 share | y TC nats | y coding gain |", "|---" * 10 + "|"]
    for c in checks["cells"]:
        numbers = [_number(c["aux_share_mean"]), _number(c["aux_energy_mean"]),
                   _number(c["aux_total_correlation_mean"], 2), _number(c["aux_coding_gain_mean"], 2),
                   _number(c["aux_topk_share_l2_mean"]), _number(c["y_total_correlation_mean"], 2),
                   _number(c["y_coding_gain_mean"], 2)]
        lines.append(f"| {c['cell']} | {c['decorrelated']} | {c['uneven']} | " + " | ".join(numbers) + " |")
    spread = [v for v in checks["energy_spread"].values() if v is not None]
    share_spread = [v for v in checks["share_spread"].values() if v is not None]
    if spread:
        lines += ["", f"Delivered energy across A–F on the held-out crops, largest over smallest − 1: at "
                  f"most {100 * max(spread):.2f} % over the seeds"
                  + (f"; of the share of y's energy, {100 * max(share_spread):.2f} %" if share_spread else "")
                  + "."]
    lines += _capture_check_lines(section.get("capture_checks") or [])
    return "\n".join(lines) + "\n"


CAPTURE_CHECK_STAGES = (0.0, 0.25, 0.5, 1.0)
"""The shares of the budget whose nearest captures :func:`format_split` shows (the JSON has all)."""


def _capture_check_lines(rows: Sequence[Mapping]) -> list[str]:
    if not rows:
        return []
    lines = ["", "### Manipulation checks during training", "",
             "The shortcut at the last merge (g_a.aux<k>) and y at the captures nearest 0, 25, 50 and "
             "100 % of the budget, on the probe set, mean over seeds (the captures' bias-corrected "
             "records; every capture is in summary.json).", "",
             "| cell | step | seeds | aux share of y's energy | aux TC nats | aux coding gain | "
             "y TC nats | y coding gain |", "|---" * 8 + "|"]
    for cell in CELLS:
        mine = [r for r in rows if r["cell"] == cell]
        if not mine:
            continue
        last = max(r["step"] for r in mine)
        shown = sorted({min(mine, key=lambda r, f=f: abs(r["step"] - f * last))["step"]
                        for f in CAPTURE_CHECK_STAGES})
        for r in (r for r in mine if r["step"] in shown):
            lines.append(f"| {cell} | {r['step']} | {r['seeds']} | " + " | ".join(
                [_number(r["aux_share_mean"]), _number(r["aux_total_correlation_mean"], 2),
                 _number(r["aux_coding_gain_mean"], 2), _number(r["y_total_correlation_mean"], 2),
                 _number(r["y_coding_gain_mean"], 2)]) + " |")
    return lines

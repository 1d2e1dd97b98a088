"""Energy statistics of latents: the two-part split of energy compaction, streamed.

A latent ``y`` of shape ``(B, C, H, W)`` is read as ``N = B*H*W`` samples of a C-vector (an
``(N, C)`` matrix is accepted as N samples). Notation: mean ``mu``, covariance ``S`` (C x C),
channel variances ``s_c^2 = S_cc``, channel energies ``E_c = E[y_c^2]`` (second moment: a mean is
energy too), eigenvalues ``l_i`` of ``S``.

Energy compaction splits exactly into two parts (classical transform coding: N. S. Jayant and
P. Noll, *Digital Coding of Waveforms*, Prentice-Hall 1984, ch. 12)::

    log klt_coding_gain = log coding_gain + log decorrelation_gain
                          (total)            (energy modulation)  (decorrelation)

**Singular covariances.** Eigenvalues and channel variances at or below ``RANK_RTOL * max``
(``1e-10``) count as zero; :func:`numerical_rank` counts the others. A statistic that is infinite
for a singular Gaussian is ``None`` (JSON ``null``), never a value made by a floor: the KLT gain,
decorrelation gain and total correlation when the rank is below C, the coding gain when a channel
has no variance. The others are finite and exact on the non-degenerate subspace: effective rank
over the non-zero eigenvalues, the off-diagonal ratio over the channels with variance. A zero
covariance gives ``None`` for all of them. (:func:`spectrum` keeps a floor for log-scale plots.)

**Sample size.** With the sample count ``n`` the log-determinant statistics carry the Gaussian
finite-sample bias correction of :func:`total_correlation` (i.i.d. assumption; a floor on the bias
of correlated latent positions); without, they are plug-in values. :func:`neighbourhood_total_correlation`
(and the streaming :class:`NeighbourhoodTotalCorrelation`) splits the total correlation of ``k x k``
neighbourhoods into its across-channel and across-position parts; :func:`rate_shares` gives each
channel's share of the bits from an entropy model's likelihoods (modulation against the quantiser).

**Intervals.** ``ChannelStats(..., per_image=True)`` (and :class:`NeighbourhoodTotalCorrelation`)
keep the float64 sums of every image apart; :func:`bootstrap_intervals` resamples whole images
and evaluates the batched forms of the statistics (:func:`channel_statistics_batched`,
:func:`neighbourhood_statistics_batched`) on all replicates at once.

**Energy.** :func:`channel_energies` gives each channel's mean square and L2 norm over positions
(the paper's Fig. 1 energy), with and without the channel mean; :func:`energy_shares` their top-k
shares and :func:`mean_energy_fraction`; ``SubbandEnergy(channels=C)`` adds channel-centred band
shares.

Streaming: :class:`ChannelStats`, :class:`SubbandEnergy`, :class:`SpatialCorrelation` and
:class:`AuxEnergyShare` are ``torchmetrics.Metric`` s in the torchmetrics shape: a functional layer
of torch functions (``_<name>_update`` returns the float64 sums of one batch, ``_<name>_compute``
turns sums into values) and thin classes over it whose states are those sums, reduced with
``dist_reduce_fx="sum"``, so ``update`` / ``compute`` / ``reset`` / ``merge`` and the all-reduce
across ``torch.distributed`` processes are exact sums. ``compute()`` returns a dict of float64
tensors. ``update`` never synchronises with the host (no ``.item()``, no branch on tensor values),
so it can run in forward hooks during GPU training; call ``update``, not the module's ``forward``
(which computes a per-batch value). States stay float64 on the data's device whatever a parent
module's casts (``.to(torch.float32)``, ``.half()``, ``set_dtype``): only devices are applied to them.

**Non-finite input and no data (one rule for every metric).** A *sample* is what a metric reads as
one unit: a position's C-vector for :class:`ChannelStats`, :class:`SpatialCorrelation` (and every
lag pair with such an end) and :class:`AuxEnergyShare` (either tensor), a whole image for
:class:`SubbandEnergy` (a DWT mixes positions). A sample holding any NaN or inf is skipped and
counted in the state ``nonfinite``; ``count`` counts the samples used. ``compute()`` returns both
counts beside its values and raises a one-line ``ValueError`` naming the metric when there is no
sample to compute on: no update at all, or every sample non-finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.special import digamma
from torch import Tensor
from torchmetrics import Metric

from energylab.wavelets import dwt2

__all__ = [
    "EIGENVALUE_FLOOR",
    "ENERGY_KINDS",
    "RANK_RTOL",
    "ACTIVE_SHARE_FRACTION",
    "QUANTISATION_STEP",
    "AuxEnergyShare",
    "ChannelStats",
    "NeighbourhoodTotalCorrelation",
    "RateShare",
    "SpatialCorrelation",
    "Spectrum",
    "SubbandEnergy",
    "active_channels",
    "aux_energy_share",
    "bootstrap_intervals",
    "bootstrap_weights",
    "channel_energies",
    "channel_statistics_batched",
    "channel_stats",
    "coding_gain",
    "correlation_matrix",
    "decorrelation_gain",
    "effective_rank",
    "energy_compaction_curve",
    "energy_shares",
    "energy_statistics",
    "floored_eigenvalues",
    "klt_coding_gain",
    "mean_energy_fraction",
    "neighbourhood_statistics_batched",
    "modulation_statistics",
    "neighbourhood_total_correlation",
    "numerical_rank",
    "offdiag_energy_ratio",
    "offdiag_energy_ratio_cov",
    "percentile_interval",
    "psnr",
    "rate_share_am_gm",
    "rate_share_entropy",
    "rate_shares",
    "spatial_correlation",
    "spectrum",
    "std_in_steps",
    "subband_energy",
    "to_db",
    "topk_energy_share",
    "total_correlation",
]

EIGENVALUE_FLOOR = 1e-12
"""For plots (:func:`spectrum`) only: eigenvalues and variances below this fraction of the largest
eigenvalue are raised to it."""

RANK_RTOL = 1e-10
"""Eigenvalues (and channel variances) at or below this fraction of the largest count as zero."""

_CHUNK_ELEMENTS = {"cpu": 2**20}
"""float64 elements cast per accumulation step, by device type: 8 MiB on the CPU, where the cast
then stays in cache beside the GEMM; 256 MiB elsewhere (fewer, larger kernels)."""
_DEFAULT_CHUNK_ELEMENTS = 2**25

CovLike = Tensor | np.ndarray


class Spectrum(NamedTuple):
    """Floored second-order summary of a covariance, computed once by :func:`spectrum`.

    Attributes:
        covariance: ``(C, C)`` float64, symmetrised input.
        variances: ``(C,)`` channel variances ``s_c^2``, floored.
        eigenvalues: ``(C,)`` eigenvalues ``l_i`` in descending order, floored.
        floored: number of eigenvalues that were below the floor.
    """

    covariance: np.ndarray
    variances: np.ndarray
    eigenvalues: np.ndarray
    floored: int


def spectrum(cov: CovLike | Spectrum) -> Spectrum:
    """Variances and eigenvalues of ``cov`` with the floor of the module docstring applied.

    Args:
        cov: ``(C, C)`` covariance, torch tensor (any device/dtype) or numpy array; it is
            symmetrised as ``(S + S^T) / 2``. A :class:`Spectrum` is returned unchanged.

    Returns:
        The :class:`Spectrum`; floor ``EIGENVALUE_FLOOR * l_max`` (1 for a zero covariance).

    Raises:
        ValueError: ``cov`` is not a non-empty square matrix or holds NaN or inf.

    >>> spectrum(np.array([[4.0, 2.0], [2.0, 9.0]])).eigenvalues.round(4).tolist()
    [9.7016, 3.2984]
    """
    if isinstance(cov, Spectrum):
        return cov
    if isinstance(cov, Tensor):
        cov = cov.detach().to("cpu", torch.float64).numpy()
    s = np.asarray(cov, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"expected a non-empty square (C, C) covariance, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("covariance holds NaN or inf")
    s = 0.5 * (s + s.T)
    lam = np.linalg.eigvalsh(s)[::-1]
    if lam[0] <= 0:  # zero covariance: treated as white, see the module docstring
        return Spectrum(s, np.ones(len(lam)), np.ones(len(lam)), len(lam))
    floor = EIGENVALUE_FLOOR * lam[0]
    return Spectrum(
        s, np.maximum(np.diag(s), floor), np.maximum(lam, floor), int((lam < floor).sum())
    )


def floored_eigenvalues(cov: CovLike | Spectrum) -> int:
    """Number of eigenvalues of ``cov`` raised to the floor (``< 1e-12 * l_max``; all, if zero).

    >>> floored_eigenvalues(np.diag([1.0, 0.0]))
    1
    """
    return spectrum(cov).floored


def _covariance(cov: CovLike | Spectrum) -> np.ndarray:
    """``cov`` as a symmetrised float64 numpy ``(C, C)`` matrix (validated as :func:`spectrum`)."""
    if isinstance(cov, Spectrum):
        return cov.covariance
    if isinstance(cov, _Cov):
        return cov.s
    if isinstance(cov, Tensor):
        cov = cov.detach().to("cpu", torch.float64).numpy()
    s = np.asarray(cov, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"expected a non-empty square (C, C) covariance, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("covariance holds NaN or inf")
    return 0.5 * (s + s.T)


class _Cov(NamedTuple):
    """A validated covariance and its unfloored eigenvalues (descending), computed once."""

    s: np.ndarray
    lam: np.ndarray


def _cov(cov: CovLike | Spectrum | _Cov) -> _Cov:
    if isinstance(cov, _Cov):
        return cov
    s = _covariance(cov)
    return _Cov(s, np.linalg.eigvalsh(s)[::-1])


def _rank(c: _Cov, rtol: float) -> int:
    return int((c.lam > rtol * c.lam[0]).sum()) if c.lam[0] > 0 else 0


def numerical_rank(cov: CovLike | Spectrum, rtol: float = RANK_RTOL) -> int:
    """Number of eigenvalues of ``cov`` above ``rtol * l_max`` (0 for a zero covariance).

    The default ``rtol = 1e-10`` lies four orders above the rounding level of covariances of
    float32 latents (``(2^-23)^2 ~ 1e-14`` of ``l_max``) and far below any real spread of energy.

    >>> numerical_rank(np.array([[1.0, 1.0], [1.0, 1.0]])), numerical_rank(np.eye(3))
    (1, 3)
    """
    return _rank(_cov(cov), rtol)


def _log_det_bias(dim: int, n: int) -> float:
    """``E[sum_c log s_hat_c^2 - log det S_hat] - (sum_c log s_c^2 - log det S)`` for the unbiased
    sample covariance of ``n`` i.i.d. Gaussian samples of dimension ``dim`` (statistics-notes.md):
    ``dim * psi((n-1)/2) - sum_{i=1..dim} psi((n-i)/2)``, twice the bias of the total correlation."""
    if n <= dim:
        raise ValueError(f"the bias correction needs more samples than dimensions, got n={n}, C={dim}")
    return float(dim * digamma((n - 1) / 2) - digamma((n - np.arange(1, dim + 1)) / 2).sum())


def _variances_bias(n: int) -> float:
    """``E[log s_hat^2] - log s^2 = psi((n-1)/2) + log(2/(n-1))`` (statistics-notes.md)."""
    return float(digamma((n - 1) / 2) + math.log(2 / (n - 1)))


def offdiag_energy_ratio(cov: CovLike | Spectrum, rtol: float = RANK_RTOL) -> float | None:
    """Share of the correlation matrix's squared entries off the diagonal, in ``[0, 1)``.

    ``sum_{i != j} R_ij^2 / sum_{i,j} R_ij^2`` with ``R = D^-1/2 S D^-1/2`` over the *live*
    channels (variance above ``rtol`` times the largest): scale-free (rescaling channels leaves it
    unchanged); 0 when the channels are uncorrelated. ``None`` when no channel has variance (zero
    covariance). :func:`offdiag_energy_ratio_cov` is the same ratio on ``S`` itself.

    >>> round(offdiag_energy_ratio(np.array([[4.0, 2.0], [2.0, 9.0]])), 4)  # R_01 = 1/3: (2/9) / (2 + 2/9)
    0.1
    """
    s = _covariance(cov)
    var = np.diag(s)
    live = var > rtol * var.max() if var.max() > 0 else np.zeros(len(var), bool)
    if not live.any():
        return None
    d = 1 / np.sqrt(var[live])
    r = s[np.ix_(live, live)] * np.outer(d, d)
    off = float(np.square(r[~np.eye(len(r), dtype=bool)]).sum())
    return off / (off + float(np.square(np.diag(r)).sum()))


def offdiag_energy_ratio_cov(cov: CovLike | Spectrum) -> float:
    """Share of the **covariance's** squared entries off the diagonal, in ``[0, 1]``: not scale-free.

    ``sum_{i != j} S_ij^2 / sum_{i,j} S_ij^2``: 0 when the channels are uncorrelated; 0 for a zero
    covariance. The scale-free ratio is :func:`offdiag_energy_ratio`.

    >>> round(offdiag_energy_ratio_cov(np.array([[4.0, 2.0], [2.0, 9.0]])), 4)  # 8 / (16 + 81 + 8)
    0.0762
    """
    s = _covariance(cov)
    total = float(np.square(s).sum())
    return 0.0 if total == 0.0 else float(np.square(s - np.diag(np.diag(s))).sum() / total)


def coding_gain(
    cov: CovLike | Spectrum, n: int | None = None, rtol: float = RANK_RTOL
) -> float | None:
    """Transform coding gain of the channels as they are (Jayant & Noll 1984, ch. 12), a ratio.

    ``mean_c(s_c^2) / (prod_c s_c^2)^(1/C)`` (arithmetic over geometric mean of the channel
    variances) ``>= 1``: it grows as energy is spread unevenly across channels (energy modulation);
    1 for equal variances. With the sample count ``n``, ``log`` of the geometric mean is corrected
    by its Gaussian finite-sample bias ``psi((n-1)/2) + log(2/(n-1))`` (as for
    :func:`total_correlation`), so that ``log klt_coding_gain = log coding_gain +
    log decorrelation_gain`` holds for the corrected values too. ``None`` (infinite) when a channel
    has no variance (below ``rtol`` times the largest).

    >>> round(coding_gain(np.array([[4.0, 2.0], [2.0, 9.0]])), 4)  # AM 6.5 / GM 6
    1.0833
    """
    var = np.diag(_covariance(cov))
    if var.max() <= 0 or (var <= rtol * var.max()).any():
        return None
    log_gm = np.log(var).mean() - (0.0 if n is None else _variances_bias(n))
    return float(var.mean() / np.exp(log_gm))


def klt_coding_gain(
    cov: CovLike | Spectrum, n: int | None = None, rtol: float = RANK_RTOL
) -> float | None:
    """Coding gain an ideal decorrelating rotation (KLT) would reach (Jayant & Noll 1984, ch. 12).

    ``mean_i(l_i) / (prod_i l_i)^(1/C) = mean_i(l_i) / det(S)^(1/C)`` ``>= 1``; invariant under any
    orthogonal rotation of the channels. With the sample count ``n``, ``log det S`` is corrected by
    its Gaussian finite-sample bias (Goodman 1963; Cai, Liang & Zhou 2015):
    ``E[log det S_hat] = log det S + sum_{i=1..C} psi((n-i)/2) + C log(2/(n-1))``. ``None``
    (infinite) when ``numerical_rank(cov, rtol) < C``.

    >>> round(klt_coding_gain(np.array([[4.0, 2.0], [2.0, 9.0]])), 4)  # AM 6.5 / det^(1/2) = 32^(1/2)
    1.149
    """
    cv = _cov(cov)
    c = len(cv.s)
    if _rank(cv, rtol) < c:
        return None
    log_det = np.log(cv.lam).sum()
    if n is not None:
        log_det -= c * _variances_bias(n) - _log_det_bias(c, n)  # E[log det S_hat] - log det S
    return float(np.trace(cv.s) / c / np.exp(log_det / c))


def total_correlation(
    cov: CovLike | Spectrum, n: int | None = None, rtol: float = RANK_RTOL
) -> float | None:
    """Total correlation of a Gaussian with covariance ``S``, in nats (Watanabe 1960).

    ``1/2 (sum_c log s_c^2 - log det S) = -1/2 log det R`` = ``sum_c h(y_c) - h(y)`` for a Gaussian
    (Cover & Thomas, *Elements of Information Theory*, 2nd ed., eq. 8.64 for ``h``); 0 for
    uncorrelated channels; scale-free. Without ``n``: the plug-in value of ``S`` as given. With the
    count ``n`` of i.i.d. samples behind an unbiased sample covariance: minus its Gaussian
    finite-sample bias ``1/2 [C psi((n-1)/2) - sum_{i=1..C} psi((n-i)/2)]`` (``~ C(C+1) / 4n``),
    from ``E[log det S_hat]`` and ``E[log s_hat_c^2]`` (N. R. Goodman, *Ann. Math. Stat.* 34, 1963;
    T. T. Cai, T. Liang and H. H. Zhou, *J. Multivariate Anal.* 137, 2015). Latent positions are
    not independent, so the correction is a floor on the bias, not all of it. ``None`` (infinite)
    when ``numerical_rank(cov, rtol) < C`` (a singular Gaussian); never a floor-made value.

    Raises:
        ValueError: ``n <= C`` (and as :func:`spectrum` for a bad ``cov``).

    >>> round(total_correlation(np.array([[4.0, 2.0], [2.0, 9.0]])), 4)  # 1/2 log(4 * 9 / 32)
    0.0589
    >>> round(total_correlation(np.eye(2), n=101), 4)  # an identity read as a sample: below 0
    -0.0051
    """
    cv = _cov(cov)
    c = len(cv.s)
    if _rank(cv, rtol) < c:
        return None
    tc = 0.5 * (np.log(np.diag(cv.s)).sum() - np.log(cv.lam).sum())
    return float(tc if n is None else tc - 0.5 * _log_det_bias(c, n))


def decorrelation_gain(
    cov: CovLike | Spectrum, n: int | None = None, rtol: float = RANK_RTOL
) -> float | None:
    """Coding gain still available from decorrelation, a ratio: ``exp(2 TC / C)``.

    ``(prod_c s_c^2 / det S)^(1/C) = det(R)^(-1/C) = klt_coding_gain / coding_gain`` ``>= 1``
    (Hadamard's inequality), the exponential form of :func:`total_correlation` (one number, not a
    second piece of evidence); ``n`` and ``None`` as there. 1 for uncorrelated channels.

    >>> round(decorrelation_gain(np.array([[4.0, 2.0], [2.0, 9.0]])), 4)  # (4 * 9 / 32)^(1/2)
    1.0607
    """
    cv = _cov(cov)
    tc = total_correlation(cv, n, rtol)
    return None if tc is None else float(math.exp(2 * tc / len(cv.s)))


def effective_rank(cov: CovLike | Spectrum) -> float | None:
    """Effective rank (Roy & Vetterli, EUSIPCO 2007), in ``[1, C]``.

    ``exp(-sum_i p_i log p_i)`` with ``p_i = l_i / sum_j l_j`` (``0 log 0 = 0``): the exponential of
    the entropy of the normalised spectrum, exact for singular covariances (zero eigenvalues add
    nothing: it is the effective rank on the non-degenerate subspace). ``None`` for a zero
    covariance.

    >>> round(effective_rank(np.eye(3)), 4), round(effective_rank(np.diag([1.0, 0.0, 0.0])), 4)
    (3.0, 1.0)
    """
    lam = np.clip(_cov(cov).lam, 0.0, None)
    if lam[0] <= 0:
        return None
    p = lam[lam > 0] / lam.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def correlation_matrix(cov: CovLike | Spectrum) -> np.ndarray:
    """Correlation matrix ``R = D^-1/2 S D^-1/2`` with ``D = diag(S)``, ``(C, C)`` float64 in ``[-1, 1]``.

    Channel variances below the floor of the module docstring are raised to it, so a dead channel
    gives a zero row and column (and 1 on the diagonal only where it has variance).

    >>> correlation_matrix(np.array([[4.0, 2.0], [2.0, 9.0]])).round(4).tolist()
    [[1.0, 0.3333], [0.3333, 1.0]]
    """
    sp = spectrum(cov)
    std = np.sqrt(sp.variances)
    return np.clip(sp.covariance / np.outer(std, std), -1.0, 1.0)


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(peak^2 / mse)``; ``inf`` for ``mse == 0``.

    ``peak`` is the largest signal value (1 for images in ``[0, 1]``, 255 for 8-bit values).

    Raises:
        ValueError: ``mse < 0`` or ``peak <= 0``.

    >>> round(psnr(0.001), 4)
    30.0
    """
    if mse < 0 or peak <= 0:
        raise ValueError(f"psnr needs mse >= 0 and peak > 0, got mse={mse}, peak={peak}")
    return math.inf if mse == 0 else to_db(peak**2 / mse)


def to_db(ratio: float) -> float:
    """``10 log10(ratio)``, a gain ratio in decibels. Raises ValueError for ``ratio <= 0``.

    >>> to_db(100.0)
    20.0
    """
    if ratio <= 0:
        raise ValueError(f"a ratio in dB must be positive, got {ratio}")
    return 10.0 * math.log10(ratio)


def energy_compaction_curve(energies: CovLike | Sequence[float]) -> np.ndarray:
    """Cumulative share of the energy in the k most energetic channels, k = 1..C.

    ``curve[k-1] = sum_{i<=k} E_(i) / sum_i E_i`` with the energies ``E_(1) >= E_(2) >= ...`` sorted
    descending; ``(C,)`` float64, non-decreasing, ending at 1. Zero total energy is treated as white
    (equal energies): ``curve[k-1] = k / C``.

    Raises:
        ValueError: ``energies`` is not a non-empty 1-D array of finite non-negative numbers.

    >>> energy_compaction_curve([1.0, 3.0]).tolist()
    [0.75, 1.0]
    """
    if isinstance(energies, Tensor):
        energies = energies.detach().to("cpu", torch.float64).numpy()
    e = np.asarray(energies, dtype=np.float64)
    if e.ndim != 1 or e.size == 0 or not np.isfinite(e).all() or (e < 0).any():
        raise ValueError("energies must be a non-empty 1-D array of finite non-negative numbers")
    if e.sum() == 0:
        e = np.ones_like(e)
    curve = np.cumsum(np.sort(e)[::-1])
    return curve / curve[-1]


def topk_energy_share(energies: CovLike | Sequence[float], k: int) -> float:
    """Share of the energy in the ``k`` most energetic channels: ``energy_compaction_curve[k-1]``.

    Raises:
        ValueError: ``k`` outside ``1..C`` (and as :func:`energy_compaction_curve`).

    >>> topk_energy_share([1.0, 3.0, 0.0, 4.0], 2)  # (4 + 3) / 8
    0.875
    """
    curve = energy_compaction_curve(energies)
    if not 1 <= k <= len(curve):
        raise ValueError(f"k must lie in 1..{len(curve)}, got {k}")
    return float(curve[k - 1])


def energy_statistics(
    cov: CovLike | Spectrum,
    energies: CovLike | Sequence[float],
    k: int | None = None,
    n: int | None = None,
) -> dict[str, float | int | None]:
    """All covariance metrics of this module as a flat dict of numbers, ready for a JSON line.

    Args:
        cov: ``(C, C)`` covariance (or its :class:`Spectrum`).
        energies: ``(C,)`` channel energies ``E[y_c^2]``.
        k: channels for ``topk_energy_share``; default ``max(1, round(C / 8))``.
        n: sample count behind ``cov``: the gains and ``total_correlation`` are bias-corrected
            with it (see :func:`total_correlation`); None: plug-in values.

    Returns:
        Keys equal to the function names: ``offdiag_energy_ratio`` (on the correlation matrix),
        ``coding_gain``, ``klt_coding_gain``, ``decorrelation_gain`` (ratios, not dB),
        ``total_correlation`` (nats), ``total_correlation_plugin`` (nats, uncorrected),
        ``effective_rank``, ``topk_energy_share``, ``topk_k`` (int) and ``numerical_rank`` (int).
        A statistic that is infinite or undefined for ``cov`` (see the module docstring) is None.

    Raises:
        ValueError: as the individual functions.

    >>> out = energy_statistics(np.array([[4.0, 2.0], [2.0, 9.0]]), [4.0, 9.0])
    >>> out["topk_k"], round(out["topk_energy_share"], 4), out["numerical_rank"]  # 9 / 13
    (1, 0.6923, 2)
    >>> energy_statistics(np.ones((2, 2)), [1.0, 1.0])["total_correlation"] is None  # rank 1
    True
    """
    s = _cov(cov)
    k = max(1, round(len(s.s) / 8)) if k is None else k
    return {
        "offdiag_energy_ratio": offdiag_energy_ratio(s),
        "coding_gain": coding_gain(s, n),
        "klt_coding_gain": klt_coding_gain(s, n),
        "decorrelation_gain": decorrelation_gain(s, n),
        "total_correlation": total_correlation(s, n),
        "total_correlation_plugin": total_correlation(s),
        "effective_rank": effective_rank(s),
        "topk_energy_share": topk_energy_share(energies, k),
        "topk_k": k,
        "numerical_rank": numerical_rank(s),
    }


ENERGY_KINDS = ("l2", "l2_centred", "ms", "ms_centred")
"""The four per-channel energies of :func:`channel_energies`, in that order."""


def _numpy64(x: CovLike | Sequence[float] | float) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def channel_energies(
    mean: CovLike | Sequence[float], energies: CovLike | Sequence[float], count: float
) -> dict[str, np.ndarray]:
    """Per-channel energy of a latent in the four senses of :data:`ENERGY_KINDS`, ``(C,)`` float64.

    From the channel means ``mu_c``, the second moments ``E[y_c^2]`` and the count ``n`` of
    positions (the ``mean``, ``energies`` and ``count`` of :class:`ChannelStats`)::

        ms         = E[y_c^2]                      mean square, channel means in
        ms_centred = E[y_c^2] - mu_c^2             mean square with the channel mean removed
        l2         = ||y_c||_2 = sqrt(n ms)         L2 norm over positions (not squared)
        l2_centred = ||y_c - mu_c||_2 = sqrt(n ms_centred)

    ``l2`` is the energy of the paper's Fig. 1 (Li et al., ICLR 2025: channels ordered by their L2
    norm); ``E[y^2] = mu^2 + s^2`` (statistics-notes.md) says how much of ``ms`` is means.
    ``ms_centred`` is clipped at 0 against rounding.

    Raises:
        ValueError: ``mean`` and ``energies`` are not 1-D of one length, or ``count <= 0``.

    >>> out = channel_energies([1.0, 0.0], [2.0, 4.0], count=4)
    >>> {k: v.tolist() for k, v in out.items()}
    {'l2': [2.8284271247461903, 4.0], 'l2_centred': [2.0, 4.0], 'ms': [2.0, 4.0], 'ms_centred': [1.0, 4.0]}
    """
    mu, ms = _numpy64(mean), _numpy64(energies)
    if mu.ndim != 1 or mu.shape != ms.shape or count <= 0:
        raise ValueError(f"channel_energies: expected (C,) means and energies and count > 0, got "
                         f"{mu.shape}, {ms.shape}, {count}")
    centred = np.clip(ms - mu**2, 0.0, None)
    return {"l2": np.sqrt(count * ms), "l2_centred": np.sqrt(count * centred), "ms": ms,
            "ms_centred": centred}


def mean_energy_fraction(
    mean: CovLike | Sequence[float], energies: CovLike | Sequence[float]
) -> float | None:
    """Share of the second moment held by the channel means: ``sum_c mu_c^2 / sum_c E[y_c^2]``.

    In ``[0, 1]``; 1 for constant channels, 0 for zero-mean ones; ``None`` for zero energy.

    >>> mean_energy_fraction([1.0, 0.0], [2.0, 2.0])
    0.25
    """
    mu, ms = _numpy64(mean), _numpy64(energies)
    total = float(ms.sum())
    return None if total <= 0 else float(np.square(mu).sum() / total)


def energy_shares(
    mean: CovLike | Sequence[float], energies: CovLike | Sequence[float], count: float, k: int | None = None
) -> dict[str, float | int | None]:
    """Top-k shares of the four energies of :func:`channel_energies` and the means' share.

    Returns:
        ``topk_share.<kind>`` for each of :data:`ENERGY_KINDS` (:func:`topk_energy_share` of that
        energy: e.g. ``topk_share.l2 = sum of the k largest ||y_c||_2 / sum_c ||y_c||_2``),
        ``topk_k`` (default ``max(1, round(C / 8))``, as :func:`energy_statistics`) and
        :func:`mean_energy_fraction`. ``topk_share.ms`` equals ``energy_statistics``'s
        ``topk_energy_share``.

    >>> out = energy_shares([3.0, 0.0], [10.0, 1.0], count=1, k=1)  # channel 0: 9 of its 10 is mean
    >>> round(out["topk_share.ms"], 4), round(out["topk_share.ms_centred"], 4), out["mean_energy_fraction"]
    (0.9091, 0.5, 0.8181818181818182)
    """
    per_channel = channel_energies(mean, energies, count)
    c = len(per_channel["ms"])
    k = max(1, round(c / 8)) if k is None else k
    out: dict[str, float | int | None] = {
        f"topk_share.{kind}": topk_energy_share(e, k) for kind, e in per_channel.items()
    }
    return out | {"topk_k": k, "mean_energy_fraction": mean_energy_fraction(mean, energies)}


# ---------------------------------------------------------------- bootstrap over images


def bootstrap_weights(images: int, replicates: int, seed: int) -> Tensor:
    """How often each image is drawn in each bootstrap replicate: ``(replicates, images)`` float64.

    Each row draws ``images`` images uniformly with replacement (B. Efron and R. Tibshirani, *An
    Introduction to the Bootstrap*, Chapman & Hall 1993, ch. 6), from a CPU ``torch.Generator``
    seeded with ``seed``: the same seed gives the same rows on every device. Rows sum to ``images``.

    Raises:
        ValueError: ``images < 1`` or ``replicates < 1``.

    >>> bootstrap_weights(3, 2, seed=0).sum(1).tolist()
    [3.0, 3.0]
    """
    if images < 1 or replicates < 1:
        raise ValueError(f"bootstrap_weights: needs images >= 1 and replicates >= 1, got {images}, "
                         f"{replicates}")
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, images, (replicates, images), generator=gen)
    return torch.zeros(replicates, images, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(replicates, images, dtype=torch.float64)
    )


def percentile_interval(values: Tensor, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13): the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the replicates ``values`` ``(R,)`` (linear interpolation).

    ``None`` when any replicate is NaN or inf (e.g. a replicate covariance is singular: the
    statistic is infinite there, so no finite interval holds it).

    >>> [round(v, 6) for v in percentile_interval(torch.arange(101.0))]
    [2.5, 97.5]
    """
    v = values.detach().to(torch.float64).flatten()
    if v.numel() == 0 or not bool(torch.isfinite(v).all()):
        return None
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64, device=v.device)
    low, high = torch.quantile(v, q).tolist()
    return low, high


def _digamma_bias(dim: int, n: Tensor) -> tuple[Tensor, Tensor]:
    """Batched :func:`_log_det_bias` and :func:`_variances_bias` for counts ``n`` ``(R,)``."""
    psi = torch.special.digamma
    i = torch.arange(1, dim + 1, dtype=torch.float64, device=n.device)
    log_det = dim * psi((n - 1) / 2) - psi((n[:, None] - i) / 2).sum(1)
    return log_det, psi((n - 1) / 2) + torch.log(2 / (n - 1))


def _batched_moments(count: Tensor, total: Tensor, outer: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Means ``(R, C)``, unbiased covariances ``(R, C, C)`` and second moments ``(R, C)`` from
    pooled sums, as :class:`ChannelStats` computes them."""
    mean = total / count[:, None]
    cov = torch.baddbmm(outer, total[:, :, None], mean[:, None, :], alpha=-1.0)  # outer - n mu mu^T
    cov.div_((count - 1)[:, None, None])
    return mean, cov, torch.diagonal(outer, dim1=1, dim2=2) / count[:, None]


def _batched_tc(cov: Tensor, n: Tensor, log_det: Tensor) -> Tensor:
    """Batched :func:`total_correlation` given ``log det`` (NaN where singular), bias-corrected
    where ``n > C``."""
    dim = cov.shape[-1]
    tc = 0.5 * (torch.log(torch.diagonal(cov, dim1=1, dim2=2)).sum(1) - log_det)
    bias, _ = _digamma_bias(dim, n)
    return torch.where(n > dim, tc - 0.5 * bias, tc)


def channel_statistics_batched(
    count: Tensor, total: Tensor, outer: Tensor, n: Tensor | None = None, k: int | None = None,
    rtol: float = RANK_RTOL,
) -> dict[str, Tensor]:
    """The covariance and energy statistics of many pooled sums at once (bootstrap replicates).

    The batched form of :func:`energy_statistics` and :func:`energy_shares` (same formulas and
    sources, same ``n`` rule: bias-corrected where ``n > C``) on ``R`` sets of
    :class:`ChannelStats` sums, with one batched ``torch.linalg.eigvalsh``; a statistic that is
    ``None`` there is NaN here.

    Args:
        count: ``(R,)``, total: ``(R, C)``, outer: ``(R, C, C)`` float64 sums.
        n: ``(R,)`` sample counts of the bias corrections; default ``count``.
        k: as :func:`energy_statistics`.

    Returns:
        ``(R,)`` float64 tensors: ``total_correlation``, ``total_correlation_per_channel``
        (nats / C), ``coding_gain``, ``klt_coding_gain``, ``decorrelation_gain``,
        ``offdiag_energy_ratio``, ``effective_rank``, ``topk_share.<kind>``,
        ``mean_energy_fraction``.
    """
    c = total.shape[1]
    k = max(1, round(c / 8)) if k is None else k
    nan = torch.tensor(math.nan, dtype=torch.float64, device=total.device)
    n = count if n is None else n
    mean, cov, ms = _batched_moments(count, total, outer)
    var = torch.diagonal(cov, dim1=1, dim2=2)
    lam = torch.linalg.eigvalsh(cov).flip(-1)  # descending
    full = (lam[:, 0] > 0) & (lam[:, -1] > rtol * lam[:, 0])
    log_det = torch.where(full, torch.log(lam.clamp(min=1e-300)).sum(1), nan)
    tc = _batched_tc(cov, n, log_det)
    log_det_bias, var_bias = _digamma_bias(c, n)
    corrected = n > c
    live = var > rtol * var.amax(1, keepdim=True)
    log_gm = torch.log(var.clamp(min=1e-300)).mean(1) - torch.where(corrected, var_bias, 0.0)
    cg = torch.where(live.all(1), var.mean(1) / torch.exp(log_gm), nan)
    log_det_klt = log_det - torch.where(corrected, c * var_bias - log_det_bias, 0.0)
    klt = var.sum(1) / c / torch.exp(log_det_klt / c)
    std = torch.where(live, var, 1.0).sqrt()
    both = (live[:, :, None] & live[:, None, :]).to(torch.float64)
    r2 = (cov / (std[:, :, None] * std[:, None, :])).square() * both
    diag = live.sum(1).to(torch.float64)
    off = r2.sum((1, 2)) - diag
    offdiag = torch.where(diag > 0, off / (off + diag), nan)
    p = lam.clamp(min=0.0) / lam.clamp(min=0.0).sum(1, keepdim=True)
    eff_rank = torch.where(lam[:, 0] > 0, torch.exp(-torch.special.xlogy(p, p).sum(1)), nan)
    centred = (ms - mean.square()).clamp(min=0.0)
    energies = {"l2": (count[:, None] * ms).sqrt(), "l2_centred": (count[:, None] * centred).sqrt(),
                "ms": ms, "ms_centred": centred}
    out = {
        "total_correlation": tc,
        "total_correlation_per_channel": tc / c,
        "coding_gain": cg,
        "klt_coding_gain": klt,
        "decorrelation_gain": torch.exp(2 * tc / c),
        "offdiag_energy_ratio": offdiag,
        "effective_rank": eff_rank,
    }
    for kind, e in energies.items():
        s = e.sort(1, descending=True).values
        out[f"topk_share.{kind}"] = torch.where(
            s.sum(1) > 0, s[:, :k].sum(1) / s.sum(1), torch.tensor(k / c, dtype=torch.float64)
        )
    total_ms = ms.sum(1)
    out["mean_energy_fraction"] = torch.where(total_ms > 0, mean.square().sum(1) / total_ms, nan)
    return out


def _cholesky_log_det(cov: Tensor) -> Tensor:
    """``log det`` of each ``(..., D, D)`` matrix by Cholesky, NaN where it is not positive definite."""
    chol, info = torch.linalg.cholesky_ex(cov)
    log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return torch.where(info == 0, log_det, math.nan)


def neighbourhood_statistics_batched(
    count: Tensor, total: Tensor, outer: Tensor, n: Tensor | None = None, k: int = 2
) -> dict[str, Tensor]:
    """The split of :class:`NeighbourhoodTotalCorrelation` for many pooled sums at once.

    Batched form of :meth:`NeighbourhoodTotalCorrelation.split` (same formulas; bias-corrected at
    ``n`` = blocks, default ``count``, where ``n > k^2 C``) on ``R`` sets of its ``k^2 C``-channel
    sums; ``log det`` by
    batched Cholesky (cheaper than eigenvalues at ``k^2 C = 192``), so a replicate whose covariance
    is not positive definite gives NaN.

    Returns:
        ``(R,)`` float64: ``neighbourhood_tc.joint``, ``.across_channels``, ``.across_positions``.
    """
    n = count if n is None else n
    _, cov, _ = _batched_moments(count, total, outer)
    r, d = count.shape[0], total.shape[1]
    c = d // (k * k)
    joint = _batched_tc(cov, n, _cholesky_log_det(cov))
    corrected = torch.where(n > d, n, 0.0)  # as split(): the parts are corrected iff n > k^2 C
    blocks = torch.stack([cov[:, p * c : (p + 1) * c, p * c : (p + 1) * c] for p in range(k * k)], 1)
    blocks = blocks.reshape(r * k * k, c, c)
    parts = _batched_tc(blocks, corrected.repeat_interleave(k * k), _cholesky_log_det(blocks))
    channels = parts.view(r, k * k).sum(1)
    return {"neighbourhood_tc.joint": joint, "neighbourhood_tc.across_channels": channels,
            "neighbourhood_tc.across_positions": joint - channels}


def bootstrap_intervals(
    count: Tensor,
    total: Tensor,
    outer: Tensor,
    statistics: Callable[..., dict[str, Tensor]],
    replicates: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float] | None]:
    """95 % bootstrap intervals of statistics of pooled sums, resampling whole images.

    Each of ``replicates`` replicates draws the ``I`` images with replacement
    (:func:`bootstrap_weights`, seeded: the same seed gives the same intervals), pools their sums
    (``W @ per-image sums``) and evaluates ``statistics`` on all replicates at once
    (:func:`channel_statistics_batched`, :func:`neighbourhood_statistics_batched`), their bias
    corrections at Kish's effective count ``n_eff = (sum_i w_i m_i)^2 / sum_i w_i^2 m_i`` of a
    replicate that draws image ``i`` (``m_i`` positions) ``w_i`` times (L. Kish, *Survey
    Sampling*, Wiley 1965): a repeated position adds no new information, and the bias of a
    replicate's log-determinants follows ``n_eff``, which varies between replicates. Positions
    within an image are not independent; resampling whole images carries that dependence into
    the spread, which the i.i.d. bias correction inside the statistics does not
    (statistics-notes.md).

    **Recentred percentile interval.** What the corrections leave of the replicates' offset from
    the estimate is the bootstrap's bias estimate ``b = mean(theta*) - theta_hat`` (B. Efron
    and R. Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 10). The interval is
    :func:`percentile_interval` of ``theta* - b``: its location is the (bias-corrected) estimate
    ``theta_hat`` of the pooled sums, its width and asymmetry are the replicates' (ch. 13).

    Args:
        count, total, outer: per-image sums ``(I,)``, ``(I, C)``, ``(I, C, C)`` from
            :meth:`ChannelStats.images`.
        statistics: ``(count (R,), total (R, C), outer (R, C, C), n (R,)) -> {name: (R,)
            values}`` with ``n`` the sample counts of the bias corrections.

    Returns:
        ``{name: (low, high)}``; every interval is None when ``I < 2`` (nothing to resample).

    >>> g = torch.Generator().manual_seed(0)
    >>> m = ChannelStats(4, per_image=True)
    >>> m.update(torch.randn(16, 4, 8, 8, generator=g))  # 16 white-noise images
    >>> iv = bootstrap_intervals(*m.images(), channel_statistics_batched, replicates=100)
    >>> low, high = iv["total_correlation"]
    >>> low < 0 < high, iv == bootstrap_intervals(*m.images(), channel_statistics_batched, replicates=100)
    (True, True)
    """
    weights = bootstrap_weights(len(count), replicates, seed).to(total.device)
    weights = torch.cat([torch.ones_like(weights[:1]), weights])  # row 0: the sample itself
    m, t, o = weights @ count, weights @ total, (weights @ outer.flatten(1)).view(-1, *outer.shape[1:])
    values = statistics(m, t, o, m.square() / (weights.square() @ count))  # Kish effective n
    if len(count) < 2:
        return dict.fromkeys(values)
    return {name: percentile_interval(v[1:] - v[1:].mean() + v[0], level) for name, v in values.items()}


def _f64_zeros(*shape: int) -> Tensor:
    return torch.zeros(shape, dtype=torch.float64)


def _check_float(y: Tensor, name: str) -> None:
    if not y.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {y.dtype}")


def _finite(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """Which samples along ``dim`` hold only finite values: a float64 sum over ``dim`` is finite
    (one pass; ``isfinite(x).all(dim)`` reduces slowly across a strided dimension). Finite values
    whose float64 sum overflows (above ~1e308) also count as non-finite."""
    return torch.isfinite(x.sum(dim, keepdim=keepdim, dtype=torch.float64))


def _check_data(name: str, count: Tensor, nonfinite: Tensor, needed: int = 1) -> None:
    """The no-data rule of the module docstring (this is where ``compute`` waits for the host)."""
    n, skipped = int(count), int(nonfinite)
    if n >= needed:
        return
    if skipped:
        raise ValueError(f"{name}: every sample was non-finite ({skipped} skipped), no data to compute on")
    if n == 0:
        raise ValueError(f"{name}: no data (compute() before any update)")
    raise ValueError(f"{name}: needs at least {needed} samples, got {n}")


# ---------------------------------------------------------------- functional layer: ChannelStats


def _check_channel_input(y: Tensor, channels: int) -> None:
    if y.dim() not in (2, 4) or y.shape[1] != channels:
        raise ValueError(
            f"ChannelStats: expected (B, {channels}, H, W) or (N, {channels}), got {tuple(y.shape)}"
        )
    _check_float(y, "ChannelStats")


def _channel_stats_update(y: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float64 sums of the samples of ``y`` ``(B, C, H, W)`` or ``(N, C)``: ``(count, sum, outer,
    nonfinite)``, with ``outer`` the chunk-centred sum of :class:`ChannelStats`. Samples holding a
    non-finite value are left out and counted in ``nonfinite``. No host synchronisation."""
    _check_channel_input(y, channels)
    y = y.detach()
    c, device = channels, y.device
    chunk = _CHUNK_ELEMENTS.get(device.type, _DEFAULT_CHUNK_ELEMENTS)
    step = max(1, chunk // c)  # samples per float64 chunk
    if y.dim() == 2:
        parts = [x.T for x in y.split(step)]  # (C, m) views
    else:  # groups of images as (C, g, H*W) views
        b, _, h, w = y.shape
        parts = y.reshape(b, c, h * w).split(max(1, step // (h * w)))
        parts = [p.transpose(0, 1) for p in parts]
    count, total = _f64_zeros().to(device), _f64_zeros(c).to(device)
    outer = _f64_zeros(c, c).to(device)
    for part in parts:  # cast and transpose in one copy into a fresh (C, m) float64 buffer
        x = torch.empty(part.shape, dtype=torch.float64, device=device).copy_(part)
        x = x.view(c, -1)  # columns are samples
        f = _finite(x, 0).to(torch.float64)  # 1 for the samples kept
        x.nan_to_num_(0.0, 0.0, 0.0)  # finite garbage stays in skipped columns: weighted by f
        m = f.sum()
        s = x @ f
        mu = s / m.clamp(min=1)
        outer.addmm_(x.sub_(mu[:, None]).mul_(f), x.T).addr_(s, mu)
        total += s
        count += m
    return count, total, outer, y.numel() // c - count


def _channel_stats_images(y: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_channel_stats_update` of every image of ``y`` ``(B, C, H, W)`` apart, batched:
    ``(count (B,), sum (B, C), outer (B, C, C), nonfinite (B,))``, each image one chunk centred
    at its own mean, so the sums equal the per-image calls'; groups of images of at most one
    chunk's elements share one float64 copy and one batched GEMM. No host synchronisation."""
    _check_channel_input(y, channels)
    y = y.detach()
    b, c, h, w = y.shape
    chunk = _CHUNK_ELEMENTS.get(y.device.type, _DEFAULT_CHUNK_ELEMENTS)
    sums = []
    for group in y.split(max(1, chunk // (c * h * w))):
        x = torch.empty(group.shape, dtype=torch.float64, device=y.device).copy_(group)
        x = x.view(len(group), c, h * w)  # columns are samples
        f = _finite(x, 1).to(torch.float64)  # (g, H*W): 1 for the samples kept
        x.nan_to_num_(0.0, 0.0, 0.0)
        m = f.sum(1)
        total = torch.bmm(x, f[:, :, None]).squeeze(2)
        mu = total / m.clamp(min=1)[:, None]
        x.sub_(mu[:, :, None]).mul_(f[:, None, :])
        outer = torch.baddbmm(total[:, :, None] * mu[:, None, :], x, x.transpose(1, 2))
        sums.append((m, total, outer, h * w - m))
    count, total, outer, nonfinite = (torch.cat(v) for v in zip(*sums, strict=True))
    return count, total, outer, nonfinite


def _channel_stats_compute(
    count: Tensor, total: Tensor, outer: Tensor, nonfinite: Tensor
) -> dict[str, Tensor]:
    """Mean, unbiased covariance and energies from the sums of :func:`_channel_stats_update`.

    Raises:
        ValueError: fewer than 2 finite samples.
    """
    _check_data("ChannelStats", count, nonfinite, needed=2)
    mean = total / count
    cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
    return {
        "mean": mean,
        "covariance": 0.5 * (cov + cov.T),
        "energies": torch.diagonal(outer) / count,
        "count": count.clone(),
        "nonfinite": nonfinite.clone(),
    }


# ---------------------------------------------------------------- functional layer: SubbandEnergy


def _subband_names(levels: int) -> list[str]:
    """``LL{L}``, then ``LH{l}, HL{l}, HH{l}`` for ``l = L..1``."""
    return [f"LL{levels}"] + [f"{b}{lv}" for lv in range(levels, 0, -1) for b in ("LH", "HL", "HH")]


def _subband_energy_update(
    y: Tensor, levels: int, wavelet: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(energy, count, nonfinite, channel_sum, ll_sum)``: float64 band energies ``(3L+1,)`` of the
    images of ``y`` ``(B, C, H, W)``, images holding a non-finite value left out; counts in images;
    per channel ``(C,)`` the sum of ``y`` and of its ``LL{L}`` coefficients over the kept images."""
    m = 2**levels
    if y.dim() != 4 or y.shape[-2] % m or y.shape[-1] % m:
        raise ValueError(
            f"SubbandEnergy: expected (B, C, H, W) with H, W divisible by {m}, got {tuple(y.shape)}"
        )
    _check_float(y, "SubbandEnergy")
    x = y.detach().to(torch.float64, copy=True)
    kept = _finite(x.flatten(1), 1).to(torch.float64)  # (B,): 1 for the images kept
    x.nan_to_num_(0.0, 0.0, 0.0)  # a skipped image keeps finite garbage: weighted 0 below
    channel_sum = kept @ x.sum((2, 3))

    def energy(band: Tensor) -> Tensor:
        return band.square().sum((1, 2, 3)) @ kept

    details = []
    for _ in range(levels):
        x, *bands = dwt2(x, wavelet).chunk(4, 1)
        details.append(torch.stack([energy(band) for band in bands]))
    energies = torch.cat([energy(x).reshape(1), *details[::-1]])
    count = kept.sum()
    return energies, count, len(kept) - count, channel_sum, kept @ x.sum((2, 3))


def _subband_energy_compute(
    energy: Tensor, count: Tensor, nonfinite: Tensor, levels: int
) -> dict[str, Tensor]:
    """Band shares (and ``count``, ``nonfinite`` images) from :func:`_subband_energy_update`'s sums.

    Raises:
        ValueError: no finite image.
    """
    _check_data("SubbandEnergy", count, nonfinite)
    if not energy.any():  # zero energy: white, each band's fraction of the coefficients
        energy = torch.tensor(
            [1.0] + [4.0**lv for lv in range(levels) for _ in range(3)],
            dtype=torch.float64, device=energy.device,
        )
    shares = energy / energy.sum()
    out = dict(zip(_subband_names(levels), shares.unbind(), strict=True))
    return out | {"count": count.clone(), "nonfinite": nonfinite.clone()}


def _subband_energy_centred(
    energy: Tensor, channel_sum: Tensor, ll_sum: Tensor, positions: Tensor, levels: int
) -> Tensor:
    """Band shares ``(3L+1,)`` of the channel-centred latent from the raw sums (see
    :class:`SubbandEnergy`); zero centred energy reads as white, as the raw shares do."""
    mu = channel_sum / positions
    centred = energy.clone()
    dc = (2 ** (levels + 1) * mu * ll_sum - positions * mu.square()).sum()  # the means' LL energy
    centred[0] = (energy[0] - dc).clamp(min=0.0)
    shares = _subband_energy_compute(centred, positions, torch.zeros_like(positions), levels)
    return torch.stack([shares[band] for band in _subband_names(levels)])


# ---------------------------------------------------------------- functional layer: SpatialCorrelation


def _lag_slices(lag: tuple[int, int], h: int, w: int) -> tuple[tuple[slice, slice], ...]:
    """Slices of the first and second element of every pair ``(p, p + lag)`` inside ``h x w``."""

    def one(d: int, n: int) -> tuple[slice, slice]:
        return (slice(0, n - d), slice(d, n)) if d >= 0 else (slice(-d, n), slice(0, n + d))

    (a_h, b_h), (a_w, b_w) = one(lag[0], h), one(lag[1], w)
    return (a_h, a_w), (b_h, b_w)


def _lag_name(lag: tuple[int, int]) -> str:
    return f"{lag[0]},{lag[1]}"


def _spatial_correlation_update(
    y: Tensor, channels: int, lags: Sequence[tuple[int, int]]
) -> dict[str, Tensor]:
    """Float64 sums of :class:`SpatialCorrelation` for ``y`` ``(B, C, H, W)``, positions holding a
    non-finite value left out (and every pair with such an end); keys are the state names."""
    if y.dim() != 4 or y.shape[1] != channels:
        raise ValueError(f"SpatialCorrelation: expected (B, {channels}, H, W), got {tuple(y.shape)}")
    _check_float(y, "SpatialCorrelation")
    b, c, h, w = y.shape
    if any(abs(dh) >= h or abs(dw) >= w for dh, dw in lags):
        raise ValueError(f"SpatialCorrelation: lags {tuple(lags)} do not fit a {h}x{w} map")
    x = y.detach().to(torch.float64)
    kept = _finite(x, 1, keepdim=True)  # (B, 1, H, W)
    x = torch.where(kept, x, 0.0)  # a skipped position reads 0: products with it vanish
    f = kept.view(b, h, w).to(torch.float64)
    dims = (0, 2, 3)
    cross, pairs, lagged = [], [], []
    for lag in lags:
        (ah, aw), (bh, bw) = _lag_slices(lag, h, w)
        both = f[:, ah, aw] * f[:, bh, bw]  # the pairs with both ends kept
        pairs.append(both.sum())
        cross.append((x[:, :, ah, aw] * x[:, :, bh, bw]).sum(dims))
        head_w, tail_w = torch.zeros_like(f), torch.zeros_like(f)
        head_w[:, ah, aw], tail_w[:, bh, bw] = both, both
        lagged += [head_w, tail_w]
    # sum y(p) and sum y(p+d) over the kept pairs of every lag: one batched GEMM over positions
    weights = torch.stack(lagged, -1).view(b, h * w, 2 * len(lags))
    head_tail = torch.bmm(x.view(b, c, h * w), weights).sum(0).T  # (2 * lags, C)
    count = f.sum()
    return {
        "count": count,
        "sum": x.sum(dims),
        "sum_sq": x.square().sum(dims),
        "pairs": torch.stack(pairs),
        "cross": torch.stack(cross),
        "head": head_tail[0::2],
        "tail": head_tail[1::2],
        "nonfinite": b * h * w - count,
    }


def _spatial_correlation_compute(
    lags: Sequence[tuple[int, int]], count: Tensor, total: Tensor, sum_sq: Tensor, pairs: Tensor,
    cross: Tensor, head: Tensor, tail: Tensor, nonfinite: Tensor,
) -> dict[str, Tensor]:
    """``mean_c rho_c(d)`` per lag (and ``count``, ``nonfinite`` positions) from the sums.

    Raises:
        ValueError: no finite position.
    """
    _check_data("SpatialCorrelation", count, nonfinite)
    mu = total / count
    var = sum_sq / count - mu.square()
    live = var > EIGENVALUE_FLOOR * var.max()
    lagged = (cross - mu * (head + tail)) / pairs[:, None] + mu.square()
    if live.any():
        rho = (lagged[:, live] / var[live]).mean(1)
    else:  # no variance anywhere: white
        rho = torch.zeros(len(lags), dtype=torch.float64, device=total.device)
    out = {_lag_name(lag): r for lag, r in zip(lags, rho.unbind(), strict=True)}
    return out | {"count": count.clone(), "nonfinite": nonfinite.clone()}


# ---------------------------------------------------------------- functional layer: AuxEnergyShare


def _aux_energy_share_update(aux: Tensor, merged: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(aux, merged, count, nonfinite)``: float64 energies of the two ``(B, C, H, W)`` tensors over
    the positions where both are finite, and the position counts."""
    if aux.shape != merged.shape or aux.dim() != 4:
        raise ValueError(
            f"AuxEnergyShare: expected two (B, C, H, W) tensors of one shape, got "
            f"{tuple(aux.shape)} and {tuple(merged.shape)}"
        )
    _check_float(aux, "AuxEnergyShare")
    _check_float(merged, "AuxEnergyShare")
    aux, merged = aux.detach().to(torch.float64), merged.detach().to(torch.float64)
    finite = _finite(aux, 1, keepdim=True) & _finite(merged, 1, keepdim=True)
    a = torch.where(finite, aux, 0.0).square().sum()
    m = torch.where(finite, merged, 0.0).square().sum()
    count = finite.sum().to(torch.float64)
    return a, m, count, finite.numel() - count


def _aux_energy_share_compute(
    aux: Tensor, merged: Tensor, count: Tensor, nonfinite: Tensor
) -> dict[str, Tensor]:
    """``aux_energy_share = aux / merged`` (and ``count``, ``nonfinite`` positions).

    Raises:
        ValueError: no finite position.
    """
    _check_data("AuxEnergyShare", count, nonfinite)
    return {"aux_energy_share": aux / merged, "count": count.clone(), "nonfinite": nonfinite.clone()}


# ---------------------------------------------------------------- Metric classes


class _StreamingMetric(Metric):
    """Sum-reduced float64 states that follow the device of the data and merge exactly.

    ``count`` and ``nonfinite`` are states of every metric (see the module docstring). States stay
    float64 whatever the casts of a parent module (``.to(dtype)``, ``.half()``, ``set_dtype``):
    :meth:`_apply` moves them between devices only. ``compute_with_cache`` defaults to False, so a
    :meth:`merge` is seen by the next ``compute``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("compute_with_cache", False)
        super().__init__(**kwargs)
        self.add_state("count", _f64_zeros(), dist_reduce_fx="sum")
        self.add_state("nonfinite", _f64_zeros(), dist_reduce_fx="sum")

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        """``nn.Module._apply`` with the states excluded, then moved to the new device only."""
        names = tuple(self.metric_state)
        this = super()._apply(fn, exclude_state=(*exclude_state, *names))
        for name in names:
            if name not in exclude_state:
                value = getattr(this, name)
                if isinstance(value, list):  # per-image states (dist_reduce_fx="cat")
                    setattr(this, name, [v.to(this.device) for v in value])
                else:
                    setattr(this, name, value.to(this.device))
        return this

    def _follow(self, y: Tensor) -> None:
        """Move the states to ``y``'s device (cheap: they are small)."""
        if self.device != y.device:
            self.to(y.device)

    def _add(self, increments: dict[str, Tensor]) -> None:
        for name, value in increments.items():
            getattr(self, name).add_(value)

    def merge(self, other: _StreamingMetric) -> _StreamingMetric:
        """Add ``other``'s state to this one through ``Metric.merge_state`` (exact: states are
        sums); returns ``self``.

        Raises:
            ValueError: ``other`` is of another class or configuration.
        """
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(f"cannot merge {other!r} into {self!r}")
        self.merge_state({k: [x.to(self.device) for x in v] if isinstance(v, list) else v.to(self.device)
                          for k, v in other.metric_state.items()})
        return self

    def _config(self) -> tuple:
        raise NotImplementedError


class ChannelStats(_StreamingMetric):
    """Streaming mean, covariance and energies of the channels of latents.

    States (float64, ``dist_reduce_fx="sum"``): ``count`` (finite samples), ``nonfinite``
    (samples of the input holding NaN or inf, skipped), ``sum`` ``(C,)`` and ``outer`` ``(C, C)`` =
    ``sum_n y_n y_n^T``. The covariance is ``(outer - count mu mu^T) / (count - 1)``.

    Accumulation is one float64 GEMM per chunk of ``m`` samples ``X`` (whole images, or ``2^20 / C``
    samples on the CPU, ``2^25 / C`` elsewhere), on the chunk centred at its own mean ``mu_X``:
    ``outer += (X - mu_X)^T (X - mu_X) + m mu_X mu_X^T`` (the parallel-variance update of Chan,
    Golub and LeVeque, 1979). A raw ``X^T X`` would lose about ``eps64 sqrt(m) (|mu| / s)^2`` of
    the covariance (``eps64 = 1.1e-16``, ``s`` the spread) to rounding inside the GEMM; centred,
    only the final subtraction cancels, about ``eps64 (|mu| / s)^2`` per chunk: ``1e-8`` relative
    for means ``1e4`` times the spread. A shift of the origin could remove even that, but no shift
    known without communication is common to all processes, and the sum all-reduce needs one.

    Args:
        channels: C.
        max_positions: if set, each ``update`` (each image, with ``per_image``) keeps at most this
            many samples (positions), drawn without replacement by a ``torch.Generator`` on the
            data's device seeded with ``seed``; ``nonfinite`` still counts over every position of
            the input.
        seed: seed of that generator.
        per_image: also keep the sums of every **image** apart (for :func:`bootstrap_intervals`):
            list states ``image_count`` ``(B,)``, ``image_sum`` ``(B, C)``, ``image_outer``
            ``(B, C, C)`` per update of ``B`` images, float64, ``dist_reduce_fx="cat"`` (so
            processes contribute their images); :meth:`images` stacks them. An image is one
            ``(C, H, W)`` element of a 4-D input, or the whole of one 2-D ``(N, C)`` update.
            The pooled states are the sums of the per-image ones.

    Raises:
        ValueError: ``channels < 1`` or ``max_positions < 1``.

    >>> m = ChannelStats(2)
    >>> m.update(torch.tensor([[1.0, 2.0], [3.0, 2.0], [float("nan"), 0.0], [2.0, 5.0]]))
    >>> out = m.compute()
    >>> out["mean"].tolist(), out["covariance"].tolist(), int(out["count"]), int(out["nonfinite"])
    ([2.0, 3.0], [[1.0, 0.0], [0.0, 3.0]], 3, 1)
    """

    def __init__(
        self, channels: int, max_positions: int | None = None, seed: int = 0, per_image: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if max_positions is not None and max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.channels, self.max_positions, self.seed = channels, max_positions, seed
        self.per_image = per_image
        self._generators: dict[torch.device, torch.Generator] = {}
        self.add_state("sum", _f64_zeros(channels), dist_reduce_fx="sum")
        self.add_state("outer", _f64_zeros(channels, channels), dist_reduce_fx="sum")
        if per_image:
            for name in ("image_count", "image_sum", "image_outer"):
                self.add_state(name, [], dist_reduce_fx="cat")

    def _config(self) -> tuple:
        return (self.channels, self.per_image)

    def _subsample(self, y: Tensor) -> Tensor:
        """``max_positions`` random samples of ``y`` as an ``(m, C)`` matrix."""
        n = y.numel() // self.channels
        gen = self._generators.get(y.device)
        if gen is None:
            gen = self._generators[y.device] = torch.Generator(y.device).manual_seed(self.seed)
        idx = torch.randperm(n, generator=gen, device=y.device)[: self.max_positions]
        if y.dim() == 2:
            return y[idx]
        b, c, h, w = y.shape
        return y.reshape(b, c, h * w)[idx // (h * w), :, idx % (h * w)]

    def update(self, y: Tensor) -> None:
        """Accumulate the samples of ``y``: ``(B, C, H, W)`` (B*H*W samples) or ``(N, C)``.

        Any float dtype and device; the sums are float64 on ``y``'s device (the states move
        there). Samples holding NaN or inf are skipped and counted. No host synchronisation.

        Raises:
            ValueError: wrong rank or channel count. TypeError: non-float ``y``.
        """
        _check_channel_input(y, self.channels)
        self._follow(y)
        y = y.detach()
        if self.per_image and y.dim() == 4 and (self.max_positions is None
                                                or y.shape[2] * y.shape[3] <= self.max_positions):
            count, total, outer, skipped = _channel_stats_images(y, self.channels)
            self._add({"count": count.sum(), "sum": total.sum(0), "outer": outer.sum(0),
                       "nonfinite": skipped.sum()})
            self.image_count.append(count)
            self.image_sum.append(total)
            self.image_outer.append(outer)
            return
        for image in y.split(1) if self.per_image and y.dim() == 4 else (y,):
            count, total, outer, skipped = self._sums(image)
            self._add({"count": count, "sum": total, "outer": outer, "nonfinite": skipped})
            if self.per_image:
                self.image_count.append(count.reshape(1))
                self.image_sum.append(total[None])
                self.image_outer.append(outer[None])

    def _sums(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = y.numel() // self.channels
        if self.max_positions is not None and n > self.max_positions:
            count, total, outer, _ = _channel_stats_update(self._subsample(y), self.channels)
            return count, total, outer, n - _finite(y, 1).sum()
        return _channel_stats_update(y, self.channels)

    def images(self) -> tuple[Tensor, Tensor, Tensor]:
        """The per-image sums ``(count (I,), sum (I, C), outer (I, C, C))``, float64, in update
        order (process order after a sync); the input of :func:`bootstrap_intervals`.

        Raises:
            ValueError: the metric was made without ``per_image`` or has seen no image.
        """
        if not self.per_image:
            raise ValueError("ChannelStats: per-image sums need ChannelStats(..., per_image=True)")
        if not len(self.image_count):
            raise ValueError("ChannelStats: no data (images() before any update)")
        cat = [torch.cat(v) if isinstance(v, list) else v
               for v in (self.image_count, self.image_sum, self.image_outer)]
        return cat[0], cat[1], cat[2]

    def compute(self) -> dict[str, Tensor]:
        """Statistics of everything accumulated (across processes, when distributed).

        Returns:
            ``mean`` ``(C,)``, ``covariance`` ``(C, C)`` unbiased (divides by ``count - 1``),
            ``energies`` ``(C,)`` = ``E[y_c^2]``, ``count`` and ``nonfinite`` (scalars); float64 on
            the states' device.

        Raises:
            ValueError: fewer than 2 finite samples (no update, or all non-finite).
        """
        return _channel_stats_compute(self.count, self.sum, self.outer, self.nonfinite)

    def statistics(self, k: int | None = None) -> dict[str, float | int | None]:
        """:func:`energy_statistics` of :meth:`compute`'s covariance and energies, bias-corrected
        with ``n = count`` where ``count > C`` (plug-in values otherwise).

        >>> m = ChannelStats(2)
        >>> m.update(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]))
        >>> out = m.statistics()  # uncorrelated channels: no total correlation before correction
        >>> out["numerical_rank"], round(out["total_correlation_plugin"], 4)
        (2, 0.0)
        """
        out = self.compute()
        n = int(out["count"])
        return energy_statistics(out["covariance"], out["energies"], k, n if n > self.channels else None)


class SubbandEnergy(_StreamingMetric):
    """Share of the energy in each wavelet subband, pooled over channels, positions and batches.

    With ``d_b`` the coefficients of band ``b`` of the ``levels``-level 2-D DWT of every channel
    (:func:`energylab.wavelets.dwt2`, re-applied to the LL block; LH, HL, HH are pywt's cH, cV, cD:
    LH is high-pass along H), ``share_b = sum d_b^2 / sum_b' sum d_b'^2``. For an orthonormal
    wavelet the denominator is ``sum y^2`` (Parseval; S. Mallat, *A Wavelet Tour of Signal
    Processing*, 3rd ed., 2009, sec. 7.7). Zero total energy is treated as white: each band's share
    is its fraction of the coefficients. States: ``energy`` ``(3L+1,)`` float64 sums; ``count`` and
    ``nonfinite`` count **images** (a DWT mixes positions, so an image holding NaN or inf is
    skipped whole).

    **Centred** (with ``channels`` = C given): the shares of ``y - mu`` with ``mu_c`` the channel
    mean over every kept position, as ``<band>_centred`` keys. The DWT is linear and maps a
    constant ``mu_c`` to ``LL{L} = 2^L mu_c`` and zero details (analysis low-pass taps sum to
    ``sqrt 2``, high-pass taps to 0), so only ``LL{L}`` changes:
    ``E_LL - sum_c (2^(L+1) mu_c sum LL_c - n mu_c^2)`` with ``n`` positions; states
    ``channel_sum``, ``ll_sum`` ``(C,)`` and ``positions`` (float64 sums).

    Args:
        levels: decomposition levels L >= 1.
        wavelet: a pywt discrete wavelet name (see :func:`energylab.wavelets.dwt2`).
        channels: C, to add the centred shares; None: raw shares only.

    Raises:
        ValueError: ``levels < 1``.

    >>> m = SubbandEnergy(levels=1)
    >>> m.update(torch.ones(2, 3, 4, 4))  # constant: all energy in LL
    >>> {k: round(float(v), 4) for k, v in m.compute().items()}
    {'LL1': 1.0, 'LH1': 0.0, 'HL1': 0.0, 'HH1': 0.0, 'count': 2.0, 'nonfinite': 0.0}
    """

    def __init__(
        self, levels: int = 2, wavelet: str = "haar", channels: int | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels, self.wavelet, self.channels = levels, wavelet, channels
        self.bands = _subband_names(levels)
        self.add_state("energy", _f64_zeros(3 * levels + 1), dist_reduce_fx="sum")
        if channels is not None:
            self.add_state("channel_sum", _f64_zeros(channels), dist_reduce_fx="sum")
            self.add_state("ll_sum", _f64_zeros(channels), dist_reduce_fx="sum")
            self.add_state("positions", _f64_zeros(), dist_reduce_fx="sum")

    def _config(self) -> tuple:
        return (self.levels, self.wavelet, self.channels)

    def update(self, y: Tensor) -> None:
        """Accumulate the band energies of ``y`` ``(B, C, H, W)``, H and W divisible by ``2^L``.

        Raises:
            ValueError: wrong rank or sizes. TypeError: non-float ``y``.
        """
        energy, count, skipped, channel_sum, ll_sum = _subband_energy_update(y, self.levels, self.wavelet)
        self._follow(y)
        self._add({"energy": energy, "count": count, "nonfinite": skipped})
        if self.channels is not None:
            if y.shape[1] != self.channels:
                raise ValueError(f"SubbandEnergy: expected {self.channels} channels, got {tuple(y.shape)}")
            self._add({"channel_sum": channel_sum, "ll_sum": ll_sum, "positions": count * y[0, 0].numel()})

    def compute(self) -> dict[str, Tensor]:
        """Shares ``{LL{L}, LH{L}, HL{L}, HH{L}, ..., LH1, HL1, HH1}`` (0-d float64 tensors
        summing to 1, names in :attr:`bands`), then ``count`` and ``nonfinite`` images.

        Raises:
            ValueError: no finite image (no update, or all non-finite).
        """
        out = _subband_energy_compute(self.energy, self.count, self.nonfinite, self.levels)
        if self.channels is None:
            return out
        centred = _subband_energy_centred(
            self.energy, self.channel_sum, self.ll_sum, self.positions, self.levels
        )
        return out | {f"{band}_centred": v for band, v in zip(self.bands, centred.unbind(), strict=True)}


class SpatialCorrelation(_StreamingMetric):
    """Normalised spatial autocorrelation of each channel at given lags, averaged over channels.

    For channel c with mean ``mu_c`` and (biased) variance ``v_c`` over all N positions of all
    images, and lag ``d = (dh, dw)`` with the ``M_d`` position pairs ``(p, p + d)`` inside the same
    image::

        rho_c(d) = [1/M_d sum_p (y_c(p) - mu_c)(y_c(p+d) - mu_c)] / v_c

    (the sample autocorrelation of G. Box and G. Jenkins, *Time Series Analysis*, sec. 2.1.5, with
    the lag term averaged over its valid pairs). The result is ``mean_c rho_c(d)`` over the channels
    with ``v_c > 1e-12 * max_c v_c``; 0 when there are none (no variance: treated as white).
    States (float64 sums): N (``count``), per channel ``sum y``, ``sum y^2``, and per lag ``M_d``,
    ``sum y(p) y(p+d)``, ``sum y(p)``, ``sum y(p+d)``, so merging and syncing are exact. A position
    holding NaN or inf in any channel is skipped (with every pair it ends) and counted in
    ``nonfinite``.

    Args:
        channels: C.
        lags: ``(dh, dw)`` integer pairs, any sign.

    Raises:
        ValueError: ``channels < 1``, no lags, or a lag that is not a pair of integers.

    >>> m = SpatialCorrelation(1, lags=[(0, 1)])
    >>> m.update(torch.tensor([[[[1.0, 1.0, -1.0, -1.0]]]]))  # pairs (1,1), (1,-1), (-1,-1)
    >>> {k: round(float(v), 4) for k, v in m.compute().items()}
    {'0,1': 0.3333, 'count': 4.0, 'nonfinite': 0.0}
    """

    def __init__(
        self, channels: int, lags: Sequence[tuple[int, int]] = ((0, 1), (1, 0), (1, 1)), **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        lags = tuple(tuple(lag) for lag in lags)
        if not lags or any(len(g) != 2 or not all(isinstance(d, int) for d in g) for g in lags):
            raise ValueError(f"lags must be a non-empty sequence of (dh, dw) integers, got {lags}")
        self.channels, self.lags = channels, lags
        self.lag_names = [_lag_name(lag) for lag in lags]
        self.add_state("pairs", _f64_zeros(len(lags)), dist_reduce_fx="sum")
        for name in ("sum", "sum_sq"):
            self.add_state(name, _f64_zeros(channels), dist_reduce_fx="sum")
        for name in ("cross", "head", "tail"):
            self.add_state(name, _f64_zeros(len(lags), channels), dist_reduce_fx="sum")

    def _config(self) -> tuple:
        return (self.channels, self.lags)

    def update(self, y: Tensor) -> None:
        """Accumulate ``y`` ``(B, C, H, W)``; every lag must fit: ``|dh| < H``, ``|dw| < W``.

        Raises:
            ValueError: wrong shape or a lag that does not fit. TypeError: non-float ``y``.
        """
        increments = _spatial_correlation_update(y, self.channels, self.lags)
        self._follow(y)
        self._add(increments)

    def compute(self) -> dict[str, Tensor]:
        """``{"dh,dw": mean_c rho_c(d)}`` for each lag (names in :attr:`lag_names`), then ``count``
        and ``nonfinite`` positions; 0-d float64 tensors.

        Raises:
            ValueError: no finite position (no update, or all non-finite).
        """
        return _spatial_correlation_compute(
            self.lags, self.count, self.sum, self.sum_sq, self.pairs, self.cross, self.head,
            self.tail, self.nonfinite,
        )


class AuxEnergyShare(_StreamingMetric):
    """Share of the merged energy carried by the auxiliary branch at one merge point.

    ``aux_energy_share = ‖aux‖² / ‖main + aux‖²`` summed over every element of every update
    (float64 sums, ``dist_reduce_fx="sum"``): 0 when the linear path carries nothing; it can
    exceed 1 when the branches cancel. A position holding NaN or inf in either tensor is skipped
    and counted in ``nonfinite``.

    >>> m = AuxEnergyShare()
    >>> m.update(torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), 2.0))
    >>> {k: float(v) for k, v in m.compute().items()}
    {'aux_energy_share': 0.25, 'count': 4.0, 'nonfinite': 0.0}
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("aux", _f64_zeros(), dist_reduce_fx="sum")
        self.add_state("merged", _f64_zeros(), dist_reduce_fx="sum")

    def _config(self) -> tuple:
        return ()

    def update(self, aux: Tensor, merged: Tensor) -> None:
        """Accumulate the energies of ``aux`` (the auxiliary branch) and ``merged`` (main + aux),
        both ``(B, C, H, W)`` of one shape.

        Raises:
            ValueError: shapes differ or are not 4-D. TypeError: non-float input.
        """
        a, m, count, skipped = _aux_energy_share_update(aux, merged)
        self._follow(aux)
        self._add({"aux": a, "merged": m, "count": count, "nonfinite": skipped})

    def compute(self) -> dict[str, Tensor]:
        """``aux_energy_share``, ``count`` and ``nonfinite`` positions, 0-d float64 tensors.

        Raises:
            ValueError: no finite position (no update, or all non-finite).
        """
        return _aux_energy_share_compute(self.aux, self.merged, self.count, self.nonfinite)


def channel_stats(y: Tensor) -> dict[str, Tensor]:
    """Mean, covariance, energies, counts of ``y`` ``(B, C, H, W)`` or ``(N, C)``: one-shot
    :class:`ChannelStats`.

    >>> channel_stats(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))["covariance"].tolist()
    [[2.0, 0.0], [0.0, 0.0]]
    """
    metric = ChannelStats(y.shape[1])
    metric.update(y)
    return metric.compute()


def subband_energy(y: Tensor, levels: int = 2, wavelet: str = "haar") -> dict[str, Tensor]:
    """Subband energy shares of ``y`` ``(B, C, H, W)``: one-shot :class:`SubbandEnergy`.

    >>> round(float(subband_energy(torch.ones(1, 1, 4, 4), levels=1)["LL1"]), 4)
    1.0
    """
    metric = SubbandEnergy(levels, wavelet)
    metric.update(y)
    return metric.compute()


def spatial_correlation(
    y: Tensor, lags: Sequence[tuple[int, int]] = ((0, 1), (1, 0), (1, 1))
) -> dict[str, Tensor]:
    """Spatial autocorrelation of ``y`` ``(B, C, H, W)``: one-shot :class:`SpatialCorrelation`.

    >>> out = spatial_correlation(torch.tensor([[[[1.0, -1.0, 1.0, -1.0]]]]), lags=[(0, 1)])
    >>> round(float(out["0,1"]), 4)
    -1.0
    """
    metric = SpatialCorrelation(y.shape[1], lags)
    metric.update(y)
    return metric.compute()


def aux_energy_share(aux: Tensor, merged: Tensor) -> Tensor:
    """``‖aux‖² / ‖merged‖²`` of two ``(B, C, H, W)`` tensors: one-shot :class:`AuxEnergyShare`.

    >>> float(aux_energy_share(torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)))
    0.25
    """
    metric = AuxEnergyShare()
    metric.update(aux, merged)
    return metric.compute()["aux_energy_share"]


def rate_shares(likelihoods: Tensor) -> Tensor:
    """Share of the bits carried by each channel: ``(C,)`` float64, summing to 1.

    ``share_c = sum_{b,h,w} -log2 p(y_hat_{b,c,h,w}) / sum_{b,c,h,w} -log2 p(...)`` for the
    likelihoods ``p`` of a CompressAI entropy model (``out["likelihoods"]["y"]``). Modulation
    relative to the quantiser (step 1): few channels carrying the rate is strong modulation.

    Args:
        likelihoods: ``(B, C, H, W)`` probabilities in ``(0, 1]``.

    Raises:
        ValueError: not 4-D, values outside ``(0, 1]`` or non-finite, or no bits at all.

    >>> rate_shares(torch.tensor([[[[0.5]], [[0.25]], [[1.0]]]])).tolist()  # 1, 2 and 0 bits
    [0.3333333333333333, 0.6666666666666666, 0.0]
    """
    if likelihoods.dim() != 4:
        raise ValueError(f"rate_shares: expected (B, C, H, W) likelihoods, got {tuple(likelihoods.shape)}")
    p = likelihoods.detach().to(torch.float64)
    if not bool(((p > 0) & (p <= 1)).all()):
        raise ValueError("rate_shares: likelihoods must lie in (0, 1] (NaN, 0 or > 1 found)")
    bits = 0.0 - torch.log2(p).sum((0, 2, 3))  # 0.0 - : no -0.0 for a channel without bits
    total = bits.sum()
    if total <= 0:
        raise ValueError("rate_shares: the likelihoods carry no bits (all 1)")
    return bits / total


def _blocks(y: Tensor, k: int) -> Tensor:
    """The non-overlapping ``k x k`` neighbourhoods of ``y`` ``(B, C, H, W)`` as the channels of a
    ``(B, k*k*C, H // k, W // k)`` map (H, W cropped to multiples of k): channel ``p*C + c`` is
    channel c at block position ``p = dy*k + dx``; each position of the map is one block."""
    b, c, h, w = y.shape
    x = y[:, :, : h - h % k, : w - w % k]
    x = x.reshape(b, c, h // k, k, w // k, k).permute(0, 3, 5, 1, 2, 4)  # (B, k, k, C, H/k, W/k)
    return x.reshape(b, k * k * c, h // k, w // k)


def _neighbourhood_total_correlation(
    cov: Tensor | np.ndarray, k: int, n: int | None
) -> dict[str, float | None]:
    """The split of :func:`neighbourhood_total_correlation` from the ``(k*k*C, k*k*C)`` covariance."""
    s = _covariance(cov)
    c = len(s) // (k * k)
    joint = total_correlation(s, n)
    parts = [total_correlation(s[p * c : (p + 1) * c, p * c : (p + 1) * c], n) for p in range(k * k)]
    channels = None if any(t is None for t in parts) else float(sum(parts))
    positions = None if joint is None or channels is None else joint - channels
    return {"joint": joint, "across_channels": channels, "across_positions": positions}


class NeighbourhoodTotalCorrelation(ChannelStats):
    """Streaming total correlation of ``k x k`` neighbourhoods, split into channels and positions.

    Each non-overlapping ``k x k`` block of ``y`` ``(B, C, H, W)`` (H, W cropped to multiples of
    ``k``) is one sample of ``k^2 C`` variables; the states are those of a :class:`ChannelStats` of
    ``k^2 C`` channels (non-finite rule and ``per_image`` included: with ``per_image=True`` each
    ``(C, H, W)`` image's blocks are one image for :func:`bootstrap_intervals`). :meth:`split`
    gives, in nats, with the
    bias correction of :func:`total_correlation` at ``n`` = blocks::

        joint            = TC of the k^2 C variables
        across_channels  = sum over the k^2 block positions p of TC(channels at p)  (~ k^2 x channel TC)
        across_positions = joint - across_channels = multi-information between the k^2 position
                           vectors (>= 0 before the correction)

    (chain rule of total correlation, Watanabe 1960). A Haar DWT is a 2 x 2 spatial transform: its
    decorrelation shows up in ``across_positions``. Singular covariances give ``None`` as there.

    >>> m = NeighbourhoodTotalCorrelation(channels=1, k=2)
    >>> m.update(torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    >>> out = m.split()
    >>> abs(out["joint"]) < 0.05, out["across_channels"]  # white noise; one channel: nothing to share
    (True, 0.0)
    """

    def __init__(self, channels: int, k: int = 2, **kwargs) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        super().__init__(k * k * channels, **kwargs)
        self.k, self.latent_channels = k, channels

    def _config(self) -> tuple:
        return (self.latent_channels, self.k, self.per_image)

    def update(self, y: Tensor) -> None:
        """Accumulate the ``k x k`` blocks of ``y`` ``(B, C, H, W)``.

        Raises:
            ValueError: wrong shape, or H or W below k. TypeError: non-float ``y``.
        """
        if y.dim() != 4 or y.shape[1] != self.latent_channels or min(y.shape[2:]) < self.k:
            raise ValueError(
                f"NeighbourhoodTotalCorrelation: expected (B, {self.latent_channels}, H, W) with H, W "
                f">= {self.k}, got {tuple(y.shape)}"
            )
        super().update(_blocks(y, self.k))

    def split(self) -> dict[str, float | None]:
        """``joint``, ``across_channels``, ``across_positions`` (nats, bias-corrected at ``n`` =
        blocks where ``n > k^2 C``, plug-in otherwise) and ``count`` (blocks).

        Raises:
            ValueError: fewer than 2 finite blocks.
        """
        out = self.compute()
        n = int(out["count"])
        split = _neighbourhood_total_correlation(out["covariance"], self.k, n if n > self.channels else None)
        return split | {"count": n}


def neighbourhood_total_correlation(y: Tensor, k: int = 2) -> dict[str, float | None]:
    """Total correlation of the ``k x k`` neighbourhoods of ``y`` ``(B, C, H, W)``, split into its
    across-channel and across-position parts: one-shot :class:`NeighbourhoodTotalCorrelation`.

    Returns:
        ``joint``, ``across_channels``, ``across_positions`` (nats) and ``count`` (blocks).

    >>> y = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    >>> y[:, :, 1] = y[:, :, 0]  # each row copies the one above: rank 2 of 4
    >>> neighbourhood_total_correlation(y)["joint"] is None
    True
    """
    metric = NeighbourhoodTotalCorrelation(y.shape[1], k)
    metric.update(y)
    return metric.split()


class PairedDifference(NamedTuple):
    """A paired difference over seeds: ``mean`` of ``variant - baseline`` per seed, its 95 %
    t-interval ``[low, high]`` (None with fewer than 2 pairs), the number of pairs ``n``, and
    ``inside_noise``: whether the interval contains 0 (None without an interval)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    inside_noise: bool | None


def paired_difference(variant_values: Sequence[float | None],
                      baseline_values: Sequence[float | None]) -> PairedDifference:
    """Mean of the per-seed differences ``d_i = variant_i - baseline_i`` with a 95 % Student-t
    interval: ``mean(d) ± t_{0.975, n-1} · s_d / sqrt(n)``, ``s_d`` the sample s.d. (ddof 1).

    The two sequences are aligned by seed; a pair with a None or non-finite member is dropped. With
    ``n < 2`` pairs the interval (and ``inside_noise``) is None; with no pair the mean is None too.
    Source: the paired t-test, e.g. D. C. Montgomery, *Design and Analysis of Experiments*, 8th
    ed., Wiley 2013, Sec. 2.5.1; the quantile is ``scipy.stats.t.ppf(0.975, n - 1)``.

    Raises:
        ValueError: sequences of different lengths.
    """
    from scipy.stats import t as student_t

    if len(variant_values) != len(baseline_values):
        raise ValueError(f"paired_difference needs one baseline value per variant value, got "
                         f"{len(variant_values)} and {len(baseline_values)}")
    d = np.array([float(v) - float(b) for v, b in zip(variant_values, baseline_values, strict=True)
                  if v is not None and b is not None and math.isfinite(v) and math.isfinite(b)],
                 dtype=np.float64)
    n = len(d)
    if n == 0:
        return PairedDifference(None, None, None, 0, None)
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(mean, None, None, n, None)
    half = float(student_t.ppf(0.975, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    low, high = mean - half, mean + half
    return PairedDifference(mean, low, high, n, bool(low <= 0.0 <= high))


# ---------------------------------------------------------------- modulation against the quantiser

QUANTISATION_STEP = 1.0
"""The quantiser of CompressAI's entropy models: rounding, step 1 (in units of ``y``)."""

ACTIVE_SHARE_FRACTION = 0.1
"""A channel is *active* when its rate share exceeds this fraction of the uniform share ``1/C``."""


def _rate_share_update(likelihoods: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 ``(count, bits, nonfinite)`` of likelihoods ``(B, C, H, W)``: positions used, bits
    ``-log2 p`` per channel ``(C,)`` and positions skipped (a non-finite bit, i.e. ``p`` NaN, inf or
    0). No host synchronisation."""
    if likelihoods.dim() != 4 or likelihoods.shape[1] != channels:
        raise ValueError(
            f"RateShare: expected (B, {channels}, H, W) likelihoods, got {tuple(likelihoods.shape)}"
        )
    _check_float(likelihoods, "RateShare")
    bits = torch.log2(likelihoods.detach().to(torch.float64)).neg_().transpose(0, 1).reshape(channels, -1)
    keep = _finite(bits, 0)
    count = keep.sum().to(torch.float64)
    return count, torch.where(keep, bits, 0.0).sum(1), bits.shape[1] - count


def _rate_share_compute(count: Tensor, bits: Tensor, nonfinite: Tensor) -> dict[str, Tensor]:
    """Shares ``bits / bits.sum()`` and bits per position from the sums of :func:`_rate_share_update`.

    Raises:
        ValueError: no finite position.
    """
    _check_data("RateShare", count, nonfinite)
    total = bits.sum()
    return {"shares": bits / total, "bits": bits.clone(), "bits_per_position": total / count,
            "count": count.clone(), "nonfinite": nonfinite.clone()}


class RateShare(_StreamingMetric):
    """Streaming per-channel share of the bits of ``y``: the float64 sums of :func:`rate_shares`.

    ``share_c = sum_{b,h,w} -log2 p(y_hat_{b,c,h,w}) / sum_{b,c,h,w} -log2 p(...)`` for the
    likelihoods ``p`` an entropy model gives ``y_hat`` (CompressAI's ``out["likelihoods"]["y"]``).
    States (float64, ``dist_reduce_fx="sum"``): ``bits`` ``(C,)``, ``count`` (positions used) and
    ``nonfinite`` (positions with a NaN, inf or zero likelihood, skipped). ``update`` does not check
    that ``p`` lies in ``(0, 1]`` (that would wait for the device); :func:`rate_shares` does.

    Args:
        channels: C.

    >>> m = RateShare(3)
    >>> m.update(torch.tensor([[[[0.5]], [[0.25]], [[1.0]]]]))  # 1, 2 and 0 bits
    >>> m.compute()["shares"].tolist()
    [0.3333333333333333, 0.6666666666666666, 0.0]
    """

    def __init__(self, channels: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.add_state("bits", _f64_zeros(channels), dist_reduce_fx="sum")

    def _config(self) -> tuple:
        return (self.channels,)

    def update(self, likelihoods: Tensor) -> None:
        """Accumulate the bits of ``likelihoods`` ``(B, C, H, W)``. No host synchronisation.

        Raises:
            ValueError: wrong rank or channel count. TypeError: non-float input.
        """
        self._follow(likelihoods)
        count, bits, skipped = _rate_share_update(likelihoods, self.channels)
        self._add({"count": count, "bits": bits, "nonfinite": skipped})

    def compute(self) -> dict[str, Tensor]:
        """``shares`` ``(C,)`` (sum 1), ``bits`` ``(C,)``, ``bits_per_position`` (bits of all C
        channels at one position), ``count``, ``nonfinite``; float64.

        Raises:
            ValueError: no finite position (no update, or all skipped).
        """
        return _rate_share_compute(self.count, self.bits, self.nonfinite)


def std_in_steps(cov: CovLike, step: float = QUANTISATION_STEP) -> np.ndarray:
    """Per-channel standard deviation in units of the quantisation step: ``sqrt(S_cc) / step``,
    ``(C,)`` float64. A channel whose spread is well below one step is mostly rounded to its mean
    (it carries almost no bits); energy modulation matters against this scale.

    >>> std_in_steps(np.diag([4.0, 0.25])).tolist()
    [2.0, 0.5]
    """
    return np.sqrt(np.clip(np.diagonal(_covariance(cov)), 0.0, None)) / step


def rate_share_entropy(shares: CovLike | Sequence[float]) -> float:
    """Entropy of the rate shares in bits: ``H = -sum_c share_c log2 share_c`` (``0 log 0 = 0``),
    between 0 (one channel carries every bit) and ``log2 C`` (every channel carries the same
    share). Low entropy: strong energy modulation.

    >>> rate_share_entropy([0.25] * 4), rate_share_entropy([1.0, 0.0])
    (2.0, 0.0)
    """
    p = np.asarray(shares, dtype=np.float64)
    p = p[p > 0]
    return float(0.0 - (p * np.log2(p)).sum())


def rate_share_am_gm(shares: CovLike | Sequence[float]) -> float | None:
    """Arithmetic over geometric mean of the rate shares (the coding-gain formula applied to bits):
    1 for equal shares, larger as the shares spread; ``None`` when a channel carries no bits
    (geometric mean 0: infinite).

    >>> rate_share_am_gm([0.5, 0.5]), round(rate_share_am_gm([0.8, 0.2]), 4), rate_share_am_gm([1.0, 0.0])
    (1.0, 1.25, None)
    """
    p = np.asarray(shares, dtype=np.float64)
    if (p <= 0).any():
        return None
    return float(p.mean() / np.exp(np.log(p).mean()))


def active_channels(shares: CovLike | Sequence[float], fraction: float = ACTIVE_SHARE_FRACTION) -> int:
    """Number of *active* channels: those whose rate share exceeds ``fraction / C`` (default a tenth
    of the uniform share). Channels below it together carry at most ``fraction`` of the bits, so the
    active ones carry at least ``1 - fraction`` (90 % at the default).

    >>> active_channels([0.6, 0.38, 0.015, 0.005])  # threshold 0.1 / 4 = 0.025
    2
    """
    p = np.asarray(shares, dtype=np.float64)
    return int((p > fraction / len(p)).sum())


def modulation_statistics(
    cov: CovLike, shares: CovLike | Sequence[float] | None
) -> dict[str, float | int | None]:
    """Energy modulation against the quantiser, for one latent.

    Returns:
        ``std_in_steps.median`` and ``std_in_steps.max`` (:func:`std_in_steps` of ``cov``) and, with
        the rate ``shares`` ``(C,)``, ``rate_share_entropy`` (bits, <= ``log2 C``),
        ``rate_share_am_gm`` (ratio) and ``active_channels`` (count): see those functions.
    """
    std = std_in_steps(cov)
    out: dict[str, float | int | None] = {"std_in_steps.median": float(np.median(std)),
                                          "std_in_steps.max": float(std.max())}
    if shares is not None:
        out.update({"rate_share_entropy": rate_share_entropy(shares),
                    "rate_share_am_gm": rate_share_am_gm(shares), "active_channels": active_channels(shares)})
    return out

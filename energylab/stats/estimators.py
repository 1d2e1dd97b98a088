"""Estimators on a covariance: the two-part split of energy compaction, ranks and bias corrections.

Functions of one ``(C, C)`` covariance ``S`` (torch tensor or numpy array, float64 inside) and,
optionally, the sample count ``n`` behind it. Notation: mean ``mu``, covariance ``S`` (C x C),
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
of correlated latent positions, whose rest the jackknife over images removes:
:func:`energylab.stats.intervals.jackknife_statistics`, applied by
:meth:`~energylab.stats.metrics.ChannelStats.statistics` to per-image sums); without, they are
plug-in values.
:func:`_neighbourhood_total_correlation` splits the total correlation of ``k x k`` neighbourhoods
into its across-channel and across-position parts (streamed by
:class:`~energylab.stats.metrics.NeighbourhoodTotalCorrelation`).

:func:`energylab.stats.energy.energy_statistics` gathers them into one flat dict. The batched
forms of these formulas, for many bootstrap replicates at once, are in
:mod:`energylab.stats.batched`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.special import digamma
from torch import Tensor

__all__ = [
    "EIGENVALUE_FLOOR",
    "RANK_RTOL",
    "CovLike",
    "Spectrum",
    "coding_gain",
    "correlation_matrix",
    "decorrelation_gain",
    "effective_rank",
    "floored_eigenvalues",
    "klt_coding_gain",
    "numerical_rank",
    "offdiag_energy_ratio",
    "offdiag_energy_ratio_cov",
    "spectrum",
    "total_correlation",
]

EIGENVALUE_FLOOR = 1e-12
"""For plots (:func:`spectrum`) only: eigenvalues and variances below this fraction of the largest
eigenvalue are raised to it."""

RANK_RTOL = 1e-10
"""Eigenvalues (and channel variances) at or below this fraction of the largest count as zero."""


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
    s = _covariance(cov)
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
    not independent, so the correction is a floor on the bias, not all of it (the jackknife over
    images removes the rest: :func:`energylab.stats.intervals.jackknife_statistics`). ``None`` (infinite)
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

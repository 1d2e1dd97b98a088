"""The covariance and energy statistics of many pooled sums at once (bootstrap replicates).

Batched torch forms of :func:`energylab.stats.energy.energy_statistics`,
:func:`energylab.stats.energy.energy_shares` and the neighbourhood split of
:class:`energylab.stats.metrics.NeighbourhoodTotalCorrelation` (same formulas, same sources, same
bias-correction rule), evaluated on ``R`` sets of :class:`~energylab.stats.metrics.ChannelStats`
sums with one batched eigendecomposition or Cholesky factorisation; a statistic that is ``None``
there is NaN here. :func:`energylab.stats.intervals.bootstrap_intervals` calls them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from energylab.stats.estimators import RANK_RTOL
from energylab.stats.functional import _clamp_covariance

__all__ = ["channel_statistics_batched", "neighbourhood_statistics_batched"]


def _digamma_bias(dim: int, n: Tensor) -> tuple[Tensor, Tensor]:
    """Batched :func:`_log_det_bias` and :func:`_variances_bias` for counts ``n`` ``(R,)``."""
    psi = torch.special.digamma
    i = torch.arange(1, dim + 1, dtype=torch.float64, device=n.device)
    log_det = dim * psi((n - 1) / 2) - psi((n[:, None] - i) / 2).sum(1)
    return log_det, psi((n - 1) / 2) + torch.log(2 / (n - 1))


def _batched_moments(
    count: Tensor, total: Tensor, outer: Tensor, shift: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Means ``(R, C)``, unbiased covariances ``(R, C, C)`` (diagonal clamped at 0, off-diagonals
    at ``sqrt(S_ii S_jj)``), second moments ``E[y^2]`` and centred second moments ``E[(y - mu)^2]``
    ``(R, C)`` from pooled sums of ``y - shift`` (``shift`` ``(C,)``, default 0).

    The covariance subtracts ``n mu_s mu_s^T`` (``mu_s`` the mean of ``y - shift``) from the sums:
    with a shift near the mean, as :func:`~energylab.stats.intervals.bootstrap_intervals` passes,
    little cancels; with raw sums (no shift) about ``eps64 (|mu| / s)^2`` of each variance."""
    shifted_mean = total / count[:, None]
    cov = torch.baddbmm(outer, total[:, :, None], shifted_mean[:, None, :], alpha=-1.0)  # - n mu mu^T
    cov = _clamp_covariance(cov.div_((count - 1)[:, None, None]))
    square = torch.diagonal(outer, dim1=1, dim2=2) / count[:, None]
    centred = (square - shifted_mean.square()).clamp(min=0.0)
    if shift is None:
        return shifted_mean, cov, square, centred
    return shifted_mean + shift, cov, square + shift * (2 * shifted_mean + shift), centred


def _batched_tc(cov: Tensor, n: Tensor, log_det: Tensor) -> Tensor:
    """Batched :func:`total_correlation` given ``log det`` (NaN where singular), bias-corrected
    where ``n > C``."""
    dim = cov.shape[-1]
    tc = 0.5 * (torch.log(torch.diagonal(cov, dim1=1, dim2=2)).sum(1) - log_det)
    bias, _ = _digamma_bias(dim, n)
    return torch.where(n > dim, tc - 0.5 * bias, tc)


def channel_statistics_batched(
    count: Tensor, total: Tensor, outer: Tensor, n: Tensor | None = None, k: int | None = None,
    rtol: float = RANK_RTOL, shift: Tensor | None = None,
) -> dict[str, Tensor]:
    """The covariance and energy statistics of many pooled sums at once (bootstrap replicates).

    The batched form of :func:`energy_statistics` and :func:`energy_shares` (same formulas and
    sources, same ``n`` rule: bias-corrected where ``n > C``) on ``R`` sets of
    :class:`ChannelStats` sums, with one batched ``torch.linalg.eigvalsh``; a statistic that is
    ``None`` there is NaN here.

    Args:
        count: ``(R,)``, total: ``(R, C)``, outer: ``(R, C, C)`` float64 sums of ``y - shift``.
        n: ``(R,)`` sample counts of the bias corrections; default ``count``.
        k: as :func:`energy_statistics`.
        shift: ``(C,)`` origin of the sums; default 0 (raw sums). Sums about a point near the mean
            keep the covariance free of cancellation (see :func:`_batched_moments`).

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
    mean, cov, ms, centred = _batched_moments(count, total, outer, shift)
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
    count: Tensor, total: Tensor, outer: Tensor, n: Tensor | None = None, k: int = 2,
    shift: Tensor | None = None,
) -> dict[str, Tensor]:
    """The split of :class:`NeighbourhoodTotalCorrelation` for many pooled sums at once.

    Batched form of :meth:`NeighbourhoodTotalCorrelation.split` (same formulas; bias-corrected at
    ``n`` = blocks, default ``count``, where ``n > k^2 C``) on ``R`` sets of its ``k^2 C``-channel
    sums; ``log det`` by
    batched Cholesky (cheaper than eigenvalues at ``k^2 C = 192``), so a replicate whose covariance
    is not positive definite gives NaN. ``shift``: the origin of the sums, as
    :func:`channel_statistics_batched` (the split depends on the covariance only).

    Returns:
        ``(R,)`` float64: ``neighbourhood_tc.joint``, ``.across_channels``, ``.across_positions``.
    """
    n = count if n is None else n
    _, cov, _, _ = _batched_moments(count, total, outer)  # a covariance does not depend on a shift
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

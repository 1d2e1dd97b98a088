"""Bootstrap intervals over whole images.

``ChannelStats(..., per_image=True)`` (and :class:`~energylab.stats.metrics.NeighbourhoodTotalCorrelation`)
keep the float64 sums of every image apart; :func:`bootstrap_intervals` resamples whole images
(:func:`bootstrap_weights`) and evaluates the batched forms of the statistics
(:func:`~energylab.stats.batched.channel_statistics_batched`,
:func:`~energylab.stats.batched.neighbourhood_statistics_batched`) on all replicates at once;
:func:`percentile_interval` reads an interval off the replicates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from energylab.stats.functional import _clamp_covariance

__all__ = ["bootstrap_intervals", "bootstrap_weights", "percentile_interval"]


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


def _shift_image_sums(count: Tensor, total: Tensor, outer: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(shift, total', outer')``: per-image sums ``(I,)``, ``(I, C)``, ``(I, C, C)`` moved to the
    pooled mean ``shift`` ``(C,)`` of all images, ``total'_i = n_i d_i`` and ``outer'_i = m2_i + n_i
    d_i d_i^T`` with ``d_i = mu_i - shift`` and ``m2_i`` image i's centred sum, so that weighted
    sums of them (bootstrap replicates) keep their covariance free of the cancellation of raw sums:
    about ``eps64 (|mu| / s)^2`` of each variance, once per image, instead of growing with the
    images pooled; 0 for a constant channel."""
    mean = total / count.clamp(min=1)[:, None]
    m2 = _clamp_covariance(torch.baddbmm(outer, total[:, :, None], mean[:, None, :], alpha=-1.0))
    shift = total.sum(0) / count.sum().clamp(min=1)
    d = mean - shift
    shifted = count[:, None] * d
    return shift, shifted, torch.baddbmm(m2, shifted[:, :, None], d[:, None, :])


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
    (``W @ per-image sums``, the sums first moved to the pooled mean of all images so that the
    covariances of the pooled sums do not cancel) and evaluates ``statistics`` on all replicates at
    once
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
        statistics: ``(count (R,), total (R, C), outer (R, C, C), n (R,), shift=(C,)) -> {name:
            (R,) values}`` with ``n`` the sample counts of the bias corrections and ``total``,
            ``outer`` the sums of ``y - shift``.

    Returns:
        ``{name: (low, high)}``; every interval is None when ``I < 2`` (nothing to resample).

    >>> from energylab.stats import ChannelStats, channel_statistics_batched
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
    shift, total, outer = _shift_image_sums(count, total, outer)
    m, t, o = weights @ count, weights @ total, (weights @ outer.flatten(1)).view(-1, *outer.shape[1:])
    values = statistics(m, t, o, m.square() / (weights.square() @ count), shift=shift)  # Kish n
    if len(count) < 2:
        return dict.fromkeys(values)
    return {name: percentile_interval(v[1:] - v[1:].mean() + v[0], level) for name, v in values.items()}

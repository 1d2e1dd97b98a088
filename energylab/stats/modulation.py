"""Energy modulation against the quantiser: each channel's spread in quantisation steps and its
share of the bits.

In learned image compression the quantisation step is 1 (rounding), so what matters is each
channel's scale against it (:func:`std_in_steps`) and the bits it costs: :func:`rate_shares` gives
each channel's share of the bits from an entropy model's likelihoods (streamed by
:class:`~energylab.stats.metrics.RateShare`); :func:`rate_share_entropy`,
:func:`rate_share_am_gm` and :func:`active_channels` summarise the shares, and
:func:`modulation_statistics` gathers them for one latent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from energylab.stats.estimators import CovLike, _covariance

__all__ = [
    "ACTIVE_SHARE_FRACTION",
    "QUANTISATION_STEP",
    "active_channels",
    "modulation_statistics",
    "rate_share_am_gm",
    "rate_share_entropy",
    "rate_shares",
    "std_in_steps",
]


QUANTISATION_STEP = 1.0
"""The quantiser of CompressAI's entropy models: rounding, step 1 (in units of ``y``)."""

ACTIVE_SHARE_FRACTION = 0.1
"""A channel is *active* when its rate share exceeds this fraction of the uniform share ``1/C``."""


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

"""Bjøntegaard delta rate (BD-rate) between two rate-distortion curves, never a silent NaN.

G. Bjøntegaard, "Calculation of average PSNR differences between RD-curves", VCEG-M33, 2001: the
log-rate of each curve is interpolated as a function of quality, the two interpolants are
integrated over the quality interval where both curves have points, and the mean log-rate
difference ``d`` becomes the percentage ``(10**d - 1) * 100``. Negative means the test codec needs
fewer bits than the anchor for the same quality.

The computation is the ``bjontegaard`` package's ``bd_rate`` with ``method="pchip"``
(piecewise-cubic Hermite interpolation, monotone, as in the JVET common test conditions rather
than VCEG-M33's global cubic fit). That package returns NaN (with a warning) for curves that do not
overlap and fails with an ``AssertionError`` or SciPy's message for unsorted or repeated points;
:func:`bd_rate` checks its inputs first and raises a one-line :class:`ValueError` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import bjontegaard
import numpy as np

__all__ = ["METHOD", "MIN_POINTS", "BDRate", "bd_rate"]

METHOD = "pchip log-rate (bjontegaard package, method='pchip')"
"""How :func:`bd_rate` computes: PCHIP interpolation of log-rate against quality, integrated over
the overlapping quality interval, by the ``bjontegaard`` package."""

MIN_POINTS = 2
"""Fewest R-D points per curve: what PCHIP interpolation needs. (VCEG-M33 and the JVET common test
conditions use four; with two, PCHIP is a straight line in (quality, log-rate).)"""


@dataclass(frozen=True)
class BDRate:
    """A BD-rate result with how it was computed.

    Attributes:
        percent: the average rate difference at equal quality, in percent (``-10.0``: the test
            codec needs 10 % fewer bits than the anchor).
        interval: ``(low, high)``, the quality interval integrated over: where both curves have
            points (in the quality's unit, e.g. dB).
        method: :data:`METHOD`.
    """

    percent: float
    interval: tuple[float, float]
    method: str = METHOD

    def __float__(self) -> float:
        return self.percent

    def as_dict(self) -> dict[str, object]:
        """JSON-ready ``{"percent", "interval": [low, high], "method"}``."""
        return {"percent": self.percent, "interval": list(self.interval), "method": self.method}


def _curve(rate: Sequence[float], quality: Sequence[float], which: str) -> np.ndarray:
    """Validate one curve; returns a ``(2, n)`` float64 array ``[rate, quality]`` sorted by quality.

    Raises:
        ValueError: one line naming ``which`` curve and the problem.
    """
    try:
        r = np.asarray(rate, dtype=np.float64)
        q = np.asarray(quality, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{which}: rates and qualities must be numbers (got text)") from None
    if r.ndim != 1 or q.ndim != 1:
        raise ValueError(f"{which}: rates and qualities must be flat sequences of numbers")
    if len(r) != len(q):
        raise ValueError(f"{which}: {len(r)} rates but {len(q)} quality values")
    if len(r) < MIN_POINTS:
        raise ValueError(f"{which}: {len(r)} R-D point(s); PCHIP BD-rate needs at least {MIN_POINTS}")
    if not (np.isfinite(r).all() and np.isfinite(q).all()):
        raise ValueError(f"{which}: rates and qualities must be finite (got NaN, infinity or None)")
    if (r <= 0).any():
        raise ValueError(f"{which}: rates must be positive (BD-rate takes their logarithm)")
    order = np.argsort(q, kind="stable")
    r, q = r[order], q[order]
    if (np.diff(q) <= 0).any():
        raise ValueError(f"{which}: repeated quality value {q[:-1][np.diff(q) <= 0][0]:g}")
    if (np.diff(r) <= 0).any():
        i = int(np.flatnonzero(np.diff(r) <= 0)[0])
        raise ValueError(
            f"{which}: rate does not increase with quality (rate {r[i]:g} at quality {q[i]:g}, "
            f"{r[i + 1]:g} at {q[i + 1]:g})"
        )
    return np.stack([r, q])


def bd_rate(
    rate_anchor: Sequence[float],
    quality_anchor: Sequence[float],
    rate_test: Sequence[float],
    quality_test: Sequence[float],
) -> BDRate:
    """BD-rate of the test curve against the anchor, in percent (PCHIP; see the module docstring).

    Args:
        rate_anchor, quality_anchor: the anchor's points, e.g. bpp and PSNR (dB); any order.
        rate_test, quality_test: the test codec's points; their number may differ from the
            anchor's.

    ``quality`` is any higher-is-better metric (PSNR in dB, MS-SSIM in dB, ...); ``rate`` is any
    positive rate (bpp, bytes): only ratios of rates matter.

    Returns:
        A :class:`BDRate`: ``percent``, the average rate difference at equal quality (``-10.0``
        means 10 % fewer bits), the quality ``interval`` integrated over and the ``method``.

    Raises:
        ValueError: (one line) a curve with fewer than :data:`MIN_POINTS` points, mismatched
            lengths, text, a NaN/infinite/``None`` value, a non-positive rate, a repeated quality
            value, a rate that does not strictly increase with quality, or quality ranges that do not
            overlap.
    """
    anchor = _curve(rate_anchor, quality_anchor, "anchor curve")
    test = _curve(rate_test, quality_test, "test curve")
    lo = max(anchor[1, 0], test[1, 0])
    hi = min(anchor[1, -1], test[1, -1])
    if lo >= hi:
        raise ValueError(
            f"quality ranges do not overlap: anchor [{anchor[1, 0]:g}, {anchor[1, -1]:g}], "
            f"test [{test[1, 0]:g}, {test[1, -1]:g}]"
        )
    percent = bjontegaard.bd_rate(
        anchor[0], anchor[1], test[0], test[1], method="pchip", require_matching_points=False
    )
    return BDRate(float(percent), (float(lo), float(hi)))

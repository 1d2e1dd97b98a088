"""Paired contrasts over seeds: the mean of per-seed differences with a Student-t interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["PairedDifference", "paired_difference"]


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

"""``stats.paired_difference``: the paired t-interval over seeds."""

import math

import pytest
from scipy import stats as sps

from energylab.stats import paired_difference


def test_matches_scipy_paired_t_test():
    variant, baseline = [3.1, 2.4, 2.9, 3.3], [1.0, 1.2, 0.7, 1.4]
    result = paired_difference(variant, baseline)
    d = [v - b for v, b in zip(variant, baseline, strict=True)]
    ci = sps.ttest_rel(variant, baseline).confidence_interval(0.95)
    assert result.mean == pytest.approx(sum(d) / 4)
    assert (result.low, result.high) == pytest.approx((ci.low, ci.high))
    assert result.n == 4 and result.inside_noise is False


def test_interval_containing_zero_is_inside_noise():
    result = paired_difference([1.0, -1.0, 0.5], [0.0, 0.0, 0.0])
    assert result.low < 0 < result.high and result.inside_noise is True


def test_drops_incomplete_pairs_and_needs_two():
    result = paired_difference([1.0, None, math.nan, 2.0], [0.0, 1.0, 1.0, math.inf])
    assert (result.mean, result.low, result.high, result.n, result.inside_noise) == (
        1.0, None, None, 1, None)
    assert paired_difference([None], [1.0]).mean is None


def test_lengths_must_match():
    with pytest.raises(ValueError, match="one baseline value per variant value"):
        paired_difference([1.0], [1.0, 2.0])

"""BD-rate (Bjøntegaard, VCEG-M33; PCHIP through the ``bjontegaard`` package)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.interpolate import PchipInterpolator

from energylab.bdrate import METHOD, MIN_POINTS, BDRate, bd_rate

RATES = [0.12, 0.25, 0.5, 0.9]
PSNR = [28.1, 30.4, 32.9, 35.0]


def test_curve_against_itself_is_zero():
    assert bd_rate(RATES, PSNR, RATES, PSNR).percent == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.25, 3.0])
def test_scaled_rates_give_the_factor(factor):
    scaled = [r * factor for r in RATES]
    assert bd_rate(RATES, PSNR, scaled, PSNR).percent == pytest.approx((factor - 1) * 100, rel=1e-9)


def test_order_of_points_does_not_matter():
    order = [2, 0, 3, 1]
    got = bd_rate(RATES, PSNR, [RATES[i] * 0.9 for i in order], [PSNR[i] for i in order]).percent
    assert got == pytest.approx(-10.0, rel=1e-9)


def test_point_counts_may_differ():
    # points on one straight line in (quality, log-rate), where PCHIP is exact
    def rate(q):
        return 10 ** (0.1 * q - 3.5)

    anchor_q, test_q = [28.0, 36.0], [28.0, 31.0, 36.0]
    got = bd_rate([rate(q) for q in anchor_q], anchor_q, [1.1 * rate(q) for q in test_q], test_q).percent
    assert got == pytest.approx(10.0, rel=1e-9)


def test_matches_an_independent_pchip_computation():
    # VCEG-M33 with PCHIP: mean difference of log10-rate interpolants over the common quality range
    test_rates, test_psnr = [0.1, 0.22, 0.41, 1.0], [28.5, 30.2, 33.4, 36.0]
    lo, hi = max(PSNR[0], test_psnr[0]), min(PSNR[-1], test_psnr[-1])

    def mean_log_rate(rates, quality):
        return PchipInterpolator(quality, np.log10(rates)).integrate(lo, hi) / (hi - lo)

    expected = (10 ** (mean_log_rate(test_rates, test_psnr) - mean_log_rate(RATES, PSNR)) - 1) * 100
    result = bd_rate(RATES, PSNR, test_rates, test_psnr)
    assert result.percent == pytest.approx(expected, rel=1e-12)
    assert result.interval == (lo, hi) == (28.5, 35.0)  # the overlapping PSNR range
    assert "pchip" in result.method and "log-rate" in result.method
    assert result.as_dict() == {"percent": result.percent, "interval": [28.5, 35.0], "method": result.method}


def test_better_quality_at_same_rate_saves_bits():
    assert bd_rate(RATES, PSNR, RATES, [q + 0.5 for q in PSNR]).percent < 0


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(st.floats(0.05, 2.0), min_size=MIN_POINTS - 1, max_size=6),
    gains=st.lists(st.floats(0.1, 3.0), min_size=6, max_size=6),
    factor=st.floats(0.2, 5.0),
)
def test_shifted_curve_property(steps, gains, factor):
    rates = np.cumsum([0.05, *steps])
    quality = np.cumsum([25.0, *gains[: len(steps)]])
    got = bd_rate(rates, quality, rates * factor, quality).percent
    assert got == pytest.approx((factor - 1) * 100, rel=1e-7, abs=1e-7)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([0.1], [30.0], RATES, PSNR), "anchor curve: 1 R-D point"),
        ((RATES, PSNR, [0.1], [30.0]), "test curve: 1 R-D point"),
        ((RATES, PSNR[:3], RATES, PSNR), "anchor curve: 4 rates but 3 quality values"),
        ((RATES, PSNR, [0.1, math.nan, 0.5, 0.9], PSNR), "test curve: .*must be finite"),
        ((RATES, [28.0, math.inf, 33.0, 35.0], RATES, PSNR), "anchor curve: .*must be finite"),
        ((RATES, PSNR, RATES, [28.0, None, 33.0, 35.0]), "test curve: .*must be finite"),
        ((RATES, PSNR, RATES, [28.0, "x", 33.0, 35.0]), "test curve: .*must be numbers"),
        ((RATES, PSNR, [0.0, 0.25, 0.5, 0.9], PSNR), "test curve: rates must be positive"),
        ((RATES, PSNR, [-0.1, 0.25, 0.5, 0.9], PSNR), "test curve: rates must be positive"),
        ((RATES, [28.0, 30.0, 30.0, 35.0], RATES, PSNR), "anchor curve: repeated quality value 30"),
        (
            ([0.12, 0.5, 0.25, 0.9], PSNR, RATES, PSNR),
            r"anchor curve: rate does not increase with quality \(rate 0.5 at quality 30.4",
        ),
        ((RATES, PSNR, [0.1, 0.1, 0.5, 0.9], PSNR), "test curve: rate does not increase"),
        (
            (RATES, PSNR, RATES, [40.0, 41.0, 42.0, 43.0]),
            r"quality ranges do not overlap: anchor \[28.1, 35\], test \[40, 43\]",
        ),
        ((RATES, PSNR, RATES, [35.0, 36.0, 37.0, 38.0]), "quality ranges do not overlap"),
    ],
)
def test_bad_inputs_raise_one_line(args, message):
    with pytest.raises(ValueError, match=message) as info:
        bd_rate(*args)
    assert "\n" not in str(info.value)


def test_returns_a_result_carrying_its_method_and_interval():
    result = bd_rate(RATES, PSNR, [r * 0.8 for r in RATES], [q + 0.3 for q in PSNR])
    assert isinstance(result, BDRate) and type(result.percent) is float
    assert float(result) == result.percent
    assert result.interval == (PSNR[0] + 0.3, PSNR[-1])
    assert result.method == METHOD

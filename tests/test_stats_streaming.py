"""Streamed moments without cancellation (issue 17, "streaming variance cancellation").

A channel that is constant at a large mean, streamed in many small updates, must keep a variance of
0 (so its coding gain is None, not a number made by rounding); no variance may come out negative;
streamed results must equal a one-shot two-pass float64 computation on random data with large
means, whatever the update sizes. Every place that subtracts a mean from accumulated sums is
covered: ChannelStats (plain, per image, merged), SpatialCorrelation, SubbandEnergy's centred
shares and the pooling of per-image sums in bootstrap_intervals.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from energylab.stats import (
    ChannelStats,
    SpatialCorrelation,
    SubbandEnergy,
    bootstrap_intervals,
    channel_statistics_batched,
    spatial_correlation,
    subband_energy,
)

CONSTANT = 1e5 + 0.1
CONSTANTS = torch.tensor([CONSTANT, -3e5 + 0.7, 7e4 + 0.3, 2.5e5 + 0.9], dtype=torch.float64)
MEANS = torch.tensor([1e5, -2e4, 3e3, 0.0, 5e4], dtype=torch.float64)


def noise(b: int, c: int, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def large_mean_latent(b: int = 24, seed: int = 0) -> torch.Tensor:
    """Correlated channels with means up to 1e5 and spreads down to 0.05 (mean / spread 2e6)."""
    g = torch.Generator().manual_seed(seed + 100)
    spread = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.05], dtype=torch.float64)
    mix = torch.randn(5, 5, generator=g, dtype=torch.float64) * spread[:, None]
    return torch.einsum("dc,bchw->bdhw", mix, noise(b, 5, seed=seed)) + MEANS[:, None, None]


def samples(y: torch.Tensor) -> np.ndarray:
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).numpy()


def stream(metric, y: torch.Tensor, size: int):
    for part in y.split(size):
        metric.update(part)
    return metric


def assert_covariance_close(got: torch.Tensor, want: np.ndarray, rtol: float = 1e-10) -> None:
    """``|S - S_ref| <= rtol sqrt(S_ii S_jj)``: relative to the entry's scale. Float64 means of
    ``1e5`` are known to ``ulp(1e5) = 1.5e-11``, against a spread of 0.05: merged moments agree to
    about ``1e-11``, not to ``eps64``; raw sums minus ``n mu mu^T`` miss by ``1e-4`` here."""
    scale = np.sqrt(np.outer(np.diag(want), np.diag(want)))
    err = np.abs(got.numpy() - want)
    assert (err <= rtol * scale).all(), (err / scale).max()


# ---------------------------------------------------------------- the input


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_large_mean_channel_streamed_has_no_variance_and_no_coding_gain(dtype, per_image):
    m = ChannelStats(4, per_image=per_image)
    for step in range(300):  # many small updates
        y = noise(2, 4, seed=step)
        y[:, 0] = CONSTANT
        m.update(y.to(dtype))
    cov = m.compute()["covariance"]
    assert abs(float(cov[0, 0])) <= 1e-18  # exactly 0 up to the rounding of a float64 mean
    assert float(cov[0, 1:].abs().max()) <= 1e-10
    out = m.statistics()
    assert out["coding_gain"] is None  # undefined: one channel has no variance
    assert out["klt_coding_gain"] is None and out["total_correlation"] is None
    assert out["numerical_rank"] == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_negative_variance_and_off_diagonals_within_the_cauchy_schwarz_bound(dtype):
    m = ChannelStats(5)
    for step in range(400):
        y = torch.cat([CONSTANTS.view(1, 4, 1, 1).expand(2, 4, 8, 8), noise(2, 1, seed=step)], 1)
        m.update(y.to(dtype))
    cov = m.compute()["covariance"].numpy()
    var = np.diag(cov)
    assert (var >= 0).all(), var
    assert (var[:4] <= 1e-18).all(), var
    assert (np.abs(cov) <= np.sqrt(np.outer(var, var))).all()
    assert m.statistics()["numerical_rank"] == 1


# ---------------------------------------------------------------- random data with large means


@pytest.mark.parametrize("size", [1, 5, 24])
def test_streamed_equals_one_shot_two_pass_float64(size):
    y = large_mean_latent()
    x = samples(y)
    for m in (ChannelStats(5), ChannelStats(5, per_image=True)):
        out = stream(m, y, size).compute()
        np.testing.assert_allclose(out["mean"].numpy(), x.mean(0), rtol=1e-13, atol=1e-13)
        assert_covariance_close(out["covariance"], np.cov(x.T))
        np.testing.assert_allclose(out["energies"].numpy(), (x**2).mean(0), rtol=1e-12)


def test_update_sizes_rows_images_and_merges_give_the_same_numbers():
    y = large_mean_latent(seed=1)
    results = [stream(ChannelStats(5), y, size).compute() for size in (1, 3, 24)]
    rows = torch.from_numpy(samples(y))
    results.append(stream(ChannelStats(5), rows, 37).compute())  # (N, C) updates of 37 rows
    results.append(stream(ChannelStats(5, per_image=True), y, 7).compute())
    left, right = stream(ChannelStats(5), y[:10], 2), stream(ChannelStats(5), y[10:], 14)
    results.append(left.merge(right).compute())
    first = results[0]
    ref = first["covariance"].numpy()
    for out in results[1:]:
        assert int(out["count"]) == int(first["count"])
        torch.testing.assert_close(out["mean"], first["mean"], rtol=1e-14, atol=1e-14)
        assert_covariance_close(out["covariance"], ref)


# ---------------------------------------------------------------- the siblings


def test_spatial_correlation_of_a_constant_large_mean_channel_and_of_large_means():
    y = noise(12, 3, seed=2)
    y = y + 0.7 * y.roll(1, 3) + 0.5 * y.roll(1, 2)  # correlated along both axes
    reference = spatial_correlation(y)
    with_constant = torch.cat([torch.full((12, 1, 8, 8), CONSTANT, dtype=torch.float64), y], 1)
    streamed = stream(SpatialCorrelation(4), with_constant, 1).compute()
    for lag in ("0,1", "1,0", "1,1"):
        assert -1 <= float(streamed[lag]) <= 1
        # a channel without variance does not count: the mean over the other three
        assert float(streamed[lag]) == pytest.approx(float(reference[lag]), rel=1e-9, abs=1e-12)
    shifted = stream(SpatialCorrelation(3), y + MEANS[:3, None, None], 1).compute()
    for lag in ("0,1", "1,0", "1,1"):
        assert float(shifted[lag]) == pytest.approx(float(reference[lag]), rel=1e-9, abs=1e-12)


def test_subband_centred_shares_of_constant_large_means_read_white():
    m = SubbandEnergy(2, channels=4)
    for _ in range(100):
        m.update(CONSTANTS.float().view(1, 4, 1, 1).expand(2, 4, 8, 8).contiguous())
    out = m.compute()
    white = {"LL2": 1 / 16, "LH2": 1 / 16, "HL2": 1 / 16, "HH2": 1 / 16, "LH1": 0.25, "HL1": 0.25,
             "HH1": 0.25}  # no centred energy: each band's fraction of the coefficients
    assert {band: float(out[f"{band}_centred"]) for band in m.bands} == pytest.approx(white, abs=1e-12)


def test_subband_centred_shares_with_large_means_match_the_centred_latent():
    y = large_mean_latent(b=12, seed=3)
    m = stream(SubbandEnergy(2, channels=5), y, 1)
    out = m.compute()
    reference = subband_energy(y - y.mean((0, 2, 3), keepdim=True), levels=2)
    for band in m.bands:
        assert float(out[f"{band}_centred"]) == pytest.approx(float(reference[band]), rel=1e-9, abs=1e-14)


def test_bootstrap_pooling_ignores_a_constant_large_mean_channel():
    base = noise(30, 4, seed=4)
    with_constant = torch.cat([torch.full((30, 1, 8, 8), CONSTANT, dtype=torch.float64), base], 1)
    plain, constant = ChannelStats(4, per_image=True), ChannelStats(5, per_image=True)
    plain.update(base)
    constant.update(with_constant)
    want = bootstrap_intervals(*plain.images(), channel_statistics_batched, 50)
    got = bootstrap_intervals(*constant.images(), channel_statistics_batched, 50)
    assert got["coding_gain"] is None and got["total_correlation"] is None  # a channel has no variance
    # statistics over the channels with variance and the non-zero eigenvalues: as without it
    for name in ("effective_rank", "offdiag_energy_ratio"):
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), name

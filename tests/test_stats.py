"""Tests of energylab.stats against independent numpy/scipy/pywt computations."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import pywt
import scipy.linalg
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from energylab.stats import (
    AuxEnergyShare,
    ChannelStats,
    NeighbourhoodTotalCorrelation,
    SpatialCorrelation,
    SubbandEnergy,
    aux_energy_share,
    bootstrap_intervals,
    bootstrap_weights,
    channel_energies,
    channel_statistics_batched,
    coding_gain,
    decorrelation_gain,
    effective_rank,
    energy_compaction_curve,
    energy_shares,
    energy_statistics,
    floored_eigenvalues,
    klt_coding_gain,
    neighbourhood_statistics_batched,
    neighbourhood_total_correlation,
    numerical_rank,
    offdiag_energy_ratio,
    offdiag_energy_ratio_cov,
    percentile_interval,
    rate_shares,
    spatial_correlation,
    subband_energy,
    to_db,
    topk_energy_share,
    total_correlation,
)

FAST = settings(max_examples=20, deadline=None)
SEEDS = st.integers(0, 2**32 - 1)
METRICS = (
    offdiag_energy_ratio,
    coding_gain,
    klt_coding_gain,
    decorrelation_gain,
    total_correlation,
    effective_rank,
)


def random_cov(rng: np.random.Generator, c: int) -> np.ndarray:
    """A well-conditioned covariance with uneven variances and correlations."""
    a = rng.standard_normal((c, c)) * rng.uniform(0.2, 3.0, c)
    return a @ a.T / c + 0.1 * np.eye(c)


def latent(
    rng: np.random.Generator, b: int, c: int, h: int, w: int, mean: float = 0.0
) -> np.ndarray:
    """``(B, C, H, W)`` Gaussian latent whose channel vectors have a random covariance."""
    cov = random_cov(rng, c)
    x = rng.multivariate_normal(rng.normal(mean, 1.0, c), cov, size=(b, h, w))
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def samples(y: np.ndarray) -> np.ndarray:
    """``(B, C, H, W)`` -> ``(N, C)``."""
    return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])


def as_floats(out: dict[str, torch.Tensor], keys=None) -> dict[str, float]:
    """A metric's dict of 0-d tensors as floats (only ``keys``, if given)."""
    return {k: float(out[k]) for k in (out if keys is None else keys)}


def stats_of(y: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    m = ChannelStats(y.shape[1], **kwargs)
    m.update(y)
    return m.compute()


# ---------------------------------------------------------------- ChannelStats vs numpy


@FAST
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 7),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    seed=SEEDS,
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_channel_stats_matches_numpy(b, c, h, w, seed, dtype):
    if b * h * w < 2:
        return
    y = torch.from_numpy(latent(np.random.default_rng(seed), b, c, h, w, mean=2.0)).to(dtype)
    x = samples(y.double().numpy())  # the exact values the metric sees, in float64
    out = stats_of(y)
    assert out["covariance"].dtype == torch.float64
    assert out["count"].item() == len(x)
    np.testing.assert_allclose(out["mean"].numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        out["covariance"].numpy(), np.atleast_2d(np.cov(x.T)), rtol=1e-10, atol=1e-10
    )
    np.testing.assert_allclose(out["energies"].numpy(), (x**2).mean(0), rtol=1e-12)
    # the same samples given as an (N, C) matrix
    flat = stats_of(torch.from_numpy(x).to(dtype))
    np.testing.assert_allclose(flat["covariance"].numpy(), out["covariance"].numpy(), rtol=1e-10)


def test_known_covariance_is_recovered():
    rng = np.random.default_rng(1)
    true = random_cov(rng, 6)
    x = rng.multivariate_normal(np.zeros(6), true, size=200_000)
    m = ChannelStats(6)
    m.update(torch.from_numpy(x).float())
    est = m.compute()["covariance"].numpy()
    np.testing.assert_allclose(est, true, atol=0.03 * np.abs(true).max())
    for f in (coding_gain, klt_coding_gain, decorrelation_gain, effective_rank):
        assert f(est) == pytest.approx(f(true), rel=0.02)


@FAST
@given(seed=SEEDS, cut=st.integers(1, 5), c=st.integers(1, 6))
def test_piecewise_and_merge_equal_one_shot(seed, cut, c):
    y = torch.from_numpy(latent(np.random.default_rng(seed), 6, c, 4, 4, mean=-3.0))
    one = stats_of(y)
    piecewise, left, right = ChannelStats(c), ChannelStats(c), ChannelStats(c)
    for part in y.split(cut):
        piecewise.update(part)
    left.update(y[:cut])
    right.update(y[cut:].reshape(-1, c, 2, 8))  # other spatial shape: same samples
    merged = left.merge(right).compute()
    for out in (piecewise.compute(), merged):
        assert out["count"].item() == one["count"].item()
        for key in ("mean", "covariance", "energies"):
            np.testing.assert_allclose(out[key].numpy(), one[key].numpy(), rtol=1e-11, atol=1e-13)


def test_merge_rejects_other_channel_count():
    with pytest.raises(ValueError):
        ChannelStats(3).merge(ChannelStats(4))


def test_float32_large_mean_keeps_float64_accuracy():
    rng = np.random.default_rng(2)
    y = (1e4 + rng.standard_normal((8, 4, 32, 32)) * [[[1.0]], [[0.5]], [[2.0]], [[1.0]]])
    y32 = torch.from_numpy(y).float()
    x = samples(y32.double().numpy())
    ref = np.cov(x.T)  # two-pass, float64, on the same float32 values
    tol = 1e-6 * np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
    err = np.abs(stats_of(y32)["covariance"].numpy() - ref)
    assert (err < tol).all(), err.max()
    # the tolerance discriminates: the same one-pass formula in float32 misses it by far
    x32 = torch.from_numpy(x).float()
    n = len(x32)
    naive = (x32.T @ x32 - x32.sum(0)[:, None] * x32.sum(0)[None] / n) / (n - 1)
    assert (np.abs(naive.double().numpy() - ref) > 100 * tol).any()


def test_max_positions_subsamples_whole_vectors_reproducibly():
    b, c, h, w = 3, 5, 8, 8
    pos = torch.arange(b * h * w, dtype=torch.float64).reshape(b, 1, h, w)
    y = pos * torch.arange(1.0, c + 1, dtype=torch.float64).reshape(1, c, 1, 1)
    a, a2 = ChannelStats(c, max_positions=50, seed=7), ChannelStats(c, max_positions=50, seed=7)
    other = ChannelStats(c, max_positions=50, seed=8)
    for m in (a, a2, other):
        m.update(y)
        m.update(y)
    out = a.compute()
    assert out["count"].item() == 100
    v = np.arange(1.0, c + 1)  # every sample is pos * v: covariance proportional to v v^T
    cov = out["covariance"].numpy()
    np.testing.assert_allclose(cov / cov[0, 0], np.outer(v, v), rtol=1e-12)
    assert torch.equal(a.outer, a2.outer)
    assert not torch.equal(a.outer, other.outer)
    rows = samples(y.numpy())  # (N, C) input follows the same path
    flat = ChannelStats(c, max_positions=10)
    flat.update(torch.from_numpy(rows))
    assert flat.compute()["count"].item() == 10
    full = ChannelStats(c, max_positions=b * h * w)  # no subsampling needed
    full.update(y)
    np.testing.assert_allclose(full.compute()["covariance"].numpy(), np.cov(rows.T), rtol=1e-12)


def test_channel_stats_errors():
    m = ChannelStats(3)
    with pytest.raises(ValueError):
        m.update(torch.zeros(2, 4, 2, 2))
    with pytest.raises(ValueError):
        m.update(torch.zeros(2, 3, 2))
    with pytest.raises(TypeError):
        m.update(torch.zeros(2, 3, dtype=torch.int64))
    m.update(torch.zeros(1, 3))
    with pytest.raises(ValueError):
        m.compute()
    with pytest.raises(ValueError):
        ChannelStats(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_does_not_sync_on_cuda():
    y = torch.randn(4, 16, 8, 8, device="cuda")
    metrics = (ChannelStats(16, max_positions=100), SubbandEnergy(), SpatialCorrelation(16))
    for m in metrics:
        m.update(y)  # first call moves the states: not part of the hook's steady state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for m in metrics:
            m.update(y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metrics[0].outer.device.type == "cuda"
    assert metrics[0].compute()["count"].item() == 200


# ---------------------------------------------------------------- covariance metrics vs scipy


@FAST
@given(c=st.integers(1, 12), seed=SEEDS)
def test_metrics_match_scipy(c, seed):
    cov = random_cov(np.random.default_rng(seed), c)
    var = np.diag(cov)
    lam = scipy.linalg.eigh(cov, eigvals_only=True)
    assert floored_eigenvalues(cov) == 0
    assert coding_gain(cov) == pytest.approx(var.mean() / scipy.stats.gmean(var), rel=1e-12)
    assert klt_coding_gain(cov) == pytest.approx(lam.mean() / scipy.stats.gmean(lam), rel=1e-10)
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    assert decorrelation_gain(cov) == pytest.approx(
        math.exp((np.log(var).sum() - logdet) / c), rel=1e-10
    )
    h_joint = scipy.stats.multivariate_normal(np.zeros(c), cov).entropy()
    h_marginals = sum(scipy.stats.norm(scale=math.sqrt(v)).entropy() for v in var)
    assert total_correlation(cov) == pytest.approx(h_marginals - h_joint, rel=1e-8, abs=1e-10)
    assert effective_rank(cov) == pytest.approx(math.exp(scipy.stats.entropy(lam)), rel=1e-10)
    off = cov - np.diag(var)
    assert offdiag_energy_ratio_cov(cov) == pytest.approx((off**2).sum() / (cov**2).sum(), abs=1e-14)
    corr = cov / np.sqrt(np.outer(var, var))
    assert offdiag_energy_ratio(cov) == pytest.approx(((corr - np.eye(c)) ** 2).sum() / (corr**2).sum(),
                                                      abs=1e-14)
    for f in METRICS:  # torch input, any dtype: same values
        assert f(torch.from_numpy(cov)) == f(cov)


@FAST
@given(c=st.integers(1, 10), seed=SEEDS, n=st.sampled_from([None, 20, 1000]))
def test_log_identity_holds(c, seed, n):
    cov = random_cov(np.random.default_rng(seed), c)
    lhs = math.log(klt_coding_gain(cov, n))
    rhs = math.log(coding_gain(cov, n)) + math.log(decorrelation_gain(cov, n))
    assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-9)
    assert math.log(decorrelation_gain(cov, n)) == pytest.approx(2 * total_correlation(cov, n) / c, rel=1e-12)


@FAST
@given(c=st.integers(2, 10), seed=SEEDS)
def test_invariances(c, seed):
    rng = np.random.default_rng(seed)
    cov = random_cov(rng, c)
    q = scipy.stats.ortho_group.rvs(c, random_state=rng)
    rotated = q @ cov @ q.T
    assert klt_coding_gain(rotated) == pytest.approx(klt_coding_gain(cov), rel=1e-9)
    assert effective_rank(rotated) == pytest.approx(effective_rank(cov), rel=1e-9)
    for f in METRICS:  # all scale-free
        assert f(37.0 * cov) == pytest.approx(f(cov), rel=1e-9, abs=1e-12)
    # equal variances, any correlation: no energy modulation
    d = 1 / np.sqrt(np.diag(cov))
    corr = cov * np.outer(d, d)
    assert coding_gain(corr) == pytest.approx(1.0, abs=1e-12)
    assert decorrelation_gain(corr) > 1.0
    # diagonal: nothing left to decorrelate
    diag = np.diag(np.diag(cov))
    assert decorrelation_gain(diag) == pytest.approx(1.0, abs=1e-12)
    assert total_correlation(diag) == pytest.approx(0.0, abs=1e-12)
    assert offdiag_energy_ratio(diag) == 0.0
    assert klt_coding_gain(diag) == pytest.approx(coding_gain(diag), rel=1e-12)


def test_singular_covariances_give_rank_and_none_never_floor_made_values():
    rng = np.random.default_rng(3)
    cov = random_cov(rng, 5)
    dead = cov.copy()
    dead[:, 1] = dead[1, :] = 0.0
    twin = np.pad(cov, ((0, 1), (0, 1)))
    twin[5, :5] = twin[:5, 5] = cov[0]
    twin[5, 5] = cov[0, 0]  # channel 5 copies channel 0: rank deficient, every variance > 0
    infinite = ("klt_coding_gain", "decorrelation_gain", "total_correlation", "total_correlation_plugin")
    for name, c, rank in (("dead", dead, 4), ("twin", twin, 5)):
        stats = energy_statistics(c, np.diag(c) + 1.0, n=1000)
        assert stats["numerical_rank"] == rank, name
        assert all(stats[key] is None for key in infinite), name
        assert json.loads(json.dumps(stats)) == stats  # None is JSON null
    # finite ones on the non-degenerate subspace: exactly the values without the dead channel
    alive = np.delete(np.delete(dead, 1, 0), 1, 1)
    assert energy_statistics(dead, np.ones(5))["coding_gain"] is None  # a zero variance
    assert offdiag_energy_ratio(dead) == pytest.approx(offdiag_energy_ratio(alive), rel=1e-12)
    assert effective_rank(dead) == pytest.approx(effective_rank(alive), rel=1e-12)
    assert coding_gain(twin) == pytest.approx(coding_gain(np.diag(np.diag(twin))), rel=1e-12)
    zero = energy_statistics(np.zeros((4, 4)), np.zeros(4))
    assert zero["numerical_rank"] == 0
    undefined = (*infinite, "coding_gain", "effective_rank", "offdiag_energy_ratio")
    assert all(zero[key] is None for key in undefined)
    single = {f.__name__: f(np.array([[2.5]])) for f in METRICS}
    assert single == pytest.approx(
        {k: 0.0 if k in ("offdiag_energy_ratio", "total_correlation") else 1.0 for k in single},
        abs=1e-12,
    )


def test_rank_r_covariance_reports_rank_r():
    rng = np.random.default_rng(9)
    for r in (1, 3, 7):
        a = rng.standard_normal((8, r))
        cov = a @ a.T
        assert numerical_rank(cov) == r
        assert total_correlation(cov) is None and decorrelation_gain(cov, n=500) is None
        assert klt_coding_gain(cov) is None
        assert effective_rank(cov) <= r + 1e-9
    # from data: 12 channels driven by 5 sources, through ChannelStats in float32
    y = torch.from_numpy(rng.standard_normal((4000, 5)) @ rng.standard_normal((5, 12))).float()
    m = ChannelStats(12)
    m.update(y)
    stats = m.statistics()
    assert stats["numerical_rank"] == 5 and stats["total_correlation"] is None


def test_channel_stats_with_dead_channel():
    y = torch.randn(2, 4, 8, 8)
    y[:, 2] = 5.0  # constant channel: zero variance, non-zero energy
    stats = ChannelStats(4)
    stats.update(y)
    out = stats.statistics(k=1)
    assert out["numerical_rank"] == 3 and out["coding_gain"] is None and out["total_correlation"] is None
    assert math.isfinite(out["effective_rank"]) and math.isfinite(out["offdiag_energy_ratio"])
    assert out["topk_energy_share"] > 0.5  # the constant channel holds most energy


def test_covariance_input_errors():
    for bad in (np.zeros((2, 3)), np.zeros(3), np.zeros((0, 0)), np.full((2, 2), np.nan)):
        with pytest.raises(ValueError):
            coding_gain(bad)


# ---------------------------------------------------------------- energies, dict, dB


def test_energy_compaction_curve_and_topk():
    e = np.array([1.0, 6.0, 0.0, 3.0])
    np.testing.assert_allclose(energy_compaction_curve(e), [0.6, 0.9, 1.0, 1.0])
    np.testing.assert_allclose(energy_compaction_curve(torch.tensor(e)), [0.6, 0.9, 1.0, 1.0])
    assert topk_energy_share(e, 2) == pytest.approx(0.9)
    np.testing.assert_allclose(energy_compaction_curve(np.zeros(4)), [0.25, 0.5, 0.75, 1.0])
    for k in (0, 5):
        with pytest.raises(ValueError):
            topk_energy_share(e, k)
    with pytest.raises(ValueError):
        energy_compaction_curve([1.0, -1.0])


def test_energy_statistics_dict():
    rng = np.random.default_rng(4)
    cov = random_cov(rng, 20)
    energies = np.diag(cov) + 1.0
    stats = energy_statistics(torch.from_numpy(cov), energies)
    assert list(stats) == [
        "offdiag_energy_ratio",
        "coding_gain",
        "klt_coding_gain",
        "decorrelation_gain",
        "total_correlation",
        "total_correlation_plugin",
        "effective_rank",
        "topk_energy_share",
        "topk_k",
        "numerical_rank",
    ]
    assert stats["topk_k"] == 2  # round(20 / 8)
    assert stats["topk_energy_share"] == topk_energy_share(energies, 2)
    for f in METRICS:
        assert stats[f.__name__] == f(cov)
    assert json.loads(json.dumps(stats, allow_nan=False)) == stats
    assert energy_statistics(cov[:1, :1], energies[:1])["topk_k"] == 1
    assert energy_statistics(cov, energies, k=5)["topk_energy_share"] == pytest.approx(
        energy_compaction_curve(energies)[4]
    )


def test_to_db():
    assert to_db(10.0) == pytest.approx(10.0)
    assert to_db(2.0) == pytest.approx(3.0103, abs=1e-4)
    assert to_db(1.0) == 0.0
    with pytest.raises(ValueError):
        to_db(0.0)


# ---------------------------------------------------------------- subbands and spatial correlation


def pywt_shares(y: np.ndarray, levels: int, wavelet: str) -> dict[str, float]:
    energy: dict[str, float] = {}
    for img in y.reshape(-1, *y.shape[2:]):
        coeffs = pywt.wavedec2(img, wavelet, mode="periodization", level=levels)
        bands = {f"LL{levels}": coeffs[0]}
        for lv, (ch, cv, cd) in zip(range(levels, 0, -1), coeffs[1:], strict=True):
            bands |= {f"LH{lv}": ch, f"HL{lv}": cv, f"HH{lv}": cd}
        for k, v in bands.items():
            energy[k] = energy.get(k, 0.0) + float((v**2).sum())
    total = sum(energy.values())
    return {k: v / total for k, v in energy.items()}


@pytest.mark.filterwarnings("ignore:Level value:UserWarning")  # pywt: boundary effects, fine
@FAST
@given(
    levels=st.integers(1, 3),
    wavelet=st.sampled_from(["haar", "db2"]),
    seed=SEEDS,
    b=st.integers(1, 2),
    c=st.integers(1, 3),
)
def test_subband_energy_matches_pywt(levels, wavelet, seed, b, c):
    y = np.random.default_rng(seed).standard_normal((b, c, 16, 8)).cumsum(-1)  # low-pass heavy
    out = subband_energy(torch.from_numpy(y), levels, wavelet)
    ref = pywt_shares(y, levels, wavelet)
    names = [f"LL{levels}"] + [f"{band}{lv}" for lv in range(levels, 0, -1) for band in ("LH", "HL", "HH")]
    assert list(out) == [*names, "count", "nonfinite"]
    assert all(v.dtype == torch.float64 and v.dim() == 0 for v in out.values())
    assert (out["count"].item(), out["nonfinite"].item()) == (b, 0)
    shares = as_floats(out, names)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    for k in ref:
        assert shares[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12)


def test_subband_energy_streams_and_conserves_energy():
    y = torch.randn(4, 3, 16, 16) + 2.0
    m = SubbandEnergy(levels=2)
    for part in y.split(1):
        m.update(part.float())
    assert m.energy.sum().item() == pytest.approx((y.double() ** 2).sum().item(), rel=1e-6)
    once = as_floats(subband_energy(y))
    for k, v in as_floats(m.compute()).items():
        assert v == pytest.approx(once[k], rel=1e-6)
    assert once["LL2"] > 0.5  # the mean lives in LL
    white = as_floats(subband_energy(torch.zeros(1, 2, 8, 8)))
    assert white["LL2"] == pytest.approx(1 / 16) and white["HH1"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError):
        subband_energy(torch.zeros(1, 1, 6, 8), levels=2)


def reference_correlation(y: np.ndarray, lag: tuple[int, int], valid: np.ndarray | None = None) -> float:
    """Independent per-channel loop: two-pass centred products over the valid pairs; ``valid``
    ``(B, H, W)`` marks the positions that count (default: all)."""
    dh, dw = lag
    b, c, h, w = y.shape
    valid = np.ones((b, h, w), bool) if valid is None else valid
    rhos = []
    for ch in range(c):
        v = y[:, ch][valid]
        if v.var() <= 1e-12:
            continue
        z = y[:, ch] - v.mean()
        prods = [
            z[k, i, j] * z[k, i + dh, j + dw]
            for k in range(b)
            for i in range(h)
            for j in range(w)
            if 0 <= i + dh < h and 0 <= j + dw < w and valid[k, i, j] and valid[k, i + dh, j + dw]
        ]
        rhos.append(np.mean(prods) / v.var())
    return float(np.mean(rhos)) if rhos else 0.0


@FAST
@given(seed=SEEDS, b=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(3, 7))
def test_spatial_correlation_matches_reference(seed, b, c, h):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((b, c, h, h + 1)).cumsum(-1) + rng.normal(0, 3, (1, c, 1, 1))
    lags = ((0, 1), (1, 0), (1, 1), (1, -2), (-2, 0))
    out = as_floats(spatial_correlation(torch.from_numpy(y), lags))
    assert list(out) == ["0,1", "1,0", "1,1", "1,-2", "-2,0", "count", "nonfinite"]
    assert (out["count"], out["nonfinite"]) == (b * h * (h + 1), 0)
    for lag in lags:
        assert out[f"{lag[0]},{lag[1]}"] == pytest.approx(
            reference_correlation(y, lag), rel=1e-8, abs=1e-10
        )


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # merged into a fresh metric
def test_spatial_correlation_known_field_dead_channel_and_streaming():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 2, 33, 33))
    y = x[:, :, :32, :32] + x[:, :, :32, 1:]  # MA(1) along W: rho(0,1) = 1/2, rho(1,0) = 0
    out = as_floats(spatial_correlation(torch.from_numpy(y)), ["0,1", "1,0", "1,1"])
    assert out["0,1"] == pytest.approx(0.5, abs=0.03)
    assert out["1,0"] == pytest.approx(0.0, abs=0.03)
    with_dead = np.concatenate([y, np.full((8, 1, 32, 32), 4.0)], 1)
    dead_out = as_floats(spatial_correlation(torch.from_numpy(with_dead)), out)
    assert dead_out == pytest.approx(out, rel=1e-9)
    assert as_floats(spatial_correlation(torch.zeros(1, 2, 4, 4)), out) == {
        "0,1": 0.0, "1,0": 0.0, "1,1": 0.0
    }
    left, right = SpatialCorrelation(2), SpatialCorrelation(2)
    left.update(torch.from_numpy(y[:3]))
    right.update(torch.from_numpy(y[3:]).float())
    merged = SpatialCorrelation(2).merge(left).merge(right).compute()
    assert as_floats(merged, out) == pytest.approx(out, rel=1e-6)
    with pytest.raises(ValueError):
        spatial_correlation(torch.zeros(1, 1, 2, 8), lags=((2, 0),))
    with pytest.raises(ValueError):
        left.update(torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------- non-finite input, no data, casts

METRIC_CLASSES = (ChannelStats, SubbandEnergy, SpatialCorrelation, AuxEnergyShare)


def make_metric(cls: type, c: int):
    return cls() if cls in (SubbandEnergy, AuxEnergyShare) else cls(c)


def feed(metric, y: torch.Tensor) -> None:
    if isinstance(metric, AuxEnergyShare):
        metric.update(y, 2.0 * y)
    else:
        metric.update(y)


@FAST
@given(seed=SEEDS, bad=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 7),
                                          st.integers(0, 7)), min_size=1, max_size=6),
       value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_nonfinite_samples_are_skipped_and_counted(seed, bad, value):
    rng = np.random.default_rng(seed)
    y = latent(rng, 3, 4, 8, 8, mean=1.0)
    dirty = y.copy()
    for b, c, h, w in bad:
        dirty[b, c, h, w] = value
    valid = np.isfinite(dirty).all(1)  # (B, H, W): the positions left
    x = samples(y)[valid.reshape(-1)]
    t = torch.from_numpy(dirty)
    # ChannelStats: the covariance of the finite samples only
    out = stats_of(t)
    assert (out["count"].item(), out["nonfinite"].item()) == (len(x), (~valid).sum())
    if len(x) >= 2:
        np.testing.assert_allclose(out["covariance"].numpy(), np.cov(x.T), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out["energies"].numpy(), (x**2).mean(0), rtol=1e-12)
    # SpatialCorrelation: positions (and the pairs they end) skipped
    corr = spatial_correlation(t)
    assert (corr["count"].item(), corr["nonfinite"].item()) == (valid.sum(), (~valid).sum())
    for lag in ((0, 1), (1, 0), (1, 1)):
        ref = reference_correlation(y, lag, valid)
        assert float(corr[f"{lag[0]},{lag[1]}"]) == pytest.approx(ref, rel=1e-8, abs=1e-10)
    # SubbandEnergy: whole images skipped
    images = np.isfinite(dirty).reshape(3, -1).all(1)
    if images.any():
        bands = subband_energy(t)
        assert (bands["count"].item(), bands["nonfinite"].item()) == (images.sum(), (~images).sum())
        clean = subband_energy(torch.from_numpy(y[images]))
        assert as_floats(bands, SubbandEnergy().bands) == pytest.approx(
            as_floats(clean, SubbandEnergy().bands), rel=1e-12
        )
    # AuxEnergyShare: positions of either tensor skipped
    share = AuxEnergyShare()
    share.update(t, torch.from_numpy(y + 1.0))
    mask = valid[:, None]
    expected = (np.where(mask, y, 0) ** 2).sum() / (np.where(mask, y + 1.0, 0) ** 2).sum()
    assert float(share.compute()["aux_energy_share"]) == pytest.approx(expected, rel=1e-12)


def test_one_nan_no_longer_zeroes_or_poisons():
    """The two failures of issue 9: one NaN made every lag 0.0 and the subband shares NaN."""
    y = torch.from_numpy(np.random.default_rng(6).standard_normal((4, 3, 8, 8)).cumsum(-1))
    before = (spatial_correlation(y), subband_energy(y[1:]))
    y[0, 1, 2, 3] = math.nan
    corr, bands = spatial_correlation(y), subband_energy(y)
    assert float(corr["0,1"]) > 0.5 and float(corr["0,1"]) == pytest.approx(float(before[0]["0,1"]), abs=0.05)
    assert all(math.isfinite(float(v)) for v in bands.values())
    assert as_floats(bands) == pytest.approx(as_floats(before[1]) | {"count": 3.0, "nonfinite": 1.0})


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # torchmetrics' own warning, too
@pytest.mark.parametrize("cls", METRIC_CLASSES, ids=lambda c: c.__name__)
def test_no_data_is_a_one_line_error_naming_the_metric(cls):
    with pytest.raises(ValueError, match=f"^{cls.__name__}: no data"):
        make_metric(cls, 2).compute()
    metric = make_metric(cls, 2)
    feed(metric, torch.full((2, 2, 4, 4), math.nan))
    with pytest.raises(ValueError, match=f"^{cls.__name__}: every sample was non-finite") as err:
        metric.compute()
    assert "\n" not in str(err.value)
    feed(metric, torch.ones(2, 2, 4, 4))  # data after all: fine
    assert int(metric.compute()["nonfinite"]) > 0


@pytest.mark.parametrize("cast", ["to_float32", "float", "half", "double", "bfloat16", "set_dtype"])
@pytest.mark.parametrize("cls", METRIC_CLASSES, ids=lambda c: c.__name__)
def test_states_stay_float64_under_parent_casts(cls, cast):
    parent = torch.nn.Module()
    parent.metric = make_metric(cls, 3)
    parent.layer = torch.nn.Linear(2, 2)
    if cast == "to_float32":
        parent.to(torch.float32)
    elif cast == "set_dtype":
        parent.metric.set_dtype(torch.float16)
    else:
        getattr(parent, cast)()
    y = torch.from_numpy(latent(np.random.default_rng(7), 2, 3, 4, 4))  # float64 batch
    feed(parent.metric, y)
    feed(parent.metric, y.float())
    assert all(v.dtype == torch.float64 for v in parent.metric.metric_state.values())
    fresh = make_metric(cls, 3)
    feed(fresh, y)
    feed(fresh, y.float())
    for key, value in fresh.compute().items():
        torch.testing.assert_close(parent.metric.compute()[key], value, rtol=0, atol=0)
    parent.metric.reset()
    assert all(v.dtype == torch.float64 for v in parent.metric.metric_state.values())


def test_metric_collection_merges_through_public_api():
    from torchmetrics import MetricCollection

    y = torch.from_numpy(latent(np.random.default_rng(8), 4, 3, 8, 8))

    def collection() -> MetricCollection:
        return MetricCollection({"channel": ChannelStats(3), "spatial": SpatialCorrelation(3)},
                                compute_groups=False)

    whole, left, right = collection(), collection(), collection()
    whole.update(y)
    left.update(y[:1])
    right.update(y[1:])
    left.compute()  # a value computed before the merge is not served stale afterwards
    for name in ("channel", "spatial"):
        left[name].merge(right[name])
        for key, value in whole[name].compute().items():
            torch.testing.assert_close(left[name].compute()[key], value, rtol=1e-12, atol=1e-12)


def test_functional_one_shots_and_class_metadata():
    y = torch.ones(1, 2, 4, 4)
    assert float(aux_energy_share(y, 2 * y)) == 0.25
    for cls in METRIC_CLASSES:
        assert cls.is_differentiable is False and cls.full_state_update is False
        assert cls.higher_is_better is None


# ---------------------------------------------------------------- two gloo processes


def _ddp_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(6, 5, 8, 8, generator=g) * torch.linspace(0.5, 3.0, 5).reshape(1, 5, 1, 1)


def _make_metrics() -> tuple[ChannelStats, SubbandEnergy, SpatialCorrelation]:
    return ChannelStats(5, per_image=True), SubbandEnergy(levels=2, channels=5), SpatialCorrelation(5)


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = _ddp_data()[[0, 1, 2], ...] if rank == 0 else _ddp_data()[[3, 4, 5], ...]
        metrics = _make_metrics()
        for m in metrics:
            for img in shard.split(2 - rank):  # different update patterns per process
                m.update(img)
        results = [m.compute() for m in metrics]  # torchmetrics all-reduces the sums here
        with metrics[0].sync_context():  # per-image sums: concatenated, rank 0's images first
            results.append(metrics[0].images())
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path: Path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = _make_metrics()
    for m in single:
        m.update(_ddp_data())
    expected = [m.compute() for m in single]
    for rank in range(2):
        stats, shares, corr, images = torch.load(tmp_path / f"rank{rank}.pt")
        for got, want in zip(images, single[0].images(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for key in ("mean", "covariance", "energies", "count", "nonfinite"):
            torch.testing.assert_close(stats[key], expected[0][key], rtol=1e-12, atol=1e-12)
        assert as_floats(shares) == pytest.approx(as_floats(expected[1]), rel=1e-12)
        assert as_floats(corr) == pytest.approx(as_floats(expected[2]), rel=1e-10)


# ---------------------------------------------------------------- issue 10: estimators that carry a verdict


def sample_cov(x: np.ndarray) -> np.ndarray:
    return np.cov(x.T)  # unbiased, n - 1 degrees of freedom


def test_white_gaussian_total_correlation_is_corrected_to_zero():
    rng = np.random.default_rng(10)
    c = 48
    for n, tol in ((8192, 0.1), (512, 0.1)):
        plugin, corrected = [], []
        for _ in range(50):
            cov = sample_cov(rng.standard_normal((n, c)))
            plugin.append(total_correlation(cov))
            corrected.append(total_correlation(cov, n=n))
        assert abs(np.mean(corrected)) < tol, (n, np.mean(corrected))
        # the plug-in value sits at the bias of statistics-notes.md: C(C+1)/(4n) to first order
        assert np.mean(plugin) == pytest.approx(c * (c + 1) / (4 * n), rel=0.15)
    assert np.mean(plugin) > 1.0  # at n = 512 the uncorrected value is far from 0: the test can fail


def test_ar1_across_channels_matches_closed_form():
    rng = np.random.default_rng(11)
    c, rho, n = 48, 0.8, 8192
    true = rho ** np.abs(np.subtract.outer(np.arange(c), np.arange(c)))
    x = rng.multivariate_normal(np.zeros(c), true, size=n)
    closed = -0.5 * (c - 1) * math.log(1 - rho**2)  # log det of an AR(1) correlation: (C-1) log(1-rho^2)
    assert total_correlation(true) == pytest.approx(closed, rel=1e-10)
    assert total_correlation(sample_cov(x), n=n) == pytest.approx(closed, rel=0.02)
    assert decorrelation_gain(sample_cov(x), n=n) == pytest.approx(math.exp(2 * closed / c), rel=0.02)


@FAST
@given(c=st.integers(2, 10), seed=SEEDS)
def test_rescaling_channels_changes_only_scale_dependent_statistics(c, seed):
    rng = np.random.default_rng(seed)
    cov = random_cov(rng, c)
    d = np.diag(rng.uniform(0.1, 10.0, c))
    scaled = d @ cov @ d
    for f in (offdiag_energy_ratio, total_correlation, decorrelation_gain):
        assert f(scaled) == pytest.approx(f(cov), rel=1e-9, abs=1e-12)
    corrected = total_correlation(cov, n=100)
    assert total_correlation(scaled, n=100) == pytest.approx(corrected, rel=1e-9, abs=1e-12)
    assert numerical_rank(scaled) == numerical_rank(cov) == c


def test_covariance_offdiag_ratio_is_not_scale_free():
    cov = np.array([[1.0, 0.6], [0.6, 1.0]])
    d = np.diag([1.0, 3.0])
    assert offdiag_energy_ratio_cov(d @ cov @ d) != pytest.approx(offdiag_energy_ratio_cov(cov), rel=0.05)
    assert offdiag_energy_ratio(d @ cov @ d) == pytest.approx(offdiag_energy_ratio(cov), rel=1e-12)


def ar_field(
    rng: np.random.Generator, b: int, c: int, h: int, w: int, rho_c: float, rho_s: float
) -> np.ndarray:
    """Separable Gaussian field with unit variances: AR(1) along C, H and W."""
    x = rng.standard_normal((b, c, h, w))
    for axis, rho in ((1, rho_c), (2, rho_s), (3, rho_s)):
        x = np.moveaxis(x, axis, 0)
        for i in range(1, len(x)):
            x[i] = rho * x[i - 1] + math.sqrt(1 - rho**2) * x[i]
        x = np.moveaxis(x, 0, axis)
    return x


def test_separable_ar_field_neighbourhood_total_correlation_matches_closed_form():
    rng = np.random.default_rng(12)
    c, k, rho_c, rho_s = 6, 2, 0.5, 0.7
    y = ar_field(rng, 64, c, 32, 32, rho_c, rho_s)  # 64 * 16 * 16 = 16384 blocks of 24 variables
    # joint = -1/2 (C log det R_space + k^2 log det R_channel); the 2x2 block R_space = R_2 (x) R_2
    log_det_space = 4 * math.log(1 - rho_s**2)
    log_det_channel = (c - 1) * math.log(1 - rho_c**2)
    joint = -0.5 * (c * log_det_space + k * k * log_det_channel)
    across_channels = -0.5 * k * k * log_det_channel
    out = neighbourhood_total_correlation(torch.from_numpy(y), k)
    assert out["count"] == 64 * 16 * 16
    assert out["joint"] == pytest.approx(joint, rel=0.02)
    assert out["across_channels"] == pytest.approx(across_channels, rel=0.02)
    assert out["across_positions"] == pytest.approx(joint - across_channels, rel=0.02)
    # streaming in pieces (and in float32) gives the same split
    m = NeighbourhoodTotalCorrelation(c, k)
    for part in torch.from_numpy(y).float().split(16):
        m.update(part)
    numbers = {key: value for key, value in out.items() if key != "bias_correction"}  # "iid": one image
    assert {key: m.split()[key] for key in numbers} == pytest.approx(numbers, rel=1e-5)


def test_neighbourhood_of_white_noise_and_odd_sizes():
    y = torch.randn(32, 3, 9, 7, generator=torch.Generator().manual_seed(13))  # cropped to 8 x 6
    out = neighbourhood_total_correlation(y)
    assert out["count"] == 32 * 4 * 3
    assert abs(out["joint"]) < 0.3 and abs(out["across_positions"]) < 0.3
    with pytest.raises(ValueError):
        neighbourhood_total_correlation(torch.zeros(1, 3, 1, 8))


def test_rate_shares_of_a_model_sum_to_one_and_match_bits_per_channel():
    from energylab.models import build_model

    model = build_model("bmshj2018-factorized", N=8, M=12).eval()
    with torch.no_grad():
        likelihoods = model(torch.rand(2, 3, 64, 64))["likelihoods"]["y"]
    shares = rate_shares(likelihoods)
    assert shares.shape == (12,) and shares.dtype == torch.float64
    assert float(shares.sum()) == pytest.approx(1.0, abs=1e-12)
    p = likelihoods.double().numpy()
    bits = np.array([-np.log2(p[:, ch]).sum() for ch in range(p.shape[1])])
    np.testing.assert_allclose(shares.numpy(), bits / bits.sum(), rtol=1e-10)
    zero, above_one, flat, no_bits = (torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 1.5),
                                      torch.ones(2, 2), torch.ones(1, 2, 2, 2))
    for bad in (zero, above_one, flat, no_bits, torch.full((1, 2, 2, 2), math.nan)):
        with pytest.raises(ValueError):
            rate_shares(bad)


# ---------------------------------------------------------------- issue 10: intervals and energies


def _white_images(seed: int, images: int = 32, side: int = 16, c: int = 48) -> ChannelStats:
    """Per-image ChannelStats of white Gaussian "images": the default probe size is
    ``images * side**2 = 8192`` positions of ``c = 48`` channels."""
    m = ChannelStats(c, per_image=True)
    g = torch.Generator().manual_seed(seed)
    m.update(torch.randn(images, c, side, side, generator=g, dtype=torch.float64))
    return m


def test_white_gaussian_bootstrap_interval_covers_zero_at_default_probe_size():
    # issue 10 done-when: C = 48, 8192 positions (32 images of 16 x 16), 50 draws; 100 replicates
    # keep the test fast (the capture default is 200)
    values, covered, widths = [], 0, []
    for draw in range(50):
        m = _white_images(draw)
        tc = m.statistics()["total_correlation"]
        low, high = bootstrap_intervals(*m.images(), channel_statistics_batched, 100, seed=draw)[
            "total_correlation"
        ]
        values.append(tc)
        covered += low <= 0 <= high
        widths.append(high - low)
    assert abs(np.mean(values)) < 0.1
    assert covered >= 45
    # informative, not just wide: a 95 % normal interval spans ~3.9 sd of the estimate over draws
    sd = np.std(values, ddof=1)
    assert 2 * sd < np.mean(widths) < 8 * sd


def test_bootstrap_intervals_are_seeded():
    m = _white_images(0, images=8, side=8, c=6)
    one = bootstrap_intervals(*m.images(), channel_statistics_batched, 50, seed=3)
    assert one == bootstrap_intervals(*m.images(), channel_statistics_batched, 50, seed=3)
    assert one != bootstrap_intervals(*m.images(), channel_statistics_batched, 50, seed=4)
    assert torch.equal(bootstrap_weights(5, 4, 1), bootstrap_weights(5, 4, 1))
    assert bootstrap_weights(5, 4, 1).sum(1).tolist() == [5.0] * 4
    single = ChannelStats(6, per_image=True)
    single.update(torch.randn(1, 6, 8, 8))
    assert set(bootstrap_intervals(*single.images(), channel_statistics_batched, 10).values()) == {None}
    assert percentile_interval(torch.tensor([1.0, math.nan])) is None


def test_per_image_states_pool_to_the_plain_metric_and_merge():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 4, 6, 6, generator=g) + 3
    plain, per = ChannelStats(4), ChannelStats(4, per_image=True)
    plain.update(y)
    per.update(y[:2])
    per.update(y[2:].flatten(2).transpose(1, 2).reshape(-1, 4))  # a 2-D update is one image
    count, total, outer = per.images()
    assert count.tolist() == [36.0, 36.0, 108.0] and total.shape == (3, 4) and outer.shape == (3, 4, 4)
    for key, value in plain.compute().items():
        torch.testing.assert_close(per.compute()[key], value, rtol=1e-12, atol=1e-12)
    other = ChannelStats(4, per_image=True)
    other.update(y[:1])
    assert len(per.merge(other).images()[0]) == 4
    with pytest.raises(ValueError, match="cannot merge"):
        per.merge(plain)
    with pytest.raises(ValueError, match="per_image=True"):
        plain.images()


def test_batched_statistics_equal_the_scalar_functions():
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    y = torch.einsum("dc,bdhw->bchw", mix, torch.randn(4, 6, 8, 8, generator=g, dtype=torch.float64))
    y = y + torch.arange(6.0, dtype=torch.float64)[:, None, None]  # channel means
    m = ChannelStats(6, per_image=True)
    m.update(y)
    count, total, outer = (x.sum(0, keepdim=True) for x in m.images())
    batched = {k: float(v[0]) for k, v in channel_statistics_batched(count, total, outer, k=2).items()}
    moments = m.compute()
    shares = energy_shares(moments["mean"], moments["energies"], float(moments["count"]), 2)
    scalar = m.statistics(k=2, jackknife=False) | shares  # the i.i.d. formulas, as the batched ones
    scalar["total_correlation_per_channel"] = scalar["total_correlation"] / 6
    for key, value in batched.items():
        assert value == pytest.approx(scalar[key], rel=1e-9, abs=1e-12), key

    nb = NeighbourhoodTotalCorrelation(6, per_image=True)
    nb.update(y)
    split = nb.split(jackknife=False)
    sums = (x.sum(0, keepdim=True) for x in nb.images())
    for key, value in neighbourhood_statistics_batched(*sums).items():
        assert float(value[0]) == pytest.approx(split[key.split(".")[1]], rel=1e-9), key


def test_l2_and_mean_square_shares_on_a_known_case():
    # constant channels 3, 1, 1, 1 over n = 4 positions: mean squares 9, 1, 1, 1 (top-1 share 9/12);
    # L2 norms 2 * (3, 1, 1, 1) (top-1 share 3/6); centred, nothing is left: white, share 1/4
    mean, energies = [3.0, 1.0, 1.0, 1.0], [9.0, 1.0, 1.0, 1.0]
    out = energy_shares(mean, energies, count=4, k=1)
    assert out["topk_share.ms"] == pytest.approx(0.75)
    assert out["topk_share.l2"] == pytest.approx(0.5)
    assert out["topk_share.ms_centred"] == out["topk_share.l2_centred"] == pytest.approx(0.25)
    assert out["mean_energy_fraction"] == pytest.approx(1.0)
    assert channel_energies(mean, energies, 4)["l2"].tolist() == [6.0, 2.0, 2.0, 2.0]


def test_centred_energies_and_subbands_remove_a_constant_offset():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, 8, 8, generator=g, dtype=torch.float64) * torch.arange(1.0, 6.0)[:, None, None]
    offset = torch.tensor([10.0, -4.0, 0.0, 2.0, 7.0], dtype=torch.float64)[:, None, None]

    def shares(y: torch.Tensor) -> dict:
        m = ChannelStats(5)
        m.update(y)
        out = m.compute()
        return energy_shares(out["mean"], out["energies"], float(out["count"]), k=2)

    plain, shifted = shares(z), shares(z + offset)
    for kind in ("l2_centred", "ms_centred"):
        assert shifted[f"topk_share.{kind}"] == pytest.approx(plain[f"topk_share.{kind}"], rel=1e-9)
    assert shifted["topk_share.ms"] != pytest.approx(plain["topk_share.ms"], rel=1e-3)
    sub = SubbandEnergy(2, channels=5)
    sub.update(z + offset)
    centred_ref = subband_energy(z - z.mean((0, 2, 3), keepdim=True), levels=2)
    out = sub.compute()
    for band in sub.bands:
        assert float(out[f"{band}_centred"]) == pytest.approx(float(centred_ref[band]), rel=1e-9, abs=1e-12)
    assert float(out["LL2"]) > 0.5 > float(out["LL2_centred"])

"""The functional layer of the streaming metrics of :mod:`energylab.stats.metrics`.

In the torchmetrics shape: for each metric, ``_<name>_update`` turns one batch into float64 sums
(torch functions, no host synchronisation) and ``_<name>_compute`` turns accumulated sums into
values; the ``Metric`` classes are thin layers over them. Also the shared checks: the non-finite
rule (:func:`_finite`) and the no-data rule (:func:`_check_data`) of :mod:`energylab.stats.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from energylab.stats.dependence import effective_sample_size
from energylab.stats.estimators import EIGENVALUE_FLOOR
from energylab.wavelets import dwt2

__all__: list[str] = []  # private helpers: the public layer is energylab.stats.metrics

_CHUNK_ELEMENTS = {"cpu": 2**20}
"""float64 elements cast per accumulation step, by device type: 8 MiB on the CPU, where the cast
then stays in cache beside the GEMM; 256 MiB elsewhere (fewer, larger kernels)."""
_DEFAULT_CHUNK_ELEMENTS = 2**25


def _f64_zeros(*shape: int) -> Tensor:
    return torch.zeros(shape, dtype=torch.float64)


def _check_float(y: Tensor, name: str) -> None:
    if not y.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {y.dtype}")


def _finite(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """Which samples along ``dim`` hold only finite values: a float64 sum over ``dim`` is finite
    (one pass; ``isfinite(x).all(dim)`` reduces slowly across a strided dimension). Finite values
    whose float64 sum overflows (above ~1e308) also count as non-finite."""
    return torch.isfinite(x.sum(dim, keepdim=keepdim, dtype=torch.float64))


def _check_data(name: str, count: Tensor, nonfinite: Tensor, needed: int = 1) -> None:
    """The no-data rule of :mod:`energylab.stats.metrics` (this is where ``compute`` waits for the
    host)."""
    n, skipped = int(count), int(nonfinite)
    if n >= needed:
        return
    if skipped:
        raise ValueError(f"{name}: every sample was non-finite ({skipped} skipped), no data to compute on")
    if n == 0:
        raise ValueError(f"{name}: no data (compute() before any update)")
    raise ValueError(f"{name}: needs at least {needed} samples, got {n}")


# ---------------------------------------------------------------- stable moments


Moments = tuple[Tensor, ...]
"""``(count, mean, m2, ...)``: a sample count, the mean and the centred sums about that mean."""


def _merge_moments(a: Moments, b: Moments) -> Moments:
    """The moments ``(count, mean, m2)`` (or ``(count, mean)``) of two parts of a sample taken together.

    ``m2`` is the sum of centred outer products ``sum_n (y_n - mean)(y_n - mean)^T`` ``(..., C, C)``,
    or of centred squares ``(..., C)`` for per-channel moments; pairwise update of T. F. Chan,
    G. H. Golub and R. J. LeVeque ("Updating formulae and a pairwise algorithm for computing sample
    variances", Stanford STAN-CS-79-773, 1979; *Am. Stat.* 37, 1983)::

        n = n_a + n_b,   delta = mean_b - mean_a,   mean = mean_a + delta n_b / n
        m2 = m2_a + m2_b + delta delta^T n_a n_b / n

    Nothing cancels: on the diagonal every term is a sum of squares, so a channel that is constant
    keeps ``m2 = 0`` whatever its mean, and the result does not depend (beyond rounding) on how the
    sample was split. A raw ``sum y y^T`` minus ``n mu mu^T`` instead loses about
    ``eps64 (|mu| / s)^2`` of the variance to each rounding of the sums (``eps64 = 1.1e-16``,
    ``s`` the spread): a constant channel of mean ``1e5`` reads a variance of ``1e-6``. An empty part
    (``n = 0``, zero mean) leaves the other unchanged exactly. Leading batch dimensions broadcast;
    no host synchronisation.
    """
    (n_a, mean_a, *m2_a), (n_b, mean_b, *m2_b) = a, b
    n = n_a + n_b
    share = n_b / n.clamp(min=1)
    delta = mean_b - mean_a
    mean = mean_a + delta * share[..., None]
    if not m2_a:
        return n, mean
    (m2_a,), (m2_b,) = m2_a, m2_b
    weight = (n_a * share)[..., None]  # n_a n_b / n
    if m2_a.dim() == mean_a.dim() + 1:
        return n, mean, m2_a + m2_b + (weight * delta)[..., :, None] * delta[..., None, :]
    return n, mean, m2_a + m2_b + weight * delta.square()


def _pool_moments(count: Tensor, mean: Tensor, m2: Tensor) -> Moments:
    """:func:`_merge_moments` of ``G`` parts at once: ``count (G,)``, ``mean (G, C)``, ``m2 (G, C, C)``.

    ``mean = sum_g n_g mean_g / n`` and ``m2 = sum_g m2_g + sum_g n_g d_g d_g^T`` with
    ``d_g = mean_g - mean`` (within plus between parts: the pairwise formula taken ``G`` ways)."""
    n = count.sum()
    pooled = (count @ mean) / n.clamp(min=1)
    d = mean - pooled
    return n, pooled, m2.sum(0) + (d * count[:, None]).T @ d


def _packed_zeros(shapes: Sequence[tuple[int, ...]]) -> Tensor:
    """The empty state of :func:`_pack` for parts of the given ``shapes``."""
    return _f64_zeros(sum(math.prod(shape) for shape in shapes))


def _pack(*parts: Tensor) -> Tensor:
    """Moments as one flat float64 state: torchmetrics reduces each state alone, and a merge needs
    the count, the mean and the centred sums together."""
    return torch.cat([p.reshape(-1) for p in parts])


def _unpack(packed: Tensor, shapes: Sequence[tuple[int, ...]]) -> Moments:
    """The parts of :func:`_pack`'s state (views), of the given ``shapes``."""
    parts = packed.split([math.prod(shape) for shape in shapes])
    return tuple(p.view(shape) for p, shape in zip(parts, shapes, strict=True))


def _reduce_packed(stacked: Tensor, shapes: Sequence[tuple[int, ...]], merge: Callable) -> Tensor:
    """``dist_reduce_fx`` of a packed state: the ``(P, L)`` states of P processes (or of the two
    sides of ``merge_state``) merged in order by ``merge``."""
    rows = [_unpack(row, shapes) for row in stacked.reshape(-1, stacked.shape[-1])]
    merged = rows[0]
    for row in rows[1:]:
        merged = merge(merged, row)
    return _pack(*merged)


def _clamp_covariance(cov: Tensor) -> Tensor:
    """``cov`` ``(..., C, C)`` with its diagonal clamped at 0 and every off-diagonal entry at the
    Cauchy-Schwarz bound ``|S_ij| <= sqrt(S_ii S_jj)``: rounding in sums can leave a variance just
    below 0 or an entry just past the bound; a channel without variance gets a zero row and column."""
    var = torch.diagonal(cov, dim1=-2, dim2=-1).clamp(min=0.0)
    bound = (var[..., :, None] * var[..., None, :]).sqrt()
    out = torch.minimum(torch.maximum(cov, -bound), bound)
    torch.diagonal(out, dim1=-2, dim2=-1).copy_(var)
    return out


# ---------------------------------------------------------------- functional layer: ChannelStats


def _channel_moment_shapes(channels: int) -> list[tuple[int, ...]]:
    """Shapes of ``(count, mean, m2)`` of :class:`~energylab.stats.metrics.ChannelStats`."""
    return [(), (channels,), (channels, channels)]


def _check_channel_input(y: Tensor, channels: int) -> None:
    if y.dim() not in (2, 4) or y.shape[1] != channels:
        raise ValueError(
            f"ChannelStats: expected (B, {channels}, H, W) or (N, {channels}), got {tuple(y.shape)}"
        )
    _check_float(y, "ChannelStats")


def _channel_stats_update(y: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float64 moments of the samples of ``y`` ``(B, C, H, W)`` or ``(N, C)``: ``(count, mean, m2,
    nonfinite)``, each chunk centred at its own mean and the chunks merged by
    :func:`_merge_moments`. Samples holding a non-finite value are left out and counted in
    ``nonfinite``. No host synchronisation."""
    _check_channel_input(y, channels)
    y = y.detach()
    c, device = channels, y.device
    chunk = _CHUNK_ELEMENTS.get(device.type, _DEFAULT_CHUNK_ELEMENTS)
    step = max(1, chunk // c)  # samples per float64 chunk
    if y.dim() == 2:
        parts = [x.T for x in y.split(step)]  # (C, m) views
    else:  # groups of images as (C, g, H*W) views
        b, _, h, w = y.shape
        parts = y.reshape(b, c, h * w).split(max(1, step // (h * w)))
        parts = [p.transpose(0, 1) for p in parts]
    moments = tuple(torch.zeros(shape, dtype=torch.float64, device=device)
                    for shape in _channel_moment_shapes(c))
    for part in parts:  # cast and transpose in one copy into a fresh (C, m) float64 buffer
        x = torch.empty(part.shape, dtype=torch.float64, device=device).copy_(part)
        x = x.view(c, -1)  # columns are samples
        f = _finite(x, 0).to(torch.float64)  # 1 for the samples kept
        x.nan_to_num_(0.0, 0.0, 0.0)  # finite garbage stays in skipped columns: weighted by f
        m = f.sum()
        mu = (x @ f) / m.clamp(min=1)
        x.sub_(mu[:, None]).mul_(f)
        moments = _merge_moments(moments, (m, mu, x @ x.T))
    count, mean, m2 = moments
    return count, mean, m2, y.numel() // c - count


def _channel_stats_images(y: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_channel_stats_update` of every image of ``y`` ``(B, C, H, W)`` apart, batched:
    ``(count (B,), mean (B, C), m2 (B, C, C), nonfinite (B,))``, each image one chunk centred
    at its own mean; groups of images of at most one chunk's elements share one float64 copy and
    one batched GEMM. No host synchronisation."""
    _check_channel_input(y, channels)
    y = y.detach()
    b, c, h, w = y.shape
    chunk = _CHUNK_ELEMENTS.get(y.device.type, _DEFAULT_CHUNK_ELEMENTS)
    moments = []
    for group in y.split(max(1, chunk // (c * h * w))):
        x = torch.empty(group.shape, dtype=torch.float64, device=y.device).copy_(group)
        x = x.view(len(group), c, h * w)  # columns are samples
        f = _finite(x, 1).to(torch.float64)  # (g, H*W): 1 for the samples kept
        x.nan_to_num_(0.0, 0.0, 0.0)
        m = f.sum(1)
        mu = torch.bmm(x, f[:, :, None]).squeeze(2) / m.clamp(min=1)[:, None]
        x.sub_(mu[:, :, None]).mul_(f[:, None, :])
        moments.append((m, mu, torch.bmm(x, x.transpose(1, 2)), h * w - m))
    count, mean, m2, nonfinite = (torch.cat(v) for v in zip(*moments, strict=True))
    return count, mean, m2, nonfinite


def _raw_sums(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum y, sum y y^T) = (n mean, m2 + n mean mean^T)`` of moments (batched over leading
    dimensions): the additive form, for per-image sums and inspection only, since the raw second
    moment holds the means' part too and subtracting it again cancels."""
    total = count[..., None] * mean
    return total, m2 + total[..., :, None] * mean[..., None, :]


def _channel_stats_compute(
    count: Tensor, mean: Tensor, m2: Tensor, nonfinite: Tensor
) -> dict[str, Tensor]:
    """Mean, unbiased covariance and energies from the moments of :func:`_channel_stats_update`.

    The covariance is ``m2 / (count - 1)``, symmetrised and passed through
    :func:`_clamp_covariance`; the energies are ``E[y_c^2] = mu_c^2 + m2_cc / count``.

    Raises:
        ValueError: fewer than 2 finite samples.
    """
    _check_data("ChannelStats", count, nonfinite, needed=2)
    cov = 0.5 * (m2 + m2.T) / (count - 1)
    return {
        "mean": mean.clone(),
        "covariance": _clamp_covariance(cov),
        "energies": mean.square() + torch.diagonal(m2) / count,
        "count": count.clone(),
        "nonfinite": nonfinite.clone(),
    }


# ---------------------------------------------------------------- functional layer: SubbandEnergy


def _subband_names(levels: int) -> list[str]:
    """``LL{L}``, then ``LH{l}, HL{l}, HH{l}`` for ``l = L..1``."""
    return [f"LL{levels}"] + [f"{b}{lv}" for lv in range(levels, 0, -1) for b in ("LH", "HL", "HH")]


def _subband_centring_shapes(channels: int) -> list[tuple[int, ...]]:
    """Shapes of ``(positions, mean, ll_count, ll_mean, ll_m2)`` of
    :class:`~energylab.stats.metrics.SubbandEnergy`'s centred shares."""
    return [(), (channels,), (), (channels,), (channels,)]


def _merge_subband_centring(a: Moments, b: Moments) -> Moments:
    """:func:`_merge_moments` of the channel means of ``y`` and of the per-channel moments of its
    ``LL{L}`` coefficients."""
    return (*_merge_moments(a[:2], b[:2]), *_merge_moments(a[2:], b[2:]))


def _subband_energy_update(
    y: Tensor, levels: int, wavelet: str
) -> tuple[Tensor, Tensor, Tensor, Moments]:
    """``(energy, count, nonfinite, centring)``: float64 band energies ``(3L+1,)`` of the images of
    ``y`` ``(B, C, H, W)``, images holding a non-finite value left out; counts in images; and over
    the kept images ``centring = (positions, mean, ll_count, ll_mean, ll_m2)``: the per-channel
    ``(C,)`` mean of ``y`` over its positions and the count, mean and centred sum of squares of its
    ``LL{L}`` coefficients."""
    m = 2**levels
    if y.dim() != 4 or y.shape[-2] % m or y.shape[-1] % m:
        raise ValueError(
            f"SubbandEnergy: expected (B, C, H, W) with H, W divisible by {m}, got {tuple(y.shape)}"
        )
    _check_float(y, "SubbandEnergy")
    x = y.detach().to(torch.float64, copy=True)
    kept = _finite(x.flatten(1), 1).to(torch.float64)  # (B,): 1 for the images kept
    x.nan_to_num_(0.0, 0.0, 0.0)  # a skipped image keeps finite garbage: weighted 0 below
    count = kept.sum()
    positions = count * y[0, 0].numel()
    mean = (kept @ x.sum((2, 3))) / positions.clamp(min=1)

    def energy(band: Tensor) -> Tensor:
        return band.square().sum((1, 2, 3)) @ kept

    details = []
    for _ in range(levels):
        x, *bands = dwt2(x, wavelet).chunk(4, 1)
        details.append(torch.stack([energy(band) for band in bands]))
    energies = torch.cat([energy(x).reshape(1), *details[::-1]])
    ll_count = count * x[0, 0].numel()
    ll_mean = (kept @ x.sum((2, 3))) / ll_count.clamp(min=1)
    ll_m2 = kept @ (x - ll_mean[:, None, None]).square().sum((2, 3))
    return energies, count, len(kept) - count, (positions, mean, ll_count, ll_mean, ll_m2)


def _subband_energy_compute(
    energy: Tensor, count: Tensor, nonfinite: Tensor, levels: int
) -> dict[str, Tensor]:
    """Band shares (and ``count``, ``nonfinite`` images) from :func:`_subband_energy_update`'s sums.

    Raises:
        ValueError: no finite image.
    """
    _check_data("SubbandEnergy", count, nonfinite)
    if not energy.any():  # zero energy: white, each band's fraction of the coefficients
        energy = torch.tensor(
            [1.0] + [4.0**lv for lv in range(levels) for _ in range(3)],
            dtype=torch.float64, device=energy.device,
        )
    shares = energy / energy.sum()
    out = dict(zip(_subband_names(levels), shares.unbind(), strict=True))
    return out | {"count": count.clone(), "nonfinite": nonfinite.clone()}


def _subband_energy_centred(energy: Tensor, centring: Moments, levels: int) -> Tensor:
    """Band shares ``(3L+1,)`` of the channel-centred latent (see
    :class:`~energylab.stats.metrics.SubbandEnergy`) from the raw band energies and the centring
    moments; zero centred energy reads as white, as the raw shares do.

    Centring changes ``LL{L}`` only, to ``sum_c sum (LL_c - 2^L mu_c)^2 = sum_c [ll_m2_c +
    ll_count (ll_mean_c - 2^L mu_c)^2]``: a sum of squares, so nothing cancels however large the
    means."""
    positions, mean, ll_count, ll_mean, ll_m2 = centring
    centred = energy.clone()
    centred[0] = (ll_m2 + ll_count * (ll_mean - 2**levels * mean).square()).sum()
    shares = _subband_energy_compute(centred, positions, torch.zeros_like(positions), levels)
    return torch.stack([shares[band] for band in _subband_names(levels)])


# ---------------------------------------------------------------- functional layer: SpatialCorrelation


def _lag_slices(lag: tuple[int, int], h: int, w: int) -> tuple[tuple[slice, slice], ...]:
    """Slices of the first and second element of every pair ``(p, p + lag)`` inside ``h x w``."""

    def one(d: int, n: int) -> tuple[slice, slice]:
        return (slice(0, n - d), slice(d, n)) if d >= 0 else (slice(-d, n), slice(0, n + d))

    (a_h, b_h), (a_w, b_w) = one(lag[0], h), one(lag[1], w)
    return (a_h, a_w), (b_h, b_w)


def _lag_name(lag: tuple[int, int]) -> str:
    return f"{lag[0]},{lag[1]}"


def _spatial_moment_shapes(channels: int, lags: int) -> list[tuple[int, ...]]:
    """Shapes of ``(count, mean, m2, pairs, cross, head, tail)`` of
    :class:`~energylab.stats.metrics.SpatialCorrelation`."""
    return [(), (channels,), (channels,), (lags,), (lags, channels), (lags, channels), (lags, channels)]


def _merge_spatial_moments(a: Moments, b: Moments) -> Moments:
    """The moments of :func:`_spatial_correlation_update` of two parts taken together.

    ``(count, mean, m2)`` by :func:`_merge_moments`; the lag sums of each part are moved from its
    mean ``mu_x`` to the merged mean ``mu`` (``d = mu_x - mu``) and added::

        cross += d (head + tail) + pairs d^2,   head += pairs d,   tail += pairs d
    """
    count, mean, m2 = _merge_moments(a[:3], b[:3])
    lagged = []
    for mean_x, pairs, cross, head, tail in (a[1:2] + a[3:], b[1:2] + b[3:]):
        d, p = mean_x - mean, pairs[:, None]
        lagged.append((pairs, cross + d * (head + tail) + p * d.square(), head + p * d, tail + p * d))
    return (count, mean, m2, *(x + y for x, y in zip(*lagged, strict=True)))


def _spatial_correlation_update(
    y: Tensor, channels: int, lags: Sequence[tuple[int, int]]
) -> tuple[Moments, Tensor]:
    """``(moments, nonfinite)``: the float64 moments of :class:`~energylab.stats.metrics.SpatialCorrelation`
    for ``y`` ``(B, C, H, W)`` centred at the batch's channel means, ``(count, mean, m2, pairs,
    cross, head, tail)``, positions holding a non-finite value left out (and every pair with such an
    end)."""
    if y.dim() != 4 or y.shape[1] != channels:
        raise ValueError(f"SpatialCorrelation: expected (B, {channels}, H, W), got {tuple(y.shape)}")
    _check_float(y, "SpatialCorrelation")
    b, c, h, w = y.shape
    if any(abs(dh) >= h or abs(dw) >= w for dh, dw in lags):
        raise ValueError(f"SpatialCorrelation: lags {tuple(lags)} do not fit a {h}x{w} map")
    x = y.detach().to(torch.float64)
    kept = _finite(x, 1, keepdim=True)  # (B, 1, H, W)
    f = kept.view(b, h, w).to(torch.float64)
    dims = (0, 2, 3)
    count = f.sum()
    mean = torch.where(kept, x, 0.0).sum(dims) / count.clamp(min=1)
    x = torch.where(kept, x - mean[:, None, None], 0.0)  # centred; a skipped position reads 0
    cross, pairs, lagged = [], [], []
    for lag in lags:
        (ah, aw), (bh, bw) = _lag_slices(lag, h, w)
        both = f[:, ah, aw] * f[:, bh, bw]  # the pairs with both ends kept
        pairs.append(both.sum())
        cross.append((x[:, :, ah, aw] * x[:, :, bh, bw]).sum(dims))
        head_w, tail_w = torch.zeros_like(f), torch.zeros_like(f)
        head_w[:, ah, aw], tail_w[:, bh, bw] = both, both
        lagged += [head_w, tail_w]
    # sum y(p) and sum y(p+d) over the kept pairs of every lag: one batched GEMM over positions
    weights = torch.stack(lagged, -1).view(b, h * w, 2 * len(lags))
    head_tail = torch.bmm(x.view(b, c, h * w), weights).sum(0).T  # (2 * lags, C)
    moments = (count, mean, x.square().sum(dims), torch.stack(pairs), torch.stack(cross),
               head_tail[0::2], head_tail[1::2])
    return moments, b * h * w - count


def _spatial_correlation_compute(
    lags: Sequence[tuple[int, int]], moments: Moments, nonfinite: Tensor
) -> dict[str, Tensor]:
    """``mean_c rho_c(d)`` per lag (and ``count``, ``nonfinite`` positions) from the moments.

    Raises:
        ValueError: no finite position.
    """
    count, _, m2, pairs, cross, _, _ = moments
    _check_data("SpatialCorrelation", count, nonfinite)
    var = (m2 / count).clamp(min=0.0)
    live = var > EIGENVALUE_FLOOR * var.max()
    lagged = cross / pairs[:, None]  # the moments are centred at the pooled mean
    if live.any():
        rho = (lagged[:, live] / var[live]).mean(1)
    else:  # no variance anywhere: white
        rho = torch.zeros(len(lags), dtype=torch.float64, device=m2.device)
    out = {_lag_name(lag): r for lag, r in zip(lags, rho.unbind(), strict=True)}
    return out | {"count": count.clone(), "nonfinite": nonfinite.clone()}


# ---------------------------------------------------------------- functional layer: EffectiveSampleSize


def _autocorrelation_update(y: Tensor, channels: int, max_lag: int) -> tuple[Moments, Tensor]:
    """The moments of :func:`_spatial_correlation_update` for every lag of
    :func:`~energylab.stats.dependence.lag_window` ``(max_lag)`` at once, by FFT.

    Same layout ``(count, mean, m2, pairs, cross, head, tail)`` and meaning, so
    :func:`_merge_spatial_moments` merges them; a lag that does not fit the ``H x W`` maps has no
    pair (all its sums 0) instead of being an error. With ``x`` the centred maps (0 at a skipped
    position) and ``f`` the kept-position mask, zero-padded to ``(H + L) x max(W + L, 2L + 1)``
    (no wrap-around for lags up to ``L = max_lag``), the circular cross-correlation ``(a * b)(d) =
    sum_p a(p) b(p + d)`` of the FFT gives ``cross = x * x``, ``pairs = f * f``, ``head = x * f``
    and ``tail = f * x``. No host synchronisation."""
    if y.dim() != 4 or y.shape[1] != channels:
        raise ValueError(f"EffectiveSampleSize: expected (B, {channels}, H, W), got {tuple(y.shape)}")
    _check_float(y, "EffectiveSampleSize")
    b, c, h, w = y.shape
    lag = max_lag
    x = y.detach().to(torch.float64)
    kept = _finite(x, 1, keepdim=True)  # (B, 1, H, W)
    f = kept.to(torch.float64)
    count = f.sum()
    mean = torch.where(kept, x, 0.0).sum((0, 2, 3)) / count.clamp(min=1)
    x = torch.where(kept, x - mean[:, None, None], 0.0)
    size = (h + lag, max(w + lag, 2 * lag + 1))
    xf, ff = torch.fft.rfft2(x, s=size), torch.fft.rfft2(f, s=size)
    dh = torch.arange(lag + 1, device=x.device)
    dw = torch.arange(-lag, lag + 1, device=x.device)
    fits = ((dh < h)[:, None] & (dw.abs() < w)[None, :]).flatten()[lag + 1 :]

    def at_lags(a: Tensor, b_: Tensor) -> Tensor:
        """``(a * b)`` at the half-plane lags ``(lags, C)``, 0 where a lag does not fit."""
        full = torch.fft.irfft2((a.conj() * b_).sum(0), s=size).roll(lag, 2)  # column j: dw = j - L
        window = full[:, : lag + 1, : 2 * lag + 1].flatten(1)[:, lag + 1 :]  # rows dh = 0..L
        return torch.where(fits[:, None], window.T, 0.0)

    moments = (count, mean, x.square().sum((0, 2, 3)), at_lags(ff, ff)[:, 0].round(),
               at_lags(xf, xf), at_lags(xf, ff), at_lags(ff, xf))
    return moments, b * h * w - count


def _effective_sample_size_compute(moments: Moments, nonfinite: Tensor) -> dict[str, Tensor]:
    """``n_eff`` and ``autocorrelation_sum`` (``n / n_eff``) of
    :func:`energylab.stats.dependence.effective_sample_size` from the moments of
    :func:`_autocorrelation_update`, ``rho(d)`` the mean over the channels with variance (as
    :func:`_spatial_correlation_compute`) of ``rho_c(d)``; and ``count``, ``nonfinite``.

    Raises:
        ValueError: no finite position.
    """
    count, _, m2, pairs, cross, _, _ = moments
    _check_data("EffectiveSampleSize", count, nonfinite)
    var = (m2 / count).clamp(min=0.0)
    live = var > EIGENVALUE_FLOOR * var.max()
    used = pairs > 0
    lagged = cross / torch.where(used, pairs, 1.0)[:, None]  # centred at the pooled mean
    if live.any():
        rho = torch.where(used, (lagged[:, live] / var[live]).mean(1), 0.0)
    else:  # no variance anywhere: white
        rho = torch.zeros_like(pairs)
    n_eff = effective_sample_size(float(count), pairs, rho)
    as_tensor = partial(torch.tensor, dtype=torch.float64, device=m2.device)
    return {"n_eff": as_tensor(n_eff), "autocorrelation_sum": as_tensor(float(count) / n_eff),
            "count": count.clone(), "nonfinite": nonfinite.clone()}


# ---------------------------------------------------------------- functional layer: AuxEnergyShare


def _aux_energy_share_update(aux: Tensor, merged: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(aux, merged, count, nonfinite)``: float64 energies of the two ``(B, C, H, W)`` tensors over
    the positions where both are finite, and the position counts."""
    if aux.shape != merged.shape or aux.dim() != 4:
        raise ValueError(
            f"AuxEnergyShare: expected two (B, C, H, W) tensors of one shape, got "
            f"{tuple(aux.shape)} and {tuple(merged.shape)}"
        )
    _check_float(aux, "AuxEnergyShare")
    _check_float(merged, "AuxEnergyShare")
    aux, merged = aux.detach().to(torch.float64), merged.detach().to(torch.float64)
    finite = _finite(aux, 1, keepdim=True) & _finite(merged, 1, keepdim=True)
    a = torch.where(finite, aux, 0.0).square().sum()
    m = torch.where(finite, merged, 0.0).square().sum()
    count = finite.sum().to(torch.float64)
    return a, m, count, finite.numel() - count


def _aux_energy_share_compute(
    aux: Tensor, merged: Tensor, count: Tensor, nonfinite: Tensor
) -> dict[str, Tensor]:
    """``aux_energy_share = aux / merged`` (and ``count``, ``nonfinite`` positions).

    Raises:
        ValueError: no finite position.
    """
    _check_data("AuxEnergyShare", count, nonfinite)
    return {"aux_energy_share": aux / merged, "count": count.clone(), "nonfinite": nonfinite.clone()}


# ---------------------------------------------------------------- functional layer: neighbourhoods


def _blocks(y: Tensor, k: int) -> Tensor:
    """The non-overlapping ``k x k`` neighbourhoods of ``y`` ``(B, C, H, W)`` as the channels of a
    ``(B, k*k*C, H // k, W // k)`` map (H, W cropped to multiples of k): channel ``p*C + c`` is
    channel c at block position ``p = dy*k + dx``; each position of the map is one block."""
    b, c, h, w = y.shape
    x = y[:, :, : h - h % k, : w - w % k]
    x = x.reshape(b, c, h // k, k, w // k, k).permute(0, 3, 5, 1, 2, 4)  # (B, k, k, C, H/k, W/k)
    return x.reshape(b, k * k * c, h // k, w // k)


# ---------------------------------------------------------------- functional layer: RateShare


def _rate_share_update(likelihoods: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 ``(count, bits, nonfinite)`` of likelihoods ``(B, C, H, W)``: positions used, bits
    ``-log2 p`` per channel ``(C,)`` and positions skipped (a non-finite bit, i.e. ``p`` NaN, inf or
    0). No host synchronisation."""
    if likelihoods.dim() != 4 or likelihoods.shape[1] != channels:
        raise ValueError(
            f"RateShare: expected (B, {channels}, H, W) likelihoods, got {tuple(likelihoods.shape)}"
        )
    _check_float(likelihoods, "RateShare")
    bits = torch.log2(likelihoods.detach().to(torch.float64)).neg_().transpose(0, 1).reshape(channels, -1)
    keep = _finite(bits, 0)
    count = keep.sum().to(torch.float64)
    return count, torch.where(keep, bits, 0.0).sum(1), bits.shape[1] - count


def _rate_share_compute(count: Tensor, bits: Tensor, nonfinite: Tensor) -> dict[str, Tensor]:
    """Shares ``bits / bits.sum()`` and bits per position from the sums of :func:`_rate_share_update`.

    Raises:
        ValueError: no finite position.
    """
    _check_data("RateShare", count, nonfinite)
    total = bits.sum()
    return {"shares": bits / total, "bits": bits.clone(), "bits_per_position": total / count,
            "count": count.clone(), "nonfinite": nonfinite.clone()}

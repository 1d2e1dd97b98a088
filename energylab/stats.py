"""Energy statistics of latents: the two-part split of energy compaction, streamed.

A latent ``y`` of shape ``(B, C, H, W)`` is read as ``N = B*H*W`` samples of a C-vector (an
``(N, C)`` matrix is accepted as N samples). Notation: mean ``mu``, covariance ``S`` (C x C),
channel variances ``s_c^2 = S_cc``, channel energies ``E_c = E[y_c^2]`` (second moment: a mean is
energy too), eigenvalues ``l_i`` of ``S``.

Energy compaction splits exactly into two parts (classical transform coding: N. S. Jayant and
P. Noll, *Digital Coding of Waveforms*, Prentice-Hall 1984, ch. 12)::

    log klt_coding_gain = log coding_gain + log decorrelation_gain
                          (total)            (energy modulation)  (decorrelation)

**Eigenvalue floor.** Dead channels and rank-deficient covariances have zero eigenvalues, which make
the geometric means and ``log det S`` degenerate. Every eigenvalue and every channel variance below
``EIGENVALUE_FLOOR * l_max`` (``1e-12`` of the largest eigenvalue) is raised to that floor, so the
metrics stay finite; :func:`floored_eigenvalues` reports how many eigenvalues were raised. A
covariance whose eigenvalues all lie above the floor gives exactly the unfloored values. A zero
covariance (no energy at all) is treated as white: every eigenvalue and variance is set to 1 (all
metrics are scale-free), giving gains 1, total correlation 0 and effective rank C.

Streaming: :class:`ChannelStats`, :class:`SubbandEnergy` and :class:`SpatialCorrelation` are
``torchmetrics.Metric`` s whose states are float64 sums reduced with ``dist_reduce_fx="sum"``, so
``update`` / ``compute`` / ``reset`` / ``merge`` and the all-reduce across ``torch.distributed``
processes are exact sums. Their ``update`` never synchronises with the host (no ``.item()``, no
branch on tensor values), so it can run in forward hooks during GPU training; call ``update``, not
the module's ``forward`` (which computes a per-batch value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from energylab.wavelets import dwt2

__all__ = [
    "EIGENVALUE_FLOOR",
    "ChannelStats",
    "SpatialCorrelation",
    "Spectrum",
    "SubbandEnergy",
    "coding_gain",
    "correlation_matrix",
    "decorrelation_gain",
    "effective_rank",
    "energy_compaction_curve",
    "energy_statistics",
    "floored_eigenvalues",
    "klt_coding_gain",
    "offdiag_energy_ratio",
    "psnr",
    "spatial_correlation",
    "spectrum",
    "subband_energy",
    "to_db",
    "topk_energy_share",
    "total_correlation",
]

EIGENVALUE_FLOOR = 1e-12
"""Eigenvalues and variances below this fraction of the largest eigenvalue are raised to it."""

_CHUNK_ELEMENTS = {"cpu": 2**20}
"""float64 elements cast per accumulation step, by device type: 8 MiB on the CPU, where the cast
then stays in cache beside the GEMM; 256 MiB elsewhere (fewer, larger kernels)."""
_DEFAULT_CHUNK_ELEMENTS = 2**25

CovLike = Tensor | np.ndarray


class Spectrum(NamedTuple):
    """Floored second-order summary of a covariance, computed once by :func:`spectrum`.

    Attributes:
        covariance: ``(C, C)`` float64, symmetrised input.
        variances: ``(C,)`` channel variances ``s_c^2``, floored.
        eigenvalues: ``(C,)`` eigenvalues ``l_i`` in descending order, floored.
        floored: number of eigenvalues that were below the floor.
    """

    covariance: np.ndarray
    variances: np.ndarray
    eigenvalues: np.ndarray
    floored: int


def spectrum(cov: CovLike | Spectrum) -> Spectrum:
    """Variances and eigenvalues of ``cov`` with the floor of the module docstring applied.

    Args:
        cov: ``(C, C)`` covariance, torch tensor (any device/dtype) or numpy array; it is
            symmetrised as ``(S + S^T) / 2``. A :class:`Spectrum` is returned unchanged.

    Returns:
        The :class:`Spectrum`; floor ``EIGENVALUE_FLOOR * l_max`` (1 for a zero covariance).

    Raises:
        ValueError: ``cov`` is not a non-empty square matrix or holds NaN or inf.
    """
    if isinstance(cov, Spectrum):
        return cov
    if isinstance(cov, Tensor):
        cov = cov.detach().to("cpu", torch.float64).numpy()
    s = np.asarray(cov, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"expected a non-empty square (C, C) covariance, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("covariance holds NaN or inf")
    s = 0.5 * (s + s.T)
    lam = np.linalg.eigvalsh(s)[::-1]
    if lam[0] <= 0:  # zero covariance: treated as white, see the module docstring
        return Spectrum(s, np.ones(len(lam)), np.ones(len(lam)), len(lam))
    floor = EIGENVALUE_FLOOR * lam[0]
    return Spectrum(
        s, np.maximum(np.diag(s), floor), np.maximum(lam, floor), int((lam < floor).sum())
    )


def floored_eigenvalues(cov: CovLike | Spectrum) -> int:
    """Number of eigenvalues of ``cov`` raised to the floor (``< 1e-12 * l_max``; all, if zero)."""
    return spectrum(cov).floored


def offdiag_energy_ratio(cov: CovLike | Spectrum) -> float:
    """Share of the covariance's squared entries off the diagonal, in ``[0, 1]``.

    ``sum_{i != j} S_ij^2 / sum_{i,j} S_ij^2``: 0 when the channels are uncorrelated; 0 for a zero
    covariance. Unfloored (no eigenvalues involved).
    """
    s = spectrum(cov).covariance
    total = float(np.square(s).sum())
    return 0.0 if total == 0.0 else float(np.square(s - np.diag(np.diag(s))).sum() / total)


def coding_gain(cov: CovLike | Spectrum) -> float:
    """Transform coding gain of the channels as they are (Jayant & Noll 1984, ch. 12), a ratio.

    ``mean_c(s_c^2) / (prod_c s_c^2)^(1/C)`` (arithmetic over geometric mean of the floored channel
    variances) ``>= 1``: it grows as energy is spread unevenly across channels (energy modulation);
    1 for equal variances.
    """
    v = spectrum(cov).variances
    return float(v.mean() / np.exp(np.log(v).mean()))


def klt_coding_gain(cov: CovLike | Spectrum) -> float:
    """Coding gain an ideal decorrelating rotation (KLT) would reach (Jayant & Noll 1984, ch. 12).

    ``mean_i(l_i) / (prod_i l_i)^(1/C)`` over the floored eigenvalues ``>= 1``; invariant under
    any orthogonal rotation of the channels.
    """
    lam = spectrum(cov).eigenvalues
    return float(lam.mean() / np.exp(np.log(lam).mean()))


def decorrelation_gain(cov: CovLike | Spectrum) -> float:
    """Coding gain still available from decorrelation, a ratio ``>= 1``.

    ``(prod_c s_c^2 / det S)^(1/C) = klt_coding_gain / coding_gain`` (Hadamard's inequality gives
    ``>= 1``; the two sides agree because ``sum_c s_c^2 = trace S = sum_i l_i``), over the floored
    variances and eigenvalues; 1 for uncorrelated channels.
    """
    sp = spectrum(cov)
    return float(np.exp(np.log(sp.variances).mean() - np.log(sp.eigenvalues).mean()))


def total_correlation(cov: CovLike | Spectrum) -> float:
    """Total correlation of a Gaussian with covariance ``S``, in nats (Watanabe 1960).

    ``1/2 (sum_c log s_c^2 - log det S)`` = ``sum_c h(y_c) - h(y)`` for a Gaussian (Cover & Thomas,
    *Elements of Information Theory*, 2nd ed., eq. 8.64 for ``h``), over the floored variances and
    eigenvalues; 0 for uncorrelated channels.
    """
    sp = spectrum(cov)
    return float(0.5 * (np.log(sp.variances).sum() - np.log(sp.eigenvalues).sum()))


def effective_rank(cov: CovLike | Spectrum) -> float:
    """Effective rank (Roy & Vetterli, EUSIPCO 2007), in ``[1, C]``.

    ``exp(-sum_i p_i log p_i)`` with ``p_i = l_i / sum_j l_j`` over the floored eigenvalues: the
    exponential of the entropy of the normalised spectrum.
    """
    lam = spectrum(cov).eigenvalues
    p = lam / lam.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def correlation_matrix(cov: CovLike | Spectrum) -> np.ndarray:
    """Correlation matrix ``R = D^-1/2 S D^-1/2`` with ``D = diag(S)``, ``(C, C)`` float64 in ``[-1, 1]``.

    Channel variances below the floor of the module docstring are raised to it, so a dead channel
    gives a zero row and column (and 1 on the diagonal only where it has variance).

    >>> correlation_matrix(np.array([[4.0, 2.0], [2.0, 9.0]])).round(4).tolist()
    [[1.0, 0.3333], [0.3333, 1.0]]
    """
    sp = spectrum(cov)
    std = np.sqrt(sp.variances)
    return np.clip(sp.covariance / np.outer(std, std), -1.0, 1.0)


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(peak^2 / mse)``; ``inf`` for ``mse == 0``.

    ``peak`` is the largest signal value (1 for images in ``[0, 1]``, 255 for 8-bit values).

    Raises:
        ValueError: ``mse < 0`` or ``peak <= 0``.

    >>> round(psnr(0.001), 4)
    30.0
    """
    if mse < 0 or peak <= 0:
        raise ValueError(f"psnr needs mse >= 0 and peak > 0, got mse={mse}, peak={peak}")
    return math.inf if mse == 0 else to_db(peak**2 / mse)


def to_db(ratio: float) -> float:
    """``10 log10(ratio)``, a gain ratio in decibels. Raises ValueError for ``ratio <= 0``."""
    if ratio <= 0:
        raise ValueError(f"a ratio in dB must be positive, got {ratio}")
    return 10.0 * math.log10(ratio)


def energy_compaction_curve(energies: CovLike | Sequence[float]) -> np.ndarray:
    """Cumulative share of the energy in the k most energetic channels, k = 1..C.

    ``curve[k-1] = sum_{i<=k} E_(i) / sum_i E_i`` with the energies ``E_(1) >= E_(2) >= ...`` sorted
    descending; ``(C,)`` float64, non-decreasing, ending at 1. Zero total energy is treated as white
    (equal energies): ``curve[k-1] = k / C``.

    Raises:
        ValueError: ``energies`` is not a non-empty 1-D array of finite non-negative numbers.
    """
    if isinstance(energies, Tensor):
        energies = energies.detach().to("cpu", torch.float64).numpy()
    e = np.asarray(energies, dtype=np.float64)
    if e.ndim != 1 or e.size == 0 or not np.isfinite(e).all() or (e < 0).any():
        raise ValueError("energies must be a non-empty 1-D array of finite non-negative numbers")
    if e.sum() == 0:
        e = np.ones_like(e)
    curve = np.cumsum(np.sort(e)[::-1])
    return curve / curve[-1]


def topk_energy_share(energies: CovLike | Sequence[float], k: int) -> float:
    """Share of the energy in the ``k`` most energetic channels: ``energy_compaction_curve[k-1]``.

    Raises:
        ValueError: ``k`` outside ``1..C`` (and as :func:`energy_compaction_curve`).
    """
    curve = energy_compaction_curve(energies)
    if not 1 <= k <= len(curve):
        raise ValueError(f"k must lie in 1..{len(curve)}, got {k}")
    return float(curve[k - 1])


def energy_statistics(
    cov: CovLike | Spectrum, energies: CovLike | Sequence[float], k: int | None = None
) -> dict[str, float]:
    """All covariance metrics of this module as a flat dict of numbers, ready for a JSON line.

    Args:
        cov: ``(C, C)`` covariance (or its :class:`Spectrum`).
        energies: ``(C,)`` channel energies ``E[y_c^2]``.
        k: channels for ``topk_energy_share``; default ``max(1, round(C / 8))``.

    Returns:
        Keys equal to the function names: ``offdiag_energy_ratio``, ``coding_gain``,
        ``klt_coding_gain``, ``decorrelation_gain`` (ratios, not dB), ``total_correlation`` (nats),
        ``effective_rank``, ``topk_energy_share``, ``topk_k`` (int) and ``floored_eigenvalues``
        (int).

    Raises:
        ValueError: as the individual functions.
    """
    sp = spectrum(cov)
    k = max(1, round(len(sp.eigenvalues) / 8)) if k is None else k
    return {
        "offdiag_energy_ratio": offdiag_energy_ratio(sp),
        "coding_gain": coding_gain(sp),
        "klt_coding_gain": klt_coding_gain(sp),
        "decorrelation_gain": decorrelation_gain(sp),
        "total_correlation": total_correlation(sp),
        "effective_rank": effective_rank(sp),
        "topk_energy_share": topk_energy_share(energies, k),
        "topk_k": k,
        "floored_eigenvalues": sp.floored,
    }


def _f64_zeros(*shape: int) -> Tensor:
    return torch.zeros(shape, dtype=torch.float64)


class _StreamingMetric(Metric):
    """Sum-reduced float64 states that follow the device of the data and merge exactly."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def _follow(self, y: Tensor) -> None:
        """Move the states to ``y``'s device (cheap: they are small); raise on non-float ``y``."""
        if not y.is_floating_point():
            raise TypeError(f"expected a floating-point tensor, got {y.dtype}")
        if self.device != y.device:
            self.to(y.device)

    def merge(self, other: _StreamingMetric) -> _StreamingMetric:
        """Add ``other``'s state to this one (exact: states are sums); returns ``self``.

        Raises:
            ValueError: ``other`` is of another class or configuration.
        """
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(f"cannot merge {other!r} into {self!r}")
        self.merge_state({k: v.to(self.device) for k, v in other.metric_state.items()})
        self._update_count += other._update_count
        self._computed = None
        return self

    def _config(self) -> tuple:
        raise NotImplementedError


class ChannelStats(_StreamingMetric):
    """Streaming mean, covariance and energies of the channels of latents.

    States (float64, ``dist_reduce_fx="sum"``): ``count`` (samples), ``sum`` ``(C,)`` and ``outer``
    ``(C, C)`` = ``sum_n y_n y_n^T``. The covariance is ``(outer - count mu mu^T) / (count - 1)``.

    Accumulation is one float64 GEMM per chunk of ``m`` samples ``X`` (whole images, or ``2^20 / C``
    samples on the CPU, ``2^25 / C`` elsewhere), on the chunk centred at its own mean ``mu_X``:
    ``outer += (X - mu_X)^T (X - mu_X) + m mu_X mu_X^T`` (the parallel-variance update of Chan,
    Golub and LeVeque, 1979). A raw ``X^T X`` would lose about ``eps64 sqrt(m) (|mu| / s)^2`` of
    the covariance (``eps64 = 1.1e-16``, ``s`` the spread) to rounding inside the GEMM; centred,
    only the final subtraction cancels, about ``eps64 (|mu| / s)^2`` per chunk: ``1e-8`` relative
    for means ``1e4`` times the spread. A shift of the origin could remove even that, but no shift
    known without communication is common to all processes, and the sum all-reduce needs one.

    Args:
        channels: C.
        max_positions: if set, each ``update`` keeps at most this many samples (positions), drawn
            without replacement by a ``torch.Generator`` on the data's device seeded with ``seed``.
        seed: seed of that generator.

    Raises:
        ValueError: ``channels < 1`` or ``max_positions < 1``.
    """

    def __init__(
        self, channels: int, max_positions: int | None = None, seed: int = 0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if max_positions is not None and max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.channels, self.max_positions, self.seed = channels, max_positions, seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.add_state("count", _f64_zeros(), dist_reduce_fx="sum")
        self.add_state("sum", _f64_zeros(channels), dist_reduce_fx="sum")
        self.add_state("outer", _f64_zeros(channels, channels), dist_reduce_fx="sum")

    def _config(self) -> tuple:
        return (self.channels,)

    def _subsample(self, y: Tensor) -> Tensor:
        """``max_positions`` random samples of ``y`` as an ``(m, C)`` matrix."""
        n = y.numel() // self.channels
        gen = self._generators.get(y.device)
        if gen is None:
            gen = self._generators[y.device] = torch.Generator(y.device).manual_seed(self.seed)
        idx = torch.randperm(n, generator=gen, device=y.device)[: self.max_positions]
        if y.dim() == 2:
            return y[idx]
        b, c, h, w = y.shape
        return y.reshape(b, c, h * w)[idx // (h * w), :, idx % (h * w)]

    def update(self, y: Tensor) -> None:
        """Accumulate the samples of ``y``: ``(B, C, H, W)`` (B*H*W samples) or ``(N, C)``.

        Any float dtype and device; the sums are float64 on ``y``'s device (the states move
        there). No host synchronisation.

        Raises:
            ValueError: wrong rank or channel count. TypeError: non-float ``y``.
        """
        if y.dim() not in (2, 4) or y.shape[1] != self.channels:
            raise ValueError(
                f"expected (B, {self.channels}, H, W) or (N, {self.channels}), got {tuple(y.shape)}"
            )
        self._follow(y)
        y = y.detach()
        c = self.channels
        if self.max_positions is not None and y.numel() // c > self.max_positions:
            y = self._subsample(y)
        chunk = _CHUNK_ELEMENTS.get(y.device.type, _DEFAULT_CHUNK_ELEMENTS)
        step = max(1, chunk // c)  # samples per float64 chunk
        if y.dim() == 2:
            parts = [x.T for x in y.split(step)]  # (C, m) views
        else:  # groups of images as (C, g, H*W) views
            b, _, h, w = y.shape
            parts = y.reshape(b, c, h * w).split(max(1, step // (h * w)))
            parts = [p.transpose(0, 1) for p in parts]
        for part in parts:  # cast and transpose in one copy into a fresh (C, m) float64 buffer
            x = torch.empty(part.shape, dtype=torch.float64, device=y.device).copy_(part)
            x = x.view(c, -1)  # columns are samples
            s = x.sum(1)
            mu = s / x.shape[1]
            self.outer.addmm_(x.sub_(mu[:, None]), x.T).addr_(s, mu)
            self.sum += s
        self.count += y.numel() // c

    def compute(self) -> dict[str, Tensor]:
        """Statistics of everything accumulated (across processes, when distributed).

        Returns:
            ``mean`` ``(C,)``, ``covariance`` ``(C, C)`` unbiased (divides by ``count - 1``),
            ``energies`` ``(C,)`` = ``E[y_c^2]``, ``count`` (scalar); float64 on the states' device.

        Raises:
            ValueError: fewer than 2 samples.
        """
        n = self.count
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {int(n)}")
        mean = self.sum / n
        cov = (self.outer - n * torch.outer(mean, mean)) / (n - 1)
        return {
            "mean": mean,
            "covariance": 0.5 * (cov + cov.T),
            "energies": torch.diagonal(self.outer) / n,
            "count": n.clone(),
        }

    def statistics(self, k: int | None = None) -> dict[str, float]:
        """:func:`energy_statistics` of :meth:`compute`'s covariance and energies."""
        out = self.compute()
        return energy_statistics(out["covariance"], out["energies"], k)


def _subband_names(levels: int) -> list[str]:
    """``LL{L}``, then ``LH{l}, HL{l}, HH{l}`` for ``l = L..1``."""
    return [f"LL{levels}"] + [f"{b}{lv}" for lv in range(levels, 0, -1) for b in ("LH", "HL", "HH")]


class SubbandEnergy(_StreamingMetric):
    """Share of the energy in each wavelet subband, pooled over channels, positions and batches.

    With ``d_b`` the coefficients of band ``b`` of the ``levels``-level 2-D DWT of every channel
    (:func:`energylab.wavelets.dwt2`, re-applied to the LL block; LH, HL, HH are pywt's cH, cV, cD:
    LH is high-pass along H), ``share_b = sum d_b^2 / sum_b' sum d_b'^2``. For an orthonormal
    wavelet the denominator is ``sum y^2`` (Parseval; S. Mallat, *A Wavelet Tour of Signal
    Processing*, 3rd ed., 2009, sec. 7.7). Zero total energy is treated as white: each band's share
    is its fraction of the coefficients. State: ``energy`` ``(3L+1,)`` float64 sums.

    Args:
        levels: decomposition levels L >= 1.
        wavelet: a pywt discrete wavelet name (see :func:`energylab.wavelets.dwt2`).

    Raises:
        ValueError: ``levels < 1``.
    """

    def __init__(self, levels: int = 2, wavelet: str = "haar", **kwargs) -> None:
        super().__init__(**kwargs)
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels, self.wavelet = levels, wavelet
        self.add_state("energy", _f64_zeros(3 * levels + 1), dist_reduce_fx="sum")

    def _config(self) -> tuple:
        return (self.levels, self.wavelet)

    def update(self, y: Tensor) -> None:
        """Accumulate the band energies of ``y`` ``(B, C, H, W)``, H and W divisible by ``2^L``.

        Raises:
            ValueError: wrong rank or sizes. TypeError: non-float ``y``.
        """
        m = 2**self.levels
        if y.dim() != 4 or y.shape[-2] % m or y.shape[-1] % m:
            raise ValueError(f"expected (B, C, H, W) with H, W divisible by {m}, got {y.shape}")
        self._follow(y)
        x = y.detach().to(torch.float64)
        details = []
        for _ in range(self.levels):
            x, *bands = dwt2(x, self.wavelet).chunk(4, 1)
            details.append(torch.stack([b.square().sum() for b in bands]))
        self.energy += torch.cat([x.square().sum().reshape(1), *details[::-1]])

    def compute(self) -> dict[str, float]:
        """Shares ``{LL{L}, LH{L}, HL{L}, HH{L}, ..., LH1, HL1, HH1}`` summing to 1."""
        e = self.energy.cpu().numpy()
        if e.sum() == 0:
            e = np.array([1.0] + [4.0**lv for lv in range(self.levels) for _ in range(3)])
        return dict(zip(_subband_names(self.levels), (e / e.sum()).tolist(), strict=True))


def _lag_slices(lag: tuple[int, int], h: int, w: int) -> tuple[tuple[slice, slice], ...]:
    """Slices of the first and second element of every pair ``(p, p + lag)`` inside ``h x w``."""

    def one(d: int, n: int) -> tuple[slice, slice]:
        return (slice(0, n - d), slice(d, n)) if d >= 0 else (slice(-d, n), slice(0, n + d))

    (a_h, b_h), (a_w, b_w) = one(lag[0], h), one(lag[1], w)
    return (a_h, a_w), (b_h, b_w)


class SpatialCorrelation(_StreamingMetric):
    """Normalised spatial autocorrelation of each channel at given lags, averaged over channels.

    For channel c with mean ``mu_c`` and (biased) variance ``v_c`` over all N positions of all
    images, and lag ``d = (dh, dw)`` with the ``M_d`` position pairs ``(p, p + d)`` inside the same
    image::

        rho_c(d) = [1/M_d sum_p (y_c(p) - mu_c)(y_c(p+d) - mu_c)] / v_c

    (the sample autocorrelation of G. Box and G. Jenkins, *Time Series Analysis*, sec. 2.1.5, with
    the lag term averaged over its valid pairs). The result is ``mean_c rho_c(d)`` over the channels
    with ``v_c > 1e-12 * max_c v_c``; 0 when there are none (no variance: treated as white).
    States (float64 sums): N, per channel ``sum y``, ``sum y^2``, and per lag ``M_d``,
    ``sum y(p) y(p+d)``, ``sum y(p)``, ``sum y(p+d)``, so merging and syncing are exact.

    Args:
        lags: ``(dh, dw)`` integer pairs, any sign.

    Raises:
        ValueError: no lags, or a lag that is not a pair of integers.
    """

    def __init__(
        self, lags: Sequence[tuple[int, int]] = ((0, 1), (1, 0), (1, 1)), **kwargs
    ) -> None:
        super().__init__(**kwargs)
        lags = tuple(tuple(lag) for lag in lags)
        if not lags or any(len(g) != 2 or not all(isinstance(d, int) for d in g) for g in lags):
            raise ValueError(f"lags must be a non-empty sequence of (dh, dw) integers, got {lags}")
        self.lags = lags
        self.add_state("count", _f64_zeros(), dist_reduce_fx="sum")
        self.add_state("pairs", _f64_zeros(len(lags)), dist_reduce_fx="sum")
        for name in ("sum", "sum_sq"):
            self.add_state(name, _f64_zeros(0), dist_reduce_fx="sum")
        for name in ("cross", "head", "tail"):
            self.add_state(name, _f64_zeros(len(lags), 0), dist_reduce_fx="sum")

    def _config(self) -> tuple:
        return self.lags

    def _allocate(self, channels: int, device: torch.device) -> None:
        """Size the per-channel states (empty until the first update fixes C)."""
        self.sum, self.sum_sq = (_f64_zeros(channels).to(device) for _ in range(2))
        self.cross, self.head, self.tail = (
            _f64_zeros(len(self.lags), channels).to(device) for _ in range(3)
        )

    def merge(self, other: SpatialCorrelation) -> SpatialCorrelation:
        """As :meth:`_StreamingMetric.merge`; either side may not have been updated yet."""
        if self.sum.numel() == 0 and isinstance(other, SpatialCorrelation):
            self._allocate(other.sum.numel(), self.device)
        elif other.sum.numel() == 0:
            other._allocate(self.sum.numel(), other.device)
        return super().merge(other)

    def update(self, y: Tensor) -> None:
        """Accumulate ``y`` ``(B, C, H, W)``; every lag must fit: ``|dh| < H``, ``|dw| < W``.

        The channel count is fixed by the first update; with ``torch.distributed`` every process
        must have updated before ``compute`` syncs.

        Raises:
            ValueError: wrong rank, a lag that does not fit, or a changed channel count.
            TypeError: non-float ``y``.
        """
        if y.dim() != 4:
            raise ValueError(f"expected (B, C, H, W), got {tuple(y.shape)}")
        b, c, h, w = y.shape
        if any(abs(dh) >= h or abs(dw) >= w for dh, dw in self.lags):
            raise ValueError(f"lags {self.lags} do not fit a {h}x{w} map")
        self._follow(y)
        if self.sum.numel() == 0:  # first update fixes C (shape only, no sync)
            self._allocate(c, y.device)
        elif self.sum.numel() != c:
            raise ValueError(f"expected {self.sum.numel()} channels, got {c}")
        x = y.detach().to(torch.float64)
        dims = (0, 2, 3)
        self.count += b * h * w
        self.sum += x.sum(dims)
        self.sum_sq += x.square().sum(dims)
        for i, lag in enumerate(self.lags):
            (ah, aw), (bh, bw) = _lag_slices(lag, h, w)
            first, second = x[:, :, ah, aw], x[:, :, bh, bw]
            self.pairs[i] += b * first.shape[2] * first.shape[3]
            self.cross[i] += (first * second).sum(dims)
            self.head[i] += first.sum(dims)
            self.tail[i] += second.sum(dims)

    def compute(self) -> dict[str, float]:
        """``{"dh,dw": mean_c rho_c(d)}`` for each lag, e.g. ``{"0,1": 0.93, ...}``.

        Raises:
            ValueError: nothing accumulated.
        """
        if self.sum.numel() == 0 or self.count == 0:
            raise ValueError("SpatialCorrelation.compute() before any update")
        mu = self.sum / self.count
        var = self.sum_sq / self.count - mu.square()
        live = var > EIGENVALUE_FLOOR * var.max()
        m = self.pairs[:, None]
        lagged = (self.cross - mu * (self.head + self.tail)) / m + mu.square()
        rho = (lagged[:, live] / var[live]).mean(1) if live.any() else torch.zeros(len(self.lags))
        return {f"{dh},{dw}": float(r) for (dh, dw), r in zip(self.lags, rho, strict=True)}


def subband_energy(y: Tensor, levels: int = 2, wavelet: str = "haar") -> dict[str, float]:
    """Subband energy shares of ``y`` ``(B, C, H, W)``: one-shot :class:`SubbandEnergy`."""
    metric = SubbandEnergy(levels, wavelet)
    metric.update(y)
    return metric.compute()


def spatial_correlation(
    y: Tensor, lags: Sequence[tuple[int, int]] = ((0, 1), (1, 0), (1, 1))
) -> dict[str, float]:
    """Spatial autocorrelation of ``y`` ``(B, C, H, W)``: one-shot :class:`SpatialCorrelation`."""
    metric = SpatialCorrelation(lags)
    metric.update(y)
    return metric.compute()


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

"""Energy of channels: compaction curves, top-k shares, the share of the channel means, and
:func:`energy_statistics`, every covariance estimator of :mod:`energylab.stats.estimators` with the
top-k energy share as one flat dict.

:func:`channel_energies` gives each channel's mean square and L2 norm over positions (the paper's
Fig. 1 energy), with and without the channel mean; :func:`energy_shares` their top-k shares and
:func:`mean_energy_fraction`; :func:`compaction_curves` (torch, ``(..., C)``: the paper's Fig. 1
curve, the one copy of its formula), :func:`energy_compaction_curve` (its numpy form) and
:func:`topk_energy_share` (one point of it) work on any energies. (``SubbandEnergy(channels=C)``
of :mod:`energylab.stats.metrics` adds channel-centred subband shares.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from energylab.stats.estimators import (
    CovLike,
    Spectrum,
    _cov,
    coding_gain,
    decorrelation_gain,
    effective_rank,
    klt_coding_gain,
    numerical_rank,
    offdiag_energy_ratio,
    total_correlation,
)

__all__ = [
    "ENERGY_KINDS",
    "channel_energies",
    "compaction_curves",
    "energy_compaction_curve",
    "energy_shares",
    "energy_statistics",
    "mean_energy_fraction",
    "topk_energy_share",
]


def compaction_curves(energies: Tensor) -> Tensor:
    """The energy-compaction curve: the normalised cumulative energy over the channels sorted by
    energy, descending (Li et al., ICLR 2025, Fig. 1).

    ``c_k = (E_(1) + ... + E_(k)) / (E_1 + ... + E_C)``, k = 1..C, with ``E_(1) >= E_(2) >= ...``
    the channel energies sorted descending: the share of the total energy held by the ``k`` most
    energetic channels. Non-decreasing, ``c_C = 1``; equal energies give the diagonal
    ``c_k = k / C``, and the further the curve lies above it, the more compact the energy. A row
    of zero total energy is treated as white (equal energies): ``c_k = k / C``. ``c_k`` is the
    top-k share (:func:`topk_energy_share`). In the paper, as in :func:`channel_energies`' ``l2``
    (the captures' ``topk_share.l2``), a channel's energy is its L2 norm over positions; the
    formula takes any non-negative energies (mean squares: ``topk_energy_share``,
    ``topk_share.ms``).

    Args:
        energies: ``(..., C)`` finite non-negative channel energies, C >= 1; leading dimensions
            are batch dimensions (e.g. captures or seeds), one curve per row.

    Returns:
        ``(..., C)``: ``c_1 .. c_C`` of every row, in the input's floating dtype (float64 for
        integer input), on its device.

    Raises:
        ValueError: a 0-d tensor or C = 0, or a negative or non-finite energy.

    >>> compaction_curves(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)).tolist()
    [0.4, 0.7, 0.9, 1.0]
    >>> compaction_curves(torch.tensor([[1.0, 3.0], [0.0, 0.0]])).tolist()  # per row; zero: white
    [[0.75, 1.0], [0.5, 1.0]]
    """
    e = energies if energies.is_floating_point() else energies.to(torch.float64)
    if e.ndim == 0 or e.shape[-1] == 0:
        raise ValueError(f"compaction_curves: expected (..., C) energies with C >= 1, got shape "
                         f"{tuple(e.shape)}")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ValueError("compaction_curves: energies must be finite and non-negative")
    e = torch.where(e.sum(-1, keepdim=True) == 0, torch.ones_like(e), e)
    cumulative = torch.sort(e, dim=-1, descending=True).values.cumsum(-1)
    return cumulative / cumulative[..., -1:]


def energy_compaction_curve(energies: CovLike | Sequence[float]) -> np.ndarray:
    """:func:`compaction_curves` of one ``(C,)`` vector of energies (numpy, a tensor or a
    sequence), as a ``(C,)`` float64 array: ``curve[k-1] = sum_{i<=k} E_(i) / sum_i E_i``.

    Raises:
        ValueError: ``energies`` is not a non-empty 1-D array of finite non-negative numbers.

    >>> energy_compaction_curve([1.0, 3.0]).tolist()
    [0.75, 1.0]
    """
    e = torch.as_tensor(_numpy64(energies))
    if e.ndim != 1 or e.numel() == 0 or not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ValueError("energies must be a non-empty 1-D array of finite non-negative numbers")
    return compaction_curves(e).numpy()


def topk_energy_share(energies: CovLike | Sequence[float], k: int) -> float:
    """Share of the energy in the ``k`` most energetic channels: ``energy_compaction_curve[k-1]``.

    Raises:
        ValueError: ``k`` outside ``1..C`` (and as :func:`energy_compaction_curve`).

    >>> topk_energy_share([1.0, 3.0, 0.0, 4.0], 2)  # (4 + 3) / 8
    0.875
    """
    curve = energy_compaction_curve(energies)
    if not 1 <= k <= len(curve):
        raise ValueError(f"k must lie in 1..{len(curve)}, got {k}")
    return float(curve[k - 1])


def energy_statistics(
    cov: CovLike | Spectrum,
    energies: CovLike | Sequence[float],
    k: int | None = None,
    n: int | None = None,
) -> dict[str, float | int | None]:
    """All covariance metrics of this module as a flat dict of numbers, ready for a JSON line.

    Args:
        cov: ``(C, C)`` covariance (or its :class:`Spectrum`).
        energies: ``(C,)`` channel energies ``E[y_c^2]``.
        k: channels for ``topk_energy_share``; default ``max(1, round(C / 8))``.
        n: sample count behind ``cov``: the gains and ``total_correlation`` are bias-corrected
            with it (see :func:`total_correlation`); None: plug-in values.

    Returns:
        Keys equal to the function names: ``offdiag_energy_ratio`` (on the correlation matrix),
        ``coding_gain``, ``klt_coding_gain``, ``decorrelation_gain`` (ratios, not dB),
        ``total_correlation`` (nats), ``total_correlation_plugin`` (nats, uncorrected),
        ``effective_rank``, ``topk_energy_share``, ``topk_k`` (int) and ``numerical_rank`` (int).
        A statistic that is infinite or undefined for ``cov`` (see the module docstring) is None.

    Raises:
        ValueError: as the individual functions.

    >>> out = energy_statistics(np.array([[4.0, 2.0], [2.0, 9.0]]), [4.0, 9.0])
    >>> out["topk_k"], round(out["topk_energy_share"], 4), out["numerical_rank"]  # 9 / 13
    (1, 0.6923, 2)
    >>> energy_statistics(np.ones((2, 2)), [1.0, 1.0])["total_correlation"] is None  # rank 1
    True
    """
    s = _cov(cov)
    k = max(1, round(len(s.s) / 8)) if k is None else k
    return {
        "offdiag_energy_ratio": offdiag_energy_ratio(s),
        "coding_gain": coding_gain(s, n),
        "klt_coding_gain": klt_coding_gain(s, n),
        "decorrelation_gain": decorrelation_gain(s, n),
        "total_correlation": total_correlation(s, n),
        "total_correlation_plugin": total_correlation(s),
        "effective_rank": effective_rank(s),
        "topk_energy_share": topk_energy_share(energies, k),
        "topk_k": k,
        "numerical_rank": numerical_rank(s),
    }


ENERGY_KINDS = ("l2", "l2_centred", "ms", "ms_centred")
"""The four per-channel energies of :func:`channel_energies`, in that order."""


def _numpy64(x: CovLike | Sequence[float] | float) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def channel_energies(
    mean: CovLike | Sequence[float], energies: CovLike | Sequence[float], count: float
) -> dict[str, np.ndarray]:
    """Per-channel energy of a latent in the four senses of :data:`ENERGY_KINDS`, ``(C,)`` float64.

    From the channel means ``mu_c``, the second moments ``E[y_c^2]`` and the count ``n`` of
    positions (the ``mean``, ``energies`` and ``count`` of :class:`ChannelStats`)::

        ms         = E[y_c^2]                      mean square, channel means in
        ms_centred = E[y_c^2] - mu_c^2             mean square with the channel mean removed
        l2         = ||y_c||_2 = sqrt(n ms)         L2 norm over positions (not squared)
        l2_centred = ||y_c - mu_c||_2 = sqrt(n ms_centred)

    ``l2`` is the energy of the paper's Fig. 1 (Li et al., ICLR 2025: channels ordered by their L2
    norm); ``E[y^2] = mu^2 + s^2`` (statistics-notes.md) says how much of ``ms`` is means.
    ``ms_centred`` is clipped at 0 against rounding.

    Raises:
        ValueError: ``mean`` and ``energies`` are not 1-D of one length, or ``count <= 0``.

    >>> out = channel_energies([1.0, 0.0], [2.0, 4.0], count=4)
    >>> {k: v.tolist() for k, v in out.items()}
    {'l2': [2.8284271247461903, 4.0], 'l2_centred': [2.0, 4.0], 'ms': [2.0, 4.0], 'ms_centred': [1.0, 4.0]}
    """
    mu, ms = _numpy64(mean), _numpy64(energies)
    if mu.ndim != 1 or mu.shape != ms.shape or count <= 0:
        raise ValueError(f"channel_energies: expected (C,) means and energies and count > 0, got "
                         f"{mu.shape}, {ms.shape}, {count}")
    centred = np.clip(ms - mu**2, 0.0, None)
    return {"l2": np.sqrt(count * ms), "l2_centred": np.sqrt(count * centred), "ms": ms,
            "ms_centred": centred}


def mean_energy_fraction(
    mean: CovLike | Sequence[float], energies: CovLike | Sequence[float]
) -> float | None:
    """Share of the second moment held by the channel means: ``sum_c mu_c^2 / sum_c E[y_c^2]``.

    In ``[0, 1]``; 1 for constant channels, 0 for zero-mean ones; ``None`` for zero energy.

    >>> mean_energy_fraction([1.0, 0.0], [2.0, 2.0])
    0.25
    """
    mu, ms = _numpy64(mean), _numpy64(energies)
    total = float(ms.sum())
    return None if total <= 0 else float(np.square(mu).sum() / total)


def energy_shares(
    mean: CovLike | Sequence[float], energies: CovLike | Sequence[float], count: float, k: int | None = None
) -> dict[str, float | int | None]:
    """Top-k shares of the four energies of :func:`channel_energies` and the means' share.

    Returns:
        ``topk_share.<kind>`` for each of :data:`ENERGY_KINDS` (:func:`topk_energy_share` of that
        energy: e.g. ``topk_share.l2 = sum of the k largest ||y_c||_2 / sum_c ||y_c||_2``),
        ``topk_k`` (default ``max(1, round(C / 8))``, as :func:`energy_statistics`) and
        :func:`mean_energy_fraction`. ``topk_share.ms`` equals ``energy_statistics``'s
        ``topk_energy_share``.

    >>> out = energy_shares([3.0, 0.0], [10.0, 1.0], count=1, k=1)  # channel 0: 9 of its 10 is mean
    >>> round(out["topk_share.ms"], 4), round(out["topk_share.ms_centred"], 4), out["mean_energy_fraction"]
    (0.9091, 0.5, 0.8181818181818182)
    """
    per_channel = channel_energies(mean, energies, count)
    c = len(per_channel["ms"])
    k = max(1, round(c / 8)) if k is None else k
    out: dict[str, float | int | None] = {
        f"topk_share.{kind}": topk_energy_share(e, k) for kind, e in per_channel.items()
    }
    return out | {"topk_k": k, "mean_energy_fraction": mean_energy_fraction(mean, energies)}

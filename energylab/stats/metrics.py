"""Streaming ``torchmetrics.Metric`` s of latents, and their one-shot forms.

A latent ``y`` of shape ``(B, C, H, W)`` is read as ``N = B*H*W`` samples of a C-vector (an
``(N, C)`` matrix is accepted as N samples).

Streaming: :class:`ChannelStats`, :class:`SubbandEnergy`, :class:`SpatialCorrelation`,
:class:`AuxEnergyShare`, :class:`RateShare` and :class:`NeighbourhoodTotalCorrelation` are
``torchmetrics.Metric`` s in the torchmetrics shape: a functional layer of torch functions
(:mod:`energylab.stats.functional`: ``_<name>_update`` returns the float64 sums or moments of one
batch, ``_<name>_compute`` turns them into values) and thin classes over it whose states are those
sums and moments. Counts, energies and bits are plain sums, reduced with ``dist_reduce_fx="sum"``.
**Whatever is centred at a mean** (covariances, variances, autocorrelations, centred subband
energies) is kept as moments about the running mean, ``(count, mean, centred sums)``, each batch
centred at its own mean and merged by the pairwise update of Chan, Golub and LeVeque
(:func:`~energylab.stats.functional._merge_moments`), never as raw ``sum y`` and ``sum y^2`` whose
difference cancels: a channel that is constant at ``1e5`` keeps a variance of exactly 0 however it
is streamed. Such moments are one packed state with that merge as its ``dist_reduce_fx``, so
``update`` / ``compute`` / ``reset`` / ``merge`` and the all-reduce across ``torch.distributed``
processes give the numbers of one pass over all the data (to rounding), however the data are split.
``compute()`` returns a dict of float64 tensors. ``update`` never synchronises with the host (no
``.item()``, no branch on tensor values), so it can run in forward hooks during GPU training; call
``update``, not the module's ``forward`` (which computes a per-batch value). States stay float64 on
the data's device whatever a parent module's casts (``.to(torch.float32)``, ``.half()``,
``set_dtype``): only devices are applied to them. :func:`channel_stats`, :func:`subband_energy`,
:func:`spatial_correlation`, :func:`aux_energy_share` and :func:`neighbourhood_total_correlation`
are one-shot forms.

**Non-finite input and no data (one rule for every metric).** A *sample* is what a metric reads as
one unit: a position's C-vector for :class:`ChannelStats`, :class:`SpatialCorrelation` (and every
lag pair with such an end) and :class:`AuxEnergyShare` (either tensor), a whole image for
:class:`SubbandEnergy` (a DWT mixes positions). A sample holding any NaN or inf is skipped and
counted in the state ``nonfinite``; ``count`` counts the samples used. ``compute()`` returns both
counts beside its values and raises a one-line ``ValueError`` naming the metric when there is no
sample to compute on: no update at all, or every sample non-finite.

**Intervals.** ``ChannelStats(..., per_image=True)`` (and :class:`NeighbourhoodTotalCorrelation`)
keep the float64 sums of every image apart for :func:`energylab.stats.intervals.bootstrap_intervals`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor
from torchmetrics import Metric

from energylab.stats.batched import channel_statistics_batched, neighbourhood_statistics_batched
from energylab.stats.dependence import MAX_LAG, lag_window
from energylab.stats.energy import energy_statistics
from energylab.stats.estimators import _neighbourhood_total_correlation
from energylab.stats.functional import (
    Moments,
    _autocorrelation_update,
    _aux_energy_share_compute,
    _aux_energy_share_update,
    _blocks,
    _channel_moment_shapes,
    _channel_stats_compute,
    _channel_stats_images,
    _channel_stats_update,
    _check_channel_input,
    _effective_sample_size_compute,
    _f64_zeros,
    _finite,
    _lag_name,
    _merge_moments,
    _merge_spatial_moments,
    _merge_subband_centring,
    _pack,
    _packed_zeros,
    _pool_moments,
    _rate_share_compute,
    _rate_share_update,
    _raw_sums,
    _reduce_packed,
    _spatial_correlation_compute,
    _spatial_correlation_update,
    _spatial_moment_shapes,
    _subband_centring_shapes,
    _subband_energy_centred,
    _subband_energy_compute,
    _subband_energy_update,
    _subband_names,
    _unpack,
)
from energylab.stats.intervals import jackknife_statistics

__all__ = [
    "AuxEnergyShare",
    "ChannelStats",
    "EffectiveSampleSize",
    "NeighbourhoodTotalCorrelation",
    "RateShare",
    "SpatialCorrelation",
    "SubbandEnergy",
    "aux_energy_share",
    "channel_stats",
    "neighbourhood_total_correlation",
    "spatial_correlation",
    "spatial_effective_sample_size",
    "subband_energy",
]


_JACKKNIFED = ("total_correlation", "coding_gain", "klt_coding_gain", "decorrelation_gain")
"""The statistics of :func:`energy_statistics` that :meth:`ChannelStats.statistics` jackknifes."""


class _StreamingMetric(Metric):
    """Float64 states (sums, and packed moments merged stably) that follow the device of the data.

    ``count`` and ``nonfinite`` are states of every metric (see the module docstring). Moments
    centred at a running mean are one packed state each (:meth:`_add_moments_state`), whose
    ``dist_reduce_fx`` (used by the all-reduce and by ``merge_state``) is their pairwise merge.
    States stay float64 whatever the casts of a parent module (``.to(dtype)``, ``.half()``,
    ``set_dtype``): :meth:`_apply` moves them between devices only. ``compute_with_cache`` defaults
    to False, so a :meth:`merge` is seen by the next ``compute``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("compute_with_cache", False)
        super().__init__(**kwargs)
        self._moment_layouts: dict[str, tuple[list[tuple[int, ...]], Callable]] = {}
        self.add_state("count", _f64_zeros(), dist_reduce_fx="sum")
        self.add_state("nonfinite", _f64_zeros(), dist_reduce_fx="sum")

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        """``nn.Module._apply`` with the states excluded, then moved to the new device only."""
        names = tuple(self.metric_state)
        this = super()._apply(fn, exclude_state=(*exclude_state, *names))
        for name in names:
            if name not in exclude_state:
                value = getattr(this, name)
                if isinstance(value, list):  # per-image states (dist_reduce_fx="cat")
                    setattr(this, name, [v.to(this.device) for v in value])
                else:
                    setattr(this, name, value.to(this.device))
        return this

    def _follow(self, y: Tensor) -> None:
        """Move the states to ``y``'s device (cheap: they are small)."""
        if self.device != y.device:
            self.to(y.device)

    def _add(self, increments: dict[str, Tensor]) -> None:
        for name, value in increments.items():
            getattr(self, name).add_(value)

    def _add_moments_state(
        self, name: str, shapes: Sequence[tuple[int, ...]], merge: Callable[[Moments, Moments], Moments]
    ) -> None:
        """A state of moments with parts of the given ``shapes``, packed into one float64 vector
        and reduced (across processes, and by :meth:`merge`) with ``merge``."""
        shapes = [tuple(shape) for shape in shapes]
        self._moment_layouts[name] = (shapes, merge)
        self.add_state(name, _packed_zeros(shapes),
                       dist_reduce_fx=partial(_reduce_packed, shapes=shapes, merge=merge))

    def _moments(self, name: str) -> Moments:
        """The parts of the packed state ``name`` (views)."""
        return _unpack(getattr(self, name), self._moment_layouts[name][0])

    def _merge_moments(self, name: str, moments: Moments) -> None:
        """Merge the moments of a batch into the packed state ``name``."""
        merge = self._moment_layouts[name][1]
        setattr(self, name, _pack(*merge(self._moments(name), moments)))

    def merge(self, other: _StreamingMetric) -> _StreamingMetric:
        """Add ``other``'s state to this one through ``Metric.merge_state`` (sums add, moments
        merge pairwise); returns ``self``.

        Raises:
            ValueError: ``other`` is of another class or configuration.
        """
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(f"cannot merge {other!r} into {self!r}")
        self.merge_state({k: [x.to(self.device) for x in v] if isinstance(v, list) else v.to(self.device)
                          for k, v in other.metric_state.items()})
        return self

    def _config(self) -> tuple:
        raise NotImplementedError


class ChannelStats(_StreamingMetric):
    """Streaming mean, covariance and energies of the channels of latents.

    States (float64): ``count`` (finite samples) and ``nonfinite`` (samples of the input holding
    NaN or inf, skipped), ``dist_reduce_fx="sum"``; ``moments``: the packed ``(count, mean (C,),
    m2 (C, C))`` with ``m2 = sum_n (y_n - mu)(y_n - mu)^T`` about the running mean ``mu``, merged
    pairwise (:func:`~energylab.stats.functional._merge_moments`) by ``update``, ``merge`` and the
    all-reduce. The covariance is ``m2 / (count - 1)`` with its diagonal clamped at 0 and the
    off-diagonals at ``sqrt(S_ii S_jj)``; the energies are ``mu^2 + diag(m2) / count``.
    :attr:`sum` and :attr:`outer` give the raw sums ``sum_n y_n`` and ``sum_n y_n y_n^T``.

    Accumulation is one float64 GEMM per chunk of ``m`` samples ``X`` (whole images, or ``2^20 / C``
    samples on the CPU, ``2^25 / C`` elsewhere), on the chunk centred at its own mean ``mu_X``:
    ``(X - mu_X)^T (X - mu_X)``, merged into the state with the chunk's count and mean (the
    parallel-variance update of Chan, Golub and LeVeque, 1979). Nothing is subtracted from a raw
    ``sum y y^T``, so nothing cancels: a raw ``X^T X`` loses about ``eps64 (|mu| / s)^2`` of the
    covariance to each rounding of the sums (``eps64 = 1.1e-16``, ``s`` the spread; a channel
    constant at ``1e5`` reads a variance of ``1e-6``, enough for a finite coding gain), while the
    moments keep a constant channel's variance at 0 and agree with a two-pass float64 covariance to
    about ``eps64 |mu| / s`` relative (the rounding of a float64 mean: ``1e-11`` for means ``1e5``
    times a spread of 0.05), however the data are split into updates, images or processes.

    Args:
        channels: C.
        max_positions: if set, each ``update`` (each image, with ``per_image``) keeps at most this
            many samples (positions), drawn without replacement by a ``torch.Generator`` on the
            data's device seeded with ``seed``; ``nonfinite`` still counts over every position of
            the input.
        seed: seed of that generator.
        per_image: also keep the sums of every **image** apart (for :func:`bootstrap_intervals`):
            list states ``image_count`` ``(B,)``, ``image_sum`` ``(B, C)``, ``image_outer``
            ``(B, C, C)`` per update of ``B`` images, float64, ``dist_reduce_fx="cat"`` (so
            processes contribute their images); :meth:`images` stacks them. An image is one
            ``(C, H, W)`` element of a 4-D input, or the whole of one 2-D ``(N, C)`` update.
            Each image's sums come from its own centred moments (the raw second moment of one
            image cancels at most ``eps64 (|mu| / s)^2`` when centred again, and exactly nothing
            for a constant channel); the pooled moments are the merge of the per-image ones.

    Raises:
        ValueError: ``channels < 1`` or ``max_positions < 1``.

    >>> m = ChannelStats(2)
    >>> m.update(torch.tensor([[1.0, 2.0], [3.0, 2.0], [float("nan"), 0.0], [2.0, 5.0]]))
    >>> out = m.compute()
    >>> out["mean"].tolist(), out["covariance"].tolist(), int(out["count"]), int(out["nonfinite"])
    ([2.0, 3.0], [[1.0, 0.0], [0.0, 3.0]], 3, 1)
    """

    def __init__(
        self, channels: int, max_positions: int | None = None, seed: int = 0, per_image: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if max_positions is not None and max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.channels, self.max_positions, self.seed = channels, max_positions, seed
        self.per_image = per_image
        self._generators: dict[torch.device, torch.Generator] = {}
        self._add_moments_state("moments", _channel_moment_shapes(channels), _merge_moments)
        if per_image:
            for name in ("image_count", "image_sum", "image_outer"):
                self.add_state(name, [], dist_reduce_fx="cat")

    def _config(self) -> tuple:
        return (self.channels, self.per_image)

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

        Any float dtype and device; the moments are float64 on ``y``'s device (the states move
        there). Samples holding NaN or inf are skipped and counted. No host synchronisation.

        Raises:
            ValueError: wrong rank or channel count. TypeError: non-float ``y``.
        """
        _check_channel_input(y, self.channels)
        self._follow(y)
        y = y.detach()
        if self.per_image and y.dim() == 4 and (self.max_positions is None
                                                or y.shape[2] * y.shape[3] <= self.max_positions):
            count, mean, m2, skipped = _channel_stats_images(y, self.channels)
            self._add({"count": count.sum(), "nonfinite": skipped.sum()})
            self._merge_moments("moments", _pool_moments(count, mean, m2))
            self._add_images(count, mean, m2)
            return
        for image in y.split(1) if self.per_image and y.dim() == 4 else (y,):
            count, mean, m2, skipped = self._moments_of(image)
            self._add({"count": count, "nonfinite": skipped})
            self._merge_moments("moments", (count, mean, m2))
            if self.per_image:
                self._add_images(count.reshape(1), mean[None], m2[None])

    def _moments_of(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = y.numel() // self.channels
        if self.max_positions is not None and n > self.max_positions:
            count, mean, m2, _ = _channel_stats_update(self._subsample(y), self.channels)
            return count, mean, m2, n - _finite(y, 1).sum()
        return _channel_stats_update(y, self.channels)

    def _add_images(self, count: Tensor, mean: Tensor, m2: Tensor) -> None:
        """Append the sums of images from their moments ``(I,)``, ``(I, C)``, ``(I, C, C)``."""
        total, outer = _raw_sums(count, mean, m2)
        self.image_count.append(count)
        self.image_sum.append(total)
        self.image_outer.append(outer)

    @property
    def sum(self) -> Tensor:
        """``sum_n y_n`` ``(C,)`` of the samples so far, from the moments."""
        count, mean, m2 = self._moments("moments")
        return _raw_sums(count, mean, m2)[0]

    @property
    def outer(self) -> Tensor:
        """``sum_n y_n y_n^T`` ``(C, C)`` of the samples so far, from the moments (for inspection:
        it holds the means' part, and subtracting it again cancels; :meth:`compute` does not)."""
        count, mean, m2 = self._moments("moments")
        return _raw_sums(count, mean, m2)[1]

    def images(self) -> tuple[Tensor, Tensor, Tensor]:
        """The per-image sums ``(count (I,), sum (I, C), outer (I, C, C))``, float64, in update
        order (process order after a sync); the input of :func:`bootstrap_intervals`.

        Raises:
            ValueError: the metric was made without ``per_image`` or has seen no image.
        """
        if not self.per_image:
            raise ValueError("ChannelStats: per-image sums need ChannelStats(..., per_image=True)")
        if not len(self.image_count):
            raise ValueError("ChannelStats: no data (images() before any update)")
        cat = [torch.cat(v) if isinstance(v, list) else v
               for v in (self.image_count, self.image_sum, self.image_outer)]
        return cat[0], cat[1], cat[2]

    def compute(self) -> dict[str, Tensor]:
        """Statistics of everything accumulated (across processes, when distributed).

        Returns:
            ``mean`` ``(C,)``, ``covariance`` ``(C, C)`` unbiased (divides by ``count - 1``),
            ``energies`` ``(C,)`` = ``E[y_c^2]``, ``count`` and ``nonfinite`` (scalars); float64 on
            the states' device.

        Raises:
            ValueError: fewer than 2 finite samples (no update, or all non-finite).
        """
        count, mean, m2 = self._moments("moments")
        return _channel_stats_compute(count, mean, m2, self.nonfinite)

    def statistics(
        self, k: int | None = None, jackknife: bool | None = None
    ) -> dict[str, float | int | str | None]:
        """:func:`energy_statistics` of :meth:`compute`'s covariance and energies, bias-corrected
        with ``n = count`` where ``count > C`` (plug-in values otherwise), and, with per-image
        sums, the jackknife over images on top.

        **Correlated positions.** The i.i.d. correction at ``n = count`` removes too little when
        positions are correlated (as in a latent map). With ``jackknife`` (default: whenever
        per-image sums are kept) ``total_correlation``, ``coding_gain``, ``klt_coding_gain`` and
        ``decorrelation_gain`` are the jackknife-corrected values over whole images
        (:func:`~energylab.stats.intervals.jackknife_statistics`; the gains on the log scale, so
        the identities between them hold); a statistic whose leave-one-out value is undefined
        keeps its i.i.d. value. ``bias_correction`` names what the four carry: ``"jackknife"``,
        ``"iid"`` (fewer than 2 images, or leaving an image out leaves no more samples than C)
        or ``"plug-in"`` (``count <= C``). The other statistics are as without it.

        Raises:
            ValueError: ``jackknife=True`` without ``per_image``; as :meth:`compute`.

        >>> m = ChannelStats(2)
        >>> m.update(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]))
        >>> out = m.statistics()  # uncorrelated channels: no total correlation before correction
        >>> out["numerical_rank"], round(out["total_correlation_plugin"], 4), out["bias_correction"]
        (2, 0.0, 'iid')
        """
        if jackknife and not self.per_image:
            raise ValueError("ChannelStats: the jackknife needs per-image sums: "
                             "ChannelStats(..., per_image=True)")
        out = self.compute()
        n = int(out["count"])
        stats = energy_statistics(out["covariance"], out["energies"], k, n if n > self.channels else None)
        stats["bias_correction"] = "iid" if n > self.channels else "plug-in"
        if not (self.per_image if jackknife is None else jackknife) or n <= self.channels:
            return stats
        with self.sync_context():
            images = self.images()
        jack = jackknife_statistics(*images, channel_statistics_batched)
        if jack is not None:
            stats["bias_correction"] = "jackknife"
            stats.update({name: jack[name][0] for name in _JACKKNIFED if jack.get(name) is not None})
        return stats


class SubbandEnergy(_StreamingMetric):
    """Share of the energy in each wavelet subband, pooled over channels, positions and batches.

    With ``d_b`` the coefficients of band ``b`` of the ``levels``-level 2-D DWT of every channel
    (:func:`energylab.wavelets.dwt2`, re-applied to the LL block; LH, HL, HH are pywt's cH, cV, cD:
    LH is high-pass along H), ``share_b = sum d_b^2 / sum_b' sum d_b'^2``. For an orthonormal
    wavelet the denominator is ``sum y^2`` (Parseval; S. Mallat, *A Wavelet Tour of Signal
    Processing*, 3rd ed., 2009, sec. 7.7). Zero total energy is treated as white: each band's share
    is its fraction of the coefficients. States: ``energy`` ``(3L+1,)`` float64 sums; ``count`` and
    ``nonfinite`` count **images** (a DWT mixes positions, so an image holding NaN or inf is
    skipped whole).

    **Centred** (with ``channels`` = C given): the shares of ``y - mu`` with ``mu_c`` the channel
    mean over every kept position, as ``<band>_centred`` keys. The DWT is linear and maps a
    constant ``mu_c`` to ``LL{L} = 2^L mu_c`` and zero details (analysis low-pass taps sum to
    ``sqrt 2``, high-pass taps to 0), so only ``LL{L}`` changes, to
    ``sum_c sum (LL_c - 2^L mu_c)^2 = sum_c [m2_c + n_LL (mean_LL,c - 2^L mu_c)^2]`` with ``n_LL``,
    ``mean_LL`` and ``m2`` the count, channel means and centred sums of squares of the ``LL{L}``
    coefficients: a sum of squares, so nothing cancels however large the means (``E_LL`` minus the
    means' part would). State ``centring``: the packed moments ``(positions, mu (C,), n_LL,
    mean_LL (C,), m2 (C,))``, merged pairwise (Chan, Golub and LeVeque 1979; see the module
    docstring).

    Args:
        levels: decomposition levels L >= 1.
        wavelet: a pywt discrete wavelet name (see :func:`energylab.wavelets.dwt2`).
        channels: C, to add the centred shares; None: raw shares only.

    Raises:
        ValueError: ``levels < 1``.

    >>> m = SubbandEnergy(levels=1)
    >>> m.update(torch.ones(2, 3, 4, 4))  # constant: all energy in LL
    >>> {k: round(float(v), 4) for k, v in m.compute().items()}
    {'LL1': 1.0, 'LH1': 0.0, 'HL1': 0.0, 'HH1': 0.0, 'count': 2.0, 'nonfinite': 0.0}
    """

    def __init__(
        self, levels: int = 2, wavelet: str = "haar", channels: int | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels, self.wavelet, self.channels = levels, wavelet, channels
        self.bands = _subband_names(levels)
        self.add_state("energy", _f64_zeros(3 * levels + 1), dist_reduce_fx="sum")
        if channels is not None:
            self._add_moments_state("centring", _subband_centring_shapes(channels), _merge_subband_centring)

    def _config(self) -> tuple:
        return (self.levels, self.wavelet, self.channels)

    def update(self, y: Tensor) -> None:
        """Accumulate the band energies of ``y`` ``(B, C, H, W)``, H and W divisible by ``2^L``.

        Raises:
            ValueError: wrong rank or sizes. TypeError: non-float ``y``.
        """
        energy, count, skipped, centring = _subband_energy_update(y, self.levels, self.wavelet)
        if self.channels is not None and y.shape[1] != self.channels:
            raise ValueError(f"SubbandEnergy: expected {self.channels} channels, got {tuple(y.shape)}")
        self._follow(y)
        self._add({"energy": energy, "count": count, "nonfinite": skipped})
        if self.channels is not None:
            self._merge_moments("centring", centring)

    def compute(self) -> dict[str, Tensor]:
        """Shares ``{LL{L}, LH{L}, HL{L}, HH{L}, ..., LH1, HL1, HH1}`` (0-d float64 tensors
        summing to 1, names in :attr:`bands`), then ``count`` and ``nonfinite`` images.

        Raises:
            ValueError: no finite image (no update, or all non-finite).
        """
        out = _subband_energy_compute(self.energy, self.count, self.nonfinite, self.levels)
        if self.channels is None:
            return out
        centred = _subband_energy_centred(self.energy, self._moments("centring"), self.levels)
        return out | {f"{band}_centred": v for band, v in zip(self.bands, centred.unbind(), strict=True)}


class SpatialCorrelation(_StreamingMetric):
    """Normalised spatial autocorrelation of each channel at given lags, averaged over channels.

    For channel c with mean ``mu_c`` and (biased) variance ``v_c`` over all N positions of all
    images, and lag ``d = (dh, dw)`` with the ``M_d`` position pairs ``(p, p + d)`` inside the same
    image::

        rho_c(d) = [1/M_d sum_p (y_c(p) - mu_c)(y_c(p+d) - mu_c)] / v_c

    (the sample autocorrelation of G. Box and G. Jenkins, *Time Series Analysis*, sec. 2.1.5, with
    the lag term averaged over its valid pairs). The result is ``mean_c rho_c(d)`` over the channels
    with ``v_c > 1e-12 * max_c v_c``; 0 when there are none (no variance: treated as white).
    State ``moments`` (float64, packed): N, per channel the mean ``mu`` and ``sum (y - mu)^2``, and
    per lag ``M_d``, ``sum (y(p) - mu)(y(p+d) - mu)``, ``sum (y(p) - mu)``, ``sum (y(p+d) - mu)``,
    all about the running mean: each batch is centred at its own mean and merged pairwise (Chan,
    Golub and LeVeque 1979; the lag sums move to the merged mean with the last two), so nothing
    cancels (raw ``sum y^2 / N - mu^2`` gives a channel constant at ``1e5`` a variance of ``1e-6``
    and a correlation far outside ``[-1, 1]``) and merging and syncing give the numbers of one pass.
    A position holding NaN or inf in any channel is skipped (with every pair it ends) and counted
    in ``nonfinite``.

    Args:
        channels: C.
        lags: ``(dh, dw)`` integer pairs, any sign.

    Raises:
        ValueError: ``channels < 1``, no lags, or a lag that is not a pair of integers.

    >>> m = SpatialCorrelation(1, lags=[(0, 1)])
    >>> m.update(torch.tensor([[[[1.0, 1.0, -1.0, -1.0]]]]))  # pairs (1,1), (1,-1), (-1,-1)
    >>> {k: round(float(v), 4) for k, v in m.compute().items()}
    {'0,1': 0.3333, 'count': 4.0, 'nonfinite': 0.0}
    """

    def __init__(
        self, channels: int, lags: Sequence[tuple[int, int]] = ((0, 1), (1, 0), (1, 1)), **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        lags = tuple(tuple(lag) for lag in lags)
        if not lags or any(len(g) != 2 or not all(isinstance(d, int) for d in g) for g in lags):
            raise ValueError(f"lags must be a non-empty sequence of (dh, dw) integers, got {lags}")
        self.channels, self.lags = channels, lags
        self.lag_names = [_lag_name(lag) for lag in lags]
        shapes = _spatial_moment_shapes(channels, len(lags))
        self._add_moments_state("moments", shapes, _merge_spatial_moments)

    def _config(self) -> tuple:
        return (self.channels, self.lags)

    def update(self, y: Tensor) -> None:
        """Accumulate ``y`` ``(B, C, H, W)``; every lag must fit: ``|dh| < H``, ``|dw| < W``.

        Raises:
            ValueError: wrong shape or a lag that does not fit. TypeError: non-float ``y``.
        """
        moments, skipped = _spatial_correlation_update(y, self.channels, self.lags)
        self._follow(y)
        self._add({"count": moments[0], "nonfinite": skipped})
        self._merge_moments("moments", moments)

    def compute(self) -> dict[str, Tensor]:
        """``{"dh,dw": mean_c rho_c(d)}`` for each lag (names in :attr:`lag_names`), then ``count``
        and ``nonfinite`` positions; 0-d float64 tensors.

        Raises:
            ValueError: no finite position (no update, or all non-finite).
        """
        return _spatial_correlation_compute(self.lags, self._moments("moments"), self.nonfinite)


class EffectiveSampleSize(_StreamingMetric):
    """Effective number of independent positions of correlated maps, from their autocorrelation.

    ``n_eff = n / sum_d (N_d / n) rho(d)^2`` (:func:`energylab.stats.dependence.effective_sample_size`:
    Bartlett 1946; Bayley & Hammersley 1946), ``rho(d)`` the spatial autocorrelation of
    :class:`SpatialCorrelation` (per channel about the pooled mean, over the ``N_d`` position pairs
    inside one image, averaged over the channels with variance) at every lag of the window ``|dh|,
    |dw| <= max_lag`` (:func:`~energylab.stats.dependence.lag_window`; lags that do not fit a map
    add no pair). The moments are those of :class:`SpatialCorrelation` for all the window's lags,
    computed by FFT (:func:`~energylab.stats.functional._autocorrelation_update`) and merged the
    same way, so streaming, merging and syncing give the numbers of one pass. A diagnostic of how
    dependent the positions are: the bias corrections of the statistics use the jackknife over
    images (:func:`energylab.stats.intervals.jackknife_statistics`), not this number.

    Args:
        channels: C.
        max_lag: half-width of the lag window (default
            :data:`~energylab.stats.dependence.MAX_LAG`).

    Raises:
        ValueError: ``channels < 1`` or ``max_lag < 1``.

    >>> m = EffectiveSampleSize(4)
    >>> m.update(torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    >>> out = m.compute()  # white noise: about every position counts
    >>> int(out["count"]), bool(0.95 < out["n_eff"] / out["count"] <= 1)
    (2048, True)
    """

    def __init__(self, channels: int, max_lag: int = MAX_LAG, **kwargs) -> None:
        super().__init__(**kwargs)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels, self.max_lag, self.lags = channels, max_lag, lag_window(max_lag)
        self._add_moments_state("moments", _spatial_moment_shapes(channels, len(self.lags)),
                                _merge_spatial_moments)

    def _config(self) -> tuple:
        return (self.channels, self.max_lag)

    def update(self, y: Tensor) -> None:
        """Accumulate ``y`` ``(B, C, H, W)``. No host synchronisation.

        Raises:
            ValueError: wrong shape. TypeError: non-float ``y``.
        """
        moments, skipped = _autocorrelation_update(y, self.channels, self.max_lag)
        self._follow(y)
        self._add({"count": moments[0], "nonfinite": skipped})
        self._merge_moments("moments", moments)

    def compute(self) -> dict[str, Tensor]:
        """``n_eff``, ``autocorrelation_sum`` (``count / n_eff``), ``count`` and ``nonfinite``
        positions; 0-d float64 tensors.

        Raises:
            ValueError: no finite position (no update, or all non-finite).
        """
        return _effective_sample_size_compute(self._moments("moments"), self.nonfinite)


def spatial_effective_sample_size(y: Tensor, max_lag: int = MAX_LAG) -> dict[str, float]:
    """One-shot :class:`EffectiveSampleSize` of ``y`` ``(B, C, H, W)``: ``n_eff``,
    ``autocorrelation_sum``, ``count``, ``nonfinite`` as floats.

    >>> y = torch.randn(4, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    >>> out = spatial_effective_sample_size(y.repeat_interleave(2, 3))  # each value twice along W
    >>> round(out["autocorrelation_sum"], 1)  # rho(0, +-1) = 1/2: 1 + 2 (1/2)^2
    1.5
    """
    metric = EffectiveSampleSize(y.shape[1], max_lag)
    metric.update(y)
    return {key: float(value) for key, value in metric.compute().items()}


class AuxEnergyShare(_StreamingMetric):
    """Share of the merged energy carried by the auxiliary branch at one merge point.

    ``aux_energy_share = ‖aux‖² / ‖main + aux‖²`` summed over every element of every update
    (float64 sums, ``dist_reduce_fx="sum"``): 0 when the linear path carries nothing; it can
    exceed 1 when the branches cancel. A position holding NaN or inf in either tensor is skipped
    and counted in ``nonfinite``.

    >>> m = AuxEnergyShare()
    >>> m.update(torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), 2.0))
    >>> {k: float(v) for k, v in m.compute().items()}
    {'aux_energy_share': 0.25, 'count': 4.0, 'nonfinite': 0.0}
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("aux", _f64_zeros(), dist_reduce_fx="sum")
        self.add_state("merged", _f64_zeros(), dist_reduce_fx="sum")

    def _config(self) -> tuple:
        return ()

    def update(self, aux: Tensor, merged: Tensor) -> None:
        """Accumulate the energies of ``aux`` (the auxiliary branch) and ``merged`` (main + aux),
        both ``(B, C, H, W)`` of one shape.

        Raises:
            ValueError: shapes differ or are not 4-D. TypeError: non-float input.
        """
        a, m, count, skipped = _aux_energy_share_update(aux, merged)
        self._follow(aux)
        self._add({"aux": a, "merged": m, "count": count, "nonfinite": skipped})

    def compute(self) -> dict[str, Tensor]:
        """``aux_energy_share``, ``count`` and ``nonfinite`` positions, 0-d float64 tensors.

        Raises:
            ValueError: no finite position (no update, or all non-finite).
        """
        return _aux_energy_share_compute(self.aux, self.merged, self.count, self.nonfinite)


def channel_stats(y: Tensor) -> dict[str, Tensor]:
    """Mean, covariance, energies, counts of ``y`` ``(B, C, H, W)`` or ``(N, C)``: one-shot
    :class:`ChannelStats`.

    >>> channel_stats(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))["covariance"].tolist()
    [[2.0, 0.0], [0.0, 0.0]]
    """
    metric = ChannelStats(y.shape[1])
    metric.update(y)
    return metric.compute()


def subband_energy(y: Tensor, levels: int = 2, wavelet: str = "haar") -> dict[str, Tensor]:
    """Subband energy shares of ``y`` ``(B, C, H, W)``: one-shot :class:`SubbandEnergy`.

    >>> round(float(subband_energy(torch.ones(1, 1, 4, 4), levels=1)["LL1"]), 4)
    1.0
    """
    metric = SubbandEnergy(levels, wavelet)
    metric.update(y)
    return metric.compute()


def spatial_correlation(
    y: Tensor, lags: Sequence[tuple[int, int]] = ((0, 1), (1, 0), (1, 1))
) -> dict[str, Tensor]:
    """Spatial autocorrelation of ``y`` ``(B, C, H, W)``: one-shot :class:`SpatialCorrelation`.

    >>> out = spatial_correlation(torch.tensor([[[[1.0, -1.0, 1.0, -1.0]]]]), lags=[(0, 1)])
    >>> round(float(out["0,1"]), 4)
    -1.0
    """
    metric = SpatialCorrelation(y.shape[1], lags)
    metric.update(y)
    return metric.compute()


def aux_energy_share(aux: Tensor, merged: Tensor) -> Tensor:
    """``‖aux‖² / ‖merged‖²`` of two ``(B, C, H, W)`` tensors: one-shot :class:`AuxEnergyShare`.

    >>> float(aux_energy_share(torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)))
    0.25
    """
    metric = AuxEnergyShare()
    metric.update(aux, merged)
    return metric.compute()["aux_energy_share"]


class NeighbourhoodTotalCorrelation(ChannelStats):
    """Streaming total correlation of ``k x k`` neighbourhoods, split into channels and positions.

    Each non-overlapping ``k x k`` block of ``y`` ``(B, C, H, W)`` (H, W cropped to multiples of
    ``k``) is one sample of ``k^2 C`` variables; the states are those of a :class:`ChannelStats` of
    ``k^2 C`` channels (non-finite rule and ``per_image`` included: with ``per_image=True`` each
    ``(C, H, W)`` image's blocks are one image for :func:`bootstrap_intervals`). :meth:`split`
    gives, in nats, with the
    bias correction of :func:`total_correlation` at ``n`` = blocks::

        joint            = TC of the k^2 C variables
        across_channels  = sum over the k^2 block positions p of TC(channels at p)  (~ k^2 x channel TC)
        across_positions = joint - across_channels = multi-information between the k^2 position
                           vectors (>= 0 before the correction)

    (chain rule of total correlation, Watanabe 1960). A Haar DWT is a 2 x 2 spatial transform: its
    decorrelation shows up in ``across_positions``. Singular covariances give ``None`` as there.

    >>> m = NeighbourhoodTotalCorrelation(channels=1, k=2)
    >>> m.update(torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    >>> out = m.split()
    >>> abs(out["joint"]) < 0.05, out["across_channels"]  # white noise; one channel: nothing to share
    (True, 0.0)
    """

    def __init__(self, channels: int, k: int = 2, **kwargs) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        super().__init__(k * k * channels, **kwargs)
        self.k, self.latent_channels = k, channels

    def _config(self) -> tuple:
        return (self.latent_channels, self.k, self.per_image)

    def update(self, y: Tensor) -> None:
        """Accumulate the ``k x k`` blocks of ``y`` ``(B, C, H, W)``.

        Raises:
            ValueError: wrong shape, or H or W below k. TypeError: non-float ``y``.
        """
        if y.dim() != 4 or y.shape[1] != self.latent_channels or min(y.shape[2:]) < self.k:
            raise ValueError(
                f"NeighbourhoodTotalCorrelation: expected (B, {self.latent_channels}, H, W) with H, W "
                f">= {self.k}, got {tuple(y.shape)}"
            )
        super().update(_blocks(y, self.k))

    def split(self, jackknife: bool | None = None) -> dict[str, float | str | None]:
        """``joint``, ``across_channels``, ``across_positions`` (nats, bias-corrected at ``n`` =
        blocks where ``n > k^2 C``, plug-in otherwise), ``count`` (blocks) and
        ``bias_correction``: with ``jackknife`` (default: whenever per-image sums are kept) the
        three are jackknife-corrected over whole images on top, as :meth:`ChannelStats.statistics`
        (``"jackknife"``, ``"iid"`` or ``"plug-in"`` as there).

        Raises:
            ValueError: fewer than 2 finite blocks; ``jackknife=True`` without ``per_image``.
        """
        if jackknife and not self.per_image:
            raise ValueError("NeighbourhoodTotalCorrelation: the jackknife needs per-image sums: "
                             "NeighbourhoodTotalCorrelation(..., per_image=True)")
        out = self.compute()
        n = int(out["count"])
        split = _neighbourhood_total_correlation(out["covariance"], self.k, n if n > self.channels else None)
        split |= {"count": n, "bias_correction": "iid" if n > self.channels else "plug-in"}
        if not (self.per_image if jackknife is None else jackknife) or n <= self.channels:
            return split
        with self.sync_context():
            images = self.images()
        jack = jackknife_statistics(*images, partial(neighbourhood_statistics_batched, k=self.k))
        if jack is not None:
            split["bias_correction"] = "jackknife"
            for key in ("joint", "across_channels", "across_positions"):
                if jack.get(f"neighbourhood_tc.{key}") is not None:
                    split[key] = jack[f"neighbourhood_tc.{key}"][0]
        return split


def neighbourhood_total_correlation(y: Tensor, k: int = 2) -> dict[str, float | None]:
    """Total correlation of the ``k x k`` neighbourhoods of ``y`` ``(B, C, H, W)``, split into its
    across-channel and across-position parts: one-shot :class:`NeighbourhoodTotalCorrelation`.

    Returns:
        ``joint``, ``across_channels``, ``across_positions`` (nats) and ``count`` (blocks).

    >>> y = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    >>> y[:, :, 1] = y[:, :, 0]  # each row copies the one above: rank 2 of 4
    >>> neighbourhood_total_correlation(y)["joint"] is None
    True
    """
    metric = NeighbourhoodTotalCorrelation(y.shape[1], k)
    metric.update(y)
    return metric.split()


class RateShare(_StreamingMetric):
    """Streaming per-channel share of the bits of ``y``: the float64 sums of :func:`rate_shares`.

    ``share_c = sum_{b,h,w} -log2 p(y_hat_{b,c,h,w}) / sum_{b,c,h,w} -log2 p(...)`` for the
    likelihoods ``p`` an entropy model gives ``y_hat`` (CompressAI's ``out["likelihoods"]["y"]``).
    States (float64, ``dist_reduce_fx="sum"``): ``bits`` ``(C,)``, ``count`` (positions used) and
    ``nonfinite`` (positions with a NaN, inf or zero likelihood, skipped). ``update`` does not check
    that ``p`` lies in ``(0, 1]`` (that would wait for the device); :func:`rate_shares` does.

    Args:
        channels: C.

    >>> m = RateShare(3)
    >>> m.update(torch.tensor([[[[0.5]], [[0.25]], [[1.0]]]]))  # 1, 2 and 0 bits
    >>> m.compute()["shares"].tolist()
    [0.3333333333333333, 0.6666666666666666, 0.0]
    """

    def __init__(self, channels: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.add_state("bits", _f64_zeros(channels), dist_reduce_fx="sum")

    def _config(self) -> tuple:
        return (self.channels,)

    def update(self, likelihoods: Tensor) -> None:
        """Accumulate the bits of ``likelihoods`` ``(B, C, H, W)``. No host synchronisation.

        Raises:
            ValueError: wrong rank or channel count. TypeError: non-float input.
        """
        self._follow(likelihoods)
        count, bits, skipped = _rate_share_update(likelihoods, self.channels)
        self._add({"count": count, "bits": bits, "nonfinite": skipped})

    def compute(self) -> dict[str, Tensor]:
        """``shares`` ``(C,)`` (sum 1), ``bits`` ``(C,)``, ``bits_per_position`` (bits of all C
        channels at one position), ``count``, ``nonfinite``; float64.

        Raises:
            ValueError: no finite position (no update, or all skipped).
        """
        return _rate_share_compute(self.count, self.bits, self.nonfinite)

"""Energy statistics of latents: the two-part split of energy compaction, streamed.

A latent ``y`` of shape ``(B, C, H, W)`` is read as ``N = B*H*W`` samples of a C-vector. Energy
compaction splits exactly into two parts (N. S. Jayant and P. Noll, *Digital Coding of Waveforms*,
1984, ch. 12)::

    log klt_coding_gain = log coding_gain + log decorrelation_gain
                          (total)            (energy modulation)  (decorrelation)

The package, by what a reader looks for (each module has its ``__all__``; every public name is
re-exported here, so ``from energylab.stats import X`` works for all of them):

* :mod:`~energylab.stats.estimators`: estimators on one covariance (numpy): the gains, total
  correlation, effective rank, off-diagonal ratios, numerical rank, the Gaussian finite-sample bias
  corrections; the rule for singular covariances (``None``, never a floor-made value).
* :mod:`~energylab.stats.energy`: channel energies (mean square, L2 norm, with and without the
  means), compaction curves, top-k shares, and :func:`energy_statistics` (every estimator as one
  flat dict).
* :mod:`~energylab.stats.modulation`: energy modulation against the quantiser (spread in steps,
  rate shares and their summaries).
* :mod:`~energylab.stats.functional`: the functional layer of the streaming metrics (per-batch
  float64 moments and their stable merge, ``_<name>_update`` / ``_<name>_compute``).
* :mod:`~energylab.stats.metrics`: the streaming ``torchmetrics.Metric`` classes
  (:class:`ChannelStats`, :class:`SubbandEnergy`, :class:`SpatialCorrelation`,
  :class:`AuxEnergyShare`, :class:`RateShare`, :class:`NeighbourhoodTotalCorrelation`), their
  non-finite and no-data rule, and their one-shot forms.
* :mod:`~energylab.stats.batched`: the estimators on many pooled sums at once (torch).
* :mod:`~energylab.stats.intervals`: bootstrap intervals over whole images.
* :mod:`~energylab.stats.paired`: paired contrasts over seeds (t-interval).
* :mod:`~energylab.stats.quality`: PSNR and decibels.

Imports inside the package run one way: ``estimators`` <- ``energy``, ``modulation``, ``batched``,
``functional`` <- ``metrics``, ``intervals``; ``paired`` and ``quality`` stand alone.
"""

from energylab.stats.batched import (
    channel_statistics_batched,
    neighbourhood_statistics_batched,
)
from energylab.stats.energy import (
    ENERGY_KINDS,
    channel_energies,
    energy_compaction_curve,
    energy_shares,
    energy_statistics,
    mean_energy_fraction,
    topk_energy_share,
)
from energylab.stats.estimators import (
    EIGENVALUE_FLOOR,
    RANK_RTOL,
    CovLike,
    Spectrum,
    coding_gain,
    correlation_matrix,
    decorrelation_gain,
    effective_rank,
    floored_eigenvalues,
    klt_coding_gain,
    numerical_rank,
    offdiag_energy_ratio,
    offdiag_energy_ratio_cov,
    spectrum,
    total_correlation,
)
from energylab.stats.intervals import (
    bootstrap_intervals,
    bootstrap_weights,
    percentile_interval,
)
from energylab.stats.metrics import (
    AuxEnergyShare,
    ChannelStats,
    NeighbourhoodTotalCorrelation,
    RateShare,
    SpatialCorrelation,
    SubbandEnergy,
    aux_energy_share,
    channel_stats,
    neighbourhood_total_correlation,
    spatial_correlation,
    subband_energy,
)
from energylab.stats.modulation import (
    ACTIVE_SHARE_FRACTION,
    QUANTISATION_STEP,
    active_channels,
    modulation_statistics,
    rate_share_am_gm,
    rate_share_entropy,
    rate_shares,
    std_in_steps,
)
from energylab.stats.paired import (
    PairedDifference,
    paired_difference,
)
from energylab.stats.quality import (
    psnr,
    to_db,
)

__all__ = [
    "ACTIVE_SHARE_FRACTION",
    "AuxEnergyShare",
    "ChannelStats",
    "CovLike",
    "EIGENVALUE_FLOOR",
    "ENERGY_KINDS",
    "NeighbourhoodTotalCorrelation",
    "PairedDifference",
    "QUANTISATION_STEP",
    "RANK_RTOL",
    "RateShare",
    "SpatialCorrelation",
    "Spectrum",
    "SubbandEnergy",
    "active_channels",
    "aux_energy_share",
    "bootstrap_intervals",
    "bootstrap_weights",
    "channel_energies",
    "channel_statistics_batched",
    "channel_stats",
    "coding_gain",
    "correlation_matrix",
    "decorrelation_gain",
    "effective_rank",
    "energy_compaction_curve",
    "energy_shares",
    "energy_statistics",
    "floored_eigenvalues",
    "klt_coding_gain",
    "mean_energy_fraction",
    "modulation_statistics",
    "neighbourhood_statistics_batched",
    "neighbourhood_total_correlation",
    "numerical_rank",
    "offdiag_energy_ratio",
    "offdiag_energy_ratio_cov",
    "paired_difference",
    "percentile_interval",
    "psnr",
    "rate_share_am_gm",
    "rate_share_entropy",
    "rate_shares",
    "spatial_correlation",
    "spectrum",
    "std_in_steps",
    "subband_energy",
    "to_db",
    "topk_energy_share",
    "total_correlation",
]

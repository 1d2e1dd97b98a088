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
* :mod:`~energylab.stats.dependence`: correlated positions: the effective sample size of a field
  from its spatial autocorrelation (Bartlett 1946; Bayley & Hammersley 1946; streamed by
  :class:`EffectiveSampleSize`) and the delete-one jackknife (Quenouille 1956; Tukey 1958).
* :mod:`~energylab.stats.intervals`: over whole images: the jackknife bias correction and
  t-intervals of the bias-corrected statistics, bootstrap intervals of the others
  (:func:`image_intervals`, what a capture records).
* :mod:`~energylab.stats.paired`: paired contrasts over seeds (t-interval).
* :mod:`~energylab.stats.quality`: PSNR and decibels.

Imports inside the package run one way: ``dependence`` (stands alone) and ``estimators`` <-
``energy``, ``modulation``, ``batched``, ``functional`` <- ``intervals`` <- ``metrics``; ``paired``
and ``quality`` stand alone.

**What the finite-sample corrections assume.** Total correlation, the coding gains and the
neighbourhood split are log-determinant statistics of a sample covariance, biased upwards by
about ``C(C+1) / 4n`` nats for ``n`` independent Gaussian samples (Goodman 1963); their estimators
correct it in two steps:

1. the exact Gaussian (Wishart) correction at ``n`` = the samples counted (``count``), which
   assumes independent samples;
2. with per-image sums (every capture), the jackknife over whole images
   (:func:`jackknife_statistics`), which removes what step 1 leaves of the bias when the positions
   of a map are correlated (a latent's neighbours are: lag-1 correlation about 0.73 in the
   baseline's ``y``, so ``n`` positions are worth about ``n / 10`` independent ones). It assumes
   that the **images are independent** (probe regions of different photographs; regions of one
   photograph are treated as independent too), that each statistic is a smooth function of the
   pooled sums (its bias expands in ``1/images``; not at a singular covariance) and, for its
   t-interval, that the images are enough for a roughly normal estimate (the capture's ``y``
   reads 32 or more, its high-resolution stages 8). It assumes nothing about the spatial
   correlation within an image, nor Gaussianity beyond step 1's leading term.

Records say which correction their statistics carry (``bias_correction``: ``"jackknife"``,
``"iid"`` or ``"plug-in"``) beside ``count``; :class:`EffectiveSampleSize` gives the
autocorrelation's ``n_eff`` as a diagnostic (it assumes one spatial correlation shared by all
channels and truncates at lag 8). On separable AR(1) latents (32 maps of 16 x 16, C = 48, lag-1
correlation 0.5 and 0.73) the corrected total correlation is within 0.01-0.03 nats of the truth
and the 95 % intervals cover total correlation and coding gain 97-98 times in 100 (92-98 in the
other channel covariances tried); with the i.i.d. correction alone the total correlation kept
+0.12 / +0.54 nats of bias and was covered 53 / 1 times in 100, and a coding gain of 1 (equal
variances) 7 times in 60 (``tests/test_stats_correlated.py``).
"""

from energylab.stats.batched import (
    channel_statistics_batched,
    neighbourhood_statistics_batched,
)
from energylab.stats.dependence import (
    MAX_LAG,
    Jackknife,
    effective_sample_size,
    jackknife,
    jackknife_interval,
    lag_window,
)
from energylab.stats.energy import (
    ENERGY_KINDS,
    channel_energies,
    compaction_curves,
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
    JACKKNIFE_STATISTICS,
    bootstrap_intervals,
    bootstrap_weights,
    image_intervals,
    jackknife_statistics,
    percentile_interval,
)
from energylab.stats.metrics import (
    AuxEnergyShare,
    ChannelStats,
    EffectiveSampleSize,
    NeighbourhoodTotalCorrelation,
    RateShare,
    SpatialCorrelation,
    SubbandEnergy,
    aux_energy_share,
    channel_stats,
    neighbourhood_total_correlation,
    spatial_correlation,
    spatial_effective_sample_size,
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
    "EffectiveSampleSize",
    "JACKKNIFE_STATISTICS",
    "Jackknife",
    "MAX_LAG",
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
    "compaction_curves",
    "correlation_matrix",
    "decorrelation_gain",
    "effective_rank",
    "effective_sample_size",
    "energy_compaction_curve",
    "energy_shares",
    "energy_statistics",
    "floored_eigenvalues",
    "image_intervals",
    "jackknife",
    "jackknife_interval",
    "jackknife_statistics",
    "klt_coding_gain",
    "lag_window",
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
    "spatial_effective_sample_size",
    "spectrum",
    "std_in_steps",
    "subband_energy",
    "to_db",
    "topk_energy_share",
    "total_correlation",
]

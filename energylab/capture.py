"""Latent capture: forward hooks that reduce latents to streaming energy statistics.

:class:`LatentProbe` hooks named points of a CompressAI model (with or without AuxT) and feeds every
tensor that passes them into float64 streaming metrics from :mod:`energylab.stats` on the tensor's
own device: one ``torchmetrics.MetricCollection`` per layer (``channel``: :class:`ChannelStats`
with per-image sums, ``subband``: :class:`SubbandEnergy` raw and channel-centred, ``spatial``:
:class:`SpatialCorrelation`, and for the roles in :data:`NEIGHBOURHOOD_ROLES` ``neighbourhood``:
:class:`NeighbourhoodTotalCorrelation`, k = 2, per image), plus an :class:`AuxEnergyShare` per
auxiliary branch. The per-image sums give every covariance statistic a 95 % interval over whole
probe images (the jackknife's, with its bias correction, for total correlation and the gains; the
bootstrap's for the others), computed once per capture in :meth:`LatentProbe.records`. Hooks read
tensors and never modify them; they never call ``.item()`` or otherwise wait for the device, so a
capture costs only its arithmetic. Use it as
a context manager around the forward passes of one capture (the training loop runs it on a fixed
probe set in eval mode under ``torch.no_grad()``), then :meth:`LatentProbe.records` reads the
results (that is where the host waits, once per capture).

Default layers (names used in the run's energy log) and their roles:

* ``g_a.stage1`` .. ``g_a.stage3`` (role ``"stage"``): the output of each of the first three
  resolution stages of ``g_a`` (after the AuxT merge where AuxT is on); the fourth stage's output is
  ``y``;
* ``y`` (role ``"y"``): the output of ``g_a``; ``y_hat`` (role ``"y_hat"``): the input of ``g_s`` in
  ``forward`` (the quantised latent);
* with AuxT, ``g_a.main<k>`` and ``g_a.aux<k>`` (roles ``"main"``, ``"aux"``, ``merge = k``,
  k = 1..4): the two branches entering merge ``k``; the ``"aux"`` record carries
  ``aux_energy_share``;
* ``y_residual`` (role ``"residual"``), for models whose ``gaussian_conditional`` codes all of
  ``y`` at once (bmshj2018-hyperprior, mbt2018-mean, mbt2018, cheng2020-anchor): the normalised
  residual ``(y - mu) / sigma`` with the hyperprior's own mean and scale, read from the entropy
  model's forward inputs ``(y, scales, means)``; ``sigma`` is the scale after the entropy model's
  lower bound (``GaussianConditional.lower_bound_scale``, 0.11), the one its likelihood uses; no
  mean (bmshj2018-hyperprior): ``y / sigma``. Not for TCM (its entropy model codes channel slices)
  nor ELIC (a latent codec), nor the factorized model (no Gaussian conditional).

Modulation against the quantiser (step 1, :func:`energylab.stats.modulation_statistics`) is on the
``y_hat`` record: ``std_in_steps.median`` / ``.max`` of ``y_hat``'s channels and, from a
:class:`~energylab.stats.RateShare` fed with the model output's ``likelihoods["y"]`` (a hook on the
model itself: that is exactly what the entropy model of ``y`` produced, concatenated over slices for
TCM, so every registered model is covered), ``rate_share_entropy``, ``rate_share_am_gm``,
``active_channels`` and ``bits_per_position``. With AuxT, :meth:`LatentProbe.records` adds one
record of role ``"gain"`` per WLS / iWLS (layers ``g_a.gain<k>``, ``g_s.gain<k>``, ``merge = k``):
the mean learned subband gain ``exp(s)`` of each subband, keys ``exp_s.LL`` ... ``exp_s.HH``, read
from the parameters when the records are made (none without scaling).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from energylab.models import AuxTransform, submodule, trace_stages, unwrap_model
from energylab.rundir import json_safe
from energylab.stats import (
    AuxEnergyShare,
    ChannelStats,
    EffectiveSampleSize,
    NeighbourhoodTotalCorrelation,
    RateShare,
    SpatialCorrelation,
    SubbandEnergy,
    channel_statistics_batched,
    energy_shares,
    image_intervals,
    modulation_statistics,
    neighbourhood_statistics_batched,
    std_in_steps,
)

__all__ = [
    "BOOTSTRAP_REPLICATES", "INTERVAL_ROLES", "NEIGHBOURHOOD_INTERVAL_ROLES", "NEIGHBOURHOOD_ROLES", "ROLES",
    "SUBBANDS", "HookPoint", "LatentProbe", "default_layers", "gain_records",
]

ROLES = ("stage", "y", "y_hat", "main", "aux", "residual", "gain")
"""What a record describes: a stage output of ``g_a``, ``y``, ``y_hat``, the main / auxiliary
branch entering an AuxT merge, the normalised residual of ``y``, or (no hook point) the learned
subband gains of a WLS / iWLS."""

SUBBANDS = ("LL", "LH", "HL", "HH")
"""Subband order of AuxT's ``scaling_factors`` (subband-major, as :func:`energylab.wavelets.dwt2`)."""

NEIGHBOURHOOD_ROLES = ("stage", "y", "y_hat")
"""Roles whose layers also stream the ``k x k`` neighbourhood total correlation (k = 2): every
``g_a`` stage output, ``y`` and ``y_hat`` (not the merge branches: their cost buys no new claim)."""

BOOTSTRAP_REPLICATES = 200
"""Default bootstrap replicates per capture (see :meth:`LatentProbe.records`)."""

INTERVAL_ROLES = (None, "stage", "y", "y_hat")
"""Roles whose channel statistics get bootstrap intervals; the neighbourhood split gets them for
:data:`NEIGHBOURHOOD_INTERVAL_ROLES` only. The rest keep the capture within 5 % of training time
at the ablation's defaults (``bench/bench_capture.py``): the merge branches' records and the
neighbourhood split of the stages and of ``y_hat`` carry values without intervals."""

NEIGHBOURHOOD_INTERVAL_ROLES = ("y",)
"""Roles whose ``neighbourhood_tc.*`` values get bootstrap intervals: ``y`` only, the layer the
summary and the energy-split figure read them for (each interval costs 200 Cholesky
factorisations of ``192 x 192``, about 0.1 s, an eighth of a capture)."""

Extract = Callable[[tuple, Tensor], Tensor]
"""Picks the tensor to reduce from a hook's ``(inputs, output)``."""


def _output(inputs: tuple, output: Tensor) -> Tensor:
    return output


def _first_input(inputs: tuple, output: Tensor) -> Tensor:
    return inputs[0]


def _second_input(inputs: tuple, output: Tensor) -> Tensor:
    return inputs[1]


def _normalised_residual(inputs: tuple, output: Tensor, bound: float) -> Tensor:
    """``(y - means) / max(scales, bound)`` from ``GaussianConditional.forward(y, scales, means)``."""
    y, scales = inputs[0], inputs[1]
    means = inputs[2] if len(inputs) > 2 else None
    residual = y if means is None else y - means
    return residual / scales.clamp(min=bound)


def _window_side(positions: int, images: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` whose square times ``images`` is >= ``positions``."""
    per_image = -(-positions // images)
    side = multiple
    while side * side < per_image:
        side += multiple
    return side


def _centred(y: Tensor, side: int) -> Tensor:
    """The centred ``side x side`` window of ``y`` ``(B, C, H, W)`` (a view)."""
    top, left = (y.shape[2] - side) // 2, (y.shape[3] - side) // 2
    return y[:, :, top : top + side, left : left + side]


def _whole(y: Tensor) -> Tensor:
    return y


def _force_eager() -> object | None:
    """Set ``torch.compile``'s ``"force_eager"`` stance now (every compiled model, submodule or
    function then runs its original Python, so every forward hook fires as in eager mode, and
    registering hooks triggers no recompilation); returns the ``set_stance`` object whose
    ``__exit__`` restores the previous stance. None where ``torch._dynamo`` was never imported:
    then nothing is compiled."""
    if "torch._dynamo" not in sys.modules:
        return None
    return torch.compiler.set_stance("force_eager")


def _full_residual(model: nn.Module) -> bool:
    """Whether ``model.gaussian_conditional`` is called once with all of ``y`` (not on slices)."""
    return hasattr(model, "gaussian_conditional") and not hasattr(model, "num_slices")


@dataclass(frozen=True)
class HookPoint:
    """Where a layer is read and what it is.

    Attributes:
        module: module path in the (unwrapped) model.
        extract: picks the tensor from the hook's ``(inputs, output)``.
        role: one of :data:`ROLES`, or None for a user-defined point.
        merge: the AuxT merge point k = 1..4 for roles ``"main"`` and ``"aux"``, else None.
    """

    module: str
    extract: Extract = _output
    role: str | None = None
    merge: int | None = None

    def __post_init__(self) -> None:
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"HookPoint {self.module!r}: role {self.role!r} is not one of {ROLES} or None")
        if self.role == "gain":
            raise ValueError(f"HookPoint {self.module!r}: role 'gain' is read from parameters, not hooked")
        if (self.merge is not None) != (self.role in ("main", "aux")):
            raise ValueError(f"HookPoint {self.module!r}: a merge index goes with roles main/aux only")


def default_layers(model: nn.Module, trace_size: int = 64) -> dict[str, HookPoint]:
    """The default hook points of ``model`` (see the module docstring), found by tracing ``g_a``.

    ``model`` may be wrapped in ``nn.DataParallel`` / DDP or compiled (``torch.compile``, of the
    model or of ``g_a``); module paths are those of the model inside, without the wrappers
    (:func:`energylab.models.submodule`). Roles and merge indices come from
    ``AuxTransform.merge_positions``, not from names.

    Raises:
        ValueError: ``model.g_a`` is not a four-stage ``nn.Sequential`` (plain or AuxT-wrapped).
    """
    net = unwrap_model(model)
    g_a = submodule(net, "g_a")
    auxt = isinstance(g_a, AuxTransform)
    seq = g_a.transform if auxt else g_a
    prefix = "g_a.transform" if auxt else "g_a"
    stages = trace_stages(seq, 3, trace_size, "g_a")
    layers: dict[str, HookPoint] = {}
    for k, last in enumerate(stages.last[:-1], start=1):
        if auxt and last in g_a.merge_positions:
            module = f"g_a.merges.{g_a.merge_positions.index(last)}"
        else:
            module = f"{prefix}.{last}"
        layers[f"g_a.stage{k}"] = HookPoint(module, role="stage")
    layers["y"] = HookPoint("g_a", role="y")
    layers["y_hat"] = HookPoint("g_s", _first_input, role="y_hat")
    if auxt:
        for k in range(1, len(g_a.merge_positions) + 1):
            layers[f"g_a.main{k}"] = HookPoint(f"g_a.merges.{k - 1}", _first_input, "main", k)
            layers[f"g_a.aux{k}"] = HookPoint(f"g_a.merges.{k - 1}", _second_input, "aux", k)
    if _full_residual(net):
        bound = float(net.gaussian_conditional.lower_bound_scale.bound)
        extract = partial(_normalised_residual, bound=bound)
        layers["y_residual"] = HookPoint("gaussian_conditional", extract, role="residual")
    return layers


def _scaled_blocks(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """``(layer, k, block)`` for every WLS / iWLS with scaling factors: ``g_a.gain<k>``, ``g_s.gain<k>``."""
    blocks = []
    for side in ("g_a", "g_s"):
        transform = submodule(model, side)
        if isinstance(transform, AuxTransform):
            blocks += [(f"{side}.gain{k}", k, block)
                       for k, block in enumerate(transform.auxiliary_layers, start=1)
                       if block.scaling_factors is not None]
    return blocks


def gain_records(model: nn.Module, step: int) -> list[dict]:
    """The learned subband gains of every WLS / iWLS of ``model``, one record per block with
    scaling (role ``"gain"``, layer ``g_a.gain<k>`` / ``g_s.gain<k>``, ``merge = k``): keys
    ``exp_s.LL`` ... ``exp_s.HH``, the mean of ``exp(scaling_factors)`` over the block's channels
    in each subband. [] without AuxT or without scaling. Reads the parameters (a host sync)."""
    out = []
    for layer, k, block in _scaled_blocks(unwrap_model(model)):
        gains = block.scaling_factors.detach().to(torch.float64).exp().view(4, -1).mean(1).tolist()
        out.append({"step": step, "layer": layer, "role": "gain", "merge": k}
                   | {f"exp_s.{band}": g for band, g in zip(SUBBANDS, gains, strict=True)})
    return out


def _layer_metrics(
    channels: int, levels: int = 2, max_positions: int | None = None, neighbourhood: bool = False,
    n_eff: bool = False,
) -> MetricCollection:
    """The metrics of one captured layer: ``channel`` (per image, for the jackknife and the
    bootstrap), ``subband`` (raw and centred), ``spatial`` and, if asked, ``neighbourhood`` (k = 2,
    per image) and ``n_eff`` (:class:`EffectiveSampleSize`)."""
    metrics = {
        "channel": ChannelStats(channels, max_positions=max_positions, per_image=True),
        "subband": SubbandEnergy(levels=levels, channels=channels),
        "spatial": SpatialCorrelation(channels),
    }
    if neighbourhood:
        metrics["neighbourhood"] = NeighbourhoodTotalCorrelation(channels, k=2, per_image=True)
    if n_eff:
        metrics["n_eff"] = EffectiveSampleSize(channels)
    return MetricCollection(metrics, compute_groups=False)


class LatentProbe:
    """Forward hooks that stream named latents into :mod:`energylab.stats` metrics.

    Args:
        model: a CompressAI model, with or without AuxT (``model.g_a``/``model.g_s``), possibly
            wrapped in ``nn.DataParallel`` / DDP or compiled with ``torch.compile`` (whole or a
            submodule such as ``g_a``): the hooks go on the modules inside. Compiled code does not
            honour every hook added after it was compiled (torch 2.14 recompiles and still skips
            ``y_hat`` and ``y_residual``), so while the probe is active ``torch.compile``'s stance is
            ``"force_eager"``: forward passes through the compiled model (or through the model
            inside it) run eagerly and give the eager records; the previous stance returns on exit.
        layers: names to capture (a subset of :func:`default_layers`), or a dict name ->
            :class:`HookPoint` for other modules; default: every default layer.
        subband_levels: DWT levels of ``subband_energy`` (each captured map's H and W must be
            divisible by ``2**levels``).
        max_positions: per-image spatial subsampling of :class:`ChannelStats` (None: all).
        replicates: bootstrap replicates for the intervals of :meth:`records` (0: no intervals).
        seed: seed of the bootstrap (same seed, same intervals).
        skip_synthesis: while active, replace ``model.g_s`` by ``nn.Identity`` (restored on exit):
            the latents and likelihoods are unchanged, ``x_hat`` is not computed (it is then
            ``y_hat``), which saves about half of a forward pass. For captures only; the ``y_hat``
            point still reads ``g_s``'s input.
        enough_positions: if set, each layer reads images (in forward order) only until it holds
            at least this many positions from at least ``enough_images`` images; later images are
            not fed to that layer's metrics. Where ``enough_images`` whole maps would hold more than
            that, the layer reads only the centred ``s x s`` window of each map, ``s`` the smallest
            multiple of ``2**subband_levels`` with ``enough_images * s**2 >= enough_positions``
            (contiguous, so subband, spatial and neighbourhood statistics keep their meaning, and
            away from the zero padding at region borders). The high-resolution layers
            (``g_a.stage1`` has 64 times the positions of ``y``) then cost what ``y`` costs, while
            ``y`` and every layer at its resolution still read the whole probe (the training
            capture passes 8192 and 8: :data:`energylab.data.PROBE_MIN_POSITIONS`,
            ``PROBE_MIN_REGIONS``, so ``g_a.stage1`` of 256-pixel regions reads 32 x 32 of its
            128 x 128 positions in 8 regions). The rate shares always read every image.
        enough_images: see ``enough_positions``.

    Usage::

        probe = LatentProbe(model)
        with probe, torch.no_grad():
            model(probe_batch)
        records = probe.records(step)   # list of flat dicts, one per layer

    A probe is entered once at a time: entering it again while active raises RuntimeError (it
    would count every latent twice). After exit it may be entered again to accumulate more.

    Raises:
        ValueError: unknown layer name; ``enough_positions`` or ``enough_images`` not a positive
            integer.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str] | dict[str, HookPoint] | None = None,
        subband_levels: int = 2,
        max_positions: int | None = None,
        replicates: int = BOOTSTRAP_REPLICATES,
        seed: int = 0,
        skip_synthesis: bool = False,
        enough_positions: int | None = None,
        enough_images: int = 1,
    ) -> None:
        if enough_positions is not None and (not isinstance(enough_positions, int) or enough_positions < 1):
            raise ValueError(f"enough_positions must be a positive integer or None, got {enough_positions!r}")
        if not isinstance(enough_images, int) or enough_images < 1:
            raise ValueError(f"enough_images must be a positive integer, got {enough_images!r}")
        self.model = unwrap_model(model)
        self.skip_synthesis = skip_synthesis
        self._g_s: nn.Module | None = None
        self.enough_positions, self.enough_images = enough_positions, enough_images
        self._images: dict[str, int] = {}
        defaults = default_layers(self.model)
        if layers is None:
            points = defaults
        elif isinstance(layers, dict):
            points = dict(layers)
        else:
            unknown = [name for name in layers if name not in defaults]
            if unknown:
                raise ValueError(f"unknown layer(s) {unknown}; known: {', '.join(defaults)}")
            points = {name: defaults[name] for name in layers}
        self.points = points
        self.subband_levels, self.max_positions = subband_levels, max_positions
        self.replicates, self.seed = replicates, seed
        self.metrics: dict[str, MetricCollection] = {}
        self.shares: dict[str, AuxEnergyShare] = {}
        self.rate: RateShare | None = None
        self.first: dict[str, Tensor] = {}
        self._signatures: dict[nn.Module, inspect.Signature] = {}
        self._handles: list = []
        self._stance: object | None = None

    # -- hooks ---------------------------------------------------------------------------------
    def _observe(self, name: str, y: Tensor) -> None:
        metrics = self.metrics.get(name)
        if metrics is None:
            metrics = self.metrics[name] = _layer_metrics(
                y.shape[1], self.subband_levels, self.max_positions,
                self.points[name].role in NEIGHBOURHOOD_ROLES,
                self.points[name].role in NEIGHBOURHOOD_INTERVAL_ROLES,
            ).to(y.device)
        if name not in self.first:
            self.first[name] = y[0].detach().clone()
        metrics.update(y)

    def __enter__(self) -> LatentProbe:
        if self._handles:
            raise RuntimeError("LatentProbe is already active: nested `with` would count every latent twice")
        if self.skip_synthesis:
            self._g_s, self.model.g_s = self.model.g_s, nn.Identity()
        modules: dict[str, nn.Module] = {}
        by_module: dict[str, list[tuple[str, HookPoint]]] = {}
        for name, point in self.points.items():
            module = modules[point.module] if point.module in modules else submodule(self.model, point.module)
            if module is None:
                self.__exit__()
                raise ValueError(f"layer {name!r}: the model has no module {point.module!r}"
                                 + (" (g_s is skipped: skip_synthesis)" if self.skip_synthesis else ""))
            modules[point.module] = module
            by_module.setdefault(point.module, []).append((name, point))
        for path, entries in by_module.items():
            self._handles.append(modules[path].register_forward_hook(self._hook(entries), with_kwargs=True))
        if any(point.role == "y_hat" for point in self.points.values()):
            self._handles.append(self.model.register_forward_hook(self._rate_hook))
        self._stance = _force_eager()
        return self

    def _rate_hook(self, module: nn.Module, inputs: tuple, output: object) -> None:
        """Feed :attr:`rate` with the model output's ``likelihoods["y"]`` (if it has one)."""
        likelihoods = output.get("likelihoods", {}).get("y") if isinstance(output, dict) else None
        if likelihoods is None:
            return
        if self.rate is None:
            self.rate = RateShare(likelihoods.shape[1]).to(likelihoods.device)
        self.rate.update(likelihoods)

    def _positional(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        """The call's arguments in the order of ``module.forward``'s signature (keywords included)."""
        if not kwargs:
            return args
        signature = self._signatures.get(module)
        if signature is None:
            signature = self._signatures[module] = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments.values())

    def _hook(self, entries: list[tuple[str, HookPoint]]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            inputs = self._positional(module, args, kwargs)
            for name, point in entries:
                y = point.extract(inputs, output)
                take, window = self._take(name, y)
                if take == 0:
                    continue
                y = window(y[:take])
                self._observe(name, y)
                if point.role == "aux":
                    share = self.shares.get(name)
                    if share is None:
                        share = self.shares[name] = AuxEnergyShare().to(output.device)
                    share.update(y, window(output[:take]))

        return hook

    def _take(self, name: str, y: Tensor) -> tuple[int, Callable[[Tensor], Tensor]]:
        """How many images of the batch ``y`` ``(B, C, H, W)`` layer ``name`` still reads, and
        the crop to apply to them (``enough_positions``; shapes only: no host sync)."""
        seen = self._images.get(name, 0)
        take, window = len(y), _whole
        if self.enough_positions is not None and y.dim() == 4:
            height, width = y.shape[2:]
            side = _window_side(self.enough_positions, self.enough_images, 2**self.subband_levels)
            if side < min(height, width):
                window = partial(_centred, side=side)
                height = width = side
            needed = max(self.enough_images, -(-self.enough_positions // (height * width)))
            take = max(0, min(take, needed - seen))
        self._images[name] = seen + take
        return take, window

    def __exit__(self, *exc) -> None:
        if self._stance is not None:
            self._stance.__exit__(None, None, None)  # torch.compile's previous stance
            self._stance = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._g_s is not None:
            self.model.g_s, self._g_s = self._g_s, None

    # -- results -------------------------------------------------------------------------------
    def records(self, step: int) -> list[dict]:
        """One flat dict of Python numbers per captured layer, ready for a JSON line: a value that
        is undefined (NaN or infinite, e.g. ``aux_energy_share`` = 0 / 0 when both branches are
        zero) is None (:func:`energylab.rundir.json_safe`).

        Keys: ``step``, ``layer``, ``role`` and ``merge`` (of its :class:`HookPoint`),
        ``channels``, ``count`` (positions used: the ``n`` of the i.i.d. bias corrections),
        ``images`` (probe images seen: the units of the jackknife and the bootstrap),
        ``nonfinite`` (positions skipped for NaN/inf), for roles in
        :data:`NEIGHBOURHOOD_INTERVAL_ROLES` ``n_eff`` (the positions' effective number from their
        spatial autocorrelation, :class:`energylab.stats.EffectiveSampleSize`: a diagnostic),
        ``bias_correction`` (what ``total_correlation`` and the gains carry: ``"jackknife"`` over
        the probe images on top of the i.i.d. correction at ``count``, see
        :meth:`energylab.stats.ChannelStats.statistics`; ``"iid"`` with fewer than 2 images), every
        :func:`energylab.stats.energy_statistics` key (``topk_energy_share`` stays the raw
        mean-square share, as ``topk_share.ms``), ``total_correlation_per_channel`` (nats / C),
        every :func:`energylab.stats.energy_shares` key (``topk_share.l2``, ``.l2_centred``,
        ``.ms``, ``.ms_centred``, ``mean_energy_fraction``), ``subband_energy.<band>`` and
        ``subband_energy_centred.<band>`` (channel means removed), ``spatial_correlation.<dh,dw>``,
        for roles in :data:`NEIGHBOURHOOD_ROLES` ``neighbourhood_tc.joint``,
        ``.across_channels``, ``.across_positions`` (k = 2, nats, bias-corrected at ``n`` =
        ``neighbourhood_tc.count`` blocks, then as ``neighbourhood_tc.bias_correction`` says) and,
        for role ``"aux"``, ``aux_energy_share`` (see
        ``data/README.md``).

        **Intervals.** For the roles in :data:`INTERVAL_ROLES`, each statistic of
        :func:`energylab.stats.channel_statistics_batched` (and for
        :data:`NEIGHBOURHOOD_INTERVAL_ROLES` of
        :func:`energylab.stats.neighbourhood_statistics_batched`) gets ``<stat>_ci_low`` /
        ``<stat>_ci_high`` over whole probe images (:func:`energylab.stats.image_intervals`): for
        the jackknife-corrected statistics (:data:`energylab.stats.JACKKNIFE_STATISTICS`) the
        jackknife t-interval about the recorded value, for the others the 95 % recentred
        percentile bootstrap (``replicates`` replicates, ``seed``); None where the value is None,
        a leave-one-out value or replicate is singular, or fewer than 2 images were seen;
        absent with ``replicates = 0`` and for the other roles. For role ``"y_hat"`` also the
        :func:`energylab.stats.modulation_statistics` keys and ``bits_per_position``; then the
        ``"gain"`` records of :func:`gain_records`. Synchronises across processes when distributed.

        Raises:
            ValueError: a layer saw no finite data (from :mod:`energylab.stats`).
        """
        out = []
        for name, metrics in self.metrics.items():
            if name not in self.first:
                continue  # not fed since the last reset
            channel, subband, spatial = metrics["channel"], metrics["subband"], metrics["spatial"]
            moments = channel.compute()
            with channel.sync_context():
                images = channel.images()
            point = self.points[name]
            record = {
                "step": step,
                "layer": name,
                "role": point.role,
                "merge": point.merge,
                "channels": channel.channels,
                "count": int(moments["count"]),
                "images": len(images[0]),
                "nonfinite": int(moments["nonfinite"]),
            }
            if "n_eff" in metrics:
                record["n_eff"] = float(metrics["n_eff"].compute()["n_eff"])
            record.update(channel.statistics())
            tc = record["total_correlation"]
            record["total_correlation_per_channel"] = None if tc is None else tc / channel.channels
            record.update(
                energy_shares(moments["mean"], moments["energies"], record["count"], record["topk_k"])
            )
            intervals = {}
            if point.role in INTERVAL_ROLES:
                intervals = self._intervals(images, channel_statistics_batched)
            bands = subband.compute()
            record.update({f"subband_energy.{k}": float(bands[k]) for k in subband.bands})
            record.update(
                {f"subband_energy_centred.{k}": float(bands[f"{k}_centred"]) for k in subband.bands}
            )
            lags = spatial.compute()
            record.update({f"spatial_correlation.{k}": float(lags[k]) for k in spatial.lag_names})
            if "neighbourhood" in metrics:
                neighbourhood = metrics["neighbourhood"]
                split = neighbourhood.split()
                record.update({f"neighbourhood_tc.{k}": split[k]
                               for k in ("joint", "across_channels", "across_positions")})
                record["neighbourhood_tc.count"] = split["count"]
                record["neighbourhood_tc.bias_correction"] = split["bias_correction"]
                if point.role in NEIGHBOURHOOD_INTERVAL_ROLES:
                    with neighbourhood.sync_context():
                        blocks = neighbourhood.images()
                    intervals |= self._intervals(blocks, neighbourhood_statistics_batched)
            for stat, interval in intervals.items():
                low, high = (None, None) if interval is None or record[stat] is None else interval
                record[f"{stat}_ci_low"], record[f"{stat}_ci_high"] = low, high
            if name in self.shares:
                record["aux_energy_share"] = float(self.shares[name].compute()["aux_energy_share"])
            if point.role == "y_hat":
                rate = self._rate()
                record.update(modulation_statistics(moments["covariance"], None if rate is None else
                                                    rate["shares"].cpu().numpy()))
                if rate is not None:
                    record["bits_per_position"] = float(rate["bits_per_position"])
            out.append(record)
        return [json_safe(r) for r in out + gain_records(self.model, step)]  # undefined: None

    def _rate(self) -> dict[str, Tensor] | None:
        """:class:`RateShare`'s results, or None when no forward gave ``likelihoods["y"]``."""
        return None if self.rate is None else self.rate.compute()

    def _intervals(
        self, images: tuple[Tensor, Tensor, Tensor], statistics: Callable[..., dict[str, Tensor]]
    ) -> dict[str, tuple[float, float] | None]:
        if self.replicates == 0:
            return {}
        return image_intervals(*images, statistics, self.replicates, self.seed)

    def arrays(self) -> dict[str, np.ndarray]:
        """``cov/<layer>`` (C x C), ``mean/<layer>`` and ``energies/<layer>`` (C, E[y_c^2]), all
        float64; for the ``y_hat`` layer ``std_in_steps/<layer>`` and ``rate_share/<layer>`` (``(C,)``
        float32); with AuxT ``exp_s/<side>.gain<k>`` (``(4, C)`` float32, subband-major); and
        ``probe_y``: the first probe image's ``y`` ``(C, h, w)`` float32 — the contents of one
        capture archive of the run directory (:mod:`energylab.rundir`). The four energies of
        :func:`energylab.stats.channel_energies` and their compaction curves follow from ``mean``
        and ``energies`` (the count cancels in every share)."""
        arrays = {}
        for name, metrics in self.metrics.items():
            moments = metrics["channel"].compute()
            for key in ("covariance", "mean", "energies"):
                prefix = "cov" if key == "covariance" else key
                arrays[f"{prefix}/{name}"] = moments[key].to(torch.float64).cpu().numpy()
            if self.points[name].role == "y_hat":
                arrays[f"std_in_steps/{name}"] = std_in_steps(moments["covariance"]).astype(np.float32)
                rate = self._rate()
                if rate is not None:
                    arrays[f"rate_share/{name}"] = rate["shares"].float().cpu().numpy()
        for layer, _, block in _scaled_blocks(self.model):
            arrays[f"exp_s/{layer}"] = block.scaling_factors.detach().exp().view(4, -1).float().cpu().numpy()
        if "y" in self.first:
            arrays["probe_y"] = self.first["y"].float().cpu().numpy()
        return arrays

    def reset(self) -> None:
        """Forget everything accumulated (keeps the hook points and, reset in place, the metric
        objects: a training run reuses one probe for all its captures instead of building some
        sixty ``torchmetrics`` objects each time). Only layers fed after the reset are recorded."""
        for metric in (*self.metrics.values(), *self.shares.values(),
                       *([] if self.rate is None else [self.rate])):
            metric.reset()
        self._images.clear()
        self.first.clear()

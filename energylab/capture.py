"""Latent capture: forward hooks that reduce latents to streaming energy statistics.

:class:`LatentProbe` hooks named points of a CompressAI model (with or without AuxT) and feeds every
tensor that passes them into float64 streaming metrics from :mod:`energylab.stats` on the tensor's
own device. Hooks read tensors and never modify them; they never call ``.item()`` or otherwise wait
for the device, so a capture costs only its arithmetic. Use it as a context manager around the
forward passes of one capture (the training loop runs it on a fixed probe set in eval mode under
``torch.no_grad()``), then :meth:`LatentProbe.records` reads the results (that is where the host
waits, once per capture).

Default layers (names used in ``energy.jsonl``):

* ``g_a.stage1`` .. ``g_a.stage3``: the output of each of the first three resolution stages of
  ``g_a`` (after the AuxT merge where AuxT is on); the fourth stage's output is ``y``;
* ``y``: the output of ``g_a``; ``y_hat``: the input of ``g_s`` in ``forward`` (the quantised latent);
* with AuxT, ``g_a.main<k>`` and ``g_a.aux<k>`` (k = 1..4): the two branches entering merge ``k``;
  the ``g_a.aux<k>`` record carries ``aux_energy_share``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from energylab.models import AuxTransform, trace_stages
from energylab.stats import ChannelStats, SpatialCorrelation, SubbandEnergy

__all__ = ["AuxEnergyShare", "LatentProbe", "default_layers"]

Extract = Callable[[tuple, Tensor], Tensor]
"""Picks the tensor to reduce from a hook's ``(inputs, output)``."""


def _output(inputs: tuple, output: Tensor) -> Tensor:
    return output


def _first_input(inputs: tuple, output: Tensor) -> Tensor:
    return inputs[0]


def _second_input(inputs: tuple, output: Tensor) -> Tensor:
    return inputs[1]


@dataclass(frozen=True)
class HookPoint:
    """Where a layer is read: a module path in the model, and which tensor of its call."""

    module: str
    extract: Extract = _output


class AuxEnergyShare(Metric):
    """Share of the merged energy carried by the auxiliary branch at one merge point.

    ``aux_energy_share = ‖aux‖² / ‖main + aux‖²`` summed over every element of every update
    (float64 sums, ``dist_reduce_fx="sum"``). 0 when the linear path carries nothing; it can
    exceed 1 when the branches cancel.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("aux", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("merged", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, aux: Tensor, merged: Tensor) -> None:
        if self.device != aux.device:
            self.to(aux.device)
        self.aux += aux.detach().double().square().sum()
        self.merged += merged.detach().double().square().sum()

    def compute(self) -> Tensor:
        return self.aux / self.merged


def default_layers(model: nn.Module, trace_size: int = 64) -> dict[str, HookPoint]:
    """The default hook points of ``model`` (see the module docstring), found by tracing ``g_a``.

    Raises:
        ValueError: ``model.g_a`` is not a four-stage ``nn.Sequential`` (plain or AuxT-wrapped).
    """
    g_a = model.g_a
    auxt = isinstance(g_a, AuxTransform)
    seq = g_a.transform if auxt else g_a
    prefix = "g_a.transform" if auxt else "g_a"
    stages = trace_stages(seq, 3, trace_size, "g_a")
    layers: dict[str, HookPoint] = {}
    for k, last in enumerate(stages.last[:-1], start=1):
        if auxt and last in g_a.merge_positions:
            layers[f"g_a.stage{k}"] = HookPoint(f"g_a.merges.{g_a.merge_positions.index(last)}")
        else:
            layers[f"g_a.stage{k}"] = HookPoint(f"{prefix}.{last}")
    layers["y"] = HookPoint("g_a")
    layers["y_hat"] = HookPoint("g_s", _first_input)
    if auxt:
        for k in range(len(g_a.merge_positions)):
            layers[f"g_a.main{k + 1}"] = HookPoint(f"g_a.merges.{k}", _first_input)
            layers[f"g_a.aux{k + 1}"] = HookPoint(f"g_a.merges.{k}", _second_input)
    return layers


class _LayerMetrics(nn.Module):
    def __init__(self, channels: int, levels: int, max_positions: int | None) -> None:
        super().__init__()
        self.channel = ChannelStats(channels, max_positions=max_positions)
        self.subband = SubbandEnergy(levels=levels)
        self.spatial = SpatialCorrelation()

    def update(self, y: Tensor) -> None:
        self.channel.update(y)
        self.subband.update(y)
        self.spatial.update(y)

    def reset(self) -> None:
        for metric in (self.channel, self.subband, self.spatial):
            metric.reset()


class LatentProbe:
    """Forward hooks that stream named latents into :mod:`energylab.stats` metrics.

    Args:
        model: a CompressAI model, with or without AuxT (``model.g_a``/``model.g_s``).
        layers: names to capture (a subset of :func:`default_layers`), or a dict name ->
            :class:`HookPoint` for other modules; default: every default layer.
        subband_levels: DWT levels of ``subband_energy`` (each captured map's H and W must be
            divisible by ``2**levels``).
        max_positions: per-update spatial subsampling of :class:`ChannelStats` (None: all).

    Usage::

        probe = LatentProbe(model)
        with probe, torch.no_grad():
            model(probe_batch)
        records = probe.records(step)   # list of flat dicts, one per layer

    Raises:
        ValueError: unknown layer name.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str] | dict[str, HookPoint] | None = None,
        subband_levels: int = 2,
        max_positions: int | None = None,
    ) -> None:
        self.model = model
        defaults = default_layers(model)
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
        self.metrics: dict[str, _LayerMetrics] = {}
        self.shares: dict[str, AuxEnergyShare] = {}
        self.first: dict[str, Tensor] = {}
        self._handles: list = []

    # -- hooks ---------------------------------------------------------------------------------
    def _observe(self, name: str, y: Tensor) -> None:
        metrics = self.metrics.get(name)
        if metrics is None:
            metrics = self.metrics[name] = _LayerMetrics(
                y.shape[1], self.subband_levels, self.max_positions
            ).to(y.device)
            self.first[name] = y[0].detach().clone()
        metrics.update(y)

    def __enter__(self) -> LatentProbe:
        modules = dict(self.model.named_modules())
        by_module: dict[str, list[tuple[str, HookPoint]]] = {}
        for name, point in self.points.items():
            if point.module not in modules:
                raise ValueError(f"layer {name!r}: the model has no module {point.module!r}")
            by_module.setdefault(point.module, []).append((name, point))
        for path, entries in by_module.items():
            self._handles.append(modules[path].register_forward_hook(self._hook(entries)))
        return self

    def _hook(self, entries: list[tuple[str, HookPoint]]):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            for name, point in entries:
                self._observe(name, point.extract(inputs, output))
                if name.startswith("g_a.aux"):
                    share = self.shares.get(name)
                    if share is None:
                        share = self.shares[name] = AuxEnergyShare().to(output.device)
                    share.update(inputs[1], output)

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- results -------------------------------------------------------------------------------
    def records(self, step: int) -> list[dict]:
        """One flat dict per captured layer: ``step``, ``layer``, ``channels``, ``count`` and every
        statistic (see ``data/README.md``). Synchronises across processes when distributed."""
        out = []
        for name, metrics in self.metrics.items():
            moments = metrics.channel.compute()
            record = {
                "step": step,
                "layer": name,
                "channels": metrics.channel.channels,
                "count": int(moments["count"]),
            }
            record.update(metrics.channel.statistics())
            record.update({f"subband_energy.{k}": v for k, v in metrics.subband.compute().items()})
            record.update(
                {f"spatial_correlation.{k}": v for k, v in metrics.spatial.compute().items()}
            )
            if name in self.shares:
                record["aux_energy_share"] = float(self.shares[name].compute())
            out.append(record)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """``cov/<layer>`` and ``energies/<layer>`` (float32) and ``probe_y``: the first probe
        image's ``y`` ``(C, h, w)`` — the contents of a ``captures/step_XXXXXXX.npz``."""
        arrays = {}
        for name, metrics in self.metrics.items():
            moments = metrics.channel.compute()
            arrays[f"cov/{name}"] = moments["covariance"].float().cpu().numpy()
            arrays[f"energies/{name}"] = moments["energies"].float().cpu().numpy()
        if "y" in self.first:
            arrays["probe_y"] = self.first["y"].float().cpu().numpy()
        return arrays

    def reset(self) -> None:
        """Forget everything accumulated (keeps the hook points)."""
        self.metrics.clear()
        self.shares.clear()
        self.first.clear()

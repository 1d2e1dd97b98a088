"""AuxT on CompressAI models: merge points found by tracing shapes, and a model registry.

:func:`attach_auxt` replaces ``model.g_a`` and ``model.g_s`` (``nn.Sequential`` with four stride-2
resolution changes each) by :class:`AuxTransform` wrappers that add a chain of WLS (iWLS) outputs to
the main branch at four merge points. Because CompressAI's ``forward``, ``compress`` and
``decompress`` call ``self.g_a`` and ``self.g_s``, real entropy coding works unchanged.

Merge placement, per side (Li et al., ICLR 2025, and its official release):

* ``after_resample``: right after each layer that changes the resolution — the default for ``g_a``
  (TCM: 0, 3, 6, 9; Ballé/Minnen: 0, 2, 4, 6), so the stage's later layers see main + auxiliary;
* ``stage_end``: after the last layer at each new resolution (right before the next resampling
  layer, and the final layer) — the default for ``g_s`` (TCM: 2, 5, 8, 9; Ballé/Minnen: 1, 3, 5, 6;
  Cheng2020-anchor: 2, 4, 6, 7).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from compressai.registry import MODELS as COMPRESSAI_MODELS
from torch import Tensor, nn

from energylab.auxt import (
    SPLIT_INITS,
    WLS,
    check_components,
    check_options,
    freeze_components,
    iWLS,
    set_initial_values,
)
from energylab.tcm import NUM_SLICES as TCM_SLICES
from energylab.tcm import build_tcm

__all__ = [
    "MODELS",
    "PLACEMENTS",
    "AuxTransform",
    "Merge",
    "WIDTH_RULES",
    "InputSizeCheck",
    "WidthError",
    "attach_auxt",
    "build_model",
    "check_widths",
    "has_auxt",
    "register_model",
    "submodule",
    "trace_stages",
    "unwrap_model",
]

PLACEMENTS = ("after_resample", "stage_end")
STAGES = 4


class Merge(nn.Module):
    """``main + aux`` (out of place). A module only so that forward hooks can see both inputs."""

    def forward(self, main: Tensor, aux: Tensor) -> Tensor:
        return main + aux


@dataclass(frozen=True)
class Stages:
    """Where a ``Sequential`` changes resolution, found by :func:`trace_stages`.

    ``resample[k]``: index of the layer that enters stage ``k``; ``last[k]``: index of the last
    layer at that resolution; ``channels[i]``: output channels of layer ``i``.
    """

    resample: tuple[int, ...]
    last: tuple[int, ...]
    channels: tuple[int, ...]

    def positions(self, placement: str) -> tuple[int, ...]:
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
        return self.resample if placement == "after_resample" else self.last


@torch.no_grad()
def trace_stages(transform: nn.Sequential, in_channels: int, size: int, side: str) -> Stages:
    """Run one dummy ``(1, in_channels, size, size)`` input through ``transform`` layer by layer.

    Raises:
        ValueError: not four stride-2 resolution changes in the expected direction.
    """
    x = torch.zeros(1, in_channels, size, size, device=_device(transform))
    resample, channels, sizes = [], [], []
    for i, layer in enumerate(transform):
        before = x.shape[-1]
        x = layer(x)
        channels.append(x.shape[1])
        sizes.append(x.shape[-1])
        if x.shape[-1] != before:
            expected = before // 2 if side == "g_a" else before * 2
            if x.shape[-1] != expected:
                raise ValueError(
                    f"{side} layer {i} ({type(layer).__name__}) changes the resolution "
                    f"{before} -> {x.shape[-1]}; AuxT needs stride-2 stages"
                )
            resample.append(i)
    if len(resample) != STAGES:
        raise ValueError(
            f"{side} has {len(resample)} resolution changes (at layers {resample}); AuxT needs "
            f"{STAGES}"
        )
    last = tuple(
        next_r - 1 for next_r in resample[1:]
    ) + (len(transform) - 1,)
    return Stages(tuple(resample), last, tuple(channels))


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


class AuxTransform(nn.Module):
    """A CompressAI transform with AuxT beside it: ``transform`` plus ``auxiliary_layers``.

    ``forward(x)``: ``a_0 = x``; after layer ``merge_positions[k]`` of ``transform`` the main branch
    becomes ``main + a_{k+1}`` with ``a_{k+1} = auxiliary_layers[k](a_k)``. Shapes are those of
    ``transform`` alone. Attribute names follow ``compressai-temp`` (``transform``,
    ``auxiliary_layers``, ``merge_positions``).
    """

    def __init__(
        self,
        transform: nn.Sequential,
        auxiliary_layers: Iterable[nn.Module],
        merge_positions: Iterable[int],
    ) -> None:
        super().__init__()
        self.transform = transform
        self.auxiliary_layers = nn.ModuleList(auxiliary_layers)
        self.merge_positions = tuple(merge_positions)
        self.merges = nn.ModuleList(Merge() for _ in self.merge_positions)
        self._stage_of = {pos: k for k, pos in enumerate(self.merge_positions)}

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> the transform's output. On the analysis side (WLS auxiliary layers)
        ``H`` and ``W`` must be multiples of ``2 ** len(merge_positions)`` (each WLS halves them).

        Raises:
            ValueError: that size rule broken, naming the input's size.
        """
        factor = 2 ** len(self.merge_positions)
        analysis = bool(self.auxiliary_layers) and isinstance(self.auxiliary_layers[0], WLS)
        if analysis and (x.shape[-2] % factor or x.shape[-1] % factor):
            raise ValueError(
                f"AuxT needs an input whose height and width are multiples of {factor} "
                f"({len(self.merge_positions)} wavelet stages), got {x.shape[-2]}x{x.shape[-1]}; "
                f"pad it (energylab.data.pad_to_multiple)"
            )
        aux = x
        for i, layer in enumerate(self.transform):
            x = layer(x)
            k = self._stage_of.get(i)
            if k is not None:
                aux = self.auxiliary_layers[k](aux)
                x = self.merges[k](x, aux)
        return x


def _compiled_type() -> type | None:
    """``torch.compile``'s ``OptimizedModule``, or None where ``torch._dynamo`` was never imported
    (then no model can be compiled; looking it up does not import it)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers and
    ``torch.compile``'s ``OptimizedModule`` (its ``_orig_mod``), in any nesting (``model`` itself if
    it is not wrapped). Every public function of energylab that takes a model calls this first."""
    compiled = _compiled_type()
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def submodule(model: nn.Module, path: str) -> nn.Module | None:
    """The module at the dotted ``path`` (``"g_a.1"``; ``""``: the model) of the unwrapped
    ``model``, seeing through wrappers (:func:`unwrap_model`) at every level, so that a
    ``torch.compile``-d submodule (``model.g_a = torch.compile(model.g_a)``) keeps its paths; the
    module returned is unwrapped too. A path spelled with the wrappers (``"g_a._orig_mod.1"``) is
    found as well. None where there is no such module."""
    module = model
    for part in path.split(".") if path else ():
        child = module._modules.get(part)
        if child is None:
            child = unwrap_model(module)._modules.get(part)
        if child is None:
            return None
        module = child
    return unwrap_model(module)


def has_auxt(model: nn.Module) -> bool:
    """Whether ``model.g_a`` carries AuxT (wrappers of the model or of ``g_a`` seen through)."""
    return isinstance(submodule(model, "g_a"), AuxTransform)


class InputSizeCheck:
    """A forward pre-hook for a model's ``g_a``: the input's height and width must be multiples of
    the model's downsampling factor (CompressAI's ``downsampling_factor``: 16 for
    ``bmshj2018-factorized``, 64 with a hyperprior), else a one-line ``ValueError`` naming the rule,
    the model and the input's size, before any layer runs. Checks shapes only (no host sync).
    """

    def __init__(self, multiple: int, name: str) -> None:
        self.multiple = int(multiple)
        self.name = name

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.ndim < 2:
            return
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(
                f"{self.name} needs an input whose height and width are multiples of its "
                f"downsampling factor {self.multiple}, got {h}x{w}; pad it "
                f"(energylab.data.pad_to_multiple)"
            )


def attach_auxt(
    model: nn.Module,
    remove: Iterable[str] = (),
    wavelet: str = "haar",
    g_a_placement: str = "after_resample",
    g_s_placement: str = "stage_end",
    trace_size: int = 64,
    freeze: Iterable[str] = (),
    scaling_init: str = "release",
    projection_init: str = "default",
    klt_data: Tensor | None = None,
    split_seed: int = 0,
) -> nn.Module:
    """Wrap ``model.g_a`` and ``model.g_s`` with AuxT, in place; returns ``model``.

    Each WLS/iWLS is sized from the traced channel counts: ``g_a`` gets ``WLS(3, c_1)``,
    ``WLS(c_1, c_2)``, ... with ``c_k`` the main branch's channels at merge ``k``; ``g_s`` gets
    ``iWLS(M, c_1)``, ... ending at the image's 3 channels.

    ``freeze``, ``scaling_init`` and ``projection_init`` (:mod:`energylab.auxt`) are applied after
    every layer is built, so the other parameters equal full AuxT's of the same seed; the KLT
    (``projection_init="klt"``, :func:`energylab.klt.init_klt`) is computed on ``klt_data``, training
    crops ``(B, 3, H, W)``; so is a split cell's (``projection_init="split-A"`` ... ``"split-F"``,
    :func:`energylab.split.init_split`), whose random rotation, permutation and subspace are drawn
    from ``split_seed`` (the run's seed; not from the global RNG).

    A DataParallel/DDP wrapper is seen through (:func:`unwrap_model`); the inner model is changed
    and returned.

    Raises:
        ValueError: a model without ``nn.Sequential`` ``g_a``/``g_s`` of four stride-2 stages, an
            unknown component, wavelet or placement, contradicting component options
            (:func:`energylab.auxt.check_options`), ``"klt"`` or a split cell without ``klt_data``, or a
            model that already has AuxT.
    """
    model = unwrap_model(model)
    remove, freeze, projection_init = check_options(remove, freeze, scaling_init, projection_init)
    if (projection_init == "klt" or projection_init in SPLIT_INITS) and klt_data is None:
        raise ValueError(f"projection init {projection_init!r} needs training crops (klt_data) to compute "
                         "the KLT on")
    if has_auxt(model):
        raise ValueError("model already has AuxT attached")
    for side in ("g_a", "g_s"):
        transform = getattr(model, side, None)
        if transform is not None and unwrap_model(transform) is not transform:
            raise ValueError(f"attach_auxt needs model.{side} unwrapped (it is {type(transform).__name__}): "
                             f"attach AuxT before torch.compile")
        if not isinstance(transform, nn.Sequential):
            raise ValueError(f"attach_auxt needs model.{side} to be an nn.Sequential")
    ga = trace_stages(model.g_a, 3, trace_size, "g_a")
    latent_channels = ga.channels[-1]
    gs = trace_stages(model.g_s, latent_channels, trace_size >> STAGES, "g_s")
    sides = (("g_a", ga, g_a_placement, 3, WLS), ("g_s", gs, g_s_placement, latent_channels, iWLS))
    for side, stages, placement, in_channels, block in sides:
        positions = stages.positions(placement)
        widths = [in_channels] + [stages.channels[i] for i in positions]
        layers = [block(widths[k], widths[k + 1], wavelet, remove) for k in range(STAGES)]
        wrapped = AuxTransform(getattr(model, side), layers, positions)
        setattr(model, side, wrapped.to(_device(model)))
    layers = [*model.g_a.auxiliary_layers, *model.g_s.auxiliary_layers]
    set_initial_values(layers, scaling_init, projection_init)
    if projection_init == "klt":
        from energylab.klt import init_klt

        init_klt(model.g_a.auxiliary_layers, model.g_s.auxiliary_layers, klt_data.to(_device(model)))
    elif projection_init in SPLIT_INITS:
        from energylab.split import init_split

        init_split(model.g_a.auxiliary_layers, model.g_s.auxiliary_layers, klt_data.to(_device(model)),
                   projection_init.removeprefix("split-"), seed=split_seed)
    freeze_components(layers, freeze)
    return model


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[..., nn.Module]] = {}
"""energylab's model registry: name -> builder ``(N=None, M=None) -> nn.Module`` (None: the default
width). Every builder checks the widths it is given (:func:`check_widths`) before it builds a layer."""


class WidthError(ValueError):
    """Widths ``N`` / ``M`` that a registered model cannot be built with. One line naming the
    command-line flag (``--N`` / ``--M``), the value, the model and the rule it breaks.

    Attributes:
        model: the registry name; field: ``"N"`` or ``"M"``; value: the width given; rule: the rule.
    """

    def __init__(self, model: str, field: str, value: object, rule: str) -> None:
        self.model, self.field, self.value, self.rule = model, field, value, rule
        super().__init__(f"--{field} {value} does not fit {model}: {field} {rule}")


WidthRule = tuple[str, Callable[[int], bool], str]
"""``(field, holds, rule)``: ``holds(width)`` is False for a width that breaks ``rule``."""

_POSITIVE: tuple[WidthRule, ...] = (
    ("N", lambda n: n >= 1, "must be at least 1 (the channels of the transforms)"),
    ("M", lambda m: m >= 1, "must be at least 1 (the channels of the latent y)"),
)

WIDTH_RULES: dict[str, tuple[WidthRule, ...]] = {}
"""The rules each registered model's ``N`` and ``M`` must follow, beyond being positive integers:
found by building every model over a grid of small widths (``tests/test_model_inputs.py`` keeps
that search): a width that breaks no rule builds and runs a forward pass with no empty layer."""


def check_widths(name: str, N: object = None, M: object = None) -> None:
    """Check widths for the registered model ``name`` (None: its default, always valid).

    Raises:
        WidthError: ``N`` / ``M`` not an integer, below 1, ``M`` given to a model without one, or
            breaking a rule of :data:`WIDTH_RULES` (one line naming the flag and the rule).
    """
    given = {field: value for field, value in (("N", N), ("M", M)) if value is not None}
    for field, value in given.items():
        if isinstance(value, bool) or not _is_integer(value):
            raise WidthError(name, field, repr(value), "must be an integer")
    for field, holds, rule in (*_POSITIVE, *WIDTH_RULES.get(name, ())):
        if field in given and not holds(operator.index(given[field])):
            raise WidthError(name, field, given[field], rule)


def _is_integer(value: object) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _checked(name: str, build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``build`` behind :func:`check_widths`, for the registry."""

    def checked(N: int | None = None, M: int | None = None) -> nn.Module:
        check_widths(name, N, M)
        return build(N=None if N is None else operator.index(N), M=None if M is None else operator.index(M))

    checked.__doc__ = build.__doc__
    return checked


def register_model(name: str, N: int, M: int | None, rules: Iterable[WidthRule] = ()) -> None:
    """Register CompressAI's architecture ``name`` with default widths ``N`` and ``M``
    (``M=None``: the model has no separate ``M``; its latent has ``N`` channels) and the ``rules``
    its widths must follow (:data:`WIDTH_RULES`)."""
    cls = COMPRESSAI_MODELS[name]
    defaults = {"N": N} if M is None else {"N": N, "M": M}
    rules = tuple(rules)
    if M is None:
        rules += (("M", lambda m: False, "is not a width of this model: it has no M (its latent has N "
                                         "channels); leave --M out and set --N"),)
    WIDTH_RULES[name] = rules

    def build(N: int | None = None, M: int | None = None) -> nn.Module:
        given = {k: v for k, v in (("N", N), ("M", M)) if v is not None}
        return cls(**{**defaults, **given})

    MODELS[name] = _checked(name, build)


# CompressAI's widths for its highest-quality configurations (compressai.zoo)
for _name in ("bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean", "mbt2018"):
    register_model(_name, N=192, M=320)
register_model("cheng2020-anchor", N=192, M=None)
register_model("elic2022-official", N=192, M=320, rules=(
    ("N", lambda n: n >= 2, "must be at least 2 (ELIC's residual bottleneck and attention blocks have "
                            "N // 2 channels)"),
    ("M", lambda m: m >= 129, "must be at least 129 (ELIC splits y into channel groups of 16, 16, 32, 64 "
                              "and M - 128 channels)"),
))
# energylab.tcm: TCM (Liu et al., CVPR 2023), N=64, M=320 as in the AuxT release
WIDTH_RULES["tcm"] = (
    ("M", lambda m: m % TCM_SLICES == 0, f"must be a multiple of {TCM_SLICES} (TCM codes y in "
                                         f"{TCM_SLICES} channel slices)"),
)
MODELS["tcm"] = _checked("tcm", build_tcm)


def build_model(
    name: str,
    *,
    N: int | None = None,
    M: int | None = None,
    auxt: bool = False,
    remove: Iterable[str] = (),
    wavelet: str = "haar",
    g_a_placement: str = "after_resample",
    g_s_placement: str = "stage_end",
    freeze: Iterable[str] = (),
    scaling_init: str = "release",
    projection_init: str = "default",
    klt_data: Tensor | None = None,
    split_seed: int = 0,
) -> nn.Module:
    """Build a registered CompressAI model, randomly initialised, with AuxT if ``auxt`` (the AuxT
    options are :func:`attach_auxt`'s).

    ``N``/``M`` default to the widths of CompressAI's highest-quality configuration (192/320).
    No weights are downloaded. ``model.g_a`` gets an :class:`InputSizeCheck` pre-hook: an input
    whose height or width is not a multiple of the model's ``input_multiple`` (default: its
    ``downsampling_factor``) is refused
    with one line naming the rule and the size (``forward`` and ``compress`` alike).

    Raises:
        ValueError: unknown model name (listing the valid ones) or bad AuxT options; ``remove``
            without ``auxt``.
        WidthError: ``N`` / ``M`` that the model cannot be built with (:func:`check_widths`), before
            any layer is built.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names are: {', '.join(MODELS)}")
    remove = check_components(remove)
    if remove and not auxt:
        raise ValueError(
            f"removing AuxT components {', '.join(remove)} needs auxt=True: a model without AuxT "
            f"has none to remove"
        )
    if not auxt and (freeze or scaling_init != "release" or projection_init != "default"):
        raise ValueError("freezing or re-initialising AuxT components needs auxt=True")
    model = MODELS[name](N=N, M=M)
    if auxt:
        attach_auxt(model, remove, wavelet, g_a_placement, g_s_placement, freeze=freeze,
                    scaling_init=scaling_init, projection_init=projection_init, klt_data=klt_data,
                    split_seed=split_seed)
    # a model may take smaller multiples in forward than in compress (TCM: input_multiple 16)
    multiple = int(getattr(model, "input_multiple", getattr(model, "downsampling_factor", 2**STAGES)))
    model.g_a.register_forward_pre_hook(InputSizeCheck(multiple, name))
    return model

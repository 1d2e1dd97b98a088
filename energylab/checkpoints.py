"""Checkpoint formats: reading a file, finding its state dict, remapping legacy keys, loading weights.

The one owner of checkpoint layouts in energylab (converters for other code bases go here too).
A checkpoint file is read with ``torch.load(weights_only=True)`` (tensors, NumPy arrays and plain
containers only). Its state dict is either the top level (a dict of tensors) or nested under one
of :data:`STATE_DICT_KEYS`. Keys are then brought to CompressAI 1.2.8's current names with
CompressAI's own functions, exactly as ``compressai.zoo`` and ``CompressionModel.load_state_dict``
do, so that every layout CompressAI accepts loads here too:

* ``compressai.zoo.pretrained.rename_key``: a DataParallel/DDP ``module.`` prefix dropped;
  ``ResidualBlockWithStride``'s old ``downsample`` renamed ``skip``; the old ``nn.ParameterList``
  entropy-bottleneck keys ``_biases.0`` / ``_matrices.0`` / ``_factors.0`` renamed ``_bias0`` ...;
* ``compressai.models.utils.remap_old_keys`` for every ``EntropyBottleneck``: ``_bias0`` /
  ``_matrix0`` / ``_factor0`` (CompressAI < 1.2) renamed ``biases.0`` / ``matrices.0`` /
  ``factors.0``;
* the entropy coder's size-dependent buffers (:data:`DYNAMIC_BUFFERS`) may have any shape: CompressAI
  resizes them on load and ``update(force=True)`` rewrites them. A state dict saved before
  ``update()`` (those tables empty, or absent) loads into a model already ``update()``-d too: the
  tables are derived data, so the rest is loaded and the tables rebuilt from the loaded weights
  (``EntropyBottleneck.update(force=True)``; a ``GaussianConditional`` keeps its own, which depend on
  its scale table only), as CompressAI's loader into a fresh model followed by
  ``update(force=True)`` gives; :class:`CheckpointLayout` records it (``"rebuilt"``). Non-empty
  tables of another size than an ``update()``-d model's are refused in one line naming every such
  key and the fix (CompressAI resizes only empty tables).

AuxT checkpoints of other code bases are converted to energylab's names first (:func:`to_energylab`;
:func:`from_energylab` writes them back; Haar AuxT only). :data:`FORMATS`:

* ``"energylab"``: AuxT under ``g_a.transform.<i>`` (main layers), ``g_a.auxiliary_layers.<k>.olp.linear.
  {weight,bias}`` and ``g_a.auxiliary_layers.<k>.scaling_factors`` (``g_s`` alike); no filter buffers;
* ``"compressai"``: no AuxT keys (CompressAI's plain layout; energylab's too without AuxT);
* ``"auxt-release"``: the official AuxT release (Li et al., ICLR 2025; ``qingshi9974/AuxT``,
  ``models/tcm_AuxT.py``, saved by its ``train.py`` under ``state_dict``): the main transforms at
  ``g_a.<i>`` / ``g_s.<i>`` (no wrapper), the branches at the model's root as ``AuxT_enc.<k>`` (WLS) and
  ``AuxT_dec.<k>`` (iWLS) with the projection named ``OLP`` (``AuxT_enc.<k>.OLP.linear.weight``
  ``(C_out, 4 C_in)``, ``AuxT_enc.<k>.scaling_factors`` ``(1, 1, 4 C_in)``) and persistent Haar filter
  buffers: ``AuxT_enc.<k>.dwt.w_ll`` / ``w_lh`` / ``w_hl`` / ``w_hh`` ``(1, 1, 2, 2)`` (outer products
  of the reversed ``pywt`` analysis filters) and ``AuxT_dec.<k>.idwt.filters`` ``(4, 1, 2, 2)``
  (outer products of the synthesis filters);
* ``"compressai-temp"``: the ``compressai-temp`` fork's AuxT helpers (1.2.9.dev0,
  ``compressai/models/_helpers/auxt.py``): energylab's names plus ``pytorch_wavelets``' persistent
  filter buffers ``g_a.auxiliary_layers.<k>.dwt.transform.{h0_col, h1_col}`` ``(1, 1, 2, 1)`` and
  ``{h0_row, h1_row}`` ``(1, 1, 1, 2)`` (reversed analysis filters) and
  ``g_s.auxiliary_layers.<k>.idwt.inverse.{g0_col, g1_col, g0_row, g1_row}`` (synthesis filters).
  Its ``DWT2D`` / ``IDWT2D`` (``pytorch_wavelets``, Haar, ``mode="zero"``) equal energylab's
  ``dwt2`` / ``idwt2`` in the same subband order (checked once against pytorch_wavelets 1.3.0, to
  float32 precision). Only the AuxT keys are converted: the fork's own TCM keeps its entropy model under
  ``latent_codec.*``, which is not energylab's TCM layout.

Filter buffers are checked against the Haar filters (another wavelet is refused, naming the key) and
dropped; writing a foreign layout regenerates them exactly as those code bases build them.

Which of these applied is reported as a :class:`CheckpointLayout`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from compressai.entropy_models import EntropyBottleneck, EntropyModel, GaussianConditional
from compressai.models.utils import remap_old_keys
from compressai.zoo.pretrained import rename_key
from torch import Tensor, nn

from energylab.models import has_auxt, unwrap_model

__all__ = [
    "CHECKPOINT_NUMPY_GLOBALS",
    "DYNAMIC_BUFFERS",
    "RENAMES",
    "STATE_DICT_KEYS",
    "CheckpointError",
    "CheckpointLayout",
    "FORMATS",
    "check_fits",
    "detect_format",
    "extract_state_dict",
    "from_energylab",
    "load_weights",
    "remap_state_dict",
    "to_energylab",
    "torch_load",
]

STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "network")
"""Where a checkpoint may nest its state dict: energylab's final-model and checkpoint files use
``model``; CompressAI's training example ``state_dict``; its ``eval_model`` also accepts the
others."""

DYNAMIC_BUFFERS = frozenset({"_quantized_cdf", "_offset", "_cdf_length", "scale_table"})
"""Entropy-coder buffers whose size depends on the last ``update()``; CompressAI resizes them on
load and ``update(force=True)`` rewrites them, so their shapes are not compared."""

RENAMES = {
    "module-prefix": "DataParallel/DDP 'module.' prefix removed",
    "compile-prefix": "torch.compile '_orig_mod.' segments removed",
    "downsample-to-skip": "ResidualBlockWithStride 'downsample' renamed 'skip' (old CompressAI)",
    "legacy-entropy-bottleneck": "EntropyBottleneck '_matrix0/_bias0/_factor0' (or '_matrices.0' ...) "
    "renamed 'matrices.0/biases.0/factors.0' (CompressAI < 1.2)",
}
"""The key remappings :func:`remap_state_dict` may apply: short name -> description."""

CHECKPOINT_NUMPY_GLOBALS = [
    np.core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]
"""Allowed besides tensors when unpickling a checkpoint: NumPy arrays (a training checkpoint's
NumPy RNG state). Everything else goes through ``torch.load(weights_only=True)``."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message is one line naming the file."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class CheckpointLayout:
    """What :func:`load_weights` recognised in a checkpoint.

    Attributes:
        container: the top-level key the state dict was nested under (one of
            :data:`STATE_DICT_KEYS`), or ``None`` for a state dict at the top level.
        renames: short names (keys of :data:`RENAMES`) of the key remappings applied, in order.
        format: the key layout recognised, one of :data:`FORMATS`.
        rebuilt: the entropy models (module names) whose coder tables the checkpoint saved before
            ``update()`` into a model already ``update()``-d: rebuilt from the loaded weights.
    """

    container: str | None
    renames: tuple[str, ...] = ()
    format: str = "compressai"
    rebuilt: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"format", "container", "renames"}``, with ``"rebuilt"`` when not empty."""
        out = {"format": self.format, "container": self.container, "renames": list(self.renames)}
        if self.rebuilt:
            out["rebuilt"] = list(self.rebuilt)
        return out

    def __str__(self) -> str:
        where = "top-level state dict" if self.container is None else f"state dict under {self.container!r}"
        rebuilt = (f"; coder tables saved before update() rebuilt for {', '.join(self.rebuilt)}"
                   if self.rebuilt else "")
        return (f"{self.format} layout, {where}" + "".join(f"; {RENAMES[r]}" for r in self.renames)
                + rebuilt)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its class name if empty): errors stay one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_failure(exc: Exception) -> str:
    """A one-line reason for a failed ``torch.load``, without PyTorch's page of advice."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = " ".join(text.split(marker, 1)[1].split("Check the documentation")[0].split())
        return (
            f"not a checkpoint that torch.load(weights_only=True) accepts ({detail[:160]}); only "
            f"tensors, NumPy arrays and plain containers are loaded"
        )
    return f"not a readable PyTorch checkpoint ({type(exc).__name__}: {first_line(exc)})"


def torch_load(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with NumPy arrays allowed.

    Raises:
        CheckpointError: (one line naming ``path``) unreadable, not a PyTorch checkpoint, or
            holding objects other than tensors, NumPy arrays and plain containers.
    """
    try:
        with torch.serialization.safe_globals(CHECKPOINT_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise CheckpointError(f"{path}: cannot read the file (permission denied)") from None
    except Exception as exc:  # torch.load raises many kinds; all of them mean "unreadable"
        raise CheckpointError(f"{path}: {_load_failure(exc)}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def extract_state_dict(obj: Any, where: str | Path) -> tuple[dict[str, Tensor], str | None]:
    """The state dict in a loaded checkpoint: ``obj`` itself or ``obj[key]`` for the first key of
    :data:`STATE_DICT_KEYS` holding a dict of tensors.

    Returns:
        ``(state_dict, container)``; ``container`` is that key or ``None`` (top level). Keys are
        not yet remapped (:func:`remap_state_dict`).

    Raises:
        CheckpointError: ``obj`` is not a dict, or holds no state dict; the message lists the
            top-level keys found.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: holds a {type(obj).__name__}, not a checkpoint dict")
    for key in STATE_DICT_KEYS:
        if _is_state_dict(obj.get(key)):
            return dict(obj[key]), key
    if _is_state_dict(obj):
        return dict(obj), None
    found = list(obj)
    shown = ", ".join(map(repr, found[:12])) + (f", ... ({len(found)} in all)" if len(found) > 12 else "")
    raise CheckpointError(
        f"{where}: no state dict (a dict of tensors at the top level or under "
        f"{', '.join(map(repr, STATE_DICT_KEYS))}); top-level keys found: {shown or 'none'}"
    )


_COMPILED = "._orig_mod."


def _uncompiled(key: str) -> str:
    """``key`` without ``torch.compile``'s ``_orig_mod.`` segments (a compiled model's, or a compiled
    submodule's: ``g_a._orig_mod.0.weight`` -> ``g_a.0.weight``)."""
    return f".{key}".replace(_COMPILED, ".")[1:]


def remap_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Bring ``state_dict``'s keys to CompressAI 1.2.8's names for ``model``, with CompressAI's own
    ``rename_key`` and, for each ``EntropyBottleneck`` of ``model``, ``remap_old_keys``.

    Returns:
        ``(remapped, renames)``: the new dict (tensors shared) and the short names
        (:data:`RENAMES`) of the remappings that changed at least one key.
    """
    model = unwrap_model(model)
    renames = []
    if any(_COMPILED in f".{k}" for k in state_dict):
        renames.append("compile-prefix")
        state_dict = {_uncompiled(k): v for k, v in state_dict.items()}
    keys = list(state_dict)
    if any(k.startswith("module.") for k in keys):
        renames.append("module-prefix")
    if any(".downsample." in k for k in keys):
        renames.append("downsample-to-skip")
    sd = {rename_key(k): v for k, v in state_dict.items()}
    legacy = any(k.startswith(("entropy_bottleneck._biases.", "entropy_bottleneck._matrices.",
                               "entropy_bottleneck._factors.")) for k in keys)
    for name, module in model.named_modules():
        if isinstance(module, EntropyBottleneck):
            before = list(sd)
            sd = dict(remap_old_keys(name, sd))
            legacy |= list(sd) != before
    if legacy:
        renames.append("legacy-entropy-bottleneck")
    return sd, tuple(renames)


# ---------------------------------------------------------------------------------------------
# AuxT layouts of other code bases

FORMATS = ("energylab", "compressai", "auxt-release", "compressai-temp")
"""Key layouts :func:`to_energylab` recognises (see the module docstring)."""

_RELEASE_PREFIXES = {"AuxT_enc.": "g_a.auxiliary_layers.", "AuxT_dec.": "g_s.auxiliary_layers."}
_RELEASE_DWT = ("w_ll", "w_lh", "w_hl", "w_hh")
_TEMP_DWT = ("h0_col", "h1_col", "h0_row", "h1_row")
_TEMP_IDWT = ("g0_col", "g1_col", "g0_row", "g1_row")


def _haar_filters() -> tuple[list[float], list[float], list[float], list[float]]:
    """``pywt``'s Haar ``dec_lo``, ``dec_hi``, ``rec_lo``, ``rec_hi`` (Python floats)."""
    import pywt

    w = pywt.Wavelet("haar")
    return w.dec_lo, w.dec_hi, w.rec_lo, w.rec_hi


def _release_buffers(prefix: str, analysis: bool) -> dict[str, Tensor]:
    """The filter buffers of the release's ``DWT_2D('haar')`` / ``IDWT_2D('haar')`` at ``prefix``
    (``models/pywave.py``: ``a.unsqueeze(0) * b.unsqueeze(1)`` outer products, float32)."""
    dec_lo, dec_hi, rec_lo, rec_hi = _haar_filters()
    if analysis:
        lo, hi = torch.Tensor(dec_lo[::-1]), torch.Tensor(dec_hi[::-1])
        pairs = ((lo, lo), (lo, hi), (hi, lo), (hi, hi))
        return {f"{prefix}dwt.{name}": (a.unsqueeze(0) * b.unsqueeze(1))[None, None]
                for name, (a, b) in zip(_RELEASE_DWT, pairs, strict=True)}
    lo, hi = torch.Tensor(rec_lo), torch.Tensor(rec_hi)
    pairs = ((lo, lo), (lo, hi), (hi, lo), (hi, hi))
    filters = torch.cat([(a.unsqueeze(0) * b.unsqueeze(1))[None, None] for a, b in pairs])
    return {f"{prefix}idwt.filters": filters}


def _temp_buffers(prefix: str, analysis: bool) -> dict[str, Tensor]:
    """The filter buffers of ``pytorch_wavelets``' ``DWTForward(J=1, wave='haar')`` /
    ``DWTInverse(wave='haar')`` at ``prefix`` (``prep_filt_afb2d`` reverses the analysis filters,
    ``prep_filt_sfb2d`` does not; columns ``(1, 1, L, 1)``, rows ``(1, 1, 1, L)``)."""
    dec_lo, dec_hi, rec_lo, rec_hi = _haar_filters()
    dtype = torch.get_default_dtype()
    if analysis:
        lo, hi, names, where = dec_lo[::-1], dec_hi[::-1], _TEMP_DWT, "dwt.transform"
    else:
        lo, hi, names, where = rec_lo, rec_hi, _TEMP_IDWT, "idwt.inverse"
    lo_t = torch.tensor(np.array(lo).ravel(), dtype=dtype)
    hi_t = torch.tensor(np.array(hi).ravel(), dtype=dtype)
    shapes = ((1, 1, -1, 1), (1, 1, -1, 1), (1, 1, 1, -1), (1, 1, 1, -1))
    return {f"{prefix}{where}.{name}": t.reshape(shape)
            for name, t, shape in zip(names, (lo_t, hi_t, lo_t, hi_t), shapes, strict=True)}


def _branch(key: str) -> tuple[str, bool] | None:
    """``("g_a.auxiliary_layers.<k>.", analysis)`` for an energylab AuxT key, else None."""
    for side, analysis in (("g_a", True), ("g_s", False)):
        head = f"{side}.auxiliary_layers."
        if key.startswith(head):
            index = key[len(head):].split(".", 1)[0]
            return f"{head}{index}.", analysis
    return None


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """The key layout of ``state_dict`` (one of :data:`FORMATS`; ``module.`` prefixes ignored):
    ``auxt-release`` if a key starts with ``AuxT_enc.`` / ``AuxT_dec.``, ``compressai-temp`` if an
    AuxT branch holds ``pytorch_wavelets`` buffers, ``energylab`` for other ``auxiliary_layers`` keys,
    else ``compressai``."""
    keys = [_uncompiled(k).removeprefix("module.") for k in state_dict]
    if any(k.startswith(tuple(_RELEASE_PREFIXES)) for k in keys):
        return "auxt-release"
    aux = [k for k in keys if _branch(k) is not None]
    if any(".dwt.transform." in k or ".idwt.inverse." in k for k in aux):
        return "compressai-temp"
    return "energylab" if aux else "compressai"


def _check_filter(key: str, value: Tensor, expected: Tensor, where: str | Path) -> None:
    if value.shape != expected.shape or not torch.allclose(value.double(), expected.double(), atol=1e-6):
        raise CheckpointError(
            f"{where}: filter buffer {key!r} is not Haar's filter bank (energylab converts Haar AuxT "
            f"only); got {value.flatten().tolist()[:8]}"
        )


def to_energylab(
    state_dict: Mapping[str, Tensor], where: str | Path = "state dict"
) -> tuple[dict[str, Tensor], str]:
    """Convert a state dict of any of :data:`FORMATS` to energylab's key layout.

    Filter buffers are checked to be Haar and dropped; the release's ``AuxT_enc`` / ``AuxT_dec``
    branches move under ``g_a`` / ``g_s`` ``.auxiliary_layers`` (``OLP`` -> ``olp``) and its main
    layers under ``.transform``. Tensors are shared, not copied; other keys are kept in order.

    Returns:
        ``(converted, format)``.

    Raises:
        CheckpointError: a filter buffer that is not Haar (naming the key and ``where``).
    """
    fmt = detect_format(state_dict)
    if fmt in ("energylab", "compressai"):
        return dict(state_dict), fmt
    out: dict[str, Tensor] = {}
    for raw, value in state_dict.items():
        key = _uncompiled(raw).removeprefix("module.")
        if fmt == "auxt-release":
            for old, new in _RELEASE_PREFIXES.items():
                if key.startswith(old):
                    index, rest = key[len(old):].split(".", 1)
                    prefix = f"{old}{index}."
                    buffers = _release_buffers(prefix, old == "AuxT_enc.")
                    if key in buffers:
                        _check_filter(raw, value, buffers[key], where)
                        key = None
                    else:
                        key = f"{new}{index}." + (f"olp.{rest[4:]}" if rest.startswith("OLP.") else rest)
                    break
            else:
                if key.startswith(("g_a.", "g_s.")):
                    key = f"{key[:3]}.transform.{key[4:]}"
        else:
            branch = _branch(key)
            if branch is not None:
                buffers = _temp_buffers(*branch)
                if key in buffers:
                    _check_filter(raw, value, buffers[key], where)
                    key = None
        if key is not None:
            out[key] = value
    return out, fmt


def from_energylab(state_dict: Mapping[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """Write an energylab state dict (with Haar AuxT) in the key layout ``fmt`` of :data:`FORMATS`;
    the inverse of :func:`to_energylab` (``to_energylab(from_energylab(sd, fmt))`` equals ``sd``
    key for key and bit for bit). Filter buffers are regenerated as the foreign code builds them.

    Raises:
        ValueError: an unknown ``fmt``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint layout {fmt!r}; valid layouts are: {', '.join(FORMATS)}")
    if fmt in ("energylab", "compressai"):
        return dict(state_dict)
    out: dict[str, Tensor] = {}
    done: set[str] = set()
    for key, value in state_dict.items():
        branch = _branch(key)
        if branch is None:
            if fmt == "auxt-release" and key.startswith(("g_a.transform.", "g_s.transform.")):
                key = key[:4] + key[len("g_a.transform."):]
            out[key] = value
            continue
        prefix, analysis = branch
        if fmt == "compressai-temp":
            if prefix not in done:
                out.update(_temp_buffers(prefix, analysis))
            out[key] = value
        else:
            old = "AuxT_enc." if analysis else "AuxT_dec."
            index = prefix.split(".")[2]
            rest = key[len(prefix):]
            rest = f"OLP.{rest[4:]}" if rest.startswith("olp.") else rest
            if prefix not in done:
                out.update(_release_buffers(f"{old}{index}.", analysis))
            out[f"{old}{index}.{rest}"] = value
        done.add(prefix)
    return out


def _shape(t: Tensor) -> str:
    return f"({', '.join(map(str, t.shape))})"


def check_fits(model: nn.Module, state_dict: Mapping[str, Tensor], where: str | Path, label: str) -> None:
    """Check that a (remapped) state dict fits ``model`` before loading it.

    Raises:
        CheckpointError: one line for the first key (in the model's order) that is missing or
            differently shaped (both shapes given; :data:`DYNAMIC_BUFFERS` may have any shape),
            else for the first key the model lacks. ``label`` names the model in the message.
    """
    expected = unwrap_model(model).state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise CheckpointError(f"{where}: checkpoint lacks {key!r} {_shape(tensor)} of model {label}")
        if key.rsplit(".", 1)[-1] not in DYNAMIC_BUFFERS and state_dict[key].shape != tensor.shape:
            raise CheckpointError(
                f"{where}: {key!r} is {_shape(state_dict[key])} in the checkpoint but "
                f"{_shape(tensor)} in model {label}"
            )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where}: checkpoint has {extra[0]!r}{more}, which model {label} lacks")


def _coder_tables(model: nn.Module, state_dict: dict[str, Tensor], where: str | Path,
                  label: str) -> tuple[str, ...]:
    """Reconcile the checkpoint's entropy-coder tables (:data:`DYNAMIC_BUFFERS`) with ``model``'s,
    **in** ``state_dict``: an entropy model whose tables the checkpoint saved before ``update()``
    (every one empty or absent) gets the model's own in their place (so that the load neither
    fails nor empties them).

    Returns:
        The names of the entropy models whose own tables are not empty there: ``load_weights``
        rebuilds them from the loaded weights.

    Raises:
        CheckpointError: non-empty tables of another shape than the non-empty ones of an
            ``update()``-d model: one line naming every such key, both shapes and the fix.
    """
    rebuilt, clashes = [], []
    for name, module in model.named_modules():
        if not isinstance(module, EntropyModel):
            continue
        own = {b: t for b, t in module.named_buffers(recurse=False) if b in DYNAMIC_BUFFERS}
        keys = {b: f"{name}.{b}" if name else b for b in own}
        saved = {b: state_dict.get(k) for b, k in keys.items()}
        if all(t is None or t.numel() == 0 for t in saved.values()):  # saved before update()
            state_dict.update({keys[b]: t.detach().clone() for b, t in own.items()})
            if any(t.numel() for t in own.values()):
                rebuilt.append(name)
            continue
        clashes += [f"{keys[b]} {_shape(saved[b])} vs {_shape(t)}" for b, t in own.items()
                    if saved[b] is not None and t.numel() and saved[b].shape != t.shape]
    if clashes:
        raise CheckpointError(
            f"{where}: does not load into model {label}: entropy-coder tables of another size than "
            f"the model's, which is already update()-d (CompressAI resizes empty tables only): "
            f"{'; '.join(clashes)} (checkpoint vs model); load it into a freshly built model, or "
            f"leave these keys out of the state dict (energylab then rebuilds the tables from the "
            f"loaded weights)"
        )
    return tuple(rebuilt)


def _rebuild_tables(model: nn.Module, names: tuple[str, ...]) -> None:
    """``update()`` the entropy models ``names`` of ``model`` from their loaded weights."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, EntropyBottleneck):
            module.update(force=True)
        elif isinstance(module, GaussianConditional):
            module.update()  # its tables follow from its scale table, kept
        else:
            module.update(force=True)


def load_weights(model: nn.Module, checkpoint: Any, where: str | Path, label: str = "") -> CheckpointLayout:
    """Load a checkpoint's weights into ``model`` (in place), whatever its layout.

    Args:
        model: the built model (a DataParallel/DDP wrapper is seen through).
        checkpoint: what :func:`torch_load` returned: a state dict, or a dict nesting one.
        where: the file, for messages.
        label: the model's description, for messages.

    Returns:
        The :class:`CheckpointLayout` recognised (any of :data:`FORMATS`, converted by
        :func:`to_energylab` after CompressAI's renames).

    Raises:
        CheckpointError: no state dict (listing the top-level keys), a non-Haar filter buffer, AuxT
            in the checkpoint but not in the model or the other way round, weights that do not fit
            (:func:`check_fits`), non-empty entropy-coder tables of another size than those of a
            model already ``update()``-d (naming every such key; tables saved before ``update()``
            load, and are rebuilt), or a load that fails anyway.
    """
    model = unwrap_model(model)
    raw, container = extract_state_dict(checkpoint, where)
    sd, renames = remap_state_dict(model, raw)
    sd, fmt = to_energylab(sd, where)
    label = label or type(model).__name__
    carries = fmt != "compressai"
    if carries != has_auxt(model):
        has = "carries AuxT" if carries else "carries no AuxT"
        raise CheckpointError(f"{where}: checkpoint ({fmt} layout) {has} but model {label} "
                              f"{'has none' if carries else 'has AuxT'}")
    rebuilt = _coder_tables(model, sd, where, label)
    check_fits(model, sd, where, label)
    try:
        model.load_state_dict(sd)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: does not load into model {label} ({first_line(exc)})") from None
    _rebuild_tables(model, rebuilt)
    return CheckpointLayout(container, renames, fmt, rebuilt)

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
  resizes them on load and ``update(force=True)`` rewrites them.

Which of these applied is reported as a :class:`CheckpointLayout`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.models.utils import remap_old_keys
from compressai.zoo.pretrained import rename_key
from torch import Tensor, nn

from energylab.models import unwrap_model

__all__ = [
    "CHECKPOINT_NUMPY_GLOBALS",
    "DYNAMIC_BUFFERS",
    "RENAMES",
    "STATE_DICT_KEYS",
    "CheckpointError",
    "CheckpointLayout",
    "check_fits",
    "extract_state_dict",
    "load_weights",
    "remap_state_dict",
    "torch_load",
]

STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "network")
"""Where a checkpoint may nest its state dict: energylab's ``final.pt``/``checkpoint.pt`` use
``model``; CompressAI's training example ``state_dict``; its ``eval_model`` also accepts the
others."""

DYNAMIC_BUFFERS = frozenset({"_quantized_cdf", "_offset", "_cdf_length", "scale_table"})
"""Entropy-coder buffers whose size depends on the last ``update()``; CompressAI resizes them on
load and ``update(force=True)`` rewrites them, so their shapes are not compared."""

RENAMES = {
    "module-prefix": "DataParallel/DDP 'module.' prefix removed",
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
    """

    container: str | None
    renames: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"container", "renames"}``."""
        return {"container": self.container, "renames": list(self.renames)}

    def __str__(self) -> str:
        where = "top-level state dict" if self.container is None else f"state dict under {self.container!r}"
        return where + "".join(f"; {RENAMES[r]}" for r in self.renames)


def _first_line(exc: BaseException) -> str:
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
    return f"not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})"


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


def load_weights(model: nn.Module, checkpoint: Any, where: str | Path, label: str = "") -> CheckpointLayout:
    """Load a checkpoint's weights into ``model`` (in place), whatever its layout.

    Args:
        model: the built model (a DataParallel/DDP wrapper is seen through).
        checkpoint: what :func:`torch_load` returned: a state dict, or a dict nesting one.
        where: the file, for messages.
        label: the model's description, for messages.

    Returns:
        The :class:`CheckpointLayout` recognised.

    Raises:
        CheckpointError: no state dict (listing the top-level keys), weights that do not fit
            (:func:`check_fits`), or a load that fails anyway (e.g. entropy-coder tables of a
            different size in a model already ``update()``-d: CompressAI resizes only empty ones).
    """
    model = unwrap_model(model)
    raw, container = extract_state_dict(checkpoint, where)
    sd, renames = remap_state_dict(model, raw)
    label = label or type(model).__name__
    check_fits(model, sd, where, label)
    try:
        model.load_state_dict(sd)
    except (RuntimeError, KeyError, ValueError) as exc:  # e.g. coder tables of an update()-d model
        raise CheckpointError(f"{where}: does not load into model {label} ({_first_line(exc)})") from None
    return CheckpointLayout(container, renames)

"""Mixed precision of training steps: autocast of the transforms only.

With ``precision="bf16"`` or ``"fp16"`` the analysis and synthesis transforms (``g_a``, ``g_s``)
and the hyperprior's transforms (``h_a``, ``h_s``; TCM's ``h_mean_s``, ``h_scale_s``) run under
``torch.autocast`` during training steps, and each of their outputs is cast back to float32: the
entropy models, the likelihoods, the rate and distortion terms and AuxT's orthogonality penalty
are computed in float32, and every statistic (:mod:`energylab.capture`, evaluations) is computed
outside autocast. fp16 scales the loss with ``torch.amp.GradScaler`` (its state is checkpointed);
bf16 needs none. Follows PyTorch's automatic mixed precision recipe
(https://pytorch.org/docs/stable/amp.html).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["TRANSFORMS", "MixedPrecision"]

TRANSFORMS = ("g_a", "g_s", "h_a", "h_s", "h_mean_s", "h_scale_s")
"""Submodules run under autocast (those the model has)."""

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _to_float32(out):
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple | list):
        return type(out)(_to_float32(o) for o in out)
    return out


class MixedPrecision:
    """Autocast hooks on a model's transforms and the gradient scaler of one precision.

    Args:
        precision: ``"fp32"`` (no autocast, no scaling), ``"bf16"`` or ``"fp16"``.
        device: where the model runs (autocast's device type).

    Raises:
        ValueError: an unknown precision, or a precision autocast does not support on ``device``
            (one line, naming both).
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}, got {precision!r}")
        self.precision, self.dtype, self.device_type = precision, _DTYPES[precision], device.type
        if self.dtype is not None and not torch.amp.autocast_mode.is_autocast_available(self.device_type):
            raise ValueError(f"precision {precision} needs autocast, which {device} does not support")
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")
        self._on = False
        self._contexts: list[torch.autocast] = []

    def attach(self, net: nn.Module) -> None:
        """Hook every :data:`TRANSFORMS` submodule of ``net``; the hooks act inside :meth:`active`."""
        if self.dtype is None:
            return
        for name in TRANSFORMS:
            module = getattr(net, name, None)
            if isinstance(module, nn.Module):
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._exit)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within: the hooked transforms run under autocast (a training step's forward)."""
        self._on = True
        try:
            yield
        finally:
            self._on = False
            while self._contexts:  # a forward that raised left its context open
                self._contexts.pop().__exit__(None, None, None)

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if self._on:
            context = torch.autocast(self.device_type, dtype=self.dtype)
            context.__enter__()
            self._contexts.append(context)

    def _exit(self, module: nn.Module, args: tuple, out):
        if self._on and self._contexts:
            self._contexts.pop().__exit__(None, None, None)
            return _to_float32(out)
        return None

    def state_dict(self) -> dict | None:
        """The gradient scaler's state (fp16), else None."""
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)

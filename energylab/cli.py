"""The command-line layer: shared argument groups, ``TrainConfig`` from flags, one error mapping.

``python -m energylab.train``, ``.ablate``, ``.evaluate`` and ``.figures`` build their parsers from
the groups below (as ``compressai.utils``' commands share parent parsers) and run through
:func:`run_command`, so every command reports errors the same way:

* a library error prints one line ``error: <message>`` on stderr; a :class:`ConfigError` is written
  with the flags' spellings (``--patch-size must be a multiple of 64, got 100``);
* exit status 2 for bad arguments or input (``ConfigError``, ``RunDirError``, ``DataError``,
  ``EvaluationError``, ``AblationError``, ``FigureError``: every library ``ValueError``), 1 for a
  run that failed (``TrainingError``) or a file that could not be written (``OSError``), 130 when
  interrupted, 0 otherwise. argparse's own errors also exit with 2.

Only the commands' ``__main__`` modules import this layer; the library never does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Collection
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from energylab.auxt import COMPONENTS, FREEZABLE, PROJECTION_INITS, SCALING_INITS
from energylab.config import DEVICES, EVAL_SCHEDULES, LR_SCHEDULES, PRECISIONS, ConfigError, TrainConfig
from energylab.data import SMALL_IMAGES
from energylab.errors import TrainingError
from energylab.evaluate import ARCH_KEYS, EvaluationError
from energylab.models import MODELS, PLACEMENTS

__all__ = ["Parser", "add_auxt_arguments", "add_data_arguments", "add_device_arguments",
           "add_model_arguments", "add_training_arguments", "arch_from_args", "config_from_args", "flag",
           "run_command"]

class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr, exit status 2:
    ``error: <what argparse says> (python -m energylab.X --help lists the options)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} ({self.prog} --help lists the options)\n")


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name != "out"}


def flag(field: str) -> str:
    """The command-line spelling of a :class:`TrainConfig` field: ``patch_size`` -> ``--patch-size``."""
    return "--" + field.replace("_", "-")


def _add(group, field: str, defaults: bool, exclude: Collection[str], **kwargs) -> None:
    if field in exclude:
        return
    if kwargs.get("action") == "store_true":
        kwargs.setdefault("default", False)
    else:
        kwargs.setdefault("default", _DEFAULTS[field] if defaults else None)
    group.add_argument(flag(field), dest=field, **kwargs)


def add_model_arguments(p: argparse.ArgumentParser, defaults: bool = True,
                        exclude: Collection[str] = ()) -> None:
    """``--model``, ``--N``, ``--M`` in a group of ``p``; ``defaults=False``: None unless given."""
    g = p.add_argument_group("model")
    _add(g, "model", defaults, exclude, choices=sorted(MODELS), help="registry name")
    _add(g, "N", defaults, exclude, type=int, help="channels of the transforms")
    _add(g, "M", defaults, exclude, type=int, help="channels of the latent y")


def add_auxt_arguments(p: argparse.ArgumentParser, defaults: bool = True,
                       exclude: Collection[str] = ()) -> None:
    """``--auxt``, ``--remove``, ``--wavelet``, ``--g-a-placement``, ``--g-s-placement``,
    ``--freeze``, ``--scaling-init``, ``--projection-init``."""
    g = p.add_argument_group("AuxT")
    _add(g, "auxt", defaults, exclude, action="store_true", help="attach AuxT (WLS/iWLS)")
    _add(g, "remove", defaults, exclude, action="append", metavar="COMPONENT",
         default=[] if defaults else None,
         help=f"remove an AuxT component (repeatable): {', '.join(COMPONENTS)}")
    _add(g, "wavelet", defaults, exclude, help="AuxT's wavelet basis (any pywt name)")
    _add(g, "g_a_placement", defaults, exclude, choices=PLACEMENTS)
    _add(g, "g_s_placement", defaults, exclude, choices=PLACEMENTS)
    _add(g, "freeze", defaults, exclude, action="append", metavar="COMPONENT",
         default=[] if defaults else None,
         help=f"freeze an AuxT component at its initial value (repeatable): {', '.join(FREEZABLE)}")
    _add(g, "scaling_init", defaults, exclude, choices=SCALING_INITS,
         help="initial subband scaling s: the release's, or zero (gain 1)")
    _add(g, "projection_init", defaults, exclude, choices=PROJECTION_INITS,
         help="initial OLP weight (a frozen projection: orthogonal unless klt)")


def add_training_arguments(p: argparse.ArgumentParser, exclude: Collection[str] = ()) -> None:
    """Loss, optimisation, schedule and probe flags (``--lmbda`` ... ``--seed``)."""
    g = p.add_argument_group("training")
    _add(g, "lmbda", True, exclude, type=float, help="λ of λ·255²·MSE + bpp")
    _add(g, "ortho_weight", True, exclude, type=float, help="weight of AuxT's orthogonality penalty")
    _add(g, "steps", True, exclude, type=int)
    _add(g, "batch_size", True, exclude, type=int, help="per process")
    _add(g, "lr", True, exclude, type=float)
    _add(g, "eval_every", True, exclude, type=int)
    _add(g, "eval_schedule", True, exclude, choices=EVAL_SCHEDULES,
         help="fixed: every --eval-every steps; dense-early: also every eval-every/4 steps up to "
              "5 x eval-every")
    _add(g, "capture_every", True, exclude, type=int, help="0: no captures")
    _add(g, "log_every", True, exclude, type=int)
    _add(g, "probe_count", True, exclude, type=int)
    _add(g, "probe_size", True, exclude, type=int, help="a multiple of 64")
    _add(g, "seed", True, exclude, type=int)
    _add(g, "lr_schedule", True, exclude, choices=LR_SCHEDULES,
         help="main optimizer's rate: constant, multistep (--lr-milestones) or plateau (test loss)")
    _add(g, "lr_milestones", True, exclude, type=int, nargs="+", default=[], metavar="STEP",
         help="multistep: the steps after each run at --lr-gamma times the rate")
    _add(g, "lr_gamma", True, exclude, type=float, help="rate factor at a milestone or a plateau")
    _add(g, "lr_patience", True, exclude, type=int,
         help="plateau: evaluations without improvement before the rate drops")
    _add(g, "precision", True, exclude, choices=PRECISIONS,
         help="autocast of the transforms in training (entropy models stay float32)")
    _add(g, "deterministic", True, exclude, action="store_true",
         help="reproducible CPU numbers: 1 intra-op thread and the AVX2 kernels of ATen, oneDNN "
              "and MKL, the same on any core count and x86-64 CPU (slower; on AVX-512 CPUs start "
              "with ATEN_CPU_CAPABILITY=avx2)")


def add_data_arguments(p: argparse.ArgumentParser, exclude: Collection[str] = ()) -> None:
    """``--data``, ``--patch-size``, ``--test-size``, ``--workers``, ``--cache``, ``--small-images``."""
    g = p.add_argument_group("data")
    _add(g, "data", True, exclude, help="'builtin' or an image folder")
    _add(g, "patch_size", True, exclude, type=int, help="a multiple of 64")
    _add(g, "test_size", True, exclude, type=int,
         help="centre-crop test images to this size (default: whole)")
    _add(g, "workers", True, exclude, type=int,
         help="loader processes streaming a folder's crops (default: from the CPU count)")
    _add(g, "cache", True, exclude, action="store_true",
         help="decode a (small) folder's training images into memory once")
    _add(g, "small_images", True, exclude, choices=SMALL_IMAGES,
         help="training images smaller than the patch: skip them (one warning) or stop")


def add_device_arguments(p: argparse.ArgumentParser, default: str = "auto",
                         choices: Collection[str] | None = DEVICES) -> None:
    """``--device``; ``choices=None`` accepts any torch device string."""
    g = p.add_argument_group("device")
    g.add_argument("--device", default=default, choices=choices,
                   help="'auto' picks CUDA when available" if choices else "torch device")


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from parsed flags (every field the namespace holds, the defaults for
    the rest) and ``overrides``.

    Raises:
        ConfigError: an invalid value (``str(err)`` names the field; :func:`run_command` the flag).
    """
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values.update(overrides)
    if isinstance(values.get("out"), str):
        values["out"] = Path(values["out"])
    return TrainConfig(**values)


def error_message(err: BaseException) -> str:
    """One line for a library error, options spelled as flags."""
    text = err.render(flag) if isinstance(err, ConfigError) else str(err)
    return " ".join(text.split())


def run_command(body: Callable[[], object]) -> int:
    """Run a command's ``body``; map library errors to one stderr line and an exit status.

    Returns:
        0 on success; 2 for bad arguments or input (any ``ValueError`` of the library); 1 for a run
        that failed (:class:`energylab.errors.TrainingError`) or a file that could not be read or
        written (``OSError``: a full disk, a permission; the line names the file and the cause);
        130 when interrupted (Ctrl-C: what was written is kept, ``--resume`` continues a run).
    """
    try:
        body()
    except (ValueError, TrainingError) as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 1 if isinstance(err, TrainingError) else 2
    except OSError as err:
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; files already written are kept (a run continues with --resume)",
              file=sys.stderr)
        return 130
    return 0


def os_error_message(err: OSError) -> str:
    """One line for an ``OSError``: the file (``filename``, else none) and the cause."""
    cause = err.strerror or str(err)
    where = f"{err.filename}: " if err.filename is not None else ""
    return " ".join(f"{where}{cause}".split())


def arch_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``arch`` of :func:`load_model` from ``--model`` and the architecture flags (None without
    ``--model``).

    Raises:
        EvaluationError: architecture flags without ``--model``.
    """
    flags = {k: getattr(args, k) for k in ARCH_KEYS}
    given = {k: v for k, v in flags.items() if v is not None and v is not False}
    if args.model is None:
        if given:
            names = ", ".join("--" + k.replace("_", "-") for k in given)
            raise EvaluationError(f"{names} describe a plain state dict's model; add --model NAME")
        return None
    return {"model": args.model, **given}

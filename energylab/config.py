"""``TrainConfig``: every setting of one training run, validated on construction.

It is the training API (``energylab.train.train(config)``) and is saved as the ``args`` of the run
directory's config (:class:`energylab.rundir.RunDir`). Errors name the field in library terms
(``patch_size must be a multiple of 64, got 100``); the command line maps field names to its flags
(:mod:`energylab.cli`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from energylab.auxt import COMPONENTS, FREEZABLE, PROJECTION_INITS, SCALING_INITS, check_options
from energylab.models import MODELS, PLACEMENTS

LEGACY_KEYS = frozenset({"resume"})
"""Keys of configs saved by energylab 0.1 that are not training settings (``--resume`` was saved
with the arguments); :meth:`TrainConfig.from_dict` drops them."""
__all__ = ["DEVICES", "EVAL_SCHEDULES", "LR_SCHEDULES", "PATCH_MULTIPLE", "PRECISIONS", "RESUMABLE_CHANGES",
           "ConfigError", "TrainConfig"]

PATCH_MULTIPLE = 64
"""Training patches and probe crops are multiples of this (the hyperprior models downsample by 64)."""
DEVICES = ("auto", "cpu", "cuda")
EVAL_SCHEDULES = ("fixed", "dense-early")
"""When a run evaluates (see :class:`TrainConfig` and :meth:`TrainConfig.evaluates_at`)."""
DENSE_EARLY_DIVISOR = 4
"""``dense-early`` evaluates every ``eval_every // DENSE_EARLY_DIVISOR`` steps (at least 1) early on..."""
DENSE_EARLY_SPAN = 5
"""... up to step ``DENSE_EARLY_SPAN * eval_every`` (every 25 steps to step 500 at ``eval_every`` 100)."""
LR_SCHEDULES = ("constant", "multistep", "plateau")
"""Learning-rate schedules of the main optimizer (see :class:`TrainConfig`)."""
PRECISIONS = ("fp32", "bf16", "fp16")
"""Arithmetic of the transforms in training (see :class:`TrainConfig`)."""
RESUMABLE_CHANGES = frozenset({"out", "steps", "device", "log_every", "workers", "cache"})
"""Fields a resumed run may change; every other one must equal the run's saved config."""

_FIELD_REF = re.compile(r"\{(\w+)\}")


class ConfigError(ValueError):
    """A setting that is not valid: ``field`` names it, ``problem`` says what is wrong.

    ``problem`` may refer to other settings as ``{name}``; ``str(err)`` writes them as field names,
    :meth:`render` with any spelling (the command line's flags).
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, " ".join(problem.split())
        super().__init__(self.render(lambda name: name))

    def render(self, name: Callable[[str], str]) -> str:
        """The one-line message with every setting spelled by ``name(field)``."""
        return f"{name(self.field)} " + _FIELD_REF.sub(lambda m: name(m.group(1)), self.problem)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (defaults: ``python -m energylab.train``'s).

    * model: ``model`` (registry name), ``N`` / ``M`` (channels of the transforms / of ``y``),
      ``auxt``, ``remove`` (AuxT components switched off, kept in ``COMPONENTS`` order),
      ``wavelet`` (pywt name), ``g_a_placement`` / ``g_s_placement``;
    * loss ``λ·255²·MSE + bpp + ortho_weight·ortho``: ``lmbda``, ``ortho_weight``;
    * training: ``steps`` (training steps, each on its own batch, fp16 steps the gradient scaler
      skipped included), ``batch_size`` (per process), ``lr``, ``seed``;
    * data: ``data`` (``"builtin"`` or an image folder), ``patch_size`` (pixels, a multiple of 64),
      ``test_size`` (centre crop of the test images; None: whole images);
    * schedule (in steps): ``eval_every``, ``capture_every`` (0: no captures), ``log_every``;
      ``eval_schedule``: ``"fixed"`` evaluates at step 0, every ``eval_every`` steps and at the end;
      ``"dense-early"`` also every ``eval_every // 4`` steps (at least 1) up to step
      ``5 * eval_every`` (every 25 steps to 500 at ``eval_every`` 100), so a step-equivalence ``t′``
      early in training is resolved (:mod:`energylab.summary`); checkpoints follow evaluations, and
      a plateau schedule's ``lr_patience`` counts them. A config saved before the field existed reads
      as ``"fixed"`` (the default), which those runs used; the
      probe set: ``probe_count`` fixed non-overlapping regions of ``probe_size`` pixels (a multiple
      of 64) from the test, then the training images (:func:`energylab.data.probe_set`; the
      defaults, 32 of 256 px, give 8192 positions of ``y``);
    * ``device`` (``auto``, ``cpu``, ``cuda``) and ``out``, the run directory;
    * streaming a folder (:class:`energylab.data.TrainStream`): ``workers`` (loader processes; None:
      :func:`energylab.data.default_workers`), ``cache`` (decode the training images into memory
      once; small folders), ``small_images`` (``"skip"`` or ``"error"`` for training images smaller
      than the patch); none of them changes a batch;
    * learning-rate schedule of the main optimizer (the quantiles' optimizer keeps its own rate):
      ``lr_schedule`` ``"constant"``; ``"multistep"`` (``torch.optim.lr_scheduler.MultiStepLR``:
      the steps after each of ``lr_milestones`` (applied optimizer steps, increasing: the training
      steps, except that fp16 steps skipped by the gradient scaler do not count) run at
      ``lr_gamma`` times the rate before); ``"plateau"`` (``ReduceLROnPlateau`` on the test loss at
      each evaluation: rate × ``lr_gamma`` after more than ``lr_patience`` evaluations without
      improvement); as CompressAI's example training uses them;
    * ``precision``: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` autocast of the transforms in training
      steps (:mod:`energylab.precision`; fp16 with a gradient scaler). fp16 steps whose scaled
      gradients overflow are skipped by the scaler (weights unchanged, the scale halved; common in
      the first steps, from a scale of 65536): they count toward ``steps`` (each step draws its
      batch, so a resumed run stays exact) but not toward ``lr_milestones``; ``metrics.jsonl``
      counts them (``skipped_steps``, ``skipped_steps_total``) and the console shows them.
    * AuxT components frozen or started elsewhere (:mod:`energylab.auxt`): ``freeze`` (kept in
      ``FREEZABLE`` order), ``scaling_init`` (``release``, ``zero``), ``projection_init``
      (``default``, ``orthogonal``, ``klt``; a frozen projection's ``default`` is stored as
      ``orthogonal``).
    * ``deterministic``: reproducible CPU arithmetic (:func:`energylab.train.deterministic_cpu`):
      one intra-op thread, and the AVX2 kernels of ATen, oneDNN and MKL (strict CNR) whatever the
      CPU, so a run's numbers no longer depend on the machine's core count or on whether its CPU
      has AVX-512 -- what makes unpinned runs of one seed drift apart (last-bit differences in the
      gradients from step 1, visible in the losses after tens of steps, percent-level by the end).
      On an AVX-512 CPU the process must start with ``ATEN_CPU_CAPABILITY=avx2`` (ATen picks its
      kernels at its first operation; :data:`energylab.train.DETERMINISTIC_ENV`). Slower; CPU only
      (``device`` ``cuda`` is refused); resumed runs keep it (it is not one of
      :data:`RESUMABLE_CHANGES`). A config saved before the field existed reads as False, which
      those runs were.

    Raises:
        ConfigError: on construction, the first invalid field, e.g. ``patch_size must be a
            multiple of 64, got 100``.
    """

    out: Path
    model: str = "mbt2018-mean"
    N: int = 32
    M: int = 48
    auxt: bool = False
    remove: tuple[str, ...] = ()
    wavelet: str = "haar"
    g_a_placement: str = "after_resample"
    g_s_placement: str = "stage_end"
    lmbda: float = 0.0130
    ortho_weight: float = 0.1
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    data: str = "builtin"
    patch_size: int = 64
    test_size: int | None = None
    eval_every: int = 100
    eval_schedule: str = "fixed"
    capture_every: int = 100
    log_every: int = 10
    probe_count: int = 32
    probe_size: int = 256
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    cache: bool = False
    small_images: str = "skip"
    lr_schedule: str = "constant"
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    lr_patience: int = 10
    precision: str = "fp32"
    freeze: tuple[str, ...] = ()
    scaling_init: str = "release"
    projection_init: str = "default"
    deterministic: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        unknown = sorted(set(self.remove) - set(COMPONENTS))
        if isinstance(self.remove, str) or unknown:
            raise ConfigError("remove", f"must name AuxT components, got {unknown or self.remove!r}; "
                                        f"valid names are: {', '.join(COMPONENTS)}")
        object.__setattr__(self, "remove", tuple(c for c in COMPONENTS if c in self.remove))
        for name, minimum in (("N", 1), ("M", 1), ("steps", 1), ("batch_size", 1), ("eval_every", 1),
                              ("capture_every", 0), ("log_every", 1), ("probe_count", 1),
                              ("seed", 0), ("patch_size", PATCH_MULTIPLE),
                              ("probe_size", PATCH_MULTIPLE)):
            _check_int(name, getattr(self, name), minimum)
        if self.test_size is not None:
            _check_int("test_size", self.test_size, 1)
        for name in ("patch_size", "probe_size"):
            if getattr(self, name) % PATCH_MULTIPLE:
                raise ConfigError(name, f"must be a multiple of {PATCH_MULTIPLE}, got "
                                        f"{getattr(self, name)}")
        for name, positive in (("lmbda", True), ("lr", True), ("ortho_weight", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                    value) or value < 0 or (positive and value == 0):
                raise ConfigError(name, f"must be a finite number {'>' if positive else '>='} 0, "
                                        f"got {value!r}")
        for name, choices in (("model", sorted(MODELS)), ("g_a_placement", PLACEMENTS),
                              ("g_s_placement", PLACEMENTS), ("device", DEVICES)):
            if getattr(self, name) not in choices:
                raise ConfigError(name, f"must be one of {', '.join(choices)}, got "
                                        f"{getattr(self, name)!r}")
        if self.eval_schedule not in EVAL_SCHEDULES:
            raise ConfigError("eval_schedule", f"must be one of {', '.join(EVAL_SCHEDULES)}, got "
                                               f"{self.eval_schedule!r}")
        if self.remove and not self.auxt:
            raise ConfigError("remove", f"{', '.join(self.remove)} needs {{auxt}}: there is no "
                                        "AuxT to remove components from")
        if not isinstance(self.auxt, bool):
            raise ConfigError("auxt", f"must be true or false, got {self.auxt!r}")
        if not isinstance(self.deterministic, bool):
            raise ConfigError("deterministic", f"must be true or false, got {self.deterministic!r}")
        if self.deterministic and self.device == "cuda":
            raise ConfigError("deterministic", "pins CPU arithmetic (threads, oneDNN and MKL code "
                                               "paths); it is not available with {device} cuda")
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError("data", f"must be 'builtin' or a folder, got {self.data!r}")
        self._check_wavelet()
        self._check_scale()
        self._check_component_options()

    def _check_scale(self) -> None:
        from energylab.data import SMALL_IMAGES

        if self.workers is not None:
            _check_int("workers", self.workers, 0)
        if not isinstance(self.cache, bool):
            raise ConfigError("cache", f"must be true or false, got {self.cache!r}")
        for name, choices in (("small_images", SMALL_IMAGES), ("lr_schedule", LR_SCHEDULES),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError(name, f"must be one of {', '.join(choices)}, got "
                                        f"{getattr(self, name)!r}")
        if isinstance(self.lr_milestones, str):
            raise ConfigError("lr_milestones", f"must be training steps, got {self.lr_milestones!r}")
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))
        for m in self.lr_milestones:
            _check_int("lr_milestones", m, 1)
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)):
            raise ConfigError("lr_milestones", f"must be increasing, got {list(self.lr_milestones)}")
        if (self.lr_schedule == "multistep") != bool(self.lr_milestones):
            raise ConfigError("lr_milestones", "must be given with {lr_schedule} multistep, and only "
                                               f"then (got {list(self.lr_milestones)} with "
                                               f"{self.lr_schedule})")
        gamma = self.lr_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0 < gamma < 1:
            raise ConfigError("lr_gamma", f"must be a number in (0, 1), got {gamma!r}")
        _check_int("lr_patience", self.lr_patience, 0)

    def _check_component_options(self) -> None:
        unknown = sorted(set(self.freeze) - set(FREEZABLE))
        if isinstance(self.freeze, str) or unknown:
            raise ConfigError("freeze", f"must name freezable AuxT components, got "
                                        f"{unknown or self.freeze!r}; "
                                        f"valid names are: {', '.join(FREEZABLE)}")
        object.__setattr__(self, "freeze", tuple(c for c in FREEZABLE if c in self.freeze))
        for name, choices in (("scaling_init", SCALING_INITS), ("projection_init", PROJECTION_INITS)):
            if getattr(self, name) not in choices:
                raise ConfigError(name, f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not self.auxt and (self.freeze or self.scaling_init != "release"
                              or self.projection_init != "default"):
            raise ConfigError("freeze" if self.freeze else "scaling_init" if self.scaling_init != "release"
                              else "projection_init", "needs {auxt}: there is no AuxT to freeze or "
                                                      "re-initialise")
        try:
            _, _, projection_init = check_options(self.remove, self.freeze, self.scaling_init,
                                                  self.projection_init)
        except ValueError as exc:
            raise ConfigError("freeze", f"does not fit the other AuxT options: {exc}") from None
        object.__setattr__(self, "projection_init", projection_init)

    def _check_wavelet(self) -> None:
        from energylab.wavelets import DWT2

        try:
            DWT2(self.wavelet)
        except ValueError as exc:
            raise ConfigError("wavelet", f"is not usable: {exc}") from None

    def evaluates_at(self, step: int) -> bool:
        """Whether the run evaluates (and writes a checkpoint) after ``step`` completed steps: step 0,
        the last step, every ``eval_every`` steps and, with ``eval_schedule`` ``"dense-early"``,
        every ``eval_every // 4`` steps (at least 1) up to step ``5 * eval_every``."""
        if step == self.steps or step % self.eval_every == 0:
            return True
        dense = max(1, self.eval_every // DENSE_EARLY_DIVISOR)
        return (self.eval_schedule == "dense-early" and step <= DENSE_EARLY_SPAN * self.eval_every
                and step % dense == 0)

    def evaluation_steps(self) -> list[int]:
        """Every step :meth:`evaluates_at`, from 0 to ``steps``."""
        return [t for t in range(self.steps + 1) if self.evaluates_at(t)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (``out`` a string, ``remove`` and ``freeze`` lists)."""
        out = asdict(self)
        out["out"] = str(self.out)
        out["remove"] = list(self.remove)
        out["lr_milestones"] = list(self.lr_milestones)
        out["freeze"] = list(self.freeze)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: Path | str | None = None) -> TrainConfig:
        """The config of :meth:`to_dict`'s dict; ``source`` (the file it came from) is named in
        errors. :data:`LEGACY_KEYS` (command-line flags that runs of energylab 0.1 saved with their
        settings) are dropped.

        Raises:
            ConfigError: a key that is not a field (or a missing ``out``), or an invalid value.
        """
        where = f" in {source}" if source is not None else ""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k not in LEGACY_KEYS}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(unknown[0], f"is not a training setting{where} (unknown key; known: "
                                          f"{', '.join(sorted(names))})")
        if "out" not in values:
            raise ConfigError("out", f"is missing{where}")
        try:
            return cls(**values)
        except ConfigError as exc:
            if source is None:
                raise
            raise ConfigError(exc.field, f"{exc.problem} ({source})") from None

    def changed_from(self, saved: TrainConfig) -> list[str]:
        """Fields other than :data:`RESUMABLE_CHANGES` in which this config differs from ``saved``
        (in field order)."""
        return [f.name for f in fields(self) if f.name not in RESUMABLE_CHANGES
                and getattr(self, f.name) != getattr(saved, f.name)]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")

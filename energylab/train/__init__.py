"""Train a CompressAI model, with or without AuxT, capturing latent energy statistics.

``python -m energylab.train --out RUN_DIR [flags]`` (``--help`` lists them). Multi-GPU:
``torchrun --nproc_per_node=K -m energylab.train ...`` (DistributedDataParallel: nccl on GPUs,
gloo on the CPU; statistics are all-reduced; only rank 0 writes). The library API is
``train(TrainConfig(...))``; the run directory's files are described in :mod:`energylab.rundir`.

Loss (Li et al., ICLR 2025, official release): ``λ·255²·MSE + bpp + ortho_weight · ortho_loss``,
with CompressAI's ``RateDistortionLoss`` for the first two terms; Adam on the model, a separate Adam
(lr 1e-3) on the entropy bottleneck's quantiles (``aux_loss``), gradient clipping at max norm 1.0.

Order of a run, with ``t`` the number of completed training steps: at ``t = 0`` and every
``capture_every`` steps (and at the end) capture; evaluate at the steps of the evaluation schedule
(:meth:`energylab.config.TrainConfig.evaluates_at`: ``t = 0``, every ``eval_every`` steps, the end
and, with ``eval_schedule`` ``dense-early``, every ``eval_every // 4`` steps up to ``5 ·
eval_every``); a checkpoint is written atomically after every evaluation. ``resume`` restarts from
the run's checkpoint and drops anything the run directory holds beyond it, so on the CPU a resumed
run writes the same numbers as an uninterrupted one. One process at a time trains in a run
directory (:class:`energylab.rundir.RunLock`).

Divergence: every step adds "is the loss, the quantiles' aux loss or the gradient norm non-finite"
to a flag kept on the device (no host sync per step); the flag, and whether every parameter is
finite, is read once at each boundary -- a logging step, a capture, an evaluation -- before
anything of the steps since the last boundary is written, so no record, capture or checkpoint of
a diverged model is written and the last good checkpoint stays.

fp16: a step whose scaled gradients overflow is skipped by the gradient scaler (weights unchanged,
scale halved). It counts toward ``steps`` (every step draws its batch, so a resumed run stays
exact) but not toward the learning-rate schedule, which steps on applied optimizer steps only;
``metrics.jsonl`` and the console count the skipped steps.

Deterministic mode (``TrainConfig.deterministic``, ``--deterministic``; :func:`deterministic_cpu`):
unpinned CPU runs of one seed differ in the last bits from step 1 on wherever the intra-op thread
count differs (oneDNN splits the weight-gradient reductions by thread; with one thread ATen sends
1x1 convolutions to MKL's GEMM instead of oneDNN) or the CPU's instruction set does (the AVX-512 and
AVX2 code paths of oneDNN's convolutions, of MKL and of ATen's own kernels round differently); Adam's
update absorbs most of it for tens of steps, then the runs drift apart. The mode pins the thread
count and the three code paths (ATen's from the environment the process started with).

Paired noise: CompressAI draws the training quantisation noise (``uniform_(-0.5, 0.5)`` in the
entropy models' ``forward``) from the global RNG. Each training forward runs in a forked RNG seeded
with :func:`noise_seed` ``(seed, step, rank)``, so every variant of a seed sees the same noise at the
same step whatever its model's construction drew, and the RNG outside the forward is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from compressai.losses import RateDistortionLoss
from torch import Tensor, nn

from energylab import split
from energylab.auxt import ortho_loss
from energylab.capture import LatentProbe
from energylab.checkpoints import load_weights
from energylab.config import ConfigError, TrainConfig
from energylab.data import (
    BUILTIN_TEST,
    PROBE_MIN_POSITIONS,
    PROBE_MIN_REGIONS,
    DataError,
    DataIndex,
    TrainStream,
    builtin_images,
    crop_to,
    index_folder,
    load_dataset,
    load_image,
    probe_regions,
    probe_set,
    test_batches,
)
from energylab.errors import TrainingError
from energylab.models import build_model, unwrap_model
from energylab.precision import MixedPrecision
from energylab.rundir import RunDir
from energylab.stats import psnr

__all__ = ["DETERMINISTIC_ENV", "DETERMINISTIC_THREADS", "TrainingError", "compute_environment",
           "restart_deterministic",
           "deterministic_cpu", "noise_seed", "onednn_kernel", "open_data", "test_images", "train"]

AUX_LR = 1e-3
CLIP_MAX_NORM = 1.0
KLT_BATCHES = 16
"""Training batches the KLT projection (``projection_init="klt"``) is computed on, before training."""

DETERMINISTIC_THREADS = 1
"""Intra-op threads of a deterministic run (:func:`deterministic_cpu`): one, so a run gives the same
numbers on every machine whatever its core count, and several runs share a machine without
oversubscribing it."""
DETERMINISTIC_ATEN_CAPABILITY = "AVX2"
"""ATen's kernels in a deterministic run (``torch.backends.cpu.get_cpu_capability()``): ATen picks
them once, at its first operation, from ``ATEN_CPU_CAPABILITY`` (else the CPU's best: AVX512 where
there is AVX-512), so on an AVX-512 CPU Python must start with ``ATEN_CPU_CAPABILITY=avx2``; its
AVX2 and AVX512 kernels round differently (the entropy bottleneck's parameters differ within a few
steps)."""
DETERMINISTIC_ONEDNN_ISA = "AVX2"
"""``ONEDNN_MAX_CPU_ISA`` of a deterministic run: oneDNN's AVX2 kernels run on every x86-64 CPU of the
last decade, AVX-512 ones only on some, and the two round differently."""
DETERMINISTIC_MKL_CBWR = "AVX2,STRICT"
"""MKL's conditional-numerical-reproducibility mode of a deterministic run: the AVX2 branch whatever
the CPU, results independent of memory alignment."""
DETERMINISTIC_ENV = {"ATEN_CPU_CAPABILITY": DETERMINISTIC_ATEN_CAPABILITY.lower(),
                     "ONEDNN_MAX_CPU_ISA": DETERMINISTIC_ONEDNN_ISA, "MKL_CBWR": DETERMINISTIC_MKL_CBWR}
"""The environment a deterministic run's process starts with, e.g. ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2,STRICT python -m energylab.train --deterministic ...``; the
first is needed on an AVX-512 CPU (:func:`deterministic_cpu`)."""
_MKL_CBWR_AVX2, _MKL_CBWR_STRICT = 10, 0x10000  # mkl_service.h: MKL_CBWR_AVX2, MKL_CBWR_STRICT


def restart_deterministic(module: str, argv: Sequence[str]) -> None:
    """Start ``python -m module argv`` afresh with :data:`DETERMINISTIC_ENV` added to the
    environment (``os.execv``: this process is replaced) unless it already has it, so that
    ``--deterministic`` needs no environment prefix; a command's ``main`` calls it before anything
    else runs. Returns only when the environment is already right.

    Raises:
        OSError: the interpreter could not be started again.
    """
    if all(os.environ.get(k) == v for k, v in DETERMINISTIC_ENV.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ.update(DETERMINISTIC_ENV)
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_device(device: str) -> tuple[torch.device, Dist]:
    """The device and the process group (``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).

    Raises:
        ConfigError: ``device == "cuda"`` without a CUDA device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "is cuda, but no CUDA device is available")
    d = Dist()
    if world > 1:
        d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank), d
    return torch.device("cpu"), d


def onednn_kernel() -> str:
    """The implementation oneDNN runs for a small float32 convolution in this process (e.g.
    ``jit:avx2``, ``jit:avx512_core``), read from oneDNN's verbose output on file descriptor 1; ""
    when oneDNN reported none (no oneDNN, ``torch.backends.mkldnn`` disabled, output unreadable).

    The first convolution of a process fixes oneDNN's instruction set for the rest of it (from
    ``ONEDNN_MAX_CPU_ISA`` at that moment, else the CPU's best); this one does too if it is the first.
    """
    try:
        libc = ctypes.CDLL(None)
        flush = libc.fflush
    except (OSError, TypeError, AttributeError):  # no C library handle (Windows): nothing to flush
        flush = None
    sys.stdout.flush()
    text = ""
    with tempfile.TemporaryFile() as capture:
        if flush is not None:
            flush(None)
        saved = os.dup(1)
        os.dup2(capture.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                # batch 2, 3x3: ATen hands it to oneDNN whatever the thread count
                torch.nn.functional.conv2d(torch.ones(2, 16, 8, 8), torch.ones(16, 16, 3, 3))
            if flush is not None:
                flush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
    for line in text.splitlines():
        fields = line.split(",")
        if "exec" in fields and "convolution" in fields[:-1]:
            return fields[fields.index("convolution") + 1]
    return ""


def _pin_mkl() -> str:
    """Put MKL in :data:`DETERMINISTIC_MKL_CBWR` mode; returns what it runs: the mode, ``"absent"``
    (torch without MKL: nothing to pin) or ``"unverified"`` (``MKL_CBWR`` set for MKL's start-up but
    no ``mkl_cbwr`` entry point to call or check).

    Raises:
        ConfigError: MKL already started in another mode in this process.
    """
    if not torch.backends.mkl.is_available():
        return "absent"
    os.environ["MKL_CBWR"] = DETERMINISTIC_MKL_CBWR  # read when MKL starts, if it has not yet
    try:  # torch links MKL statically; its service entry points are exported under these names
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        cbwr_set = lib.mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return "unverified"
    cbwr_set.argtypes, cbwr_set.restype = [ctypes.c_int], ctypes.c_int
    status = cbwr_set(_MKL_CBWR_AVX2 | _MKL_CBWR_STRICT)
    if status != 0:  # -8: MKL_CBWR_ERR_MODE_CHANGE_FAILURE, MKL already runs in another mode
        raise ConfigError("deterministic", f"cannot pin MKL to its AVX2 branch (mkl_cbwr_set returned "
                                           f"{status}): MKL already ran in this process; train in a "
                                           f"new process, or start it with MKL_CBWR={DETERMINISTIC_MKL_CBWR}")
    return DETERMINISTIC_MKL_CBWR


@contextlib.contextmanager
def deterministic_cpu(config: TrainConfig):
    """Around a run: with ``config.deterministic``, check that ATen runs its
    :data:`DETERMINISTIC_ATEN_CAPABILITY` kernels, pin torch's intra-op threads to
    :data:`DETERMINISTIC_THREADS`, oneDNN to :data:`DETERMINISTIC_ONEDNN_ISA` kernels and MKL to
    :data:`DETERMINISTIC_MKL_CBWR`, and switch on ``torch.use_deterministic_algorithms``; yields the
    pins found running (``{"threads", "aten", "onednn", "mkl"}``; None without ``deterministic``).
    Threads, the deterministic-algorithms switch and the environment are restored afterwards;
    ATen's, oneDNN's and MKL's code paths stay as they are for the rest of the process (each
    library fixes its own when it starts).

    ATen's kernels cannot be chosen once Python has run a torch operation: on an AVX-512 CPU the
    process must start with ``ATEN_CPU_CAPABILITY=avx2`` (:data:`DETERMINISTIC_ENV` holds all three
    variables; oneDNN's and MKL's are set here if those libraries have not started yet).

    Pinned, a run's numbers are bit-identical whatever the machine's core count or ``OMP_NUM_THREADS``
    and whether its x86-64 CPU has AVX-512 (same torch build). Not covered: other torch, oneDNN or
    MKL versions; CPUs without AVX2 and non-x86 CPUs (refused).

    Raises:
        ConfigError: a CUDA device (``device`` ``auto`` on a machine with one: choose ``cpu``);
            ATen running other than AVX2 kernels (start Python with :data:`DETERMINISTIC_ENV`);
            oneDNN or MKL already started in this process with other code paths (a convolution
            ran before the run: train in a new process, or start it with :data:`DETERMINISTIC_ENV`);
            a CPU without AVX2.
    """
    if not config.deterministic:
        yield None
        return
    if config.device == "auto" and torch.cuda.is_available():
        raise ConfigError("deterministic", "pins CPU arithmetic, but {device} auto picks the CUDA "
                                           "device here; choose {device} cpu")
    aten = torch.backends.cpu.get_cpu_capability()
    if aten != DETERMINISTIC_ATEN_CAPABILITY:
        raise ConfigError("deterministic", f"needs ATen's {DETERMINISTIC_ATEN_CAPABILITY} kernels, but "
                                           f"this process runs its {aten} ones (ATen chooses them at "
                                           "its first operation, from ATEN_CPU_CAPABILITY): start "
                                           "Python with ATEN_CPU_CAPABILITY="
                                           f"{DETERMINISTIC_ATEN_CAPABILITY.lower()}"
                                           + ("" if aten == "AVX512" else " on a CPU with AVX2"))
    threads = torch.get_num_threads()
    algorithms = torch.are_deterministic_algorithms_enabled()
    environ = {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    try:
        os.environ["ONEDNN_MAX_CPU_ISA"] = DETERMINISTIC_ONEDNN_ISA  # read at oneDNN's first primitive
        torch.set_num_threads(DETERMINISTIC_THREADS)
        mkl = _pin_mkl()
        kernel = onednn_kernel()
        onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        if onednn and ("avx2" not in kernel.lower() or "avx512" in kernel.lower()):
            raise ConfigError("deterministic", f"needs oneDNN's AVX2 convolution kernels, but it runs "
                                               f"{kernel or 'kernels it does not name'}: oneDNN already "
                                               "ran in this process (train in a new process, or start "
                                               f"it with ONEDNN_MAX_CPU_ISA={DETERMINISTIC_ONEDNN_ISA}) "
                                               "or this CPU has no AVX2")
        torch.use_deterministic_algorithms(True)
        yield {"threads": DETERMINISTIC_THREADS, "aten": aten, "onednn": kernel or None, "mkl": mkl}
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(algorithms)
        for key, value in environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def package_versions() -> dict[str, str | None]:
    """Installed versions of energylab and the packages its numbers depend on (None: not installed),
    recorded with every run and analysis."""
    out = {}
    for pkg in ("energylab", "torch", "compressai", "numpy", "torchmetrics", "PyWavelets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def compute_environment() -> dict:
    """What the numbers of a CPU run depend on beyond :func:`package_versions`: ``torch`` (the
    build, e.g. ``2.14.1+cu130``), ``threads`` (intra-op), ``cpu_capability`` (ATen's kernels) and
    ``machine`` (``platform.machine()``); a deterministic run adds its pins (``deterministic``)."""
    return {"torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}


def _git_revision() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable model parameters and the entropy bottleneck's quantiles (CompressAI's convention);
    frozen parameters (``requires_grad`` off) in neither."""
    main, quantiles = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (quantiles if name.endswith(".quantiles") else main).append(param)
    return main, quantiles


def noise_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the quantisation noise of training step ``step`` (from 1) on process ``rank``
    of a run seeded ``seed``: a 63-bit integer from ``numpy.random.SeedSequence``."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]) >> 1


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Restore :func:`_rng_state`'s states; they must be CPU byte tensors (load the checkpoint
    with ``map_location="cpu"``: a state mapped to a GPU is refused by ``torch.set_rng_state``)."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


class Watch:
    """The divergence check of :func:`train_step`, kept on the training device.

    :meth:`update` records, without a host sync, the first step whose loss, aux loss or gradient
    norm is not finite (``first``, 0: none) and those three values at that step; :func:`check_finite`
    reads it (with the parameters' finiteness) once per boundary. ``checked``: the last step read.
    """

    def __init__(self, device: torch.device) -> None:
        self.first = torch.zeros((), dtype=torch.int64, device=device)
        self.values = torch.zeros(3, device=device)
        self.checked = 0

    def update(self, step: int, loss: Tensor, aux_loss: Tensor, grad_norm: Tensor | None) -> None:
        norm = torch.zeros_like(loss) if grad_norm is None else grad_norm
        values = torch.stack([loss.detach().float(), aux_loss.detach().float(), norm.detach().float()])
        new = (self.first == 0) & ~torch.isfinite(values).all()
        self.first = torch.where(new, step, self.first)
        self.values = torch.where(new, values, self.values)


class StepCount:
    """Optimizer steps applied (a step post-hook: fp16's scaler does not call a skipped step)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.applied = 0
        optimizer.register_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        self.applied += 1


@dataclass
class Session:
    """Everything one training run holds: what :func:`setup` builds and the loop advances.

    ``model`` is what the loop calls (wrapped in DDP with several processes), ``net`` the model
    itself; ``meta`` the run directory's config besides ``args``; ``start`` the step to continue
    from and ``wall_offset`` the training seconds spent before it; ``data_files`` the data folder's
    images (:func:`data_files`; None for the built-in set); ``watch`` the divergence check;
    ``skipped_total`` / ``skipped_logged`` the steps fp16's scaler skipped, in all and up to the
    last record; ``checkpointed`` the step of the last checkpoint written (None: none yet).
    """

    config: TrainConfig
    run: RunDir
    device: torch.device
    d: Dist
    test: list[tuple[str, Tensor]]
    model: nn.Module
    net: nn.Module
    main_params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    aux_optimizer: torch.optim.Optimizer
    criterion: RateDistortionLoss
    stream: TrainStream
    probe: Tensor
    meta: dict
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None
    precision: MixedPrecision
    start: int = 0
    wall_offset: float = 0.0
    latent_probe: LatentProbe | None = None
    data_files: dict | None = None
    watch: Watch | None = None
    optimizer_steps: StepCount | None = None
    skipped_total: int = 0
    skipped_logged: int = 0
    checkpointed: int | None = None


# ---------------------------------------------------------------------------------------------
# The run, top to bottom: setup, resume, the schedule of steps, evaluations, captures, checkpoints


def train(config: TrainConfig, *, resume: bool = False, allow_data_change: bool = False) -> RunDir:
    """Run one training run into ``config.out`` (or continue it from its checkpoint with
    ``resume``); returns the run directory.

    The run holds the directory's lock (:class:`energylab.rundir.RunLock`) from start to end.
    ``steps`` counts every training step, fp16 steps skipped by the gradient scaler included; the
    learning-rate schedule counts applied optimizer steps only (the module docstring).

    Args:
        allow_data_change: with ``resume``, go on although the data folder changed since the
            checkpoint (files added, removed, or of another byte or image size): ``config.json``
            then lists the new files and records the change under ``data_changes``.

    Raises:
        ConfigError: a setting that does not fit (a probe set smaller than the process count, no
            CUDA device), or ``resume`` with settings other than the run's (outside
            :data:`energylab.config.RESUMABLE_CHANGES`).
        DataError: bad data (from :mod:`energylab.data`), or ``resume`` on a data folder that
            changed since the checkpoint without ``allow_data_change`` (naming the files).
        RunDirError: ``config.out`` already holds a run and ``resume`` is False, ``resume``
            without a checkpoint, or another process is training in ``config.out`` (naming its
            pid).
        TrainingError: a non-finite loss, aux loss, gradient norm or parameter, found at the
            boundary after it (the step named; nothing of the steps since the last boundary is
            written, the last good checkpoint is kept).
        OSError: a file of the run directory could not be written (a full disk): naming the file
            and the cause; the file's previous version is kept.
        ValueError: ``allow_data_change`` without ``resume``.
    """
    if allow_data_change and not resume:
        raise ValueError("allow_data_change applies to a resumed run only (resume=True)")
    main_process = int(os.environ.get("RANK", "0")) == 0
    with RunDir(config.out, write=main_process).lock(), deterministic_cpu(config) as pins:
        s = setup(config)
        if pins is not None:
            s.meta["compute"]["deterministic"] = pins
        if resume:
            resume_run(s, allow_data_change=allow_data_change)
        else:
            s.run.start(s.config, s.meta)
        if s.d.world_size > 1:
            s.model = nn.parallel.DistributedDataParallel(s.net)
        s.model.train()
        if s.start == 0:
            with _naming_writes(s.run.path):
                after_step(s, 0, 0.0)
        progress = s.run.progress(s.start, config.steps)
        wall_start = time.perf_counter() - s.wall_offset
        paused = 0.0
        for index, x in s.stream.batches(s.start, config.steps):
            step = index + 1
            record = train_step(s, step, x)
            if record is not None or writes_at(config, step):
                check_finite(s, step)  # before anything of the steps since the last check is written
            wall = time.perf_counter() - wall_start - paused
            with _naming_writes(s.run.path):
                if record is not None:
                    record["wall_time"] = wall
                    s.run.log_metrics(record)
                    progress.update(record)
                tick = time.perf_counter()
                after_step(s, step, wall)
                paused += time.perf_counter() - tick
        progress.close()
        with _naming_writes(s.run.path):
            s.run.save_final({"model": s.net.state_dict(), "step": config.steps, "config": _saved(s)})
            s.run.close()
        if s.d.world_size > 1:
            dist.barrier()
        return s.run


@contextlib.contextmanager
def _naming_writes(out: Path):
    """Around the run directory's writes: an ``OSError`` that names no file (a failed write of
    TensorBoard's event writer) is raised again naming the run directory, so the one-line error
    says where."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, f"{err.strerror or err} (writing the run directory)", str(out)) from None


def writes_at(config: TrainConfig, step: int) -> bool:
    """Whether step ``step`` (from 1) is followed by a capture, an evaluation or the end of the run
    (a logging step writes its record too): a boundary where :func:`check_finite` runs."""
    return (step == config.steps or config.evaluates_at(step)
            or (config.capture_every > 0 and step % config.capture_every == 0))


def check_finite(s: Session, step: int) -> None:
    """Read the divergence check of the steps after the last boundary up to ``step`` (one host
    sync, one collective with several processes): the flag :func:`train_step` keeps on the device
    (a non-finite loss, aux loss or gradient norm) and whether every parameter is finite.

    Raises:
        TrainingError: the first step found non-finite and its value (or the non-finite
            parameter), the steps checked, and the checkpoint kept; raised before anything of those
            steps is written.
    """
    w = s.watch
    norm = nn.utils.get_total_norm(list(s.net.parameters()), error_if_nonfinite=False)
    never = torch.iinfo(torch.int64).max
    status = torch.stack([torch.where(w.first > 0, w.first, never),
                          -(~torch.isfinite(norm)).to(torch.int64)])
    if s.d.world_size > 1:  # every process stops at the same boundary
        dist.all_reduce(status, op=dist.ReduceOp.MIN)
    first, bad_parameter = status.tolist()
    if first == never and not bad_parameter:
        w.checked = step
        return
    checked = f"steps {w.checked + 1}–{step}" if w.checked + 1 < step else f"step {step}"
    if first != never:
        loss, aux, grad = w.values.tolist()
        if int(w.first) != first:
            what = "a non-finite loss or gradient on another process"
        elif not np.isfinite(loss):
            what = f"loss is {loss}"
        elif not np.isfinite(grad):
            what = f"the gradient norm is {grad}"
        else:  # computed after the step: a non-finite gradient spoils it too
            what = f"the quantiles' aux loss is {aux}"
        head = f"{what} at step {first}"
    else:
        name = next((n for n, p in s.net.named_parameters() if not torch.isfinite(p).all()), "a parameter")
        head = f"parameter {name} is not finite"
    kept = ("no checkpoint had been written" if s.checkpointed is None else
            f"the last good checkpoint ({s.run.checkpoint_path}, step {s.checkpointed}) is kept")
    raise TrainingError(f"{head} (checked for {checked}); stopped before writing anything of them: "
                        f"{kept} — lower the learning rate or λ, or check the data")


def test_images(config: TrainConfig) -> list[tuple[str, Tensor]]:
    """The test images of ``config.data``, decoded into memory (only they: a folder is indexed,
    not loaded): ``(name, (3, H, W) float32)`` pairs.

    Raises:
        DataError: a bad data source (:mod:`energylab.data`).
    """
    if config.data == "builtin":
        return builtin_images(BUILTIN_TEST)
    return index_folder(config.data).load_test()


def open_data(config: TrainConfig, index_path: Path | None = None, rank: int = 0, world_size: int = 1
              ) -> tuple[TrainStream, list[tuple[str, Tensor]], str, Iterable[tuple[str, Tensor]]]:
    """The training stream of this rank, the test images, the data's source and the training
    images for the probe set (in memory for the built-in set; decoded one by one, as
    :func:`probe_from` asks for them, for a folder).

    The built-in set is held in memory (:func:`energylab.data.load_dataset`); a folder is indexed
    (kept at ``index_path`` when given) and its crops decoded by ``config.workers`` loader
    processes (or, with ``config.cache``, from memory in this process). Either way batch ``k`` is
    ``TrainSampler(train images, patch_size, batch_size, seed).batch(k, rank, world_size)``.

    Raises:
        DataError: a bad data source; training images smaller than the patch under
            ``small_images="error"`` (:class:`energylab.data.TrainStream`).
    """
    return _open_data(config, index_path, rank, world_size)[:4]


def _open_data(config: TrainConfig, index_path: Path | None, rank: int, world_size: int):
    """:func:`open_data`'s four, and the folder's :class:`DataIndex` (None for the built-in set)."""
    sizes = (config.patch_size, config.batch_size, config.seed, rank, world_size)
    if config.data == "builtin":
        dataset = load_dataset(config.data, config.patch_size)
        return (TrainStream(dataset, *sizes, workers=0), dataset.test, dataset.source, dataset.train,
                None)
    index = index_folder(config.data, index_path)
    stream = TrainStream(index, *sizes, workers=0 if config.cache else config.workers,
                         cache=config.cache, small_images=config.small_images)
    train_images = ((entry.name, load_image(entry.path)) for entry in index.train)
    return stream, index.load_test(), index.source, train_images, index


def data_files(index: DataIndex) -> dict[str, list[list]]:
    """``{"train", "test"}``: ``[name, bytes, height, width]`` of every image of a folder's index,
    in order: what a checkpoint records of its data and a resumed run compares (a file copied with
    new modification times is the same file; another byte count or image size is not)."""
    return {split: [[im.name, os.stat(im.path).st_size, im.height, im.width] for im in images]
            for split, images in (("train", index.train), ("test", index.test))}


def data_changes(old: dict, new: dict) -> dict[str, list[str]]:
    """The files ``added``, ``removed`` and ``changed`` (another byte count or image size) from
    ``old`` to ``new`` (:func:`data_files` dicts; entries of ``old`` holding the name alone are
    compared by name), each ``"<split>/<name>"``, sorted; every list empty if nothing changed."""
    def table(files: dict) -> dict[str, tuple]:
        return {f"{split}/{entry[0]}": tuple(entry[1:]) for split in ("train", "test")
                for entry in files.get(split, [])}

    before, after = table(old), table(new)
    return {"added": sorted(after.keys() - before.keys()),
            "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(k for k in before.keys() & after.keys()
                              if before[k] and after[k] and before[k] != after[k])}


def _listed(changes: dict[str, list[str]], most: int = 5) -> str:
    parts = []
    for kind, names in changes.items():
        if names:
            more = f" and {len(names) - most} more" if len(names) > most else ""
            parts.append(f"{kind}: {', '.join(names[:most])}{more}")
    return "; ".join(parts)


def probe_from(test: list[tuple[str, Tensor]], train_images: Iterable[tuple[str, Tensor]],
               count: int, size: int) -> Tensor:
    """The probe set (:func:`energylab.data.probe_set`) of the test images, then as many training
    images as it takes to give ``count`` regions of ``size`` pixels (fewer if the data has fewer).

    Raises:
        DataError: no image is at least ``size`` x ``size``.
    """
    images = list(test)
    for item in train_images:
        if len(probe_regions(images, size)) >= count:
            break
        images.append(item)
    return probe_set(images, count, size)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """The main optimizer's learning-rate scheduler (None for a constant rate)."""
    if config.lr_schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.lr_milestones),
                                                    gamma=config.lr_gamma)
    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=config.lr_gamma,
                                                          patience=config.lr_patience)
    return None


def setup(config: TrainConfig) -> Session:
    """Device and process group, data, the model (built right after ``torch.manual_seed(seed)``,
    so one seed gives one main-transform initialisation), optimizers, scheduler, precision,
    training stream and probe set."""
    device, d = _setup_device(config.device)
    run = RunDir(config.out, write=d.main)
    index_path = run.data_index_path if d.main and config.data != "builtin" else None
    stream, test, source, train_images, index = _open_data(config, index_path, d.rank, d.world_size)
    precision = MixedPrecision(config.precision, device)
    klt_data = None
    if config.projection_init == "klt":  # the first KLT_BATCHES batches of the data order (DDP
        # broadcasts rank 0's initialisation)
        klt_data = torch.cat([stream.batch(i) for i in range(KLT_BATCHES)]).to(device)
    elif config.projection_init in split.SPLIT_INITS:  # split.fit_batches, kept on the CPU
        batches = split.fit_batches(config.batch_size, config.patch_size)
        klt_data = torch.cat([stream.batch(i) for i in batches])
    torch.manual_seed(config.seed)
    net = build_model(
        config.model, N=config.N, M=config.M, auxt=config.auxt, remove=config.remove,
        wavelet=config.wavelet, g_a_placement=config.g_a_placement,
        g_s_placement=config.g_s_placement, freeze=config.freeze, scaling_init=config.scaling_init,
        projection_init=config.projection_init, klt_data=klt_data, split_seed=config.seed,
    ).to(device)
    precision.attach(net)
    main_params, quantiles = _split_parameters(net)
    list(test_batches(test, config.test_size))  # a too-small test image fails now, not later
    probe = probe_from(test, train_images, config.probe_count, config.probe_size).to(device)
    positions = len(probe) * (config.probe_size // 16) ** 2
    if d.main and (positions < PROBE_MIN_POSITIONS or len(probe) < PROBE_MIN_REGIONS):
        warnings.warn(f"the probe set gives {positions} positions of y from {len(probe)} regions (wanted "
                      f">= {PROBE_MIN_POSITIONS} from >= {PROBE_MIN_REGIONS}): its statistics are poorly "
                      "determined; raise probe_count or probe_size", stacklevel=3)
    if len(probe) < d.world_size:
        raise ConfigError("probe_count", f"gives {len(probe)} probe crops, fewer than the "
                                         f"{d.world_size} processes: each captures its share")
    meta = {
        "versions": package_versions(),
        "device": str(device),
        "world_size": d.world_size,
        "git_revision": _git_revision(),
        "compute": compute_environment(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data": {"source": source, "train": stream.names, "test": [n for n, _ in test],
                 "dropped": list(stream.dropped)},
    }
    if config.projection_init in split.SPLIT_INITS:  # step-0 manipulation checks, held-out crops
        batches = split.check_batches(config.batch_size, config.patch_size)
        held_out = torch.cat([stream.batch(i) for i in batches])
        meta["split_checks"] = split.manipulation_checks(unwrap_model(net), held_out)
    optimizer = torch.optim.Adam(main_params, lr=config.lr)
    return Session(
        config=config, run=run, device=device, d=d, test=test,
        model=net, net=net, main_params=main_params, optimizer=optimizer,
        aux_optimizer=torch.optim.Adam(quantiles, lr=AUX_LR),
        criterion=RateDistortionLoss(lmbda=config.lmbda), stream=stream, probe=probe, meta=meta,
        scheduler=_scheduler(config, optimizer), precision=precision,
        data_files=None if index is None else data_files(index), watch=Watch(device),
        optimizer_steps=StepCount(optimizer),
    )


def resume_run(s: Session, *, allow_data_change: bool = False) -> None:
    """Load the run's checkpoint into ``s``: model, optimizers, RNG state, step, skipped-step
    counts and training time; the run directory drops whatever was written after the checkpoint.

    The checkpoint is read on the CPU whatever the training device: ``load_state_dict`` copies the
    weights and the optimizers' states to their parameters' device, and the RNG states must stay
    CPU byte tensors. The data (:func:`data_files`; for a checkpoint without them, the file names
    of ``config.json``'s ``data``) is compared with the checkpoint's before anything is written.

    Raises:
        RunDirError: no checkpoint. ConfigError: a setting other than the saved one.
        DataError: the data folder changed since the checkpoint (the files added, removed and
            changed named), unless ``allow_data_change``: then the new files are listed in
            ``config.json`` and the change is appended to its ``data_changes``, with a warning.
    """
    ckpt = s.run.load_checkpoint("cpu")
    saved = TrainConfig.from_dict(ckpt["config"]["args"], source=s.run.checkpoint_path)
    changed = s.config.changed_from(saved)
    if changed:
        k = changed[0]
        raise ConfigError(k, f"was {getattr(saved, k)!r} in the run being resumed ({s.run.path}), "
                             f"not {getattr(s.config, k)!r}; resume with the same settings or "
                             "choose another run directory")
    current = s.meta["data"]
    old_data = ckpt["config"].get("data") or {}
    if ckpt.get("data_files") is not None and s.data_files is not None:
        changes = data_changes(ckpt["data_files"], s.data_files)
    elif isinstance(old_data.get("train"), list) and isinstance(old_data.get("test"), list):
        # a checkpoint written before data_files were recorded: the file names only
        changes = data_changes({k: [[n] for n in old_data[k]] for k in ("train", "test")},
                               {k: [[n] for n in current[k]] for k in ("train", "test")})
    else:  # nothing recorded to compare with
        changes = {}
    listed = _listed(changes)
    if listed and not allow_data_change:
        raise DataError(f"{current['source']}: the data changed since the checkpoint at step "
                        f"{ckpt['step']} ({s.run.checkpoint_path}) — {listed}; the run would go on "
                        "with other images than it trained on: restore the folder, or resume with "
                        "--allow-data-change (allow_data_change=True) to go on with them, recorded "
                        "in config.json")
    s.meta = {k: v for k, v in ckpt["config"].items() if k != "args"}
    if listed:
        s.meta["data"] = current
        s.meta["data_changes"] = [*s.meta.get("data_changes", []), {"step": ckpt["step"], **changes}]
        if s.d.main:
            warnings.warn(f"{current['source']}: going on with the changed data ({listed}); recorded "
                          f"in {s.run.path / RunDir.CONFIG}", stacklevel=3)
    s.run.write_config(s.config, s.meta)
    load_weights(s.net, ckpt, s.run.checkpoint_path)  # any layout energylab.checkpoints reads
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
    if s.scheduler is not None:
        s.scheduler.load_state_dict(ckpt["scheduler"])
    s.precision.load_state_dict(ckpt.get("scaler"))
    _set_rng_state(ckpt["rng"])
    s.start, s.wall_offset = ckpt["step"], ckpt.get("wall_time", 0.0)
    skipped = ckpt.get("skipped") or {}
    s.skipped_total, s.skipped_logged = skipped.get("total", 0), skipped.get("logged", 0)
    s.checkpointed = s.watch.checked = s.start
    s.run.resume(s.start)


def train_step(s: Session, step: int, x: Tensor) -> dict | None:
    """One optimisation step (``step`` counts from 1) on the batch ``x``: R-D loss +
    ``ortho_weight`` x AuxT's orthogonality penalty with gradient clipping (the transforms under
    autocast with ``precision`` bf16/fp16, fp16's loss scaled; the forward's quantisation noise
    paired across variants by :func:`noise_seed`), a multistep schedule's step if the optimizer
    step was applied (fp16's scaler skips a step whose gradients overflow: counted in
    ``s.skipped_total``), then the quantiles' ``aux_loss``. Returns the metrics record (without
    ``wall_time``; ``lr`` the rate this step used; ``skipped_steps`` since the last record and
    ``skipped_steps_total``) on logging steps, else None.

    Nothing is checked here: a non-finite loss, aux loss or gradient norm is recorded on the device
    (``s.watch``, no host sync) for :func:`check_finite` at the next boundary.
    """
    config = s.config
    x = x.to(s.device, non_blocking=True)
    with (torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []),
          s.precision.active()):
        torch.manual_seed(noise_seed(config.seed, step, s.d.rank))
        out = s.model(x)
    losses = s.criterion(out, x)
    ortho = ortho_loss(s.net)
    loss = losses["loss"] + config.ortho_weight * ortho
    s.optimizer.zero_grad(set_to_none=True)
    s.aux_optimizer.zero_grad(set_to_none=True)
    scaler = s.precision.scaler
    scaler.scale(loss).backward()
    scaler.unscale_(s.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(s.main_params, CLIP_MAX_NORM)
    logging_step = step % config.log_every == 0 or step == config.steps
    lr = s.optimizer.param_groups[0]["lr"]
    applied = s.optimizer_steps.applied
    scaler.step(s.optimizer)  # fp16: skipped (the scaler's own check) if the gradients overflowed
    scaler.update()
    if s.optimizer_steps.applied > applied:
        if isinstance(s.scheduler, torch.optim.lr_scheduler.MultiStepLR):
            s.scheduler.step()
    else:
        s.skipped_total += 1
    aux_loss = s.net.aux_loss()
    aux_loss.backward()
    s.aux_optimizer.step()
    # an overflowing fp16 gradient is the scaler's to skip, not a divergence
    s.watch.update(step, loss, aux_loss, None if scaler.is_enabled() else grad_norm)
    if not logging_step:
        return None
    mse = float(losses["mse_loss"].detach())
    record = {"step": step, "loss": float(loss.detach()), "mse": mse,
              "bpp": float(losses["bpp_loss"].detach()), "psnr": psnr(mse),
              "ortho_loss": float(ortho.detach()), "aux_loss": float(aux_loss.detach()),
              "lr": lr, "skipped_steps": s.skipped_total - s.skipped_logged,
              "skipped_steps_total": s.skipped_total}
    s.skipped_logged = s.skipped_total
    return record


def after_step(s: Session, step: int, wall: float) -> None:
    """At ``step`` completed steps, as the schedule says: capture, then evaluate (a plateau
    schedule sees the test loss) and checkpoint (after :func:`check_finite` passed for ``step``)."""
    last = step == s.config.steps
    if s.config.capture_every > 0 and (step % s.config.capture_every == 0 or last):
        lp = s.latent_probe = capture(s.net, s.probe, s.d, s.latent_probe)
        s.run.log_capture(step, lp.records(step), lp.arrays())
    if s.config.evaluates_at(step):  # the last step included
        result = evaluate(s.net, s.test, s.config, s.device)
        s.run.log_eval({"step": step, **result, "wall_time": wall})
        if isinstance(s.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and step > 0:
            s.scheduler.step(result["loss"])
        s.run.save_checkpoint({
            "model": s.net.state_dict(), "optimizer": s.optimizer.state_dict(),
            "aux_optimizer": s.aux_optimizer.state_dict(),
            "scheduler": None if s.scheduler is None else s.scheduler.state_dict(),
            "scaler": s.precision.state_dict(), "step": step, "rng": _rng_state(),
            "skipped": {"total": s.skipped_total, "logged": s.skipped_logged},
            "config": _saved(s), "data_files": s.data_files, "wall_time": wall,
        })
        s.checkpointed = step


def _saved(s: Session) -> dict:
    """The config as the run directory and the checkpoints store it."""
    return {"args": s.config.to_dict(), **s.meta}


@torch.no_grad()
def evaluate(model: nn.Module, test: list[tuple[str, Tensor]], config: TrainConfig,
             device: torch.device) -> dict:
    """Test R-D loss (CompressAI's ``RateDistortionLoss`` at ``config.lmbda``), likelihood bpp,
    MSE and PSNR (dB), averaged over the test images, on each image's unpadded area with the
    reconstruction clamped to [0, 1]."""
    model = unwrap_model(model)
    criterion = RateDistortionLoss(lmbda=config.lmbda)
    model.eval()
    totals = {"loss": 0.0, "bpp": 0.0, "mse": 0.0}
    n = 0
    for _, x, hw in test_batches(test, config.test_size):
        x = x.to(device)
        out = model(x)
        losses = criterion({"x_hat": crop_to(out["x_hat"], hw).clamp(0, 1),
                            "likelihoods": out["likelihoods"]}, crop_to(x, hw))
        totals["bpp"] += float(losses["bpp_loss"])
        totals["mse"] += float(losses["mse_loss"])
        totals["loss"] += float(losses["loss"])
        n += 1
    model.train()
    result = {k: v / n for k, v in totals.items()}
    result["psnr"] = psnr(result["mse"])
    return result


PROBE_BATCH = 8
"""Probe regions per forward pass of a capture (256 px regions: about 2 MB per channel of g_a's
first stage)."""


@torch.no_grad()
def capture(model: nn.Module, probe: Tensor, d: Dist, latent_probe: LatentProbe | None = None
            ) -> LatentProbe:
    """Run the probe set (this process's share of it) through ``model`` with hooks on, in batches
    of :data:`PROBE_BATCH` regions, without the synthesis transform (``x_hat`` is not needed);
    each layer reads as many positions as ``y`` has in the probe (at least 8192) from at least 8
    regions: every region at ``y``'s resolution, a centred window of 8 regions above it (see
    :class:`LatentProbe`'s ``enough_positions``; ``y`` is taken at stride 16, as in every registered
    model). ``latent_probe``: the probe of an earlier capture of this model, reset and reused (None:
    a new one)."""
    model = unwrap_model(model)
    model.eval()
    mine = probe[d.rank :: d.world_size]
    if latent_probe is None:
        y_positions = len(mine) * (probe.shape[2] // 16) * (probe.shape[3] // 16)
        latent_probe = LatentProbe(model, skip_synthesis=True,
                                   enough_positions=max(PROBE_MIN_POSITIONS, y_positions),
                                   enough_images=PROBE_MIN_REGIONS)
    else:
        latent_probe.reset()
    with latent_probe:
        for batch in mine.split(PROBE_BATCH):
            model(batch)
    model.train()
    return latent_probe



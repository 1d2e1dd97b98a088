"""Train a CompressAI model, with or without AuxT, capturing latent energy statistics.

``python -m energylab.train --out RUN_DIR [flags]`` (``--help`` lists them). Multi-GPU:
``torchrun --nproc_per_node=K -m energylab.train ...`` (DistributedDataParallel: nccl on GPUs,
gloo on the CPU; statistics are all-reduced; only rank 0 writes). The library API is
``train(TrainConfig(...))``; the run directory's files are described in :mod:`energylab.rundir`.

Loss (Li et al., ICLR 2025, official release): ``λ·255²·MSE + bpp + ortho_weight · ortho_loss``,
with CompressAI's ``RateDistortionLoss`` for the first two terms; Adam on the model, a separate Adam
(lr 1e-3) on the entropy bottleneck's quantiles (``aux_loss``), gradient clipping at max norm 1.0.

Order of a run, with ``t`` the number of completed training steps: at ``t = 0`` and every
``eval_every`` / ``capture_every`` steps (and at the end) capture / evaluate; a checkpoint is
written atomically after every evaluation. ``resume`` restarts from the run's checkpoint and drops
anything the run directory holds beyond it, so on the CPU a resumed run writes the same numbers as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from compressai.losses import RateDistortionLoss
from torch import Tensor, nn

from energylab import cli
from energylab.auxt import ortho_loss
from energylab.capture import LatentProbe
from energylab.config import ConfigError, TrainConfig
from energylab.data import (
    PROBE_MIN_POSITIONS,
    PROBE_MIN_REGIONS,
    Dataset,
    TrainSampler,
    crop_to,
    load_dataset,
    probe_set,
    test_batches,
)
from energylab.models import build_model, unwrap_model
from energylab.rundir import RunDir
from energylab.stats import psnr

__all__ = ["TrainingError", "build_parser", "main", "train"]

AUX_LR = 1e-3
CLIP_MAX_NORM = 1.0


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, no device); one-line message."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m energylab.train",
        description="Train a CompressAI model (optionally with AuxT) and capture latent statistics.",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    cli.add_model_arguments(p)
    cli.add_auxt_arguments(p)
    cli.add_training_arguments(p)
    cli.add_data_arguments(p)
    cli.add_device_arguments(p)
    return p


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


def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("energylab", "torch", "compressai", "numpy", "torchmetrics", "PyWavelets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git_revision() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Model parameters and the entropy bottleneck's quantiles (CompressAI's convention)."""
    main, quantiles = [], []
    for name, param in model.named_parameters():
        (quantiles if name.endswith(".quantiles") else main).append(param)
    return main, quantiles


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Session:
    """Everything one training run holds: what :func:`setup` builds and the loop advances.

    ``model`` is what the loop calls (wrapped in DDP with several processes), ``net`` the model
    itself; ``meta`` the run directory's config besides ``args``; ``start`` the step to continue
    from and ``wall_offset`` the training seconds spent before it.
    """

    config: TrainConfig
    run: RunDir
    device: torch.device
    d: Dist
    dataset: Dataset
    model: nn.Module
    net: nn.Module
    main_params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    aux_optimizer: torch.optim.Optimizer
    criterion: RateDistortionLoss
    sampler: TrainSampler
    probe: Tensor
    meta: dict
    start: int = 0
    wall_offset: float = 0.0


# ---------------------------------------------------------------------------------------------
# The run, top to bottom: setup, resume, the schedule of steps, evaluations, captures, checkpoints


def train(config: TrainConfig, *, resume: bool = False) -> RunDir:
    """Run one training run into ``config.out`` (or continue it from its checkpoint with
    ``resume``); returns the run directory.

    Raises:
        ConfigError: a setting that does not fit (a probe set smaller than the process count, no
            CUDA device), or ``resume`` with settings other than the run's (outside
            :data:`energylab.config.RESUMABLE_CHANGES`).
        DataError: bad data (from :mod:`energylab.data`).
        RunDirError: ``config.out`` already holds a run and ``resume`` is False, or ``resume``
            without a checkpoint.
        TrainingError: a non-finite loss (the last good checkpoint is kept).
    """
    s = setup(config)
    if resume:
        resume_run(s)
    else:
        s.run.start(s.config, s.meta)
    if s.d.world_size > 1:
        s.model = nn.parallel.DistributedDataParallel(s.net)
    s.model.train()
    if s.start == 0:
        after_step(s, 0, 0.0)
    progress = s.run.progress(s.start, config.steps)
    wall_start = time.perf_counter() - s.wall_offset
    paused = 0.0
    for step in range(s.start + 1, config.steps + 1):
        record = train_step(s, step)
        wall = time.perf_counter() - wall_start - paused
        if record is not None:
            record["wall_time"] = wall
            s.run.log_metrics(record)
            progress.update(record)
        tick = time.perf_counter()
        after_step(s, step, wall)
        paused += time.perf_counter() - tick
    progress.close()
    s.run.save_final({"model": s.net.state_dict(), "step": config.steps, "config": _saved(s)})
    s.run.close()
    if s.d.world_size > 1:
        dist.barrier()
    return s.run


def setup(config: TrainConfig) -> Session:
    """Device and process group, data, the model (built right after ``torch.manual_seed(seed)``,
    so one seed gives one main-transform initialisation), optimizers, sampler and probe set."""
    device, d = _setup_device(config.device)
    dataset = load_dataset(config.data, config.patch_size)
    torch.manual_seed(config.seed)
    net = build_model(
        config.model, N=config.N, M=config.M, auxt=config.auxt, remove=config.remove,
        wavelet=config.wavelet, g_a_placement=config.g_a_placement,
        g_s_placement=config.g_s_placement,
    ).to(device)
    main_params, quantiles = _split_parameters(net)
    sampler = TrainSampler([img for _, img in dataset.train], config.patch_size, config.batch_size,
                           config.seed)
    list(test_batches(dataset.test, config.test_size))  # a too-small test image fails now, not later
    probe = probe_set(dataset.test + dataset.train, config.probe_count, config.probe_size).to(device)
    positions = len(probe) * (config.probe_size // 16) ** 2
    if d.main and (positions < PROBE_MIN_POSITIONS or len(probe) < PROBE_MIN_REGIONS):
        warnings.warn(f"the probe set gives {positions} positions of y from {len(probe)} regions (wanted "
                      f">= {PROBE_MIN_POSITIONS} from >= {PROBE_MIN_REGIONS}): its statistics are poorly "
                      "determined; raise probe_count or probe_size", stacklevel=3)
    if len(probe) < d.world_size:
        raise ConfigError("probe_count", f"gives {len(probe)} probe crops, fewer than the "
                                         f"{d.world_size} processes: each captures its share")
    meta = {
        "versions": _versions(),
        "device": str(device),
        "world_size": d.world_size,
        "git_revision": _git_revision(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data": {"source": dataset.source, "train": [n for n, _ in dataset.train],
                 "test": [n for n, _ in dataset.test]},
    }
    return Session(
        config=config, run=RunDir(config.out, write=d.main), device=device, d=d, dataset=dataset,
        model=net, net=net, main_params=main_params,
        optimizer=torch.optim.Adam(main_params, lr=config.lr),
        aux_optimizer=torch.optim.Adam(quantiles, lr=AUX_LR),
        criterion=RateDistortionLoss(lmbda=config.lmbda), sampler=sampler, probe=probe, meta=meta,
    )


def resume_run(s: Session) -> None:
    """Load the run's checkpoint into ``s``: model, optimizers, RNG state, step and training time;
    the run directory drops whatever was written after the checkpoint.

    Raises:
        RunDirError: no checkpoint. ConfigError: a setting other than the saved one.
    """
    ckpt = s.run.load_checkpoint(s.device)
    saved = TrainConfig.from_dict(ckpt["config"]["args"], source=s.run.checkpoint_path)
    changed = s.config.changed_from(saved)
    if changed:
        k = changed[0]
        raise ConfigError(k, f"was {getattr(saved, k)!r} in the run being resumed ({s.run.path}), "
                             f"not {getattr(s.config, k)!r}; resume with the same settings or "
                             "choose another run directory")
    s.meta = {k: v for k, v in ckpt["config"].items() if k != "args"}
    s.run.write_config(s.config, s.meta)
    s.net.load_state_dict(ckpt["model"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
    _set_rng_state(ckpt["rng"])
    s.start, s.wall_offset = ckpt["step"], ckpt.get("wall_time", 0.0)
    s.run.resume(s.start)


def train_step(s: Session, step: int) -> dict | None:
    """One optimisation step (``step`` counts from 1): R-D loss + ``ortho_weight`` x AuxT's
    orthogonality penalty with gradient clipping, then the quantiles' ``aux_loss``. Returns the
    metrics record (without ``wall_time``) on logging steps, else None.

    Raises:
        TrainingError: a non-finite loss (checked every step on the CPU, on logging steps on a GPU,
            where the check is a host sync).
    """
    config = s.config
    x = s.sampler.batch(step - 1, s.d.rank, s.d.world_size).to(s.device, non_blocking=True)
    losses = s.criterion(s.model(x), x)
    ortho = ortho_loss(s.net)
    loss = losses["loss"] + config.ortho_weight * ortho
    s.optimizer.zero_grad(set_to_none=True)
    s.aux_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(s.main_params, CLIP_MAX_NORM)
    logging_step = step % config.log_every == 0 or step == config.steps
    if (s.device.type == "cpu" or logging_step) and not torch.isfinite(loss):
        raise TrainingError(
            f"loss is {float(loss.detach())} at step {step}; stopped, the last good checkpoint "
            f"({s.run.checkpoint_path}) is kept — lower the learning rate or λ, or check the data"
        )
    s.optimizer.step()
    aux_loss = s.net.aux_loss()
    aux_loss.backward()
    s.aux_optimizer.step()
    if not logging_step:
        return None
    mse = float(losses["mse_loss"].detach())
    return {"step": step, "loss": float(loss.detach()), "mse": mse,
            "bpp": float(losses["bpp_loss"].detach()), "psnr": psnr(mse),
            "ortho_loss": float(ortho.detach()), "aux_loss": float(aux_loss.detach()),
            "lr": s.optimizer.param_groups[0]["lr"]}


def after_step(s: Session, step: int, wall: float) -> None:
    """At ``step`` completed steps, as the schedule says: capture, then evaluate and checkpoint."""
    last = step == s.config.steps
    if s.config.capture_every > 0 and (step % s.config.capture_every == 0 or last):
        lp = capture(s.net, s.probe, s.d)
        s.run.log_capture(step, lp.records(step), lp.arrays())
    if step % s.config.eval_every == 0 or last:
        s.run.log_eval({"step": step, **evaluate(s.net, s.dataset.test, s.config, s.device),
                        "wall_time": wall})
        s.run.save_checkpoint({
            "model": s.net.state_dict(), "optimizer": s.optimizer.state_dict(),
            "aux_optimizer": s.aux_optimizer.state_dict(), "step": step, "rng": _rng_state(),
            "config": _saved(s), "wall_time": wall,
        })


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
def capture(model: nn.Module, probe: Tensor, d: Dist) -> LatentProbe:
    """Run the probe set (this process's share of it) through ``model`` with hooks on, in batches
    of :data:`PROBE_BATCH` regions, without the synthesis transform (``x_hat`` is not needed);
    each layer reads enough regions for 8192 positions from at least 8 regions (all of them for
    ``y``'s resolution; see :class:`LatentProbe`'s ``enough_positions``)."""
    model = unwrap_model(model)
    model.eval()
    latent_probe = LatentProbe(model, skip_synthesis=True, enough_positions=PROBE_MIN_POSITIONS,
                               enough_images=PROBE_MIN_REGIONS)
    mine = probe[d.rank :: d.world_size]
    with latent_probe:
        for batch in mine.split(PROBE_BATCH):
            model(batch)
    model.train()
    return latent_probe


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m energylab.train``; returns the exit status (:func:`energylab.cli.run_command`)."""
    args = build_parser().parse_args(argv)
    try:
        return cli.run_command(lambda: train(cli.config_from_args(args), resume=args.resume))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())

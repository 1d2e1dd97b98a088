"""Train a CompressAI model, with or without AuxT, capturing latent energy statistics.

``python -m energylab.train --out RUN_DIR [flags]`` (``--help`` lists them). Multi-GPU:
``torchrun --nproc_per_node=K -m energylab.train ...`` (DistributedDataParallel: nccl on GPUs,
gloo on the CPU; statistics are all-reduced; only rank 0 writes). The run directory's files are
described in ``data/README.md``.

Loss (Li et al., ICLR 2025, official release): ``λ·255²·MSE + bpp + ortho_weight · ortho_loss``,
with CompressAI's ``RateDistortionLoss`` for the first two terms; Adam on the model, a separate Adam
(lr 1e-3) on the entropy bottleneck's quantiles (``aux_loss``), gradient clipping at max norm 1.0.

Order of a run, with ``t`` the number of completed training steps: at ``t = 0`` and every
``--eval-every`` / ``--capture-every`` steps (and at the end) evaluate / capture; a checkpoint is
written atomically after every evaluation. ``--resume`` restarts from ``checkpoint.pt`` and drops
anything the files hold beyond it, so on the CPU a resumed run writes the same numbers as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
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

from energylab.auxt import COMPONENTS, ortho_loss
from energylab.capture import LatentProbe
from energylab.data import DataError, TrainSampler, crop_to, load_dataset, probe_set, test_batches
from energylab.models import MODELS, PLACEMENTS, build_model
from energylab.runlog import RunLog, atomic_save

__all__ = ["TrainingError", "build_parser", "main", "train"]

AUX_LR = 1e-3
CLIP_MAX_NORM = 1.0
RESUMABLE_CHANGES = frozenset({"steps", "device", "resume", "out", "log_every"})
"""Arguments a resumed run may change; every other one must equal the run's ``config.json``."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, nothing to resume); one-line message."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m energylab.train",
        description="Train a CompressAI model (optionally with AuxT) and capture latent statistics.",
    )
    add_training_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    return p


def _int_type(minimum: int, multiple: int = 1):
    """An argparse ``type``: an integer ``>= minimum`` and a multiple of ``multiple``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {value}")
        return value

    return parse


POSITIVE, NON_NEGATIVE = _int_type(1), _int_type(0)
PATCH = _int_type(64, 64)  # the hyperprior models downsample by 64


def add_training_arguments(p, exclude: Sequence[str] = ()) -> None:
    """Add the flags shared by ``energylab.train`` and ``energylab.ablate`` to parser or group
    ``p``, except the destinations named in ``exclude`` (which the caller defines itself)."""
    flags = [
        (("--model",), {"default": "mbt2018-mean", "choices": sorted(MODELS)}),
        (("--N",), {"type": POSITIVE, "default": 32, "help": "channels of the transforms"}),
        (("--M",), {"type": POSITIVE, "default": 48, "help": "channels of the latent y"}),
        (("--auxt",), {"action": "store_true", "help": "attach AuxT (WLS/iWLS)"}),
        (("--remove",), {"action": "append", "default": [], "metavar": "COMPONENT",
                         "help": f"remove an AuxT component (repeatable): {', '.join(COMPONENTS)}"}),
        (("--wavelet",), {"default": "haar", "help": "AuxT's wavelet basis (any pywt name)"}),
        (("--g-a-placement",), {"default": "after_resample", "choices": PLACEMENTS}),
        (("--g-s-placement",), {"default": "stage_end", "choices": PLACEMENTS}),
        (("--lmbda",), {"type": float, "default": 0.0130, "help": "λ of λ·255²·MSE + bpp"}),
        (("--ortho-weight",), {"type": float, "default": 0.1}),
        (("--steps",), {"type": POSITIVE, "default": 2000}),
        (("--batch-size",), {"type": POSITIVE, "default": 8, "help": "per process"}),
        (("--lr",), {"type": float, "default": 1e-4}),
        (("--data",), {"default": "builtin", "help": "'builtin' or an image folder"}),
        (("--patch-size",), {"type": PATCH, "default": 64, "help": "a multiple of 64"}),
        (("--test-size",), {"type": POSITIVE, "default": None,
                            "help": "centre-crop test images to this size (default: whole)"}),
        (("--eval-every",), {"type": POSITIVE, "default": 100}),
        (("--capture-every",), {"type": NON_NEGATIVE, "default": 100, "help": "0: no captures"}),
        (("--log-every",), {"type": POSITIVE, "default": 10}),
        (("--probe-count",), {"type": POSITIVE, "default": 4}),
        (("--probe-size",), {"type": PATCH, "default": 128, "help": "a multiple of 64"}),
        (("--seed",), {"type": NON_NEGATIVE, "default": 0}),
        (("--device",), {"default": "auto", "choices": ("auto", "cpu", "cuda")}),
    ]
    for names, kwargs in flags:
        if names[0].lstrip("-").replace("-", "_") not in exclude:
            p.add_argument(*names, **kwargs)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup(device_arg: str) -> tuple[torch.device, Dist]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA device is available")
    d = Dist()
    if world > 1:
        d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank), d
    return torch.device("cpu"), d


def _versions() -> dict[str, str]:
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


def _psnr(mse: float) -> float:
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def evaluate(model: nn.Module, test, args, device) -> dict:
    """Test loss, likelihood bpp, MSE and PSNR averaged over the test images (unpadded area)."""
    model.eval()
    totals = {"loss": 0.0, "bpp": 0.0, "mse": 0.0}
    n = 0
    for _, x, hw in test_batches(test, args.test_size):
        x = x.to(device)
        out = model(x)
        x_hat = crop_to(out["x_hat"], hw)
        ref = crop_to(x, hw)
        pixels = hw[0] * hw[1]
        bpp = sum(lk.log2().sum().neg() for lk in out["likelihoods"].values()) / pixels
        mse = torch.mean((x_hat.clamp(0, 1) - ref) ** 2)
        totals["bpp"] += float(bpp)
        totals["mse"] += float(mse)
        totals["loss"] += float(args.lmbda * 255**2 * mse + bpp)
        n += 1
    model.train()
    result = {k: v / n for k, v in totals.items()}
    result["psnr"] = _psnr(result["mse"])
    return result


@torch.no_grad()
def capture(model: nn.Module, probe: Tensor, d: Dist) -> LatentProbe:
    """Run the probe set (this process's share of it) through ``model`` with hooks on."""
    model.eval()
    latent_probe = LatentProbe(model)
    with latent_probe:
        for i in range(d.rank, len(probe), d.world_size):
            model(probe[i : i + 1])
    model.train()
    return latent_probe


def train(args: argparse.Namespace) -> Path:
    """Run (or resume) one training run; returns the run directory.

    Raises:
        DataError: bad data (from :mod:`energylab.data`).
        TrainingError: non-finite loss, nothing to resume, a mismatching run directory.
        ValueError: bad model options.
    """
    device, d = _setup(args.device)
    out: Path = args.out
    dataset = load_dataset(args.data, args.patch_size)
    torch.manual_seed(args.seed)  # same seed -> same main-transform initialisation
    model = build_model(
        args.model, N=args.N, M=args.M, auxt=args.auxt, remove=args.remove,
        wavelet=args.wavelet, g_a_placement=args.g_a_placement, g_s_placement=args.g_s_placement,
    ).to(device)
    main_params, quantiles = _split_parameters(model)
    optimizer = torch.optim.Adam(main_params, lr=args.lr)
    aux_optimizer = torch.optim.Adam(quantiles, lr=AUX_LR)
    criterion = RateDistortionLoss(lmbda=args.lmbda)
    sampler = TrainSampler([img for _, img in dataset.train], args.patch_size, args.batch_size,
                           args.seed)
    list(test_batches(dataset.test, args.test_size))  # a too-small test image fails now, not later
    probe = probe_set(dataset.test, args.probe_count, args.probe_size).to(device)
    samples = len(probe) * (args.probe_size // 16) ** 2
    if d.main and samples < 2 * args.M:
        warnings.warn(f"the probe set gives {samples} samples of y for {args.M} channels: its "
                      "covariance is poorly determined; raise --probe-count or --probe-size",
                      stacklevel=2)
    if len(probe) < d.world_size:
        raise TrainingError(f"--probe-count {len(probe)} is below the {d.world_size} processes: "
                            "every process captures its share of the probe set")
    config = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": _versions(),
        "device": str(device),
        "world_size": d.world_size,
        "git_revision": _git_revision(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data": {"source": dataset.source, "train": [n for n, _ in dataset.train],
                 "test": [n for n, _ in dataset.test]},
    }
    log = RunLog(out, enabled=d.main)
    start, wall_offset = 0, 0.0
    if not args.resume and any((out / f).exists() for f in ("checkpoint.pt", "final.pt")):
        raise TrainingError(f"{out} already holds a run; add --resume to continue it, or choose "
                            "another --out")
    if args.resume:
        ckpt_path = out / "checkpoint.pt"
        if not ckpt_path.exists():
            raise TrainingError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = ckpt["config"]["args"]
        changed = [k for k, v in config["args"].items()
                   if k not in RESUMABLE_CHANGES and saved.get(k) != v]
        if changed:
            k = changed[0]
            raise TrainingError(f"--resume: {out} was trained with --{k.replace('_', '-')} "
                                f"{saved.get(k)!r}, not {config['args'][k]!r}; resume with the "
                                "same settings or choose another --out")
        config = {**ckpt["config"], "args": {**saved, "steps": args.steps}}
        if d.main:
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
        _set_rng_state(ckpt["rng"])
        start, wall_offset = ckpt["step"], ckpt.get("wall_time", 0.0)
        log.truncate(start)
    else:
        log.start(config)
    if d.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    net = _unwrap(model)

    def save_checkpoint(step: int, wall: float) -> None:
        if d.main:
            atomic_save({
                "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "aux_optimizer": aux_optimizer.state_dict(), "step": step, "rng": _rng_state(),
                "config": config, "wall_time": wall,
            }, out / "checkpoint.pt")

    def checkpoints(step: int, wall: float) -> None:
        """Evaluate / capture / checkpoint at ``step`` completed steps, as the schedule says."""
        last = step == args.steps
        if args.capture_every > 0 and (step % args.capture_every == 0 or last):
            lp = capture(net, probe, d)
            log.capture(step, lp.records(step), lp.arrays())
        if step % args.eval_every == 0 or last:
            log.eval({"step": step, **evaluate(net, dataset.test, args, device),
                      "wall_time": wall})
            save_checkpoint(step, wall)

    model.train()
    if start == 0:
        checkpoints(0, 0.0)
    progress = log.progress(start, args.steps)
    wall_start = time.perf_counter() - wall_offset
    paused = 0.0
    for step in range(start + 1, args.steps + 1):
        x = sampler.batch(step - 1, d.rank, d.world_size).to(device, non_blocking=True)
        out_ = model(x)
        losses = criterion(out_, x)
        ortho = ortho_loss(net)
        loss = losses["loss"] + args.ortho_weight * ortho
        optimizer.zero_grad(set_to_none=True)
        aux_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(main_params, CLIP_MAX_NORM)
        logging_step = step % args.log_every == 0 or step == args.steps
        # a host sync per step is free on the CPU; on a GPU the check waits for logging steps
        if (device.type == "cpu" or logging_step) and not torch.isfinite(loss):
            raise TrainingError(
                f"loss is {float(loss.detach())} at step {step}; stopped, the last good checkpoint "
                f"({out / 'checkpoint.pt'}) is kept — lower --lr or --lmbda, or check the data"
            )
        optimizer.step()
        aux_loss = net.aux_loss()
        aux_loss.backward()
        aux_optimizer.step()
        wall = time.perf_counter() - wall_start - paused
        if logging_step:
            mse = float(losses["mse_loss"].detach())
            record = {
                "step": step, "loss": float(loss.detach()), "mse": mse,
                "bpp": float(losses["bpp_loss"].detach()),
                "psnr": _psnr(mse), "ortho_loss": float(ortho.detach()),
                "aux_loss": float(aux_loss.detach()),
                "lr": optimizer.param_groups[0]["lr"], "wall_time": wall,
            }
            log.metrics(record)
            progress.update(record)
        tick = time.perf_counter()
        checkpoints(step, wall)
        paused += time.perf_counter() - tick
    progress.close()
    if d.main:
        atomic_save({"model": net.state_dict(), "step": args.steps, "config": config},
                    out / "final.pt")
    log.close()
    if d.world_size > 1:
        dist.barrier()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (DataError, TrainingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, TrainingError) else 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

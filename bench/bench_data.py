"""Benchmark streaming training data: peak memory against the folder's size, and loader throughput.

::

    python bench/bench_data.py [--root /tmp/energylab-bench-data] [--draws 200] [--batches 24]
                               [--device cpu|cuda] [--threads T]

1. **Memory.** Two folders of generated 512x512 JPEGs (photograph-like: smooth gradients, edges
   and noise), of 2,000 and of 20 images, are made under ``--root`` once (reused afterwards).
   For each, a fresh child process indexes the folder and draws ``--draws`` training batches
   (8 crops of 256x256, :class:`energylab.data.TrainStream`, ``workers=0`` so that every byte is
   in the one process) and reports its peak resident memory (``resource.getrusage`` max RSS).
   Goal (issue 12): 2,000 images <= 1.2x the memory of 20.
2. **Throughput.** Crops per second that ``TrainStream.batches`` delivers from the 2,000-image
   folder with 0, 1 and 2 loader workers (steady state: the first two batches, which include
   starting the workers, are not timed), against what a training step consumes: one
   ``mbt2018-mean`` step (N=128, M=192, batch 8 of 256x256 crops, Adam, rate-distortion loss)
   on ``--device``, median of 3 after a warm-up. Loader and step are timed one after the other:
   in training the workers share the CPUs with the step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from energylab.data import TrainStream, index_folder

PATCH, BATCH, SIDE = 256, 8, 512


def photo_like(rng: np.random.Generator, side: int) -> np.ndarray:
    """A ``(side, side, 3)`` uint8 image with smooth shading, a few edges and mild noise."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    channels = []
    for _ in range(3):
        a, b, c, f = rng.uniform(-1, 1, 4)
        channels.append(0.5 + 0.3 * np.sin(2 * np.pi * (a * xx + b * yy) * (1 + 2 * abs(f)) + c))
    img = np.stack(channels, -1)
    for _ in range(4):  # rectangles: edges for the codec to spend bits on
        top, left = rng.integers(0, side, 2)
        img[top : top + side // 4, left : left + side // 4] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_folder(folder: Path, count: int) -> Path:
    """A flat folder of ``count`` generated JPEGs (kept and reused if already complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) != count:
        rng = np.random.default_rng(count)
        for i in range(count):
            Image.fromarray(photo_like(rng, SIDE)).save(folder / f"img{i:05d}.jpg", quality=90)
    return folder


def child_memory(folder: str, draws: int) -> None:
    """Child process: index ``folder``, draw ``draws`` batches, print peak RSS in MiB as JSON."""
    stream = TrainStream(index_folder(folder), PATCH, BATCH, seed=0, workers=0)
    checksum = 0.0
    for _, batch in stream.batches(0, draws):
        checksum += float(batch.mean())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_mib": peak_kib / 1024, "images": len(stream.names), "checksum": checksum}))


def peak_memory(folder: Path, draws: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child-memory", str(folder), "--draws", str(draws)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def loader_rate(folder: Path, workers: int, batches: int) -> float:
    """Steady-state crops per second of ``TrainStream.batches`` with ``workers`` workers."""
    stream = TrainStream(index_folder(folder), PATCH, BATCH, seed=1, workers=workers)
    it = stream.batches(0, batches + 2)
    next(it), next(it)
    start = time.perf_counter()
    count = sum(len(batch) for _, batch in it)
    return count / (time.perf_counter() - start)


def step_seconds(device: torch.device) -> float:
    """Median seconds of one mbt2018-mean (N=128, M=192) training step on a batch of 8 crops."""
    from compressai.losses import RateDistortionLoss

    from energylab.models import build_model

    torch.manual_seed(0)
    model = build_model("mbt2018-mean", N=128, M=192).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = RateDistortionLoss(lmbda=0.013)
    x = torch.rand(BATCH, 3, PATCH, PATCH, device=device)
    times = []
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad()
        criterion(model(x), x)["loss"].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/energylab-bench-data"))
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--batches", type=int, default=24, help="timed batches per loader setting")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_memory(args.child_memory, args.draws)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    folders = {n: make_folder(args.root / f"jpeg{n}", n) for n in (2000, 20)}
    print(f"folders ready under {args.root} ({time.perf_counter() - start:.0f} s)")

    mem = {n: peak_memory(folder, args.draws) for n, folder in folders.items()}
    for n, m in mem.items():
        print(f"peak RSS, {args.draws} batches of {BATCH}x{PATCH}^2 from {n} images: "
              f"{m['peak_mib']:.0f} MiB")
    print(f"memory ratio 2000 / 20 images: {mem[2000]['peak_mib'] / mem[20]['peak_mib']:.3f}x "
          "(goal <= 1.2x)")

    step = step_seconds(torch.device(args.device))
    need = BATCH / step
    print(f"training step mbt2018-mean N=128 M=192, batch {BATCH} of {PATCH}^2 on {args.device}: "
          f"{step * 1e3:.0f} ms -> consumes {need:.1f} crops/s")
    for workers in (0, 1, 2):
        rate = loader_rate(folders[2000], workers, args.batches)
        print(f"loader, {workers} workers: {rate:.1f} crops/s = {rate / need:.2f}x the step's need")


if __name__ == "__main__":
    main()

"""Benchmark ``ChannelStats.update`` against ``torch.cov`` and a bare float64 ``X^T X``.

All three are timed side by side in one process on the same float32 latent, round-robin, so the
ratios are comparable even when the absolute times are not (shared machines, other loads)::

    python bench/bench_stats.py [--device cpu|cuda] [--repeats 7] [--shape 16 192 64 64]
                                [--threads T]

* ``ChannelStats.update``: the whole update, from the float32 ``(B, C, H, W)`` tensor.
* ``torch.cov``: on the ``(N, C)`` matrix already materialised (float32, as given).
* ``bare float64 X^T X``: one GEMM on the ``(N, C)`` matrix already materialised in float64.

Goal (issue 3): ``ChannelStats.update`` within 1.5x of the bare float64 matmul.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from energylab.stats import ChannelStats


def median_seconds(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median wall time of each function, run round-robin so that load hits all alike.

    One warm-up round first; CUDA is synchronised around every call.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shape", type=int, nargs=4, default=(16, 192, 64, 64))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    b, c, h, w = args.shape

    y = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    x32 = y.permute(0, 2, 3, 1).reshape(-1, c).contiguous()
    x64 = x32.double()
    stats = ChannelStats(c).to(device)

    times = median_seconds(
        {
            "ChannelStats.update": lambda: stats.update(y),
            "torch.cov (N, C) float32": lambda: torch.cov(x32.T),
            "bare float64 X^T X": lambda: x64.T @ x64,
        },
        args.repeats,
        device,
    )
    base = times["bare float64 X^T X"]
    print(
        f"shape {tuple(y.shape)} float32 on {device}, N = {x32.shape[0]}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    for name, t in times.items():
        print(f"  {name:26s} {1e3 * t:9.2f} ms   {t / base:5.2f}x bare matmul")
    ratio = times["ChannelStats.update"] / base
    print(f"goal ChannelStats.update <= 1.5x bare matmul: {'met' if ratio <= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()

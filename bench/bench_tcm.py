"""Benchmark: a TCM training step against mbt2018-mean's at the same width (CPU).

Run from the repository root::

    python bench/bench_tcm.py            # --N 64 --M 320 --batch 8 --crop 128 --threads 2 --repeats 5

Both models are built by ``energylab.models.build_model`` with the same ``N`` and ``M`` (for TCM,
``N`` is each TCM-block branch's width, so its main transforms carry ``2N`` channels; mbt2018-mean's
carry ``N``), with or without AuxT (``--auxt``). One step = forward, rate-distortion loss (+ 0.1 *
``ortho_loss`` with AuxT) backward, Adam step, on one fixed batch of random crops, float32. The two are
timed side by side in this one process, in interleaved rounds after warm-up (``bench_auxt``'s timer:
medians over the rounds in which other processes used < 10 % of the CPUs when there are at least 5,
beside minima); reported with their ratio, their conv/matmul FLOP ratio and parameter counts.

The default crop is 128: TCM's attention window is 8 and ``y`` is 1/16 of the crop, so at 128 no
feature map needs padding to a window multiple (at 64, ``y`` is 4 x 4 and the SWAtten modules pad it
to 8 x 8, which inflates TCM's cost).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from bench_auxt import Contention, Trainer, interleaved, table

from energylab.models import build_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--M", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--auxt", action="store_true", help="both models with AuxT")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, torch threads "
        f"{torch.get_num_threads()}; N={args.N}, M={args.M}, batch {args.batch} of {args.crop}x{args.crop}, "
        f"AuxT {'on' if args.auxt else 'off'}; {args.repeats} rounds after {args.warmup} warm-up"
    )
    x = torch.rand(args.batch, 3, args.crop, args.crop, generator=torch.Generator().manual_seed(1))
    trainers = {}
    for name in ("mbt2018-mean", "tcm"):
        torch.manual_seed(0)
        trainers[name] = Trainer(build_model(name, N=args.N, M=args.M, auxt=args.auxt), x, args.auxt)

    t0, meter = time.perf_counter(), Contention()
    n_params = {k: sum(q.numel() for q in t.model.parameters()) for k, t in trainers.items()}
    flops = {k: t.flops() for k, t in trainers.items()}
    times = interleaved({k: t.step for k, t in trainers.items()}, args.repeats, warmup=args.warmup)
    table(times, "mbt2018-mean")
    for k in trainers:
        print(
            f"  {k:<34s} {flops[k] / 1e9:9.1f} GFLOP fwd+bwd  x{flops[k] / flops['mbt2018-mean']:6.2f}"
            f"   ({n_params[k]:,} parameters)"
        )
    ratio = times.median_ms("tcm") / times.median_ms("mbt2018-mean")
    min_ratio = times.min_ms("tcm") / times.min_ms("mbt2018-mean")
    print(f"  => TCM / mbt2018-mean step time x{ratio:.2f} (medians), x{min_ratio:.2f} (minima)")
    share = meter.share()
    print(f"total {time.perf_counter() - t0:.0f} s", end="")
    if share is not None:
        print(f"; other processes used {100 * share:.0f}% of the CPUs meanwhile", end="")
    print()


if __name__ == "__main__":
    main()

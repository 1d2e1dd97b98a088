"""Benchmark of energylab's Haar DWT and of AuxT's training-step overhead (CPU).

Run from the repository root::

    python bench/bench_auxt.py            # --repeats 25 --threads <CPUs available>

Everything is measured in this one process with a fixed number of torch threads (default: the
CPUs this process may use), after warm-up, in rounds that call every variant once (order rotated).
Reported: the median per variant and the ratio of medians, beside the minimum and the ratio of
minima. Other processes' CPU use is read from ``/proc/stat`` during each round; when at least 5
rounds are clean (others used < 10% of the CPUs) the medians are over those only, and a run on a
busy machine says that its timings are contaminated.

(a) Haar ``dwt2`` + ``idwt2`` on one ``(B, C, H, W)`` float32 tensor, against a grouped-convolution
    implementation written here (``conv2d`` with the four 2x2 Haar kernels, ``groups=C``, and
    ``conv_transpose2d`` for the inverse; checked equal to ``dwt2`` first), forward + backward; and
    against ``pywt.dwt2`` / ``pywt.idwt2`` on the same data, forward only (numpy has no backward).
(b) One training step (forward, rate-distortion loss + 0.1 * ``ortho_loss`` backward, Adam step) of
    ``mbt2018-mean`` (N=64, M=96) with AuxT at each wavelet of ``--wavelets`` (default haar, db4,
    bior2.2) over the same model without it, side by side in one run, batch 8 of 64x64 random
    crops, beside the ratio of their convolution/matmul FLOPs (``FlopCounterMode``, forward +
    backward). Goals (issue 12): Haar <= 1.30x plain, other wavelets <= 1.50x. First, per wavelet,
    the fast path is checked against the reference path of (c): same loss and gradients.
(c) The same AuxT models with their WLS/iWLS run "straightforwardly" (``dwt2`` -> permute ->
    ``* exp(s)`` -> ``Linear`` -> permute, and the mirror with ``idwt2``), i.e. without the fused
    stride-2 convolution (Haar) or the dense filter-bank matrices (other wavelets) of
    ``energylab.auxt``: what the fast paths buy.

``--profile`` adds a ``torch.profiler`` table: self CPU time per step of the ops on which the AuxT
step spends the most extra time over the plain one.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pywt
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from energylab.auxt import WLS, iWLS, ortho_loss
from energylab.models import build_model
from energylab.wavelets import dwt2, haar_kernels, idwt2

LMBDA = 0.0130  # CompressAI's usual MSE lambda for the mid rate point; irrelevant to the timing


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def machine_busy_s() -> float | None:
    """CPU-seconds all processes have spent busy since boot (``/proc/stat``), None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class Contention:
    """Share of the machine's CPUs that *other* processes used since ``reset()``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), machine_busy_s(), own_cpu_s()

    def share(self) -> float | None:
        busy = machine_busy_s()
        if busy is None or self.busy0 is None:
            return None
        others = busy - self.busy0 - (own_cpu_s() - self.own0)
        return max(0.0, others / ((time.perf_counter() - self.t0) * (os.cpu_count() or 1)))


CLEAN = 0.10
"""A round counts as clean when other processes used less than this share of the CPUs."""


@dataclass
class Timings:
    """Seconds per call, ``times[name][r]`` in round ``r``; ``cpu[name][r]``: this process's CPU
    seconds for that call (all its threads); ``shares[r]``: others' CPU share."""

    times: dict[str, list[float]]
    shares: list[float | None]
    cpu: dict[str, list[float]]

    def clean(self) -> list[int]:
        return [r for r, s in enumerate(self.shares) if s is not None and s < CLEAN]

    def median_ms(self, name: str) -> float:
        """Median over the clean rounds when there are at least 5, else over all rounds."""
        rounds = self.clean()
        ts = self.times[name]
        return 1e3 * statistics.median([ts[r] for r in rounds] if len(rounds) >= 5 else ts)

    def min_ms(self, name: str) -> float:
        return 1e3 * min(self.times[name])

    def cpu_median_ms(self, name: str) -> float:
        """Median CPU time per call: with one thread, less sensitive than wall time to being
        descheduled on a shared machine (though not to cache contention); shown only then."""
        return 1e3 * statistics.median(self.cpu[name])


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> Timings:
    """Time each function ``repeats`` times, one call of each per round (order rotated)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out = Timings({name: [] for name in names}, [], {name: [] for name in names})
    meter = Contention()
    for r in range(repeats):
        k = r % len(names)
        meter.reset()
        for name in names[k:] + names[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            out.times[name].append(time.perf_counter() - t0)
            out.cpu[name].append(time.process_time() - c0)
        out.shares.append(meter.share())
    return out


def table(t: Timings, base: str) -> None:
    """Median and minimum per variant, and their ratios to ``base``."""
    clean, n = t.clean(), len(t.shares)
    which = f"median of {len(clean)}/{n} clean rounds" if len(clean) >= 5 else f"median of {n}"
    cpu_view = torch.get_num_threads() == 1  # with more threads, OpenMP's spin-waits count as CPU
    print(
        f"  {'':<34s} {which:>28s} {'min':>9s}   ratio of medians (of mins)"
        + ("   CPU time: median, ratio" if cpu_view else "")
    )
    for name in t.times:
        m, lo = t.median_ms(name), t.min_ms(name)
        r_med, r_min = m / t.median_ms(base), lo / t.min_ms(base)
        cpu = t.cpu_median_ms(name)
        cpu_cell = f"   {cpu:11.2f} ms x{cpu / t.cpu_median_ms(base):6.3f}" if cpu_view else ""
        print(f"  {name:<34s} {m:25.2f} ms {lo:9.2f} ms   x{r_med:6.3f} (x{r_min:6.3f}){cpu_cell}")
    shares = [s for s in t.shares if s is not None]
    if shares:
        mean = statistics.fmean(shares)
        flag = ""
        if len(clean) < 5 and mean > CLEAN / 2:
            flag = "  <- machine shared, too few clean rounds: timings contaminated"
        print(f"  [other processes used {100 * mean:.0f}% of the CPUs meanwhile]{flag}")


# ---------------------------------------------------------------------------------------------
# (a) Haar DWT
# ---------------------------------------------------------------------------------------------


def conv_dwt2(x: Tensor) -> Tensor:
    """Haar DWT as a grouped conv: channel-major output, then reordered to subband-major."""
    b, c, h, w = x.shape
    k = haar_kernels(x.dtype, x.device).unsqueeze(1).repeat(c, 1, 1, 1)  # (4C, 1, 2, 2)
    y = F.conv2d(x, k, stride=2, groups=c)  # (B, 4C, h, w), channel c's 4 subbands adjacent
    return y.view(b, c, 4, h // 2, w // 2).transpose(1, 2).reshape(b, 4 * c, h // 2, w // 2)


def conv_idwt2(y: Tensor) -> Tensor:
    """Inverse of :func:`conv_dwt2`: subband-major -> channel-major, grouped conv_transpose2d."""
    b, c4, h, w = y.shape
    c = c4 // 4
    k = haar_kernels(y.dtype, y.device).unsqueeze(1).repeat(c, 1, 1, 1)
    z = y.view(b, 4, c, h, w).transpose(1, 2).reshape(b, c4, h, w)
    return F.conv_transpose2d(z, k, stride=2, groups=c)


def bench_dwt(shape: tuple[int, ...], repeats: int) -> None:
    print(f"\n(a) Haar dwt2 + idwt2 on one float32 tensor of shape {shape}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)  # upstream gradient for the backward
    xn = x.numpy()

    # Correctness first: the grouped conv and pywt give the same numbers as dwt2 / idwt2.
    y = dwt2(x)
    err_conv = (conv_dwt2(x) - y).abs().max().item()
    err_iconv = (conv_idwt2(y) - idwt2(y)).abs().max().item()
    ca, (ch, cv, cd) = pywt.dwt2(xn, "haar", mode="periodization", axes=(-2, -1))
    err_pywt = np.abs(np.concatenate((ca, ch, cv, cd), 1) - y.numpy()).max()
    err_rec = (idwt2(y) - x).abs().max().item()
    print(
        f"  check: max |conv_dwt2 - dwt2| = {err_conv:.1e}, max |conv_idwt2 - idwt2| = "
        f"{err_iconv:.1e}, max |pywt - dwt2| = {err_pywt:.1e}, max |idwt2(dwt2(x)) - x| = "
        f"{err_rec:.1e}"
    )
    assert max(err_conv, err_iconv, err_pywt, err_rec) < 1e-4, "implementations disagree"

    xg = x.clone().requires_grad_(True)

    def fwd_bwd(fwd: Callable[[Tensor], Tensor], inv: Callable[[Tensor], Tensor]):
        def run() -> None:
            xg.grad = None
            inv(fwd(xg)).backward(g)

        return run

    def fwd_only(fwd: Callable[[Tensor], Tensor], inv: Callable[[Tensor], Tensor]):
        def run() -> None:
            with torch.no_grad():
                inv(fwd(x))

        return run

    def pywt_run() -> None:
        ca, det = pywt.dwt2(xn, "haar", mode="periodization", axes=(-2, -1))
        pywt.idwt2((ca, det), "haar", mode="periodization", axes=(-2, -1))

    print("  forward + backward (idwt2(dwt2(x)).backward(g)):")
    table(
        interleaved(
            {
                "dwt2+idwt2 (butterfly)": fwd_bwd(dwt2, idwt2),
                "grouped conv2d + conv_transpose2d": fwd_bwd(conv_dwt2, conv_idwt2),
            },
            repeats,
            warmup=2,
        ),
        "dwt2+idwt2 (butterfly)",
    )
    print("  forward only (pywt is numpy: no backward):")
    table(
        interleaved(
            {
                "dwt2+idwt2 (butterfly)": fwd_only(dwt2, idwt2),
                "grouped conv2d + conv_transpose2d": fwd_only(conv_dwt2, conv_idwt2),
                "pywt.dwt2+pywt.idwt2 (numpy)": pywt_run,
            },
            repeats,
            warmup=2,
        ),
        "dwt2+idwt2 (butterfly)",
    )


# ---------------------------------------------------------------------------------------------
# (b), (c) training step
# ---------------------------------------------------------------------------------------------


class PlainWLS(WLS):
    """The unfused reference path: dwt2 -> permute -> * exp(s) -> Linear -> permute."""

    def forward(self, x: Tensor) -> Tensor:
        z = dwt2(x, self.wavelet).permute(0, 2, 3, 1)
        if self.scaling_factors is not None:
            z = z * self.scaling_factors.exp()
        return self.olp(z).permute(0, 3, 1, 2)


class PlainIWLS(iWLS):
    """The unfused reference path: permute -> Linear -> / exp(s) -> permute -> idwt2."""

    def forward(self, x: Tensor) -> Tensor:
        z = self.olp(x.permute(0, 2, 3, 1))
        if self.scaling_factors is not None:
            z = z / self.scaling_factors.exp()
        return idwt2(z.permute(0, 3, 1, 2), self.wavelet)


def unfuse(model: nn.Module) -> nn.Module:
    """Switch every WLS/iWLS of ``model`` to the unfused reference path, in place (same parameters)."""
    for m in model.modules():
        if type(m) is WLS:
            m.__class__ = PlainWLS
        elif type(m) is iWLS:
            m.__class__ = PlainIWLS
    return model


def rd_loss(out: dict, x: Tensor) -> Tensor:
    """CompressAI's RateDistortionLoss (MSE): lambda * 255^2 * MSE + bpp."""
    n, _, h, w = x.shape
    bpp = sum(torch.log(lk).sum() for lk in out["likelihoods"].values()) / (-np.log(2) * n * h * w)
    return LMBDA * 255**2 * F.mse_loss(out["x_hat"], x) + bpp


class Trainer:
    """One model, its Adam optimizer and a fixed batch; ``step()`` is one training step."""

    def __init__(self, model: nn.Module, x: Tensor, ortho: bool) -> None:
        self.model, self.x, self.ortho = model.train(), x, ortho
        params = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
        self.opt = torch.optim.Adam(params, lr=1e-4)

    def loss(self) -> Tensor:
        loss = rd_loss(self.model(self.x), self.x)
        if self.ortho:
            loss = loss + 0.1 * ortho_loss(self.model)
        return loss

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.opt.step()

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.loss().backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def make_model(auxt: bool, wavelet: str = "haar", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mbt2018-mean", N=64, M=96, auxt=auxt, wavelet=wavelet)


GOALS = {"haar": 1.30}
"""AuxT/plain step-time goal per wavelet (issue 12): Haar <= 1.30, any other wavelet <= 1.50."""


def bench_step(
    batch: int, crop: int, repeats: int, wavelets: list[str], unfused: bool, profile: bool
) -> None:
    print(
        f"\n(b) training step of mbt2018-mean (N=64, M=96): forward + R-D loss (+ 0.1 * ortho_loss "
        f"for AuxT) backward + Adam step; batch {batch} of {crop}x{crop} random crops, float32; "
        f"AuxT with wavelets {', '.join(wavelets)}"
    )
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, 2 * crop, 2 * crop, generator=gen)
    ij = torch.randint(0, crop + 1, (batch, 2), generator=gen).tolist()
    x = torch.stack(
        [im[:, i : i + crop, j : j + crop] for im, (i, j) in zip(images, ij, strict=True)]
    )

    trainers = {"plain": Trainer(make_model(False), x, ortho=False)}
    for wav in wavelets:
        trainers[f"AuxT {wav} (fast)"] = Trainer(make_model(True, wav), x, ortho=True)
    references = {wav: Trainer(unfuse(make_model(True, wav)), x, True) for wav in wavelets}
    # Same weights and noise draw, so the same loss and gradients: the paths compute one function.
    for wav in wavelets:
        fast, ref = trainers[f"AuxT {wav} (fast)"], references[wav]
        grads = []
        for t in (fast, ref):
            torch.manual_seed(2)  # the entropy models add uniform noise in training mode
            t.opt.zero_grad(set_to_none=True)
            loss = t.loss()
            loss.backward()
            grads.append((loss.item(), [p.grad for p in t.model.parameters() if p.grad is not None]))
            t.opt.zero_grad(set_to_none=True)
        (l_fast, g_fast), (l_ref, g_ref) = grads
        err = max((a - b).abs().max().item() / (b.abs().max().item() + 1e-12)
                  for a, b in zip(g_fast, g_ref, strict=True))
        print(
            f"  check {wav:>8s}: loss fast {l_fast:.6f}, reference (dwt2 -> scale -> Linear) "
            f"{l_ref:.6f}; max relative gradient difference {err:.1e}"
        )
        assert abs(l_fast - l_ref) <= 1e-4 * abs(l_ref) and err < 1e-3, "fast path != reference"
    if unfused:
        for wav in wavelets:
            trainers[f"AuxT {wav} (reference path)"] = references[wav]

    n_params = {k: sum(p.numel() for p in t.model.parameters()) for k, t in trainers.items()}
    flops = {k: t.flops() for k, t in trainers.items()}
    times = interleaved({k: t.step for k, t in trainers.items()}, repeats, warmup=3)
    table(times, "plain")
    print("  conv/matmul FLOPs, forward + backward (FlopCounterMode):")
    for k in trainers:
        print(
            f"  {k:<34s} {flops[k] / 1e9:9.3f} GFLOP   x{flops[k] / flops['plain']:5.3f} vs plain"
            f"   ({n_params[k]:,} parameters)"
        )
    for wav in wavelets:
        k = f"AuxT {wav} (fast)"
        step_ratio = times.median_ms(k) / times.median_ms("plain")
        min_ratio = times.min_ms(k) / times.min_ms("plain")
        goal = GOALS.get(wav, 1.50)
        verdict = "met" if step_ratio <= goal else "MISSED"
        cpu_ratio = times.cpu_median_ms(k) / times.cpu_median_ms("plain")
        cpu_note = f"CPU-time ratio {cpu_ratio:.3f}; " if torch.get_num_threads() == 1 else ""
        print(
            f"  => {wav:>8s}: AuxT/plain step-time ratio {step_ratio:.3f} of medians, {min_ratio:.3f} "
            f"of minima (goal <= {goal:.2f}: {verdict}); {cpu_note}"
            f"FLOP ratio {flops[k] / flops['plain']:.3f}"
        )
        if unfused:
            un, fu = times.median_ms(f"AuxT {wav} (reference path)"), times.median_ms(k)
            print(
                f"     (c) reference path/plain {un / times.median_ms('plain'):.3f}; the fast path saves "
                f"{un - fu:.1f} ms per step ({un / fu:.3f}x)"
            )
    if profile:
        run_profile(trainers)


def run_profile(trainers: dict[str, Trainer], steps: int = 5) -> None:
    """Per-op self CPU time per step (``torch.profiler``), each variant beside ``plain``."""
    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, dict[str, tuple[float, float]]] = {}
    for name, t in trainers.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                t.step()
        per_op[name] = {
            e.key: (e.self_cpu_time_total / steps / 1e3, e.count / steps)
            for e in prof.key_averages()
        }
    names = list(trainers)
    total = {n: sum(ms for ms, _ in per_op[n].values()) for n in names}
    print(
        f"\n  torch.profiler, self CPU ms per step ({steps} steps each; profiler overhead included)"
    )
    print("  " + "op".ljust(38) + "".join(f"{n[:22]:>24s}" for n in names) + "   calls/step")
    print("  " + "TOTAL".ljust(38) + "".join(f"{total[n]:24.2f}" for n in names))

    def extra(op: str) -> float:  # of the fused AuxT step over the plain one
        return per_op[names[1]].get(op, (0.0, 0))[0] - per_op["plain"].get(op, (0.0, 0))[0]

    ops = sorted(set().union(*per_op.values()), key=extra, reverse=True)[:15]
    for op in ops:
        cells = "".join(f"{per_op[n].get(op, (0.0, 0))[0]:24.2f}" for n in names)
        calls = "/".join(f"{per_op[n].get(op, (0.0, 0))[1]:.0f}" for n in names)
        print(f"  {op[:38]:<38s}{cells}   {calls}")
    print(f"  (the 15 ops with the most extra time in {names[1]!r} over 'plain')")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=25, help="timed rounds (median)")
    p.add_argument("--threads", type=int, default=cpus, help=f"torch threads (default: {cpus})")
    p.add_argument(
        "--shape",
        type=int,
        nargs=4,
        default=(8, 64, 128, 128),
        metavar=("B", "C", "H", "W"),
        help="tensor shape for (a)",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument(
        "--wavelets", nargs="+", default=["haar", "db4", "bior2.2"], help="AuxT wavelets timed in (b)"
    )
    p.add_argument(
        "--no-unfused", action="store_true", help="skip timing (c), the reference AuxT paths"
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler tables for (b)")
    p.add_argument("--skip-dwt", action="store_true", help="skip (a)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, pywt {pywt.__version__}, python {platform.python_version()}; "
        f"CPUs available {cpus}, torch threads {torch.get_num_threads()}; repeats {args.repeats} "
        f"(medians, interleaved after warm-up)"
    )
    t0, meter = time.perf_counter(), Contention()
    if not args.skip_dwt:
        bench_dwt(tuple(args.shape), args.repeats)
    bench_step(args.batch, args.crop, args.repeats, args.wavelets, not args.no_unfused, args.profile)
    share = meter.share()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", end="")
    if share is not None:
        print(f"; other processes used {100 * share:.0f}% of the CPUs meanwhile", end="")
        if share > 0.05:
            print(" -- WARNING: the machine was shared, the timings are contaminated", end="")
    print()


if __name__ == "__main__":
    main()

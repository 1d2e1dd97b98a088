"""Cost of ``--deterministic`` (CPU): training-step time of the default model against unpinned runs.

Run from the repository root::

    python bench/bench_determinism.py            # --rounds 3 --steps 20 --threads <CPUs available>

Each variant runs in its own process (ATen, oneDNN and MKL fix their code paths when they start, so
they cannot be switched within one), in rounds that start every variant once (order rotated). A
process builds the default run (``mbt2018-mean``, N=32, M=48, batch 8 of 64x64 built-in crops), runs
5 warm-up steps, then times ``--steps`` training steps (:func:`energylab.train.train_step`; wall
clock and this process's CPU time). Variants:

* ``default``: what an unpinned run does: ``--threads`` intra-op threads, the CPU's best kernels;
* ``1 thread``: one intra-op thread, the CPU's best kernels (the thread pin alone);
* ``AVX2``: ``--threads`` threads, ATen, oneDNN and MKL on their AVX2 code paths (the ISA pin alone);
* ``deterministic``: ``TrainConfig(deterministic=True)`` in a process started with
  :data:`energylab.train.DETERMINISTIC_ENV` (both pins).

Printed: the median step time per variant over the rounds and its ratio to ``default``. Other
processes' CPU use distorts wall times; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, tempfile, time
import torch
threads, deterministic, steps = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
torch.set_num_threads(threads)
from energylab import train as T
from energylab.config import TrainConfig
config = TrainConfig(out=tempfile.mkdtemp(), steps=steps + 5, capture_every=0, log_every=10 ** 6,
                     deterministic=deterministic)
with T.deterministic_cpu(config) as pins:
    s = T.setup(config)
    s.model.train()
    walls, cpus = [], []
    for index, x in s.stream.batches(0, steps + 5):
        w, c = time.perf_counter(), time.process_time()
        T.train_step(s, index + 1, x)
        if index >= 5:
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    print(json.dumps({"wall": sorted(walls)[len(walls) // 2], "cpu": sorted(cpus)[len(cpus) // 2],
                      "threads": torch.get_num_threads(), "aten": torch.backends.cpu.get_cpu_capability(),
                      "pins": pins}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()
    avx2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}
    variants = {"default": (args.threads, "0", {}), "1 thread": (1, "0", {}),
                "AVX2": (args.threads, "0", avx2), "deterministic": (args.threads, "1", avx2)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    seen = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                threads, det, env = variants[name]
                out = subprocess.run([sys.executable, script, str(threads), det, str(args.steps)],
                                     env={**os.environ, **env}, capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                times[name].append(result["wall"])
                seen[name] = result
            print(f"round {r + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.1f})", flush=True)
    base = statistics.median(times["default"])
    print(f"\nstep time of the default run, median over {args.rounds} rounds of {args.steps} steps:")
    for name, values in times.items():
        med = statistics.median(values)
        r = seen[name]
        print(f"  {name:14s} {1000 * med:7.1f} ms  x{med / base:4.2f}   (threads {r['threads']}, ATen "
              f"{r['aten']}, {'pinned ' + json.dumps(r['pins']) if r['pins'] else 'unpinned'}; "
              f"per round: {', '.join(f'{1000 * v:.0f}' for v in values)} ms)")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")

"""Running the cells of an ablation: in this process, as local processes, or as Slurm jobs.

Launchers (:data:`LAUNCHERS`), through submitit (https://github.com/facebookincubator/submitit):

* ``inline``: one cell after another in this process (no submitit);
* ``local``: up to ``jobs`` cells at once, each in its own process (``submitit.LocalExecutor``),
  each with ``cores // jobs`` torch threads, so the cells share this machine's cores;
* ``slurm``: every cell a Slurm job (``submitit.SlurmExecutor``: partition, GPUs, CPUs, time limit
  and any extra ``#SBATCH`` options; ``--requeue``). A cell with several GPUs runs one task per
  GPU, each given the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``; ``submitit.helpers.TorchDistributedEnvironment``), so
  training runs DistributedDataParallel as under ``torchrun``.

Preemption and time-outs follow submitit's checkpointing protocol: a cell's job is a
``submitit.helpers.Checkpointable``, so on the signal Slurm sends before it stops a job, submitit
submits the same cell again (requeues it), and the cell resumes from its run directory's
checkpoint (``energylab.train.train(resume=True)``). The waiting process prints each cell's
progress (the last logged step) and, once every job is over, names each failed cell with its log
file; the other cells' run directories are complete and kept. submitit's files go to the
ablation directory's ``launch/`` (:class:`energylab.rundir.AblationDir`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from energylab.config import TrainConfig
from energylab.errors import TrainingError

__all__ = ["LAUNCHERS", "CellFunction", "CellJob", "CellsFailed", "LaunchError", "LaunchOptions",
           "launch_cells", "make_executor"]

LAUNCHERS = ("inline", "local", "slurm")
POLL_SECONDS = 2.0
"""How often the waiting process looks at the jobs."""


class LaunchError(ValueError):
    """A launcher that cannot run here (no Slurm); one-line message, exit status 2."""


class CellsFailed(TrainingError):
    """Cells whose jobs failed (the message names each with its log file); the others finished."""


@dataclass(frozen=True)
class LaunchOptions:
    """How to run the cells.

    Args:
        launcher: one of :data:`LAUNCHERS`.
        jobs: ``local``: cells at once (each with ``cores // jobs`` torch threads).
        slurm_partition, gpus_per_cell, cpus_per_cell, timeout_min: ``slurm``: the job's partition,
            GPUs (one task per GPU), CPUs per task and time limit in minutes.
        slurm_args: ``slurm``: further ``#SBATCH`` options, e.g. ``{"account": "lab", "qos":
            "high"}`` (written ``--account=lab``).

    Raises:
        ValueError: an unknown launcher, ``jobs`` < 1, negative GPUs, CPUs or time < 1.
    """

    launcher: str = "inline"
    jobs: int = 1
    slurm_partition: str | None = None
    gpus_per_cell: int = 0
    cpus_per_cell: int | None = None
    timeout_min: int = 24 * 60
    slurm_args: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.jobs < 1 or self.gpus_per_cell < 0 or self.timeout_min < 1 or (
                self.cpus_per_cell is not None and self.cpus_per_cell < 1):
            raise ValueError(f"jobs, cpus_per_cell and timeout_min must be >= 1 and gpus_per_cell >= 0, "
                             f"got {self.jobs}, {self.cpus_per_cell}, {self.timeout_min}, "
                             f"{self.gpus_per_cell}")

    @property
    def threads(self) -> int | None:
        """Torch threads of one cell (None: torch's default)."""
        if self.launcher == "local":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            return max(1, (cores or 1) // self.jobs)
        return self.cpus_per_cell if self.launcher == "slurm" else None


def _submitit():
    import submitit

    return submitit


def make_executor(options: LaunchOptions, folder: Path):
    """The submitit executor of a ``local`` or ``slurm`` launch, writing its files to ``folder``.

    Raises:
        LaunchError: ``slurm`` where there is no Slurm (submitit finds no ``srun``).
    """
    submitit = _submitit()
    if options.launcher == "local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=options.timeout_min)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder)
    except RuntimeError as err:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise LaunchError(f"--launcher slurm: no Slurm here ({' '.join(str(err).split())}); use "
                          "--launcher local or inline") from None
    tasks = max(1, options.gpus_per_cell)
    executor.update_parameters(
        partition=options.slurm_partition, time=options.timeout_min, nodes=1,
        ntasks_per_node=tasks, gpus_per_node=options.gpus_per_cell or None,
        cpus_per_task=options.cpus_per_cell, job_name="energylab-cell",
        additional_parameters={"requeue": True, **options.slurm_args},
    )
    return executor


CellFunction = Callable[[TrainConfig, Any, list], None]
"""``run_cell(config, cell, test)``: train one cell (resuming it from its checkpoint) and code the
decoded ``test`` images for real (:func:`energylab.ablate.run_cell`)."""


class CellJob:
    """One ablation cell as a submitit job: ``run_cell`` on rank 0 with the test images decoded in
    the job's process; the other ranks of a multi-GPU cell train (resuming if there is a checkpoint).

    On preemption or time-out submitit calls :meth:`checkpoint`, which submits the same job again:
    it resumes from the last checkpoint.
    """

    def __init__(self, config: TrainConfig, cell, run_cell: CellFunction, threads: int | None,
                 distributed: bool) -> None:
        self.config, self.cell, self.run_cell = config, cell, run_cell
        self.threads, self.distributed = threads, distributed

    def __call__(self) -> str:
        from energylab.train import test_images, train  # in the job's process

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.distributed:
            _submitit().helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if int(os.environ.get("RANK", "0")) == 0:
            self.run_cell(self.config, self.cell, test_images(self.config))
        else:
            train(self.config, resume=self.cell.run.has_checkpoint())
        return str(self.cell.dir)

    def checkpoint(self):
        """submitit's checkpointing protocol: run this cell again (it resumes from its checkpoint)."""
        return _submitit().helpers.DelayedSubmission(self)


def _last_step(cell) -> int:
    metrics = cell.run.metrics()
    return metrics[-1]["step"] if metrics else 0


def launch_cells(cells: Sequence[tuple[Any, TrainConfig]], options: LaunchOptions, folder: Path,
                 run_cell: CellFunction, test: list, label: Callable[[Any], str]) -> None:
    """Run ``cells`` (``(cell, config)`` pairs, :class:`energylab.ablate.Cell`) and wait for them.

    ``inline`` calls ``run_cell(config, cell, test)`` in turn; ``local`` / ``slurm`` submit
    :class:`CellJob`\\ s (``local``: at most ``options.jobs`` at a time), print each cell's start,
    progress (last logged step) and end on stdout, and wait for every job.

    Raises:
        CellsFailed: after every job is over, if some failed: each named with its log file.
    """
    if options.launcher == "inline":
        for i, (cell, config) in enumerate(cells, 1):
            _say(f"[{i}/{len(cells)}] {label(cell)}")
            run_cell(config, cell, test)
        return
    executor = make_executor(options, folder)
    limit = options.jobs if options.launcher == "local" else len(cells)
    distributed = options.launcher == "slurm" and options.gpus_per_cell > 1
    pending = list(cells)
    running: dict = {}
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < limit:
            cell, config = pending.pop(0)
            job = executor.submit(CellJob(config, cell, run_cell, options.threads, distributed))
            running[job] = [cell, config, -1]
            _say(f"{label(cell)}: job {job.job_id} started (log {job.paths.stderr})")
        time.sleep(POLL_SECONDS)
        for job, entry in list(running.items()):
            cell, config, shown = entry
            step = _last_step(cell)
            if job.done():
                del running[job]
                try:
                    job.result()
                    _say(f"{label(cell)}: done")
                except Exception as exc:  # noqa: BLE001 - a failed job is reported, the others go on
                    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                    failed.append(f"{label(cell)} (log {job.paths.stderr}: {reason})")
                    _say(f"{label(cell)}: FAILED, see {job.paths.stderr}")
            elif step != shown:
                entry[2] = step
                _say(f"{label(cell)}: step {step}/{config.steps}")
    if failed:
        raise CellsFailed(f"{len(failed)} of {len(cells)} cells failed: {'; '.join(failed)}; the other "
                          "cells are complete — rerun with --resume to retry the failed ones")


def _say(text: str) -> None:
    """Progress on stdout (stderr carries errors only)."""
    print(text, flush=True)

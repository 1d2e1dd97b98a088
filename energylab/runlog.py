"""The run directory: JSON-lines logs, capture archives, TensorBoard mirror, atomic checkpoints.

The ``.jsonl`` files are the source of truth; TensorBoard events under ``tensorboard/`` mirror them
so ``tensorboard --logdir RUN_DIR`` shows a run live. Layout: ``data/README.md``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["LOG_FILES", "RunLog", "atomic_save", "read_jsonl"]

LOG_FILES = ("metrics.jsonl", "eval.jsonl", "energy.jsonl")
MIRRORED = ("coding_gain", "decorrelation_gain", "klt_coding_gain", "total_correlation",
            "offdiag_energy_ratio", "topk_energy_share", "effective_rank", "aux_energy_share")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict]:
    """All records of a ``.jsonl`` file (an empty list if it does not exist)."""
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def correlation_image(cov: np.ndarray) -> np.ndarray:
    """``(3, C, C)`` RGB image in [0, 1] of the correlation matrix of ``cov`` (coolwarm, ±1)."""
    from matplotlib import colormaps

    std = np.sqrt(np.clip(np.diag(cov), 1e-30, None))
    corr = np.clip(cov / np.outer(std, std), -1, 1)
    return colormaps["coolwarm"]((corr + 1) / 2)[..., :3].transpose(2, 0, 1)


class _Progress:
    """tqdm bar on a terminal; plain periodic lines otherwise."""

    def __init__(self, start: int, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.last = start

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        text = f"loss {record['loss']:.4f} bpp {record['bpp']:.4f} psnr {record['psnr']:.2f}"
        if self.bar is not None:
            self.bar.update(record["step"] - self.last)
            self.bar.set_postfix_str(text)
        else:
            print(f"step {record['step']}: {text}", file=sys.stderr, flush=True)
        self.last = record["step"]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLog:
    """Writes one run directory. With ``enabled=False`` (ranks other than 0) it writes nothing."""

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.out, self.enabled = Path(out), enabled
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard"))
        return self._writer

    def start(self, config: dict) -> None:
        """Begin a fresh run: write ``config.json``, empty the logs and captures."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in LOG_FILES:
            (self.out / name).write_text("")
        for old in (self.out / "captures").glob("step_*.npz"):
            old.unlink()
        for old in (self.out / "tensorboard").glob("events.*"):
            old.unlink()

    def truncate(self, step: int) -> None:
        """Drop every record and capture after ``step`` (what a killed run wrote past its last
        checkpoint), so a resumed run appends exactly what an uninterrupted one would."""
        if not self.enabled:
            return
        for name in LOG_FILES:
            kept = [r for r in read_jsonl(self.out / name) if r["step"] <= step]
            self._rewrite(self.out / name, kept)
        for old in (self.out / "captures").glob("step_*.npz"):
            if int(old.stem.split("_")[1]) > step:
                old.unlink()
        self.writer.add_text("resume", f"resumed at step {step}", step)

    @staticmethod
    def _rewrite(path: Path, records: list[dict]) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path)

    def _append(self, name: str, records: list[dict]) -> None:
        with open(self.out / name, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append("metrics.jsonl", [record])
        for key in ("loss", "mse", "bpp", "psnr", "ortho_loss", "aux_loss", "lr"):
            self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def eval(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append("eval.jsonl", [record])
        for key in ("loss", "bpp", "mse", "psnr"):
            self.writer.add_scalar(f"test/{key}", record[key], record["step"])
        self.writer.flush()

    def capture(self, step: int, records: list[dict], arrays: dict[str, np.ndarray]) -> None:
        if not self.enabled:
            return
        self._append("energy.jsonl", records)
        captures = self.out / "captures"
        captures.mkdir(exist_ok=True)
        path = captures / f"step_{step:07d}.npz"
        tmp = captures / f".step_{step:07d}.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        for record in records:
            for key in MIRRORED:
                if record.get(key) is not None:  # None: infinite for a singular covariance
                    self.writer.add_scalar(f"energy/{record['layer']}/{key}", record[key], step)
        if "cov/y" in arrays:
            self.writer.add_image("y/channel_correlation", correlation_image(arrays["cov/y"]), step)

    def progress(self, start: int, total: int) -> _Progress:
        return _Progress(start, total, self.enabled)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

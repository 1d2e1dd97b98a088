"""The run directory and the ablation directory: the one description of their files.

A **run directory** (:class:`RunDir`; written by ``energylab.train``) holds:

* ``config.json``: ``{"args": TrainConfig.to_dict(), "versions": {"energylab", "torch",
  "compressai", ...}, "device": "cpu", "world_size": 1, "git_revision": "…" or null, "created": ISO
  time, "data": {"source", "train": [names], "test": [names]}}``; ``args`` holds every field of
  :class:`energylab.config.TrainConfig` (``model``, ``N``, ``M``, ``auxt``, ``remove`` (list),
  ``wavelet``, ``g_a_placement``, ``g_s_placement``, ``lmbda``, ``ortho_weight``, ``steps``,
  ``batch_size``, ``lr``, ``data``, ``patch_size``, ``test_size``, ``eval_every``,
  ``capture_every``, ``log_every``, ``probe_count``, ``probe_size``, ``seed``, ``device``,
  ``out``, ``workers``, ``cache``, ``small_images``, ``lr_schedule``, ``lr_milestones`` (list),
  ``lr_gamma``, ``lr_patience``, ``precision``).
* ``data_index.json``: the index of a data folder (file list and image sizes;
  :func:`energylab.data.index_folder` owns its content), reused while the folder is unchanged.
* ``metrics.jsonl``: one line per logged training step: ``step``, ``loss``, ``mse``, ``bpp``,
  ``psnr``, ``ortho_loss``, ``aux_loss``, ``lr``, ``wall_time`` (seconds since the run started,
  excluding evaluation and capture).
* ``eval.jsonl``: one line per evaluation on the test images: ``step``, ``loss``, ``bpp``
  (estimated from the likelihoods), ``mse``, ``psnr``, ``wall_time``.
* ``energy.jsonl``: one line per capture per layer (the records of
  :meth:`energylab.capture.LatentProbe.records`): ``step``, ``layer``, ``role`` (``stage``, ``y``,
  ``y_hat``, ``main``, ``aux``, ``residual``, ``gain``), ``merge`` (k = 1..4 for ``main`` /
  ``aux`` / ``gain``, else null),
  ``channels``, ``count`` (positions), ``images`` (probe images), then every statistic under the
  name of its function in :mod:`energylab.stats` (``offdiag_energy_ratio``, ``coding_gain``,
  ``klt_coding_gain``, ``decorrelation_gain``, ``total_correlation``,
  ``total_correlation_per_channel``, ``effective_rank``, ``topk_energy_share`` (raw mean square,
  = ``topk_share.ms``), ``topk_share.l2`` / ``.l2_centred`` / ``.ms`` / ``.ms_centred``,
  ``topk_k``, ``mean_energy_fraction``, ...), ``subband_energy.<band>`` and
  ``subband_energy_centred.<band>`` (``LL2``, ``LH2``, ``HL2``, ``HH2``, ``LH1``, ``HL1``,
  ``HH1``; channel means in / removed), ``spatial_correlation.<dy>,<dx>`` (lags ``0,1``, ``1,0``,
  ``1,1``), for stages, ``y`` and ``y_hat`` ``neighbourhood_tc.joint`` / ``.across_channels`` /
  ``.across_positions`` / ``.count``, and ``<stat>_ci_low`` / ``<stat>_ci_high`` (95 % bootstrap
  over probe images, null where undefined; see :meth:`energylab.capture.LatentProbe.records`); layers
  ``g_a.stage1``..``g_a.stage3``, ``y``, ``y_hat`` and with AuxT ``g_a.main<k>`` / ``g_a.aux<k>``
  (the two branches at merge point k; the ``aux`` line also carries ``aux_energy_share`` =
  ‖aux‖² / ‖main + aux‖²); ``y_residual`` (role ``residual``, models with one Gaussian
  conditional: (y − μ)/σ). The ``y_hat`` line also carries modulation against the quantiser:
  ``std_in_steps.median``, ``std_in_steps.max``, ``rate_share_entropy`` (bits),
  ``rate_share_am_gm``, ``active_channels``, ``bits_per_position``. With AuxT, lines of role
  ``gain`` (layers ``g_a.gain<k>``, ``g_s.gain<k>``) carry only ``step``, ``layer``, ``role``,
  ``merge`` and ``exp_s.LL``, ``exp_s.LH``, ``exp_s.HL``, ``exp_s.HH`` (mean learned subband gain).
* ``captures/step_XXXXXXX.npz`` (seven-digit step): ``cov/<layer>`` (C×C float64 channel
  covariance), ``mean/<layer>`` (C float64, channel means), ``energies/<layer>`` (C float64,
  E[y_c²]), ``std_in_steps/y_hat`` and ``rate_share/y_hat`` (C float32), with AuxT
  ``exp_s/<g_a|g_s>.gain<k>`` (4×C float32, subband-major ``exp(s)``), ``probe_y`` (C×h×w float32,
  the latent ``y`` of the first probe image).
* ``checkpoint.pt``: ``{"model", "optimizer", "aux_optimizer", "scheduler" (the learning-rate
  scheduler's state, or None), "scaler" (fp16's gradient scaler state, or None), "step", "rng",
  "config", "wall_time"}``, written atomically (temporary file, fsync, rename) after every evaluation.
* ``final.pt``: ``{"model": state_dict, "step", "config"}``, written atomically.
* ``bitstream.json``: ``{"results": {key: value}, "per_image": [...]}``, the real-bitstream
  results of the final model (``energylab.evaluate``'s keys), written by the ablation.
* ``tensorboard/``: TensorBoard events mirroring the ``.jsonl`` files (which are the source of
  truth).

Every line of every ``.jsonl`` carries ``step``. Resuming from the checkpoint at step ``t`` drops
every record and capture after ``t`` and purges the TensorBoard events after ``t``, so a resumed
run holds exactly what an uninterrupted one would.

An **ablation directory** (:class:`AblationDir`; written by ``energylab.ablate``) holds
``ablation.json`` (the command's settings and ``"variants"``: name -> ``{"auxt", "remove",
"wavelet"}``), one run directory per cell at ``<variant>/seed<S>/`` (``<variant>/lmbda<λ>/seed<S>/``
in an R-D sweep), ``summary.json``, ``summary.md``, ``summary.csv`` (one row per variant and λ)
and the figures; with ``--launcher local`` or ``slurm``, ``launch/`` holds submitit's job files
(``<job id>_0_log.out`` / ``.err``, the job scripts and pickles) of every cell.

An **analysis directory** (:class:`AnalysisDir`; written by ``energylab.analyze``) holds
``analysis.json``: ``{"data": {"source", "images": [names], "crop"}, "versions": {...}, "models":
[{"name", "path", "architecture" (with ``checkpoint``: the weights file and the layout recognised),
"step" (or null), "layers": {layer: {statistic: value}}, "bitstream" (``energylab.evaluate``'s
averages, or null)}]}`` -- every numeric field of every :meth:`energylab.capture.LatentProbe.records`
record, keyed by layer; ``arrays/<i>.npz`` (``i`` = the model's index in ``models``; the arrays of
:meth:`energylab.capture.LatentProbe.arrays`: ``cov/<layer>``, ``energies/<layer>``, ``probe_y``);
and the figures as ``<name>.png``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from energylab.config import TrainConfig

__all__ = ["AblationDir", "AnalysisDir", "RunDir", "RunDirError", "atomic_save"]

MIRRORED = ("coding_gain", "decorrelation_gain", "klt_coding_gain", "total_correlation",
            "offdiag_energy_ratio", "topk_energy_share", "effective_rank", "aux_energy_share",
            "std_in_steps.median", "rate_share_entropy", "active_channels",
            "exp_s.LL", "exp_s.LH", "exp_s.HL", "exp_s.HH")
"""Energy statistics mirrored to TensorBoard (``energy/<layer>/<stat>``)."""


class RunDirError(ValueError):
    """A directory that is not what it should be (no run, a run where none may be, an unreadable
    file); one-line message naming the path."""


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


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    """All records of a JSON-lines file ([] if it does not exist). A last line without its newline
    that is not JSON is a write cut short (a killed process): it is left out with a warning, and a
    resume rewrites the file without it.

    Raises:
        RunDirError: the file is unreadable, or a complete line is not JSON (file and line named).
    """
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines) and not line.endswith("\n"):
                warnings.warn(f"{path}: line {number} is incomplete (a write cut short), left out",
                              stacklevel=2)
                continue
            reason = f"{exc.msg} at column {exc.colno}"
            raise RunDirError(f"{path}: line {number} is not JSON ({reason})") from None
    return records


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunDirError(f"{path}: unreadable ({reason})") from None


def _correlation_image(cov: np.ndarray) -> np.ndarray:
    """``(3, C, C)`` RGB image in [0, 1] of the correlation matrix of ``cov`` (coolwarm, ±1)."""
    from matplotlib import colormaps

    from energylab.stats import correlation_matrix

    return colormaps["coolwarm"]((correlation_matrix(cov) + 1) / 2)[..., :3].transpose(2, 0, 1)


class Progress:
    """tqdm bar on a terminal; plain periodic lines on stderr otherwise; nothing if disabled."""

    def __init__(self, start: int, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.last = start

    def update(self, record: dict) -> None:
        """Show a ``metrics`` record (``step``, ``loss``, ``bpp``, ``psnr``)."""
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


class RunDir:
    """One training run's directory (layout: the module docstring).

    Args:
        path: the directory (need not exist yet).
        write: False on processes that must not write (DDP ranks other than 0): every writing
            method then does nothing; reading works either way.
    """

    CONFIG = "config.json"
    CHECKPOINT = "checkpoint.pt"
    FINAL = "final.pt"
    METRICS = "metrics.jsonl"
    EVAL = "eval.jsonl"
    ENERGY = "energy.jsonl"
    LOGS = (METRICS, EVAL, ENERGY)
    CAPTURES = "captures"
    BITSTREAM = "bitstream.json"
    TENSORBOARD = "tensorboard"
    DATA_INDEX = "data_index.json"

    def __init__(self, path: Path | str, *, write: bool = True) -> None:
        self.path = Path(path)
        self.write = write
        self._writer = None
        self._purge_step: int | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # -- what is there ------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def final_path(self) -> Path:
        return self.path / self.FINAL

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def data_index_path(self) -> Path:
        return self.path / self.DATA_INDEX

    def is_run(self) -> bool:
        """Whether the directory has a ``config.json`` (a run was started in it)."""
        return (self.path / self.CONFIG).is_file()

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def is_finished(self) -> bool:
        """Whether training wrote its final model."""
        return self.final_path.is_file()

    def has_bitstream(self) -> bool:
        return (self.path / self.BITSTREAM).is_file()

    def weights_path(self) -> Path | None:
        """``final.pt`` if written, else ``checkpoint.pt`` if written, else None."""
        return next((p for p in (self.final_path, self.checkpoint_path) if p.is_file()), None)

    # -- readers ------------------------------------------------------------------------------

    def config(self) -> dict:
        """The ``config.json`` dict as written (``args`` and the run's metadata).

        Raises:
            RunDirError: no ``config.json``, unreadable, or not a JSON object.
        """
        path = self.path / self.CONFIG
        if not path.is_file():
            raise RunDirError(f"{self.path} is not a run directory (no {self.CONFIG})")
        config = _read_json(path)
        if not isinstance(config, dict):
            raise RunDirError(f"{path}: not a JSON object")
        return config

    def train_config(self) -> TrainConfig:
        """The run's :class:`TrainConfig` (``config.json``'s ``args``).

        Raises:
            RunDirError: as :meth:`config`. ConfigError: unknown or invalid settings (naming the file).
        """
        path = self.path / self.CONFIG
        return TrainConfig.from_dict(self.config().get("args", {}), source=path)

    def metrics(self) -> list[dict]:
        """The ``metrics.jsonl`` records (training steps), in order; [] if none."""
        return _read_jsonl(self.path / self.METRICS)

    def evals(self) -> list[dict]:
        """The ``eval.jsonl`` records (test evaluations), in order; [] if none."""
        return _read_jsonl(self.path / self.EVAL)

    def energy(self) -> list[dict]:
        """The ``energy.jsonl`` records (one per capture and layer), in order; [] if none."""
        return _read_jsonl(self.path / self.ENERGY)

    def capture_files(self) -> list[tuple[int, Path]]:
        """``(step, archive path)`` of every capture, by step (load one with :meth:`capture`)."""
        return sorted((int(p.stem.removeprefix("step_")), p)
                      for p in (self.path / self.CAPTURES).glob("step_*.npz"))

    @staticmethod
    def capture(path: Path, layers: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """One capture archive as ``{"cov/<layer>", "mean/<layer>", "energies/<layer>", "probe_y"}`` arrays;
        ``layers``: keep only these layers' arrays (``probe_y`` always)."""
        keep = None if layers is None else set(layers)
        with np.load(path) as z:
            return {k: z[k] for k in z.files
                    if keep is None or k == "probe_y" or k.split("/", 1)[-1] in keep}

    def captures(self, layers: Iterable[str] | None = None) -> dict[int, dict[str, np.ndarray]]:
        """Every capture: step -> :meth:`capture` dict, by step."""
        layers = None if layers is None else list(layers)
        return {step: self.capture(path, layers) for step, path in self.capture_files()}

    def bitstream(self) -> dict | None:
        """The real-bitstream ``results`` dict, or None if not written.

        Raises:
            RunDirError: unreadable ``bitstream.json``.
        """
        path = self.path / self.BITSTREAM
        return _read_json(path)["results"] if path.is_file() else None

    def load_checkpoint(self, map_location: torch.device | str = "cpu") -> dict:
        """The training checkpoint (see the module docstring).

        Raises:
            RunDirError: no checkpoint.
        """
        if not self.has_checkpoint():
            raise RunDirError(f"no checkpoint to resume from at {self.checkpoint_path}")
        return torch.load(self.checkpoint_path, map_location=map_location, weights_only=False)

    # -- writers ------------------------------------------------------------------------------

    @property
    def writer(self):
        """The TensorBoard ``SummaryWriter`` (opened on first use; after :meth:`resume` with
        ``purge_step`` so that events after the resumed step are dropped)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        return self._writer

    def start(self, config: TrainConfig, meta: dict) -> None:
        """Begin a fresh run: write ``config.json`` (``{"args": config.to_dict(), **meta}``), empty
        the logs, captures and TensorBoard events.

        Raises:
            RunDirError: the directory already holds a checkpoint or a final model.
        """
        if self.weights_path() is not None:
            raise RunDirError(f"{self.path} already holds a run; resume it, or choose another "
                              "run directory")
        if not self.write:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config, meta)
        for name in self.LOGS:
            (self.path / name).write_text("")
        for old in (self.path / self.CAPTURES).glob("step_*.npz"):
            old.unlink()
        for old in self.tensorboard_dir.glob("events.*"):
            old.unlink()

    def write_config(self, config: TrainConfig, meta: dict) -> None:
        """Write ``config.json`` atomically: ``{"args": config.to_dict(), **meta}``."""
        if self.write:
            self.path.mkdir(parents=True, exist_ok=True)
            record = {"args": config.to_dict(), **{k: v for k, v in meta.items() if k != "args"}}
            _atomic_text(self.path / self.CONFIG, json.dumps(record, indent=2) + "\n")

    def resume(self, step: int) -> None:
        """Continue a run from its checkpoint at ``step``: drop every record and capture after
        ``step`` (what a killed run wrote past its last checkpoint) and purge TensorBoard events
        after it, so a resumed run appends exactly what an uninterrupted one would."""
        if not self.write:
            return
        for name in self.LOGS:
            kept = [r for r in _read_jsonl(self.path / name) if r["step"] <= step]
            _atomic_text(self.path / name, "".join(json.dumps(r) + "\n" for r in kept))
        for captured, path in self.capture_files():
            if captured > step:
                path.unlink()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = step + 1
        self.writer.add_text("resume", f"resumed at step {step}", step)

    def _append(self, name: str, records: list[dict]) -> None:
        with open(self.path / name, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()

    def log_metrics(self, record: dict) -> None:
        """Append one training-step record (``metrics.jsonl``; ``train/<key>`` in TensorBoard)."""
        if not self.write:
            return
        self._append(self.METRICS, [record])
        for key in ("loss", "mse", "bpp", "psnr", "ortho_loss", "aux_loss", "lr"):
            self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def log_eval(self, record: dict) -> None:
        """Append one test evaluation (``eval.jsonl``; ``test/<key>`` in TensorBoard)."""
        if not self.write:
            return
        self._append(self.EVAL, [record])
        for key in ("loss", "bpp", "mse", "psnr"):
            self.writer.add_scalar(f"test/{key}", record[key], record["step"])
        self.writer.flush()

    def log_capture(self, step: int, records: list[dict], arrays: dict[str, np.ndarray]) -> None:
        """Append a capture's energy records and write its archive atomically."""
        if not self.write:
            return
        self._append(self.ENERGY, records)
        captures = self.path / self.CAPTURES
        captures.mkdir(exist_ok=True)
        tmp = captures / f".step_{step:07d}.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, captures / f"step_{step:07d}.npz")
        for record in records:
            for key in MIRRORED:
                if record.get(key) is not None:  # None: infinite for a singular covariance
                    self.writer.add_scalar(f"energy/{record['layer']}/{key}", record[key], step)
        if "cov/y" in arrays:
            self.writer.add_image("y/channel_correlation", _correlation_image(arrays["cov/y"]), step)

    def save_checkpoint(self, checkpoint: dict) -> None:
        """Write the training checkpoint atomically."""
        if self.write:
            atomic_save(checkpoint, self.checkpoint_path)

    def save_final(self, final: dict) -> None:
        """Write the final model atomically."""
        if self.write:
            atomic_save(final, self.final_path)

    def write_bitstream(self, results: dict, per_image: list[dict]) -> None:
        """Write the real-bitstream results of the final model."""
        if self.write:
            _atomic_text(self.path / self.BITSTREAM,
                         json.dumps({"results": results, "per_image": per_image}, indent=2) + "\n")

    def progress(self, start: int, total: int) -> Progress:
        """A progress display from ``start`` to ``total`` steps (silent if not writing)."""
        return Progress(start, total, self.write)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class AblationDir:
    """An ablation's root directory (layout: the module docstring)."""

    META = "ablation.json"
    SUMMARY_JSON = "summary.json"
    SUMMARY_MD = "summary.md"
    SUMMARY_CSV = "summary.csv"
    LAUNCH = "launch"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"AblationDir({str(self.path)!r})"

    @property
    def launch_dir(self) -> Path:
        """submitit's folder for the cells' jobs (logs, job scripts)."""
        return self.path / self.LAUNCH

    def is_ablation(self) -> bool:
        """Whether the directory has an ``ablation.json``."""
        return (self.path / self.META).is_file()

    def meta(self) -> dict:
        """The ``ablation.json`` dict.

        Raises:
            RunDirError: no or unreadable ``ablation.json``.
        """
        path = self.path / self.META
        if not path.is_file():
            raise RunDirError(f"{self.path} holds no ablation (no {self.META})")
        return _read_json(path)

    def write_meta(self, meta: dict) -> None:
        """Write ``ablation.json`` (creating the directory)."""
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_text(self.path / self.META, json.dumps(meta, indent=2) + "\n")

    def cell(self, variant: str, seed: int, lmbda: float | None = None) -> RunDir:
        """The run directory of one cell; ``lmbda`` only in an R-D sweep."""
        sub = Path(variant) if lmbda is None else Path(variant) / f"lmbda{lmbda:g}"
        return RunDir(self.path / sub / f"seed{seed}")

    def summary(self) -> dict | None:
        """The ``summary.json`` dict, or None if not written."""
        path = self.path / self.SUMMARY_JSON
        return _read_json(path) if path.is_file() else None

    def write_summary(self, json_text: str, markdown: str, csv_text: str) -> None:
        """Write ``summary.json``, ``summary.md`` and ``summary.csv`` atomically, each from its text
        (:mod:`energylab.summary` formats them)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name, text in ((self.SUMMARY_JSON, json_text), (self.SUMMARY_MD, markdown),
                           (self.SUMMARY_CSV, csv_text)):
            _atomic_text(self.path / name, text)


class AnalysisDir:
    """An analysis's directory (layout: the module docstring)."""

    ANALYSIS = "analysis.json"
    ARRAYS = "arrays"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"AnalysisDir({str(self.path)!r})"

    def is_analysis(self) -> bool:
        """Whether the directory has an ``analysis.json``."""
        return (self.path / self.ANALYSIS).is_file()

    def analysis(self) -> dict:
        """The ``analysis.json`` dict.

        Raises:
            RunDirError: no or unreadable ``analysis.json``.
        """
        path = self.path / self.ANALYSIS
        if not path.is_file():
            raise RunDirError(f"{self.path} holds no analysis (no {self.ANALYSIS})")
        return _read_json(path)

    def arrays_path(self, index: int) -> Path:
        """The arrays archive of model ``index``."""
        return self.path / self.ARRAYS / f"{index}.npz"

    def arrays(self, index: int) -> dict[str, np.ndarray]:
        """Model ``index``'s ``{"cov/<layer>", "energies/<layer>", "probe_y"}`` arrays."""
        with np.load(self.arrays_path(index)) as z:
            return {k: z[k] for k in z.files}

    def figure_path(self, name: str) -> Path:
        """Where figure ``name`` is written (PNG)."""
        return self.path / f"{name}.png"

    def write(self, analysis: dict, arrays: list[dict[str, np.ndarray]]) -> None:
        """Write ``analysis.json`` (strict JSON: no NaN) and one arrays archive per model, atomically
        each, creating the directory."""
        (self.path / self.ARRAYS).mkdir(parents=True, exist_ok=True)
        for index, named in enumerate(arrays):
            tmp = self.path / self.ARRAYS / f".{index}.tmp.npz"
            np.savez_compressed(tmp, **named)
            os.replace(tmp, self.arrays_path(index))
        _atomic_text(self.path / self.ANALYSIS, json.dumps(analysis, indent=1, allow_nan=False) + "\n")

"""The run directory and the ablation directory: the one description of their files.

A **run directory** (:class:`RunDir`; written by ``energylab.train``) holds:

* ``config.json``: ``{"args": TrainConfig.to_dict(), "versions": {"energylab", "torch",
  "compressai", ...}, "device": "cpu", "world_size": 1, "git_revision": "…" or null, "created": ISO
  time, "data": {"source", "train": [names], "test": [names]}}`` (the data trained on now), and,
  after a resume that accepted a changed data folder (``--allow-data-change``), ``"data_changes":
  [{"step", "added", "removed", "changed"}]`` (``"<train|test>/<name>"`` each; ``changed``:
  another byte size or image size); ``args`` holds every field of
  :class:`energylab.config.TrainConfig` (``model``, ``N``, ``M``, ``auxt``, ``remove`` (list),
  ``wavelet``, ``g_a_placement``, ``g_s_placement``, ``lmbda``, ``ortho_weight``, ``steps``,
  ``batch_size``, ``lr``, ``data``, ``patch_size``, ``test_size``, ``eval_every``,
  ``capture_every``, ``log_every``, ``probe_count``, ``probe_size``, ``seed``, ``device``,
  ``out``, ``workers``, ``cache``, ``small_images``, ``lr_schedule``, ``lr_milestones`` (list),
  ``lr_gamma``, ``lr_patience``, ``precision``).
* ``data_index.json``: the index of a data folder (file list and image sizes;
  :func:`energylab.data.index_folder` owns its content), reused while the folder is unchanged.
* ``metrics.jsonl``: one line per logged training step: ``step``, ``loss``, ``mse``, ``bpp``,
  ``psnr``, ``ortho_loss``, ``aux_loss``, ``lr``, ``skipped_steps`` / ``skipped_steps_total``
  (training steps whose optimizer step fp16's gradient scaler skipped, since the previous record
  and since the run began; 0 in fp32 and bf16), ``wall_time`` (seconds since the run started,
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
  scheduler's state, or None), "scaler" (fp16's gradient scaler state, or None), "skipped"
  (``{"total", "logged"}``: steps skipped by the scaler, in all and up to the last record), "step",
  "rng", "config", "data_files" (a folder's indexed images, ``{"train", "test"}`` lists of
  ``[name, bytes, height, width]``, compared on resume; None for the built-in set),
  "wall_time"}``, written atomically (temporary file, fsync, rename) after every evaluation.
* ``run.lock``: present while a training process runs in the directory (:class:`RunLock`); it
  holds ``"<pid> <host>"``.
* Every file is written beside itself and renamed (the ``.jsonl`` files appended, a failed append
  cut back): a write that fails (a full disk) raises an ``OSError`` naming the file and replaces
  nothing.
* ``final.pt``: ``{"model": state_dict, "step", "config"}``, written atomically.
* ``bitstream.json``: ``{"results": {key: value}, "per_image": [...]}``, the real-bitstream
  results of the final model (``energylab.evaluate``'s keys), written by the ablation.
* ``tensorboard/``: TensorBoard events mirroring the ``.jsonl`` files (which are the source of
  truth).

Every JSON file and line of every directory below is strict JSON (RFC 8259), written by
:func:`to_json`: a value that is undefined (NaN, infinite) is ``null``, never a bare ``NaN`` /
``Infinity`` token; the readers take such tokens of older files as ``null`` too.

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

import contextlib
import errno
import functools
import json
import math
import os
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from energylab.config import TrainConfig

__all__ = ["AblationDir", "AnalysisDir", "RunDir", "RunDirError", "RunLock", "atomic_save", "json_safe",
           "to_json", "write_error"]

MIRRORED = ("coding_gain", "decorrelation_gain", "klt_coding_gain", "total_correlation",
            "offdiag_energy_ratio", "topk_energy_share", "effective_rank", "aux_energy_share",
            "std_in_steps.median", "rate_share_entropy", "active_channels",
            "exp_s.LL", "exp_s.LH", "exp_s.HL", "exp_s.HH")
"""Energy statistics mirrored to TensorBoard (``energy/<layer>/<stat>``)."""


class RunDirError(ValueError):
    """A directory that is not what it should be (no run, a run where none may be, an unreadable
    file); one-line message naming the path."""


def write_error(err: BaseException, path: Path) -> OSError | None:
    """The ``OSError`` to raise for a failed write of ``path`` (None: ``err`` is not an I/O failure).

    It names ``path`` itself (not the temporary file the write went to) and the cause, and says
    that the previous ``path``, if any, is kept: every writer of a run directory writes beside the
    file and renames, so a failed write replaces nothing. ``torch.save`` reports a failed write as
    a ``RuntimeError`` of its zip writer with the ``OSError`` as its context: that cause is found
    (and where it is lost, a full file system is recognised from its free space).
    """
    cause, seen = err, set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        number, reason = cause.errno, cause.strerror or str(cause) or type(cause).__name__
    elif isinstance(err, RuntimeError) and any(
            s in str(err) for s in ("inline_container", "PytorchStreamWriter", "file write failed")):
        number, reason = errno.EIO, f"write failed ({' '.join(str(err).split())})"
        try:
            st = os.statvfs(path.parent)
            if st.f_bavail * st.f_frsize < 1 << 20:
                number, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)
        except OSError:
            pass
    else:
        return None
    kept = (f"not written; the previous {path.name} is kept" if path.exists()
            else f"{path.name} was not written")
    return OSError(number, f"{reason} ({kept})", str(path))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never a partial file; the temporary file
    is removed whatever fails.

    Raises:
        OSError: the write failed (a full disk, a quota, a permission): naming ``path``, the cause,
            and that the previous file is kept (:func:`write_error`).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise write_error(err, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        failure = write_error(err, path) if isinstance(err, Exception) else None
        if failure is None:
            raise
        raise failure from None


def _atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename over ``path``.

    Raises:
        OSError: as :func:`atomic_save` (the temporary file removed, ``path`` untouched).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(err, path) from None


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez_compressed`` beside ``path``, then rename over it (errors as :func:`atomic_save`)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(err, path) from None


def _appending(method):
    """Decorate ``RunDir._append(self, name, records)``: a failed append (a full disk) is cut back
    to the file's previous length, so no torn line is left, and raised as an ``OSError`` naming
    the file (a failed ``write`` names none)."""

    @functools.wraps(method)
    def append(self, name: str, records: list[dict]) -> None:
        path = self.path / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        try:
            method(self, name, records)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise OSError(err.errno, f"{err.strerror or err} (the records were not appended)",
                          str(path)) from None

    return append


def json_safe(obj: Any) -> Any:
    """``obj`` ready for strict JSON, where undefined is ``null``: every float that is not finite
    (NaN, infinity; Python floats, NumPy scalars and array elements, torch scalars and tensor
    elements) becomes ``None``; NumPy and torch numbers become Python numbers, arrays and tensors
    nested lists, tuples lists. Dicts and lists are copied; anything else is returned as it is."""
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, float):  # np.float64 too
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic | np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.detach().cpu().tolist())
    return obj


def to_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps(json_safe(obj), allow_nan=False, **kwargs)``: the one writer of energylab's JSON
    files, strict JSON (no ``NaN`` / ``Infinity`` tokens; undefined values are ``null``)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def _undefined(token: str) -> None:
    """``parse_constant`` of the readers: a ``NaN`` / ``Infinity`` token of an older file reads as
    ``None``, as the writers write it now."""
    return None


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
            records.append(json.loads(line, parse_constant=_undefined))
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
        return json.loads(path.read_text(), parse_constant=_undefined)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunDirError(f"{path}: unreadable ({reason})") from None


def _correlation_image(cov: np.ndarray) -> np.ndarray:
    """``(3, C, C)`` RGB image in [0, 1] of the correlation matrix of ``cov`` (coolwarm, ±1)."""
    from matplotlib import colormaps

    from energylab.stats import correlation_matrix

    return colormaps["coolwarm"]((correlation_matrix(cov) + 1) / 2)[..., :3].transpose(2, 0, 1)


class Progress:
    """tqdm bar on a terminal (stderr); plain periodic lines on stdout otherwise; nothing if disabled."""

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
        if record.get("skipped_steps_total"):
            text += (f" skipped {record['skipped_steps']} step(s) since the last line, "
                     f"{record['skipped_steps_total']} in all (fp16 gradient overflow)")
        if self.bar is not None:
            self.bar.update(record["step"] - self.last)
            self.bar.set_postfix_str(text)
        else:
            print(f"step {record['step']}: {text}", flush=True)  # a log: stdout (stderr: errors)
        self.last = record["step"]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLock:
    """An exclusive lock on a run directory, held by one training process for its whole run.

    ``fcntl.flock`` (non-blocking) on ``<run>/run.lock``, which holds ``"<pid> <host>"`` of the
    holder; the kernel drops the lock when the process ends, however it ends (a killed run leaves
    the file, and the next run takes it over). Released, the file is removed (and the directory,
    if the lock created it and nothing else was written in it). Where the file system has no
    locks (some network file systems), a warning says so and the run goes on unlocked.

    Raises:
        RunDirError: on :meth:`acquire`, when another process holds the lock: one line naming the
            directory and the holder's pid and host.
    """

    def __init__(self, path: Path) -> None:
        self.dir = Path(path)
        self.path = self.dir / RunDir.LOCK
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        import fcntl

        created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a process that failed at once removed the directory
                self.dir.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise RunDirError(f"{self.dir} is in use by another training process ({holder}); wait "
                                  "for it to end, or choose another run directory") from None
            except OSError as err:  # ENOLCK, EOPNOTSUPP: a file system without locks
                os.close(fd)
                warnings.warn(f"{self.path}: cannot lock ({err.strerror or err}); a second process on "
                              f"{self.dir} would not be noticed", stacklevel=3)
                return
            try:  # the holder may have removed the file between our open and our lock
                on_disk = os.stat(self.path)
                same = (on_disk.st_ino, on_disk.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd, self._created = fd, created
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as err:
            self.release()
            raise OSError(err.errno, err.strerror, str(self.path)) from None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked: no one else can hold this file now
            if self._created:
                with contextlib.suppress(OSError):
                    self.dir.rmdir()  # only if empty: a run that failed before writing anything
        finally:
            os.close(self._fd)
            self._fd = None


def _lock_holder(fd: int) -> str:
    """``pid <pid> on <host>`` from a lock file (the holder writes it right after locking)."""
    text = ""
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
        if text:
            break
        time.sleep(0.05)
    pid, _, host = text.partition(" ")
    if not pid:
        return "pid unknown"
    return f"pid {pid} on {host}" if host and host != socket.gethostname() else f"pid {pid}"


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
    LOCK = "run.lock"

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

    def lock(self) -> RunLock | contextlib.nullcontext:
        """The run's exclusive lock (:class:`RunLock`), to hold with ``with`` for a whole run;
        nothing on a process that does not write."""
        return RunLock(self.path) if self.write else contextlib.nullcontext()

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
            _atomic_text(self.path / self.CONFIG, to_json(record, indent=2) + "\n")

    def resume(self, step: int) -> None:
        """Continue a run from its checkpoint at ``step``: drop every record and capture after
        ``step`` (what a killed run wrote past its last checkpoint) and purge TensorBoard events
        after it, so a resumed run appends exactly what an uninterrupted one would."""
        if not self.write:
            return
        for name in self.LOGS:
            kept = [r for r in _read_jsonl(self.path / name) if r["step"] <= step]
            _atomic_text(self.path / name, "".join(to_json(r) + "\n" for r in kept))
        for captured, path in self.capture_files():
            if captured > step:
                path.unlink()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = step + 1
        self.writer.add_text("resume", f"resumed at step {step}", step)

    @_appending
    def _append(self, name: str, records: list[dict]) -> None:
        with open(self.path / name, "a") as f:
            for record in records:
                f.write(to_json(record) + "\n")
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
        _atomic_npz(captures / f"step_{step:07d}.npz", arrays)
        for record in records:
            for key in MIRRORED:
                if record.get(key) is not None:  # None: infinite for a singular covariance
                    self.writer.add_scalar(f"energy/{record['layer']}/{key}", record[key], step)
        if "cov/y" in arrays:
            self.writer.add_image("y/channel_correlation", _correlation_image(arrays["cov/y"]), step)

    def save_checkpoint(self, checkpoint: dict) -> None:
        """Write the training checkpoint atomically.

        Raises:
            OSError: the write failed (naming ``checkpoint.pt`` and the cause; the previous
                checkpoint is kept, no temporary file is left).
        """
        if self.write:
            atomic_save(checkpoint, self.checkpoint_path)

    def save_final(self, final: dict) -> None:
        """Write the final model atomically (a failed write: as :meth:`save_checkpoint`)."""
        if self.write:
            atomic_save(final, self.final_path)

    def write_bitstream(self, results: dict, per_image: list[dict]) -> None:
        """Write the real-bitstream results of the final model."""
        if self.write:
            _atomic_text(self.path / self.BITSTREAM,
                         to_json({"results": results, "per_image": per_image}, indent=2) + "\n")

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
        _atomic_text(self.path / self.META, to_json(meta, indent=2) + "\n")

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
        _atomic_text(self.path / self.ANALYSIS, to_json(analysis, indent=1) + "\n")

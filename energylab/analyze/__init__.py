"""Latent statistics of trained models, without training anything.

``python -m energylab.analyze CKPT... --data DIR --out DIR [--bitstream] [--limit N]`` loads each
model (an energylab run directory, a run's final-model or checkpoint file, or any checkpoint
:mod:`energylab.checkpoints` reads -- the official AuxT release's, compressai-temp's, CompressAI's --
with ``--model`` and the architecture flags), runs the images of ``DIR`` through it one at a time
under :class:`energylab.capture.LatentProbe` and writes an analysis directory
(:class:`energylab.rundir.AnalysisDir`: a JSON file with every statistic of every captured
layer, the covariance arrays, and the figures of :func:`energylab.figures.analysis_figures`).

Images: ``--data builtin`` takes the built-in test photographs; a folder is indexed from the files'
headers (:func:`energylab.data.index_folder`; all images of a flat folder, the ``test/`` images of
a CompressAI layout) and each image is decoded only when it is used, so hundreds of images never sit
in memory together. Each is centre-cropped to the largest multiple of the model's downsampling
factor (at least 64) that fits, so no padding enters the statistics; smaller images are skipped
with a warning. ``--bitstream`` adds real-bitstream bpp, PSNR and MS-SSIM of the whole (padded)
images through :func:`energylab.evaluate.evaluate_image`.

Records are consumed generically: every numeric field of a record is a statistic, so statistics
added to :mod:`energylab.capture` appear in the analysis without a change here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from energylab.capture import LatentProbe
from energylab.data import BUILTIN_TEST, DataWarning, builtin_images, index_folder, load_image
from energylab.evaluate import (
    RESULT_KEYS,
    architecture_label,
    check_image,
    coding_multiple,
    evaluate_image,
    load_model,
)
from energylab.models import unwrap_model
from energylab.rundir import AnalysisDir, RunDir
from energylab.train import package_versions

__all__ = ["AnalysisImages", "analysis_images", "analyze", "analyze_model", "main", "statistics_of"]

CROP_MULTIPLE = 64
"""Analysed images are centre-cropped to a multiple of ``max(CROP_MULTIPLE, downsampling factor)``:
the latent must split into the two wavelet levels of ``subband_energy`` (``y`` is 1/16 of the image)."""


@dataclass(frozen=True)
class AnalysisImages:
    """The images of an analysis, decoded one at a time on iteration.

    Attributes:
        source: ``"builtin"`` or the folder's absolute path.
        names: image names, in order.
        paths: their files (None for the built-in set, which is held in memory: two small images).
    """

    source: str
    names: tuple[str, ...]
    paths: tuple[str, ...] | None

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        if self.paths is None:
            yield from builtin_images(self.names)
            return
        for name, path in zip(self.names, self.paths, strict=True):
            yield name, load_image(path)


def analysis_images(data: str, limit: int | None = None) -> AnalysisImages:
    """The images to analyse: ``"builtin"`` (its test photographs) or a folder (every image of a
    flat folder, the ``test/`` images of a CompressAI layout), sorted by name; the first ``limit``.

    Raises:
        DataError: a missing folder or one without readable images (naming it).
        ValueError: ``limit`` below 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"the image limit must be at least 1, got {limit}")
    if data == "builtin":
        return AnalysisImages("builtin", BUILTIN_TEST[:limit], None)
    index = index_folder(data)
    images = index.test if index.layout == "compressai" else index.train + index.test
    images = sorted(images, key=lambda im: im.name)[:limit]
    return AnalysisImages(index.source, tuple(im.name for im in images), tuple(im.path for im in images))


def _plain(value: Any) -> Any:
    """A JSON-ready form of a record value: numbers (Python, NumPy or one-element tensors) as float
    or int, non-finite as None; lists and dicts converted element-wise; other values unchanged."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def statistics_of(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{layer: {field: value}}`` from :meth:`LatentProbe.records`: every field but ``layer`` and
    ``step``, converted to JSON-ready values (non-finite numbers become None)."""
    return {r["layer"]: {k: _plain(v) for k, v in r.items() if k not in ("layer", "step")}
            for r in records}


def _centre_multiple(x: Tensor, multiple: int) -> Tensor | None:
    h, w = (x.shape[-2] // multiple) * multiple, (x.shape[-1] // multiple) * multiple
    if not h or not w:
        return None
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def analyze_model(
    model: nn.Module,
    images: AnalysisImages,
    *,
    bitstream: bool = False,
    device: torch.device | str = "cpu",
    label: str = "",
) -> tuple[list[dict], dict[str, np.ndarray], dict[str, float | None] | None]:
    """Run ``images`` through ``model`` (eval mode, no gradients) under a :class:`LatentProbe`.

    Args:
        model: a loaded model (e.g. :func:`energylab.evaluate.load_model`), on ``device``.
        images: what to analyse; each is centre-cropped (see the module docstring).
        bitstream: also code each whole image for real (the model is ``update()``-d in place).
        device: where the images go.
        label: the progress bar's text.

    Returns:
        ``(records, arrays, bitstream)``: the probe's records (one flat dict per layer), its
        arrays (``cov/<layer>``, ``energies/<layer>``, ``probe_y``), and the mean over images of
        :data:`energylab.evaluate.RESULT_KEYS` (None if ``bitstream`` is off; a key is None if any
        image's value is).

    Raises:
        ValueError: no image is large enough for the crop (``DataError``), or a bad image
            (:func:`energylab.evaluate.check_image`).
    """
    from tqdm import tqdm

    model = unwrap_model(model).eval()
    multiple = max(CROP_MULTIPLE, int(getattr(model, "downsampling_factor", CROP_MULTIPLE)))
    if bitstream:
        model.update(force=True)
    probe = LatentProbe(model)
    rows, used = [], 0
    for name, x in tqdm(images, total=len(images), desc=label or None, unit="image", disable=None,
                        leave=False):
        check_image(name, x)
        crop = _centre_multiple(x, multiple)
        if crop is None:
            warnings.warn(f"{name}: {x.shape[-2]}x{x.shape[-1]} is smaller than {multiple}x{multiple}; "
                          f"skipped", DataWarning, stacklevel=2)
            continue
        with probe, torch.no_grad():
            model(crop[None].to(device))
        used += 1
        if bitstream:
            rows.append(evaluate_image(model, x, coding_multiple(model), name=name))
    if not used:
        from energylab.data import DataError

        raise DataError(f"no image of {images.source} is at least {multiple}x{multiple}")
    results = None
    if bitstream:
        values = {k: [r[k] for r in rows] for k in RESULT_KEYS}
        results = {k: None if None in v else sum(v) / len(v) for k, v in values.items()}
    return probe.records(0), probe.arrays(), results


def _name(path: Path) -> str:
    """A model's name: ``<variant>/<seed dir>`` for a run directory, else the file's stem."""
    path = path.expanduser()
    run = path if path.is_dir() else path.parent
    if RunDir(run).is_run():
        return f"{run.parent.name}/{run.name}" if run.parent.name else run.name
    return path.name.split(".")[0] or path.name


def _step(path: Path) -> int | None:
    """The training step of a run's weights, if the file says."""
    from energylab.checkpoints import torch_load

    weights = RunDir(path).weights_path() if path.is_dir() else path
    obj = torch_load(weights) if weights is not None else None
    step = obj.get("step") if isinstance(obj, Mapping) else None
    return int(step) if isinstance(step, int) else None


def analyze(
    paths: Sequence[str | Path],
    data: str,
    out: str | Path,
    *,
    arch: Mapping[str, Any] | None = None,
    bitstream: bool = False,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    figures: bool = True,
) -> AnalysisDir:
    """Analyse every model of ``paths`` on the images of ``data``; write ``out`` (an
    :class:`AnalysisDir`: the statistics JSON, arrays, figures).

    Every model is loaded (and its weights checked) before any is run, so bad input fails fast.

    Args:
        paths: run directories or weights files (:func:`energylab.evaluate.load_model`).
        data: ``"builtin"`` or an image folder (:func:`analysis_images`).
        out: the analysis directory.
        arch: for weights files without a config: ``{"model": name, **build_model kwargs}``.
        bitstream: add real-bitstream results per model.
        device: where to run.
        limit: analyse only the first ``limit`` images.
        figures: draw the figures (:func:`energylab.figures.analysis_figures`).

    Raises:
        ValueError: one line naming the file or folder: a missing path, an unreadable or unknown
            checkpoint layout, weights that do not fit the architecture (the first key that does
            not match), a data folder without images.
    """
    images = analysis_images(data, limit)
    loaded = [(Path(p), *load_model(p, arch, device)) for p in paths]
    names = [_name(p) for p, _, _ in loaded]
    for i, name in enumerate(names):
        if names.count(name) > 1:
            names[i] = f"{name}#{i}"
    models, arrays = [], []
    for (path, model, used), name in zip(loaded, names, strict=True):
        records, captured, results = analyze_model(model, images, bitstream=bitstream, device=device,
                                                   label=name)
        models.append({"name": name, "path": str(path), "label": architecture_label(used),
                       "architecture": _plain(used), "step": _step(path),
                       "layers": statistics_of(records), "bitstream": _plain(results)})
        arrays.append(captured)
    analysis = {
        "data": {"source": images.source, "images": list(images.names),
                 "crop": f"centre crop to a multiple of max({CROP_MULTIPLE}, downsampling factor)"},
        "versions": package_versions(),
        "models": models,
    }
    directory = AnalysisDir(out)
    directory.write(analysis, arrays)
    if figures:
        from energylab.figures import analysis_figures

        analysis_figures(directory)
    return directory



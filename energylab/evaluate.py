"""Real-bitstream evaluation of trained models, written in CompressAI's results schema.

``python -m energylab.evaluate RUN [RUN ...] --data DIR --out FILE [--per-image] [--device DEV]``

Each ``RUN`` is one R-D point: a run directory, its final-model or checkpoint file, or a plain
CompressAI state dict (then ``--model NAME`` and the architecture flags it was trained with). The
conventions are those of CompressAI's ``compressai.utils.eval_model``:

* ``model.update(force=True)``, then per image a real ``compress`` / ``decompress``; the image is
  padded (replicating its last row and column, :func:`energylab.data.pad_to_multiple`) to the
  model's ``downsampling_factor`` (64 for the hyperprior models: 4 + 2 stride-2 layers; 64 when a
  model does not say), and the reconstruction is cropped back to the original size;
* ``bpp`` = bytes of every string ``compress`` produced x 8 / (H x W of the original image);
  beside it ``bpp-estimated`` = -log2 of the likelihoods of ``model(x)`` (eval mode, same padded
  input) / the same pixel count, so that a gap between the two (quantiles not fitted, a broken
  entropy model) shows;
* ``psnr-rgb`` (dB) and ``ms-ssim-rgb`` on the reconstruction rounded to 8 bits,
  ``round(clamp(x_hat, 0, 1) * 255)``, against the original rounded the same way, on the 0..255
  scale. MS-SSIM is ``pytorch_msssim.ms_ssim`` (5 scales, 11x11 Gaussian window, the weights of
  Wang et al. 2003), as in CompressAI; it needs both sides of the image above 160 pixels, so for a
  smaller image it is ``null`` (no fewer-scale variant, whose numbers would not be comparable);
* ``encoding_time`` / ``decoding_time``: wall-clock seconds of ``compress`` / ``decompress``
  (after a device synchronisation on CUDA), entropy coding included.

Output JSON: ``{"name", "description", "results": {key: [one value per RUN, in RUN order]}, "runs",
"images"}``, each result averaged over the images, so several runs at different lambdas form one
R-D curve that ``python -m compressai.utils.plot --results-file FILE`` reads. ``--per-image``
adds ``"per_image"``: per run, one dict per image. A value that is not a finite number (PSNR of a
lossless reconstruction, MS-SSIM of a small image) is ``null``, and a run's average of a metric is
``null`` when any image's value is.

Images (``--data``): ``builtin`` (the built-in test photographs,
:data:`energylab.data.BUILTIN_TEST`), a folder in CompressAI's layout (its ``test/`` images) or any
other folder (**all** its images, sorted by name, like CompressAI's ``eval_model``; not the
every-5th test split that training uses for a flat folder). Only the folder's own files count; an
unreadable image file is an error.

Bad input (a missing path, an unreadable or unfitting checkpoint, no images) prints
``error: <one line>`` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import compressai
import numpy as np
import torch
from pytorch_msssim import ms_ssim
from torch import Tensor, nn

from energylab import cli
from energylab.auxt import variant_name
from energylab.data import (
    BUILTIN_TEST,
    DataError,
    builtin_images,
    crop_to,
    image_extensions,
    load_image,
    pad_to_multiple,
)
from energylab.models import build_model
from energylab.rundir import RunDir, RunDirError

__all__ = [
    "ARCH_KEYS",
    "EvaluationError",
    "architecture_label",
    "evaluate_image",
    "evaluate_model",
    "load_images",
    "load_model",
    "main",
]

ARCH_KEYS = ("N", "M", "auxt", "remove", "wavelet", "g_a_placement", "g_s_placement")
"""Keyword arguments of :func:`energylab.models.build_model` read from a run's ``args`` (besides
``model``, the registry name)."""

STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "network")
"""Where a checkpoint may nest its state dict: energylab's ``final.pt``/``checkpoint.pt`` use
``model``; CompressAI's training example ``state_dict``; its ``eval_model`` also accepts the
others."""

DYNAMIC_BUFFERS = frozenset({"_quantized_cdf", "_offset", "_cdf_length", "scale_table"})
"""Entropy-coder buffers whose size depends on the last ``update()``; CompressAI resizes them on
load and ``update(force=True)`` rewrites them, so their shapes are not compared."""

MSSSIM_MIN_SIDE = 161
"""Smallest image side for 5-scale MS-SSIM with an 11-pixel window: (11 - 1) * 2**4 + 1."""

CHECKPOINT_NUMPY_GLOBALS = [
    np.core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]
"""Allowed besides tensors when unpickling a checkpoint: NumPy arrays (a training checkpoint's
NumPy RNG state). Everything else goes through ``torch.load(weights_only=True)``."""


class EvaluationError(ValueError):
    """Bad evaluation input; the message is one line naming the path and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# ---------------------------------------------------------------------------------------------
# Loading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_failure(exc: Exception) -> str:
    """A one-line reason for a failed ``torch.load``, without PyTorch's page of advice."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = " ".join(text.split(marker, 1)[1].split("Check the documentation")[0].split())
        return (
            f"not a checkpoint that torch.load(weights_only=True) accepts ({detail[:160]}); only "
            f"tensors, NumPy arrays and plain containers are loaded"
        )
    return f"not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})"


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(CHECKPOINT_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise EvaluationError(f"{path}: cannot read the file (permission denied)") from None
    except Exception as exc:  # torch.load raises many kinds; all of them mean "unreadable"
        raise EvaluationError(f"{path}: {_load_failure(exc)}") from None


def _state_dict(obj: Any, where: Path) -> dict[str, Tensor]:
    """The state dict in a loaded checkpoint, with a DataParallel/DDP ``module.`` prefix removed."""
    if not isinstance(obj, Mapping):
        raise EvaluationError(f"{where}: holds a {type(obj).__name__}, not a checkpoint dict")
    sd = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), obj)
    if not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise EvaluationError(
            f"{where}: no state dict (a dict of tensors, at the top level or under "
            f"{', '.join(map(repr, STATE_DICT_KEYS))})"
        )
    if all(k.startswith("module.") for k in sd):
        return {k.removeprefix("module."): v for k, v in sd.items()}
    return dict(sd)


def _arch_from_config(config: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """``{"model": name, **build_model kwargs}`` from a run's config (``{"args": {...}}`` or the
    ``args`` themselves)."""
    args = config.get("args", config)
    if not isinstance(args, Mapping) or not isinstance(args.get("model"), str):
        raise EvaluationError(f"{where}: config has no 'model' entry in its args")
    arch = {"model": args["model"]}
    arch.update({k: args[k] for k in ARCH_KEYS if args.get(k) is not None})
    return arch


def _build(arch: Mapping[str, Any], where: Path) -> nn.Module:
    kwargs = {k: arch[k] for k in ARCH_KEYS if k in arch}
    kwargs["remove"] = tuple(kwargs.get("remove", ()))
    try:
        return build_model(arch["model"], **kwargs)
    except (ValueError, TypeError) as exc:
        raise EvaluationError(f"{where}: cannot build the model: {_first_line(exc)}") from None


def _shape(t: Tensor) -> str:
    return f"({', '.join(map(str, t.shape))})"


def _check_fits(model: nn.Module, sd: Mapping[str, Tensor], where: Path, arch: str) -> None:
    """Raise one line for the first key (in the model's order) that is missing or misshapen, then
    for the first key the model does not have."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in sd:
            raise EvaluationError(f"{where}: checkpoint lacks {key!r} {_shape(tensor)} of model {arch}")
        if key.rsplit(".", 1)[-1] not in DYNAMIC_BUFFERS and sd[key].shape != tensor.shape:
            raise EvaluationError(
                f"{where}: {key!r} is {_shape(sd[key])} in the checkpoint but "
                f"{_shape(tensor)} in model {arch}"
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise EvaluationError(f"{where}: checkpoint has {extra[0]!r}{more}, which model {arch} lacks")


def architecture_label(arch: Mapping[str, Any]) -> str:
    """A short name for an architecture: ``mbt2018-mean``, ``mbt2018-mean+auxt-no-scaling``, ...

    The model name, then ``+`` and :func:`energylab.auxt.variant_name` when AuxT is on.
    """
    label = str(arch["model"])
    if arch.get("auxt"):
        label += "+" + variant_name(True, arch.get("remove", ()), arch.get("wavelet", "haar"))
    return label


def _describe(arch: Mapping[str, Any]) -> str:
    sizes = " ".join(f"{k}={arch[k]}" for k in ("N", "M") if k in arch)
    return " ".join(filter(None, (architecture_label(arch), sizes)))


def load_model(
    path: str | Path,
    arch: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a model and load trained weights into it, in eval mode on ``device``.

    ``path`` is one of:

    * a run directory (:class:`energylab.rundir.RunDir`): architecture from its config's
      ``args``; weights from its final model, else its checkpoint;
    * a run's final-model or checkpoint file: weights under ``model``, architecture from its
      ``config`` (the run's config dict, or its ``args`` directly);
    * a plain CompressAI state dict, at the top level or under ``state_dict`` (or
      ``model_state_dict``, ``network``), keys with or without the ``module.`` prefix of
      DataParallel/DDP: the architecture must come from ``arch``.

    Args:
        path: see above.
        arch: for a plain state dict only: ``{"model": registry name, **build_model kwargs}``
            (``N``, ``M``, ``auxt``, ``remove``, ``wavelet``, ``g_a_placement``,
            ``g_s_placement``).
        device: where to put the model.

    Returns:
        ``(model, architecture)``; the model is not yet ``update()``-d
        (:func:`evaluate_model` does that).

    Raises:
        EvaluationError: (one line naming ``path``) a missing or unreadable path, a run
            directory without a config or weights, a plain state dict without ``arch``, a
            checkpoint carrying its own config together with ``arch``, an unknown architecture,
            or weights that do not fit: the first missing or differently shaped key in the
            model's order (with both shapes), else the first key the model lacks.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise EvaluationError(f"{path}: no such file or run directory")
    config = None
    if path.is_dir():
        run = RunDir(path)
        try:
            config = run.config()
        except RunDirError as exc:
            raise EvaluationError(str(exc)) from None
        weights = run.weights_path()
        if weights is None:
            raise EvaluationError(f"{path}: run directory has no trained weights (final model or "
                                  "checkpoint)")
    else:
        weights = path
    obj = _torch_load(weights)
    sd = _state_dict(obj, weights)
    if config is None and isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping):
        config = obj["config"]
    if config is not None and arch is not None:
        raise EvaluationError(
            f"{path}: carries its own architecture (config); drop --model and the architecture flags"
        )
    if config is None and arch is None:
        raise EvaluationError(
            f"{path}: a plain state dict; give its architecture with --model NAME (and --N, --M, "
            f"--auxt, ... as trained)"
        )
    arch = dict(arch) if arch is not None else _arch_from_config(config, path)
    model = _build(arch, path)
    _check_fits(model, sd, weights, _describe(arch))
    model.load_state_dict(sd)
    return model.to(device).eval(), arch


# ---------------------------------------------------------------------------------------------
# Images


def load_images(data: str) -> list[tuple[str, Tensor]]:
    """The evaluation images as ``(name, (3, H, W) float32 in [0, 1])``, sorted by file name.

    ``data``: ``"builtin"`` (:data:`energylab.data.BUILTIN_TEST`), a CompressAI-layout folder
    (its ``test/`` images) or a folder (all its own image files, by extension).

    Raises:
        DataError: a missing folder, no image files, an unreadable image (naming it).
    """
    if data == "builtin":
        return builtin_images(BUILTIN_TEST)
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (pass a folder of images or 'builtin')")
    folder = root / "test" if (root / "test").is_dir() else root
    exts = image_extensions()
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
    )
    if not files:
        raise DataError(f"{folder}: no image files (looked for .png, .jpg, ... by extension)")
    return [(p.name, load_image(p)) for p in files]


# ---------------------------------------------------------------------------------------------
# Evaluation


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_bytes(strings: Any) -> int:
    """Total length of the byte strings in ``compress()``'s (nested) ``strings`` lists."""
    if isinstance(strings, bytes | bytearray):
        return len(strings)
    return sum(_count_bytes(s) for s in strings)


@torch.no_grad()
def evaluate_image(model: nn.Module, x: Tensor, multiple: int) -> dict[str, Any]:
    """Compress, decompress and measure one image with an ``update()``-d model in eval mode.

    Args:
        model: a CompressAI model (``compress``/``decompress``/``forward``).
        x: ``(3, H, W)`` float in ``[0, 1]``; moved to the model's device.
        multiple: pad H and W up to a multiple of this before coding.

    Returns:
        ``{"psnr-rgb" (dB), "ms-ssim-rgb", "bpp", "bpp-estimated", "encoding_time",
        "decoding_time" (s), "bytes", "height", "width"}``; see the module docstring for how each
        is computed. PSNR / MS-SSIM are ``None`` when not finite / the image is too small.
    """
    device = next(model.parameters()).device
    h, w = x.shape[-2:]
    padded, size = pad_to_multiple(x.unsqueeze(0).to(device), multiple)

    _sync(device)
    start = time.perf_counter()
    enc = model.compress(padded)
    _sync(device)
    encoding_time = time.perf_counter() - start
    start = time.perf_counter()
    dec = model.decompress(enc["strings"], enc["shape"])
    _sync(device)
    decoding_time = time.perf_counter() - start

    x_hat = crop_to(dec["x_hat"], size)
    n_bytes = _count_bytes(enc["strings"])
    likelihoods = model(padded)["likelihoods"].values()
    estimated = sum(float(torch.log2(lk).sum()) for lk in likelihoods) / -(h * w)

    org = (crop_to(padded, size) * 255).clamp(0, 255).round().double()
    rec = (x_hat * 255).clamp(0, 255).round().double()
    mse = float((org - rec).pow(2).mean())
    psnr = 10 * math.log10(255**2 / mse) if mse > 0 else math.inf
    msssim = float(ms_ssim(org, rec, data_range=255)) if min(h, w) >= MSSSIM_MIN_SIDE else math.nan
    return {
        "psnr-rgb": _finite(psnr),
        "ms-ssim-rgb": _finite(msssim),
        "bpp": n_bytes * 8 / (h * w),
        "bpp-estimated": _finite(estimated),
        "encoding_time": encoding_time,
        "decoding_time": decoding_time,
        "bytes": n_bytes,
        "height": h,
        "width": w,
    }


RESULT_KEYS = (
    "psnr-rgb",
    "ms-ssim-rgb",
    "bpp",
    "bpp-estimated",
    "encoding_time",
    "decoding_time",
)
"""The averaged results, the keys of the output's ``results``."""


def evaluate_model(
    model: nn.Module, images: Sequence[tuple[str, Tensor]]
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """``update(force=True)`` the model, then :func:`evaluate_image` on every image.

    The padding multiple is the model's ``downsampling_factor`` (CompressAI's models declare it),
    else 64.

    Returns:
        ``(averages, per_image)``: ``averages[key]`` for each of :data:`RESULT_KEYS`, the mean
        over images (``None`` if any image's value is ``None``); ``per_image`` the
        :func:`evaluate_image` dicts with ``"image": name`` added, in order.

    Raises:
        EvaluationError: no images.
    """
    if not images:
        raise EvaluationError("no images to evaluate")
    model.eval()
    model.update(force=True)
    multiple = int(getattr(model, "downsampling_factor", 64))
    per_image = [{"image": name, **evaluate_image(model, x, multiple)} for name, x in images]
    averages: dict[str, float | None] = {}
    for key in RESULT_KEYS:
        values = [r[key] for r in per_image]
        averages[key] = None if None in values else sum(values) / len(values)
    return averages, per_image


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m energylab.evaluate",
        description="Real-bitstream evaluation (compress/decompress) of trained models; one R-D "
        "point per RUN, written in CompressAI's results JSON schema.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run directory, its final model or checkpoint file, or plain CompressAI state dict",
    )
    p.add_argument(
        "--data",
        default="builtin",
        help="'builtin' (default), a CompressAI-layout folder (its test/) or a folder of images",
    )
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--per-image", action="store_true", help="add per-image results")
    p.add_argument("--name", help="the JSON's 'name' (default: the architectures' labels)")
    cli.add_device_arguments(p, default="cpu", choices=None)
    # the architecture of a plain state dict, as trained (a run carries its own)
    cli.add_model_arguments(p, defaults=False)
    cli.add_auxt_arguments(p, defaults=False)
    return p


def _arch_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    flags = {k: getattr(args, k) for k in ARCH_KEYS}
    given = {k: v for k, v in flags.items() if v is not None and v is not False}
    if args.model is None:
        if given:
            names = ", ".join("--" + k.replace("_", "-") for k in given)
            raise EvaluationError(f"{names} describe a plain state dict's model; add --model NAME")
        return None
    return {"model": args.model, **given}


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise EvaluationError(f"--device {name}: {_first_line(exc)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {name}: CUDA is not available")
    return device


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def _run(args: argparse.Namespace) -> dict[str, Any]:
    arch = _arch_from_args(args)
    device = _device(args.device)
    images = load_images(args.data)
    results: dict[str, list[float | None]] = {k: [] for k in RESULT_KEYS}
    runs, per_image, labels = [], [], []
    loaded = [load_model(run, arch, device) for run in args.runs]  # every RUN checked first
    for run, (model, used) in zip(args.runs, loaded, strict=True):
        averages, rows = evaluate_model(model, images)
        for key in RESULT_KEYS:
            results[key].append(averages[key])
        runs.append({"path": str(run), "architecture": used})
        per_image.append(rows)
        labels.append(architecture_label(used))
        print(f"{run}: " + ", ".join(f"{k} {_fmt(averages[k])}" for k in RESULT_KEYS))
    output: dict[str, Any] = {
        "name": args.name or ",".join(dict.fromkeys(labels)),
        "description": f"Inference ({compressai.get_entropy_coder()}), energylab.evaluate, "
        f"bpp from real bitstreams",
        "results": results,
        "runs": runs,
        "images": [name for name, _ in images],
    }
    if args.per_image:
        output["per_image"] = per_image
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 for bad input)."""
    args = _parser().parse_args(argv)

    def body() -> None:
        output = _run(args)
        out = Path(args.out).expanduser()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(output, indent=2, allow_nan=False) + "\n")
        except OSError as exc:
            raise EvaluationError(f"{out}: cannot write ({_first_line(exc)})") from None

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())

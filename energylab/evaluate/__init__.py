"""Real-bitstream evaluation of trained models, written in CompressAI's results schema.

``python -m energylab.evaluate RUN [RUN ...] --data DIR --out FILE [--per-image] [--device DEV]``

Each ``RUN`` is one R-D point: a run directory, its final-model or checkpoint file, or a plain
CompressAI state dict (then ``--model NAME`` and the architecture flags it was trained with). The
conventions are those of CompressAI's ``compressai.utils.eval_model``:

* the images are checked first (:func:`check_image`): ``(3, H, W)`` floats in ``[0, 1]``; values
  outside it (an image multiplied by 255) or a brightest value at most 1/255 (divided by 255
  twice) are refused with one line naming the image and its range;
* then the weights (:func:`check_weights`): a model with a NaN or infinite
  parameter or buffer is not coded (CompressAI's rANS coder would hang on the NaN latents, or
  write garbage) and :class:`NonFiniteError` names the tensors; while coding, every floating tensor
  handed to an entropy model's ``compress`` / ``quantize`` / ``build_indexes`` (latents, means,
  scales) is checked too, naming the module and the argument;
* the quantiles: when the entropy bottlenecks' ``aux_loss`` per quantile
  (:func:`aux_loss_per_quantile`) exceeds :data:`UNFITTED_AUX_LOSS` the quantiles have not
  converged (never fitted by the aux optimiser) and the coder's tables would not match the
  likelihoods, so they are fitted first (:func:`fit_quantiles`; ``eval_model`` does not), the fit
  recorded as ``quantiles-fitted`` with ``aux-loss-as-trained`` and a note. ``fit=True``
  (``--fit-quantiles``) fits whatever the aux loss, ``fit=False`` (``--no-fit-quantiles``) never;
  a converged model is coded as ``eval_model`` codes it;
* ``model.update(force=True)``, then per image a real ``compress`` / ``decompress``. By default
  (``padding="compressai"``) the image is padded as ``eval_model`` pads it: centred, with zeros,
  to a multiple of 64 (``compressai.ops.compute_padding``), and the reconstruction is unpadded the same way;
  ``padding="replicate"`` pads bottom/right replicating the last row and column
  (:func:`energylab.data.pad_to_multiple`) to the model's ``downsampling_factor``. The padding
  used is recorded with every image;
* ``bpp`` = bytes of every string ``compress`` produced x 8 / (H x W of the original image);
  beside it ``bpp-estimated`` = -log2 of the likelihoods of ``model(x)`` (eval mode, same padded
  input) / the same pixel count. When they differ by more than :data:`BPP_GAP_LIMIT` of the
  estimate a ``RuntimeWarning`` names the likely cause, judged in this order: quantiles not
  converged (the aux loss per quantile above :data:`UNFITTED_AUX_LOSS`), latents outside the entropy
  bottleneck's quantile range (escape-coded), stale coder tables; recorded in the image's
  ``notes`` with ``bpp-gap``, ``escape-share`` and the model's ``aux-loss`` per quantile;
* encoder/decoder agreement: the decoder's ``y_hat`` (the input of ``g_s`` in ``decompress``) is
  compared with the encoder's ``y`` (the output of ``g_a`` in ``compress``); every CompressAI
  model quantises as ``round(y - mu) + mu``, so ``|y_hat - y| <= 1/2`` when both sides share
  their entropy parameters. ``latent-errors`` counts the values off by more, and
  ``latent-max-abs-error`` is the largest difference (a warning when the count is not 0);
* ``psnr-rgb`` (dB) and ``ms-ssim-rgb`` on the reconstruction rounded to 8 bits,
  ``round(clamp(x_hat, 0, 1) * 255)``, against the original rounded the same way, on the 0..255
  scale, as ``eval_model``'s ``compute_metrics``. MS-SSIM is ``pytorch_msssim.ms_ssim`` (5 scales,
  11x11 Gaussian window, the weights of Wang et al. 2003); it needs both sides of the image above
  160 pixels, so for a smaller image it is ``null`` (no fewer-scale variant, whose numbers would
  not be comparable; ``eval_model`` fails there), the reason in the image's ``notes`` and printed;
  PSNR above :data:`IMPLAUSIBLE_PSNR` dB at under :data:`IMPLAUSIBLE_BPP` bpp is flagged as
  implausible (a warning and a note);
* ``encoding_time`` / ``decoding_time``: wall-clock seconds of ``compress`` / ``decompress``
  (after a device synchronisation on CUDA), entropy coding included.

Output JSON: ``{"name", "description", "results": {key: [one value per RUN, in RUN order]}, "runs",
"images"}``, each result averaged over the images, so several runs at different lambdas form one
R-D curve that ``python -m compressai.utils.plot --results-file FILE`` reads. ``images`` holds
each image's name, height, width and the conversion its file went through (alpha, CMYK, ...;
:func:`conversion_rule`); each entry of ``runs`` its path, architecture (with the checkpoint layout
recognised) and :func:`run_record` (padding, quantiles, largest bpp gap, latent errors, every
note). ``--per-image`` adds ``"per_image"``: per run, one dict per image (``null`` for a run not
coded). A value that is not a finite number (PSNR of a lossless reconstruction, MS-SSIM of a small
image) is ``null``, and a run's average of a metric is ``null`` when any image's value is; the file
is strict JSON (:func:`energylab.rundir.to_json`).

Images (``--data``): ``builtin`` (the built-in test photographs,
:data:`energylab.data.BUILTIN_TEST`), a folder in CompressAI's layout (its ``test/`` images) or any
other folder (**all** its images, sorted by name, like CompressAI's ``eval_model``; not the
every-5th test split that training uses for a flat folder). Only the folder's own files count; an
unreadable image file is an error. Files are decoded by :func:`energylab.data.load_image`: for 8-bit
RGB files the pixels are those ``eval_model`` reads; for other modes the rule applied is recorded
(``eval_model`` calls ``Image.convert("RGB")``, which drops alpha instead of compositing it, and it
also descends into subfolders).

Bad input (a missing path, an unreadable or unfitting checkpoint, no images) prints
``error: <one line>`` on stderr and exits with status 2, before anything is coded or written.

A run whose weights, latents, means or scales are not finite (:class:`NonFiniteError`) is bad input
found while evaluating: it is not coded, its results are ``null`` and its ``runs`` entry carries
``"not-evaluated"`` (the reason, naming the tensor) and the same line in ``notes``; every other RUN
is evaluated and the JSON is written all the same. The command then prints ``error: <RUN>: not
evaluated (...); its results are null in <out>`` on stderr and exits with status 2 (bad input, as
:mod:`energylab.cli` documents), so a script sees the failure and still has the other results.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, EntropyModel
from compressai.ops import compute_padding
from PIL import Image
from pytorch_msssim import ms_ssim
from torch import Tensor, nn

from energylab import stats
from energylab.auxt import variant_name
from energylab.checkpoints import CheckpointError, extract_state_dict, first_line, load_weights, torch_load
from energylab.data import (
    BUILTIN_TEST,
    DataError,
    builtin_images,
    crop_to,
    image_files,
    load_image,
    pad_to_multiple,
    shown_name,
)
from energylab.models import build_model, unwrap_model
from energylab.rundir import RunDir, RunDirError

__all__ = [
    "ARCH_KEYS",
    "BPP_GAP_LIMIT",
    "CODER_OVERHEAD_BYTES",
    "IMPLAUSIBLE_BPP",
    "IMPLAUSIBLE_PSNR",
    "PADDINGS",
    "RESULT_KEYS",
    "EvaluationError",
    "NonFiniteError",
    "arch_from_args",
    "architecture_label",
    "aux_loss_per_quantile",
    "check_image",
    "check_weights",
    "coding_multiple",
    "conversion_rule",
    "evaluate_image",
    "evaluate_model",
    "fit_quantiles",
    "image_conversions",
    "image_records",
    "load_images",
    "load_model",
    "main",
    "run_record",
]

ARCH_KEYS = ("N", "M", "auxt", "remove", "wavelet", "g_a_placement", "g_s_placement")
"""Keyword arguments of :func:`energylab.models.build_model` read from a run's ``args`` (besides
``model``, the registry name)."""

MSSSIM_MIN_SIDE = 161
"""Smallest image side for 5-scale MS-SSIM with an 11-pixel window: (11 - 1) * 2**4 + 1."""


class EvaluationError(ValueError):
    """Bad evaluation input; the message is one line naming the path and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class NonFiniteError(EvaluationError):
    """A model that cannot be coded because a tensor is not finite (NaN or infinite): a weight
    (:func:`check_weights`), or a latent, mean or scale on its way to the entropy coder. The
    message is one line naming the tensor(s); nothing was coded."""


# ---------------------------------------------------------------------------------------------
# Loading


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
        raise EvaluationError(f"{where}: cannot build the model: {first_line(exc)}") from None


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
      ``model_state_dict``, ``network``): the architecture must come from ``arch``.

    Every key layout CompressAI's own loaders accept loads (``module.`` prefixes of
    DataParallel/DDP, legacy entropy-bottleneck keys, ...): see :mod:`energylab.checkpoints`.

    Args:
        path: see above.
        arch: for a plain state dict only: ``{"model": registry name, **build_model kwargs}``
            (``N``, ``M``, ``auxt``, ``remove``, ``wavelet``, ``g_a_placement``,
            ``g_s_placement``).
        device: where to put the model.

    Returns:
        ``(model, architecture)``; the model is not yet ``update()``-d
        (:func:`evaluate_model` does that). ``architecture["checkpoint"]`` records the weights
        file and the layout recognised: ``{"file", "format", "container", "renames"}``
        (:class:`energylab.checkpoints.CheckpointLayout`).

    Raises:
        EvaluationError: (one line naming ``path``) a missing or unreadable path, a run
            directory without a config or weights, a plain state dict without ``arch``, a
            checkpoint carrying its own config together with ``arch``, an unknown architecture,
            no state dict (listing the top-level keys found), or weights that do not fit: the
            first missing or differently shaped key in the model's order (with both shapes),
            else the first key the model lacks.
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
    try:
        obj = torch_load(weights)
        extract_state_dict(obj, weights)  # no state dict: fail before the architecture questions
    except CheckpointError as exc:
        raise EvaluationError(str(exc)) from None
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
    try:
        layout = load_weights(model, obj, weights, _describe(arch))
    except CheckpointError as exc:
        raise EvaluationError(str(exc)) from None
    arch["checkpoint"] = {"file": str(weights), **layout.as_dict()}
    return model.to(device).eval(), arch


# ---------------------------------------------------------------------------------------------
# Images


def _image_files(data: str) -> list[Path]:
    """The image files of a folder ``data`` (its ``test/`` if it has one), sorted by name
    (:func:`energylab.data.image_files`: bad symbolic links left out with a warning naming them)."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (pass a folder of images or 'builtin')")
    folder = root / "test" if (root / "test").is_dir() else root
    files = image_files(folder)
    if not files:
        raise DataError(f"{shown_name(folder)}: no image files (looked for .png, .jpg, ... by extension)")
    return files


def load_images(data: str) -> list[tuple[str, Tensor]]:
    """The evaluation images as ``(name, (3, H, W) float32 in [0, 1])``, sorted by file name.

    ``data``: ``"builtin"`` (:data:`energylab.data.BUILTIN_TEST`), a CompressAI-layout folder
    (its ``test/`` images) or a folder (all its own image files, by extension).

    Raises:
        DataError: a missing folder, no image files, an unreadable image (naming it).
    """
    if data == "builtin":
        return builtin_images(BUILTIN_TEST)
    return [(shown_name(p), load_image(p)) for p in _image_files(data)]


def conversion_rule(mode: str, transparency: bool = False) -> str:
    """How :func:`energylab.data.load_image` turns a Pillow image of ``mode`` into RGB in
    ``[0, 1]`` (the rules of :mod:`energylab.data`'s docstring), as one line for the results JSON.

    ``transparency``: a palette (``P``) image with a transparent index.
    """
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or (mode == "P" and transparency):
        return f"{mode}: alpha composited over white, rgb * alpha + (1 - alpha)"
    rules = {
        "RGB": "RGB: 8-bit values / 255",
        "L": "L: grayscale / 255 repeated on R, G, B",
        "1": "1: bilevel as grayscale 0 or 1, repeated on R, G, B",
        "P": "P: palette expanded to RGB",
        "I": "I: 32-bit integer grayscale / 65535 repeated on R, G, B",
        "F": "F: float grayscale (in [0, 1]) repeated on R, G, B",
    }
    if mode.startswith("I;16"):
        return f"{mode}: 16-bit grayscale / 65535 repeated on R, G, B"
    return rules.get(mode, f"{mode}: converted to RGB by Pillow (Image.convert('RGB'))")


def image_conversions(data: str) -> dict[str, str]:
    """:func:`conversion_rule` of every image :func:`load_images` returns for ``data``, by name
    (from the files' headers; the built-in photographs are 8-bit RGB).

    Raises:
        DataError: as :func:`load_images`, naming the file.
    """
    if data == "builtin":
        return {name: conversion_rule("RGB") for name in BUILTIN_TEST}
    rules = {}
    for path in _image_files(data):
        try:
            with Image.open(path) as im:
                rules[shown_name(path)] = conversion_rule(im.mode, "transparency" in im.info)
        except (OSError, ValueError) as exc:
            raise DataError(f"{shown_name(path)}: not an image ({first_line(exc)})") from None
    return rules


# ---------------------------------------------------------------------------------------------
# Evaluation

PADDINGS = ("compressai", "replicate")
"""How :func:`evaluate_image` pads an image to the coding multiple. ``"compressai"`` (default):
``compressai.utils.eval_model``'s, centred zero padding from ``compressai.ops.compute_padding``
(to a multiple of 64, or of the model's downsampling factor if larger); ``"replicate"``:
:func:`energylab.data.pad_to_multiple` (bottom/right, replicating the last row and column) to the
model's downsampling factor."""

IMPLAUSIBLE_PSNR = 60.0
IMPLAUSIBLE_BPP = 0.01
"""PSNR above ``IMPLAUSIBLE_PSNR`` dB at fewer than ``IMPLAUSIBLE_BPP`` bits per pixel is flagged
as implausible (a near-constant image, or one on the wrong scale)."""

BPP_GAP_LIMIT = 0.10
"""Real bpp and estimated bpp (the likelihoods) differing by more than this fraction of the
estimate, and by more than the coder's fixed overhead (:data:`CODER_OVERHEAD_BYTES` per string), is
flagged with the likely cause."""

CODER_OVERHEAD_BYTES = 8
"""Bytes a CompressAI rANS string may cost beyond its information content (the 32-bit final state
and word alignment: an all-zero 4x4 latent codes to 8 bytes)."""

ESCAPE_LIMIT = 1e-3
"""Share of an entropy bottleneck's input outside its quantile range above which the gap's likely
cause is named as latents wider than the learned density."""

UNFITTED_AUX_LOSS = 1.0
"""``aux_loss`` per quantile (3 per channel) above which the quantiles count as not converged:
each term is ``|logit(CDF(q)) - target|``, so above 1 a quantile's tail probability is off by more
than a factor e on average (0 when fitted; CompressAI's initial quantiles give about 10-15, a model
trained without the aux optimiser stays there). :func:`evaluate_model` then fits them before
coding unless told not to (``fit=False``)."""


def check_image(name: str, x: Tensor) -> None:
    """Refuse an evaluation image that is not ``(3, H, W)`` float in ``[0, 1]`` on the 8-bit scale.

    Raises:
        EvaluationError: one line naming the image and the problem: wrong shape or dtype, NaN or
            infinity, values outside ``[0, 1]`` (an image multiplied by 255), or a brightest value
            at most 1/255 but above 0 (an image divided by 255 twice). An all-zero image passes.
    """
    if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[0] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise EvaluationError(f"image {name}: expected a (3, H, W) tensor, got {shape}")
    if not x.is_floating_point():
        raise EvaluationError(f"image {name}: dtype {x.dtype}; expected floats in [0, 1]")
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise EvaluationError(f"image {name}: contains NaN or infinite values")
    if lo < 0 or hi > 1:
        raise EvaluationError(
            f"image {name}: values in [{lo:g}, {hi:g}], outside [0, 1] (multiplied by 255?); "
            f"evaluation images are floats in [0, 1]"
        )
    if 0 < hi <= 1 / 255:
        raise EvaluationError(
            f"image {name}: values in [{lo:g}, {hi:g}], brightest at most 1/255 (divided by 255 "
            f"twice?); evaluation images are floats in [0, 1]"
        )


def _entropy_bottlenecks(model: nn.Module) -> list[EntropyBottleneck]:
    return [m for m in model.modules() if isinstance(m, EntropyBottleneck)]


def aux_loss_per_quantile(model: nn.Module) -> float | None:
    """``model.aux_loss()`` divided by the number of quantiles (3 per entropy-bottleneck
    channel): the mean absolute error of the quantiles' CDF logits; ``None`` without an
    entropy bottleneck. 0 when the quantiles are fitted."""
    ebs = _entropy_bottlenecks(unwrap_model(model))
    if not ebs:
        return None
    with torch.no_grad():
        return float(sum(eb.loss() for eb in ebs)) / sum(eb.quantiles.numel() for eb in ebs)


def fit_quantiles(model: nn.Module, steps: int = 60) -> float | None:
    """Fit every entropy bottleneck's quantiles, **in place**, until ``aux_loss`` is ~0.

    ``aux_loss`` is the sum of ``|logit(CDF(q)) - target|`` over the quantiles, each term
    depending on one quantile only and monotone in it, so it is minimised element-wise by bisection
    on the sign of its gradient (its own minimiser instead of the aux optimiser's Adam steps:
    exact to float precision in ``steps`` halvings after the bracket is found). Only the
    ``quantiles`` parameters change; run ``update(force=True)`` afterwards (:func:`evaluate_model`
    does). CompressAI's ``EntropyBottleneck.loss`` is the objective.

    Returns:
        :func:`aux_loss_per_quantile` after fitting (``None`` without an entropy bottleneck).
    """
    model = unwrap_model(model)
    for eb in _entropy_bottlenecks(model):
        q = eb.quantiles

        def slope(values: Tensor, eb: EntropyBottleneck = eb, q: nn.Parameter = q) -> Tensor:
            with torch.no_grad():
                q.copy_(values)
            q.grad = None
            with torch.enable_grad():
                eb.loss().backward()
            return q.grad.sign()

        start = q.detach().clone()
        lo, hi = start.clone(), start.clone()
        width = torch.ones_like(start)
        for _ in range(64):  # widen until lo is below and hi above every root
            low_bad, high_bad = slope(lo) > 0, slope(hi) < 0
            if not (low_bad.any() or high_bad.any()):
                break
            lo = torch.where(low_bad, lo - width, lo)
            hi = torch.where(high_bad, hi + width, hi)
            width = width * 2
        for _ in range(steps):
            mid = (lo + hi) / 2
            above = slope(mid) > 0
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        with torch.no_grad():
            q.copy_((lo + hi) / 2)
        q.grad = None
    return aux_loss_per_quantile(model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_bytes(strings: Any) -> tuple[int, int]:
    """Total length and number of the byte strings in ``compress()``'s (nested) ``strings``."""
    if isinstance(strings, bytes | bytearray):
        return len(strings), 1
    counts = [_count_bytes(s) for s in strings]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _escape_share(inputs: list[tuple[EntropyBottleneck, Tensor]]) -> float | None:
    """Share of the entropy bottlenecks' input values outside their quantile ranges (coded by
    the escape path), over all of them."""
    if not inputs:
        return None
    outside, total = 0, 0
    for eb, y in inputs:
        q = eb.quantiles.detach()
        lo = q[:, 0, 0].view(1, -1, *([1] * (y.ndim - 2)))
        hi = q[:, 0, 2].view(1, -1, *([1] * (y.ndim - 2)))
        outside += int(((y < lo - 0.5) | (y > hi + 0.5)).sum())
        total += y.numel()
    return outside / total


def _gap_cause(escape: float | None, aux: float | None) -> str:
    """The likely cause of a bpp gap: unconverged quantiles first (they also put latents outside
    the quantile range, so an escape share alone does not tell), then escapes, then stale tables."""
    if aux is not None and aux > UNFITTED_AUX_LOSS:
        outside = (f"; {100 * escape:.1f} % of its input lies outside their range (escape-coded)"
                   if escape else "")
        return (
            f"the entropy bottleneck's quantiles are not converged (aux_loss {aux:.3g} per quantile "
            f"> {UNFITTED_AUX_LOSS:g}){outside}: fit them before coding (evaluate's default; "
            f"fit=True, --fit-quantiles) or train with the aux optimiser"
        )
    if escape is not None and escape > ESCAPE_LIMIT:
        return (
            f"{100 * escape:.1f} % of the entropy bottleneck's input lies outside its quantile "
            f"range (escape-coded): the latents are wider than the density it learned (rescaled "
            f"after training, or the entropy model not trained with them)"
        )
    return (
        "the entropy coder's tables do not match the model's likelihoods (update() not run after a "
        "change?)"
    )


def _nonfinite(t: Tensor) -> str | None:
    """``"3 NaN and 1 infinite of 1200 values"`` for a floating tensor holding non-finite values,
    else None."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} infinite"] * bool(inf)
    return f"{' and '.join(parts)} of {t.numel()} values"


def check_weights(model: nn.Module, what: str = "model") -> None:
    """Refuse a model with a parameter or a floating buffer that is not finite.

    Such a model cannot be coded: a NaN weight makes every latent NaN, and CompressAI's rANS coder
    then loops (for hours) on the symbols the NaN turn into; a NaN quantile corrupts the tables.

    Raises:
        NonFiniteError: one line naming the tensors (state-dict keys, in order; the first three,
            then how many more) and how many of their values are NaN or infinite.
    """
    bad = []
    for key, t in unwrap_model(model).state_dict(keep_vars=True).items():
        found = _nonfinite(t.detach())
        if found is not None:
            bad.append(f"{key} ({found})")
    if bad:
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise NonFiniteError(f"{what} has non-finite weights, not coded: {', '.join(bad[:3])}{more}")


class _CodingGuard:
    """While active (``with``), every entropy model's ``compress``, ``quantize`` and
    ``build_indexes`` refuse a floating tensor argument that is not finite (:class:`NonFiniteError`
    naming the argument and the module) before it reaches the entropy coder: the latents, means and
    scales, whichever path a model codes by (CompressAI's ``compress``, or its own rANS calls after
    ``quantize`` / ``build_indexes``, as TCM's)."""

    METHODS = ("compress", "quantize", "build_indexes")

    def __init__(self, model: nn.Module, image: str) -> None:
        self.model, self.image = model, image
        self.patched: list[tuple[nn.Module, str]] = []

    def __enter__(self) -> _CodingGuard:
        for name, module in self.model.named_modules():
            if not isinstance(module, EntropyModel):
                continue
            for method in self.METHODS:
                original = getattr(module, method, None)
                if callable(original):
                    object.__setattr__(module, method, self._guarded(name or "model", method, original))
                    self.patched.append((module, method))
        return self

    def __exit__(self, *exc) -> None:
        for module, method in self.patched:
            object.__delattr__(module, method)
        self.patched.clear()

    def _guarded(self, module: str, method: str, original):
        signature = inspect.signature(original)

        def guarded(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs).arguments
            except TypeError:
                bound = dict(enumerate(args)) | kwargs
            for arg, value in bound.items():
                found = _nonfinite(value.detach()) if isinstance(value, Tensor) else None
                if found is not None:
                    raise NonFiniteError(
                        f"image {self.image}: {arg} of {module}.{method}() has {found}, not coded "
                        f"(the entropy coder would hang or write garbage)"
                    )
            return original(*args, **kwargs)

        return guarded


class _Capture:
    """Forward hooks recording, while active: ``g_a``'s output (the encoder's latent ``y``),
    ``g_s``'s input (the decoder's ``y_hat``) and each entropy bottleneck's input."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        self.y: Tensor | None = None
        self.y_hat: Tensor | None = None
        self.eb_inputs: list[tuple[EntropyBottleneck, Tensor]] = []
        self.record_eb = False
        self.handles = []
        if isinstance(getattr(encoder, "g_a", None), nn.Module):
            self.handles.append(encoder.g_a.register_forward_hook(self._on_g_a))
        if isinstance(getattr(decoder, "g_s", None), nn.Module):
            self.handles.append(decoder.g_s.register_forward_pre_hook(self._on_g_s))
        for eb in _entropy_bottlenecks(encoder):
            self.handles.append(eb.register_forward_pre_hook(self._on_eb))

    def _on_g_a(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        self.y = out

    def _on_g_s(self, module: nn.Module, args: tuple) -> None:
        self.y_hat = args[0]

    def _on_eb(self, module: nn.Module, args: tuple) -> None:
        if self.record_eb:
            self.eb_inputs.append((module, args[0]))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _latent_errors(y: Tensor | None, y_hat: Tensor | None) -> tuple[int | None, float | None]:
    """Values of the decoded ``y_hat`` off the encoder's ``y`` by more than half a quantisation
    step (``y_hat = round(y - mu) + mu`` for any ``mu`` the encoder and decoder share), and the
    largest ``|y_hat - y|``."""
    if y is None or y_hat is None or y.shape != y_hat.shape:
        return None, None
    err = (y_hat.double() - y.double()).abs()
    bound = 0.5 + 1e-5 * (1 + y.double().abs())  # float32 rounding of round(y - mu) + mu
    return int((err > bound).sum()), float(err.max())


@torch.no_grad()
def evaluate_image(
    model: nn.Module,
    x: Tensor,
    multiple: int = 64,
    *,
    padding: str = "compressai",
    decoder: nn.Module | None = None,
    name: str = "image",
) -> dict[str, Any]:
    """Compress, decompress and measure one image with an ``update()``-d model in eval mode.

    By default the numbers are ``compressai.utils.eval_model``'s (``inference``): centred zero
    padding, metrics on the 8-bit-rounded images, bpp from the bytes.

    Args:
        model: a CompressAI model (``compress``/``decompress``/``forward``); DataParallel/DDP
            wrappers are seen through.
        x: ``(3, H, W)`` float in ``[0, 1]`` (:func:`check_image`); moved to the model's device.
        multiple: pad H and W up to a multiple of this before coding.
        padding: one of :data:`PADDINGS`.
        decoder: the model that decompresses (default ``model``): another copy, e.g. one whose
            entropy parameters differ, to check encoder/decoder agreement.
        name: the image's name, for messages.

    Returns:
        ``{"psnr-rgb" (dB), "ms-ssim-rgb", "bpp", "bpp-estimated", "encoding_time",
        "decoding_time" (s), "bytes", "height", "width", "bpp-gap", "escape-share",
        "latent-errors", "latent-max-abs-error", "notes"}``: see the module docstring. PSNR /
        MS-SSIM are ``None`` when not finite / the image is too small, the reason in ``notes``
        (a list of one-line strings: also the implausible-value, bpp-gap and latent-mismatch
        flags, each of these three issued as a ``RuntimeWarning`` too).

    Raises:
        EvaluationError: a bad image (:func:`check_image`).
        NonFiniteError: a weight of ``model`` or ``decoder`` that is not finite
            (:func:`check_weights`), or a latent, mean or scale that is not finite on its way to
            the entropy coder (naming the argument and the entropy model); nothing is coded.
        ValueError: an unknown ``padding``.
    """
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; valid: {', '.join(PADDINGS)}")
    check_image(name, x)
    model = unwrap_model(model)
    decoder = model if decoder is None else unwrap_model(decoder)
    check_weights(model)
    if decoder is not model:
        check_weights(decoder, "decoder")
    device = next(model.parameters()).device
    h, w = x.shape[-2:]
    x = x.unsqueeze(0).to(device)
    if padding == "compressai":
        pad, unpad = compute_padding(h, w, min_div=multiple)
        padded = F.pad(x, pad, mode="constant", value=0)
    else:
        padded, size = pad_to_multiple(x, multiple)
    notes: list[str] = []

    capture = _Capture(model, decoder)
    try:
        _sync(device)
        start = time.perf_counter()
        with _CodingGuard(model, name):
            enc = model.compress(padded)
        _sync(device)
        encoding_time = time.perf_counter() - start
        y = capture.y
        start = time.perf_counter()
        dec = decoder.decompress(enc["strings"], enc["shape"])
        _sync(device)
        decoding_time = time.perf_counter() - start
        y_hat = capture.y_hat
        capture.record_eb = True
        likelihoods = model(padded)["likelihoods"].values()
        eb_inputs = capture.eb_inputs
    finally:
        capture.remove()

    x_hat = F.pad(dec["x_hat"], unpad) if padding == "compressai" else crop_to(dec["x_hat"], size)
    n_bytes, n_strings = _count_bytes(enc["strings"])
    bpp = n_bytes * 8 / (h * w)
    estimated = sum(float(torch.log2(lk).sum()) for lk in likelihoods) / -(h * w)

    org = (x * 255).clamp(0, 255).round()
    rec = (x_hat * 255).clamp(0, 255).round()
    mse = float((org.double() - rec.double()).pow(2).mean())
    psnr = stats.psnr(mse, peak=255)
    if mse == 0:
        notes.append("psnr-rgb null: lossless reconstruction (PSNR infinite)")
    if min(h, w) >= MSSSIM_MIN_SIDE:
        msssim = float(ms_ssim(org.float(), rec.float(), data_range=255))
        if not math.isfinite(msssim):
            notes.append("ms-ssim-rgb null: pytorch_msssim returned a non-finite value")
    else:
        msssim = math.nan
        notes.append(
            f"ms-ssim-rgb null: 5-scale MS-SSIM needs both sides >= {MSSSIM_MIN_SIDE} px, image is {h}x{w}"
        )

    flags = []
    if psnr > IMPLAUSIBLE_PSNR and bpp < IMPLAUSIBLE_BPP:
        flags.append(
            f"implausible: PSNR {psnr:.1f} dB at {bpp:.4f} bpp (a near-constant image, or one on the "
            f"wrong scale?)"
        )
    gap = bpp / estimated - 1 if estimated > 0 else None
    escape = _escape_share(eb_inputs)
    beyond_overhead = abs(n_bytes - estimated * h * w / 8) > CODER_OVERHEAD_BYTES * n_strings
    if gap is not None and abs(gap) > BPP_GAP_LIMIT and beyond_overhead:
        cause = _gap_cause(escape, aux_loss_per_quantile(model))
        flags.append(
            f"real bpp {bpp:.4f} is {100 * gap:+.1f} % off the estimate {estimated:.4f}; likely "
            f"cause: {cause}"
        )
    errors, max_error = _latent_errors(y, y_hat)
    if errors:
        flags.append(
            f"decoder's y_hat differs from the encoder's latent: {errors} values off by more than half "
            f"a step (max {max_error:.3g}); the entropy parameters differ between encoder and decoder"
        )
    for flag in flags:
        warnings.warn(f"image {name}: {flag}", RuntimeWarning, stacklevel=3)
    return {
        "psnr-rgb": _finite(psnr),
        "ms-ssim-rgb": _finite(msssim),
        "bpp": bpp,
        "bpp-estimated": _finite(estimated),
        "encoding_time": encoding_time,
        "decoding_time": decoding_time,
        "bytes": n_bytes,
        "height": h,
        "width": w,
        "bpp-gap": gap,
        "escape-share": escape,
        "latent-errors": errors,
        "latent-max-abs-error": max_error,
        "notes": notes + flags,
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


def coding_multiple(model: nn.Module, padding: str = "compressai") -> int:
    """The multiple images are padded to: the model's ``downsampling_factor`` (else 64), at least
    64 for ``"compressai"`` padding (``eval_model`` pads to 64 whatever the model)."""
    factor = int(getattr(unwrap_model(model), "downsampling_factor", 64))
    return max(factor, 64) if padding == "compressai" else factor


def evaluate_model(
    model: nn.Module,
    images: Sequence[tuple[str, Tensor]],
    *,
    padding: str = "compressai",
    fit: bool | None = None,
    decoder: nn.Module | None = None,
    conversions: Mapping[str, str] | None = None,
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Check every image and the weights, fit unconverged quantiles, ``update(force=True)`` the
    model, then :func:`evaluate_image` each.

    With the defaults, for a model whose quantiles have converged (the aux loss per quantile at
    most :data:`UNFITTED_AUX_LOSS`), the numbers are those of ``compressai.utils.eval_model
    checkpoint`` on the same model and images (its ``update(force=True)``, padding, metrics and bpp).

    Args:
        model: a CompressAI model (a DataParallel/DDP wrapper is seen through); switched to eval
            mode and ``update()``-d in place.
        images: ``(name, (3, H, W) float in [0, 1])`` pairs.
        padding: one of :data:`PADDINGS`.
        fit: :func:`fit_quantiles` (in place) before ``update``: ``None`` (default) when the
            quantiles have not converged (aux loss per quantile above :data:`UNFITTED_AUX_LOSS`),
            ``True`` always, ``False`` never (``eval_model`` never fits, so with a fit the numbers
            may differ from its).
        decoder: another model to decompress with (checked, fitted by the same rule and
            ``update()``-d too); default ``model``.
        conversions: per image name, how its file was turned into RGB (:func:`image_conversions`),
            recorded in its row.

    Returns:
        ``(averages, per_image)``: ``averages[key]`` for each of :data:`RESULT_KEYS`, the mean
        over images (``None`` if any image's value is ``None``); ``per_image`` the
        :func:`evaluate_image` dicts with ``"image"`` (name), ``"conversion"`` (or ``None``),
        ``"padding"``, ``"aux-loss"`` (:func:`aux_loss_per_quantile` when coded),
        ``"aux-loss-as-trained"`` (before any fit), ``"quantiles-fitted"`` and ``"model-notes"``
        (one-line notes on the model: the fit, or unconverged quantiles coded as they are) added,
        in order.

    Raises:
        EvaluationError: no images, or a bad image (:func:`check_image`, before any coding).
        NonFiniteError: a weight, latent, mean or scale that is not finite (naming it; before
            any coding for a weight).
    """
    if not images:
        raise EvaluationError("no images to evaluate")
    for name, x in images:
        check_image(name, x)
    model = unwrap_model(model)
    model.eval()
    check_weights(model)
    if decoder is not None:
        decoder = unwrap_model(decoder).eval()
        check_weights(decoder, "decoder")
    as_trained = aux_loss_per_quantile(model)
    fitted, model_notes = _settle_quantiles(model, fit)
    model.update(force=True)
    if decoder is not None:
        _settle_quantiles(decoder, fit)
        decoder.update(force=True)
    aux = aux_loss_per_quantile(model)
    multiple = coding_multiple(model, padding)
    per_image = []
    for name, x in images:
        row = evaluate_image(model, x, multiple, padding=padding, decoder=decoder, name=name)
        extra = {"conversion": (conversions or {}).get(name), "padding": padding, "aux-loss": aux,
                 "aux-loss-as-trained": as_trained, "quantiles-fitted": fitted,
                 "model-notes": model_notes}
        per_image.append({"image": name, **row, **extra})
    averages: dict[str, float | None] = {}
    for key in RESULT_KEYS:
        values = [r[key] for r in per_image]
        averages[key] = None if None in values else sum(values) / len(values)
    return averages, per_image


def _settle_quantiles(model: nn.Module, fit: bool | None) -> tuple[bool, list[str]]:
    """Fit ``model``'s quantiles (in place) as :func:`evaluate_model`'s ``fit`` says; returns
    whether they were fitted and the note saying what was done (none for a converged model)."""
    before = aux_loss_per_quantile(model)
    if before is None:
        return False, []
    converged = before <= UNFITTED_AUX_LOSS
    if fit is False or (fit is None and converged):
        if converged:
            return False, []
        return False, [f"quantiles not converged (aux_loss {before:.3g} per quantile > "
                       f"{UNFITTED_AUX_LOSS:g}), coded as trained (fit=False, --no-fit-quantiles): the "
                       f"real bpp may exceed the estimate"]
    after = fit_quantiles(model)
    why = (f"not converged (aux_loss {before:.3g} per quantile > {UNFITTED_AUX_LOSS:g})"
           if fit is None else f"asked (fit=True, --fit-quantiles; aux_loss {before:.3g} per quantile)")
    return True, [f"quantiles fitted before coding, {why}: aux_loss now {after:.3g} per quantile "
                  f"(fit_quantiles; eval_model does not fit, --no-fit-quantiles codes them as trained)"]


def run_record(per_image: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the results JSON keeps of one run's per-image rows even without ``--per-image``:
    ``{"padding", "quantiles-fitted", "aux-loss", "aux-loss-as-trained", "max-abs-bpp-gap",
    "latent-errors", "notes": [<model note>, ..., "<image>: <note>", ...]}``."""
    gaps = [abs(r["bpp-gap"]) for r in per_image if r.get("bpp-gap") is not None]
    errors = [r["latent-errors"] for r in per_image if r.get("latent-errors") is not None]
    first = per_image[0] if per_image else {}
    return {
        "padding": first.get("padding"),
        "quantiles-fitted": first.get("quantiles-fitted"),
        "aux-loss": first.get("aux-loss"),
        "aux-loss-as-trained": first.get("aux-loss-as-trained"),
        "max-abs-bpp-gap": max(gaps) if gaps else None,
        "latent-errors": sum(errors) if errors else None,
        "notes": [*first.get("model-notes", ()),
                  *(f"{r['image']}: {note}" for r in per_image for note in r.get("notes", ()))],
    }


def image_records(per_image: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The results JSON's ``images``: ``{"name", "height", "width", "conversion"}`` per image."""
    return [
        {"name": r["image"], "height": r["height"], "width": r["width"], "conversion": r.get("conversion")}
        for r in per_image
    ]



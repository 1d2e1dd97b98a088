"""``python -m energylab.evaluate``: the command line of :mod:`energylab.evaluate` (``--help``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import compressai
import torch

from energylab import cli
from energylab.checkpoints import first_line
from energylab.evaluate import (
    PADDINGS,
    RESULT_KEYS,
    EvaluationError,
    architecture_label,
    evaluate_model,
    image_conversions,
    image_records,
    load_images,
    load_model,
    run_record,
)

__all__ = ["main"]


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
    p.add_argument("--padding", choices=PADDINGS, default="compressai",
                   help="'compressai' (default): centred zeros, as compressai.utils.eval_model; "
                   "'replicate': bottom/right edge replication")
    p.add_argument("--fit-quantiles", action="store_true",
                   help="fit the entropy bottleneck's quantiles before coding (eval_model does not)")
    cli.add_device_arguments(p, default="cpu", choices=None)
    # the architecture of a plain state dict, as trained (a run carries its own)
    cli.add_model_arguments(p, defaults=False)
    cli.add_auxt_arguments(p, defaults=False)
    return p


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise EvaluationError(f"--device {name}: {first_line(exc)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {name}: CUDA is not available")
    return device


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def _run(args: argparse.Namespace) -> dict[str, Any]:
    arch = cli.arch_from_args(args)
    device = _device(args.device)
    images = load_images(args.data)
    conversions = image_conversions(args.data)
    results: dict[str, list[float | None]] = {k: [] for k in RESULT_KEYS}
    runs, per_image, labels = [], [], []
    loaded = [load_model(run, arch, device) for run in args.runs]  # every RUN checked first
    for run, (model, used) in zip(args.runs, loaded, strict=True):
        averages, rows = evaluate_model(model, images, padding=args.padding, fit=args.fit_quantiles,
                                        conversions=conversions)
        for key in RESULT_KEYS:
            results[key].append(averages[key])
        runs.append({"path": str(run), "architecture": used, **run_record(rows)})
        per_image.append(rows)
        labels.append(architecture_label(used))
        print(f"{run}: " + ", ".join(f"{k} {_fmt(averages[k])}" for k in RESULT_KEYS))
        for note in run_record(rows)["notes"]:
            print(f"  {note}")
    output: dict[str, Any] = {
        "name": args.name or ",".join(dict.fromkeys(labels)),
        "description": f"Inference ({compressai.get_entropy_coder()}), energylab.evaluate, "
        f"bpp from real bitstreams",
        "results": results,
        "runs": runs,
        "images": image_records(per_image[0]),
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
            raise EvaluationError(f"{out}: cannot write ({first_line(exc)})") from None

    return cli.run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())

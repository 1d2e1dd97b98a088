"""``python -m energylab.evaluate``: the command line of :mod:`energylab.evaluate` (``--help``).

Exit status (:mod:`energylab.cli`): 0 when every RUN was evaluated; 2 for bad input — before
anything is written (a missing path, an unfitting checkpoint, no images), or after the results JSON
is written when a RUN could not be coded because a weight, latent, mean or scale is not finite
(that RUN's results are null with the reason in its ``runs`` entry, the others' are written; one
``error:`` line on stderr names the RUN and the tensor); 1 when the JSON cannot be written.
"""

from __future__ import annotations

import argparse
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
    UNFITTED_AUX_LOSS,
    EvaluationError,
    NonFiniteError,
    architecture_label,
    evaluate_model,
    image_conversions,
    load_images,
    load_model,
    run_record,
)
from energylab.rundir import to_json

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = cli.Parser(
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
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--fit-quantiles", dest="fit", action="store_const", const=True, default=None,
                     help="always fit the entropy bottleneck's quantiles before coding (by default "
                     "only when not converged: aux loss per quantile above "
                     f"{UNFITTED_AUX_LOSS:g}; eval_model never fits)")
    fit.add_argument("--no-fit-quantiles", dest="fit", action="store_const", const=False,
                     help="never fit them: code the quantiles as trained, as eval_model does")
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


def _run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The results JSON, and one line per RUN that could not be coded (non-finite tensors)."""
    arch = cli.arch_from_args(args)
    device = _device(args.device)
    images = load_images(args.data)
    conversions = image_conversions(args.data)
    results: dict[str, list[float | None]] = {k: [] for k in RESULT_KEYS}
    runs, per_image, labels, refused = [], [], [], []
    loaded = [load_model(run, arch, device) for run in args.runs]  # every RUN checked first
    for run, (model, used) in zip(args.runs, loaded, strict=True):
        try:
            averages, rows = evaluate_model(model, images, padding=args.padding, fit=args.fit,
                                            conversions=conversions)
        except NonFiniteError as err:  # recorded with nulls; the other RUNs go on
            averages, rows = dict.fromkeys(RESULT_KEYS), None
            record = {**run_record([]), "padding": args.padding, "not-evaluated": str(err),
                      "notes": [f"not evaluated: {err}"]}
            refused.append(f"{run}: not evaluated ({err})")
        else:
            record = run_record(rows)
        for key in RESULT_KEYS:
            results[key].append(averages[key])
        runs.append({"path": str(run), "architecture": used, **record})
        per_image.append(rows)
        labels.append(architecture_label(used))
        print(f"{run}: " + ", ".join(f"{k} {_fmt(averages[k])}" for k in RESULT_KEYS))
        for note in record["notes"]:
            print(f"  {note}")
    output: dict[str, Any] = {
        "name": args.name or ",".join(dict.fromkeys(labels)),
        "description": f"Inference ({compressai.get_entropy_coder()}), energylab.evaluate, "
        f"bpp from real bitstreams",
        "results": results,
        "runs": runs,
        "images": [{"name": name, "height": x.shape[-2], "width": x.shape[-1],
                    "conversion": conversions.get(name)} for name, x in images],
    }
    if args.per_image:
        output["per_image"] = per_image
    return output, refused


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0; 2 for bad input, also after writing
    the results when a RUN had non-finite tensors; see the module docstring)."""
    args = _parser().parse_args(argv)

    def body() -> None:
        output, refused = _run(args)
        out = Path(args.out).expanduser()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(to_json(output, indent=2) + "\n")
        except OSError as exc:  # exit status 1, naming the file (cli.run_command)
            raise OSError(exc.errno, exc.strerror or first_line(exc), str(out)) from None
        if refused:
            raise EvaluationError(f"{'; '.join(refused)}; {'its' if len(refused) == 1 else 'their'} "
                                  f"results are null in {out}, the other runs' are written")

    return cli.run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())

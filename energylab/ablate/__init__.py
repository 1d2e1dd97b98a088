"""AuxT ablation: baseline, AuxT and AuxT without some components, trained on equal terms.

``python -m energylab.ablate --remove scaling`` trains ``baseline`` (no AuxT), ``auxt`` (full) and
``auxt-no-scaling`` for every seed, then writes a summary (Markdown, CSV and JSON; the layout of
the ablation directory is :mod:`energylab.rundir`'s) and figures into ``--out``. Variants:

* ``baseline``, ``auxt``, and ``auxt-no-X`` for each ``--remove X``;
* ``--combined``: also one variant with every given component removed (``auxt-no-X+Y``);
* ``--wavelets db4 bior2.2``: one full-AuxT variant per other wavelet basis (``auxt-db4``, ...);
* ``--freeze X``: AuxT with component X frozen at its initial value (``auxt-frozen-scaling``,
  ``auxt-frozen-orthogonal``: the projection fixed at a random orthogonal init);
  ``--scaling-init zero``: AuxT with ``s`` started at 0 (``auxt-scaling-init-zero``);
* ``--causal``: the causal grid instead, beside the baseline: projection {learned, frozen at a random
  orthogonal init, frozen at the data's KLT (:mod:`energylab.klt`)} × scaling {learned, frozen at
  init, none}; its summary says which cells reproduce AuxT's speed-up, or that the intervals cannot
  tell;
* ``--split``: the split grid instead (:mod:`energylab.split`), beside the baseline and full AuxT:
  ``split-A`` ... ``split-F``, decorrelation × unevenness of the shortcut's last stage at a fixed
  subspace and a fixed delivered energy (the earlier stages frozen at the data's KLT, no scaling);
  its summary's ``split`` section holds the five estimands with their intervals and verdicts and
  the cells' step-0 manipulation checks. Defaults: :data:`energylab.split.DEFAULT_SEEDS` and
  :data:`energylab.split.DEFAULT_STEPS` (about 84 minutes on the 2-core CPU; the arithmetic is in
  :mod:`energylab.split`).

Equal terms: every cell of one seed has the same data order (the sampler is a pure function of
seed and step), the same probe set, the same step budget and the same initial weights for the
parts the variants share (the model is built right after ``torch.manual_seed(seed)`` and AuxT is
attached after the main transforms). Every cell is an ordinary run directory
``OUT/<variant>/seed<S>/`` (``OUT/<variant>/lmbda<λ>/seed<S>/`` in an R-D sweep with ``--lmbdas``),
so an interrupted ablation continues with ``--resume``; ``--only VARIANT --seed S`` runs one cell
and ``--collect OUT`` summarises whatever cells exist.

After training each cell its final model is coded for real (``energylab.evaluate``: actual
``compress``/``decompress``), so the rates in the summary and the BD-rates are those of real
bitstreams.

The summary (per variant and λ, mean ± std over seeds: final R-D numbers on the likelihoods and
on real bitstreams, steps and time to the baseline's final test loss and the speed-ups, the energy
statistics of ``y``, the AuxT branch's energy shares, the statistics of ``y`` at matched test loss
(``matched_loss``: each variant at the capture where it reaches the baseline's final loss, against
the baseline's final capture) and, with ``--lmbdas``, BD-rates against the baseline) is computed by
:mod:`energylab.summary`, whose docstring defines every number. The figures
(:func:`energylab.figures.ablation_figures`) include ``compaction_curves``, the paper's Fig. 1:
each variant's energy-compaction curves of ``y`` at the start, ≈25 %, ≈50 % and end of training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from energylab.auxt import COMPONENTS, FREEZABLE, SCALING_INITS, SPLIT_INITS, check_components, variant_name
from energylab.config import TrainConfig
from energylab.rundir import AblationDir, RunDirError
from energylab.split import capture_checks, format_split, split_summary
from energylab.summary import (
    CellLogs,
    format_csv,
    format_json,
    format_markdown,
    summarize,
)
from energylab.wavelets import DWT2

__all__ = ["AblationError", "Cell", "causal_variants", "collect", "main", "parameter_counts", "plan_cells",
           "split_variants", "variants"]

CELL_FIELDS = ("out", "seed", "auxt", "remove", "wavelet", "device", "workers", "cache", "freeze",
               "scaling_init", "projection_init")
"""Training settings each cell sets itself (or that may differ between sessions): not recorded as
the ablation's settings."""


class AblationError(ValueError):
    """Bad ablation arguments or directory; one-line message."""


OPTION_DEFAULTS = {"auxt": True, "remove": [], "wavelet": "haar", "freeze": [],
                   "scaling_init": "release", "projection_init": "default"}
"""A variant's training options, as full AuxT has them."""
DEFAULT_OUT = Path("runs/ablation")
"""Where an ablation goes without ``--out``."""
META_DEFAULTS = {"freeze": [], "scaling_init": [], "causal": False, "split": False, "eval_schedule": "fixed",
                 "deterministic": False}
"""Ablation settings added after the first reference result, as an ablation without them has them."""


def _option(**changes) -> dict:
    return {**OPTION_DEFAULTS, **changes}


def causal_variants() -> list[dict]:
    """The causal grid's options (without the baseline): projection {learned, frozen at a random
    orthogonal init, frozen at the data's KLT} × scaling {learned, frozen at init, none}."""
    grid = []
    for projection in ("default", "orthogonal", "klt"):
        for scaling in ("learned", "frozen", "none"):
            freeze = (["orthogonal"] if projection != "default" else []) + (
                ["scaling"] if scaling == "frozen" else [])
            grid.append(_option(remove=["scaling"] if scaling == "none" else [], freeze=freeze,
                                projection_init=projection))
    return grid


def split_variants() -> list[dict]:
    """The split grid's options (without the baseline and AuxT): cells A to F of
    :mod:`energylab.split`, each with the projection frozen at its split init and no scaling."""
    return [_option(remove=["scaling"], freeze=["orthogonal"], projection_init=init) for init in SPLIT_INITS]


def variants(remove: Sequence[str], combined: bool = False, wavelets: Sequence[str] = (),
             freeze: Sequence[str] = (), scaling_init: Sequence[str] = (),
             causal: bool = False, split: bool = False) -> dict[str, dict]:
    """Variant name -> training options (``auxt``, ``remove``, ``wavelet``, ``freeze``,
    ``scaling_init``, ``projection_init``), in order.

    Raises:
        ValueError: an unknown component name (listing the valid ones), wavelet or scaling init,
            or ``causal`` / ``split`` with other variants (or with each other).
    """
    removed = [c for c in COMPONENTS if c in check_components(remove)]
    baseline = {**OPTION_DEFAULTS, "auxt": False}
    if split:
        if causal or removed or wavelets or freeze or scaling_init or combined:
            raise ValueError("the split grid is a study of its own: it takes no causal, removed, frozen, "
                             "re-initialised, combined or other-wavelet variants beside it")
        return {variant_name(**o): o for o in [baseline, _option(), *split_variants()]}
    if causal:
        if removed or wavelets or freeze or scaling_init or combined:
            raise ValueError("the causal grid is a study of its own: it takes no removed, frozen, "
                             "re-initialised, combined or other-wavelet variants beside it")
        return {variant_name(**o): o for o in [baseline, *causal_variants()]}
    options = [baseline, _option()]
    options += [_option(remove=[c]) for c in removed]
    if combined and len(removed) > 1:
        options.append(_option(remove=removed))
    for wavelet in wavelets:
        DWT2(wavelet)  # an unknown basis fails here, before anything is trained
        options.append(_option(wavelet=wavelet))
    options += [_option(freeze=[c]) for c in FREEZABLE if c in freeze]
    options += [_option(scaling_init=init) for init in SCALING_INITS if init in scaling_init]
    for o in options:
        o["name"] = variant_name(**o)  # unknown names fail here
    return {o.pop("name"): o for o in options}


class Cell:
    """One training run of the ablation: a variant at one λ and one seed, in ``run``."""

    def __init__(self, root: Path, variant: str, seed: int, lmbda: float | None) -> None:
        self.variant, self.seed, self.lmbda = variant, seed, lmbda
        self.run = AblationDir(root).cell(variant, seed, lmbda)

    @property
    def dir(self) -> Path:
        """The cell's run directory."""
        return self.run.path

    @property
    def done(self) -> bool:
        """Trained and coded for real."""
        return self.run.is_finished() and self.run.has_bitstream()


def plan_cells(root: Path, names: Sequence[str], seeds: Sequence[int],
               lmbdas: Sequence[float] | None) -> list[Cell]:
    return [Cell(root, v, s, lm) for lm in (lmbdas or [None]) for v in names for s in seeds]


# ---------------------------------------------------------------------------------------------
# Running


def cell_config(base: TrainConfig, cell: Cell, options: dict) -> TrainConfig:
    """The training config of one cell: ``base`` with the cell's directory, seed, λ and the
    variant's ``options`` (``auxt``, ``remove``, ``wavelet``, ``freeze``, ``scaling_init``,
    ``projection_init``; the last three as full AuxT's when absent)."""
    options = {**OPTION_DEFAULTS, **options}
    return replace(base, out=cell.dir, seed=cell.seed, auxt=options["auxt"],
                   remove=tuple(options["remove"]), wavelet=options["wavelet"],
                   freeze=tuple(options["freeze"]), scaling_init=options["scaling_init"],
                   projection_init=options["projection_init"],
                   lmbda=cell.lmbda if cell.lmbda else base.lmbda)


def run_cell(config: TrainConfig, cell: Cell, test: list) -> None:
    """Train one cell (resuming it if it has a checkpoint), then code ``test`` — the dataset's
    ``(name, image)`` test list, centre-cropped to ``config.test_size`` — for real."""
    from energylab.data import test_batches
    from energylab.evaluate import evaluate_model, load_model
    from energylab.train import train

    if not cell.run.is_finished():
        train(config, resume=cell.run.has_checkpoint())
    model, _ = load_model(cell.dir)
    images = [(name, x[0, :, : hw[0], : hw[1]])
              for name, x, hw in test_batches(test, config.test_size, multiple=1)]
    averages, per_image = evaluate_model(model, images)
    cell.run.write_bitstream(averages, per_image)


# ---------------------------------------------------------------------------------------------
# Summary


def collect(root: Path) -> dict:
    """Summarise every finished cell under ``root`` (:mod:`energylab.summary`); writes the summary
    files of the ablation directory and the figures of :func:`energylab.figures.ablation_figures`.

    Raises:
        AblationError: ``root`` holds no ablation.
        SummaryError: no baseline cell with evaluations.
    """
    from energylab.figures import ablation_figures

    ablation = AblationDir(root)
    result = summarize_ablation(ablation)
    markdown = format_markdown(result)
    if "split" in result:
        markdown += "\n" + format_split(result["split"])
    ablation.write_summary(format_json(result), markdown, format_csv(result))
    result["figures"] = [str(p) for p in ablation_figures(root)]
    return result


def summarize_ablation(ablation: AblationDir) -> dict:
    """:func:`energylab.summary.summarize` of every cell of ``ablation`` that has evaluations, with
    each variant's parameter counts, and for a split grid the ``split`` section
    (:func:`energylab.split.split_summary`: the estimands of the per-cell numbers, and each cell's
    step-0 manipulation checks from its ``config.json`` and those at each capture from its
    ``energy.jsonl``); reads only.

    Raises:
        AblationError: no ablation there.
        SummaryError: no baseline cell with evaluations.
    """
    try:
        meta = ablation.meta()
    except RunDirError as err:
        raise AblationError(str(err)) from None
    names = list(meta["variants"])
    counts: dict[str, dict[str, int]] = {}
    cells = {}
    checks = {}
    captured = {}
    for c in plan_cells(ablation.path, names, meta["seeds"], meta.get("lmbdas")):
        if not c.run.evals():
            continue
        if c.variant not in counts and c.run.is_run():
            counts[c.variant] = parameter_counts(c.run.train_config())
        cells[c.variant, c.lmbda, c.seed] = replace(CellLogs.of(c.run), parameters=counts.get(c.variant))
        if meta.get("split") and c.variant in SPLIT_INITS and c.run.is_run():
            checks[c.variant, c.seed] = c.run.config().get("split_checks")
        if meta.get("split") and c.variant != "baseline":
            captured[c.variant, c.seed] = capture_checks(c.run.energy())
    result = summarize(cells, names, meta["seeds"], meta["lmbda"], meta.get("lmbdas"), str(ablation.path),
                       causal=bool(meta.get("causal")))
    if meta.get("split"):
        result["split"] = split_summary(result["cells"], meta["seeds"], checks, captured)
    return result


def parameter_counts(config: TrainConfig) -> dict[str, int]:
    """``{"parameters": total, "trainable_parameters": n}`` of the model ``config`` trains (built
    afresh in a forked RNG; counts do not depend on the initial values)."""
    from energylab.models import build_model

    with torch.random.fork_rng(devices=[]):
        model = build_model(config.model, N=config.N, M=config.M, auxt=config.auxt,
                            remove=config.remove, wavelet=config.wavelet,
                            g_a_placement=config.g_a_placement, g_s_placement=config.g_s_placement,
                            freeze=config.freeze)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}



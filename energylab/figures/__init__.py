"""Figures of a run or an ablation: training curves, the energy-compaction split, correlations, R-D.

``python -m energylab.figures DIR --out FIGDIR [--list]`` draws every figure that ``DIR`` (a run
directory or an ablation directory, layouts in :mod:`energylab.rundir`) has the inputs for, each as
``FIGDIR/<name>.png`` (200 dpi) and ``FIGDIR/<name>.pdf`` (vector); ``--list`` only says which
figures it can draw. A figure whose inputs are missing is skipped with one line on stderr saying
why; the others are still drawn. Figures (:data:`FIGURES`):

* ``loss_curves``: test R-D loss, bpp and PSNR vs training step;
* ``compaction_and_loss``: top-k energy share of ``y`` (L2 norms per channel) and test R-D loss vs
  training step;
* ``energy_split``: the two-part split of energy compaction of ``y`` over training — coding gain
  (energy modulation), channel total correlation and the decorrelation of 2×2 neighbourhoods across
  channels beside across positions, with seed bands and the cells' bootstrap intervals;
* ``correlation_heatmaps``: channel correlation matrices of ``y`` (channels ordered by energy),
  variants × early / middle / final capture;
* ``energy_spectra``: channel energy spectrum and compaction curve of ``y`` at the final capture;
* ``compaction_curves``: the paper's Fig. 1 (Li et al., ICLR 2025): energy-compaction curves of
  ``y`` (cumulative share of the channels' L2 norms over the k most energetic channels), one panel
  per variant, one curve per training stage (start, ≈25 %, ≈50 %, final capture), mean over seeds,
  the baseline's final curve repeated dashed;
* ``subband_energy``: subband energy shares of ``y`` at the final capture;
* ``modulation``: energy modulation against the quantiser — rate-share entropy and active channels
  of ``y_hat``, and AuxT's learned subband gains exp(s), over training;
* ``aux_energy_share``: the AuxT branch's share of the merged energy per merge point over training;
* ``ablation_summary``: the summary's per-seed numbers as bars (mean ± s.d.) with the seeds as dots;
* ``rd_curves`` and ``bd_rate``: real-bitstream R-D curves and the BD-rate table of an R-D sweep.

Curves are means over seeds with a ± 1 s.d. band; each variant keeps its colour (colour-blind-safe
palette) in every figure and is named by ``energylab.auxt.variant_name`` (``baseline``, ``auxt``,
``auxt-no-scaling``, ...). In an R-D sweep the training figures show one λ (the middle one unless
a function is given ``lmbda``).

The loaders (:func:`load_run`, :func:`load_ablation`, :func:`load`, :func:`load_captures`,
:func:`summary_table`) and the ``plot_*`` functions, each returning a matplotlib figure, are what
the notebooks in ``notebooks/`` use; :func:`ablation_figures` is what the ablation command calls
after writing its summary.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure

from energylab import stats
from energylab.auxt import variant_name
from energylab.rundir import AblationDir, AnalysisDir, RunDir, RunDirError
from energylab.summary import table_rows, with_roles

__all__ = [
    "ABLATION_FIGURES",
    "FIGURES",
    "FigureError",
    "MissingInput",
    "Study",
    "ablation_figures",
    "all_figures",
    "analysis_figures",
    "available",
    "compaction_curve_frame",
    "load",
    "load_ablation",
    "load_captures",
    "load_run",
    "layers_of",
    "main",
    "plot_ablation_summary",
    "plot_analysis_compaction",
    "plot_analysis_correlations",
    "plot_analysis_energy_split",
    "plot_aux_energy_share",
    "plot_bd_rate_table",
    "plot_capture_matrices",
    "plot_compaction_and_loss",
    "plot_compaction_curves",
    "plot_correlation_heatmaps",
    "plot_eigenspectra",
    "plot_energy_spectra",
    "plot_energy_split",
    "plot_loss_curves",
    "plot_matrix",
    "plot_modulation",
    "plot_probe_channels",
    "plot_rd_curves",
    "plot_step_equivalence",
    "plot_subband_energy",
    "reference_dir",
    "set_style",
    "summary_table",
    "variant_colors",
]

THEME = {"context": "paper", "style": "whitegrid", "palette": "colorblind", "font_scale": 1.1}
"""``seaborn.set_theme`` arguments of every figure."""
DPI = 200
HEATMAP_CMAP = "RdBu_r"
"""Diverging map of the correlation heatmaps (blue -1, white 0, red +1; colour-blind safe)."""
BAND = "band: ± 1 s.d. over seeds"
_FIXED_COLORS = {"baseline": 0, "auxt": 1, "auxt-no-wavelet": 2, "auxt-no-scaling": 3,
                 "auxt-no-orthogonal": 4}
"""Index into the colour-blind palette of the variants every ablation may have."""
_SPARE_COLORS = (5, 6, 8, 9, 7)
STEP = "training step"


class FigureError(ValueError):
    """``DIR`` is neither a run nor an ablation directory; one-line message."""


class MissingInput(LookupError):
    """A figure's inputs are missing from the directory; the message says which."""


def set_style() -> None:
    """Apply the figures' seaborn theme globally (for notebooks)."""
    sns.set_theme(**THEME)


def reference_dir() -> Path:
    """The reference results of the source repository (``data/reference``), found from the package's
    location, never the working directory: the notebooks' default inputs.

    Raises:
        FigureError: no ``data/reference`` beside the package (an installed wheel ships no data).
    """
    path = Path(__file__).resolve().parents[2] / "data" / "reference"
    if not path.is_dir():
        raise FigureError(f"no reference results at {path} (they ship with the source repository, "
                          "not the installed package); give a run or ablation directory instead")
    return path


def variant_colors(variants: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """Colour of each variant: fixed by name for the standard variants, spare colours else."""
    palette = sns.color_palette("colorblind")
    spare = cycle(_SPARE_COLORS)
    return {v: palette[_FIXED_COLORS[v] if v in _FIXED_COLORS else next(spare)] for v in variants}


# ---------------------------------------------------------------------------------------------
# Loading


Key = tuple[str, float, int]
"""A cell: (variant, λ, seed)."""


@dataclass
class Study:
    """A run or an ablation, loaded: one row per log line, tagged with its cell.

    Attributes:
        root: the directory.
        kind: ``"run"`` or ``"ablation"``.
        variants: variant names in the ablation's order.
        cells: (variant, λ, seed) -> run directory.
        evals, metrics, energy: the evaluation, training-step and energy records of every cell
            (:meth:`energylab.rundir.RunDir.evals` ...), with columns ``variant``, ``lmbda``,
            ``seed`` first.
        bitstream: one row per cell with real-bitstream results
            (:meth:`energylab.rundir.RunDir.bitstream`): ``bpp``, ``psnr-rgb``, ``bpp-estimated``, ...
        summary: the ablation's summary (:meth:`energylab.rundir.AblationDir.summary`), or None.
    """

    root: Path
    kind: str
    variants: list[str]
    cells: dict[Key, Path]
    evals: pd.DataFrame
    metrics: pd.DataFrame
    energy: pd.DataFrame
    bitstream: pd.DataFrame
    summary: dict | None

    @property
    def lmbdas(self) -> list[float]:
        """Every λ of the study, ascending."""
        return sorted({lm for _, lm, _ in self.cells})

    @property
    def default_lmbda(self) -> float:
        """The λ the training figures show: the middle one of an R-D sweep."""
        return self.lmbdas[(len(self.lmbdas) - 1) // 2]

    @property
    def colors(self) -> dict[str, tuple[float, float, float]]:
        return variant_colors(self.variants)

    def seeds(self, lmbda: float | None = None) -> list[int]:
        """Seeds with a cell at ``lmbda`` (default: :attr:`default_lmbda`)."""
        lmbda = self.default_lmbda if lmbda is None else lmbda
        return sorted({s for _, lm, s in self.cells if np.isclose(lm, lmbda)})

    def captures(self, key: Key) -> list[tuple[int, Path]]:
        """(step, archive) of every capture of one cell, by step."""
        return RunDir(self.cells[key]).capture_files()

    def at(self, frame: pd.DataFrame, lmbda: float | None = None) -> pd.DataFrame:
        """The rows of ``frame`` at ``lmbda`` (default: :attr:`default_lmbda`)."""
        lmbda = self.default_lmbda if lmbda is None else lmbda
        if frame.empty:
            return frame
        return frame[np.isclose(frame["lmbda"].astype(float), lmbda)]


def _frame(records: dict[Key, list[dict]]) -> pd.DataFrame:
    rows = [{"variant": v, "lmbda": lm, "seed": s, **r}
            for (v, lm, s), recs in records.items() for r in recs]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["variant", "lmbda", "seed"])


def _study(root: Path, kind: str, variants: list[str], cells: dict[Key, Path],
           summary: dict | None) -> Study:
    runs = {key: RunDir(d) for key, d in cells.items()}
    bitstream = {key: [b] if (b := run.bitstream()) is not None else [] for key, run in runs.items()}
    return Study(root=root, kind=kind, variants=variants, cells=cells,
                 evals=_frame({k: run.evals() for k, run in runs.items()}),
                 metrics=_frame({k: run.metrics() for k, run in runs.items()}),
                 energy=_frame({k: [with_roles(r) for r in run.energy()] for k, run in runs.items()}),
                 bitstream=_frame(bitstream), summary=summary)


def load_run(run_dir: Path | str) -> Study:
    """Load one run directory (its config and logs) as a one-cell study.

    Raises:
        FigureError: not a run directory.
    """
    root = Path(run_dir)
    try:
        args = RunDir(root).config()["args"]
    except RunDirError as err:
        raise FigureError(str(err)) from None
    name = variant_name(bool(args.get("auxt")), args.get("remove", ()), args.get("wavelet", "haar"))
    return _study(root, "run", [name], {(name, float(args["lmbda"]), int(args["seed"])): root},
                  None)


def load_ablation(root: Path | str) -> Study:
    """Load an ablation directory: every cell that exists, and its summary if written.

    Raises:
        FigureError: not an ablation directory.
    """
    ablation = AblationDir(root)
    try:
        meta = ablation.meta()
    except RunDirError as err:
        raise FigureError(str(err)) from None
    names = list(meta["variants"])
    cells = {(v, float(lm or meta["lmbda"]), seed): run.path
             for lm in (meta.get("lmbdas") or [None]) for v in names for seed in meta["seeds"]
             if (run := ablation.cell(v, seed, lm)).is_run()}
    summary = ablation.summary()
    if summary is not None:
        for cell in summary["cells"]:
            cell["lmbda"] = float(cell["lmbda"] or meta["lmbda"])
    present = [v for v in names if any(k[0] == v for k in cells)]
    return _study(ablation.path, "ablation", present, cells, summary)


def load(path: Path | str) -> Study:
    """:func:`load_ablation` or :func:`load_run`, whichever ``path`` is.

    Raises:
        FigureError: ``path`` is neither an ablation nor a run directory.
    """
    if AblationDir(path).is_ablation():
        return load_ablation(path)
    if RunDir(path).is_run():
        return load_run(path)
    raise FigureError(f"{path} is neither a run directory nor an ablation directory "
                      "(layouts: energylab.rundir)")


def load_captures(run_dir: Path | str,
                  layers: Sequence[str] | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Every capture archive of a run: step -> {``cov/<layer>``, ``energies/<layer>``, ``probe_y``}.

    Args:
        run_dir: a run directory.
        layers: keep only these layers' arrays (``probe_y`` is always kept); default all.
    """
    return RunDir(run_dir).captures(layers)


def layers_of(captures: dict[int, dict[str, np.ndarray]]) -> list[str]:
    """The layers held by the captures of :func:`load_captures`."""
    first = next(iter(captures.values()), {})
    return [k.removeprefix("cov/") for k in first if k.startswith("cov/")]


def summary_table(study: Study) -> pd.DataFrame:
    """The ablation summary as in its Markdown table: one row per variant (and λ), mean ± s.d.

    Raises:
        MissingInput: the study has no summary.
    """
    if study.summary is None:
        raise MissingInput(f"no {AblationDir.SUMMARY_JSON} (not an ablation directory, or not "
                           "summarised yet)")
    table = pd.DataFrame(table_rows(study.summary)).set_index(["variant", "λ"] if study.summary.get("bd_rate")
                                         else "variant")
    return table if study.summary.get("bd_rate") else table.drop(columns="λ")


# ---------------------------------------------------------------------------------------------
# Inputs of the figures

_NEEDS: dict[str, tuple[Callable[[Study], bool], str]] = {
    "evals": (lambda s: not s.evals.empty, f"no test evaluations ({RunDir.EVAL})"),
    "energy": (lambda s: "role" in s.energy and (s.energy["role"] == "y").any(),
               f"no energy statistics of y ({RunDir.ENERGY})"),
    "captures": (lambda s: any(s.captures(k) for k in s.cells),
                 f"no capture archives ({RunDir.CAPTURES}/)"),
    "aux": (lambda s: "aux_energy_share" in s.energy and s.energy["aux_energy_share"].notna().any(),
            f"no AuxT variant (no aux_energy_share in {RunDir.ENERGY})"),
    "modulation": (lambda s: "rate_share_entropy" in s.energy
                   and s.energy.loc[s.energy["role"] == "y_hat", "rate_share_entropy"].notna().any(),
                   f"no modulation statistics of y_hat (rate_share_entropy in {RunDir.ENERGY}; "
                   "records written before they existed)"),
    "summary": (lambda s: s.summary is not None,
                f"no {AblationDir.SUMMARY_JSON} (needs a summarised ablation directory)"),
    "sweep": (lambda s: not s.bitstream.empty and s.bitstream["lmbda"].nunique() >= 2,
              f"not an R-D sweep (needs real-bitstream results, {RunDir.BITSTREAM}, at ≥ 2 λ: "
              "ablate --lmbdas)"),
    "bd_rate": (lambda s: bool(s.summary and s.summary.get("bd_rate")),
                f"no BD-rates in {AblationDir.SUMMARY_JSON} (not an R-D sweep)"),
}


def _missing(study: Study, needs: Sequence[str]) -> str | None:
    for need in needs:
        ok, why = _NEEDS[need]
        if not ok(study):
            return why
    return None


def _require(study: Study, *needs: str) -> None:
    why = _missing(study, needs)
    if why:
        raise MissingInput(why)


# ---------------------------------------------------------------------------------------------
# Helpers


def _context(study: Study, lmbda: float | None, spread: str = BAND) -> str:
    """``λ = …, n seeds`` and, with several seeds, what the spread shows."""
    lmbda = study.default_lmbda if lmbda is None else lmbda
    seeds = study.seeds(lmbda)
    text = f"λ = {lmbda:g}, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    return text + (f"; {spread}" if len(seeds) > 1 else "")


def _title(fig: Figure, title: str, context: str) -> None:
    """Two-line figure title: what the figure shows, then its context."""
    fig.suptitle(f"{title}\n{context}", fontsize="medium")


def _loss_scale(ax: plt.Axes, values: pd.Series) -> None:
    """Log scale for a loss axis spanning more than a decade, linear otherwise."""
    positive = values[values > 0]
    if len(positive) and positive.max() > 10 * positive.min():
        ax.set_yscale("log")


def _present(study: Study, frame: pd.DataFrame) -> list[str]:
    return [v for v in study.variants if v in set(frame["variant"])]


def _lines(ax: plt.Axes, study: Study, frame: pd.DataFrame, x: str, y: str) -> None:
    """Mean over seeds with a ± 1 s.d. band, one line per variant."""
    sns.lineplot(data=frame, x=x, y=y, hue="variant", hue_order=_present(study, frame),
                 palette=study.colors, errorbar="sd", ax=ax, legend=True)


def _figure_legend(fig: Figure, axes: Sequence[plt.Axes]) -> None:
    """One legend for the figure, below the panels, from the first panel's lines."""
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6),
                   frameon=False)


def _energy_y(study: Study, lmbda: float | None) -> pd.DataFrame:
    energy = study.at(study.energy, lmbda)
    return energy[energy["role"] == "y"]


def _final(frame: pd.DataFrame) -> pd.DataFrame:
    """Each cell's rows at its last step."""
    last = frame.groupby(["variant", "lmbda", "seed"])["step"].transform("max")
    return frame[frame["step"] == last]


def _by_energy(energies: np.ndarray) -> np.ndarray:
    """Channel order by energy, descending."""
    return np.argsort(energies, kind="stable")[::-1]


def _matrix(ax: plt.Axes, matrix: np.ndarray, energies: np.ndarray, kind: str) -> plt.AxesImage:
    """Draw a correlation (±1) or covariance (symmetric scale) matrix, channels by energy."""
    order = _by_energy(energies)
    m = matrix[np.ix_(order, order)]
    if kind == "correlation":
        m, vmax = stats.correlation_matrix(m), 1.0
    else:
        vmax = float(np.abs(m).max()) or 1.0
    image = ax.imshow(m, cmap=HEATMAP_CMAP, vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    return image


# ---------------------------------------------------------------------------------------------
# Figures


def plot_loss_curves(study: Study, lmbda: float | None = None) -> Figure:
    """Test R-D loss, bpp (from the likelihoods) and PSNR vs training step, per variant."""
    _require(study, "evals")
    evals = study.at(study.evals, lmbda)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4), layout="constrained")
    for ax, (col, label) in zip(axes, (("loss", "test R-D loss (λ·255²·MSE + bpp)"),
                                       ("bpp", "test rate (bpp, estimated)"),
                                       ("psnr", "test PSNR (dB)")), strict=True):
        _lines(ax, study, evals, "step", col)
        ax.set(xlabel=STEP, ylabel=label)
    _loss_scale(axes[0], evals["loss"])
    _figure_legend(fig, axes)
    _title(fig, "Rate-distortion on the test images over training", _context(study, lmbda))
    return fig


def plot_step_equivalence(study: Study, lmbda: float | None = None) -> Figure:
    """The step-equivalence curve (the summary's ``step_equivalence``: ``t'``, the step at which
    the variant's test loss curve reaches the baseline's at ``t``; :mod:`energylab.summary`'s rule)
    against the baseline's step ``t``, with the lines ``t' = t`` and ``t' = t/2``, and the speed-up
    ``t / t'`` over ``t`` (1 = no speed-up); per variant, mean over seeds with a ± 1 s.d. band of the
    points that are values. A ``t'`` at or before the variant's first evaluation is only a bound:
    drawn as an open marker (``t' ≤``: a downward triangle; speed-up ``≥``: an upward one), never
    in the line. The subtitle states the resolution of ``t'`` (the evaluation spacing).
    """
    _require(study, "summary")
    if not study.cells:
        raise MissingInput("no cell of the ablation has a run directory")
    lmbda = study.default_lmbda if lmbda is None else lmbda
    rows = [{"variant": c["variant"], "seed": c["seed"], "step": t, "t_variant": tv, "speedup": v,
             "bound": b}
            for c in study.summary.get("step_equivalence", [])
            if c["variant"] != "baseline" and (c["lmbda"] or study.default_lmbda) == lmbda
            for t, tv, v, b in zip(c["t"], c["t_variant"], c["speedup"],
                                   c.get("bound", [None] * len(c["t"])), strict=True) if tv is not None]
    if not rows:
        raise MissingInput("no variant reaches the baseline's loss in the summary's step_equivalence")
    frame = pd.DataFrame(rows)
    bounded = frame["bound"].notna()
    values, bounds = frame[~bounded], frame[bounded]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    if not values.empty:
        _lines(axes[0], study, values, "step", "t_variant")
        _lines(axes[1], study, values.dropna(subset=["speedup"]), "step", "speedup")
    top = float(frame["step"].max())
    bounded_variants = _present(study, bounds) if not bounds.empty else []
    for i, variant in enumerate(bounded_variants):  # dodged: bounds of several variants coincide
        group = bounds[bounds["variant"] == variant]
        color = study.colors.get(variant, "0.3")
        shift = (i - (len(bounded_variants) - 1) / 2) * 0.008 * top
        axes[0].scatter(group["step"] + shift, group["t_variant"], marker="v", facecolors="none",
                        edgecolors=[color], s=28, linewidths=1.0, zorder=3)
        axes[1].scatter(group["step"] + shift, group["speedup"], marker="^", facecolors="none",
                        edgecolors=[color], s=28, linewidths=1.0, zorder=3)
    axes[0].plot([0, top], [0, top], color="0.5", lw=0.8, ls="--")
    axes[0].plot([0, top], [0, top / 2], color="0.5", lw=0.8, ls=":")
    axes[0].set(xlabel="baseline's step t", ylabel="variant's equivalent step t′",
                title="t′ = t: no speed-up (dashed); t′ = t/2: 2× (dotted)")
    axes[1].axhline(1.0, color="0.5", lw=0.8, ls="--")
    axes[1].set(xlabel="baseline's step t", ylabel="speed-up t / t′",
                title="open ▲ / ▼: bounds, not values" if not bounds.empty else "")
    if not bounds.empty:
        axes[0].scatter([], [], marker="v", facecolors="none", edgecolors="0.3",
                        label="open ▼ / ▲: t′ ≤ first evaluation, speed-up ≥ (bounds)")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if handles:  # long variant names: at most 3 columns
        fig.legend(handles, labels, loc="outside lower center", frameon=False,
                   ncols=min(len(labels), 3 if len(labels) > 4 else 6))
    _title(fig, "Step equivalence: the variant at t′ matches the baseline at t",
           f"{_context(study, lmbda)}\n{_resolution_text(study.summary)}")
    return fig


def _resolution_text(summary: dict) -> str:
    """The resolution of ``t'`` the summary records (one line), or that it records none."""
    resolution = summary.get("resolution")
    if resolution is None:
        return "t′ resolution not recorded (a summary written before the rule of issue 19)"
    if not resolution:
        return "no evaluations after step 0"
    if len(resolution) > 1:
        firsts = ", ".join(f"{r['first']:g}" for r in resolution)
        return f"t′ resolution: the cells' evaluation schedules differ (first evaluations {firsts})"
    spacing = ", then ".join(f"every {r['every']:g} to {r['to']:g}" for r in resolution[0]["spacing"])
    return f"t′ resolution: evaluations {spacing}; t′ ≤ {resolution[0]['first']:g} is a bound"


TOPK_SHARES = (("topk_share.l2", "L2 norm per channel"),
               ("topk_energy_share", "mean square per channel"))
"""The top-k share :func:`plot_compaction_and_loss` draws, first present first: the paper's Fig. 1
energy (L2 norm over positions, ``stats.channel_energies``' ``l2``), else the raw mean square of
records written before the named variants existed."""


def _topk_column(energy: pd.DataFrame) -> tuple[str, str]:
    """The top-k share column of :data:`TOPK_SHARES` the records carry, and what energy it shares."""
    for col, name in TOPK_SHARES:
        if col in energy and energy[col].notna().any():
            return col, name
    raise MissingInput(f"no top-k energy share of y in {RunDir.ENERGY}")


def plot_compaction_and_loss(study: Study, lmbda: float | None = None) -> Figure:
    """Energy compaction (top-k share of ``y``: of the channels' L2 norms, the paper's Fig. 1 sense;
    of their mean squares in records without ``topk_share.l2``) and test R-D loss vs training step."""
    _require(study, "evals", "energy")
    energy = _energy_y(study, lmbda)
    evals = study.at(study.evals, lmbda)
    k = int(energy["topk_k"].iloc[0])
    col, energy_name = _topk_column(energy)
    energy = _numeric(energy, [col]).dropna(subset=[col])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), layout="constrained")
    _lines(axes[0], study, energy, "step", col)
    axes[0].set(xlabel=STEP, ylabel=f"share of top {k} channel{'s' if k > 1 else ''} ({energy_name})",
                title="energy compaction of y")
    _lines(axes[1], study, evals, "step", "loss")
    axes[1].set(xlabel=STEP, ylabel="test R-D loss (λ·255²·MSE + bpp)", title="rate-distortion")
    _loss_scale(axes[1], evals["loss"])
    _figure_legend(fig, axes)
    _title(fig, "Energy compaction and R-D loss over training", _context(study, lmbda))
    return fig


CI = "dotted: mean of the cells' 95 % bootstrap intervals over probe images"
"""What the dotted lines of the interval figures show (:func:`plot_energy_split`)."""


def _numeric(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """``frame`` with ``columns`` (those present) as floats, JSON ``null`` (a statistic undefined for
    a singular layer, or a record without it) as NaN."""
    frame = frame.copy()
    for col in columns:
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    return frame


def _intervals(ax: plt.Axes, study: Study, frame: pd.DataFrame, col: str) -> bool:
    """Per variant, the mean over seeds of each cell's bootstrap interval of ``col`` (columns
    ``<col>_ci_low`` / ``<col>_ci_high``) as two dotted lines; False if there are none."""
    low, high = f"{col}_ci_low", f"{col}_ci_high"
    if low not in frame or high not in frame:
        return False
    drawn = False
    for variant in _present(study, frame):
        rows = frame[frame["variant"] == variant]
        bounds = rows.groupby("step")[[low, high]].mean().dropna()
        for bound in (low, high):
            if not bounds.empty:
                ax.plot(bounds.index, bounds[bound], color=study.colors[variant], ls=":", lw=1.1)
                drawn = True
    return drawn


ENERGY_SPLIT = (("coding_gain_db", "coding gain (dB)", "energy modulation"),
                ("total_correlation", "total correlation (nats)", "channel decorrelation"),
                ("neighbourhood_tc.across_channels", "nats (2×2 neighbourhoods)",
                 "across channels"),
                ("neighbourhood_tc.across_positions", "nats (2×2 neighbourhoods)",
                 "across positions (spatial)"))
"""Panels of :func:`plot_energy_split`: (column, axis label, title)."""


def plot_energy_split(study: Study, lmbda: float | None = None) -> Figure:
    """The two-part split of the energy compaction of ``y`` over training, per variant.

    Panels: coding gain (dB; energy modulation), channel total correlation (nats, bias-corrected
    in new records; the one decorrelation number: the decorrelation gain is its exponential form,
    ``TC = (C/2)·ln(decorrelation gain)``), and decorrelation of 2×2 neighbourhoods split into its
    across-channel part (k² × the channel total correlation) and its across-position (spatial) part,
    side by side on one scale. Lines: mean over seeds with a ± 1 s.d. band over seeds; dotted: the
    mean of the cells' 95 % bootstrap intervals over probe images, where the records carry
    ``<stat>_ci_low`` / ``<stat>_ci_high``. ``null`` values (undefined for a singular layer) are
    left out; records without the neighbourhood split (written before it existed) leave those
    panels empty with a note.

    Raises:
        MissingInput: no energy records of ``y``.
    """
    _require(study, "energy")
    bounds = [f"{c}{s}" for c in ("coding_gain", *(p[0] for p in ENERGY_SPLIT[1:]))
              for s in ("", "_ci_low", "_ci_high")]
    energy = _numeric(_energy_y(study, lmbda), bounds)
    for col in ("coding_gain", "coding_gain_ci_low", "coding_gain_ci_high"):
        if col in energy:
            db = col.replace("coding_gain", "coding_gain_db")
            energy[db] = energy[col].where(energy[col] > 0).map(stats.to_db)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), layout="constrained")
    with_ci = False
    for ax, (col, label, title) in zip(axes, ENERGY_SPLIT, strict=True):
        ax.set(xlabel=STEP, ylabel=label, title=title)
        frame = energy.dropna(subset=[col]) if col in energy else energy.iloc[:0]
        if frame.empty:
            ax.text(0.5, 0.5, "not in these records" if col not in energy else "undefined\n"
                    "(singular covariance)", transform=ax.transAxes, ha="center", va="center",
                    color="0.4", fontsize="small")
            continue
        _lines(ax, study, frame, "step", col)
        with_ci |= _intervals(ax, study, frame, col)
    spatial = [ax for ax in axes[2:] if ax.lines]
    if spatial:  # across channels beside across positions, on one scale
        low = min(ax.get_ylim()[0] for ax in spatial)
        high = max(ax.get_ylim()[1] for ax in spatial)
        for ax in spatial:
            ax.set_ylim(low, high)
    _figure_legend(fig, axes)
    _title(fig, "Energy compaction of y: energy modulation and decorrelation (channels; "
           "channels and positions of 2×2 neighbourhoods)",
           _context(study, lmbda) + (f"; {CI}" if with_ci else ""))
    return fig


def plot_correlation_heatmaps(study: Study, lmbda: float | None = None,
                              variants: Sequence[str] | None = None, layer: str = "y") -> Figure:
    """Channel correlation of ``layer``: a grid of variants × early / middle / final capture.

    Channels are ordered by energy (descending) in every panel; the first seed of each variant.
    """
    _require(study, "captures")
    lmbda = study.default_lmbda if lmbda is None else lmbda
    rows = []
    for variant in variants or study.variants:
        keys = sorted(k for k in study.cells if k[0] == variant and np.isclose(k[1], lmbda))
        caps = study.captures(keys[0]) if keys else []
        if caps:
            picks = sorted({0, (len(caps) - 1) // 2, len(caps) - 1})
            rows.append((variant, keys[0][2], [caps[i] for i in picks]))
    if not rows:
        raise MissingInput(f"no captures at λ = {lmbda:g}")
    ncols = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.3 * ncols + 1.0, 2.3 * len(rows) + 0.6),
                             layout="constrained", squeeze=False)
    labels = ["early", "middle", "final"] if ncols == 3 else ["early", "final"][-ncols:]
    image = None
    for r, (variant, seed, caps) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            if c >= len(caps):
                ax.set_visible(False)
                continue
            step, path = caps[c]
            with np.load(path) as z:
                if f"cov/{layer}" not in z.files:
                    raise MissingInput(f"the captures hold no layer {layer!r}")
                image = _matrix(ax, z[f"cov/{layer}"], z[f"energies/{layer}"], "correlation")
            ax.set_title(f"{labels[c]}: step {step}", fontsize="small")
            if c == 0:
                ax.set_ylabel(f"{variant}\n(seed {seed})", color=study.colors[variant],
                              fontweight="bold")
            if r == len(rows) - 1:
                ax.set_xlabel("channels by energy →", fontsize="small")
    fig.colorbar(image, ax=axes, shrink=min(0.9, 0.35 + 0.2 * len(rows)),
                 label="correlation coefficient")
    _title(fig, f"Channel correlation of {layer} over training",
           f"λ = {lmbda:g}; channels ordered by energy, descending")
    return fig


def _l2_norms(energies: np.ndarray) -> np.ndarray:
    """Per-channel L2 norms over positions, up to the common factor sqrt(positions), from the
    captures' mean squares ``energies/<layer>``: the energy of the paper's Fig. 1
    (``stats.channel_energies``' ``l2``); shares of them need no position count."""
    return np.sqrt(np.clip(np.asarray(energies, dtype=np.float64), 0.0, None))


def _final_energies(study: Study, lmbda: float | None, layer: str) -> pd.DataFrame:
    lmbda = study.default_lmbda if lmbda is None else lmbda
    rows = []
    for key in study.cells:
        if not np.isclose(key[1], lmbda) or not study.captures(key):
            continue
        step, path = study.captures(key)[-1]
        with np.load(path) as z:
            energies = _l2_norms(z[f"energies/{layer}"])
        curve = stats.energy_compaction_curve(energies)
        e = np.sort(energies.astype(np.float64))[::-1]
        share = e / e.sum() if e.sum() > 0 else np.full_like(e, 1 / len(e))
        rows += [{"variant": key[0], "seed": key[2], "step": step, "rank": i + 1,
                  "share": s, "cumulative": c}
                 for i, (s, c) in enumerate(zip(share, curve, strict=True))]
    if not rows:
        raise MissingInput(f"no captures at λ = {lmbda:g}")
    return pd.DataFrame(rows)


def plot_energy_spectra(study: Study, lmbda: float | None = None, layer: str = "y") -> Figure:
    """Channel energy spectrum (share by rank) and compaction curve at the final capture, with the
    energy of a channel its L2 norm over positions (the paper's Fig. 1 sense)."""
    _require(study, "captures")
    frame = _final_energies(study, lmbda, layer)
    channels = int(frame["rank"].max())
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), layout="constrained")
    _lines(axes[0], study, frame, "rank", "share")
    axes[0].set(xlabel="channel rank (by energy)", ylabel=f"share of the L2 norms of {layer}",
                yscale="log", title="energy spectrum")
    _lines(axes[1], study, frame, "rank", "cumulative")
    axes[1].plot([0, channels], [0, 1], color="0.6", ls=":", lw=1, label="equal energies")
    axes[1].set(xlabel="k most energetic channels", ylabel="cumulative share of the L2 norms",
                xlim=(0, channels), ylim=(0, 1.02), title="energy compaction curve")
    for ax in axes:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    _figure_legend(fig, axes[::-1])
    steps = sorted(set(frame["step"]))
    at = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"
    _title(fig, f"Channel energies of {layer} at the final capture ({at})",
           _context(study, lmbda))
    return fig


COMPACTION_STAGES = (0, 25, 50, 100)
"""Training stages of :func:`plot_compaction_curves`, in % of a cell's final capture step: each
cell's capture nearest to each (ties: the later one); a capture nearest to two stages is drawn at
the earlier one only."""


def _stage_captures(captures: Sequence[tuple[int, Path]]) -> list[tuple[int, int, Path]]:
    """``(stage %, step, archive)`` of :data:`COMPACTION_STAGES` among one cell's captures."""
    if not captures:
        return []
    final = captures[-1][0]
    picked, seen = [], set()
    for stage in COMPACTION_STAGES:
        step, path = min(captures, key=lambda c: (abs(c[0] - stage / 100 * final), -c[0]))
        if step not in seen:
            seen.add(step)
            picked.append((stage, step, path))
    return picked


def compaction_curve_frame(study: Study, lmbda: float | None = None, layer: str = "y") -> pd.DataFrame:
    """The energy-compaction curves (:func:`energylab.stats.compaction_curves`, the paper's Fig. 1)
    of ``layer`` at :data:`COMPACTION_STAGES` of every cell at ``lmbda``, with a channel's energy
    its L2 norm over positions: one row per cell, stage and ``k`` = 1..C, columns ``variant``,
    ``seed``, ``stage`` (%), ``step`` (the capture's), ``percent`` (its step in % of the cell's final
    capture step), ``k`` and ``cumulative`` (``c_k``).

    Raises:
        MissingInput: no cell at ``lmbda`` has captures, or they hold no ``layer``.
    """
    lmbda = study.default_lmbda if lmbda is None else lmbda
    rows = []
    for key in study.cells:
        if not np.isclose(key[1], lmbda):
            continue
        stages = _stage_captures(study.captures(key))
        if not stages:
            continue
        norms = []
        for _, _, path in stages:
            arrays = RunDir.capture(path, layers=[layer])
            if f"energies/{layer}" not in arrays:
                raise MissingInput(f"the captures hold no layer {layer!r}")
            norms.append(_l2_norms(arrays[f"energies/{layer}"]))
        curves = stats.compaction_curves(torch.from_numpy(np.stack(norms))).numpy()  # (stages, C)
        final = stages[-1][1] or 1
        rows += [{"variant": key[0], "seed": key[2], "stage": stage, "step": step,
                  "percent": 100 * step / final, "k": k + 1, "cumulative": float(c)}
                 for (stage, step, _), curve in zip(stages, curves, strict=True)
                 for k, c in enumerate(curve)]
    if not rows:
        raise MissingInput(f"no captures at λ = {lmbda:g}")
    return pd.DataFrame(rows)


def _stage_label(rows: pd.DataFrame) -> str:
    """``step 500 (33 %)``: the capture step of one stage's rows and its share of the training."""
    lo, hi = int(rows["step"].min()), int(rows["step"].max())
    at = f"step {lo}" if lo == hi else f"steps {lo}–{hi}"
    return f"{at} ({'' if lo == hi else '≈'}{rows['percent'].mean():.0f} %)"


def plot_compaction_curves(study: Study, lmbda: float | None = None, layer: str = "y") -> Figure:
    """Energy-compaction curves of ``layer`` as in the paper's Fig. 1 (Li et al., ICLR 2025): the
    cumulative share of the channels' L2 norms held by the ``k`` most energetic channels, against
    ``k``; one panel per variant (the baseline's included), one curve per training stage
    (:data:`COMPACTION_STAGES`: the captures at the start, ≈25 %, ≈50 % and the end of training),
    mean over seeds with a ± 1 s.d. band. Each variant's panel repeats the baseline's final curve
    (dashed) and the equal-energy diagonal (dotted). Data: :func:`compaction_curve_frame`."""
    _require(study, "captures")
    frame = compaction_curve_frame(study, lmbda, layer)
    present = _present(study, frame)
    channels = int(frame["k"].max())
    ncols = min(len(present), 3)
    nrows = -(-len(present) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 0.4, 3.0 * nrows + 0.9),
                             layout="constrained", squeeze=False, sharex=True, sharey=True)
    colors = dict(zip(COMPACTION_STAGES, sns.color_palette("viridis", len(COMPACTION_STAGES)),
                      strict=True))
    stats_of = frame.groupby(["variant", "stage", "k"])["cumulative"].agg(["mean", "std"]).reset_index()
    base = stats_of[(stats_of["variant"] == "baseline")]
    base_final = base[base["stage"] == base["stage"].max()] if len(base) else base
    for ax, variant in zip(axes.flat, present, strict=False):
        own = stats_of[stats_of["variant"] == variant]
        for stage in sorted(set(own["stage"])):
            line = own[own["stage"] == stage]
            rows = frame[(frame["variant"] == variant) & (frame["stage"] == stage)]
            ax.plot(line["k"], line["mean"], color=colors[stage], lw=1.6, label=_stage_label(rows))
            if line["std"].notna().any():
                ax.fill_between(line["k"], line["mean"] - line["std"].fillna(0),
                                line["mean"] + line["std"].fillna(0), color=colors[stage], alpha=0.2,
                                lw=0)
        if variant != "baseline" and len(base_final):
            ax.plot(base_final["k"], base_final["mean"], color="0.35", ls="--", lw=1.1,
                    label="baseline, final")
        ax.plot([0, channels], [0, 1], color="0.6", ls=":", lw=1, label="equal energies")
        ax.set_title(variant, color=study.colors[variant], fontweight="bold")
        ax.set(xlim=(0, channels), ylim=(0, 1.02))
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.legend(fontsize="x-small", loc="lower right")
    for ax in axes.flat[len(present):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("k most energetic channels")
    for ax in axes[:, 0]:
        ax.set_ylabel("cumulative share of the L2 norms")
    _title(fig, f"Energy compaction curves of {layer} over training (Li et al., ICLR 2025, Fig. 1)",
           _context(study, lmbda))
    return fig


SUBBANDS = (("subband_energy.", "channel means in"),
            ("subband_energy_centred.", "channel means removed"))
"""Subband energy statistics of :func:`plot_subband_energy`: (column prefix, panel title)."""


def plot_subband_energy(study: Study, lmbda: float | None = None) -> Figure:
    """Subband energy shares of ``y`` (2-level Haar DWT of each channel) at the final capture: with
    the channel means in (``subband_energy.<band>``) and, where the records carry it, removed
    (``subband_energy_centred.<band>``; the means mostly land in LL2)."""
    _require(study, "energy")
    energy = _final(_energy_y(study, lmbda))
    panels = [(prefix, title, [c for c in energy.columns if c.startswith(prefix)])
              for prefix, title in SUBBANDS]
    panels = [p for p in panels if p[2] and energy[p[2]].notna().any().any()]
    if not panels:
        raise MissingInput(f"no subband_energy.* statistics in {RunDir.ENERGY}")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels) + 1, 3.6),
                             layout="constrained", squeeze=False)
    for ax, (prefix, title, bands) in zip(axes[0], panels, strict=True):
        frame = _numeric(energy, bands).melt(id_vars=["variant", "seed"], value_vars=bands,
                                             var_name="band", value_name="share").dropna()
        frame["band"] = frame["band"].str.removeprefix(prefix)
        sns.barplot(data=frame, x="band", y="share", hue="variant", hue_order=_present(study, frame),
                    palette=study.colors, errorbar="sd", capsize=0.1, err_kws={"linewidth": 1},
                    ax=ax)
        ax.set(xlabel="subband of y (2-level Haar DWT per channel)", ylabel="share of the energy of y",
               yscale="log", title=title)
    _figure_legend(fig, list(axes[0]))
    _title(fig, "Subband energy of y at the final capture",
           _context(study, lmbda, "error bars: ± 1 s.d. over seeds"))
    return fig


def plot_aux_energy_share(study: Study, lmbda: float | None = None) -> Figure:
    """Share of the merged energy carried by the AuxT branch, ‖aux‖² / ‖main + aux‖², per merge
    point (stage) over training, for the AuxT variants."""
    _require(study, "aux")
    energy = study.at(study.energy, lmbda)
    aux = energy[energy["role"] == "aux"].copy()
    aux["stage"] = aux["merge"].astype(int)
    stages = sorted(set(aux["stage"]))
    fig, axes = plt.subplots(1, len(stages), figsize=(2.8 * len(stages) + 0.6, 3.3),
                             layout="constrained", squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        _lines(ax, study, aux[aux["stage"] == stage], "step", "aux_energy_share")
        ax.set(xlabel=STEP, ylabel="‖aux‖² / ‖main + aux‖²" if stage == stages[0] else "",
               title=f"merge point {stage}" + (" (y)" if stage == stages[-1] else ""))
    _figure_legend(fig, list(axes[0]))
    _title(fig, "Energy share of the AuxT branch at each merge point of g_a over training",
           _context(study, lmbda))
    return fig


SUBBAND_GAINS = ("LL", "LH", "HL", "HH")
"""Subbands of the learned gains ``exp_s.<band>`` (role ``gain`` records)."""
SUBBAND_PALETTE = "mako"
"""Colours of the subbands in :func:`plot_modulation` (a sequential map, apart from the variants')."""


def _gain_variant(study: Study, gains: pd.DataFrame) -> str | None:
    """The variant whose learned subband gains :func:`plot_modulation` draws: ``auxt`` if it has
    them, else the first variant that does."""
    have = _present(study, gains) if not gains.empty else []
    return "auxt" if "auxt" in have else (have[0] if have else None)


def plot_modulation(study: Study, lmbda: float | None = None) -> Figure:
    """Energy modulation against the quantiser over training: of ``y_hat``, the entropy of the
    per-channel rate shares (bits; log2 of the effective number of channels carrying the rate) and
    the number of active channels (a non-negligible share of the rate), per variant; with AuxT, the
    learned subband gains ``exp(s)`` (mean over channels) of every WLS of ``g_a`` and iWLS of
    ``g_s``, one line per subband and merge point, for one AuxT variant.

    Lines: mean over seeds with a ± 1 s.d. band over seeds. Needs the ``y_hat`` modulation
    statistics of :meth:`energylab.capture.LatentProbe.records` (``rate_share_entropy``,
    ``active_channels``); the gain panels say so when no variant learned subband gains.

    Raises:
        MissingInput: the records have no ``rate_share_entropy`` of ``y_hat``.
    """
    _require(study, "modulation")
    energy = study.at(study.energy, lmbda)
    y_hat = _numeric(energy[energy["role"] == "y_hat"], ["rate_share_entropy", "active_channels"])
    gain_cols = [f"exp_s.{b}" for b in SUBBAND_GAINS]
    gains = energy[energy["role"] == "gain"] if "exp_s.LL" in energy else energy.iloc[:0]
    gains = _numeric(gains, gain_cols)
    variant = _gain_variant(study, gains)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.7), layout="constrained")
    for ax, (col, label, title) in zip(axes[:2], (
            ("rate_share_entropy", "entropy of the rate shares (bits)", "spread of the rate"),
            ("active_channels", "active channels", "channels carrying the rate")), strict=True):
        frame = y_hat.dropna(subset=[col])
        if not frame.empty:
            _lines(ax, study, frame, "step", col)
        ax.set(xlabel=STEP, ylabel=label, title=f"{title} (y_hat)")
    for ax, side in zip(axes[2:], ("g_a", "g_s"), strict=True):
        rows = gains[(gains["variant"] == variant) & gains["layer"].str.startswith(f"{side}.")]
        if rows.empty:
            ax.text(0.5, 0.5, "no learned subband gains\n(no AuxT variant with scaling)",
                    transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize="small")
            continue
        frame = rows.melt(id_vars=["seed", "step", "merge"], value_vars=gain_cols, var_name="subband",
                          value_name="gain").dropna()
        frame["subband"] = frame["subband"].str.removeprefix("exp_s.")
        frame["merge point"] = frame["merge"].astype(int).astype(str)
        sns.lineplot(data=frame, x="step", y="gain", hue="subband", hue_order=list(SUBBAND_GAINS),
                     palette=SUBBAND_PALETTE, style="merge point", errorbar="sd", ax=ax,
                     legend=side == "g_a")
        ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    for ax, side in zip(axes[2:], ("g_a", "g_s"), strict=True):
        ax.set(xlabel=STEP, ylabel="exp(s), mean over channels" if side == "g_a" else "",
               title=f"subband gains of {side}" + (f" ({variant})" if variant else ""))
    if axes[2].get_legend() is not None:
        sns.move_legend(axes[2], "upper left", fontsize="x-small", title_fontsize="x-small",
                        ncols=2, frameon=False)
    _figure_legend(fig, list(axes[:2]))
    _title(fig, "Energy modulation against the quantiser: the rate over channels of y_hat, and "
           "AuxT's learned subband gains", _context(study, lmbda))
    return fig


SUMMARY_BARS = (("test_loss", "test R-D loss"), ("real_bpp", "rate (bpp, real bitstream)"),
                ("real_psnr", "PSNR (dB, real bitstream)"),
                ("speedup_steps", "speedup to target (steps, ×)"),
                ("final_coding_gain", "coding gain of y (dB)"),
                ("final_total_correlation", "total correlation of y (nats)"),
                ("final_topk_energy_share", "top-k energy share of y"))
"""Per-cell summary values drawn by :func:`plot_ablation_summary` (gains converted to dB)."""


def plot_ablation_summary(study: Study, lmbda: float | None = None) -> Figure:
    """The ablation summary as bars (mean ± 1 s.d. over seeds), each seed a dot."""
    _require(study, "summary")
    cells = study.at(pd.DataFrame(study.summary["cells"]), lmbda)
    for gain in ("final_coding_gain",):
        if gain in cells:
            cells[gain] = cells[gain].astype(float).map(stats.to_db)
    others = cells["variant"] != "baseline"
    panels = [(k, t) for k, t in SUMMARY_BARS
              if k in cells and cells.loc[others, k].notna().any()]
    if not panels:
        raise MissingInput(f"{AblationDir.SUMMARY_JSON} has no per-cell values")
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    order = _present(study, cells)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols + 0.4, 2.9 * nrows + 0.4),
                             layout="constrained", squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        data = cells[["variant", key]].dropna().astype({key: float})
        sns.barplot(data=data, x="variant", y=key, hue="variant", order=order, hue_order=order,
                    palette=study.colors, errorbar="sd", capsize=0.15,
                    err_kws={"linewidth": 1}, legend=False, ax=ax)
        sns.stripplot(data=data, x="variant", y=key, order=order, color="0.15", size=3.5,
                      jitter=0.12, ax=ax)
        ax.set(xlabel="", ylabel="", title=title)
        for i, variant in enumerate(order):
            if variant not in set(data["variant"]):
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize="small", color="0.4")
        ax.tick_params(axis="x", labelrotation=35 if len(order) > 2 else 0)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right" if len(order) > 2 else "center")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    _title(fig, "Ablation summary", _context(study, lmbda, "bars: mean ± 1 s.d. over seeds; "
                                                        "dots: seeds"))
    return fig


def plot_rd_curves(study: Study) -> Figure:
    """Real-bitstream rate-distortion curves of an R-D sweep: PSNR vs bpp, one point per λ
    (mean over seeds, ± 1 s.d. error bars)."""
    _require(study, "sweep")
    stats = (study.bitstream.groupby(["variant", "lmbda"])[["bpp", "psnr-rgb"]]
             .agg(["mean", "std"]).reset_index())
    fig, ax = plt.subplots(figsize=(5.2, 4.0), layout="constrained")
    seeds = study.bitstream["seed"].nunique()
    for variant in _present(study, stats):
        rows = stats[stats["variant"] == variant].sort_values("lmbda")
        x, y = rows["bpp"]["mean"], rows["psnr-rgb"]["mean"]
        ax.plot(x, y, marker="o", ms=4, lw=1.5, color=study.colors[variant], label=variant)
        if seeds > 1:
            ax.errorbar(x, y, xerr=rows["bpp"]["std"].fillna(0),
                        yerr=rows["psnr-rgb"]["std"].fillna(0), fmt="none", capsize=2, lw=1,
                        color=study.colors[variant])
    ax.set(xlabel="rate (bpp, real bitstream)", ylabel="PSNR (dB)")
    _figure_legend(fig, [ax])
    lmbdas = ", ".join(f"{lm:g}" for lm in study.lmbdas)
    context = f"λ = {lmbdas}; {seeds} seed{'s' if seeds > 1 else ''}"
    _title(fig, "Rate-distortion of real bitstreams",
           context + ("; mean ± 1 s.d. over seeds" if seeds > 1 else ""))
    return fig


def plot_bd_rate_table(study: Study) -> Figure:
    """The BD-rate of each variant against the baseline (real bitstreams, PCHIP) as a table."""
    _require(study, "bd_rate")
    rows = []
    for variant, bd in study.summary["bd_rate"].items():
        if bd["mean"] is None:
            value = "—"
        else:
            value = f"{bd['mean']:+.2f}" + (f" ± {bd['std']:.2f}" if bd["std"] else "")
        note = textwrap.fill("; ".join(bd["errors"]), 60) if bd["errors"] else ""
        rows.append([variant, value, str(bd["seeds"]), note])
    has_notes = any(r[3] for r in rows)
    columns = ["variant", "BD-rate vs baseline (%)", "seeds", "note"][: 4 if has_notes else 3]
    x = [0.0, 0.24, 0.52, 0.62] if has_notes else [0.0, 0.42, 0.85]
    heights = [1] + [r[3].count("\n") + 1 for r in rows]
    fig, ax = plt.subplots(figsize=(9.5 if has_notes else 5.5, 0.9 + 0.28 * sum(heights)),
                           layout="constrained")
    ax.set(xlim=(0, 1), ylim=(sum(heights), 0))
    ax.axis("off")
    top = 0
    for i, (cells, height) in enumerate(zip([columns, *rows], heights, strict=True)):
        for j, (text, left) in enumerate(zip(cells, x, strict=False)):
            color = study.colors.get(text, "black") if i and j == 0 else "0.1"
            ax.text(left + 0.01, top + 0.25, text, va="top", fontsize="small", color=color,
                    fontweight="bold" if i == 0 or j == 0 else "normal")
        top += height
        ax.axhline(top, color="0.6" if i == 0 else "0.85", lw=1)
    seeds = study.bitstream["seed"].nunique()
    _title(fig, "BD-rate against the baseline (real bitstreams, PSNR, PCHIP)",
           f"mean ± 1 s.d. over {seeds} seed{'s' if seeds > 1 else ''}; negative: fewer bits "
           "for the same quality")
    return fig


# ---------------------------------------------------------------------------------------------
# Notebook helpers: one run's captures


def plot_capture_matrices(captures: dict[int, dict[str, np.ndarray]], layer: str = "y",
                          kind: str = "correlation", ncols: int = 4) -> Figure:
    """The correlation (±1) or covariance matrix of ``layer`` at every capture, as a grid.

    Channels are ordered by energy at each capture; the covariance uses a symmetric scale per panel.
    """
    if kind not in ("correlation", "covariance"):
        raise ValueError(f"kind must be 'correlation' or 'covariance', got {kind!r}")
    steps = sorted(captures)
    if not steps:
        raise MissingInput("no captures")
    ncols = min(ncols, len(steps))
    nrows = -(-len(steps) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols + 0.8, 2.4 * nrows + 0.5),
                             layout="constrained", squeeze=False)
    for ax, step in zip(axes.flat, steps, strict=False):
        image = _matrix(ax, captures[step][f"cov/{layer}"], captures[step][f"energies/{layer}"],
                        kind)
        ax.set_title(f"step {step}", fontsize="small")
        if kind == "covariance":
            fig.colorbar(image, ax=ax, shrink=0.8)
    for ax in axes.flat[len(steps):]:
        ax.set_visible(False)
    if kind == "correlation":
        fig.colorbar(image, ax=axes, shrink=0.8, label="correlation coefficient")
    fig.suptitle(f"Channel {kind} of {layer} at every capture (channels by energy, descending)")
    return fig


def plot_matrix(captures: dict[int, dict[str, np.ndarray]], step: int, layer: str = "y",
                kind: str = "correlation") -> Figure:
    """The correlation or covariance matrix of ``layer`` at one capture (for a slider)."""
    fig, ax = plt.subplots(figsize=(4.6, 3.8), layout="constrained")
    image = _matrix(ax, captures[step][f"cov/{layer}"], captures[step][f"energies/{layer}"], kind)
    fig.colorbar(image, ax=ax, label="correlation coefficient" if kind == "correlation"
                 else "covariance")
    ax.set(title=f"{kind} of {layer}, step {step}", xlabel="channels by energy →",
           ylabel="channels by energy →")
    return fig


def plot_eigenspectra(captures: dict[int, dict[str, np.ndarray]], layer: str = "y") -> Figure:
    """Eigenvalue spectrum of the covariance of ``layer`` at every capture, normalised to sum 1."""
    steps = sorted(captures)
    if not steps:
        raise MissingInput("no captures")
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(steps[0], max(steps[-1], steps[0] + 1))
    fig, ax = plt.subplots(figsize=(5.6, 3.8), layout="constrained")
    for step in steps:
        lam = stats.spectrum(captures[step][f"cov/{layer}"]).eigenvalues
        ax.plot(np.arange(1, len(lam) + 1), lam / lam.sum(), color=cmap(norm(step)), lw=1.3)
    ax.set(xlabel="eigenvalue rank", ylabel="share of the variance", yscale="log",
           title=f"Eigenvalue spectrum of the covariance of {layer} over training")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=STEP)
    return fig


def plot_probe_channels(capture: dict[str, np.ndarray], k: int = 8) -> Figure:
    """The ``k`` strongest channels (by energy in the probe image) of the probe latent ``y``."""
    probe = capture["probe_y"]
    energy = np.square(probe.astype(np.float64)).mean(axis=(1, 2))
    order = _by_energy(energy)[:k]
    ncols = min(4, len(order))
    nrows = -(-len(order) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols + 0.6, 2.3 * nrows + 0.5),
                             layout="constrained", squeeze=False)
    for ax, c in zip(axes.flat, order, strict=False):
        vmax = float(np.abs(probe[c]).max()) or 1.0
        image = ax.imshow(probe[c], cmap=HEATMAP_CMAP, vmin=-vmax, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(f"channel {c} ({energy[c] / energy.sum():.0%} of energy)", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        fig.colorbar(image, ax=ax, shrink=0.75)
    for ax in axes.flat[len(order):]:
        ax.set_visible(False)
    h, w = probe.shape[1:]
    fig.suptitle(f"Strongest channels of the probe latent y ({h}×{w}; values of y)")
    return fig


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class FigureSpec:
    """One figure of :func:`all_figures`: file name, what it shows, inputs it needs, its drawer."""

    name: str
    description: str
    needs: tuple[str, ...]
    draw: Callable[[Study], Figure]


FIGURES = (
    FigureSpec("loss_curves", "test R-D loss, bpp and PSNR vs training step", ("evals",),
               plot_loss_curves),
    FigureSpec("compaction_and_loss", "top-k energy share of y and test R-D loss vs training step",
               ("evals", "energy"), plot_compaction_and_loss),
    FigureSpec("energy_split", "coding gain, channel total correlation and the 2×2-neighbourhood "
               "decorrelation across channels and positions of y vs training step", ("energy",),
               plot_energy_split),
    FigureSpec("correlation_heatmaps", "channel correlation of y, variants × early/middle/final "
               "capture", ("captures",), plot_correlation_heatmaps),
    FigureSpec("energy_spectra", "channel energy spectrum and compaction curve of y at the final "
               "capture", ("captures",), plot_energy_spectra),
    FigureSpec("compaction_curves", "energy compaction curves of y (the paper's Fig. 1) per variant "
               "at the start, ≈25 %, ≈50 % and end of training", ("captures",), plot_compaction_curves),
    FigureSpec("subband_energy", "subband energy shares of y at the final capture", ("energy",),
               plot_subband_energy),
    FigureSpec("modulation", "rate-share entropy and active channels of y_hat, and AuxT's learned "
               "subband gains exp(s), vs training step", ("modulation",), plot_modulation),
    FigureSpec("aux_energy_share", "AuxT branch energy share per merge point vs training step",
               ("aux",), plot_aux_energy_share),
    FigureSpec("ablation_summary", "summary numbers as bars with seed spread", ("summary",),
               plot_ablation_summary),
    FigureSpec("step_equivalence", "step-equivalence speed-up t/t′ vs the baseline's step",
               ("summary",), plot_step_equivalence),
    FigureSpec("rd_curves", "real-bitstream R-D curves (PSNR vs bpp)", ("sweep",), plot_rd_curves),
    FigureSpec("bd_rate", "BD-rate table against the baseline", ("bd_rate",), plot_bd_rate_table),
)
"""Every figure :func:`all_figures` draws, in order."""
ABLATION_FIGURES = ("loss_curves", "energy_split", "correlation_heatmaps", "step_equivalence",
                    "compaction_curves")
"""The figures the ablation command writes next to its summary (:func:`ablation_figures`)."""


def available(study: Study) -> list[tuple[FigureSpec, str | None]]:
    """Every figure with None if ``study`` has its inputs, else the reason it would be skipped."""
    return [(spec, _missing(study, spec.needs)) for spec in FIGURES]


def write_figures(study: Study, out: Path, names: Sequence[str]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with plt.rc_context():
        set_style()
        for spec, why in available(study):
            if spec.name not in names:
                continue
            if why is None:
                try:
                    fig = spec.draw(study)
                except MissingInput as err:
                    why = str(err)
            if why is not None:
                print(f"skipping figure {spec.name}: {why}", file=sys.stderr)
                continue
            for suffix in ("png", "pdf"):
                path = out / f"{spec.name}.{suffix}"
                fig.savefig(path, dpi=DPI)
                written.append(path)
            plt.close(fig)
    return written


def all_figures(directory: Path | str, out: Path | str | None = None) -> list[Path]:
    """Write every figure ``directory`` (a run or an ablation) has the inputs for.

    Returns the written files (``<name>.png`` and ``<name>.pdf`` each); a figure without its
    inputs is skipped with a line on stderr. ``out`` defaults to ``directory``.

    Raises:
        FigureError: ``directory`` is neither a run nor an ablation directory.
    """
    study = load(directory)
    return write_figures(study, Path(out) if out is not None else study.root,
                  [spec.name for spec in FIGURES])


def ablation_figures(root: Path, out: Path | None = None) -> list[Path]:
    """Write the ablation command's figures (:data:`ABLATION_FIGURES`: test loss with seed bands,
    the energy split (coding gain, total correlation), correlation heatmaps, the step-equivalence
    speed-up, the energy-compaction curves of the paper's Fig. 1) next to its summary.

    Raises:
        FigureError: ``root`` is not an ablation directory.
    """
    study = load_ablation(root)
    return write_figures(study, Path(out) if out is not None else study.root, ABLATION_FIGURES)




# ---------------------------------------------------------------------------------------------
# Analyses of trained models (energylab.analyze)

ANALYSIS_STATISTICS = (("coding_gain", "coding gain (dB)", "energy modulation", True),
                       ("total_correlation", "total correlation (nats)", "channel decorrelation", False),
                       ("neighbourhood_tc.across_positions", "nats (2×2 neighbourhoods)",
                        "spatial decorrelation", False))
"""The per-layer energy split of :func:`plot_analysis_energy_split`: (statistic, axis label, title,
shown in dB)."""


def _analysis_colors(analysis: dict) -> dict[str, tuple[float, float, float]]:
    return variant_colors([m["name"] for m in analysis["models"]])


def plot_analysis_energy_split(analysis: dict) -> Figure:
    """Per captured layer (``g_a.stage1`` ... ``y``, ``y_hat``): coding gain, channel total
    correlation (the one channel-decorrelation number; the decorrelation gain is its exponential
    form) and the across-position part of the 2×2-neighbourhood total correlation, the models side
    by side as grouped bars. ``null`` values (singular layers) are left out; a statistic no layer
    has (analyses made before it existed) leaves its panel empty with a note. ``analysis``: an
    :class:`energylab.rundir.AnalysisDir`'s statistics dict."""
    rows = []
    for model in analysis["models"]:
        for layer, values in model["layers"].items():
            if layer.startswith(("g_a.main", "g_a.aux")):
                continue  # the AuxT branches: plot_analysis_layers' business
            for stat, _, _, db in ANALYSIS_STATISTICS:
                value = values.get(stat)
                if value is not None and (not db or value > 0):
                    rows.append({"model": model["name"], "layer": layer, "stat": stat,
                                 "value": stats.to_db(value) if db else value})
    if not rows:
        raise MissingInput("the analysis holds no energy statistics")
    frame = pd.DataFrame(rows)
    colors = _analysis_colors(analysis)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    for ax, (stat, label, title, _) in zip(axes, ANALYSIS_STATISTICS, strict=True):
        ax.set(xlabel="", ylabel=label, title=title)
        if not (frame["stat"] == stat).any():
            ax.text(0.5, 0.5, "not in this analysis", transform=ax.transAxes, ha="center",
                    va="center", color="0.4", fontsize="small")
            continue
        sns.barplot(frame[frame["stat"] == stat], x="layer", y="value", hue="model", palette=colors,
                    ax=ax, legend=ax is axes[0])
        ax.set(xlabel="", ylabel=label, title=title)
        ax.tick_params(axis="x", labelrotation=30)
    _title(fig, "Energy compaction per layer, models side by side",
           f"{len(analysis['data']['images'])} images of {Path(analysis['data']['source']).name}")
    return fig


def plot_analysis_correlations(analysis: dict, arrays: Sequence[dict[str, np.ndarray]],
                               layer: str = "y") -> Figure:
    """Channel correlation matrix of ``layer`` per model (channels ordered by energy), side by side.
    ``arrays[i]``: model ``i``'s arrays (:meth:`energylab.rundir.AnalysisDir.arrays`)."""
    models = [(m["name"], a) for m, a in zip(analysis["models"], arrays, strict=True) if f"cov/{layer}" in a]
    if not models:
        raise MissingInput(f"no model has a covariance of {layer!r}")
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models) + 1.0, 3.6), layout="constrained",
                             squeeze=False)
    image = None
    for ax, (name, a) in zip(axes[0], models, strict=True):
        image = _matrix(ax, a[f"cov/{layer}"], a[f"energies/{layer}"], "correlation")
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("channels by energy →", fontsize="small")
    fig.colorbar(image, ax=axes, shrink=0.85, label="correlation coefficient")
    _title(fig, f"Channel correlation of {layer}", "channels ordered by energy, descending")
    return fig


def plot_analysis_compaction(analysis: dict, arrays: Sequence[dict[str, np.ndarray]],
                             layer: str = "y") -> Figure:
    """Energy compaction curve of ``layer`` (cumulative share of the L2 norms, the paper's Fig. 1
    energy, of the k most energetic channels), one line per model."""
    colors = _analysis_colors(analysis)
    fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
    channels = 0
    for model, a in zip(analysis["models"], arrays, strict=True):
        if f"energies/{layer}" not in a:
            continue
        curve = stats.energy_compaction_curve(_l2_norms(a[f"energies/{layer}"]))
        channels = max(channels, len(curve))
        ax.plot(np.arange(1, len(curve) + 1), curve, color=colors[model["name"]], label=model["name"])
    if not channels:
        raise MissingInput(f"no model has the energies of {layer!r}")
    ax.plot([0, channels], [0, 1], color="0.6", ls=":", lw=1, label="equal energies")
    ax.set(xlabel="k most energetic channels", ylabel="cumulative share of the L2 norms", xlim=(0, channels),
           ylim=(0, 1.02))
    ax.legend(fontsize="small")
    _title(fig, f"Energy compaction curve of {layer}", "")
    return fig


def analysis_figures(directory: AnalysisDir) -> list[Path]:
    """Draw the figures of an analysis directory (:class:`energylab.rundir.AnalysisDir`) next to its
    the analysis: ``energy_split`` (per layer), ``correlation_y``, ``compaction_y``. A figure
    whose inputs are missing is skipped with one line on stderr. Returns the files written."""
    analysis = directory.analysis()
    arrays = [directory.arrays(i) for i in range(len(analysis["models"]))]
    drawers = {"energy_split": lambda: plot_analysis_energy_split(analysis),
               "correlation_y": lambda: plot_analysis_correlations(analysis, arrays),
               "compaction_y": lambda: plot_analysis_compaction(analysis, arrays)}
    written = []
    with plt.rc_context():
        set_style()
        for name, draw in drawers.items():
            try:
                fig = draw()
            except MissingInput as err:
                print(f"skipping figure {name}: {err}", file=sys.stderr)
                continue
            path = directory.figure_path(name)
            fig.savefig(path, dpi=DPI)
            plt.close(fig)
            written.append(path)
    return written

"""Issue 19, item 1: the speed-up rule recovers a known speed-up.

Synthetic cells with a pure step speed-up ×k — the variant's test loss at step ``t`` is the
baseline's at ``k·t``, on a power law ``L(t) = a + b·(1 + t/t₀)^(−c)`` with 0.3 % multiplicative
noise — go through the functions ``python -m energylab.ablate --collect`` uses (``summarize`` on
:class:`energylab.summary.CellLogs`, and ``summarize_ablation`` / ``collect`` on an ablation
directory), on the evaluation schedule the command really uses (``ablate``'s defaults), on the fixed
schedule of the committed references (every 100 steps) and on a dense one (every 10 steps). Every
step-equivalence speed-up (25/50/75/100 % of the budget) and every steps-to-target speed-up (the
baseline's final loss and +5/2/1 %) must come out within 10 % of k, or, where ``t′`` lies before the
variant's first evaluation, be flagged as a lower bound and shown as ``≥ ×…``.

The rule before issue 19 (a trailing 3-evaluation mean that included the step-0 loss, linear
interpolation from step 0) reported ×1.30 / 2.12 / 2.42 / 2.58 for k = 3 on the fixed schedule.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import interrupted_at

from energylab import ablate, summary
from energylab.ablate import __main__ as ablate_cli
from energylab.config import ConfigError, TrainConfig
from energylab.rundir import AblationDir

KS = (1.5, 2.0, 3.0, 5.0)
NOISE = 0.003
TOLERANCE = 0.10
SEEDS = (0, 1, 2)
FAMILIES = {
    # L(0) = 180 as the references' step-0 loss; falls 13 % over the last 20 % of 1500 steps
    "t0=20,c=1": {"a": 2.0, "b": 178.0, "t0": 20.0, "c": 1.0},
    # slower: falls 14 % over the last 20 %
    "t0=50,c=0.7": {"a": 3.0, "b": 177.0, "t0": 50.0, "c": 0.7},
}
STEP_EQUIVALENCE = tuple(f"speedup_at_{p}" for p in summary.BUDGET_FRACTIONS)
TO_TARGET = ("speedup_steps", *(f"speedup_steps_{m}pct" for m in summary.TARGET_MARGINS),
             "speedup_time", *(f"speedup_time_{m}pct" for m in summary.TARGET_MARGINS))


def ablation_schedule(**changes) -> list[int]:
    """The evaluation steps of ``python -m energylab.ablate``'s cells (its defaults, ``changes``)."""
    base = ablate_cli.base_config(ablate_cli.build_parser().parse_args([]))
    return replace(base, **changes).evaluation_steps()


SCHEDULES = {
    "ablate default": ablation_schedule(),
    "fixed every 100": ablation_schedule(eval_schedule="fixed"),
    "dense every 10": list(range(0, 1501, 10)),
}


def power_law(t, a: float, b: float, t0: float, c: float) -> np.ndarray:
    return a + b * (1 + np.asarray(t, dtype=float) / t0) ** (-c)


def synthetic_evals(k: float, steps: list[int], rng: np.random.Generator, family: dict,
                    noise: float = NOISE) -> list[dict]:
    """Evaluations of a variant ×k faster than the baseline (k = 1: the baseline); 0.1 s a step."""
    noisy = 1 + noise * rng.standard_normal(len(steps))
    loss = power_law(k * np.asarray(steps, dtype=float), **family) * noisy
    return [{"step": t, "loss": float(v), "bpp": 1.0, "psnr": 20.0, "wall_time": 0.1 * t}
            for t, v in zip(steps, loss, strict=True)]


def synthetic_cells(k: float, steps: list[int], family: dict, seed: int = 0,
                    noise: float = NOISE) -> dict:
    rng = np.random.default_rng(seed)
    cells = {}
    for s in SEEDS:
        cells["baseline", None, s] = summary.CellLogs(synthetic_evals(1.0, steps, rng, family, noise), [])
        cells["fast", None, s] = summary.CellLogs(synthetic_evals(k, steps, rng, family, noise), [])
    return cells


def fast_cells(result: dict) -> list[dict]:
    return [c for c in result["cells"] if c["variant"] == "fast"]


def paired(result: dict, key: str) -> dict:
    return next(e for e in result["paired"] if e["variant"] == "fast" and e["key"] == key)


def expected_bound(key: str, k: float, first: int, budget: int = 1500) -> bool:
    """Whether ``key``'s t′ lies before the variant's first evaluation (so only a bound exists)."""
    if not key.startswith("speedup_at_"):
        return False
    t = budget * int(key.removeprefix("speedup_at_")) / 100
    return t / k < first


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES)
@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES)
@pytest.mark.parametrize("k", KS)
def test_a_pure_step_speedup_is_recovered(k: float, schedule: list[int], family: dict) -> None:
    result = summary.summarize(synthetic_cells(k, schedule, family), ["baseline", "fast"], list(SEEDS), 0.013)
    first = schedule[1]
    for key in (*STEP_EQUIVALENCE, *TO_TARGET):
        for cell in fast_cells(result):
            value = cell[key]
            assert value is not None, (key, cell["seed"])
            if expected_bound(key, k, first):
                # t' = t/k is before the first evaluation: only t' <= first is known
                assert cell["bounds"][key] == "lower"
                assert value == pytest.approx(1500 * int(key.removeprefix("speedup_at_")) / 100 / first)
                assert value <= k * (1 + TOLERANCE)
            else:
                assert key not in cell["bounds"], (key, cell["seed"])
                assert value == pytest.approx(k, rel=TOLERANCE), (key, cell["seed"])
        entry = paired(result, key)
        if expected_bound(key, k, first):
            assert (entry["bound"], entry["bounded"], entry["high"]) == ("lower", 3, None)
        else:
            assert entry["bound"] is None and entry["bounded"] == 0
            assert entry["mean"] == pytest.approx(k, rel=TOLERANCE), key
            assert entry["low"] <= k * (1 + TOLERANCE) and entry["high"] >= k * (1 - TOLERANCE), key
    # the step-equivalence curve: t/t' ~ k wherever t' is a value
    for curve in (c for c in result["step_equivalence"] if c["variant"] == "fast"):
        for t, speedup, bound in zip(curve["t"], curve["speedup"], curve["bound"], strict=True):
            if t / k < first:
                assert bound == "lower" and speedup <= k * (1 + TOLERANCE)
            elif t / k > first * 1.5 and t <= 1500 / k:  # reached, clear of the first evaluation
                assert bound is None and speedup == pytest.approx(k, rel=TOLERANCE), t


def test_the_ablation_evaluates_densely_early_by_default() -> None:
    assert SCHEDULES["ablate default"] == [*range(0, 500, 25), *range(500, 1501, 100)]
    assert SCHEDULES["fixed every 100"] == list(range(0, 1501, 100))
    result = summary.summarize(synthetic_cells(2.0, SCHEDULES["ablate default"], FAMILIES["t0=20,c=1"]),
                               ["baseline", "fast"], list(SEEDS), 0.013)
    (resolution,) = result["resolution"]
    assert resolution["first"] == 25 and resolution["cells"] == 6
    assert resolution["spacing"] == [{"every": 25, "from": 0, "to": 500},
                                     {"every": 100, "from": 500, "to": 1500}]
    text = summary.format_markdown(result)
    assert "every 25 steps to 500, then every 100 steps to 1500" in text
    assert "first evaluation (step 25) is a bound" in text


def test_the_step_zero_loss_enters_nothing() -> None:
    """The old rule's artefact: a trailing mean over the step-0 loss (100× the later ones) capped
    every speed-up. Now any step-0 loss gives the same numbers."""
    family = FAMILIES["t0=20,c=1"]
    cells = synthetic_cells(3.0, SCHEDULES["fixed every 100"], family)
    result = summary.summarize(cells, ["baseline", "fast"], list(SEEDS), 0.013)
    for step0 in (1e6, 1.0):
        changed = {key: replace(logs, evals=[{**logs.evals[0], "loss": step0}, *logs.evals[1:]])
                   for key, logs in cells.items()}
        other = summary.summarize(changed, ["baseline", "fast"], list(SEEDS), 0.013)
        for a, b in zip(result["cells"], other["cells"], strict=True):
            assert {k: v for k, v in a.items() if "speedup" in k or "to_target" in k} == {
                k: v for k, v in b.items() if "speedup" in k or "to_target" in k}
        assert result["step_equivalence"] == other["step_equivalence"]
        assert result["targets"] == other["targets"]
        assert result["convergence"] == other["convergence"]


def test_the_old_cap_is_gone() -> None:
    """On the committed references' schedule (every 100 steps) the old rule could not report more
    than about ×1.44 at 25 % of the budget, ×2.77 at 50 %, ×5.2 at 100 %; for k = 3 it reported
    ×1.30 / 2.12 / 2.42 / 2.58. Now k = 3 reads ×3 at every budget, and k = 5 ×5 beyond the caps."""
    family = FAMILIES["t0=20,c=1"]
    for k, caps in ((3.0, {25: 1.44, 50: 2.77}), (5.0, {50: 2.77})):
        result = summary.summarize(synthetic_cells(k, SCHEDULES["fixed every 100"], family),
                                   ["baseline", "fast"], list(SEEDS), 0.013)
        for p in summary.BUDGET_FRACTIONS if k == 3.0 else (50, 75, 100):
            entry = paired(result, f"speedup_at_{p}")
            assert entry["bound"] is None and entry["mean"] == pytest.approx(k, rel=0.05), p
            assert entry["mean"] > caps.get(p, 0.0) * 1.05
        assert paired(result, "speedup_steps")["mean"] == pytest.approx(k, rel=0.05)


def test_a_speedup_before_the_first_evaluation_is_a_bound(tmp_path: Path) -> None:
    """k = 5 at 25 % of the budget on the fixed schedule: t′ = 75 < 100, so ``≥ ×3.75``; k = 20
    reaches the baseline's final loss before its first evaluation: steps ``≤ 100``, speed-up
    ``≥ ×…``. Through ``--collect`` (files, summary.md, summary.json, the figure)."""
    steps = SCHEDULES["fixed every 100"]
    family = FAMILIES["t0=20,c=1"]
    root = tmp_path / "ablation"
    names = {"baseline": {"auxt": False}, "auxt": {"auxt": True},
             "auxt-no-scaling": {"auxt": True, "remove": ["scaling"]}}
    AblationDir(root).write_meta({"variants": names, "seeds": list(SEEDS), "lmbda": 0.013, "lmbdas": None})
    rng = np.random.default_rng(1)
    for seed in SEEDS:
        for variant, k in (("baseline", 1.0), ("auxt", 5.0), ("auxt-no-scaling", 20.0)):
            run = AblationDir(root).cell(variant, seed)
            run.path.mkdir(parents=True)
            config = TrainConfig(out=run.path, seed=seed, N=8, M=12, eval_schedule="fixed", **names[variant])
            (run.path / "config.json").write_text(json.dumps({"args": config.to_dict()}))
            (run.path / "eval.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in synthetic_evals(k, steps, rng, family)))
    result = ablate.collect(root)

    five = [c for c in result["cells"] if c["variant"] == "auxt"]
    assert all(c["bounds"] == {"speedup_at_25": "lower"} for c in five)
    assert all(c["speedup_at_25"] == pytest.approx(3.75) for c in five)
    row = next(r for r in result["rows"] if r["variant"] == "auxt")
    assert (row["speedup_at_25_bounded"], row["speedup_at_25_bound"]) == (3, "lower")
    assert (row["speedup_at_50_bounded"], row["speedup_at_50_bound"]) == (0, None)
    entry = next(e for e in result["paired"] if e["variant"] == "auxt" and e["key"] == "speedup_at_25")
    assert (entry["bound"], entry["bounded"], entry["high"]) == ("lower", 3, None)
    assert entry["mean"] == pytest.approx(3.75)

    twenty = [c for c in result["cells"] if c["variant"] == "auxt-no-scaling"]
    for c in twenty:
        assert c["steps_to_target"] == 100 and c["bounds"]["steps_to_target"] == "upper"
        assert c["bounds"]["speedup_steps"] == "lower" and c["speedup_steps"] <= 20 * 1.1
    written = AblationDir(root).summary()
    assert written["cells"] == json.loads(json.dumps(result["cells"]))
    markdown = (root / AblationDir.SUMMARY_MD).read_text()
    assert "≥ ×3.75 [3.75, —] (3/3 bounds)" in markdown
    assert "first evaluation (step 100) is a bound" in markdown
    table = {r["variant"]: r for r in summary.table_rows(result)}
    assert table["auxt-no-scaling"]["steps to target"].startswith("≤ 100.00")
    assert table["auxt-no-scaling"]["speedup (steps)"].startswith("≥ ")
    assert not table["auxt"]["speedup (steps)"].startswith("≥")
    assert (root / "step_equivalence.png").is_file()
    curve = next(c for c in result["step_equivalence"] if c["variant"] == "auxt" and c["seed"] == 0)
    assert [b for t, b in zip(curve["t"], curve["bound"], strict=True) if t < 500] == ["lower"] * 4


def test_summarize_ablation_reads_the_default_schedule(tmp_path: Path) -> None:
    """The files ``--collect`` reads, on the ablation's default schedule: k = 3 within 10 %."""
    steps = SCHEDULES["ablate default"]
    family = FAMILIES["t0=50,c=0.7"]
    root = tmp_path / "ablation"
    AblationDir(root).write_meta({"variants": {"baseline": {}, "auxt": {}}, "seeds": list(SEEDS),
                                  "lmbda": 0.013, "lmbdas": None})
    rng = np.random.default_rng(2)
    for seed in SEEDS:
        for variant, k in (("baseline", 1.0), ("auxt", 3.0)):
            run = AblationDir(root).cell(variant, seed)
            run.path.mkdir(parents=True)
            (run.path / "eval.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in synthetic_evals(k, steps, rng, family)))
    result = ablate.summarize_ablation(AblationDir(root))
    for key in (*STEP_EQUIVALENCE, *TO_TARGET):
        entry = next(e for e in result["paired"] if e["variant"] == "auxt" and e["key"] == key)
        assert entry["bound"] is None and entry["mean"] == pytest.approx(3.0, rel=TOLERANCE), key


# --- the evaluation schedule (TrainConfig.eval_schedule, used by train) ---------------------------

def test_eval_schedule_steps_and_validation(tmp_path: Path) -> None:
    fixed = TrainConfig(out=tmp_path, steps=30, eval_every=10)
    assert fixed.eval_schedule == "fixed" and fixed.evaluation_steps() == [0, 10, 20, 30]
    dense = replace(fixed, eval_schedule="dense-early")  # every 10 // 4 = 2 steps up to 5 x 10
    assert dense.evaluation_steps() == [*range(0, 30, 2), 30]
    odd = TrainConfig(out=tmp_path, steps=7, eval_every=3, eval_schedule="dense-early")
    assert odd.evaluation_steps() == list(range(8))  # spacing at least 1; the last step always
    with pytest.raises(ConfigError, match="eval_schedule must be one of fixed, dense-early, got 'log'"):
        TrainConfig(out=tmp_path, eval_schedule="log")
    # a config saved before the field existed reads as the schedule those runs used
    saved = fixed.to_dict()
    del saved["eval_schedule"]
    assert TrainConfig.from_dict(saved).eval_schedule == "fixed"
    # the committed references' cells too: the causal one predates the field (fixed), the main one
    # was made by the main command after dense-early became its default
    root = Path(__file__).resolve().parent.parent / "data" / "reference"
    for name, schedule in (("causal", "fixed"), ("ablation", "dense-early")):
        cell = AblationDir(root / name).cell("auxt", 0)
        config = cell.train_config()
        assert config.eval_schedule == schedule
        assert [r["step"] for r in cell.evals()] == config.evaluation_steps()


@pytest.mark.filterwarnings("ignore:the probe set gives")
def test_dense_early_training_evaluates_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    """A tiny run on the dense-early schedule: evaluations (and checkpoints) at its steps; killed
    after a dense checkpoint, its resumed run writes what an uninterrupted one does."""
    from energylab.rundir import RunDir
    from energylab.train import train

    tiny = dict(steps=6, N=8, M=12, batch_size=2, patch_size=64, test_size=64, probe_count=2,
                probe_size=64, log_every=1, eval_every=8, capture_every=0, device="cpu",
                eval_schedule="dense-early")  # every 2 steps (and the last)
    whole = train(TrainConfig(out=tmp_path / "whole", **tiny))
    assert [r["step"] for r in whole.evals()] == [0, 2, 4, 6]
    with interrupted_at(3), pytest.raises(KeyboardInterrupt):  # during step 4, after the checkpoint at 2
        train(TrainConfig(out=tmp_path / "killed", **tiny))
    assert RunDir(tmp_path / "killed").load_checkpoint()["step"] == 2
    resumed = train(TrainConfig(out=tmp_path / "killed", **tiny), resume=True)

    def untimed(records):
        return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]

    assert untimed(resumed.evals()) == untimed(whole.evals())
    assert untimed(resumed.metrics()) == untimed(whole.metrics())
    a = torch.load(whole.final_path, weights_only=False)["model"]
    b = torch.load(resumed.final_path, weights_only=False)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

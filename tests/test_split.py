"""Issue 19, the split grid (``energylab.split``, ``python -m energylab.ablate --split``): the cells'
weights on synthetic data with a known covariance, the mirrored synthesis stage, the estimands and
verdicts on synthetic per-cell numbers, the step-0 manipulation checks on the built-in data, and a
tiny end-to-end grid (``slow``)."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import ablation_argv

from energylab import ablate, split
from energylab import train as train_mod
from energylab.ablate import __main__ as ablate_cli
from energylab.auxt import SPLIT_INITS, variant_name
from energylab.config import ConfigError, TrainConfig
from energylab.klt import covariance, stage_moments
from energylab.models import build_model
from energylab.rundir import AblationDir
from energylab.stats import coding_gain, total_correlation

SPLIT_OPTIONS = {"auxt": True, "remove": ("scaling",), "freeze": ("orthogonal",)}


# --- the cells' weights on a known covariance ---------------------------------------------------

def synthetic_vectors(n=40000, dim=16, seed=0, spectrum=None):
    """``n`` vectors of ``R^dim`` with a known covariance ``R diag(spectrum) R^T`` and a mean."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(2, -2, dim, dtype=torch.float64) if spectrum is None else spectrum
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    z = torch.randn(n, dim, generator=g, dtype=torch.float64) * spectrum.sqrt()
    return z @ rotation.T + torch.linspace(-1, 2, dim, dtype=torch.float64)


def output_cov(weight, vectors):
    return weight @ covariance(vectors) @ weight.T


def offdiag(c):
    return (c - torch.diag(torch.diag(c))).abs().max() / torch.diag(c).max()


@pytest.fixture(scope="module")
def cells():
    v = synthetic_vectors()
    bias = torch.linspace(-0.1, 0.1, 6, dtype=torch.float64)
    return v, bias, {c: split.split_weight(v, 6, c, seed=3, bias=bias) for c in split.CELLS}


def test_a_decorrelates_exactly_and_keeps_the_principal_components(cells):
    v, _, w = cells
    cov = output_cov(w["A"].weight, v)
    assert offdiag(cov) < 1e-10
    top = torch.linalg.eigvalsh(covariance(v)).flip(0)[:6]
    torch.testing.assert_close(torch.diag(cov), top)
    torch.testing.assert_close(w["A"].eigenvalues, top)
    assert w["A"].scale == 1.0 and w["A"].capped == 0


def test_b_whitens_c_d_correlate_e_misassigns_f_is_a_random_subspace(cells):
    v, _, w = cells
    lam = w["A"].eigenvalues
    b = output_cov(w["B"].weight, v)
    assert offdiag(b) < 1e-10 and torch.diag(b).std() / torch.diag(b).mean() < 1e-10  # white
    assert w["B"].capped == 0  # the kept spectrum spans 20x: no gain reaches the cap
    c, d = output_cov(w["C"].weight, v), output_cov(w["D"].weight, v)
    assert total_correlation(c.numpy()) > 0.5 and total_correlation(d.numpy()) > 0.5
    torch.testing.assert_close(torch.diag(c) / w["C"].scale ** 2, lam)  # the KLT's spectrum
    assert torch.diag(d).std() / torch.diag(d).mean() < 1e-10  # even
    # C and D share the rotation Q U^T: rows equal up to their gains
    rows_c = w["C"].weight / w["C"].weight.norm(dim=1, keepdim=True)
    rows_d = w["D"].weight / w["D"].weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(rows_c, rows_d)
    e = output_cov(w["E"].weight, v)
    assert offdiag(e) < 1e-10
    torch.testing.assert_close(torch.sort(torch.diag(e) / w["E"].scale ** 2).values, torch.sort(lam).values)
    assert not torch.allclose(torch.diag(e) / w["E"].scale ** 2, lam)  # misassigned
    f = w["F"].weight / w["F"].scale
    torch.testing.assert_close(f @ f.T, torch.eye(6, dtype=torch.float64))
    assert total_correlation(output_cov(f, v).numpy()) > 0.5
    # a random 6-dimensional subspace of R^16 keeps less of the variance than the principal one
    assert torch.trace(output_cov(f, v)) < 0.8 * lam.sum()
    assert coding_gain(output_cov(w["A"].weight, v).numpy()) > 1.2 > 1.0001 > coding_gain(b.numpy())


def test_every_cell_delivers_cell_a_energy(cells):
    v, bias, w = cells
    energies = [split.delivered_energy(w[c].weight, v, bias) for c in split.CELLS]
    direct = float(((v @ w["A"].weight.T + bias) ** 2).sum(1).mean())
    assert energies[0] == pytest.approx(direct, rel=1e-9) == pytest.approx(w["A"].energy, rel=1e-9)
    assert max(energies) / min(energies) - 1 < 1e-9
    assert len({round(w[c].scale, 6) for c in split.CELLS}) > 3  # the scalars differ


def test_random_factors_are_seeded_and_shared():
    q, perm, f = split.random_factors(6, 16, seed=3)
    q2, perm2, f2 = split.random_factors(6, 16, seed=3)
    assert torch.equal(q, q2) and torch.equal(perm, perm2) and torch.equal(f, f2)
    torch.testing.assert_close(q @ q.T, torch.eye(6, dtype=torch.float64))
    assert sorted(perm.tolist()) == list(range(6))
    state = torch.get_rng_state()
    other, _, _ = split.random_factors(6, 16, seed=4)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert not torch.allclose(q, other)


def test_gain_cap():
    gains, capped = split.cap_gains(torch.tensor([0.01, 0.5, 2.0, 100.0]))
    assert gains.tolist() == [1 / split.GAIN_CAP, 0.5, 2.0, split.GAIN_CAP] and capped == 2
    # a spectrum spanning 1e6: whitening would amplify the smallest component 1000-fold
    v = synthetic_vectors(dim=8, spectrum=torch.logspace(3, -3, 8, dtype=torch.float64))
    b = split.split_weight(v, 8, "B")
    assert b.capped > 0 and b.gains.max() <= split.GAIN_CAP and b.gains.min() >= 1 / split.GAIN_CAP
    a = split.split_weight(v, 8, "A")
    energies = [split.delivered_energy(x.weight, v) for x in (a, b)]
    assert energies[0] == pytest.approx(energies[1], rel=1e-9)  # the cap comes before the matching
    with pytest.raises(ValueError, match="unknown split cell"):
        split.split_weight(v, 8, "G")


def test_widening_stage_pads_zero_rows():
    v = synthetic_vectors(dim=4)
    w = split.split_weight(v, 6, "D")
    assert torch.all(w.weight[4:] == 0) and w.weight.shape == (6, 4)


def build_cell(cell, x, seed=0):
    torch.manual_seed(seed)
    return build_model("mbt2018-mean", N=8, M=12, projection_init=f"split-{cell}", klt_data=x,
                       split_seed=seed, **SPLIT_OPTIONS)


def test_model_cells_mirror_with_the_pseudo_inverse():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 64, 64)
    model = build_cell("B", x)
    analysis, synthesis = model.g_a.auxiliary_layers, model.g_s.auxiliary_layers
    last, first = analysis[-1].olp.linear.weight, synthesis[0].olp.linear.weight
    torch.testing.assert_close(first, torch.linalg.pinv(last.double()).float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(last @ first, torch.eye(last.shape[0]), atol=1e-4, rtol=0)
    assert not torch.allclose(first, last.T)  # B is not orthogonal: the transpose would not invert it
    for wls, iwls in zip(analysis[:-1], reversed(synthesis[1:]), strict=True):  # earlier: transposes
        assert torch.equal(iwls.olp.linear.weight, wls.olp.linear.weight.T)
    for layer in (*analysis, *synthesis):
        assert layer.scaling_factors is None
        assert not layer.olp.linear.weight.requires_grad and layer.olp.linear.bias.requires_grad
    a = build_cell("A", x)
    torch.testing.assert_close(a.g_s.auxiliary_layers[0].olp.linear.weight,
                               a.g_a.auxiliary_layers[-1].olp.linear.weight.T, atol=1e-5, rtol=0)
    # the cells of one seed share everything but the last stage and its mirror
    sa, sb = a.state_dict(), model.state_dict()
    differ = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert differ == {"g_a.auxiliary_layers.3.olp.linear.weight", "g_s.auxiliary_layers.0.olp.linear.weight"}


def test_split_options_and_names():
    assert variant_name(True, ["scaling"], freeze=["orthogonal"], projection_init="split-C") == "split-C"
    with pytest.raises(ValueError, match="cell of the split grid"):
        variant_name(True, projection_init="split-A")
    with pytest.raises(ConfigError, match="cell of the split grid"):
        TrainConfig(out="x", auxt=True, freeze=("orthogonal",), projection_init="split-A")
    with pytest.raises(ValueError, match="needs training crops"):
        build_model("mbt2018-mean", N=8, M=12, projection_init="split-A", **SPLIT_OPTIONS)
    names = ablate.variants([], split=True)
    assert list(names) == ["baseline", "auxt", *SPLIT_INITS]
    assert names["split-E"]["projection_init"] == "split-E" and names["split-E"]["remove"] == ["scaling"]
    with pytest.raises(ValueError, match="the split grid is a study of its own"):
        ablate.variants(["scaling"], split=True)
    with pytest.raises(ValueError, match="the split grid is a study of its own"):
        ablate.variants([], causal=True, split=True)


def test_split_defaults_and_cost(tmp_path, capsys):
    parse = ablate_cli.build_parser().parse_args
    args = parse(["--split", "--out", str(tmp_path)])
    base = ablate_cli.base_config(args)
    assert args.seeds == list(split.DEFAULT_SEEDS) and base.steps == split.DEFAULT_STEPS
    assert len(split.DEFAULT_SEEDS) >= 6
    assert split.grid_minutes(len(split.DEFAULT_SEEDS), split.DEFAULT_STEPS) <= 90
    args = parse(["--split", "--seeds", "4", "5", "--steps", "30", "--out", str(tmp_path)])
    assert (ablate_cli.base_config(args).steps, args.seeds) == (30, [4, 5])
    args = parse(["--out", str(tmp_path)])
    assert (ablate_cli.base_config(args).steps, args.seeds) == (1500, [0, 1, 2])
    assert ablate_cli.main(["--split", "--lmbdas", "0.01", "0.02", "--out", str(tmp_path / "x")]) == 2
    assert "--split runs at one λ" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate_cli.main(["--help"])
    minutes = split.grid_minutes(len(split.DEFAULT_SEEDS), split.DEFAULT_STEPS)
    assert f"= {minutes:.0f} minutes" in " ".join(capsys.readouterr().out.split())


def test_fit_and_check_batches_are_disjoint():
    fit, check = split.fit_batches(8), split.check_batches(8)
    assert len(fit) * 8 == split.FIT_CROPS >= 512 and fit.stop == check.start
    assert len(check) * 8 == split.CHECK_CROPS
    assert len(split.fit_batches(4, 256)) * 4 == split.MIN_CROPS  # as many pixels, at least 512 crops


# --- estimands and verdicts ---------------------------------------------------------------------

MEANS = {"A": 4.0, "B": 3.0, "C": 2.0, "D": 1.5, "E": 2.5, "F": 1.2}
"""Speed-ups of the synthetic cells: decorrelation ½[log(4/2) + log(3/1.5)] = log 2, unevenness
½[log(4/3) + log(2/1.5)] = log(4/3), interaction log(4/3) - log(4/3) = 0, alignment log(4/2.5),
subspace log(1.5/1.2)."""
TRUE = {"decorrelation": math.log(2), "unevenness": math.log(4 / 3), "interaction": 0.0,
        "alignment": math.log(4 / 2.5), "subspace": math.log(1.5 / 1.2),
        "decorrelation if uneven": math.log(4 / 2), "decorrelation if even": math.log(3 / 1.5),
        "unevenness if decorrelated": math.log(4 / 3), "unevenness if correlated": math.log(2 / 1.5)}


def synthetic_rows(means=MEANS, seeds=range(6), noise=0.01, seed_effect=0.3, loss=None):
    """Per-cell rows as the summary gives them: each seed multiplies every cell's speed-up by one
    factor (cancels in every contrast), and each cell gets a noise that sums to 0 over the seeds."""
    rng = np.random.default_rng(0)
    rows = []
    seeds = list(seeds)
    for cell, mean in means.items():
        eps = rng.normal(0, noise, len(seeds))
        eps -= eps.mean()
        for s, e in zip(seeds, eps, strict=True):
            speedup = mean * math.exp(seed_effect * (s % 3) + e)
            row = {"variant": f"split-{cell}", "lmbda": None, "seed": s,
                   **{k: speedup for k in split.SPEEDUP_KEYS},
                   "test_loss": (loss or {}).get(cell, 20.0) * math.exp(0.05 * s + e / 10)}
            rows.append(row)
    rows.append({"variant": "baseline", "lmbda": None, "seed": 0, "speedup_at_100": 99.0})
    return rows


def entries_by(entries, key):
    return {e["estimand"]: e for e in entries if e["key"] == key}


def test_estimands_recover_known_contrasts_paired_by_seed():
    entries = split.estimands(synthetic_rows(), list(range(6)))
    assert len(entries) == len(split.ESTIMANDS) * (len(split.SPEEDUP_KEYS) + 1)
    for key in split.SPEEDUP_KEYS:
        found = entries_by(entries, key)
        for name, truth in TRUE.items():
            e = found[name]
            assert e["mean"] == pytest.approx(truth, abs=1e-12) and e["n"] == 6
            assert e["ratio"] == pytest.approx(math.exp(truth))
            assert e["low"] < e["mean"] < e["high"] and e["high"] - e["low"] < 0.1  # seed effect cancels
    verdicts = {n: e["verdict"] for n, e in entries_by(entries, "speedup_at_100").items()}
    assert verdicts == {"decorrelation": "outside the noise", "unevenness": "outside the noise",
                        "interaction": "equivalent", "alignment": "outside the noise",
                        "subspace": "outside the noise", **{n: "outside the noise" for n in list(TRUE)[5:]}}
    # per seed, the contrast of the logs: the seed's factor (×1 .. ×e^0.6) is gone
    rows = {(r["variant"], r["seed"]): r["speedup_at_100"] for r in synthetic_rows()}
    log = {c: [math.log(rows[f"split-{c}", s]) for s in range(6)] for c in MEANS}
    per_seed = split.contrast(log, split.ESTIMANDS["alignment"][1])
    assert np.ptp(per_seed) < 0.1 < np.ptp(log["A"])


def test_estimands_drop_unpaired_seeds_and_read_the_loss():
    rows = [r for r in synthetic_rows(loss={"A": 18.0, "C": 20.0, "B": 19.0, "D": 20.0})
            if not (r["variant"] == "split-D" and r["seed"] == 5)]
    for r in rows:
        if r["variant"] == "split-F" and r["seed"] == 4:
            r["speedup_at_100"] = None  # never reached: drops the seed from the subspace contrast
        if r["variant"] == "split-E" and r["seed"] == 2:
            r["bounds"] = {"speedup_at_100": "lower"}  # a bound, not a value: drops it too
    found = entries_by(split.estimands(rows, list(range(6))), "speedup_at_100")
    assert found["decorrelation"]["n"] == found["unevenness"]["n"] == 5 and found["alignment"]["n"] == 5
    assert found["subspace"]["n"] == 4
    assert found["alignment"]["bounded"] == 1 and found["decorrelation"]["bounded"] == 0
    assert "1 left out, a speed-up there known only as a bound" in found["alignment"]["sentence"]
    assert entries_by(split.estimands(rows, list(range(6))), "speedup_at_50")["alignment"]["n"] == 6
    loss = entries_by(split.estimands(rows, list(range(6))), "test_loss")
    # decorrelation on log loss: ½[log(18/20) + log(19/20)] below 0 (lower loss)
    assert loss["decorrelation"]["mean"] == pytest.approx(0.5 * (math.log(0.9) + math.log(0.95)), abs=2e-3)
    assert loss["decorrelation"]["verdict"] == "outside the noise"
    assert "end at a lower test loss than" in loss["decorrelation"]["sentence"]
    assert loss["decorrelation"]["margin"] == split.LOSS_MARGIN


def test_verdict_rules_and_sentences():
    from energylab.stats import PairedDifference

    m = split.SPEEDUP_MARGIN
    assert split.verdict(PairedDifference(0.2, 0.1, 0.3, 6, False), m) == "outside the noise"
    assert split.verdict(PairedDifference(0.0, -0.05, 0.05, 6, True), m) == "equivalent"
    assert split.verdict(PairedDifference(0.0, -0.2, 0.05, 6, True), m) == "inconclusive"
    assert split.verdict(PairedDifference(0.1, None, None, 1, None), m) == "cannot tell"
    entries = split.estimands(synthetic_rows(), list(range(6)))
    found = entries_by(entries, "speedup_at_100")
    head = "decorrelation (½[(A−C)+(B−D)]) on t-equiv. at 100 %: ×2.000"
    assert found["decorrelation"]["sentence"].startswith(head)
    assert ("outside the noise: the decorrelated cells (A, B) train faster than the correlated ones (C, D)"
            in found["decorrelation"]["sentence"])
    assert "equivalent within ×1.10" in found["interaction"]["sentence"]
    slow = {**MEANS, "A": 1.0, "C": 4.0}  # correlated cells faster
    found = entries_by(split.estimands(synthetic_rows(slow), list(range(6))), "speedup_at_100")
    assert "train slower than" in found["decorrelation"]["sentence"]
    noisy = entries_by(split.estimands(synthetic_rows({c: 2.0 for c in MEANS}, noise=0.5), list(range(6))),
                       "speedup_at_100")
    assert noisy["decorrelation"]["verdict"] == "inconclusive"
    assert "reaches beyond the ×1.10 equivalence margin" in noisy["decorrelation"]["sentence"]
    one = entries_by(split.estimands(synthetic_rows(seeds=[0]), [0]), "speedup_at_100")
    assert one["subspace"]["verdict"] == "cannot tell" and "no interval" in one["subspace"]["sentence"]
    none = entries_by(split.estimands([], [0, 1]), "speedup_at_100")
    assert none["alignment"]["mean"] is None and "no paired seed" in none["alignment"]["sentence"]


def test_reading_of_the_two_hypotheses():
    paper = split.reading(split.estimands(synthetic_rows(), list(range(6))))
    assert paper == {"key": split.PRIMARY_KEY, "paper_split": "supported", "subspace_only": "contradicted"}
    flat = {"A": 2.0, "B": 2.0, "C": 2.0, "D": 2.0, "E": 2.0, "F": 1.0}
    subspace = split.reading(split.estimands(synthetic_rows(flat, noise=0.001), list(range(6))))
    assert subspace["paper_split"] == "contradicted" and subspace["subspace_only"] == "supported"
    noisy = split.reading(split.estimands(synthetic_rows(flat, noise=0.5), list(range(6))))
    assert noisy["paper_split"] == "not decided"


def test_split_summary_and_markdown():
    fixed = {"aux_share": 0.95, "aux_total_correlation": 0.1, "aux_coding_gain": 10.0,
             "aux_topk_share_l2": 0.5, "y_total_correlation": 5.0, "y_coding_gain": 8.0}
    checks = {(f"split-{c}", s): {**fixed, "aux_energy": 100.0 + i + s}
              for i, c in enumerate(split.CELLS) for s in (0, 1)}
    section = split.split_summary(synthetic_rows(seeds=[0, 1]), [0, 1], checks)
    assert set(section["verdicts"]) == set(split.ESTIMANDS)
    cells = {c["cell"]: c for c in section["checks"]["cells"]}
    assert cells["F"]["aux_energy_mean"] == pytest.approx(105.5) and cells["F"]["seeds"] == 2
    assert section["checks"]["energy_spread"]["seed0"] == pytest.approx(105 / 100 - 1)
    text = split.format_split(section)
    assert "## Split: decorrelation × unevenness" in text and "### Manipulation checks at step 0" in text
    assert text.count("\n| ") >= 5 + 6 and "**Verdicts**" in text and "**Reading**" in text
    assert "at most 5.00 % over the seeds" in text


# --- manipulation checks at step 0 on the built-in data ----------------------------------------

@pytest.fixture(scope="module")
def step0_checks():
    """The checks training records for the six cells of seed 0 at the default N=32/M=48 on the
    built-in data (``split.fit_batches`` / ``split.check_batches`` of batch 8). Cell A is built in
    full; the others share its earlier stages (as every cell of a seed does) and get their last
    stage from the same moments (``split.set_last_stage``, what ``init_split`` ends with)."""
    config = TrainConfig(out="unused", projection_init="split-A", **SPLIT_OPTIONS)
    stream, _, _, _ = train_mod.open_data(config)
    fit = torch.cat([stream.batch(i) for i in split.fit_batches(config.batch_size)])
    held_out = torch.cat([stream.batch(i) for i in split.check_batches(config.batch_size)])
    torch.manual_seed(config.seed)
    built = build_model(config.model, N=config.N, M=config.M, projection_init="split-A", klt_data=fit,
                        split_seed=config.seed, **SPLIT_OPTIONS)
    moments = stage_moments(built.g_a.auxiliary_layers, 3, fit)
    out = {}
    for cell in split.CELLS:
        model = copy.deepcopy(built)
        fitted = split.set_last_stage(model.g_a.auxiliary_layers, model.g_s.auxiliary_layers, moments, cell,
                                      seed=config.seed)
        if cell == "A":
            assert torch.equal(model.state_dict()["g_a.auxiliary_layers.3.olp.linear.weight"],
                               built.state_dict()["g_a.auxiliary_layers.3.olp.linear.weight"])
        out[cell] = {**split.manipulation_checks(model, held_out), "capped": fitted.capped}
    return out


def test_manipulation_checks_at_step_0(step0_checks):
    c = step0_checks
    for cell in "AB":
        assert c[cell]["aux_total_correlation"] <= 1.0
    for cell in "CD":
        assert c[cell]["aux_total_correlation"] >= 20.0  # decorrelated cells: below 1 nat
    for cell in "AC":
        assert c[cell]["aux_coding_gain"] >= 5
    for cell in "BD":
        assert abs(c[cell]["aux_coding_gain"] - 1) <= 0.1
    energies = [c[cell]["aux_energy"] for cell in split.CELLS]
    assert max(energies) / min(energies) - 1 <= 0.05
    assert c["A"]["positions"] == split.CHECK_CROPS * 16 and c["A"]["y_crops"] == split.CHECK_Y_CROPS
    for cell in split.CELLS:
        assert 0.5 < c[cell]["aux_share"] < 1.5  # the shortcut carries about all of y at step 0


def test_training_records_the_checks(tmp_path):
    config = TrainConfig(out=tmp_path / "r", N=8, M=12, batch_size=2, steps=1, probe_count=2, probe_size=64,
                         test_size=64, device="cpu", projection_init="split-D", **SPLIT_OPTIONS)
    s = train_mod.setup(config)
    checks = s.meta["split_checks"]
    assert checks["crops"] == split.CHECK_CROPS and checks["aux_total_correlation"] > 1
    assert abs(checks["aux_coding_gain"] - 1) < 0.1
    assert not s.net.g_a.auxiliary_layers[-1].olp.linear.weight.requires_grad


# --- end to end ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_split_grid_end_to_end(tmp_path, capsys):
    out = tmp_path / "split"
    assert ablate_cli.main([*ablation_argv(out, seeds=[0, 1], steps=30), "--split"]) == 0
    printed = capsys.readouterr().out
    summary = AblationDir(out).summary()
    assert [r["variant"] for r in summary["rows"]] == ["baseline", "auxt", *SPLIT_INITS]
    section = summary["split"]
    names = {e["estimand"] for e in section["estimands"]}
    assert names == set(split.ESTIMANDS)
    for e in section["estimands"]:
        assert e["n"] <= 2 and e["verdict"] in ("outside the noise", "equivalent", "inconclusive",
                                                 "cannot tell")
        assert e["sentence"].startswith(e["estimand"])
        if e["n"] == 2:
            assert e["low"] is not None and e["high"] is not None and e["low"] <= e["high"]
    loss = [e for e in section["estimands"] if e["key"] == "test_loss"]
    assert len(loss) == len(split.ESTIMANDS) and all(e["n"] == 2 and e["low"] is not None for e in loss)
    assert set(section["verdicts"]) == set(split.ESTIMANDS)
    cells = {c["cell"]: c for c in section["checks"]["cells"]}
    assert set(cells) == set(split.CELLS) and all(c["seeds"] == 2 for c in cells.values())
    for c in cells.values():
        for field in ("aux_share", "aux_energy", "aux_total_correlation", "aux_coding_gain"):
            assert c[f"{field}_mean"] is not None
    assert cells["A"]["aux_total_correlation_mean"] < cells["C"]["aux_total_correlation_mean"]
    assert all(v is not None for v in section["checks"]["energy_spread"].values())
    config = AblationDir(out).cell("split-B", 1).config()
    assert config["split_checks"]["crops"] == split.CHECK_CROPS
    during = section["capture_checks"]
    assert {r["cell"] for r in during} == set(split.CELLS)
    assert all(r["seeds"] == 2 and r["aux_share_mean"] is not None for r in during)
    assert {r["step"] for r in during} >= {0, 30}
    text = (out / AblationDir.SUMMARY_MD).read_text()
    assert "## Split: decorrelation × unevenness" in text and "### Manipulation checks at step 0" in text
    assert "### Manipulation checks during training" in text
    assert "## Split: decorrelation × unevenness" in printed


def test_capture_checks_follow_the_last_merge_and_average_over_seeds():
    def records(seed):
        out = []
        for step in (0, 100):
            for merge in (3, 4):
                out.append({"step": step, "layer": f"g_a.aux{merge}", "role": "aux", "merge": merge,
                            "aux_energy_share": merge / 10 + seed + step, "total_correlation": 1.0 * merge,
                            "coding_gain": 2.0})
            out.append({"step": step, "layer": "y", "role": "y", "total_correlation": 50.0 + seed,
                        "coding_gain": 1.5})
        return out

    per_seed = {s: split.capture_checks(records(s)) for s in (0, 1)}
    assert per_seed[1][100] == {"aux_share": 101.4, "aux_total_correlation": 4.0, "aux_coding_gain": 2.0,
                                "y_total_correlation": 51.0, "y_coding_gain": 1.5}
    assert split.capture_checks([{"step": 0, "layer": "y", "role": "y"}]) == {}  # no shortcut
    rows = split.capture_check_summary({("split-A", s): per_seed[s] for s in (0, 1)}, [0, 1])
    assert [(r["cell"], r["step"], r["seeds"]) for r in rows] == [("A", 0, 2), ("A", 100, 2)]
    assert rows[1]["aux_share_mean"] == pytest.approx(100.9)
    assert rows[1]["y_total_correlation_std"] == pytest.approx(np.std([50.0, 51.0], ddof=1))
    text = split.format_split({**split.split_summary([], [0, 1]), "capture_checks": rows})
    assert "### Manipulation checks during training" in text and "| A | 100 | 2 |" in text

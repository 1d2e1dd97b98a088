"""Direct tests of energylab.capture.LatentProbe on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from energylab.capture import (
    INTERVAL_ROLES,
    NEIGHBOURHOOD_INTERVAL_ROLES,
    NEIGHBOURHOOD_ROLES,
    ROLES,
    HookPoint,
    LatentProbe,
    default_layers,
)
from energylab.models import build_model
from energylab.stats import active_channels, channel_stats, rate_share_am_gm, rate_share_entropy


def tiny(auxt: bool) -> nn.Module:
    return build_model("bmshj2018-factorized", N=8, M=12, auxt=auxt).eval()


def run(probe: LatentProbe, model: nn.Module, x: torch.Tensor) -> None:
    with probe, torch.no_grad():
        model(x)


@pytest.mark.parametrize("auxt", [False, True])
def test_layers_roles_and_counts(auxt):
    model = tiny(auxt)
    points = default_layers(model)
    expected = {"g_a.stage1": ("stage", None), "g_a.stage2": ("stage", None),
                "g_a.stage3": ("stage", None), "y": ("y", None), "y_hat": ("y_hat", None)}
    if auxt:
        expected |= {f"g_a.{role}{k}": (role, k) for k in range(1, 5) for role in ("main", "aux")}
        # roles come from the merge positions: main<k> and aux<k> read merge k's two inputs
        for k in range(1, 5):
            assert points[f"g_a.main{k}"].module == points[f"g_a.aux{k}"].module == f"g_a.merges.{k - 1}"
    assert {name: (p.role, p.merge) for name, p in points.items()} == expected
    assert {p.role for p in points.values()} <= set(ROLES)

    probe = LatentProbe(model)
    x = torch.rand(2, 3, 64, 64)
    run(probe, model, x)
    records = {r["layer"]: r for r in probe.records(step=5)}
    gains = {f"{side}.gain{k}" for side in ("g_a", "g_s") for k in range(1, 5)} if auxt else set()
    assert {name for name, r in records.items() if r["role"] == "gain"} == gains
    records = {name: r for name, r in records.items() if r["role"] != "gain"}
    assert set(records) == set(expected)
    sizes = {"g_a.stage1": 32, "g_a.stage2": 16, "g_a.stage3": 8, "y": 4, "y_hat": 4}
    sizes |= {f"g_a.{r}{k}": 64 >> k for k in range(1, 5) for r in ("main", "aux")}
    for name, record in records.items():
        assert (record["role"], record["merge"]) == expected[name]
        assert record["step"] == 5
        assert record["count"] == 2 * sizes[name] ** 2  # B * H * W of that layer
        assert record["nonfinite"] == 0
        assert ("aux_energy_share" in record) == (record["role"] == "aux")
    if auxt:
        assert all(0 < records[f"g_a.aux{k}"]["aux_energy_share"] for k in range(1, 5))


def test_records_are_json_serialisable_python_numbers():
    model = tiny(True)
    probe = LatentProbe(model)
    run(probe, model, torch.rand(1, 3, 64, 64))
    for record in probe.records(step=0):
        assert all(v is None or type(v) in (int, float, str) for v in record.values()), record
        assert json.loads(json.dumps(record, allow_nan=False)) == record


def test_reentry_is_refused_and_hooks_removed_after_exit():
    model = tiny(True)
    probe = LatentProbe(model)
    x = torch.rand(1, 3, 64, 64)
    with probe:
        with pytest.raises(RuntimeError, match="already active"), probe:
            pass
        with torch.no_grad():
            model(x)
    assert {r["layer"]: r.get("count") for r in probe.records(0)}["y"] == 16  # counted once, not twice
    hooked = [name for name, m in model.named_modules() if m._forward_hooks]
    assert hooked == []
    run(probe, model, x)  # after exit it may be entered again: it accumulates
    assert {r["layer"]: r.get("count") for r in probe.records(0)}["y"] == 2 * 16


def test_data_parallel_model_is_unwrapped():
    model = tiny(True)
    wrapped = nn.DataParallel(model)
    assert default_layers(wrapped) == default_layers(model)
    probe = LatentProbe(wrapped)
    x = torch.rand(1, 3, 64, 64)
    run(probe, wrapped, x)
    plain = LatentProbe(model)
    run(plain, model, x)
    assert probe.records(1) == plain.records(1)


def test_nonfinite_latent_is_counted_in_the_record():
    model = tiny(False)
    x = torch.rand(2, 3, 64, 64)
    x[1, :, :16, :16] = math.nan  # spreads through g_a's convolutions into some latent positions
    probe = LatentProbe(model, layers=["y"])
    run(probe, model, x)
    (record,) = probe.records(0)
    assert 0 < record["nonfinite"] < 2 * 16
    assert record["count"] + record["nonfinite"] == 2 * 16
    assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))


def test_custom_hook_points_and_unknown_names():
    model = tiny(False)
    with pytest.raises(ValueError, match="unknown layer"):
        LatentProbe(model, layers=["nope"])
    probe = LatentProbe(model, layers={"first_conv": HookPoint("g_a.0")})
    run(probe, model, torch.rand(1, 3, 64, 64))
    (record,) = probe.records(0)
    got = (record["layer"], record["role"], record["merge"], record["channels"])
    assert got == ("first_conv", None, None, 8)
    for bad in ({"role": "stem"}, {"role": "aux"}, {"role": "y", "merge": 1}):
        with pytest.raises(ValueError, match="HookPoint"):
            HookPoint("g_a.0", **bad)
    with pytest.raises(ValueError, match="no module"):
        with LatentProbe(model, layers={"x": HookPoint("g_a.99")}):
            pass


HEADLINE = ("total_correlation", "total_correlation_per_channel", "coding_gain", "klt_coding_gain",
            "decorrelation_gain", "offdiag_energy_ratio", "effective_rank", "mean_energy_fraction",
            *(f"topk_share.{kind}" for kind in ("l2", "l2_centred", "ms", "ms_centred")))


def test_records_carry_intervals_neighbourhood_and_centred_energies():
    model = tiny(True)
    x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    probe = LatentProbe(model, replicates=50, seed=1)
    run(probe, model, x)
    records = probe.records(0)
    for r in records:
        if r["role"] == "gain":  # the learned exp(s): parameters, not statistics of a latent
            continue
        assert r["images"] == 6
        assert ("neighbourhood_tc.joint" in r) == (r["role"] in NEIGHBOURHOOD_ROLES)
        assert r["topk_energy_share"] == r["topk_share.ms"]  # the legacy key is the raw mean-square share
        stats = (HEADLINE if r["role"] in INTERVAL_ROLES else ()) + (
            tuple(f"neighbourhood_tc.{k}" for k in ("joint", "across_channels", "across_positions"))
            if r["role"] in NEIGHBOURHOOD_INTERVAL_ROLES else ()
        )
        assert len([k for k in r if k.endswith("_ci_low")]) == len(stats), r["layer"]
        for stat in stats:
            low, high = r[f"{stat}_ci_low"], r[f"{stat}_ci_high"]
            if r[stat] is None or low is None:  # None also where a replicate is singular (y_hat's
                assert low is None and high is None, (r["layer"], stat)  # rounded channels)
            else:
                assert low <= r[stat] <= high, (r["layer"], stat, low, r[stat], high)
        assert sum(r[f"subband_energy_centred.{b}"] for b in ("LL2", "LH2", "HL2", "HH2", "LH1", "HL1",
                                                              "HH1")) == pytest.approx(1.0)
    y = next(r for r in records if r["layer"] == "y")
    assert all(y[f"{stat}_ci_low"] is not None for stat in HEADLINE)
    assert y["neighbourhood_tc.count"] == 6 * 2 * 2  # 2 x 2 blocks of a 4 x 4 latent, per image
    assert json.loads(json.dumps(records, allow_nan=False)) == records

    again = LatentProbe(model, replicates=50, seed=1)
    run(again, model, x)
    assert again.records(0) == records  # same seed, same intervals
    plain = LatentProbe(model, layers=["y"], replicates=0)
    run(plain, model, x)
    (record,) = [r for r in plain.records(0) if r["role"] != "gain"]
    assert not [k for k in record if "_ci_" in k]


def test_capture_arrays_are_float64_in_the_npz(tmp_path):
    model = tiny(False)
    probe = LatentProbe(model)
    run(probe, model, torch.rand(2, 3, 64, 64))
    np.savez_compressed(tmp_path / "c.npz", **probe.arrays())
    with np.load(tmp_path / "c.npz") as npz:
        for name in ("cov/y", "mean/y", "energies/y", "cov/g_a.stage1"):
            assert npz[name].dtype == np.float64, name
        moments = probe.metrics["y"]["channel"].compute()
        np.testing.assert_array_equal(npz["cov/y"], moments["covariance"].numpy())
        np.testing.assert_array_equal(npz["mean/y"], moments["mean"].numpy())


@pytest.mark.parametrize("name", ["bmshj2018-factorized", "mbt2018-mean", "mbt2018"])
def test_rate_shares_on_y_hat_match_the_likelihoods_of_a_direct_forward(name):
    torch.manual_seed(0)
    model = build_model(name, N=8, M=12).eval()
    x = torch.rand(2, 3, 128, 64)
    probe = LatentProbe(model)
    run(probe, model, x)
    with torch.no_grad():
        p = model(x)["likelihoods"]["y"].double()
    bits = -torch.log2(p).sum((0, 2, 3))
    shares = probe.rate.compute()["shares"]
    assert float(shares.sum()) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(shares, bits / bits.sum(), rtol=1e-10, atol=0)
    (record,) = [r for r in probe.records(3) if r["layer"] == "y_hat"]
    assert record["rate_share_entropy"] == pytest.approx(rate_share_entropy(shares.numpy()))
    assert record["rate_share_entropy"] <= math.log2(12)
    assert record["bits_per_position"] == pytest.approx(float(bits.sum()) / p[:, 0].numel())
    if name == "bmshj2018-factorized":  # std of y_hat in units of the step 1
        with torch.no_grad():
            y_hat, _ = model.entropy_bottleneck(model.g_a(x))
        std = channel_stats(y_hat)["covariance"].diagonal().sqrt()
        assert record["std_in_steps.max"] == pytest.approx(float(std.max()))
        assert record["std_in_steps.median"] == pytest.approx(float(std.median() + std.sort().values[6]) / 2)
    arrays = probe.arrays()
    assert arrays["rate_share/y_hat"].shape == arrays["std_in_steps/y_hat"].shape == (12,)


@pytest.mark.parametrize("name", ["mbt2018-mean", "bmshj2018-hyperprior"])
def test_residual_is_y_minus_means_over_scales(name):
    torch.manual_seed(0)
    model = build_model(name, N=8, M=12).eval()
    assert default_layers(model)["y_residual"].role == "residual"
    x = torch.rand(2, 3, 128, 128)
    probe = LatentProbe(model, layers=["y_residual"])
    run(probe, model, x)
    with torch.no_grad():  # by hand, as the models' forward computes them
        y = model.g_a(x)
        z_hat, _ = model.entropy_bottleneck(model.h_a(y if name == "mbt2018-mean" else y.abs()))
        params = model.h_s(z_hat)
    if name == "mbt2018-mean":
        scales, means = params.chunk(2, 1)
    else:
        scales, means = params, torch.zeros_like(y)
    residual = (y - means) / scales.clamp(min=0.11)  # GaussianConditional's scale lower bound
    torch.testing.assert_close(probe.first["y_residual"], residual[0])
    expected = channel_stats(residual)
    got = probe.metrics["y_residual"]["channel"].compute()
    torch.testing.assert_close(got["mean"], expected["mean"])
    torch.testing.assert_close(got["covariance"], expected["covariance"])


def test_residual_only_where_one_gaussian_conditional_codes_all_of_y():
    assert "y_residual" not in default_layers(tiny(False))  # factorized: no Gaussian conditional
    assert "y_residual" not in default_layers(build_model("tcm", N=16, M=20))  # channel slices
    assert "y_residual" in default_layers(build_model("cheng2020-anchor", N=8))


def test_gain_records_equal_the_scaling_parameters():
    model = tiny(True)
    block = model.g_a.auxiliary_layers[1]
    c = block.scaling_factors.shape[-1] // 4
    with torch.no_grad():
        block.scaling_factors.copy_(torch.linspace(-1, 1, 4 * c).view(1, 1, -1))
    probe = LatentProbe(model, layers=["y"])
    run(probe, model, torch.rand(1, 3, 64, 64))
    records = {r["layer"]: r for r in probe.records(7) if r["role"] == "gain"}
    record = records["g_a.gain2"]
    assert (record["step"], record["merge"]) == (7, 2)
    s = torch.linspace(-1, 1, 4 * c, dtype=torch.float64)
    for i, band in enumerate(("LL", "LH", "HL", "HH")):
        assert record[f"exp_s.{band}"] == pytest.approx(float(s[i * c : (i + 1) * c].exp().mean()))
    assert probe.arrays()["exp_s/g_a.gain2"].shape == (4, c)
    no_scaling = build_model("bmshj2018-factorized", N=8, M=12, auxt=True, remove=("scaling",))
    assert [r for r in LatentProbe(no_scaling).records(0) if r["role"] == "gain"] == []


def test_active_channels_and_share_summaries_on_a_constructed_case():
    # C = 10, threshold 0.1 / 10 = 0.01: three channels above it, seven below
    shares = [0.5, 0.3, 0.15] + [0.05 / 7] * 7
    assert active_channels(shares) == 3
    assert active_channels([0.1] * 10) == 10
    assert rate_share_entropy([0.1] * 10) == pytest.approx(math.log2(10))
    assert rate_share_am_gm([0.1] * 10) == pytest.approx(1.0)
    assert rate_share_am_gm(shares) > 1.0


def test_skip_synthesis_gives_the_same_records_and_restores_g_s():
    torch.manual_seed(0)
    model = build_model("mbt2018-mean", N=8, M=12, auxt=True).eval()
    g_s = model.g_s
    x = torch.rand(2, 3, 64, 64)
    full, skipped = LatentProbe(model), LatentProbe(model, skip_synthesis=True)
    run(full, model, x)
    run(skipped, model, x)
    assert model.g_s is g_s
    for a, b in zip(full.records(0), skipped.records(0), strict=True):
        assert a.keys() == b.keys() and a["layer"] == b["layer"]
        for key, value in a.items():
            expected = pytest.approx(value, rel=1e-9, abs=1e-12) if isinstance(value, float) else value
            assert b[key] == expected
    with pytest.raises(ValueError, match="skip_synthesis"):
        LatentProbe(model, layers={"inside": HookPoint("g_s.transform.0")}, skip_synthesis=True).__enter__()
    assert model.g_s is g_s


def test_enough_positions_stops_feeding_a_layer_and_reads_a_centred_window():
    model = tiny(True)
    x = torch.rand(6, 3, 64, 64)
    probe = LatentProbe(model, layers=["g_a.stage1", "y", "g_a.aux1"], enough_positions=40, enough_images=2)
    seen = {}
    modules = dict(model.named_modules())

    def keep(name: str):  # the first batch's (point, merged output); returns None: output unchanged
        point = probe.points[name]
        return lambda m, i, o: None if name in seen else seen.update({name: (point.extract(i, o), o)})

    handles = [modules[probe.points[name].module].register_forward_hook(keep(name))
               for name in ("g_a.stage1", "g_a.aux1")]
    with probe, torch.no_grad():
        for batch in x.split(4):  # batches of 4 and 2 images
            model(batch)
    for handle in handles:
        handle.remove()
    records = {r["layer"]: r for r in probe.records(0)}
    counts = {layer: r.get("count") for layer, r in records.items()}
    # stage1 and aux1 (32x32 maps): 2 images (enough_images) of 20 positions each at least, in a
    # window whose side is a multiple of 2**subband_levels = 4: the centred 8x8 window;
    # y: 4x4 = 16 per image, smaller than the window, whole: 40 positions need ceil(40 / 16) = 3 images
    assert counts["g_a.stage1"] == counts["g_a.aux1"] == 2 * 64
    assert counts["y"] == 3 * 16
    centre = seen["g_a.stage1"][0][:2, :, 12:20, 12:20].double()
    assert records["g_a.stage1"]["images"] == 2
    np.testing.assert_allclose(probe.arrays()["mean/g_a.stage1"], centre.mean((0, 2, 3)).numpy(), rtol=1e-9)
    whole = LatentProbe(model, layers=["g_a.stage1"], enough_positions=40 * 64, enough_images=2)
    run(whole, model, x)
    assert whole.records(0)[0]["count"] == 3 * 1024  # a window as large as the map: whole maps
    aux, merged = (t[:2, :, 12:20, 12:20].double() for t in seen["g_a.aux1"])
    assert records["g_a.aux1"]["aux_energy_share"] == pytest.approx(
        float(aux.square().sum() / merged.square().sum()), rel=1e-9)


def test_reset_reuses_the_metrics_and_records_only_layers_fed_again():
    model = tiny(True)
    x = torch.rand(4, 3, 64, 64)
    probe = LatentProbe(model, layers=["g_a.stage1", "y", "y_hat", "g_a.aux1"], replicates=20)
    run(probe, model, x)
    first, metrics = probe.records(0), dict(probe.metrics)
    probe.reset()
    assert [r["role"] for r in probe.records(0)] == ["gain"] * 8  # no layer fed since the reset
    run(probe, model, x)
    assert probe.records(0) == first  # the same numbers as a fresh probe, intervals included
    assert all(probe.metrics[name] is m for name, m in metrics.items())
    np.testing.assert_allclose(probe.arrays()["probe_y"], model.g_a(x[:1])[0].detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("bad", [{"enough_positions": 0}, {"enough_positions": -5},
                                 {"enough_positions": 8192.5}, {"enough_positions": 100, "enough_images": 0}])
def test_enough_settings_are_checked_up_front(bad):
    with pytest.raises(ValueError, match="must be a positive integer"):
        LatentProbe(tiny(False), **bad)

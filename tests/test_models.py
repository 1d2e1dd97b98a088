import pytest
import torch
from torch import nn

from energylab.auxt import WLS, iWLS
from energylab.models import MODELS, attach_auxt, build_model, has_auxt

SIZES = {
    "bmshj2018-factorized": {"N": 8, "M": 12},
    "bmshj2018-hyperprior": {"N": 8, "M": 12},
    "mbt2018-mean": {"N": 8, "M": 12},
    "mbt2018": {"N": 8, "M": 12},
    "cheng2020-anchor": {"N": 8},
    "elic2022-official": {"N": 8, "M": 136},
}
MERGES = {
    "bmshj2018-factorized": ((0, 2, 4, 6), (1, 3, 5, 6)),
    "bmshj2018-hyperprior": ((0, 2, 4, 6), (1, 3, 5, 6)),
    "mbt2018-mean": ((0, 2, 4, 6), (1, 3, 5, 6)),
    "mbt2018": ((0, 2, 4, 6), (1, 3, 5, 6)),
    "cheng2020-anchor": ((0, 2, 4, 6), (2, 4, 6, 7)),
    "elic2022-official": ((0, 4, 9, 13), (4, 9, 13, 14)),
}
AUTOREGRESSIVE = {"mbt2018", "cheng2020-anchor"}


def test_registry_covers_required_models():
    assert set(SIZES) <= set(MODELS)


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("auxt", [False, True])
def test_forward_merges_and_real_coding(name, auxt):
    model = build_model(name, auxt=auxt, **SIZES[name]).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out["x_hat"].shape == x.shape
    if auxt:
        assert (model.g_a.merge_positions, model.g_s.merge_positions) == MERGES[name]
    model.update(force=True)
    with torch.no_grad():
        enc = model.compress(x)
        captured = []
        handle = model.g_s.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        dec = model.decompress(enc["strings"], enc["shape"])
        handle.remove()
        y = model.g_a(x)
    if name in AUTOREGRESSIVE:
        # CompressAI's forward rounds y without the means here, so compare the decoded latent
        # with the encoder's y instead: y_hat = round(y - mu) + mu lies within half a step of y.
        assert (captured[0] - y).abs().max() <= 0.5 + 1e-4
        with torch.no_grad():
            torch.testing.assert_close(dec["x_hat"], model.g_s(captured[0]).clamp(0, 1))
    else:
        torch.testing.assert_close(dec["x_hat"], out["x_hat"].clamp(0, 1), atol=1e-5, rtol=0)


def test_state_dict_names_match_compressai_temp():
    keys = set(build_model("mbt2018-mean", N=8, M=12, auxt=True).state_dict())
    for side in ("g_a", "g_s"):
        for k in range(4):
            assert f"{side}.auxiliary_layers.{k}.olp.linear.weight" in keys
            assert f"{side}.auxiliary_layers.{k}.scaling_factors" in keys
    assert "g_a.transform.0.weight" in keys


def test_widths_follow_traced_channels():
    model = build_model("mbt2018-mean", N=8, M=12, auxt=True)
    enc = [(m.in_channels, m.out_channels) for m in model.g_a.auxiliary_layers]
    dec = [(m.in_channels, m.out_channels) for m in model.g_s.auxiliary_layers]
    assert enc == [(3, 8), (8, 8), (8, 8), (8, 12)]
    assert dec == [(12, 8), (8, 8), (8, 8), (8, 3)]
    assert all(isinstance(m, WLS) for m in model.g_a.auxiliary_layers)
    assert all(isinstance(m, iWLS) for m in model.g_s.auxiliary_layers)


def test_g_a_is_main_plus_auxiliary_chain():
    model = build_model("bmshj2018-factorized", N=8, M=12, auxt=True)
    g_a = model.g_a
    x = torch.rand(1, 3, 32, 32)
    main, aux = x, x
    for i, layer in enumerate(g_a.transform):
        main = layer(main)
        if i in g_a.merge_positions:
            aux = g_a.auxiliary_layers[g_a.merge_positions.index(i)](aux)
            main = main + aux
    torch.testing.assert_close(g_a(x), main)


def test_alternative_placement():
    model = build_model(
        "mbt2018-mean", N=8, M=12, auxt=True, g_a_placement="stage_end",
        g_s_placement="after_resample",
    )
    assert model.g_a.merge_positions == (1, 3, 5, 6)
    assert model.g_s.merge_positions == (0, 2, 4, 6)
    with pytest.raises(ValueError, match="unknown placement"):
        build_model("mbt2018-mean", N=8, M=12, auxt=True, g_a_placement="middle")


def test_same_seed_same_main_initialisation():
    torch.manual_seed(3)
    base = build_model("mbt2018-mean", N=8, M=12)
    torch.manual_seed(3)
    aux = build_model("mbt2018-mean", N=8, M=12, auxt=True)
    torch.testing.assert_close(base.g_a[0].weight, aux.g_a.transform[0].weight)


def test_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'; valid names are"):
        build_model("nope")
    with pytest.raises(ValueError, match="needs auxt=True"):
        build_model("mbt2018-mean", remove=("scaling",))
    with pytest.raises(ValueError, match="valid names are: wavelet, orthogonal, scaling"):
        build_model("mbt2018-mean", auxt=True, remove=("bogus",))
    model = build_model("mbt2018-mean", N=8, M=12, auxt=True)
    assert has_auxt(model)
    with pytest.raises(ValueError, match="already has AuxT"):
        attach_auxt(model)

    class ThreeStages(nn.Module):
        def __init__(self):
            super().__init__()
            self.g_a = nn.Sequential(*[nn.Conv2d(3, 3, 3, 2, 1) for _ in range(3)])
            self.g_s = nn.Sequential(nn.Identity())

    with pytest.raises(ValueError, match="g_a has 3 resolution changes"):
        attach_auxt(ThreeStages())


def test_default_widths_and_m_only_where_it_exists():
    assert build_model("mbt2018-mean", N=8).g_a[-1].out_channels == 320
    assert build_model("cheng2020-anchor", N=8).g_a[-1].out_channels == 8
    with pytest.raises(ValueError, match="has no M"):
        build_model("cheng2020-anchor", N=8, M=12)


@pytest.mark.parametrize(("name", "factor"), [("bmshj2018-factorized", 16), ("bmshj2018-hyperprior", 64)])
@pytest.mark.parametrize("auxt", [True, False])
def test_input_size_rule_is_named_before_any_layer_runs(name, factor, auxt):
    model = build_model(name, N=8, M=12, auxt=auxt).eval()
    x = torch.rand(1, 3, 66, 66)
    rule = (rf"{name} needs an input whose height and width are multiples of its downsampling factor "
            rf"{factor}, got 66x66")
    with pytest.raises(ValueError, match=rule) as info:
        model(x)
    assert "\n" not in str(info.value)
    model.update(force=True)
    with pytest.raises(ValueError, match=rule), torch.no_grad():
        model.compress(x)
    model(torch.rand(1, 3, factor, 2 * factor))  # a multiple passes


def test_auxt_on_any_model_names_its_size_rule():
    model = attach_auxt(MODELS["bmshj2018-factorized"](N=8, M=12))  # not through build_model
    rule = r"AuxT needs an input whose height and width are multiples of 16 \(4 wavelet stages\), got 66x66"
    with pytest.raises(ValueError, match=rule):
        model.g_a(torch.rand(1, 3, 66, 66))


def test_dataparallel_models_are_seen_through():
    torch.manual_seed(0)
    wrapped = nn.DataParallel(build_model("bmshj2018-factorized", N=16, M=24))
    assert attach_auxt(wrapped) is wrapped.module
    assert has_auxt(wrapped) and has_auxt(wrapped.module)
    with pytest.raises(ValueError, match="already has AuxT"):
        attach_auxt(nn.DataParallel(wrapped.module))


def test_errors_are_in_library_terms():
    with pytest.raises(ValueError, match=r"removing AuxT components scaling needs auxt=True") as info:
        build_model("mbt2018-mean", remove=("scaling",))
    assert "--" not in str(info.value)

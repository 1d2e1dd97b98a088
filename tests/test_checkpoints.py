"""Checkpoint layouts: energylab loads exactly what CompressAI's own loaders load, and says which."""

import pytest
import torch
from compressai.zoo.pretrained import load_pretrained

from energylab.checkpoints import (
    CheckpointError,
    CheckpointLayout,
    detect_format,
    from_energylab,
    load_weights,
    to_energylab,
    torch_load,
)
from energylab.evaluate import EvaluationError, load_model
from energylab.models import build_model

ARCH = {"N": 8, "M": 12}
EB_PARAMS = ("matrices", "biases", "factors")


def _model(seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return build_model("bmshj2018-hyperprior", **ARCH)


def _trained(updated):
    model = _model(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    if updated:  # non-empty _quantized_cdf / _offset / _cdf_length / scale_table buffers
        model.update(force=True)
    return model


def _legacy_eb(sd, style):
    """Entropy-bottleneck keys as older CompressAI saved them: ``_matrix0`` (< 1.2) or
    ``_matrices.0`` (nn.ParameterList)."""
    out = {}
    for k, v in sd.items():
        for new, old in zip(EB_PARAMS, ("matrix", "bias", "factor"), strict=True):
            prefix = f"entropy_bottleneck.{new}."
            if k.startswith(prefix):
                i = k[len(prefix):]
                k = f"entropy_bottleneck._{old}{i}" if style == "flat" else f"entropy_bottleneck._{new}.{i}"
        out[k] = v
    return out


def _prefixed(sd):
    return {f"module.{k}": v for k, v in sd.items()}


LAYOUTS = {
    # name: (state dict from the trained one, renames energylab must report)
    "current": (lambda sd: sd, ()),
    "ddp module. prefix": (_prefixed, ("module-prefix",)),
    "legacy _matrix0/_bias0/_factor0": (lambda sd: _legacy_eb(sd, "flat"), ("legacy-entropy-bottleneck",)),
    "legacy _matrices.0 ParameterList": (lambda sd: _legacy_eb(sd, "list"), ("legacy-entropy-bottleneck",)),
    "prefix and legacy": (
        lambda sd: _prefixed(_legacy_eb(sd, "flat")),
        ("module-prefix", "legacy-entropy-bottleneck"),
    ),
    "without GDN pedestal buffers": (
        lambda sd: {k: v for k, v in sd.items() if not k.endswith("_reparam.pedestal")},
        None,  # CompressAI refuses it (strict load): so must energylab
    ),
}


def _compressai_load(sd):
    """What CompressAI's zoo loader does: ``load_pretrained`` renames, then the model's own
    ``CompressionModel.load_state_dict``; ``None`` if it refuses."""
    model = _model()
    try:
        model.load_state_dict(load_pretrained(sd))
    except (RuntimeError, KeyError, ValueError):
        return None
    return model


@pytest.mark.parametrize("container", [None, "state_dict", "model", "network"])
@pytest.mark.parametrize("updated", [False, True], ids=["fresh-buffers", "updated-buffers"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loads_exactly_what_compressai_loads(tmp_path, layout, updated, container):
    trained = _trained(updated)
    make, renames = LAYOUTS[layout]
    sd = make(trained.state_dict())
    reference = _compressai_load(sd)
    assert (reference is None) == (renames is None)  # the layout list says what CompressAI does
    path = tmp_path / "ckpt.pth.tar"
    torch.save(sd if container is None else {container: sd, "epoch": 3}, path)
    model = _model()
    if reference is None:
        with pytest.raises(CheckpointError, match="ckpt.pth.tar: checkpoint lacks '.*pedestal'"):
            load_weights(model, torch_load(path), path)
        return
    got = load_weights(model, torch_load(path), path)
    assert got == CheckpointLayout(container, renames)
    ref = reference.state_dict()
    assert model.state_dict().keys() == ref.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref[key]), key


def test_nested_checkpoint_error_lists_the_top_level_keys(tmp_path):
    sd = _trained(False).state_dict()
    path = tmp_path / "nested.pt"
    torch.save({"epoch": 7, "weights": sd, "optimizer": {"lr": torch.tensor(1e-4)}}, path)
    with pytest.raises(CheckpointError, match=r"top-level keys found: 'epoch', 'weights', 'optimizer'") as e:
        load_weights(_model(), torch_load(path), path)
    assert "\n" not in str(e.value) and "nested.pt" in str(e.value)
    with pytest.raises(EvaluationError, match=r"top-level keys found: 'epoch', 'weights', 'optimizer'"):
        load_model(path, {"model": "bmshj2018-hyperprior", **ARCH})


def test_load_model_reports_the_layout(tmp_path):
    trained = _trained(True)
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": _prefixed(_legacy_eb(trained.state_dict(), "flat"))}, path)
    model, arch = load_model(path, {"model": "bmshj2018-hyperprior", **ARCH})
    assert arch["checkpoint"] == {
        "file": str(path),
        "format": "compressai",
        "container": "state_dict",
        "renames": ["module-prefix", "legacy-entropy-bottleneck"],
    }
    torch.testing.assert_close(model.entropy_bottleneck.matrices[0], trained.entropy_bottleneck.matrices[0])


def test_a_dataparallel_model_is_loaded_into(tmp_path):
    trained = _trained(False)
    wrapped = torch.nn.DataParallel(_model())
    layout = load_weights(wrapped, trained.state_dict(), "memory")
    assert layout == CheckpointLayout(None, ())
    torch.testing.assert_close(wrapped.module.g_a[0].weight, trained.g_a[0].weight)


def test_coder_tables_into_an_updated_model_fail_in_one_line():
    trained = _trained(True)
    model = _model()
    model.entropy_bottleneck.update(force=True)  # its own, differently sized tables
    sd = dict(trained.state_dict())
    sd["entropy_bottleneck._quantized_cdf"] = torch.zeros(3, 5, dtype=torch.int32)
    with pytest.raises(CheckpointError, match=r"memory: does not load into model ScaleHyperprior") as info:
        load_weights(model, sd, "memory")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# AuxT layouts of the official release and of compressai-temp
# ---------------------------------------------------------------------------------------------

FOREIGN = {"tcm": {"N": 16, "M": 40}, "mbt2018-mean": {"N": 8, "M": 12}}


def _haar():
    import pywt

    w = pywt.Wavelet("haar")
    return w.dec_lo, w.dec_hi, w.rec_lo, w.rec_hi


def _widths(name, arch):
    """Each WLS's (C_in, C_out) and each iWLS's, as the release builds them for TCM (``WLS(3, 2N)``,
    ``WLS(2N, 2N)`` x2, ``WLS(2N, M)``; mirrored) and as the traced main widths give them for mbt."""
    n, m = arch["N"], arch["M"]
    enc = [3, 2 * n, 2 * n, 2 * n, m] if name == "tcm" else [3, n, n, n, m]
    dec = [m, 2 * n, 2 * n, 2 * n, 3] if name == "tcm" else [m, n, n, n, 3]
    return list(zip(enc, enc[1:], strict=False)), list(zip(dec, dec[1:], strict=False))


def _release_state(name, arch, seed=0):
    """A state dict with the official release's keys (``models/tcm_AuxT.py``, ``models/pywave.py``):
    the plain model's keys, ``AuxT_enc.k.{dwt.w_ll,...,OLP.linear.*,scaling_factors}`` and
    ``AuxT_dec.k.{idwt.filters,OLP.linear.*,scaling_factors}``; random weights, the release's buffers."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in build_model(name, **arch).state_dict().items()}
    dec_lo, dec_hi, rec_lo, rec_hi = _haar()
    lo, hi = torch.Tensor(dec_lo[::-1]), torch.Tensor(dec_hi[::-1])
    rlo, rhi = torch.Tensor(rec_lo), torch.Tensor(rec_hi)
    enc, dec = _widths(name, arch)
    for k, (cin, cout) in enumerate(enc):
        p = f"AuxT_enc.{k}."
        for band, (a, b) in zip(("w_ll", "w_lh", "w_hl", "w_hh"), ((lo, lo), (lo, hi), (hi, lo), (hi, hi)),
                                strict=True):
            sd[p + f"dwt.{band}"] = (a.unsqueeze(0) * b.unsqueeze(1)).unsqueeze(0).unsqueeze(0)
        sd[p + "OLP.linear.weight"] = torch.randn(cout, 4 * cin, generator=g)
        sd[p + "OLP.linear.bias"] = torch.randn(cout, generator=g)
        sd[p + "scaling_factors"] = torch.randn(1, 1, 4 * cin, generator=g)
    for k, (cin, cout) in enumerate(dec):
        p = f"AuxT_dec.{k}."
        sd[p + "idwt.filters"] = torch.cat([(a.unsqueeze(0) * b.unsqueeze(1))[None, None]
                                            for a, b in ((rlo, rlo), (rlo, rhi), (rhi, rlo), (rhi, rhi))])
        sd[p + "OLP.linear.weight"] = torch.randn(4 * cout, cin, generator=g)
        sd[p + "OLP.linear.bias"] = torch.randn(4 * cout, generator=g)
        sd[p + "scaling_factors"] = torch.randn(1, 1, 4 * cout, generator=g)
    return sd


def _temp_state(name, arch, seed=0):
    """compressai-temp's AuxT keys: energylab's plus pytorch_wavelets' persistent buffers
    ``dwt.transform.{h0,h1}_{col,row}`` (reversed analysis filters) and ``idwt.inverse.{g0,g1}_{col,row}``."""
    torch.manual_seed(seed)
    sd = dict(build_model(name, auxt=True, **arch).state_dict())
    dec_lo, dec_hi, rec_lo, rec_hi = _haar()
    for k in range(4):
        p = f"g_a.auxiliary_layers.{k}.dwt.transform."
        for f, filt in (("h0", dec_lo[::-1]), ("h1", dec_hi[::-1])):
            sd[p + f + "_col"] = torch.tensor(filt).float().reshape(1, 1, -1, 1)
            sd[p + f + "_row"] = torch.tensor(filt).float().reshape(1, 1, 1, -1)
        p = f"g_s.auxiliary_layers.{k}.idwt.inverse."
        for f, filt in (("g0", rec_lo), ("g1", rec_hi)):
            sd[p + f + "_col"] = torch.tensor(filt).float().reshape(1, 1, -1, 1)
            sd[p + f + "_row"] = torch.tensor(filt).float().reshape(1, 1, 1, -1)
    return sd


@pytest.mark.parametrize("name", FOREIGN)
def test_release_layout_loads_strictly_and_matches_the_releases_wls(name, tmp_path):
    import torch.nn.functional as F

    arch = FOREIGN[name]
    sd = _release_state(name, arch)
    path = tmp_path / "release.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    model = build_model(name, auxt=True, **arch)
    layout = load_weights(model, torch_load(path), path)
    assert (layout.format, layout.container, layout.renames) == ("auxt-release", "state_dict",
                                                                 ("module-prefix",))
    for k in range(4):
        torch.testing.assert_close(model.g_a.auxiliary_layers[k].olp.linear.weight,
                                   sd[f"AuxT_enc.{k}.OLP.linear.weight"], rtol=0, atol=0)
    for key, value in model.state_dict().items():  # the main transforms: g_s.0... -> g_s.transform.0...
        if key.startswith("g_s.transform."):
            assert torch.equal(value, sd["g_s." + key[len("g_s.transform."):]]), key
    # the release's WLS: grouped stride-2 conv with its buffers, * exp(s), OLP; iWLS: OLP, / exp(s),
    # grouped conv_transpose with its filters (models/pywave.py, models/tcm_AuxT.py)
    x = torch.randn(2, 3, 8, 8)
    p = "AuxT_enc.0."
    bands = [F.conv2d(x, sd[p + f"dwt.{b}"].expand(3, -1, -1, -1), stride=2, groups=3)
             for b in ("w_ll", "w_lh", "w_hl", "w_hh")]
    z = torch.cat(bands, 1).flatten(2).transpose(1, 2) * sd[p + "scaling_factors"].exp()
    ref = F.linear(z, sd[p + "OLP.linear.weight"], sd[p + "OLP.linear.bias"])
    ref = ref.transpose(1, 2).reshape(2, -1, 4, 4)
    torch.testing.assert_close(model.g_a.auxiliary_layers[0](x), ref, rtol=1e-4, atol=1e-4)
    p, c = "AuxT_dec.3.", 3
    y = torch.randn(2, sd[p + "OLP.linear.weight"].shape[1], 4, 4)
    z = F.linear(y.flatten(2).transpose(1, 2), sd[p + "OLP.linear.weight"], sd[p + "OLP.linear.bias"])
    z = (z / sd[p + "scaling_factors"].exp()).transpose(1, 2).reshape(2, 4, c, 4, 4).transpose(1, 2)
    ref = F.conv_transpose2d(z.reshape(2, 4 * c, 4, 4), sd[p + "idwt.filters"].repeat(c, 1, 1, 1),
                             stride=2, groups=c)
    torch.testing.assert_close(model.g_s.auxiliary_layers[3](y), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FOREIGN)
def test_compressai_temp_layout_loads_strictly(name, tmp_path):
    sd = _temp_state(name, FOREIGN[name], seed=3)
    assert detect_format(sd) == "compressai-temp"
    model = build_model(name, auxt=True, **FOREIGN[name])
    layout = load_weights(model, {"state_dict": sd}, "temp.pt")
    assert layout.format == "compressai-temp"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, sd[key], rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["auxt-release", "compressai-temp"])
@pytest.mark.parametrize("name", FOREIGN)
def test_energylab_to_foreign_and_back_is_bit_identical(name, fmt):
    torch.manual_seed(5)
    ours = build_model(name, auxt=True, **FOREIGN[name]).state_dict()
    foreign = from_energylab(ours, fmt)
    build = _release_state if fmt == "auxt-release" else _temp_state
    expected = build(name, FOREIGN[name])
    assert set(foreign) == set(expected)
    for key in expected:  # the regenerated buffers are the foreign code's, bit for bit
        if key.endswith(("w_ll", "w_lh", "w_hl", "w_hh", "filters", "_col", "_row")):
            assert torch.equal(foreign[key], expected[key]) and foreign[key].dtype == expected[key].dtype, key
    back, found = to_energylab(foreign)
    assert found == fmt and list(back) == list(ours)
    assert all(torch.equal(back[k], ours[k]) and back[k].dtype == ours[k].dtype for k in ours)


def test_foreign_layout_mismatches_fail_in_one_line():
    arch = FOREIGN["mbt2018-mean"]
    sd = _release_state("mbt2018-mean", arch)
    with pytest.raises(CheckpointError, match=r"^x\.pt: checkpoint \(auxt-release layout\) carries AuxT but "
                       r"model .* has none$"):
        load_weights(build_model("mbt2018-mean", **arch), sd, "x.pt")
    bad = dict(sd, **{"AuxT_enc.1.dwt.w_lh": -sd["AuxT_enc.1.dwt.w_lh"]})
    with pytest.raises(CheckpointError, match=r"^x\.pt: filter buffer 'AuxT_enc\.1\.dwt\.w_lh' is not Haar"):
        load_weights(build_model("mbt2018-mean", auxt=True, **arch), bad, "x.pt")
    with pytest.raises(CheckpointError, match=r"^x\.pt: '[\w.]+' is \(8, [\d, ]+\) in the checkpoint"):
        load_weights(build_model("mbt2018-mean", auxt=True, N=16, M=12), sd, "x.pt")

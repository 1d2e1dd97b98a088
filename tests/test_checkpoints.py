"""Checkpoint layouts: energylab loads exactly what CompressAI's own loaders load, and says which."""

import pytest
import torch
from compressai.zoo.pretrained import load_pretrained

from energylab.checkpoints import CheckpointError, CheckpointLayout, load_weights, torch_load
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

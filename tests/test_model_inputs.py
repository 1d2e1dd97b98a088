"""Real-world model inputs that failed (issue 17): capture on a compiled model, and widths that do not fit.

* A probe on ``torch.compile(model)`` could not find its modules (``unwrap_model`` did not see through
  ``OptimizedModule``), and a probe on ``compiled._orig_mod`` while the forward ran through ``compiled``
  recorded 4 of 6 layers. Every kind of compiled or wrapped model must give the eager records.
* ``--model elic2022-official --M 24`` ended in a 40-line "negative dimension" traceback. Every registered
  model must refuse widths it cannot be built with in one line naming ``--N`` / ``--M`` and the rule,
  before any layer is built; the grid search that found the rules is kept as a test.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from energylab.capture import HookPoint, LatentProbe, default_layers
from energylab.models import MODELS, WidthError, build_model, has_auxt, submodule, unwrap_model

X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
"""The probe batch of the capture tests."""
LAYERS = {"g_a.stage1", "g_a.stage2", "g_a.stage3", "y", "y_hat", "y_residual"}
"""The default layers of a plain hyperprior model: the six of the issue."""


def tiny(auxt: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return build_model("bmshj2018-hyperprior", N=8, M=12, auxt=auxt).eval()


def capture(probe_model: nn.Module, forward: nn.Module) -> dict[str, dict]:
    """Records of a probe on ``probe_model`` over one forward of :data:`X` through ``forward``."""
    probe = LatentProbe(probe_model, replicates=20)
    with probe, torch.no_grad():
        forward(X)
    return {r["layer"]: r for r in probe.records(step=0)}


def assert_same_records(got: dict[str, dict], expected: dict[str, dict]) -> None:
    assert set(got) == set(expected)
    for layer, record in expected.items():
        assert set(got[layer]) == set(record), layer
        for key, value in record.items():
            other = got[layer][key]
            if isinstance(value, float) and other is not None:
                assert math.isclose(other, value, rel_tol=1e-5, abs_tol=1e-7), (layer, key, other, value)
            else:
                assert other == value, (layer, key, other, value)


@pytest.fixture(scope="module")
def eager() -> dict[str, dict]:
    model = tiny()
    return capture(model, model)


@pytest.fixture(scope="module")
def compiled() -> nn.Module:
    """``torch.compile(tiny(), backend="eager")``, compiled by one forward before any probe."""
    model = torch.compile(tiny(), backend="eager")
    with torch.no_grad():
        model(X)
    return model


def points(model: nn.Module) -> dict[str, tuple]:
    """:func:`default_layers` without the extract functions (a ``partial`` compares by identity)."""
    return {name: (p.module, p.role, p.merge) for name, p in default_layers(model).items()}


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# ---------------------------------------------------------------------------------------------
# Capture on a compiled model


def test_probe_on_a_compiled_model_records_the_eager_layers(eager, compiled):
    assert set(eager) == LAYERS
    before = graphs()
    assert_same_records(capture(compiled, compiled), eager)
    assert graphs() == before  # the probe's passes ran eagerly: nothing recompiled for the hooks
    with torch.no_grad():
        compiled(X)  # and the compiled graphs serve again after the probe
    assert graphs() == before
    assert not any(m._forward_hooks for m in compiled.modules())


def test_probe_on_the_inner_model_while_the_forward_runs_through_the_compiled_one(eager, compiled):
    assert_same_records(capture(compiled._orig_mod, compiled), eager)


def stance() -> str:
    import torch._dynamo.eval_frame as eval_frame

    return eval_frame._stance.stance


def test_compile_stance_is_restored_after_the_probe_and_after_a_refused_entry(compiled):
    before = stance()
    with LatentProbe(compiled, replicates=0):
        assert stance() == "force_eager"
    assert stance() == before
    bad = LatentProbe(compiled, layers={"nowhere": HookPoint("g_a.99")})
    with pytest.raises(ValueError, match="no module 'g_a.99'"), bad:
        pass
    assert stance() == before


@pytest.mark.parametrize("kind", ["submodule", "in-place"])
def test_probe_on_a_model_with_compiled_parts(eager, kind):
    model = tiny()
    if kind == "submodule":
        model.g_a = torch.compile(model.g_a, backend="eager")
        model.gaussian_conditional = torch.compile(model.gaussian_conditional, backend="eager")
    else:
        model.compile(backend="eager")  # nn.Module.compile: the module's own call is compiled
    with torch.no_grad():
        model(X)
    assert points(model) == points(tiny())
    assert_same_records(capture(model, model), eager)


@pytest.mark.parametrize("auxt", [False, True])
def test_wrappers_are_seen_through_in_any_nesting(auxt):
    model = tiny(auxt)
    layers = points(model)
    wrapped = {
        "compiled": torch.compile(model, backend="eager"),
        "data-parallel of compiled": nn.DataParallel(torch.compile(model, backend="eager")),
        "compiled data-parallel": torch.compile(nn.DataParallel(model), backend="eager"),
    }
    for label, net in wrapped.items():
        assert unwrap_model(net) is model, label
        assert has_auxt(net) == auxt, label
        assert points(net) == layers, label
    part = tiny(auxt)
    part.g_a = torch.compile(part.g_a, backend="eager")
    assert has_auxt(part) == auxt
    assert submodule(part, "g_a") is part.g_a._orig_mod
    first = "g_a.transform.0" if auxt else "g_a.0"
    assert submodule(part, first) is submodule(part, first.replace("g_a.", "g_a._orig_mod.")) is not None
    assert submodule(part, "g_a.99") is None
    # nothing above ran a compiled forward: a capture through the wrappers is eager from the start
    net = wrapped["data-parallel of compiled"]
    assert_same_records(capture(net, net), capture(model, model))


def test_attaching_auxt_to_a_compiled_transform_is_refused_in_one_line():
    model = tiny()
    model.g_a = torch.compile(model.g_a, backend="eager")
    from energylab.models import attach_auxt

    with pytest.raises(ValueError, match="before torch.compile") as err:
        attach_auxt(model)
    assert "\n" not in str(err.value)


@pytest.mark.slow  # inductor compiles C++ kernels: about a minute on a CPU
def test_probe_on_an_inductor_compiled_model(eager):
    model = torch.compile(tiny())  # the default backend
    with torch.no_grad():
        model(X)
    assert_same_records(capture(model, model), eager)
    assert_same_records(capture(model._orig_mod, model), eager)


# ---------------------------------------------------------------------------------------------
# Widths that do not fit

BAD_WIDTHS = {
    "bmshj2018-factorized": [(0, None, "--N"), (None, 0, "--M")],
    "bmshj2018-hyperprior": [(0, None, "--N"), (None, -3, "--M")],
    "mbt2018-mean": [(0, None, "--N"), (None, 0, "--M")],
    "mbt2018": [(-1, None, "--N"), (None, 0, "--M")],
    "cheng2020-anchor": [(0, None, "--N"), (None, 12, "--M")],  # no M at all
    "elic2022-official": [(None, 24, "--M"), (8, 128, "--M"), (1, 136, "--N")],
    "tcm": [(None, 24, "--M"), (8, 1, "--M"), (0, 10, "--N")],
}
"""Per registered model, widths that break it, and the flag its error must name."""


def test_every_registered_model_has_bad_widths_listed():
    assert set(BAD_WIDTHS) == set(MODELS)


@pytest.mark.parametrize(("name", "N", "M", "flag"),
                         [(name, *case) for name, cases in BAD_WIDTHS.items() for case in cases])
def test_bad_widths_are_refused_in_one_line_before_any_layer_is_built(name, N, M, flag, monkeypatch):
    def no_layers(*args, **kwargs):
        raise AssertionError("a layer was built before the widths were checked")

    monkeypatch.setattr(nn.Conv2d, "__init__", no_layers)
    monkeypatch.setattr(nn.Linear, "__init__", no_layers)
    with pytest.raises(ValueError) as err:
        build_model(name, N=N, M=M)
    assert isinstance(err.value, WidthError)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{flag} {N if flag == '--N' else M} does not fit {name}: "), message
    assert (err.value.field, err.value.model) == (flag[2:], name)


@pytest.mark.parametrize("value", [2.5, "24", True])
def test_widths_that_are_not_integers_are_refused(value):
    with pytest.raises(WidthError, match="--M .* must be an integer"):
        build_model("mbt2018-mean", N=8, M=value)


GRID_N = (1, 2, 3)
GRID_M = (1, 5, 24, 128, 129)
"""The grid searched for every registered model (the rules of ELIC and TCM sit inside it);
cheng2020-anchor, which has no M, gets M = None (its latent has N channels) besides."""


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_grid_builds_and_runs_or_fails_in_one_line(name):
    built = refused = 0
    for N in GRID_N:
        for M in ((None,) if name == "cheng2020-anchor" else ()) + GRID_M:
            try:
                torch.manual_seed(0)
                model = build_model(name, N=N, M=M).eval()
            except WidthError as err:
                message = str(err)
                assert "\n" not in message and message.startswith(("--N ", "--M ")), message
                refused += 1
                continue
            empty = [key for key, p in model.named_parameters() if p.numel() == 0]
            assert not empty, f"{name} N={N} M={M} built empty layers {empty[:3]}"
            with torch.no_grad():
                out = model(torch.rand(1, 3, 64, 64))
            assert out["x_hat"].shape == (1, 3, 64, 64), (name, N, M)
            assert torch.isfinite(out["likelihoods"]["y"]).all(), (name, N, M)
            built += 1
    assert built > 0
    assert (refused > 0) == (name in ("cheng2020-anchor", "elic2022-official", "tcm")), (name, refused)


def test_train_refuses_bad_widths_in_one_line(tmp_path, capsys):
    from energylab.train.__main__ import main

    status = main(["--out", str(tmp_path / "run"), "--model", "elic2022-official", "--M", "24",
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert lines == ["error: --M 24 does not fit elic2022-official: M must be at least 129 (ELIC splits y "
                     "into channel groups of 16, 16, 32, 64 and M - 128 channels)"]


@pytest.mark.slow  # starts a process
def test_python_m_train_refuses_bad_widths_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "energylab.train", "--out", str(tmp_path / "D"), "--model",
         "elic2022-official", "--M", "24"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --M 24 does not fit elic2022-official: M must be at least 129")


def test_a_compiled_models_state_dict_loads_into_a_plain_model():
    """``torch.compile`` prefixes keys with ``_orig_mod.`` (the whole model's, or a compiled
    submodule's inside the key); :mod:`energylab.checkpoints` removes them as it removes DDP's
    ``module.``."""
    from energylab.checkpoints import load_weights

    torch.manual_seed(0)
    source = build_model("bmshj2018-factorized", N=8, M=12, auxt=True)
    compiled = torch.compile(source, backend="eager")
    source.g_a = torch.compile(source.g_a, backend="eager")
    state = compiled.state_dict()
    assert any("._orig_mod." in k for k in state) and all(k.startswith("_orig_mod.") for k in state)
    target = build_model("bmshj2018-factorized", N=8, M=12, auxt=True)
    layout = load_weights(target, state, "compiled.pt", "target")
    assert "compile-prefix" in layout.renames
    plain = unwrap_model(source)
    for key, value in target.state_dict().items():
        original = plain.state_dict()[key.replace("g_a.", "g_a._orig_mod.", 1) if key.startswith("g_a.")
                                      else key]
        assert torch.equal(value, original), key

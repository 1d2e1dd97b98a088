"""Real-world inputs that failed evaluation (issue 17), each fixed as a kind:

* non-finite weights, latents, means or scales: refused before the entropy coder (which hangs on
  NaN symbols), naming the tensor; the command line records that model with nulls and a note and
  still writes the others' results;
* a state dict saved before ``update()`` loaded into an ``update()``-d model: loads, the coder
  tables rebuilt; tables of another size: one line naming every key;
* quantiles that never converged: fitted before coding by default, the gap diagnosed from the aux
  loss first;
* undefined values in JSON: ``null`` everywhere, never a bare ``NaN`` token.

Tests that would hang on a regression run under :func:`no_hang`: CompressAI's rANS coder loops in
C++ holding the GIL, so no Python-level timeout can stop it; ``faulthandler`` ends the process
with every thread's stack instead.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import energylab.evaluate
from energylab.checkpoints import CheckpointError, load_weights
from energylab.evaluate import (
    BPP_GAP_LIMIT,
    UNFITTED_AUX_LOSS,
    evaluate_model,
    fit_quantiles,
    load_images,
    run_record,
)
from energylab.evaluate.__main__ import main as evaluate_main
from energylab.models import build_model
from energylab.rundir import RunDir

HANG_S = int(os.environ.get("ENERGYLAB_TEST_HANG_S", "180"))
"""Seconds after which a test that should take a few is taken to hang (the process is ended)."""
NonFiniteError = getattr(energylab.evaluate, "NonFiniteError", energylab.evaluate.EvaluationError)
"""(Its base class where it is missing, so that the code before it fails by what it does.)"""
TINY = {"N": 8, "M": 12}
ARCH = ["--model", "bmshj2018-hyperprior", "--N", "8", "--M", "12"]


@pytest.fixture
def no_hang(request):
    """End the process after :data:`HANG_S` with every thread's stack on the real stderr."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # pytest's capture would swallow the stacks
        stderr = os.fdopen(os.dup(sys.__stderr__.fileno()), "w")
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
    stderr.close()


def _strict(text: str):
    """``json.loads`` that refuses ``NaN`` / ``Infinity`` tokens (as strict parsers do)."""
    def refuse(token):
        raise ValueError(f"bare {token} token")

    return json.loads(text, parse_constant=refuse)


def _strict_file(path: Path) -> list:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [_strict(line) for line in text.splitlines() if line.strip()]
    return [_strict(text)]


@pytest.fixture
def images_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _hyperprior(seed=0):
    torch.manual_seed(seed)
    model = build_model("bmshj2018-hyperprior", **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fit_quantiles(model)
    return model


def _with_nan(model, key, index=3, value=float("nan")):
    sd = model.state_dict()
    t = sd[key].clone()
    t.view(-1)[index] = value
    sd[key] = t
    return sd


# ---------------------------------------------------------------------------------------------
# 1. Non-finite weights, latents, means, scales


@pytest.mark.parametrize("key", ["g_a.0.weight", "entropy_bottleneck.quantiles", "h_s.0.bias"])
def test_a_non_finite_weight_is_refused_naming_it_before_coding(key, images_dir, no_hang):
    model = _hyperprior()
    model.load_state_dict(_with_nan(model, key))
    refused = rf"model has non-finite weights, not coded: {key} \(1 NaN of"
    with pytest.raises(NonFiniteError, match=refused) as e:
        evaluate_model(model, load_images(str(images_dir)))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("layer", "argument"), [
    ("g_a", r"x of entropy_bottleneck\.compress\(\)"),  # the latents z (and so y) overflow
    ("h_s", r"scales of gaussian_conditional\.build_indexes\(\)"),  # y finite, its scales not
], ids=["latents", "scales"])
def test_non_finite_latents_or_scales_are_refused_before_the_coder(layer, argument, images_dir, no_hang):
    model = _hyperprior()
    with torch.no_grad():  # finite weights whose outputs overflow float32
        transform = getattr(model, layer)
        transform[0].bias.fill_(1e38)
        transform[2].weight.fill_(1e38)
    with pytest.raises(NonFiniteError, match=rf"image a\.png: {argument} has \d+ (NaN|infinite)"):
        evaluate_model(model, load_images(str(images_dir)))


def test_analyze_bitstream_refuses_non_finite_weights(images_dir, no_hang):
    from energylab.analyze import analysis_images, analyze_model

    model = _hyperprior()
    model.load_state_dict(_with_nan(model, "g_a.0.weight"))
    with pytest.raises(NonFiniteError, match=r"g_a\.0\.weight \(1 NaN"):
        analyze_model(model, analysis_images(str(images_dir)), bitstream=True)


def _evaluate_cli(tmp_path, images_dir, bad_key, capsys):
    good = tmp_path / "good.pt"
    bad = tmp_path / "bad.pt"
    model = _hyperprior()
    torch.save(model.state_dict(), good)
    torch.save(_with_nan(model, bad_key), bad)
    out = tmp_path / "o.json"
    rc = evaluate_main([str(good), str(bad), "--data", str(images_dir), "--out", str(out), "--per-image",
                        *ARCH])
    err = capsys.readouterr().err
    return rc, err, out, bad


@pytest.mark.parametrize("bad_key", ["entropy_bottleneck.quantiles", "g_a.0.weight"])
def test_cli_writes_the_good_models_results_and_nulls_for_the_bad(bad_key, tmp_path, images_dir, capsys,
                                                                 no_hang):
    rc, err, out, bad = _evaluate_cli(tmp_path, images_dir, bad_key, capsys)
    assert rc == 2  # bad input (energylab.cli), reported after the results are written
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"{bad}: not evaluated" in lines[0] and bad_key in lines[0] and str(out) in lines[0]
    (data,) = _strict_file(out)
    for key, (good_value, bad_value) in data["results"].items():
        assert good_value is not None or key == "ms-ssim-rgb", key  # 64 px images: no MS-SSIM
        assert bad_value is None, key
    assert data["results"]["bpp"][0] > 0
    good_run, bad_run = data["runs"]
    assert "not-evaluated" not in good_run
    assert bad_key in bad_run["not-evaluated"]
    assert bad_run["notes"] == [f"not evaluated: {bad_run['not-evaluated']}"]
    assert data["per_image"][1] is None and len(data["per_image"][0]) == 2
    assert [i["name"] for i in data["images"]] == ["a.png", "b.png"]


# ---------------------------------------------------------------------------------------------
# 2. A state dict saved before update()

CODER = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def _updated_model():
    torch.manual_seed(5)
    model = build_model("bmshj2018-hyperprior", **TINY)
    model.update(force=True)
    return model


@pytest.mark.parametrize("saved", ["empty tables", "no tables"])
def test_a_state_dict_saved_before_update_loads_into_an_updated_model(saved):
    trained = _hyperprior()
    sd = trained.state_dict()  # before update(): tables of shape (0,)
    assert sd["entropy_bottleneck._quantized_cdf"].shape == (0,)
    if saved == "no tables":
        sd = {k: v for k, v in sd.items() if not k.endswith(CODER)}
    model = _updated_model()
    layout = load_weights(model, sd, "pre-update.pt")
    assert layout.rebuilt == ("entropy_bottleneck", "gaussian_conditional")
    assert "rebuilt" in str(layout) and layout.as_dict()["rebuilt"] == list(layout.rebuilt)
    reference = copy.deepcopy(trained)  # CompressAI's way: a fresh model loads it, then update()
    reference.update(force=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        enc = model.compress(x)
        torch.testing.assert_close(model.decompress(enc["strings"], enc["shape"])["x_hat"],
                                   reference.decompress(*reference.compress(x).values())["x_hat"])


def test_coder_tables_of_another_size_name_every_key_and_the_fix():
    trained = _hyperprior()
    trained.update(force=True)
    sd = dict(trained.state_dict())
    sd["entropy_bottleneck._quantized_cdf"] = torch.zeros(3, 5, dtype=torch.int32)
    sd["gaussian_conditional._quantized_cdf"] = torch.zeros(2, 7, dtype=torch.int32)
    sd["gaussian_conditional._offset"] = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(CheckpointError) as e:
        load_weights(_updated_model(), sd, "other.pt")
    message = str(e.value)
    assert "\n" not in message and message.startswith("other.pt: does not load into model ScaleHyperprior")
    for key, shape in (("entropy_bottleneck._quantized_cdf", "(3, 5) vs (8, "),
                       ("gaussian_conditional._quantized_cdf", "(2, 7) vs (64, "),
                       ("gaussian_conditional._offset", "(2) vs (64)")):
        assert f"{key} {shape}" in message, key
    assert "freshly built model" in message and "update()" in message


# ---------------------------------------------------------------------------------------------
# 3. Quantiles that never converged


def _unconverged():
    """A factorized model whose entropy bottleneck learned its latents' density but whose
    quantiles never left their initial region (as without the aux optimiser): real bpp ~40 %
    above the estimate, aux loss ~12 per quantile; and two images."""
    torch.manual_seed(1)
    model = build_model("bmshj2018-factorized", **TINY).eval()
    initial = model.entropy_bottleneck.quantiles.detach().clone()
    with torch.no_grad():
        model.g_a[-1].weight.mul_(30)  # latents of a few units
        m0 = model.entropy_bottleneck.matrices[0]  # a density 30x narrower, about their width
        m0.copy_(torch.log(torch.expm1(torch.nn.functional.softplus(m0) * 30)))
        model.entropy_bottleneck.quantiles.copy_(initial * 0.1)
    g = torch.Generator().manual_seed(0)
    return model, [(f"i{i}", torch.rand(3, 64, 64, generator=g)) for i in range(2)]


def test_unconverged_quantiles_are_fitted_before_coding_by_default():
    model, images = _unconverged()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no bpp gap left to warn about
        averages, rows = evaluate_model(model, images)
    record = run_record(rows)
    assert record["quantiles-fitted"] is True
    assert record["aux-loss-as-trained"] > UNFITTED_AUX_LOSS and record["aux-loss"] < 1e-3
    assert record["notes"][0].startswith("quantiles fitted before coding, not converged (aux_loss 1")
    assert record["max-abs-bpp-gap"] < BPP_GAP_LIMIT


def test_unconverged_quantiles_coded_as_trained_are_blamed_first():
    model, images = _unconverged()
    with pytest.warns(RuntimeWarning, match=r"likely cause: the entropy bottleneck's quantiles are not "
                                            r"converged \(aux_loss 1\d\.\d per quantile > 1\)"):
        _, rows = evaluate_model(model, images, fit=False)
    record = run_record(rows)
    assert record["quantiles-fitted"] is False and record["max-abs-bpp-gap"] > BPP_GAP_LIMIT
    assert record["notes"][0].startswith("quantiles not converged (aux_loss 1")


def test_a_converged_model_is_coded_as_trained(images_dir):
    images = load_images(str(images_dir))
    model = _hyperprior()
    default, rows = evaluate_model(copy.deepcopy(model), images)
    as_trained, _ = evaluate_model(copy.deepcopy(model), images, fit=False)
    keys = ("bpp", "bpp-estimated", "psnr-rgb")
    assert {k: default[k] for k in keys} == {k: as_trained[k] for k in keys}
    assert run_record(rows)["quantiles-fitted"] is False and not rows[0].get("model-notes")


def test_cli_fit_flags(tmp_path, capsys):
    model, images = _unconverged()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, x in images:
        Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
    weights = tmp_path / "unconverged.pt"
    torch.save(model.state_dict(), weights)
    arch = ["--model", "bmshj2018-factorized", "--N", "8", "--M", "12", "--data", str(folder)]
    fitted = {}
    for flag in ([], ["--fit-quantiles"], ["--no-fit-quantiles"]):
        out = tmp_path / f"o{len(fitted)}.json"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert evaluate_main([str(weights), "--out", str(out), *arch, *flag]) == 0
        (run,) = _strict_file(out)[0]["runs"]
        fitted[" ".join(flag)] = run["quantiles-fitted"]
    assert fitted == {"": True, "--fit-quantiles": True, "--no-fit-quantiles": False}
    with pytest.raises(SystemExit):
        evaluate_main([str(weights), "--out", "x.json", *arch, "--fit-quantiles", "--no-fit-quantiles"])
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 4. Undefined is null in every JSON file


def test_json_safe_maps_every_non_finite_kind_to_null():
    from energylab.rundir import json_safe, to_json

    nan, inf = float("nan"), float("inf")
    value = {"py": nan, "inf": -inf, "np": np.float32("nan"), "np64": np.float64(inf),
             "array": np.array([1.0, nan]), "tensor": torch.tensor([nan, 2.0]),
             "scalar": torch.tensor(inf),
             "fine": [1, 2.5, np.int64(3), True, None, "NaN", (np.float32(0.5),)]}
    assert json_safe(value) == {"py": None, "inf": None, "np": None, "np64": None, "array": [1.0, None],
                                "tensor": [None, 2.0], "scalar": None,
                                "fine": [1, 2.5, 3, True, None, "NaN", [0.5]]}
    assert _strict(to_json(value)) == json_safe(value)


def test_readers_take_legacy_nan_tokens_as_null(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / RunDir.ENERGY).write_text('{"step": 1, "layer": "g_a.aux1", "aux_energy_share": NaN}\n')
    (tmp_path / RunDir.BITSTREAM).write_text('{"results": {"bpp": 0.5, "psnr-rgb": Infinity}}\n')
    assert run.energy() == [{"step": 1, "layer": "g_a.aux1", "aux_energy_share": None}]
    assert run.bitstream() == {"bpp": 0.5, "psnr-rgb": None}


def test_summary_reads_null_losses():
    from energylab.summary import CellLogs, format_json, summarize

    evals = [{"step": s, "loss": loss, "bpp": 0.1, "psnr": 20.0, "wall_time": float(s)}
             for s, loss in ((0, 2.0), (2, None), (4, 1.0))]
    result = summarize({("baseline", None, 0): CellLogs(evals=evals, energy=[])}, ["baseline"], [0], 0.01)
    _strict(format_json(result))


def test_a_degenerate_auxt_model_writes_strict_json_everywhere(tmp_path, images_dir, monkeypatch, capsys):
    """AuxT with every g_a parameter zero (and frozen): ``aux_energy_share`` is 0/0."""
    import energylab.figures
    import energylab.train
    from energylab.ablate.__main__ import main as ablate_main
    from energylab.analyze import analyze

    build = energylab.train.build_model

    def degenerate(*args, **kwargs):
        model = build(*args, **kwargs)
        with torch.no_grad():
            for p in model.g_a.parameters():
                p.zero_()
                p.requires_grad_(False)
        return model

    monkeypatch.setattr(energylab.train, "build_model", degenerate)
    monkeypatch.setattr(energylab.figures, "ablation_figures", lambda root: [])  # no JSON in them
    root = tmp_path / "ablation"
    assert ablate_main(["--out", str(root), "--seeds", "0", "--steps", "1", "--eval-every", "1",
                        "--capture-every", "1", "--log-every", "1", "--N", "8", "--M", "12",
                        "--batch-size", "1", "--patch-size", "64", "--test-size", "64",
                        "--probe-count", "2", "--probe-size", "64"]) == 0
    cell = root / "auxt" / "seed0"
    analyze([cell], str(images_dir), tmp_path / "analysis", bitstream=True, limit=1, figures=False)
    assert evaluate_main([str(cell), "--data", str(images_dir), "--out", str(tmp_path / "evaluated.json"),
                          "--per-image"]) == 0
    capsys.readouterr()
    files = sorted(tmp_path.rglob("*.json*"))  # the ablation, the analysis, the evaluation
    assert {p.name for p in files} >= {"energy.jsonl", "bitstream.json", "summary.json", "analysis.json",
                                       "evaluated.json", "config.json", "metrics.jsonl", "eval.jsonl"}
    bad = []
    for path in files:
        try:
            _strict_file(path)
        except ValueError as err:  # a bare NaN / Infinity token
            bad.append(f"{path.relative_to(tmp_path)}: {err}")
    assert not bad
    shares = [r["aux_energy_share"] for r in RunDir(cell).energy() if "aux_energy_share" in r]
    assert shares and all(s is None for s in shares)  # 0 / 0: undefined, null
    summary = _strict_file(root / "summary.json")[0]
    auxt = next(c for c in summary["cells"] if c["variant"] == "auxt")
    assert auxt["aux_share_1"] is None and not any(isinstance(v, float) and not math.isfinite(v)
                                                   for v in auxt.values())


def test_evaluation_folder_names_not_utf8_and_bad_links(tmp_path):
    """Found by a newcomer: ``evaluate`` listed its folder on its own (a dangling link skipped
    silently, a non-UTF-8 name written as a lone surrogate); it reads the folder as training does."""
    import os
    import warnings

    from PIL import Image

    from energylab.data import DataWarning
    from energylab.evaluate import image_conversions, load_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(folder / "good.png")
    Image.new("RGB", (64, 64), (30, 20, 10)).save(os.path.join(os.fsencode(folder), b"bad\xff.png"))
    os.symlink(folder / "nowhere.png", folder / "dangling.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = load_images(str(folder))
    names = [name for name, _ in images]
    assert names == ["bad\\xff.png", "good.png"]
    assert any(issubclass(w.category, DataWarning) and "dangling.png" in str(w.message) for w in caught)
    json.dumps(names, ensure_ascii=False).encode("utf-8")  # no lone surrogate
    assert set(image_conversions(str(folder))) == set(names)

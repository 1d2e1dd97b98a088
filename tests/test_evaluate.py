"""Real-bitstream evaluation: bytes -> bpp, cropping, the results JSON and checkpoint loading."""

import copy
import json
import math
import re
import runpy
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compressai.ops import compute_padding
from PIL import Image
from torch import nn

from energylab.config import TrainConfig
from energylab.data import load_image, pad_to_multiple
from energylab.evaluate import (
    BPP_GAP_LIMIT,
    RESULT_KEYS,
    UNFITTED_AUX_LOSS,
    EvaluationError,
    architecture_label,
    aux_loss_per_quantile,
    check_image,
    evaluate_image,
    evaluate_model,
    fit_quantiles,
    load_images,
    load_model,
    run_record,
)
from energylab.evaluate.__main__ import main
from energylab.models import build_model, has_auxt
from energylab.rundir import RunDir

TINY = {"model": "bmshj2018-hyperprior", "N": 8, "M": 12}
SIZES = {"a.png": (64, 64), "b.png": (50, 70)}  # H x W; 50 x 70 is not a multiple of 64


def _build(arch):
    kwargs = {k: v for k, v in arch.items() if k != "model"}
    return build_model(arch["model"], **kwargs)


def _trained_like(arch, seed=1):
    """A model whose weights differ from any fresh initialisation (so loading is visible)."""
    torch.manual_seed(seed)
    model = _build(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fit_quantiles(model)  # as the aux optimiser would have after training
    return model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    skip = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")
    keys = [k for k in sa if not k.endswith(skip)]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in keys)


@pytest.fixture
def images_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        smooth = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        noisy = smooth * 0.7 + rng.uniform(0, 76, (h, w, 3))
        Image.fromarray(noisy.astype(np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as ``energylab.train`` writes it: config + final model."""
    run = RunDir(tmp_path / "run")
    config = TrainConfig(out=run.path, lmbda=0.01, steps=3, **TINY)
    run.write_config(config, {"device": "cpu"})
    model = _trained_like(TINY)
    run.save_final({"model": model.state_dict(), "step": 3, "config": run.config()})
    return run.path, model


def _compress_bytes(model, x, padding="compressai"):
    if padding == "replicate":
        padded, _ = pad_to_multiple(x.unsqueeze(0), 64)
    else:  # compressai.utils.eval_model's inference(): centred zeros
        pad, _ = compute_padding(*x.shape[-2:], min_div=64)
        padded = F.pad(x.unsqueeze(0), pad, mode="constant", value=0)
    with torch.no_grad():
        enc = model.compress(padded)
    return sum(len(s) for strings in enc["strings"] for s in strings), enc, padded


# ---------------------------------------------------------------------------------------------
# Measurements


@pytest.mark.parametrize("padding", ["compressai", "replicate"])
@pytest.mark.parametrize("arch", [TINY, {"model": "mbt2018-mean", "N": 8, "M": 12}], ids=lambda a: a["model"])
def test_bpp_is_bytes_times_8_over_original_pixels(arch, padding, images_dir):
    model = _trained_like(arch).eval()
    images = load_images(str(images_dir))
    averages, rows = evaluate_model(model, images, padding=padding)
    for (name, x), row in zip(images, rows, strict=True):
        h, w = SIZES[name]
        assert row["padding"] == padding
        n_bytes, enc, padded = _compress_bytes(model, x, padding)  # after evaluate_model's update()
        assert row["image"] == name
        assert (row["height"], row["width"]) == (h, w)
        assert row["bytes"] == n_bytes > 0
        assert row["bpp"] == n_bytes * 8 / (h * w)
        with torch.no_grad():
            likelihoods = model(padded)["likelihoods"].values()
        estimated = sum(-torch.log2(lk).sum().item() for lk in likelihoods) / (h * w)
        assert row["bpp-estimated"] == pytest.approx(estimated, rel=1e-5)
    assert averages["bpp"] == pytest.approx(sum(r["bpp"] for r in rows) / len(rows), rel=1e-12)


def test_psnr_is_on_the_cropped_8_bit_reconstruction(images_dir):
    model = _trained_like(TINY).eval()
    images = load_images(str(images_dir))
    _, rows = evaluate_model(model, images, padding="replicate")
    for (name, x), row in zip(images, rows, strict=True):
        _, enc, _ = _compress_bytes(model, x, "replicate")
        with torch.no_grad():
            x_hat = model.decompress(enc["strings"], enc["shape"])["x_hat"]
        h, w = SIZES[name]
        assert x_hat.shape[-2:] != (h, w) or name == "a.png"  # 50 x 70 really was padded
        rec = (x_hat[0, :, :h, :w] * 255).clamp(0, 255).round().double()
        org = (x * 255).round().double()
        mse = (org - rec).pow(2).mean().item()
        assert row["psnr-rgb"] == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-9)
        assert row["encoding_time"] > 0 and row["decoding_time"] > 0


def test_ms_ssim_needs_161_pixels_per_side(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, (h, w) in {"big.png": (161, 170), "small.png": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    averages, rows = evaluate_model(_trained_like(TINY).eval(), load_images(str(folder)))
    big, small = rows
    assert 0 < big["ms-ssim-rgb"] <= 1
    assert small["ms-ssim-rgb"] is None
    assert averages["ms-ssim-rgb"] is None  # not an average over a subset of the images
    assert averages["psnr-rgb"] is not None


def test_no_images_is_an_error():
    with pytest.raises(EvaluationError, match="no images"):
        evaluate_model(_build(TINY), [])


# ---------------------------------------------------------------------------------------------
# Loading


def _save_forms(tmp_path, run, model):
    sd = model.state_dict()
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    forms = {
        "run directory": (run, None),
        "final.pt": (RunDir(run).final_path, None),
        "plain state dict": (sd, TINY),
        "nested state_dict": ({"state_dict": sd, "epoch": 3}, TINY),
        "module. prefix": (prefixed, TINY),
        "nested with prefix": ({"state_dict": prefixed}, TINY),
    }
    paths = {}
    for label, (obj, arch) in forms.items():
        if isinstance(obj, dict):
            path = tmp_path / f"{label.replace(' ', '_')}.pth.tar"
            torch.save(obj, path)
            obj = path
        paths[label] = (obj, arch)
    return paths


def test_load_every_checkpoint_form(tmp_path, run_dir):
    run, trained = run_dir
    for label, (path, arch) in _save_forms(tmp_path, run, trained).items():
        model, used = load_model(path, arch)
        assert _same_weights(model, trained), label
        assert not model.training, label
        assert used["model"] == "bmshj2018-hyperprior" and used["M"] == 12, label


def test_run_directory_falls_back_to_checkpoint_pt(run_dir):
    run, trained = run_dir
    final = torch.load(RunDir(run).final_path, weights_only=True)
    (RunDir(run).final_path).unlink()
    state = {
        "model": final["model"],
        "optimizer": {},
        "step": 2,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        "config": final["config"],
    }
    torch.save(state, RunDir(run).checkpoint_path)
    model, _ = load_model(run)
    assert _same_weights(model, trained)
    model, _ = load_model(RunDir(run).checkpoint_path)
    assert _same_weights(model, trained)


def test_auxt_run_directory(tmp_path):
    arch = {**TINY, "auxt": True, "remove": ["scaling"], "wavelet": "haar"}
    run = RunDir(tmp_path / "auxt_run")
    run.write_config(TrainConfig(out=run.path, **arch), {})
    trained = _trained_like(arch)
    run.save_final({"model": trained.state_dict(), "step": 1, "config": run.config()})
    model, used = load_model(run.path)
    assert has_auxt(model) and _same_weights(model, trained)
    assert architecture_label(used) == "bmshj2018-hyperprior+auxt-no-scaling"
    x = torch.rand(3, 64, 64)
    (row,) = evaluate_model(model, [("x", x)])[1]
    assert row["bytes"] == _compress_bytes(model, x)[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda sd: sd,  # loaded as M=16 instead of 12
            r"'g_a.6.weight' is \(12, 8, 5, 5\) in the checkpoint but \(16, 8, 5, 5\) in model "
            r"bmshj2018-hyperprior N=8 M=16",
        ),
        (
            lambda sd: {k: v for k, v in sd.items() if k != "h_s.0.bias"},
            r"checkpoint lacks 'h_s.0.bias' \(8\)",
        ),
        (
            lambda sd: {**sd, "extra.weight": torch.zeros(2), "extra.bias": torch.zeros(2)},
            r"checkpoint has 'extra.weight' \(and 1 more\), which model",
        ),
    ],
    ids=["shape", "missing", "unexpected"],
)
def test_mismatch_is_one_line_naming_the_key(tmp_path, change, message):
    sd = change(_trained_like(TINY).state_dict())
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    arch = {**TINY, "M": 16} if "12, 8" in message else TINY
    with pytest.raises(EvaluationError, match=message) as info:
        load_model(path, arch)
    assert "\n" not in str(info.value)


def test_plain_state_dict_needs_an_architecture(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(_trained_like(TINY).state_dict(), path)
    with pytest.raises(EvaluationError, match="plain state dict; give its architecture"):
        load_model(path)


def test_config_and_architecture_flags_conflict(run_dir):
    with pytest.raises(EvaluationError, match="carries its own architecture"):
        load_model(run_dir[0], TINY)


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_compressai_schema(tmp_path, images_dir, run_dir, capsys):
    run, _ = run_dir
    out = tmp_path / "out" / "results.json"
    rc = main([str(run), str(RunDir(run).final_path), "--data", str(images_dir), "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["name"] == "bmshj2018-hyperprior"
    assert "Inference" in data["description"]
    assert list(data["results"]) == list(RESULT_KEYS)
    assert all(len(v) == 2 for v in data["results"].values())  # one point per RUN
    assert data["results"]["bpp"][0] == data["results"]["bpp"][1]  # same weights, same bits
    assert [r["path"] for r in data["runs"]] == [str(run), str(RunDir(run).final_path)]
    assert data["images"] == [
        {"name": n, "height": SIZES[n][0], "width": SIZES[n][1], "conversion": "RGB: 8-bit values / 255"}
        for n in sorted(SIZES)
    ]  # sizes and conversions recorded without --per-image
    assert all(r["padding"] == "compressai" for r in data["runs"])
    assert "per_image" not in data

    from compressai.utils.plot.__main__ import parse_json_file

    curve = parse_json_file(out, "psnr")
    assert curve["xs"] == data["results"]["bpp"]
    assert curve["ys"] == data["results"]["psnr-rgb"]


def test_cli_plain_state_dict_per_image(tmp_path, images_dir, capsys):
    plain = tmp_path / "plain.pt"
    model = _trained_like(TINY, seed=2)
    torch.save(model.state_dict(), plain)
    out = tmp_path / "results.json"
    args = ["--model", "bmshj2018-hyperprior", "--N", "8", "--M", "12"]
    rc = main([str(plain), "--data", str(images_dir), "--out", str(out), "--per-image", *args])
    assert rc == 0
    data = json.loads(out.read_text())
    (rows,) = data["per_image"]
    assert [r["image"] for r in rows] == sorted(SIZES)
    model.eval().update(force=True)
    expected, _, _ = _compress_bytes(model, load_image(images_dir / "b.png"), rows[1]["padding"])
    assert rows[1]["bytes"] == expected
    assert data["results"]["bpp"] == [sum(r["bpp"] for r in rows) / 2]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{tmp}/missing.pt"], "missing.pt: no such file or run directory"),
        (["{tmp}/garbage.pt"], "garbage.pt: not a "),
        (["{tmp}/sd.pt"], "plain state dict; give its architecture with --model"),
        (
            ["{tmp}/sd.pt", "--model", "bmshj2018-hyperprior", "--N", "16", "--M", "12"],
            r"'entropy_bottleneck.quantiles' is \(8, 1, 3\) in the checkpoint but \(16, 1, 3\)",
        ),
        (["{tmp}/sd.pt", "--model", "cheng2020-anchor", "--N", "8", "--M", "12"], "cannot build"),
        (["{tmp}/sd.pt", "--N", "8"], "--N describe a plain state dict's model; add --model"),
        (["{tmp}/empty"], "empty is not a run directory"),
        (["{tmp}/sd.pt", "--data", "{tmp}/empty"], "empty: no image files"),
        (["{tmp}/sd.pt", "--data", "{tmp}/nowhere"], "nowhere: no such folder"),
        (["{tmp}/sd.pt", "--device", "nonsense"], "--device nonsense"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, images_dir, capsys, argv, message):
    torch.save(_trained_like(TINY).state_dict(), tmp_path / "sd.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--data" not in argv:
        argv += ["--data", str(images_dir)]
    rc = main([*argv, "--out", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.filterwarnings("ignore:'energylab.evaluate' found in sys.modules:RuntimeWarning")
def test_module_entry_point(tmp_path, monkeypatch, capsys):
    argv = ["energylab.evaluate", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        runpy.run_module("energylab.evaluate", run_name="__main__", alter_sys=True)
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


# ---------------------------------------------------------------------------------------------
# Inputs that used to pass silently (issue 9, item 6)


def _photo(h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.1, 0.9, w).expand(3, h, w)
    return (0.7 * ramp + 0.3 * torch.rand(3, h, w, generator=g)).clamp(0, 1)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (_photo() * 255, r"photo: values in \[\d.*, 2\d\d.*\], outside \[0, 1\] \(multiplied by 255\?\)"),
        (_photo() / 255, r"photo: values in \[.*\], brightest at most 1/255 \(divided by 255 twice\?\)"),
        (_photo() - 0.5, r"image photo: values in \[-.*\], outside \[0, 1\]"),
        (torch.where(torch.rand(3, 64, 64) < 0.01, torch.nan, _photo()), "image photo: contains NaN"),
        (_photo()[None], r"image photo: expected a \(3, H, W\) tensor, got \(1, 3, 64, 64\)"),
        ((_photo() * 255).to(torch.uint8), r"image photo: dtype torch.uint8; expected floats in \[0, 1\]"),
    ],
    ids=["times-255", "divided-by-255-twice", "negative", "nan", "batched", "uint8"],
)
def test_images_off_the_0_1_scale_are_refused(x, message):
    model = _trained_like(TINY)
    with pytest.raises(EvaluationError, match=message) as info:
        evaluate_model(model, [("fine", _photo()), ("photo", x)])
    assert "\n" not in str(info.value)
    with pytest.raises(EvaluationError, match=message):
        evaluate_image(model, x, name="photo")
    check_image("black", torch.zeros(3, 8, 8))  # an all-black image is a valid image


class _NearlyLossless(nn.Module):
    """A stand-in codec: 2 bytes per image, reconstruction off by one 8-bit step in one pixel."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def update(self, force=False):
        return True

    def compress(self, x):
        self.sent = x.clone()
        return {"strings": [[b"ab"]], "shape": x.shape[-2:]}

    def decompress(self, strings, shape):
        x_hat = self.sent.clone()
        step = 1 / 255 if x_hat[0, 0, 0, 0] < 0.5 else -1 / 255
        x_hat[0, 0, 0, 0] = (x_hat[0, 0, 0, 0] * 255).round() / 255 + step
        return {"x_hat": x_hat}

    def forward(self, x):
        return {"x_hat": x, "likelihoods": {"y": torch.full((1, 1, 4, 4), 0.5)}}


def test_implausible_psnr_at_tiny_rate_is_flagged():
    x = (_photo() * 255).round() / 255
    with pytest.warns(RuntimeWarning, match=r"image photo: implausible: PSNR 89\.0 dB at 0\.0039 bpp"):
        _, (row,) = evaluate_model(_NearlyLossless(), [("photo", x)])
    expected_psnr = 10 * math.log10(255**2 * 3 * 64 * 64)  # one pixel off by 1 of 3 x 64 x 64 values
    assert row["psnr-rgb"] == pytest.approx(expected_psnr, rel=1e-12)
    assert row["bpp"] == 16 / 4096
    assert any(note.startswith("implausible: PSNR 89.0 dB") for note in row["notes"])


def test_dataparallel_model_is_evaluated_like_the_model():
    torch.manual_seed(0)
    model = build_model("bmshj2018-factorized", N=16, M=24, auxt=True)
    fit_quantiles(model)
    images = [("photo", _photo())]
    plain, _ = evaluate_model(model, images)
    wrapped, _ = evaluate_model(nn.DataParallel(model), images)
    assert {k: wrapped[k] for k in ("bpp", "psnr-rgb", "bpp-estimated")} == {
        k: plain[k] for k in ("bpp", "psnr-rgb", "bpp-estimated")
    }


def _entropy_trained_factorized(images, steps=150):
    """A factorized model whose entropy bottleneck has learned its latents' density (only the
    density is trained: fast), quantiles fitted."""
    torch.manual_seed(0)
    model = build_model("bmshj2018-factorized", N=16, M=24)
    with torch.no_grad():
        y = torch.cat([model.g_a(x[None]) for _, x in images])
    eb = model.entropy_bottleneck
    opt = torch.optim.Adam([p for n, p in eb.named_parameters() if n != "quantiles"], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        _, likelihoods = eb(y)
        (-torch.log2(likelihoods).mean()).backward()
        opt.step()
    fit_quantiles(model)
    return model


def test_latents_wider_than_the_learned_density_are_flagged_with_the_cause():
    images = [("a", _photo(128, 128, 1)), ("b", _photo(128, 128, 2))]
    model = _entropy_trained_factorized(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model as trained: no warning
        _, rows = evaluate_model(copy.deepcopy(model), images)
    assert all(r["escape-share"] == 0 for r in rows)
    with torch.no_grad():  # latents x40, decoder compensates: same reconstruction, wider latents
        model.g_a[-1].weight.mul_(40)
        model.g_a[-1].bias.mul_(40)
        model.g_s[0].weight.div_(40)
    with pytest.warns(RuntimeWarning, match="off the estimate .* outside its quantile range") as record:
        _, rows = evaluate_model(model, images)
    assert len(record) == 2
    for row in rows:
        assert row["bpp-gap"] == pytest.approx(row["bpp"] / row["bpp-estimated"] - 1, rel=1e-12)
        assert abs(row["bpp-gap"]) > BPP_GAP_LIMIT
        assert row["escape-share"] > 0.01
        assert any("likely cause" in note for note in row["notes"])
    assert run_record(rows)["max-abs-bpp-gap"] == max(abs(r["bpp-gap"]) for r in rows)


def test_fit_quantiles_minimises_aux_loss():
    torch.manual_seed(0)
    model = build_model("bmshj2018-factorized", N=8, M=12)
    eb = model.entropy_bottleneck
    assert aux_loss_per_quantile(model) > UNFITTED_AUX_LOSS  # CompressAI's initial quantiles
    with torch.no_grad():
        before = eb.quantiles.clone()
    assert fit_quantiles(model) < 1e-3
    with torch.no_grad():
        assert float(model.aux_loss()) / eb.quantiles.numel() < 1e-3
        # the CDF at the fitted quantiles is tail_mass / 2, 1/2 and 1 - tail_mass / 2
        cdf = torch.sigmoid(eb._logits_cumulative(eb.quantiles, stop_gradient=True))
        tail = eb.tail_mass
        target = torch.tensor([tail / 2, 0.5, 1 - tail / 2]).view(1, 1, 3).expand_as(cdf)
        torch.testing.assert_close(cdf.double(), target.double(), rtol=1e-3, atol=tail / 2 * 1e-2)
    assert not torch.equal(before, eb.quantiles)
    _, rows = evaluate_model(model, [("photo", _photo())], fit=True)
    assert rows[0]["quantiles-fitted"] is True and rows[0]["aux-loss"] < 1e-3


@pytest.mark.parametrize("arch", ["bmshj2018-factorized", "bmshj2018-hyperprior"])
def test_decoder_with_other_entropy_parameters_is_caught(arch):
    torch.manual_seed(0)
    model = build_model(arch, N=8, M=12)
    fit_quantiles(model)
    images = [("photo", _photo())]
    _, (same,) = evaluate_model(model, images)
    assert same["latent-errors"] == 0 and 0 < same["latent-max-abs-error"] <= 0.5
    decoder = copy.deepcopy(model)
    with torch.no_grad():  # the decoder's density (factorized) or scale network (hyperprior) differs
        if arch == "bmshj2018-factorized":
            decoder.entropy_bottleneck.biases[0].add_(3.0)
        else:
            decoder.h_s[-2].bias.add_(2.0)
    with pytest.warns(RuntimeWarning, match=r"decoder's y_hat differs from the encoder's latent: \d+ values"):
        _, (other,) = evaluate_model(model, images, decoder=decoder)
    assert other["latent-errors"] > 0 and other["latent-max-abs-error"] > 0.5
    assert run_record([other])["latent-errors"] == other["latent-errors"]


def test_conversions_small_image_notes_and_sizes_in_the_json(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "a_rgba.png")
    rgb = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(folder / "b_cmyk.tif")
    plain = tmp_path / "plain.pt"
    torch.save(_trained_like(TINY).state_dict(), plain)
    out = tmp_path / "results.json"
    arch = ["--model", TINY["model"], "--N", "8", "--M", "12"]
    rc = main([str(plain), "--data", str(folder), "--out", str(out), *arch])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["images"] == [
        {"name": "a_rgba.png", "height": 64, "width": 64,
         "conversion": "RGBA: alpha composited over white, rgb * alpha + (1 - alpha)"},
        {"name": "b_cmyk.tif", "height": 64, "width": 128,
         "conversion": "CMYK: converted to RGB by Pillow (Image.convert('RGB'))"},
    ]
    notes = data["runs"][0]["notes"]
    reason = "ms-ssim-rgb null: 5-scale MS-SSIM needs both sides >= 161 px, image is"
    assert f"a_rgba.png: {reason} 64x64" in notes
    assert f"b_cmyk.tif: {reason} 64x128" in notes
    assert f"a_rgba.png: {reason} 64x64" in capsys.readouterr().out
    assert data["runs"][0]["padding"] == "compressai"


def test_numbers_are_compressai_eval_model_numbers(tmp_path):
    from compressai.utils.eval_model.__main__ import collect_images
    from compressai.utils.eval_model.__main__ import eval_model as compressai_eval_model

    threads = torch.get_num_threads()
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name, (h, w) in {"a.png": (170, 200), "b.png": (200, 165)}.items():  # not multiples of 64
        smooth = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        Image.fromarray((smooth * 0.6 + rng.uniform(0, 100, (h, w, 3))).astype(np.uint8)).save(folder / name)
    model = _trained_like(TINY)
    ours, _ = evaluate_model(model, load_images(str(folder)))  # update()s the model, as eval_model's loader
    try:
        theirs = compressai_eval_model(
            model, tmp_path, folder, collect_images(str(folder)), half=False, per_image=False,
            architecture=TINY["model"],
        )
    finally:
        torch.set_num_threads(threads)  # importing eval_model sets one thread
    assert ours["bpp"] == theirs["bpp"]
    assert ours["psnr-rgb"] == pytest.approx(theirs["psnr-rgb"], abs=1e-4)
    assert ours["ms-ssim-rgb"] == pytest.approx(theirs["ms-ssim-rgb"], abs=1e-6)
    other, rows = evaluate_model(model, load_images(str(folder)), padding="replicate")
    assert other["psnr-rgb"] != pytest.approx(theirs["psnr-rgb"], abs=1e-4)  # the padding matters
    assert rows[0]["padding"] == "replicate"

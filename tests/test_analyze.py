"""energylab.analyze: latent statistics of trained models from any checkpoint, without training."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from energylab.analyze import analysis_images, statistics_of
from energylab.analyze.__main__ import main
from energylab.capture import LatentProbe
from energylab.checkpoints import from_energylab
from energylab.models import build_model
from energylab.rundir import AnalysisDir, RunDir


def _cells(root):
    return [root / "baseline" / "seed0", root / "auxt" / "seed0"]


@pytest.mark.slow
def test_two_runs_of_the_tiny_ablation(tiny_ablation, tmp_path, capsys):
    out = tmp_path / "analysis"
    argv = [*map(str, _cells(tiny_ablation)), "--data", "builtin", "--out", str(out), "--bitstream"]
    assert main(argv) == 0
    result = AnalysisDir(out)
    analysis = result.analysis()
    assert [m["name"] for m in analysis["models"]] == ["baseline/seed0", "auxt/seed0"]
    assert analysis["data"]["images"] == ["chelsea", "coffee"]
    base, auxt = analysis["models"]
    assert base["architecture"]["checkpoint"]["format"] == "compressai"
    assert auxt["architecture"]["checkpoint"]["format"] == "energylab"
    assert base["step"] == auxt["step"] == 8
    assert {"g_a.stage1", "y", "y_hat"} <= set(base["layers"]) and "g_a.aux4" in auxt["layers"]
    assert 0 < auxt["layers"]["g_a.aux1"]["aux_energy_share"]
    assert base["bitstream"]["bpp"] > 0 and auxt["bitstream"]["psnr-rgb"] > 0
    # the statistics are those of a probe run over the same crops by hand (chelsea 300x451 -> 256x448)
    model = build_model("mbt2018-mean", N=8, M=12)
    model.load_state_dict(torch.load(_cells(tiny_ablation)[0] / RunDir.FINAL, weights_only=False)["model"])
    model.eval()
    probe = LatentProbe(model)
    with probe, torch.no_grad():
        for _, x in analysis_images("builtin"):
            h, w = x.shape[-2] // 64 * 64, x.shape[-1] // 64 * 64
            top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
            model(x[None, :, top:top + h, left:left + w])
    expected = statistics_of(probe.records(0))
    assert base["layers"].keys() == expected.keys()
    for layer, values in expected.items():
        for key, value in values.items():
            if isinstance(value, float):
                assert base["layers"][layer][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (layer, key)
            else:
                assert base["layers"][layer][key] == value
    np.testing.assert_allclose(result.arrays(0)["cov/y"], probe.arrays()["cov/y"], rtol=1e-6)
    for name in ("energy_split", "correlation_y", "compaction_y"):
        assert result.figure_path(name).stat().st_size > 0
    json.loads((out / AnalysisDir.ANALYSIS).read_text())  # strict JSON


def test_a_foreign_checkpoint_with_arch_flags(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("mbt2018-mean", N=8, M=12, auxt=True)
    path = tmp_path / "release.pth.tar"
    torch.save({"state_dict": from_energylab(model.state_dict(), "auxt-release")}, path)
    images = tmp_path / "kodak"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate(((70, 130), (64, 64), (40, 200))):  # the last is too small: skipped
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"im2\.png: 40x200 is smaller than 64x64; skipped"):
        code = main([str(path), "--model", "mbt2018-mean", "--N", "8", "--M", "12", "--auxt",
                     "--data", str(images), "--out", str(out), "--no-figures"])
    assert code == 0
    assert f"release: mbt2018-mean+auxt, auxt-release layout read from {path}" in capsys.readouterr().out
    (entry,) = AnalysisDir(out).analysis()["models"]
    assert entry["architecture"]["checkpoint"]["format"] == "auxt-release"
    assert entry["name"] == "release" and entry["step"] is None
    assert entry["layers"]["y"]["count"] == 4 * 8 + 4 * 4  # y positions of the 128x64 and 64x64 crops


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "w.pt"
    torch.save(build_model("mbt2018-mean", N=8, M=12).state_dict(), path)
    cases = [
        ([str(tmp_path / "missing.pt")], "missing.pt: no such file or run directory"),
        ([str(path), "--model", "mbt2018-mean", "--N", "16", "--M", "12"], "w.pt: 'entropy_bottleneck"),
        ([str(path), "--model", "mbt2018-mean", "--N", "8", "--M", "12", "--auxt"],
         "w.pt: checkpoint (compressai layout) carries no AuxT but model"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": {"a": 1}}, tmp_path / "odd.pt")
    for name, message in (("junk.pt", "junk.pt: not a checkpoint that torch.load"),
                          ("odd.pt", "odd.pt: no state dict (a dict of tensors at the top level")):
        assert main([str(tmp_path / name), "--model", "mbt2018-mean", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_records_are_consumed_generically():
    records = [{"step": 0, "layer": "y", "channels": 3, "new_statistic": torch.tensor(2.5),
                "interval": (np.float64(1.0), float("nan")), "role": "y"}]
    assert statistics_of(records) == {"y": {"channels": 3, "new_statistic": 2.5, "interval": [1.0, None],
                                            "role": "y"}}

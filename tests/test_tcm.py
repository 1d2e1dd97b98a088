import math

import pytest
import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import (
    AttentionBlock,
    ResidualBlock,
    ResidualBlockUpsample,
    ResidualBlockWithStride,
    subpel_conv3x3,
)
from compressai.losses import RateDistortionLoss
from torch import nn

from energylab.auxt import ortho_loss
from energylab.models import build_model
from energylab.tcm import TCM, WMSA

TINY = {"N": 16, "M": 40}


# ---------------------------------------------------------------------------------------------
# Window attention against a per-window reference written from the Swin / TCM-release formulas
# ---------------------------------------------------------------------------------------------


def naive_window_attention(msa: WMSA, x: torch.Tensor) -> torch.Tensor:
    """Token by token: roll (if shifted), attend inside each window with the relative-position bias
    ``B[h, dy + w - 1, dx + w - 1]`` and the release's mask (in the last window row / column, rows
    (columns) below ``w - shift`` and those at or above it do not see each other), roll back."""
    _, height, width, channels = x.shape
    w, shift, hd = msa.window_size, msa.window_size // 2, msa.head_dim
    s = w - shift
    if msa.shifted:
        x = torch.roll(x, (-shift, -shift), dims=(1, 2))
    out = torch.zeros_like(x)
    wq, bq = msa.embedding_layer.weight, msa.embedding_layer.bias
    for wy in range(height // w):
        for wx in range(width // w):
            pos = [(i, j) for i in range(w) for j in range(w)]
            tokens = torch.stack([x[0, wy * w + i, wx * w + j] for i, j in pos])
            qkv = tokens @ wq.T + bq
            heads = []
            for h in range(msa.n_heads):
                q = qkv[:, h * hd : (h + 1) * hd]
                k = qkv[:, channels + h * hd : channels + (h + 1) * hd]
                v = qkv[:, 2 * channels + h * hd : 2 * channels + (h + 1) * hd]
                logits = q @ k.T / math.sqrt(hd)
                for a, (ia, ja) in enumerate(pos):
                    for b, (ib, jb) in enumerate(pos):
                        logits[a, b] += msa.relative_position_params[h, ia - ib + w - 1, ja - jb + w - 1]
                        if msa.shifted:
                            last_row, last_col = wy == height // w - 1, wx == width // w - 1
                            if (last_row and (ia < s) != (ib < s)) or (last_col and (ja < s) != (jb < s)):
                                logits[a, b] = float("-inf")
                heads.append(logits.softmax(-1) @ v)
            result = msa.linear(torch.cat(heads, dim=1))
            for a, (i, j) in enumerate(pos):
                out[0, wy * w + i, wx * w + j] = result[a]
    if msa.shifted:
        out = torch.roll(out, (shift, shift), dims=(1, 2))
    return out


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_matches_per_window_reference(shifted):
    torch.manual_seed(0)
    msa = WMSA(8, 8, head_dim=4, window_size=4, shifted=shifted)
    with torch.no_grad():
        msa.relative_position_params.normal_()  # a bias large enough to matter
        x = torch.randn(1, 8, 8, 8)
        torch.testing.assert_close(msa(x), naive_window_attention(msa, x), atol=1e-5, rtol=1e-5)


def test_window_attention_pads_maps_smaller_than_a_window():
    msa = WMSA(8, 8, head_dim=4, window_size=4, shifted=True)
    x = torch.randn(2, 6, 3, 8)
    out = msa(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# The release's state-dict key set, from the facts of its constructor
# ---------------------------------------------------------------------------------------------


def keys(prefix: str, module: nn.Module) -> set[str]:
    return {f"{prefix}.{k}" for k in module.state_dict()}


def transformer_keys(prefix: str) -> set[str]:
    names = ["ln1.weight", "ln1.bias", "msa.embedding_layer.weight", "msa.embedding_layer.bias",
             "msa.relative_position_params", "msa.linear.weight", "msa.linear.bias", "ln2.weight",
             "ln2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]  # fmt: skip
    return {f"{prefix}.{n}" for n in names}


def tcm_block_keys(prefix: str, n: int) -> set[str]:
    return (
        transformer_keys(f"{prefix}.trans_block")
        | {f"{prefix}.conv1_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
        | keys(f"{prefix}.conv_block", ResidualBlock(n, n))
    )


def release_keys(n: int, m: int, slices: int = 5, support: int = 5) -> set[str]:
    """Keys of the release's ``TCM(N=n, M=m)``: ``g_a``/``g_s`` = resampling block, 2 TCM blocks (x3) and
    a last resampling conv; ``h_a`` / ``h_mean_s`` / ``h_scale_s`` with 2 TCM blocks and 192 channels of z;
    5 slices with SWAtten (inter dim 128) and 3-conv slice transforms at layers 0, 2, 4."""
    expected: set[str] = set()
    for side, first, resample, last in (
        ("g_a", ResidualBlockWithStride(3, 2 * n, 2), ResidualBlockWithStride(2 * n, 2 * n, 2),
         nn.Conv2d(2 * n, m, 3)),
        ("g_s", ResidualBlockUpsample(m, 2 * n, 2), ResidualBlockUpsample(2 * n, 2 * n, 2),
         subpel_conv3x3(2 * n, 3, 2)),
    ):  # fmt: skip
        expected |= keys(f"{side}.0", first) | keys(f"{side}.3", resample) | keys(f"{side}.6", resample)
        expected |= keys(f"{side}.9", last)
        for i in (1, 2, 4, 5, 7, 8):
            expected |= tcm_block_keys(f"{side}.{i}", n)
    expected |= keys("h_a.0", ResidualBlockWithStride(m, 2 * n, 2)) | keys("h_a.3", nn.Conv2d(2 * n, 192, 3))
    for side in ("h_mean_s", "h_scale_s"):
        expected |= keys(f"{side}.0", ResidualBlockUpsample(192, 2 * n, 2))
        expected |= keys(f"{side}.3", subpel_conv3x3(2 * n, m, 2))
    for side in ("h_a", "h_mean_s", "h_scale_s"):
        expected |= tcm_block_keys(f"{side}.1", n) | tcm_block_keys(f"{side}.2", n)
    for i in range(slices):
        for side in ("atten_mean", "atten_scale"):
            p = f"{side}.{i}.0"
            expected |= keys(p, AttentionBlock(128)) | keys(f"{p}.in_conv", nn.Conv2d(1, 1, 1))
            expected |= keys(f"{p}.out_conv", nn.Conv2d(1, 1, 1))
            expected |= transformer_keys(f"{p}.non_local_block.block_1")
            expected |= transformer_keys(f"{p}.non_local_block.block_2")
        for side in ("cc_mean_transforms", "cc_scale_transforms", "lrp_transforms"):
            expected |= {f"{side}.{i}.{j}.{p}" for j in (0, 2, 4) for p in ("weight", "bias")}
    expected |= keys("entropy_bottleneck", EntropyBottleneck(192))
    expected |= keys("gaussian_conditional", GaussianConditional(None))
    return expected


def test_state_dict_keys_and_shapes_are_the_releases():
    n, m = 64, 320  # the AuxT release's TCM
    state = build_model("tcm").state_dict()
    assert set(state) == release_keys(n, m)
    rel = "trans_block.msa.relative_position_params"
    heads = {"g_a.1": 8, "g_a.4": 4, "g_a.7": 2, "g_s.1": 2, "g_s.4": 4, "g_s.7": 8}  # 64 / [8,16,32,32,16,8]
    for layer, h in heads.items():
        assert state[f"{layer}.{rel}"].shape == (h, 15, 15)
    assert state[f"h_a.1.{rel}"].shape == (2, 7, 7)  # head dim 32, window 4
    assert state["atten_mean.0.0.non_local_block.block_1.msa.relative_position_params"].shape == (8, 15, 15)
    assert state["g_a.9.weight"].shape == (m, 2 * n, 3, 3)
    assert state["h_a.0.conv1.weight"].shape == (2 * n, m, 3, 3)
    for i in range(5):
        assert state[f"atten_mean.{i}.0.in_conv.weight"].shape == (128, m + 64 * min(i, 5), 1, 1)
        assert state[f"cc_scale_transforms.{i}.0.weight"].shape == (224, m + 64 * min(i, 5), 3, 3)
        assert state[f"lrp_transforms.{i}.0.weight"].shape == (224, m + 64 * min(i + 1, 6), 3, 3)
        assert state[f"cc_mean_transforms.{i}.4.weight"].shape == (64, 128, 3, 3)


def test_bad_widths_are_refused():
    with pytest.raises(ValueError, match="num_slices"):
        TCM(N=16, M=42)
    with pytest.raises(ValueError, match="does not divide"):
        TCM(N=12, M=40, head_dim=(8,) * 6)


# ---------------------------------------------------------------------------------------------
# AuxT, training, real coding
# ---------------------------------------------------------------------------------------------


def test_auxt_merge_points_are_the_releases():
    model = build_model("tcm", auxt=True, **TINY)
    assert model.g_a.merge_positions == (0, 3, 6, 9)
    assert model.g_s.merge_positions == (2, 5, 8, 9)


def test_trains_a_few_steps():
    torch.manual_seed(0)
    model = build_model("tcm", auxt=True, **TINY)
    params = {n: p for n, p in model.named_parameters() if not n.endswith(".quantiles")}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-4)
    aux_optimizer = torch.optim.Adam((p for n, p in model.named_parameters() if n.endswith(".quantiles")))
    criterion = RateDistortionLoss(lmbda=0.013)
    x = torch.rand(2, 3, 64, 64)
    for _ in range(3):
        optimizer.zero_grad()
        aux_optimizer.zero_grad()
        loss = criterion(model(x), x)["loss"] + 0.1 * ortho_loss(model)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        model.aux_loss().backward()
        aux_optimizer.step()
    for name in ("g_a.transform.1.trans_block.msa.relative_position_params", "atten_mean.0.0.in_conv.weight",
                 "g_s.auxiliary_layers.0.olp.linear.weight", "lrp_transforms.4.0.weight"):  # fmt: skip
        assert not torch.equal(params[name], before[name]), name


def test_forward_pads_maps_that_are_not_window_multiples():
    model = build_model("tcm", **TINY).eval()
    x = torch.rand(1, 3, 48, 80)  # g_a's first stage is 24 x 40: not a multiple of the window 8
    with torch.no_grad():
        out = model(x)
    assert out["x_hat"].shape == x.shape
    assert out["likelihoods"]["y"].shape == (1, 40, 3, 5)


def test_compress_decompress_is_real_and_matches_forward():
    torch.manual_seed(0)
    model = build_model("tcm", auxt=True, **TINY).eval()
    model.update(force=True)
    f = model.downsampling_factor  # what energylab.evaluate pads to
    x = torch.rand(2, 3, f, 2 * f)
    y_hat = []  # what g_s decodes: forward's round(y - mu) + mu, then decompress's
    model.g_s.register_forward_pre_hook(lambda module, args: y_hat.append(args[0].clone()))
    with torch.no_grad():
        out = model(x)
        enc = model.compress(x)
        dec = model.decompress(enc["strings"], enc["shape"])
    y_strings, z_strings = enc["strings"]
    assert len(y_strings) == len(z_strings) == 2
    assert all(isinstance(s, bytes) and len(s) > 0 for s in y_strings + z_strings)
    assert tuple(enc["shape"]) == (1, 2)
    torch.testing.assert_close(y_hat[1], y_hat[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(dec["x_hat"], out["x_hat"].clamp(0, 1), atol=1e-5, rtol=0)
    # the bytes carry the information: a corrupted y string decodes to something else
    broken = [bytes(len(y_strings[0])), y_strings[1]]
    again = model.decompress([broken, z_strings], enc["shape"])["x_hat"]
    assert not torch.allclose(again[0], dec["x_hat"][0])
    torch.testing.assert_close(again[1], dec["x_hat"][1])

import numpy as np
import pytest
import pywt
import torch

from energylab.auxt import COMPONENTS, OLP, WLS, iWLS, ortho_loss, variant_name
from energylab.wavelets import dwt2, idwt2


def space_to_depth(x):
    """Polyphase samples, phase-major: [x[0::2,0::2] | x[0::2,1::2] | x[1::2,0::2] | x[1::2,1::2]]."""
    return torch.cat([x[:, :, i::2, j::2] for i in (0, 1) for j in (0, 1)], 1)


def depth_to_space(z):
    c = z.shape[1] // 4
    out = z.new_zeros(z.shape[0], c, 2 * z.shape[2], 2 * z.shape[3])
    for k, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        out[:, :, i::2, j::2] = z[:, k * c : (k + 1) * c]
    return out


def reference_wls(m: WLS, x, dwt=dwt2):
    """The paper's formula applied step by step: DWT -> * exp(s) -> Linear at every position."""
    z = space_to_depth(x) if m.wavelet is None else dwt(x, m.wavelet)
    z = z.permute(0, 2, 3, 1)
    if m.scaling_factors is not None:
        z = z * m.scaling_factors.exp()
    return m.olp.linear(z).permute(0, 3, 1, 2)


def reference_iwls(m: iWLS, y):
    z = m.olp.linear(y.permute(0, 2, 3, 1))
    if m.scaling_factors is not None:
        z = z / m.scaling_factors.exp()
    z = z.permute(0, 3, 1, 2)
    return depth_to_space(z) if m.wavelet is None else idwt2(z, m.wavelet)


def randomise_scaling(m):
    if m.scaling_factors is not None:
        with torch.no_grad():
            m.scaling_factors.normal_()
    return m


REMOVALS = [(), ("wavelet",), ("orthogonal",), ("scaling",), ("wavelet", "scaling")]


WAVELETS = ["haar", "db2", "db4", "sym4", "bior2.2"]


def pywt_wls(m: WLS, x):
    """The WLS formula on pywt's own periodized DWT (per channel, subband-major), in float64."""
    bands = [[], [], [], []]
    for c in range(x.shape[1]):
        ca, (ch, cv, cd) = pywt.dwt2(x[:, c].numpy(), m.wavelet, mode="periodization", axes=(-2, -1))
        for band, coef in zip(bands, (ca, ch, cv, cd), strict=True):
            band.append(coef)
    z = torch.from_numpy(np.concatenate([np.stack(b, 1) for b in bands], 1))
    return reference_wls(m, x, dwt=lambda t, wavelet: z)


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("remove", REMOVALS)
# (8, 6): H and W unequal; (2, 4): shorter than db4's and sym4's 8 taps, the filters wrap around
@pytest.mark.parametrize("size", [(8, 6), (2, 4)])
def test_wls_and_iwls_match_reference_formula(wavelet, remove, size):
    h, w = size
    m = randomise_scaling(WLS(3, 8, wavelet, remove).double())
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    out = m(x)
    assert out.shape == (2, 8, h // 2, w // 2)
    torch.testing.assert_close(out, reference_wls(m, x))
    if m.wavelet is not None:
        torch.testing.assert_close(out, pywt_wls(m, x))
    mi = randomise_scaling(iWLS(8, 3, wavelet, remove).double())
    y = torch.randn(2, 8, h // 2, w // 2, dtype=torch.float64)
    out = mi(y)
    assert out.shape == (2, 3, h, w)
    torch.testing.assert_close(out, reference_iwls(mi, y))


@pytest.mark.parametrize("wavelet", ["db4", "bior2.2"])
def test_float32_fast_path_matches_float64_reference(wavelet):
    m = randomise_scaling(WLS(4, 6, wavelet))
    x = torch.randn(2, 4, 16, 16)
    expected = reference_wls(m.double(), x.double()).float()
    torch.testing.assert_close(m.float()(x), expected, atol=1e-4, rtol=1e-4)


def test_gradients_flow_to_every_parameter():
    m = WLS(3, 8)
    m(torch.randn(1, 3, 4, 4)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    mi = iWLS(8, 3)
    mi(torch.randn(1, 8, 2, 2)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mi.parameters())


def _gradients(module, inputs, reference):
    """Gradients of a fixed random projection of the output w.r.t. the input and every parameter."""
    params = [p for p in module.parameters()]
    out = reference(module, inputs) if reference else module(inputs)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(0))
    return torch.autograd.grad((out * g).sum(), [inputs, *params])


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("remove", REMOVALS)
def test_gradients_match_reference_and_gradcheck(wavelet, remove):
    m = randomise_scaling(WLS(2, 3, wavelet, remove).double())
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    for fast, ref in zip(_gradients(m, x, None), _gradients(m, x, reference_wls), strict=True):
        torch.testing.assert_close(fast, ref)
    assert torch.autograd.gradcheck(m, (x,))
    mi = randomise_scaling(iWLS(3, 2, wavelet, remove).double())
    y = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    for fast, ref in zip(_gradients(mi, y, None), _gradients(mi, y, reference_iwls), strict=True):
        torch.testing.assert_close(fast, ref)
    assert torch.autograd.gradcheck(mi, (y,))


def test_odd_input_size_is_rejected_with_its_shape():
    with pytest.raises(ValueError, match=r"even H and W.*\(1, 3, 5, 4\)"):
        WLS(3, 8, "db4")(torch.zeros(1, 3, 5, 4))


def test_scaling_initialisation_and_names():
    m = WLS(3, 8)
    assert m.scaling_factors.shape == (1, 1, 12)
    expected = torch.tensor([0.5] * 9 + [0.0] * 3)
    torch.testing.assert_close(m.scaling_factors.flatten(), expected)
    assert set(m.state_dict()) == {"scaling_factors", "olp.linear.weight", "olp.linear.bias"}
    assert iWLS(8, 3).olp.linear.weight.shape == (12, 8)


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_switch_changes_only_its_component(component):
    full, ablated = WLS(3, 8), WLS(3, 8, remove=(component,))
    assert set(full.components) - set(ablated.components) == {component}
    keys_full, keys_ablated = set(full.state_dict()), set(ablated.state_dict())
    assert keys_full - keys_ablated == ({"scaling_factors"} if component == "scaling" else set())
    ablated.load_state_dict(full.state_dict(), strict=component != "scaling")
    x = torch.randn(1, 3, 8, 8)
    same = torch.allclose(full(x), ablated(x), atol=1e-6)
    # orthogonal only changes the loss; the other two change the function
    assert same == (component == "orthogonal")
    assert (ortho_loss(ablated) == 0) == (component == "orthogonal")


def test_unknown_component_lists_valid_names():
    with pytest.raises(ValueError, match="wavelet, orthogonal, scaling"):
        WLS(3, 8, remove=("scale",))


def test_olp_loss_orientation():
    wide = OLP(12, 4)  # in > out: W Wᵀ is 4x4
    with torch.no_grad():
        wide.linear.weight.copy_(torch.eye(12)[:4])
    assert wide.loss().item() == 0
    tall = OLP(4, 12)  # in <= out: Wᵀ W is 4x4
    with torch.no_grad():
        tall.linear.weight.copy_(2 * torch.eye(12)[:, :4])
    torch.testing.assert_close(tall.loss(), torch.tensor(9.0 * 4 / 16))


def test_ortho_loss_sums_and_is_zero_without_olp():
    a, b = WLS(3, 8), iWLS(8, 3)
    both = torch.nn.ModuleList([a, b])
    torch.testing.assert_close(ortho_loss(both), a.olp.loss() + b.olp.loss())
    assert ortho_loss(torch.nn.Linear(2, 2)).item() == 0


@pytest.mark.parametrize(
    ("auxt", "remove", "wavelet", "name"),
    [
        (False, (), "haar", "baseline"),
        (True, (), "haar", "auxt"),
        (True, ["scaling"], "haar", "auxt-no-scaling"),
        (True, ("scaling", "wavelet"), "haar", "auxt-no-wavelet+scaling"),
        (True, ["scaling", "orthogonal", "wavelet"], "haar", "auxt-no-wavelet+orthogonal+scaling"),
        (True, (), "db4", "auxt-db4"),
        (True, ["scaling"], "bior2.2", "auxt-bior2.2-no-scaling"),
    ],
)
def test_variant_name(auxt, remove, wavelet, name):
    assert variant_name(auxt, remove, wavelet) == name


@pytest.mark.parametrize(
    ("auxt", "remove", "message"),
    [(True, ["scale"], "valid names are: wavelet, orthogonal, scaling"),
     (False, ["scaling"], "only be removed from an AuxT variant")],
)
def test_variant_name_rejects(auxt, remove, message):
    with pytest.raises(ValueError, match=message):
        variant_name(auxt, remove)


def test_filter_matrices_first_built_in_inference_mode_still_train():
    m = WLS(2, 3, "db2")
    x = torch.randn(1, 2, 22, 14)  # sizes no other test uses, so the matrices are built here
    with torch.inference_mode():
        m(x)
    x.requires_grad_(True)  # the products then save the matrices for the input's gradient
    m(x).sum().backward()
    assert x.grad is not None and m.olp.linear.weight.grad is not None

import numpy as np
import pytest
import pywt
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from energylab.wavelets import DWT2, IDWT2, dwt2, haar_kernels, idwt2, periodic_filter_matrices

WAVELETS = ["haar", "db2", "db4", "sym4", "bior2.2"]


def pywt_reference(x: torch.Tensor, wavelet: str) -> np.ndarray:
    """Per-channel pywt.dwt2, stacked subband-major [cA | cH | cV | cD]."""
    out = []
    for image in x.numpy():
        bands = [[], [], [], []]
        for channel in image:
            ca, (ch, cv, cd) = pywt.dwt2(channel, wavelet, mode="periodization")
            for band, coef in zip(bands, (ca, ch, cv, cd), strict=True):
                band.append(coef)
        out.append(np.concatenate([np.stack(b) for b in bands]))
    return np.stack(out)


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("shape", [(2, 3, 16, 12), (1, 2, 4, 4), (1, 1, 2, 6)])
def test_dwt2_equals_pywt(wavelet, shape):
    x = torch.randn(shape, dtype=torch.float64)
    np.testing.assert_allclose(dwt2(x, wavelet).numpy(), pywt_reference(x, wavelet), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    wavelet=st.sampled_from(WAVELETS),
    b=st.integers(1, 2),
    c=st.integers(1, 4),
    h=st.integers(1, 10),
    w=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_perfect_reconstruction(wavelet, b, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, 2 * h, 2 * w, dtype=torch.float64, generator=g)
    torch.testing.assert_close(idwt2(dwt2(x, wavelet), wavelet), x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("wavelet", ["haar", "db2", "db4", "sym4"])
def test_parseval_for_orthogonal_wavelets(wavelet):
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(dwt2(x, wavelet).pow(2).sum(), x.pow(2).sum(), rtol=1e-10, atol=0)


def test_biorthogonal_is_not_energy_preserving():
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ratio = dwt2(x, "bior2.2").pow(2).sum() / x.pow(2).sum()
    assert abs(ratio.item() - 1) > 1e-3


def test_subband_order_lh_is_highpass_along_h():
    # A signal varying only along H has energy in LL and LH (pywt's cH) only.
    x = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 8).contiguous() % 2
    energy = dwt2(x).pow(2).sum((0, 2, 3))
    assert energy[1] > 0 and energy[2] == 0 and energy[3] == 0


def test_haar_kernels_match_dwt2():
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    coeffs = (haar_kernels(torch.float64) * x[0, 0]).sum((-2, -1))
    torch.testing.assert_close(coeffs, dwt2(x).flatten())


@pytest.mark.parametrize("wavelet", ["haar", "db2", "bior2.2"])
def test_gradcheck_both_directions(wavelet):
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dwt2(t, wavelet), (x,))
    y = torch.randn(1, 8, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: idwt2(t, wavelet), (y,))


def test_odd_size_error_names_the_shape():
    with pytest.raises(ValueError, match=r"\(1, 3, 5, 4\)"):
        dwt2(torch.zeros(1, 3, 5, 4))


def test_idwt2_rejects_channels_not_multiple_of_four():
    with pytest.raises(ValueError, match="subband-major"):
        idwt2(torch.zeros(1, 6, 2, 2))


def test_unknown_wavelet():
    with pytest.raises(ValueError, match="unknown wavelet 'nope'"):
        DWT2("nope")


def test_modules_wrap_functions():
    x = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(IDWT2("db2")(DWT2("db2")(x)), x, atol=1e-5, rtol=0)
    assert "db2" in repr(DWT2("db2"))


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("n", [2, 6, 16])
def test_periodic_filter_matrices_equal_pywt_1d(wavelet, n):
    analysis, synthesis = periodic_filter_matrices(wavelet, n, torch.float64)
    x = np.random.default_rng(n).standard_normal((3, n))
    lo, hi = pywt.dwt(x, wavelet, mode="periodization")
    np.testing.assert_allclose(x @ analysis.numpy(), np.concatenate((lo, hi), -1), atol=1e-12)
    np.testing.assert_allclose(
        np.concatenate((lo, hi), -1) @ synthesis.numpy(),
        pywt.idwt(lo, hi, wavelet, mode="periodization"),
        atol=1e-12,
    )


@pytest.mark.parametrize("wavelet", ["db4", "bior2.2"])
def test_periodic_filter_matrices_compose_to_dwt2(wavelet):
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    a_h, s_h = periodic_filter_matrices(wavelet, 8, torch.float64)
    a_w, s_w = periodic_filter_matrices(wavelet, 12, torch.float64)
    blocks = (a_h.T @ x @ a_w).view(2, 3, 2, 4, 2, 6)  # (.., band along H, h, band along W, w)
    subbands = [blocks[:, :, i, :, j] for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]  # LL LH HL HH
    torch.testing.assert_close(torch.cat(subbands, 1), dwt2(x, wavelet))
    torch.testing.assert_close(s_h.T @ (a_h.T @ x @ a_w) @ s_w, x)


def test_orthogonal_synthesis_is_the_transpose():
    analysis, synthesis = periodic_filter_matrices("db4", 10, torch.float64)
    torch.testing.assert_close(synthesis, analysis.T)
    analysis, synthesis = periodic_filter_matrices("bior2.2", 10, torch.float64)
    assert not torch.allclose(synthesis, analysis.T)


def test_periodic_filter_matrices_cached_and_checked():
    assert periodic_filter_matrices("db2", 8)[0] is periodic_filter_matrices("db2", 8, device="cpu")[0]
    with pytest.raises(ValueError, match="even positive length, got n=7"):
        periodic_filter_matrices("db2", 7)

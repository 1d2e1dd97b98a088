"""Differentiable 2-D discrete wavelet transform for ``(B, C, H, W)`` tensors.

Layout contract (the official AuxT release's): ``dwt2(x)`` returns ``(B, 4C, H/2, W/2)`` stacked
**subband-major**, channels ``[cA of all C | cH of all C | cV of all C | cD of all C]``, where for each
input channel ``(cA, (cH, cV, cD))`` is exactly ``pywt.dwt2(x_c, wavelet, mode="periodization")``.
``cH`` (the paper's LH) is high-pass along ``H`` and low-pass along ``W``; ``cV`` (HL) the reverse;
``cD`` (HH) high-pass along both.

* ``haar`` has a fast path: a 2x2 butterfly on a reshaped view (no convolution).
* Any other discrete wavelet of PyWavelets runs through its filter bank with periodic extension:
  orthogonal ones (``db2``, ``db4``, ``sym4``, ...) are orthonormal (energy-preserving, the inverse
  is the adjoint); biorthogonal ones (``bior2.2``, ...) use their own analysis and synthesis filters
  and reconstruct perfectly, but are **not** energy-preserving.
* :func:`periodic_filter_matrices` gives the same 1-D filter bank as two dense ``(n, n)`` matrices,
  read off the filter bank by applying it to the identity (so pywt's alignment is inherited, not
  re-derived). Applied along ``W`` then ``H`` they compute :func:`dwt2` / :func:`idwt2` as two
  matrix products; this is the fast path of AuxT's WLS/iWLS for wavelets other than Haar.

Filters and their alignment come from PyWavelets (``pywt.Wavelet``), which is the reference the
tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import pywt
import torch
from torch import Tensor, nn

__all__ = ["DWT2", "IDWT2", "SUBBANDS", "dwt2", "idwt2", "haar_kernels", "periodic_filter_matrices"]

SUBBANDS = ("LL", "LH", "HL", "HH")
"""Names of the four subband blocks, in channel order (pywt's cA, cH, cV, cD)."""

_SQRT_HALF = 0.5**0.5


def _check_even(x: Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what} expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(
            f"{what} needs even H and W, got shape {tuple(x.shape)}; pad or crop the input first"
        )


def haar_kernels(dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The four 2x2 orthonormal Haar analysis kernels, shape ``(4, 2, 2)`` in ``SUBBANDS`` order.

    ``kernel[b, i, j]`` is the weight of pixel ``x[2h + i, 2w + j]`` in subband ``b`` at ``(h, w)``;
    the same kernels are the synthesis basis (Haar is orthonormal). Signs follow ``pywt``, whose
    Haar detail of ``(a, b)`` is ``(a - b) / sqrt(2)``.
    """
    k = torch.tensor(
        [
            [[1.0, 1.0], [1.0, 1.0]],  # LL (cA)
            [[1.0, 1.0], [-1.0, -1.0]],  # LH (cH): high-pass along H
            [[1.0, -1.0], [1.0, -1.0]],  # HL (cV): high-pass along W
            [[1.0, -1.0], [-1.0, 1.0]],  # HH (cD)
        ],
        dtype=dtype,
        device=device,
    )
    return 0.5 * k


def _haar_dwt2(x: Tensor) -> Tensor:
    """2x2 butterfly on the ``(B, C, H/2, 2, W/2, 2)`` view; see :func:`haar_kernels`."""
    b, c, h, w = x.shape
    v = x.reshape(b, c, h // 2, 2, w // 2, 2)
    p, q = v[:, :, :, 0, :, 0], v[:, :, :, 0, :, 1]  # even row: even, odd column
    r, s = v[:, :, :, 1, :, 0], v[:, :, :, 1, :, 1]  # odd row
    sum_p, dif_p = p + q, p - q
    sum_r, dif_r = r + s, r - s
    return 0.5 * torch.cat((sum_p + sum_r, sum_p - sum_r, dif_p + dif_r, dif_p - dif_r), 1)


def _haar_idwt2(y: Tensor) -> Tensor:
    """Inverse butterfly: the transpose of :func:`_haar_dwt2` (Haar is orthonormal)."""
    b, c4, h, w = y.shape
    ll, lh, hl, hh = y.reshape(b, 4, c4 // 4, h, w).unbind(1)
    sum_p, sum_r = ll + lh, ll - lh
    dif_p, dif_r = hl + hh, hl - hh
    p, q = sum_p + dif_p, sum_p - dif_p
    r, s = sum_r + dif_r, sum_r - dif_r
    out = torch.stack((torch.stack((p, q), -1), torch.stack((r, s), -1)), 3)  # b c h 2 w 2
    return 0.5 * out.reshape(b, c4 // 4, 2 * h, 2 * w)


class _HaarDWT2(torch.autograd.Function):
    """Haar analysis whose gradient is the synthesis butterfly: the transform is orthonormal, so
    its adjoint is its inverse (one butterfly instead of autograd's slice-and-scatter backward)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _haar_dwt2(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _HaarIDWT2.apply(grad)


class _HaarIDWT2(torch.autograd.Function):
    """Haar synthesis whose gradient is the analysis butterfly (see :class:`_HaarDWT2`)."""

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        return _haar_idwt2(y)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _HaarDWT2.apply(grad)


@dataclass(frozen=True)
class _FilterBank:
    """A 1-D two-channel periodic filter bank with pywt's alignment, for signals of length N.

    Analysis: ``lo[k] = sum_m a_lo[m] * x[(2k + m + shift) mod N]`` (likewise ``hi``).
    Synthesis is the same pattern transposed, with the synthesis filters and ``rec_shift``:
    ``x[(2k + m + rec_shift) mod N] += s_lo[m] * lo[k] + s_hi[m] * hi[k]``.
    For an orthogonal wavelet the synthesis is the adjoint of the analysis.
    """

    a_lo: np.ndarray
    a_hi: np.ndarray
    s_lo: np.ndarray
    s_hi: np.ndarray
    shift: int
    rec_shift: int


def _analysis_index(n: int, taps: int, shift: int) -> np.ndarray:
    """``(n/2, taps)`` indices into a length-``n`` periodic signal (see ``_FilterBank``)."""
    return (2 * np.arange(n // 2)[:, None] + np.arange(taps)[None, :] + shift) % n


def _synthesis_index(n: int, taps: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather form of the synthesis: ``x[i] = sum_m mask[i, m] * s[m] * c[idx[i, m]]``."""
    d = np.arange(n)[:, None] - np.arange(taps)[None, :] - shift
    return (d // 2) % (n // 2), (d % 2 == 0)


def _np_analysis(x: np.ndarray, f_lo: np.ndarray, f_hi: np.ndarray, shift: int):
    idx = _analysis_index(len(x), len(f_lo), shift)
    return x[idx] @ f_lo, x[idx] @ f_hi


def _np_synthesis(lo, hi, s_lo: np.ndarray, s_hi: np.ndarray, shift: int) -> np.ndarray:
    idx, mask = _synthesis_index(2 * len(lo), len(s_lo), shift)
    return (mask * (lo[idx] * s_lo + hi[idx] * s_hi)).sum(-1)


@cache
def _filter_bank(name: str) -> _FilterBank:
    try:
        wav = pywt.Wavelet(name)
    except ValueError as err:
        raise ValueError(f"unknown wavelet {name!r}: use a discrete wavelet of pywt") from err
    # pywt's convolution filters in correlation form; then the one circular shift that makes our
    # formulas equal pywt's periodization, found on a probe signal.
    a_lo, a_hi = np.asarray(wav.dec_lo[::-1]), np.asarray(wav.dec_hi[::-1])
    s_lo, s_hi = np.asarray(wav.rec_lo), np.asarray(wav.rec_hi)
    taps = len(a_lo)
    n = 4 * taps  # long enough that a signed shift in [-taps, taps) is unambiguous
    rng = np.random.default_rng(0)
    probe, c_lo, c_hi = rng.standard_normal(n), rng.standard_normal(n // 2), rng.standard_normal(n // 2)
    ref = np.concatenate(pywt.dwt(probe, wav, mode="periodization"))
    ref_rec = pywt.idwt(c_lo, c_hi, wav, mode="periodization")
    candidates = range(-taps, taps)
    shifts = [s for s in candidates if np.allclose(np.concatenate(_np_analysis(probe, a_lo, a_hi, s)), ref)]
    rec_shifts = [s for s in candidates if np.allclose(_np_synthesis(c_lo, c_hi, s_lo, s_hi, s), ref_rec)]
    if not shifts or not rec_shifts:
        raise ValueError(f"wavelet {name!r} has no periodic two-channel filter-bank form")
    return _FilterBank(a_lo, a_hi, s_lo, s_hi, shifts[0], rec_shifts[0])


def _analysis(x: Tensor, bank: _FilterBank, dim: int) -> tuple[Tensor, Tensor]:
    """Periodic analysis along ``dim`` of ``x``: returns ``(lo, hi)`` with that size halved."""
    z = x.movedim(dim, -1)
    n = z.shape[-1]
    idx = torch.as_tensor(_analysis_index(n, len(bank.a_lo), bank.shift), device=x.device)
    taps = z[..., idx]  # (..., n/2, L)
    f = torch.as_tensor(np.stack((bank.a_lo, bank.a_hi), -1), dtype=x.dtype, device=x.device)
    lo, hi = (taps @ f).unbind(-1)
    return lo.movedim(-1, dim), hi.movedim(-1, dim)


def _synthesis(lo: Tensor, hi: Tensor, bank: _FilterBank, dim: int) -> Tensor:
    """Inverse of ``_analysis`` along ``dim``: doubles that size."""
    lo, hi = lo.movedim(dim, -1), hi.movedim(dim, -1)
    n = 2 * lo.shape[-1]
    idx, mask = _synthesis_index(n, len(bank.s_lo), bank.rec_shift)
    idx = torch.as_tensor(idx, device=lo.device)
    w_lo = torch.as_tensor(mask * bank.s_lo, dtype=lo.dtype, device=lo.device)
    w_hi = torch.as_tensor(mask * bank.s_hi, dtype=lo.dtype, device=lo.device)
    x = (lo[..., idx] * w_lo + hi[..., idx] * w_hi).sum(-1)
    return x.movedim(-1, dim)


@lru_cache(maxsize=256)
def _filter_matrices(
    wavelet: str, n: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    bank = _filter_bank(wavelet)
    # Normal tensors even when first asked for under inference_mode: autograd may save them later.
    with torch.inference_mode(False):
        eye = torch.eye(n, dtype=torch.float64)
        analysis = torch.cat(_analysis(eye, bank, -1), -1)  # row k: [lo | hi] of the unit signal e_k
        synthesis = _synthesis(eye[:, : n // 2], eye[:, n // 2 :], bank, -1)  # row k: signal of coef k
        return analysis.to(dtype=dtype, device=device), synthesis.to(dtype=dtype, device=device)


def periodic_filter_matrices(
    wavelet: str, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """The periodic 1-D filter bank of ``wavelet`` on length-``n`` signals as two ``(n, n)`` matrices.

    ``analysis``: for a signal ``x`` of shape ``(..., n)``, ``x @ analysis`` is ``[lo | hi]`` (each
    ``n/2``), equal to ``pywt.dwt(x, wavelet, mode="periodization")``. ``synthesis``: ``[lo | hi] @
    synthesis`` inverts it (``pywt.idwt``); it is ``analysis.T`` for orthogonal wavelets. Both are
    read off the filter bank that :func:`dwt2` / :func:`idwt2` apply (the filter bank applied to the
    identity), so ``dwt2(x)`` is ``analysis_H.T @ x @ analysis_W`` with its blocks stacked
    subband-major. Cached per ``(wavelet, n, dtype, device)``: repeated calls cost no host-device copy.

    Args:
        wavelet: a discrete PyWavelets name.
        n: the signal length, even and positive.

    Raises:
        ValueError: an odd or non-positive ``n``, or an unknown wavelet.
    """
    if n <= 0 or n % 2:
        raise ValueError(f"periodic_filter_matrices needs an even positive length, got n={n}")
    return _filter_matrices(wavelet, n, dtype, torch.device(device or "cpu"))


def dwt2(x: Tensor, wavelet: str = "haar") -> Tensor:
    """One level of the 2-D DWT with periodic extension.

    Args:
        x: ``(B, C, H, W)`` tensor, ``H`` and ``W`` even; any float dtype and device.
        wavelet: a discrete PyWavelets name (``haar``, ``db2``, ``bior2.2``, ...).

    Returns:
        ``(B, 4C, H/2, W/2)``, subband-major ``[LL | LH | HL | HH]`` equal per channel to
        ``pywt.dwt2(x_c, wavelet, mode="periodization")``. Orthonormal (Parseval holds) for
        orthogonal wavelets; for biorthogonal ones energy is not preserved.

    Raises:
        ValueError: a tensor that is not 4-D, odd ``H`` or ``W``, or an unknown wavelet.
    """
    _check_even(x, "dwt2")
    if wavelet == "haar":
        return _HaarDWT2.apply(x)
    bank = _filter_bank(wavelet)
    lo_w, hi_w = _analysis(x, bank, -1)
    ll, lh = _analysis(lo_w, bank, -2)
    hl, hh = _analysis(hi_w, bank, -2)
    return torch.cat((ll, lh, hl, hh), 1)


def idwt2(y: Tensor, wavelet: str = "haar") -> Tensor:
    """Exact inverse of :func:`dwt2`: ``(B, 4C, h, w)`` subband-major -> ``(B, C, 2h, 2w)``.

    Raises:
        ValueError: a tensor that is not 4-D or whose channel count is not a multiple of 4.
    """
    if y.dim() != 4 or y.shape[1] % 4:
        raise ValueError(
            f"idwt2 expects (B, 4C, h, w) subband-major coefficients, got shape {tuple(y.shape)}"
        )
    if wavelet == "haar":
        return _HaarIDWT2.apply(y)
    bank = _filter_bank(wavelet)
    ll, lh, hl, hh = y.chunk(4, 1)
    lo_w = _synthesis(ll, lh, bank, -2)
    hi_w = _synthesis(hl, hh, bank, -2)
    return _synthesis(lo_w, hi_w, bank, -1)


class DWT2(nn.Module):
    """``nn.Module`` form of :func:`dwt2`: ``(B, C, H, W)`` -> ``(B, 4C, H/2, W/2)``."""

    def __init__(self, wavelet: str = "haar") -> None:
        super().__init__()
        if wavelet != "haar":
            _filter_bank(wavelet)  # fail at construction on an unknown name
        self.wavelet = wavelet

    def forward(self, x: Tensor) -> Tensor:
        return dwt2(x, self.wavelet)

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet!r}"


class IDWT2(DWT2):
    """``nn.Module`` form of :func:`idwt2`: ``(B, 4C, h, w)`` -> ``(B, C, 2h, 2w)``."""

    def forward(self, y: Tensor) -> Tensor:
        return idwt2(y, self.wavelet)

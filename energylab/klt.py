"""The data's KLT as AuxT's projection: decorrelation supplied exactly, nothing learned.

For the causal test of the paper's split (``python -m energylab.ablate --causal``) the OLP weight of
every WLS is set, before training, to the Karhunen-Loève transform of the vectors it projects: the
subband vectors (the DWT, before the subband scaling) of the auxiliary chain's input at that merge
point, computed on training crops. Where the projection narrows (``C_out <= 4 C_in``) its rows are
the ``C_out`` eigenvectors of largest eigenvalue; where it widens, the first ``4 C_in`` rows are all
eigenvectors and the others zero (an orthonormal completion: ``Wᵀ W = I``). Each stage's input is
the previous WLS's output with its KLT weight in place (scaling and bias as initialised). The iWLS
of the mirrored stage gets the transpose, the inverse of an orthonormal transform.

The KLT is the eigenbasis of the covariance (K. Karhunen 1947, M. Loève 1948; e.g. N. S. Jayant and
P. Noll, *Digital Coding of Waveforms*, 1984, ch. 12), computed in float64 with ``torch.linalg.eigh``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from energylab.auxt import WLS, iWLS
from energylab.wavelets import dwt2

__all__ = ["init_klt", "klt_projection", "subband_vectors"]


def subband_vectors(layer: WLS, x: Tensor) -> Tensor:
    """The subband vectors ``layer`` projects: ``x`` ``(B, C, H, W)`` -> ``(B·H/2·W/2, 4C)``,
    subband-major as the OLP sees them (before the scaling)."""
    c = x.shape[1]
    if layer.basis is None:
        coefficients = dwt2(x, layer.wavelet)
    else:
        kernel = torch.eye(4 * c, dtype=x.dtype, device=x.device).view(4 * c, 4, c).transpose(1, 2)
        kernel = kernel.reshape(-1, 4) @ layer.basis.to(x.dtype)
        coefficients = F.conv2d(x, kernel.view(4 * c, c, 2, 2), stride=2)
    return coefficients.permute(0, 2, 3, 1).reshape(-1, 4 * c)


def klt_projection(vectors: Tensor, out_features: int) -> Tensor:
    """The KLT of ``vectors`` ``(N, D)`` as an ``(out_features, D)`` weight: eigenvectors of the
    covariance by decreasing eigenvalue as rows, zero rows beyond ``D``; float64.

    Raises:
        ValueError: fewer than two vectors.
    """
    if vectors.shape[0] < 2:
        raise ValueError(f"the KLT needs at least two vectors, got {vectors.shape[0]}")
    v = vectors.detach().to(torch.float64)
    _, eigenvectors = torch.linalg.eigh(torch.cov(v.T))
    basis = eigenvectors.flip(1).T  # (D, D), rows by decreasing eigenvalue
    weight = torch.zeros(out_features, v.shape[1], dtype=torch.float64, device=v.device)
    rows = min(out_features, v.shape[1])
    weight[:rows] = basis[:rows]
    return weight


@torch.no_grad()
def init_klt(analysis: Sequence[WLS], synthesis: Sequence[iWLS], x: Tensor) -> None:
    """Set the OLP weight of every WLS of ``analysis`` (a model's ``g_a.auxiliary_layers``, in
    order) to the KLT of its input, computed on the training crops ``x`` ``(B, 3, H, W)``; each
    iWLS of ``synthesis`` (``g_s.auxiliary_layers``) gets the transpose of its mirrored WLS's.

    Raises:
        ValueError: no WLS, or an iWLS whose shape is not the mirror of a WLS.
    """
    if not analysis:
        raise ValueError("init_klt needs the WLS layers of a model with AuxT attached")
    a = x
    for layer in analysis:
        weight = layer.olp.linear.weight
        weight.copy_(klt_projection(subband_vectors(layer, a), weight.shape[0]))
        a = layer(a)
    for layer, mirror in zip(synthesis, reversed(analysis), strict=True):
        weight, source = layer.olp.linear.weight, mirror.olp.linear.weight
        if weight.shape != source.T.shape:
            raise ValueError(f"iWLS weight of shape {tuple(weight.shape)} is not the transpose of "
                             f"its mirrored WLS's {tuple(source.shape)}; the KLT needs mirrored widths")
        weight.copy_(source.T)

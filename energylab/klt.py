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
The covariances are accumulated over chunks of :data:`CHUNK_CROPS` crops (:func:`stage_moments`),
each moved to the layers' device in turn, so the crops may be many and stay on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energylab.auxt import WLS, iWLS
from energylab.wavelets import dwt2

__all__ = ["CHUNK_CROPS", "Moments", "covariance", "init_klt", "klt_projection", "stage_moments",
           "subband_vectors"]

CHUNK_CROPS = 512
"""Crops per forward pass of :func:`stage_moments`."""


class Moments(NamedTuple):
    """Moments of ``count`` vectors: ``mean`` ``(D,)`` and the unbiased ``covariance`` ``(D, D)``,
    float64. ``second`` is ``E[v vᵀ] = (count - 1) / count · covariance + mean meanᵀ``."""

    count: int
    mean: Tensor
    covariance: Tensor

    @property
    def second(self) -> Tensor:
        return (self.count - 1) / self.count * self.covariance + torch.outer(self.mean, self.mean)


class _Sums:
    """Float64 sums of vectors, their outer products and their count, over chunks."""

    def __init__(self) -> None:
        self.count, self.total, self.outer = 0, None, None

    def add(self, vectors: Tensor) -> None:
        v = vectors.detach().to(torch.float64)
        if self.total is None:
            self.total = torch.zeros(v.shape[1], dtype=torch.float64, device=v.device)
            self.outer = torch.zeros(v.shape[1], v.shape[1], dtype=torch.float64, device=v.device)
        self.count += v.shape[0]
        self.total += v.sum(0)
        self.outer += v.T @ v

    def moments(self) -> Moments:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least two vectors, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return Moments(self.count, mean, (cov + cov.T) / 2)


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


def covariance(vectors: Tensor) -> Tensor:
    """The unbiased covariance ``(D, D)`` of ``vectors`` ``(N, D)`` in float64 (as ``torch.cov`` of
    the rows).

    Raises:
        ValueError: fewer than two vectors.
    """
    sums = _Sums()
    sums.add(vectors)
    return sums.moments().covariance


def _device(layer: nn.Module) -> torch.device:
    return next((p.device for p in layer.parameters()), torch.device("cpu"))


@torch.no_grad()
def stage_moments(analysis: Sequence[WLS], stage: int, x: Tensor, chunk: int = CHUNK_CROPS) -> Moments:
    """The :class:`Moments` of the subband vectors that WLS ``analysis[stage]`` projects, for the
    crops ``x`` ``(B, 3, H, W)`` run through ``analysis[:stage]`` as they are, in chunks of
    ``chunk`` crops (each moved to the layers' device).

    Raises:
        ValueError: fewer than two vectors.
    """
    sums = _Sums()
    device = _device(analysis[stage])
    for part in x.split(chunk):
        a = part.to(device)
        for layer in analysis[:stage]:
            a = layer(a)
        sums.add(subband_vectors(analysis[stage], a))
    return sums.moments()


def _klt_weight(cov: Tensor, out_features: int) -> Tensor:
    _, eigenvectors = torch.linalg.eigh(cov)
    basis = eigenvectors.flip(1).T  # (D, D), rows by decreasing eigenvalue
    dim = cov.shape[0]
    weight = torch.zeros(out_features, dim, dtype=torch.float64, device=cov.device)
    rows = min(out_features, dim)
    weight[:rows] = basis[:rows]
    return weight


def klt_projection(vectors: Tensor, out_features: int) -> Tensor:
    """The KLT of ``vectors`` ``(N, D)`` as an ``(out_features, D)`` weight: eigenvectors of the
    covariance by decreasing eigenvalue as rows, zero rows beyond ``D``; float64.

    Raises:
        ValueError: fewer than two vectors.
    """
    if vectors.shape[0] < 2:
        raise ValueError(f"the KLT needs at least two vectors, got {vectors.shape[0]}")
    return _klt_weight(covariance(vectors), out_features)


@torch.no_grad()
def init_klt(analysis: Sequence[WLS], synthesis: Sequence[iWLS], x: Tensor, chunk: int = CHUNK_CROPS,
             stages: int | None = None) -> None:
    """Set the OLP weight of every WLS of ``analysis`` (a model's ``g_a.auxiliary_layers``, in
    order; with ``stages``, of the first ``stages`` only) to the KLT of its input, computed on the
    training crops ``x`` ``(B, 3, H, W)`` (on any device; :func:`stage_moments` in chunks of
    ``chunk`` crops); the iWLS of ``synthesis`` (``g_s.auxiliary_layers``) mirroring those get the
    transposes of their WLS's.

    Raises:
        ValueError: no WLS, or an iWLS whose shape is not the mirror of a WLS.
    """
    if not analysis:
        raise ValueError("init_klt needs the WLS layers of a model with AuxT attached")
    stages = len(analysis) if stages is None else stages
    for stage, layer in enumerate(analysis[:stages]):
        weight = layer.olp.linear.weight
        weight.copy_(_klt_weight(stage_moments(analysis, stage, x, chunk).covariance, weight.shape[0]))
    if len(synthesis) != len(analysis):
        raise ValueError(f"{len(synthesis)} iWLS do not mirror {len(analysis)} WLS")
    for layer, mirror in list(zip(reversed(synthesis), analysis, strict=True))[:stages]:
        weight, source = layer.olp.linear.weight, mirror.olp.linear.weight
        if weight.shape != source.T.shape:
            raise ValueError(f"iWLS weight of shape {tuple(weight.shape)} is not the transpose of "
                             f"its mirrored WLS's {tuple(source.shape)}; the KLT needs mirrored widths")
        weight.copy_(source.T)

"""AuxT building blocks: the wavelet-based linear shortcut (WLS), its inverse (iWLS) and the OLP.

Li et al., "On Disentangled Training for Nonlinear Transform in Learned Image Compression",
ICLR 2025, Sec. 4 (AuxT). A WLS is

    x (B, C, H, W) --Haar DWT--> (B, 4C, H/2, W/2) subband-major [LL | LH | HL | HH]
      --subband-aware scaling: * exp(s), s of shape (1, 1, 4C)-->
      --orthogonal linear projection (OLP): Linear(4C, C_out) at every position--> (B, C_out, H/2, W/2)

and the iWLS mirrors it: OLP ``Linear(C_in, 4 C_out)`` -> divide by ``exp(s)`` -> inverse DWT.
Parameter names (``olp.linear.weight``, ``scaling_factors``) follow the AuxT helpers of the
``compressai-temp`` fork so that checkpoints can move between the two.

Each of the three components can be removed on its own (``remove=...``), nothing else changing:

* ``wavelet``: the DWT becomes plain space-to-depth (the four polyphase samples of each 2x2 block,
  stacked phase-major like the subbands), i.e. with the projection a 2x2 stride-2 convolution;
* ``orthogonal``: the projection stays, its orthogonality penalty is not counted by :func:`ortho_loss`;
* ``scaling``: no scaling factors at all.

Beside removing, a component can be **frozen** (``freeze=...``, :data:`FREEZABLE`) or started
elsewhere, its forward unchanged (:func:`set_initial_values`):

* ``freeze=("scaling",)``: ``exp(s)`` stays at its initial value (``requires_grad`` off);
* ``freeze=("orthogonal",)``: the OLP weight stays at an orthogonal initialisation (the bias is
  still learned): decorrelation supplied, not learned;
* ``scaling_init="zero"``: ``s = 0`` (gain 1), learnable — the release's gain removed, not the
  component;
* ``projection_init``: ``"default"`` (``nn.Linear``'s), ``"orthogonal"`` (``nn.init.orthogonal_``)
  or ``"klt"`` (the data's KLT, :mod:`energylab.klt`); a frozen projection without one is orthogonal.

Speed: every path computes the same function as the three steps applied in turn (tested against
that formula, forward and gradients), with the scaling folded into the projection's weights.

* Haar and space-to-depth: the chain is linear over each 2x2 block, so the 2x2 basis folds into
  the projection too: one 2x2 stride-2 convolution (WLS), one 1x1 convolution before
  ``pixel_shuffle`` (iWLS).
* Other wavelets (``db4``, ``bior2.2``, ...): the periodic DWT is two dense matrix products, along
  ``W`` then ``H``, with :func:`energylab.wavelets.periodic_filter_matrices` (read off the tested
  filter bank, so pywt's alignment is inherited), then one 1x1 convolution whose weights are
  permuted to the products' ``(channel, H-band, W-band)`` order; the iWLS mirrors it. Folding the
  filters into the projection instead (one ``L x L`` stride-2 convolution, ``L`` the filter length)
  would cost ``L^2 / 4`` times the projection's arithmetic (16x for db4). A dense product costs
  ``n`` multiply-adds per sample and axis (``n`` the size along that axis): small beside the
  projection at training-crop sizes, growing on large images. ``bench/bench_auxt.py`` times every
  wavelet's AuxT step against the plain one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energylab.wavelets import dwt2, haar_kernels, periodic_filter_matrices

__all__ = ["COMPONENTS", "FREEZABLE", "OLP", "PROJECTION_INITS", "SCALING_INITS", "SPLIT_CELLS",
           "SPLIT_INITS", "WLS", "check_components", "check_options", "freeze_components", "iWLS",
           "ortho_loss", "set_initial_values", "variant_name"]

COMPONENTS = ("wavelet", "orthogonal", "scaling")
"""The removable WLS components, named as on the command line (``--remove``)."""

SCALING_INIT = (0.5, 0.5, 0.5, 0.0)
"""Initial ``s`` per subband block (LL, LH, HL, HH), from the official release."""
FREEZABLE = ("orthogonal", "scaling")
"""The components that can be frozen at their initial value (``--freeze``)."""
SCALING_INITS = ("release", "zero")
"""Initial ``s``: the release's :data:`SCALING_INIT`, or 0 (gain 1)."""
SPLIT_CELLS = ("A", "B", "C", "D", "E", "F")
"""The cells of the split grid (:mod:`energylab.split`)."""
SPLIT_INITS = tuple(f"split-{cell}" for cell in SPLIT_CELLS)
"""Projection inits of the split grid's cells: the earlier stages at the data's KLT, the last one at
the cell's weight (:func:`energylab.split.init_split`); frozen, without scaling."""
PROJECTION_INITS = ("default", "orthogonal", "klt", *SPLIT_INITS)
"""Initial OLP weight: ``nn.Linear``'s, ``nn.init.orthogonal_``, the data's KLT, or a split cell's."""


def check_components(remove: Iterable[str]) -> frozenset[str]:
    """Validate component names; returns them as a frozenset.

    Raises:
        ValueError: an unknown name, with the list of valid ones.
    """
    remove = frozenset(remove)
    unknown = sorted(remove - set(COMPONENTS))
    if unknown:
        raise ValueError(
            f"unknown AuxT component(s) {', '.join(map(repr, unknown))}; "
            f"valid names are: {', '.join(COMPONENTS)}"
        )
    return remove


def check_options(remove: Iterable[str] = (), freeze: Iterable[str] = (), scaling_init: str = "release",
                  projection_init: str = "default") -> tuple[frozenset[str], frozenset[str], str]:
    """Validate the component options together; returns ``(removed, frozen, projection_init)``,
    the projection init of a frozen projection made ``"orthogonal"`` when it is ``"default"``.

    Raises:
        ValueError: an unknown name, or options that contradict each other (freezing or
            re-initialising a removed component).
    """
    removed = check_components(remove)
    frozen = frozenset(freeze)
    unknown = sorted(frozen - set(FREEZABLE))
    if unknown:
        raise ValueError(f"cannot freeze {', '.join(map(repr, unknown))}; freezable components are: "
                         f"{', '.join(FREEZABLE)}")
    if scaling_init not in SCALING_INITS:
        raise ValueError(f"unknown scaling init {scaling_init!r}; valid: {', '.join(SCALING_INITS)}")
    if projection_init not in PROJECTION_INITS:
        raise ValueError(f"unknown projection init {projection_init!r}; valid: "
                         f"{', '.join(PROJECTION_INITS)}")
    both = sorted(frozen & removed)
    if both:
        raise ValueError(f"{', '.join(both)} is both removed and frozen; choose one")
    if scaling_init != "release" and "scaling" in removed:
        raise ValueError(f"scaling init {scaling_init!r} given, but scaling is removed")
    if projection_init in SPLIT_INITS and ("orthogonal" not in frozen or "scaling" not in removed):
        raise ValueError(f"projection init {projection_init!r} is a cell of the split grid: it needs the "
                         "projection frozen (freeze orthogonal) and the scaling removed (remove scaling)")
    if "orthogonal" in frozen and projection_init == "default":
        projection_init = "orthogonal"
    return removed, frozen, projection_init


def variant_name(auxt: bool, remove: Iterable[str] = (), wavelet: str = "haar", freeze: Iterable[str] = (),
                 scaling_init: str = "release", projection_init: str = "default") -> str:
    """The name of a model variant, as ablations, figures and evaluation write it.

    ``baseline`` without AuxT; else ``auxt`` (``auxt-<wavelet>`` for a basis other than Haar),
    followed by ``-no-<c1>[+<c2>...]`` for the removed components in ``COMPONENTS`` order, then
    ``-frozen-<c1>[+<c2>]`` for the frozen ones (a frozen projection is named by its init:
    ``orthogonal`` or ``klt``), then ``-projection-init-<p>`` for a learned projection started
    elsewhere than ``nn.Linear``'s init and ``-scaling-init-<s>`` for ``s`` started elsewhere than
    the release's: ``auxt``, ``auxt-no-scaling``, ``auxt-no-wavelet+scaling``, ``auxt-db4``,
    ``auxt-frozen-scaling``, ``auxt-frozen-klt+scaling``, ``auxt-scaling-init-zero``. A cell of the
    split grid is named by its projection init alone: ``split-A`` (``split-A-<wavelet>`` for a basis
    other than Haar).

    Raises:
        ValueError: an invalid option (:func:`check_options`), or options without AuxT.
    """
    removed, frozen, projection_init = check_options(remove, freeze, scaling_init, projection_init)
    if not auxt:
        if removed or frozen or scaling_init != "release" or projection_init != "default":
            raise ValueError("AuxT components can only be removed from an AuxT variant (or frozen or "
                             "re-initialised)")
        return "baseline"
    if projection_init in SPLIT_INITS:
        return projection_init if wavelet == "haar" else f"{projection_init}-{wavelet}"
    name = "auxt" if wavelet == "haar" else f"auxt-{wavelet}"
    ordered = [c for c in COMPONENTS if c in removed]
    name += "-no-" + "+".join(ordered) if ordered else ""
    held = [(projection_init if c == "orthogonal" else c) for c in FREEZABLE if c in frozen]
    name += "-frozen-" + "+".join(held) if held else ""
    if projection_init != "default" and "orthogonal" not in frozen:
        name += f"-projection-init-{projection_init}"
    return name + (f"-scaling-init-{scaling_init}" if scaling_init != "release" else "")


def set_initial_values(layers: Iterable[_Shortcut], scaling_init: str = "release",
                       projection_init: str = "default") -> None:
    """Re-initialise WLS/iWLS ``layers`` in place, in order: ``s = 0`` for ``scaling_init="zero"``;
    ``nn.init.orthogonal_`` on each OLP weight (the global RNG, one draw per layer) for
    ``projection_init="orthogonal"``. ``"release"``, ``"default"``, ``"klt"`` (set by
    :func:`energylab.klt.init_klt`) and the split cells' (:func:`energylab.split.init_split`) leave
    the layers as built."""
    for layer in layers:
        with torch.no_grad():
            if scaling_init == "zero" and layer.scaling_factors is not None:
                layer.scaling_factors.zero_()
        if projection_init == "orthogonal":
            nn.init.orthogonal_(layer.olp.linear.weight)


def freeze_components(layers: Iterable[_Shortcut], freeze: Iterable[str]) -> None:
    """Switch off ``requires_grad`` of the frozen components' parameters: ``scaling_factors`` for
    ``scaling``, the OLP weight (not its bias) for ``orthogonal``."""
    frozen = frozenset(freeze)
    for layer in layers:
        if "scaling" in frozen and layer.scaling_factors is not None:
            layer.scaling_factors.requires_grad_(False)
        if "orthogonal" in frozen:
            layer.olp.linear.weight.requires_grad_(False)


class OLP(nn.Module):
    """Orthogonal linear projection: ``Linear(in_features, out_features)`` plus a penalty.

    ``forward`` maps ``(..., in_features)`` to ``(..., out_features)``. ``loss()`` is
    ``MSE(W Wᵀ, I)`` when ``in_features > out_features`` and ``MSE(Wᵀ W, I)`` otherwise
    (``I`` of size ``min(in, out)``), as in the official release; it is weighted 0.1 in training.
    ``orthogonal=False`` keeps the projection but takes it out of :func:`ortho_loss`.
    """

    def __init__(self, in_features: int, out_features: int, orthogonal: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.orthogonal = orthogonal

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def loss(self) -> Tensor:
        """Orthogonality penalty, a scalar tensor (mean squared deviation of the Gram matrix)."""
        w = self.linear.weight  # (out, in)
        gram = w @ w.T if w.shape[1] > w.shape[0] else w.T @ w
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return F.mse_loss(gram, eye)


def _scaling_init(channels: int) -> Tensor:
    return torch.tensor(SCALING_INIT).repeat_interleave(channels).view(1, 1, 4 * channels)


def _polyphase_kernels() -> Tensor:
    """One-hot 2x2 kernels picking x[2h+i, 2w+j], phases (0,0), (0,1), (1,0), (1,1): ``(4, 2, 2)``."""
    return torch.eye(4).view(4, 2, 2)


class _Shortcut(nn.Module):
    """What WLS and iWLS share: the components, the OLP and the scaling factors."""

    analysis: bool
    """True for WLS (DWT then projection), False for iWLS (projection then inverse DWT)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        wavelet: str = "haar",
        remove: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        if self.analysis:
            olp_in, olp_out, subband_channels = 4 * in_channels, out_channels, in_channels
        else:
            olp_in, olp_out, subband_channels = in_channels, 4 * out_channels, out_channels
        remove = check_components(remove)
        self.wavelet = None if "wavelet" in remove else wavelet
        if self.wavelet not in (None, "haar"):
            dwt2(torch.zeros(1, 1, 2, 2), self.wavelet)  # unknown names fail here
        self.olp = OLP(olp_in, olp_out, orthogonal="orthogonal" not in remove)
        basis = _polyphase_kernels() if self.wavelet is None else (
            haar_kernels() if self.wavelet == "haar" else None)
        # (4 subbands, 4 pixels of a 2x2 block); not saved in the state dict
        self.register_buffer("basis", None if basis is None else basis.view(4, 4), persistent=False)
        if "scaling" not in remove:
            self.scaling_factors = nn.Parameter(_scaling_init(subband_channels))
        else:
            self.register_parameter("scaling_factors", None)

    @property
    def components(self) -> tuple[str, ...]:
        """The components that are on, in ``COMPONENTS`` order."""
        on = {
            "wavelet": self.wavelet is not None,
            "orthogonal": self.olp.orthogonal,
            "scaling": self.scaling_factors is not None,
        }
        return tuple(name for name in COMPONENTS if on[name])

    def _gain(self) -> Tensor | None:
        """``exp(s)`` as a flat ``(4C,)`` vector, or None without scaling."""
        return None if self.scaling_factors is None else self.scaling_factors.exp().flatten()

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet!r}, components={self.components}"


class WLS(_Shortcut):
    """Wavelet-based linear shortcut: ``(B, C_in, H, W)`` -> ``(B, C_out, H/2, W/2)``.

    DWT -> ``* exp(scaling_factors)`` (shape ``(1, 1, 4 C_in)``, init 0.5 for LL/LH/HL, 0 for HH)
    -> OLP ``Linear(4 C_in, C_out)`` at every position. ``H`` and ``W`` must be even.

    Raises:
        ValueError: unknown component or wavelet name; odd input size.
    """

    analysis = True

    def forward(self, x: Tensor) -> Tensor:
        weight = self.olp.linear.weight  # (C_out, 4 C_in)
        gain = self._gain()
        if gain is not None:
            weight = weight * gain
        if x.dim() != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"WLS needs a (B, C, H, W) input with even H and W, got shape {tuple(x.shape)}")
        c_out = self.out_channels
        if self.basis is None:
            # Periodic DWT as a_H.T @ x @ a_W: blocks (B, C, [lo|hi] along H, [lo|hi] along W); the
            # projection reads channels (c, band_H, band_W) where dwt2's subband b is band_H + 2 band_W.
            b, c, h, w = x.shape
            a_h, _ = periodic_filter_matrices(self.wavelet, h, x.dtype, x.device)
            a_w, _ = periodic_filter_matrices(self.wavelet, w, x.dtype, x.device)
            z = (a_h.T @ (x @ a_w)).view(b, c, 2, h // 2, 2, w // 2).transpose(3, 4)
            kernel = weight.view(c_out, 2, 2, c).permute(0, 3, 2, 1).reshape(c_out, 4 * c, 1, 1)
            return F.conv2d(z.reshape(b, 4 * c, h // 2, w // 2), kernel, self.olp.linear.bias)
        # Fold the 2x2 basis into the projection: kernel[o, c, i, j] = sum_b W[o, b, c] basis[b, (i, j)],
        # one 2x2 stride-2 convolution.
        kernel = weight.view(c_out, 4, -1).transpose(1, 2).reshape(-1, 4) @ self.basis
        return F.conv2d(x, kernel.view(c_out, -1, 2, 2), self.olp.linear.bias, stride=2)


class iWLS(_Shortcut):  # noqa: N801 - the paper's name
    """Inverse wavelet-based linear shortcut: ``(B, C_in, h, w)`` -> ``(B, C_out, 2h, 2w)``.

    OLP ``Linear(C_in, 4 C_out)`` at every position -> ``/ exp(scaling_factors)`` (shape
    ``(1, 1, 4 C_out)``, same initialisation as :class:`WLS`) -> inverse DWT.

    Raises:
        ValueError: unknown component or wavelet name.
    """

    analysis = False

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.olp.linear.weight, self.olp.linear.bias  # (4 C_out, C_in), (4 C_out,)
        gain = self._gain()
        if gain is not None:
            weight, bias = weight / gain[:, None], bias / gain
        c_out = self.out_channels
        if self.basis is None:
            # Projection to channels (o, band_H, band_W) (dwt2's subband b = band_H + 2 band_W), then
            # the periodic inverse DWT as s_H.T @ z @ s_W on the (B, C_out, [lo|hi] H, [lo|hi] W) blocks.
            weight = weight.view(2, 2, c_out, -1).permute(2, 1, 0, 3).reshape(4 * c_out, -1, 1, 1)
            bias = bias.view(2, 2, c_out).permute(2, 1, 0).reshape(-1)
            z = F.conv2d(x, weight, bias)
            b, _, h, w = z.shape
            z = z.view(b, c_out, 2, 2, h, w).transpose(3, 4).reshape(b, c_out, 2 * h, 2 * w)
            _, s_h = periodic_filter_matrices(self.wavelet, 2 * h, z.dtype, z.device)
            _, s_w = periodic_filter_matrices(self.wavelet, 2 * w, z.dtype, z.device)
            return s_h.T @ z @ s_w
        # Synthesis out[o, 2h+i, 2w+j] = sum_b z[b, o] basis[b, (i, j)], folded into the projection:
        # a 1x1 convolution to pixel_shuffle's (o, i, j) channel order, bias included.
        kernel = (weight.view(4, -1).T @ self.basis).view(c_out, -1, 4).transpose(1, 2)
        bias = (bias.view(4, c_out).T @ self.basis).reshape(-1)
        return F.pixel_shuffle(F.conv2d(x, kernel.reshape(4 * c_out, -1, 1, 1), bias), 2)


def ortho_loss(model: nn.Module) -> Tensor:
    """Sum of :meth:`OLP.loss` over every OLP in ``model`` whose ``orthogonal`` component is on.

    Not CompressAI's ``aux_loss`` (the entropy bottleneck's quantile loss): the two stay apart.
    Returns a zero scalar on the model's device when there is no such OLP.
    """
    losses = [m.loss() for m in model.modules() if isinstance(m, OLP) and m.orthogonal]
    if losses:
        return torch.stack(losses).sum()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros((), device=device)

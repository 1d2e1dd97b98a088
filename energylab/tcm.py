"""TCM: mixed Transformer-CNN learned image compression (Liu, Sun, Katto, CVPR 2023).

Written from the paper and the facts of its public release (``jmliu206/LIC_TCM``, ``models/tcm.py``):
module and parameter names, layer order, widths and merge points are the release's, so its state
dicts load into :class:`TCM` key for key (``N`` = 64 / 96 / 128 for its small / medium / large
models, ``M`` = 320). The code is energylab's own.

Architecture (``N`` = half of the paper's ``C``: the channels of each of a TCM block's two branches):

* ``g_a`` (``nn.Sequential``, 10 layers): ``ResidualBlockWithStride(3, 2N)``, 2 TCM blocks,
  ``ResidualBlockWithStride(2N, 2N)``, 2 TCM blocks, ``ResidualBlockWithStride(2N, 2N)``, 2 TCM blocks,
  ``conv3x3(2N, M, stride=2)`` -- downsampling at layers 0, 3, 6, 9;
* ``g_s`` (10 layers): ``ResidualBlockUpsample(M, 2N)``, 2 TCM blocks, ``ResidualBlockUpsample(2N, 2N)``,
  2 blocks, ``ResidualBlockUpsample(2N, 2N)``, 2 blocks, ``subpel_conv3x3(2N, 3, 2)`` -- upsampling at
  0, 3, 6, 9;
* a TCM block (:class:`ConvTransBlock`): ``conv1_1`` (1x1) splits ``2N`` channels into a CNN branch
  (``conv_block``, a residual block) and a Swin-transformer branch (``trans_block``, (shifted) window
  attention, alternating ``W`` / ``SW``); ``conv1_2`` (1x1) fuses their concatenation, added to the input;
* hyperprior ``h_a`` (``M`` -> ``hyper_channels`` = 192 at 1/4 of ``y``'s size), ``h_mean_s`` and
  ``h_scale_s`` (back to ``M``), with TCM blocks of head dim 32 and window 4;
* channel-wise autoregressive entropy model on ``num_slices`` slices of ``y``: per slice, the SWAtten
  modules ``atten_mean`` / ``atten_scale`` on the hyperprior output plus up to ``max_support_slices``
  decoded slices, ``cc_mean_transforms`` / ``cc_scale_transforms`` giving the Gaussian's mean and scale,
  and ``lrp_transforms`` (latent residual prediction, ``0.5 * tanh``) refining the decoded slice.

Sizes: ``forward`` needs H and W multiples of 16 (the hyperprior's output is cropped to ``y``'s size,
which the release does only for the means and scales, so it needs multiples of 64); ``compress`` /
``decompress`` need multiples of 64 (``decompress`` reads ``y``'s size as 4x ``z``'s). Feature maps
that are not a multiple of the attention window are zero-padded on the right and bottom before window
attention and cropped after; at sizes the release accepts (multiples of the window, larger than it)
nothing is padded and the arithmetic is the release's.

Differences from the release, none of which changes a parameter name or shape: ``compress`` writes one
``y`` string per image (the release: one string for the whole batch, so batch 1 only); drop-path rates
rise linearly over the 12 blocks of ``g_a`` then ``g_s`` (the release's code gives every stage's two
blocks the schedule's first two values; its training used rate 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import (
    AttentionBlock,
    ResidualBlock,
    ResidualBlockUpsample,
    ResidualBlockWithStride,
    conv1x1,
    conv3x3,
    subpel_conv3x3,
)
from compressai.models import CompressionModel
from compressai.models.utils import conv
from timm.layers import DropPath, trunc_normal_
from timm.models.swin_transformer import get_relative_position_index, window_partition, window_reverse
from torch import Tensor, nn

__all__ = ["NUM_SLICES", "TCM", "ConvTransBlock", "SWAtten", "SwinBlock", "TransformerBlock", "WMSA",
           "build_tcm"]

HEAD_DIM = (8, 16, 32, 32, 16, 8)
"""The release's attention head widths for the three stages of ``g_a`` then of ``g_s``."""
CONFIG = (2, 2, 2, 2, 2, 2)
"""The release's number of TCM blocks per stage (``g_a`` stages 1-3, ``g_s`` stages 1-3)."""
NUM_SLICES = 5
"""The release's channel slices of ``y`` in the entropy model (``M`` must be a multiple)."""


def ste_round(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return torch.round(x) - x.detach() + x


class WMSA(nn.Module):
    """(Shifted-)window multi-head self-attention on channels-last maps ``(B, H, W, C)``.

    ``C / head_dim`` heads attend within non-overlapping ``window_size`` x ``window_size`` windows, with
    a learned relative-position bias ``relative_position_params`` of shape ``(heads, 2w-1, 2w-1)``;
    ``shifted`` rolls the map by ``-window_size // 2`` first and masks attention between the wrapped-around
    regions (Swin Transformer). Parameter names follow the TCM release (``embedding_layer`` = qkv,
    ``linear`` = output projection).

    Raises:
        ValueError: ``head_dim`` does not divide ``input_dim``.
    """

    def __init__(self, input_dim: int, output_dim: int, head_dim: int, window_size: int, shifted: bool):
        super().__init__()
        if input_dim % head_dim:
            raise ValueError(f"attention head dim {head_dim} does not divide the {input_dim} channels")
        self.head_dim = head_dim
        self.n_heads = input_dim // head_dim
        self.window_size = window_size
        self.shifted = shifted
        self.embedding_layer = nn.Linear(input_dim, 3 * input_dim)
        self.relative_position_params = nn.Parameter(
            torch.zeros(self.n_heads, 2 * window_size - 1, 2 * window_size - 1)
        )
        trunc_normal_(self.relative_position_params, std=0.02)
        self.linear = nn.Linear(input_dim, output_dim)
        index = get_relative_position_index(window_size, window_size)
        self.register_buffer("relative_position_index", index, persistent=False)

    def _shift_mask(self, height: int, width: int, device: torch.device) -> Tensor:
        """``(windows, w*w, w*w)`` bool, True where attention crosses regions of the rolled map."""
        w, s = self.window_size, self.window_size // 2
        rows = torch.zeros(height, dtype=torch.long, device=device)
        rows[height - w : height - s] = 1
        rows[height - s :] = 2
        cols = torch.zeros(width, dtype=torch.long, device=device)
        cols[width - w : width - s] = 1
        cols[width - s :] = 2
        region = (3 * rows[:, None] + cols[None, :])[None, :, :, None]
        region = window_partition(region, (w, w)).reshape(-1, w * w)
        return region[:, :, None] != region[:, None, :]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, output_dim)``."""
        batch, height, width, channels = x.shape
        w = self.window_size
        pad_h, pad_w = -height % w, -width % w
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = height + pad_h, width + pad_w
        if self.shifted:
            x = torch.roll(x, shifts=(-(w // 2), -(w // 2)), dims=(1, 2))
        windows = window_partition(x, (w, w)).reshape(batch, -1, w * w, channels)
        qkv = self.embedding_layer(windows).reshape(batch, -1, w * w, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # (B, windows, heads, w*w, head_dim)
        attn = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        bias = self.relative_position_params.flatten(1)[:, self.relative_position_index]
        attn = attn + bias  # (heads, w*w, w*w) broadcast over batch and windows
        if self.shifted:
            mask = self._shift_mask(hp, wp, x.device)[:, None]
            attn = attn.masked_fill(mask, float("-inf"))
        out = (attn.softmax(dim=-1) @ v).transpose(2, 3).reshape(batch, -1, w * w, channels)
        out = self.linear(out)
        out = window_reverse(out.reshape(-1, w, w, out.shape[-1]), (w, w), hp, wp)
        if self.shifted:
            out = torch.roll(out, shifts=(w // 2, w // 2), dims=(1, 2))
        return out[:, :height, :width]


class TransformerBlock(nn.Module):
    """Swin-transformer block on ``(B, H, W, C)``: ``x + msa(ln1(x))`` then ``x + mlp(ln2(x))``
    (MLP ratio 4, GELU), each residual branch through stochastic depth ``drop_path``."""

    def __init__(self, dim: int, head_dim: int, window_size: int, drop_path: float, shifted: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.msa = WMSA(dim, dim, head_dim, window_size, shifted)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.msa(self.ln1(x)))
        return x + self.drop_path(self.mlp(self.ln2(x)))


class ConvTransBlock(nn.Module):
    """TCM block on ``(B, conv_dim + trans_dim, H, W)`` (shape kept).

    ``conv1_1`` (1x1) output is split into ``conv_dim`` channels for the CNN branch
    (``conv_block(c) + c``, ``conv_block`` a CompressAI ``ResidualBlock``) and ``trans_dim`` channels for
    the transformer branch (``trans_block``, window attention, shifted if ``shifted``); ``conv1_2`` (1x1)
    fuses their concatenation, which is added to the input.
    """

    def __init__(
        self, conv_dim: int, trans_dim: int, head_dim: int, window_size: int, drop_path: float, shifted: bool
    ):
        super().__init__()
        self.conv_dim, self.trans_dim = conv_dim, trans_dim
        self.trans_block = TransformerBlock(trans_dim, head_dim, window_size, drop_path, shifted)
        self.conv1_1 = nn.Conv2d(conv_dim + trans_dim, conv_dim + trans_dim, 1)
        self.conv1_2 = nn.Conv2d(conv_dim + trans_dim, conv_dim + trans_dim, 1)
        self.conv_block = ResidualBlock(conv_dim, conv_dim)

    def forward(self, x: Tensor) -> Tensor:
        conv_x, trans_x = torch.split(self.conv1_1(x), (self.conv_dim, self.trans_dim), dim=1)
        conv_x = self.conv_block(conv_x) + conv_x
        trans_x = self.trans_block(trans_x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.conv1_2(torch.cat((conv_x, trans_x), dim=1))


class SwinBlock(nn.Module):
    """A window (``block_1``) then a shifted-window (``block_2``) transformer block on
    ``(B, C, H, W)`` (shape kept)."""

    def __init__(self, dim: int, head_dim: int, window_size: int, drop_path: float):
        super().__init__()
        self.block_1 = TransformerBlock(dim, head_dim, window_size, drop_path, shifted=False)
        self.block_2 = TransformerBlock(dim, head_dim, window_size, drop_path, shifted=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class SWAtten(AttentionBlock):
    """Swin-transformer attention module of TCM's entropy model, with channel squeezing.

    ``(B, input_dim, H, W)`` -> ``(B, output_dim, H, W)``: ``in_conv`` (1x1) squeezes to ``inter_dim``
    channels ``u``; ``out_conv`` (1x1) maps ``conv_a(u) * sigmoid(conv_b(non_local_block(u))) + u`` back.
    ``conv_a`` / ``conv_b`` are CompressAI's ``AttentionBlock`` branches (Cheng et al. 2020) with the
    non-local part replaced by a :class:`SwinBlock`.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        head_dim: int,
        window_size: int,
        drop_path: float,
        inter_dim: int,
    ):
        super().__init__(N=inter_dim)
        self.non_local_block = SwinBlock(inter_dim, head_dim, window_size, drop_path)
        self.in_conv = conv1x1(input_dim, inter_dim)
        self.out_conv = conv1x1(inter_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_conv(x)
        out = self.conv_a(x) * torch.sigmoid(self.conv_b(self.non_local_block(x))) + x
        return self.out_conv(out)


def _slice_transform(in_channels: int, out_channels: int) -> nn.Sequential:
    """The release's 3-layer slice network: conv3x3 to 224, GELU, to 128, GELU, to ``out_channels``."""
    return nn.Sequential(
        conv(in_channels, 224, kernel_size=3, stride=1),
        nn.GELU(),
        conv(224, 128, kernel_size=3, stride=1),
        nn.GELU(),
        conv(128, out_channels, kernel_size=3, stride=1),
    )


class TCM(CompressionModel):
    """TCM image codec (Liu et al., CVPR 2023) as a CompressAI ``CompressionModel``.

    Args:
        N: channels of each branch of a TCM block (64 / 96 / 128: the release's small / medium / large).
        M: channels of the latent ``y`` (320 in the release); a multiple of ``num_slices``.
        config: TCM blocks per stage, ``g_a`` stages 1-3 then ``g_s`` stages 1-3; ``h_a`` uses
            ``config[0]`` blocks and ``h_mean_s`` / ``h_scale_s`` ``config[3]``.
        head_dim: attention head width per stage, same order as ``config``; each must divide ``N``.
        window_size: attention window of ``g_a``, ``g_s`` and the SWAtten modules (8).
        drop_path_rate: largest stochastic-depth rate (linear over the blocks of ``g_a`` then ``g_s``).
        num_slices: channel slices of ``y`` in the entropy model (5).
        max_support_slices: how many decoded slices condition the next (5; negative: all).
        hyper_channels: channels of the hyper-latent ``z`` (192 in the release).
        hyper_head_dim, hyper_window_size: attention of the hyperprior's TCM blocks (32, 4).
        atten_dim, atten_head_dim: SWAtten's squeezed width and head width (128, 16).

    ``forward(x)``: ``x`` ``(B, 3, H, W)`` in [0, 1], H and W multiples of 16 -> ``{"x_hat": (B, 3, H, W),
    "likelihoods": {"y": (B, M, H/16, W/16), "z": (B, hyper_channels, H/64, W/64)}}``.
    ``compress`` / ``decompress``: real rANS bitstreams, ``{"strings": [y strings, z strings] (one bytes
    per image each), "shape": z's (h, w)}``; H, W multiples of 64; call ``update()`` first.

    Raises:
        ValueError: ``M`` not a multiple of ``num_slices``, a head dim that does not divide its stage's
            width, or ``config`` / ``head_dim`` not of length 6.
    """

    def __init__(
        self,
        N: int = 64,
        M: int = 320,
        config: Sequence[int] = CONFIG,
        head_dim: Sequence[int] = HEAD_DIM,
        window_size: int = 8,
        drop_path_rate: float = 0.0,
        num_slices: int = NUM_SLICES,
        max_support_slices: int = 5,
        hyper_channels: int = 192,
        hyper_head_dim: int = 32,
        hyper_window_size: int = 4,
        atten_dim: int = 128,
        atten_head_dim: int = 16,
    ):
        super().__init__()
        if len(config) != 6 or len(head_dim) != 6:
            raise ValueError(
                f"TCM needs 6 stages in config and head_dim, got {len(config)} and {len(head_dim)}"
            )
        if M % num_slices:
            raise ValueError(f"TCM latent width M={M} is not a multiple of num_slices={num_slices}")
        self.N, self.M = N, M
        self.num_slices = num_slices
        self.max_support_slices = max_support_slices
        rates = torch.linspace(0, drop_path_rate, sum(config)).tolist()

        def stage(k: int) -> list[nn.Module]:
            first = sum(config[:k])
            return [
                ConvTransBlock(N, N, head_dim[k], window_size, rates[first + i], shifted=i % 2 == 1)
                for i in range(config[k])
            ]

        def hyper_stage(blocks: int) -> list[nn.Module]:
            return [
                ConvTransBlock(N, N, hyper_head_dim, hyper_window_size, 0.0, shifted=i % 2 == 1)
                for i in range(blocks)
            ]

        self.g_a = nn.Sequential(
            ResidualBlockWithStride(3, 2 * N, stride=2),
            *stage(0),
            ResidualBlockWithStride(2 * N, 2 * N, stride=2),
            *stage(1),
            ResidualBlockWithStride(2 * N, 2 * N, stride=2),
            *stage(2),
            conv3x3(2 * N, M, stride=2),
        )
        self.g_s = nn.Sequential(
            ResidualBlockUpsample(M, 2 * N, 2),
            *stage(3),
            ResidualBlockUpsample(2 * N, 2 * N, 2),
            *stage(4),
            ResidualBlockUpsample(2 * N, 2 * N, 2),
            *stage(5),
            subpel_conv3x3(2 * N, 3, 2),
        )
        self.h_a = nn.Sequential(
            ResidualBlockWithStride(M, 2 * N, stride=2),
            *hyper_stage(config[0]),
            conv3x3(2 * N, hyper_channels, stride=2),
        )
        self.h_mean_s = nn.Sequential(
            ResidualBlockUpsample(hyper_channels, 2 * N, 2),
            *hyper_stage(config[3]),
            subpel_conv3x3(2 * N, M, 2),
        )
        self.h_scale_s = nn.Sequential(
            ResidualBlockUpsample(hyper_channels, 2 * N, 2),
            *hyper_stage(config[3]),
            subpel_conv3x3(2 * N, M, 2),
        )

        width = M // num_slices
        support = [M + width * self._n_support(i) for i in range(num_slices)]

        def attention(i: int) -> nn.Sequential:
            return nn.Sequential(
                SWAtten(support[i], support[i], atten_head_dim, window_size, 0.0, inter_dim=atten_dim)
            )

        self.atten_mean = nn.ModuleList(attention(i) for i in range(num_slices))
        self.atten_scale = nn.ModuleList(attention(i) for i in range(num_slices))
        self.cc_mean_transforms = nn.ModuleList(_slice_transform(c, width) for c in support)
        self.cc_scale_transforms = nn.ModuleList(_slice_transform(c, width) for c in support)
        self.lrp_transforms = nn.ModuleList(_slice_transform(c + width, width) for c in support)

        self.entropy_bottleneck = EntropyBottleneck(hyper_channels)
        self.gaussian_conditional = GaussianConditional(None)

    input_multiple = 16
    """``forward`` takes H and W multiples of 16 (the hyperprior's output is cropped to ``y``)."""

    @property
    def downsampling_factor(self) -> int:
        """64: ``compress`` / ``decompress`` need H and W multiples of this (``y`` is 1/16, ``z`` 1/64)."""
        return 2 ** (4 + 2)

    def _n_support(self, slice_index: int) -> int:
        """How many decoded slices condition slice ``slice_index``."""
        if self.max_support_slices < 0:
            return slice_index
        return min(slice_index, self.max_support_slices)

    def _hyper_synthesis(self, z_hat: Tensor, size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``h_mean_s(z_hat)``, ``h_scale_s(z_hat)``, cropped to ``y``'s spatial ``size``."""
        h, w = size
        return self.h_mean_s(z_hat)[:, :, :h, :w], self.h_scale_s(z_hat)[:, :, :h, :w]

    def _slice_params(
        self, slice_index: int, latent_means: Tensor, latent_scales: Tensor, decoded: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, scale and mean support of slice ``slice_index`` given the ``decoded`` slices."""
        support = decoded[: self._n_support(slice_index)]
        mean_support = self.atten_mean[slice_index](torch.cat([latent_means, *support], dim=1))
        mu = self.cc_mean_transforms[slice_index](mean_support)
        scale_support = self.atten_scale[slice_index](torch.cat([latent_scales, *support], dim=1))
        scale = self.cc_scale_transforms[slice_index](scale_support)
        return mu, scale, mean_support

    def _refine(self, slice_index: int, mean_support: Tensor, y_hat_slice: Tensor) -> Tensor:
        """Latent residual prediction: ``y_hat_slice + 0.5 * tanh(lrp)``."""
        lrp = self.lrp_transforms[slice_index](torch.cat([mean_support, y_hat_slice], dim=1))
        return y_hat_slice + 0.5 * torch.tanh(lrp)

    def forward(self, x: Tensor) -> dict:
        y = self.g_a(x)
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        z_offset = self.entropy_bottleneck._get_medians()
        z_hat = ste_round(z - z_offset) + z_offset
        latent_means, latent_scales = self._hyper_synthesis(z_hat, y.shape[2:])

        y_hat_slices: list[Tensor] = []
        y_likelihoods = []
        for i, y_slice in enumerate(y.chunk(self.num_slices, dim=1)):
            mu, scale, mean_support = self._slice_params(i, latent_means, latent_scales, y_hat_slices)
            _, likelihood = self.gaussian_conditional(y_slice, scale, mu)
            y_likelihoods.append(likelihood)
            y_hat_slices.append(self._refine(i, mean_support, ste_round(y_slice - mu) + mu))

        x_hat = self.g_s(torch.cat(y_hat_slices, dim=1))
        return {"x_hat": x_hat, "likelihoods": {"y": torch.cat(y_likelihoods, dim=1), "z": z_likelihoods}}

    def _coding_tables(self) -> tuple[list, list, list]:
        gc = self.gaussian_conditional
        return (
            gc.quantized_cdf.tolist(),
            gc.cdf_length.reshape(-1).int().tolist(),
            gc.offset.reshape(-1).int().tolist(),
        )

    def compress(self, x: Tensor) -> dict:
        y = self.g_a(x)
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        latent_means, latent_scales = self._hyper_synthesis(z_hat, y.shape[2:])

        cdf, cdf_lengths, offsets = self._coding_tables()
        encoders = [BufferedRansEncoder() for _ in range(x.shape[0])]
        y_hat_slices: list[Tensor] = []
        for i, y_slice in enumerate(y.chunk(self.num_slices, dim=1)):
            mu, scale, mean_support = self._slice_params(i, latent_means, latent_scales, y_hat_slices)
            indexes = self.gaussian_conditional.build_indexes(scale)
            symbols = self.gaussian_conditional.quantize(y_slice, "symbols", mu)
            for encoder, sym, idx in zip(encoders, symbols, indexes, strict=True):
                encoder.encode_with_indexes(
                    sym.reshape(-1).tolist(), idx.reshape(-1).tolist(), cdf, cdf_lengths, offsets
                )
            y_hat_slices.append(
                self._refine(i, mean_support, self.gaussian_conditional.dequantize(symbols, mu))
            )

        y_strings = [encoder.flush() for encoder in encoders]
        return {"strings": [y_strings, z_strings], "shape": z.shape[-2:]}

    def decompress(self, strings: list, shape) -> dict:
        """Inverse of :meth:`compress`: ``strings`` = ``[y strings, z strings]``, ``shape`` = z's (h, w).

        Returns ``{"x_hat": (B, 3, 64h, 64w)}`` clamped to [0, 1].
        """
        y_strings, z_strings = strings
        z_hat = self.entropy_bottleneck.decompress(z_strings, shape)
        latent_means, latent_scales = self.h_mean_s(z_hat), self.h_scale_s(z_hat)  # y's size: 4x z's

        cdf, cdf_lengths, offsets = self._coding_tables()
        decoders = []
        for y_string in y_strings:
            decoder = RansDecoder()
            decoder.set_stream(y_string)
            decoders.append(decoder)
        y_hat_slices: list[Tensor] = []
        for i in range(self.num_slices):
            mu, scale, mean_support = self._slice_params(i, latent_means, latent_scales, y_hat_slices)
            indexes = self.gaussian_conditional.build_indexes(scale)
            symbols = torch.stack(
                [
                    torch.tensor(
                        decoder.decode_stream(idx.reshape(-1).tolist(), cdf, cdf_lengths, offsets),
                        dtype=torch.int32,
                        device=mu.device,
                    ).reshape(idx.shape)
                    for decoder, idx in zip(decoders, indexes, strict=True)
                ]
            )
            y_hat_slices.append(
                self._refine(i, mean_support, self.gaussian_conditional.dequantize(symbols, mu))
            )

        x_hat = self.g_s(torch.cat(y_hat_slices, dim=1)).clamp_(0, 1)
        return {"x_hat": x_hat}


def build_tcm(N: int | None = None, M: int | None = None, drop_path_rate: float = 0.1) -> TCM:
    """TCM for energylab's registry: ``N`` (default 64, the AuxT release's) and ``M`` (default 320).

    Head widths are the release's (``HEAD_DIM``, hyperprior 32, SWAtten 16), each reduced to its
    greatest common divisor with the width it splits, so that small test widths (e.g. ``N=16``) keep
    valid heads; at the release's widths (N = 64 / 96 / 128) they are unchanged. The attention window
    stays 8 (4 in the hyperprior); smaller maps are padded (see the module docstring). Stochastic depth
    up to ``drop_path_rate`` = 0.1 (the release's constructor defaults to 0 and its ``train.py`` passes 0).

    Raises:
        ValueError: as :class:`TCM`.
    """
    N = 64 if N is None else N
    M = 320 if M is None else M
    return TCM(
        N=N,
        M=M,
        head_dim=[math.gcd(h, N) for h in HEAD_DIM],
        hyper_head_dim=math.gcd(32, N),
        drop_path_rate=drop_path_rate,
    )

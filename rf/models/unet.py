"""DDPM++-style UNet velocity network for rectified flow.

The architecture follows the DDPM++ configuration of Song et al. (2021,
"Score-Based Generative Modeling through SDEs"), which the rectified flow paper
(Liu, Gong & Liu, ICLR 2023) uses for CIFAR-10:

* time ``t`` in [0, 1] is multiplied by ``time_embed_scale`` (999 by default,
  matching how the reference code feeds continuous time to DDPM++), turned into
  a sinusoidal (positional) embedding of width ``base_channels`` and passed
  through a 2-layer MLP (Linear -> SiLU -> Linear) of width ``4*base_channels``;
* a 3x3 input conv, then a down path with ``num_res_blocks`` residual blocks per
  resolution (self-attention after every block at resolutions listed in
  ``attn_resolutions``) and one resampling step between resolutions;
* a middle section ResBlock -> Attention -> ResBlock at the lowest resolution;
* an up path with ``num_res_blocks + 1`` residual blocks per resolution, each
  consuming one skip connection from the down path (concatenated on channels),
  attention once per listed resolution, and an upsampling step between levels;
* GroupNorm -> SiLU -> 3x3 output conv.

Residual blocks are GroupNorm -> SiLU -> conv3x3 -> (+ time projection) ->
GroupNorm -> SiLU -> dropout -> conv3x3, with a 1x1 conv on the shortcut when
needed; with ``skip_rescale`` the sum of branch and shortcut is scaled by
1/sqrt(2) (also in attention blocks). With ``resblock_type="biggan"`` (the
DDPM++ default) resampling is done *inside* dedicated residual blocks
(nearest-neighbour upsampling / 2x2 average pooling on both the branch and the
shortcut); with ``resblock_type="ddpm"`` it is done by separate
:class:`Downsample` / :class:`Upsample` layers, which use a learned 3x3 conv
when ``resample_with_conv`` is true (as in score_sde, ``resample_with_conv`` has
no effect for BigGAN-style blocks).

The last conv of every residual block, the output projection of every attention
block and the output conv are zero-initialised, so a fresh model predicts a
velocity of exactly zero. Other convs/linears use Xavier-uniform weights (the
"fan_avg" uniform init of the reference code) and zero biases.

Only GroupNorm is used and attention is within a sample, so each sample's output
depends only on that sample (no batch statistics).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rf.options.models import UNetOptions

__all__ = [
    "UNet",
    "TimestepEmbedding",
    "ResBlock",
    "AttnBlock",
    "Downsample",
    "Upsample",
    "group_count",
    "sinusoidal_embedding",
]

_GN_EPS = 1e-6
_RESBLOCK_TYPES = ("biggan", "ddpm")


def group_count(num_groups: int, channels: int) -> int:
    """Number of GroupNorm groups actually used for ``channels`` channels.

    The largest divisor of ``channels`` that is at most
    ``min(num_groups, channels // 4)`` (and at least 1): it always divides
    ``channels`` and keeps >= 4 channels per group where possible, like
    DDPM++'s ``min(channels // 4, 32)``. Groups of a single channel would make
    GroupNorm erase the per-channel time-embedding shift in residual blocks.
    """
    cap = max(1, min(int(num_groups), int(channels) // 4))
    return max(d for d in range(1, cap + 1) if channels % d == 0)


def _norm(num_groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(num_groups, channels), channels, eps=_GN_EPS)


def _zero_(module: nn.Module) -> nn.Module:
    """Zero a module's weight and bias in place and return it."""
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoidal embedding of a 1-D tensor, shape (B, dim).

    The first half holds sines, the second half cosines, with frequencies
    geometrically spaced from 1 down to ``1/max_period``; an odd ``dim`` is
    zero-padded.
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of ``scale * t`` followed by Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, scale: float) -> None:
        super().__init__()
        self.dim = dim
        self.scale = scale
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, t: Tensor) -> Tensor:
        emb = sinusoidal_embedding(t.float() * self.scale, self.dim)
        emb = emb.to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(emb)))


class Downsample(nn.Module):
    """Halve the resolution: stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            return self.conv(x)
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.conv is not None:
            x = self.conv(x)
        return x


class ResBlock(nn.Module):
    """Time-conditioned residual block, optionally resampling (BigGAN-style).

    ``resample`` is ``None``, ``"up"`` or ``"down"``; when set, both the branch
    (after the first norm/activation) and the shortcut are resampled without
    parameters, and the shortcut gets a 1x1 conv (as in DDPM++).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_dim: int,
        num_groups: int,
        dropout: float,
        skip_rescale: bool,
        resample: str | None = None,
    ) -> None:
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.skip_rescale = skip_rescale
        if resample == "up":
            self.resample: nn.Module | None = Upsample(in_channels, with_conv=False)
        elif resample == "down":
            self.resample = Downsample(in_channels, with_conv=False)
        else:
            self.resample = None
        self.norm1 = _norm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_channels)
        self.norm2 = _norm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        needs_proj = in_channels != out_channels or resample is not None
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if needs_proj else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        if self.resample is not None:
            h = self.resample(h)
            x = self.resample(x)
        h = self.conv1(h)
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        out = x + h
        return out * (1.0 / math.sqrt(2.0)) if self.skip_rescale else out


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of each sample, with a residual."""

    def __init__(self, channels: int, num_groups: int, skip_rescale: bool) -> None:
        super().__init__()
        self.skip_rescale = skip_rescale
        self.norm = _norm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, hgt * wid)
        # (B, 3, C, N) -> three tensors of shape (B, N, C)
        q, k, v = (qkv[:, i].transpose(1, 2) for i in range(3))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(1, 2).reshape(b, c, hgt, wid)
        out = x + self.proj(h)
        return out * (1.0 / math.sqrt(2.0)) if self.skip_rescale else out


class UNet(nn.Module):
    """DDPM++ UNet predicting a velocity ``v(x, t)`` with the shape of ``x``.

    Keyword options (checked by :class:`rf.options.models.UNetOptions`):
        in_channels: image channels (also the output channels).
        resolution: input height/width (square images); must be divisible by
            ``2 ** (len(channel_mult) - 1)``.
        base_channels: width of the first level (``nf``); level ``i`` has
            ``base_channels * channel_mult[i]`` channels; the time MLP is
            ``4 * base_channels`` wide.
        channel_mult: per-resolution channel multipliers; one resolution halving
            between consecutive levels.
        num_res_blocks: residual blocks per level on the down path (the up path
            has one more).
        attn_resolutions: resolutions at which self-attention is applied; each
            must be one of the resolutions the network reaches.
        dropout: dropout probability inside residual blocks.
        time_embed_scale: ``t`` in [0, 1] is multiplied by this before the
            sinusoidal embedding (999 mirrors the discrete DDPM timestep range).
        num_groups: maximum GroupNorm groups; the largest divisor of the
            channel count that is <= ``min(num_groups, channels // 4)`` is used
            (see :func:`group_count`), so 32 groups at 128/256 channels.
        skip_rescale: scale residual sums by 1/sqrt(2).
        resample_with_conv: learned 3x3 conv in Downsample/Upsample
            (only used with ``resblock_type="ddpm"``).
        resblock_type: ``"biggan"`` (resample inside residual blocks, DDPM++
            default) or ``"ddpm"`` (separate Downsample/Upsample layers).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = UNetOptions(**options)
        in_channels, resolution = self.options.in_channels, self.options.resolution
        base_channels, channel_mult = self.options.base_channels, self.options.channel_mult
        num_res_blocks, attn_resolutions = self.options.num_res_blocks, self.options.attn_resolutions
        dropout, num_groups, skip_rescale = self.options.dropout, self.options.num_groups, self.options.skip_rescale
        resblock_type, resample_with_conv = self.options.resblock_type, self.options.resample_with_conv
        time_embed_scale = self.options.time_embed_scale
        num_levels = len(channel_mult)
        factor = 2 ** (num_levels - 1)
        level_res = self.options.level_resolutions()
        self.in_channels = in_channels
        self.resolution = resolution
        self._size_multiple = factor
        self.num_res_blocks = num_res_blocks

        temb_dim = 4 * base_channels
        self.time_embed = TimestepEmbedding(base_channels, temb_dim, float(time_embed_scale))

        def res_block(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(cin, cout, temb_dim, num_groups, float(dropout), skip_rescale, resample)

        def attn_block(ch: int) -> AttnBlock:
            return AttnBlock(ch, num_groups, skip_rescale)

        def resampler(ch: int, direction: str) -> nn.Module:
            if resblock_type == "biggan":
                return res_block(ch, ch, resample=direction)
            cls = Upsample if direction == "up" else Downsample
            return cls(ch, with_conv=resample_with_conv)

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Down path. `skip_ch` records the channels of every tensor pushed on the skip stack.
        skip_ch = [base_channels]
        ch = base_channels
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            stage.attns = nn.ModuleList()
            use_attn = level_res[level] in attn_resolutions
            for _ in range(num_res_blocks):
                stage.blocks.append(res_block(ch, base_channels * mult))
                ch = base_channels * mult
                stage.attns.append(attn_block(ch) if use_attn else nn.Identity())
                skip_ch.append(ch)
            if level != num_levels - 1:
                stage.downsample = resampler(ch, "down")
                skip_ch.append(ch)
            self.down.append(stage)

        self.mid_block1 = res_block(ch, ch)
        self.mid_attn = attn_block(ch)
        self.mid_block2 = res_block(ch, ch)

        # Up path, consuming the skip stack in reverse.
        self.up = nn.ModuleList()
        for level in reversed(range(num_levels)):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            out_ch = base_channels * channel_mult[level]
            for _ in range(num_res_blocks + 1):
                stage.blocks.append(res_block(ch + skip_ch.pop(), out_ch))
                ch = out_ch
            stage.attn = attn_block(ch) if level_res[level] in attn_resolutions else nn.Identity()
            if level != 0:
                stage.upsample = resampler(ch, "up")
            self.up.append(stage)
        assert not skip_ch

        self.norm_out = _norm(num_groups, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform weights and zero biases, then zero the output layers."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                _zero_(m.conv2)
            elif isinstance(m, AttnBlock):
                _zero_(m.proj)
        _zero_(self.conv_out)

    def config(self) -> dict:
        """Constructor options as a JSON-serialisable dict: ``UNet(**m.config())`` rebuilds ``m``."""
        return self.options.as_dict()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Velocity for images ``x`` (B, C, H, W) at times ``t`` (B,) or scalar, in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self._size_multiple or x.shape[3] % self._size_multiple:
            raise ValueError(f"x height/width must be divisible by {self._size_multiple}, got {tuple(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) or be a scalar, got {tuple(t.shape)}")
        temb = self.time_embed(t).to(x.dtype)

        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            for block, attn in zip(stage.blocks, stage.attns):
                h = attn(block(h, temb))
                skips.append(h)
            if hasattr(stage, "downsample"):
                h = self._resample(stage.downsample, h, temb)
                skips.append(h)

        h = self.mid_block1(h, temb)
        h = self.mid_attn(h)
        h = self.mid_block2(h, temb)

        for stage in self.up:
            for block in stage.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
            h = stage.attn(h)
            if hasattr(stage, "upsample"):
                h = self._resample(stage.upsample, h, temb)

        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _resample(layer: nn.Module, h: Tensor, temb: Tensor) -> Tensor:
        return layer(h, temb) if isinstance(layer, ResBlock) else layer(h)

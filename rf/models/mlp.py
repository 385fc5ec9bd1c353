"""MLP velocity field v(x, t) for vector data (2D toys, low-dimensional features).

Architecture: the time t ∈ [0, 1] is embedded with sinusoids e(t) = [sin(πkt), cos(πkt)] for
k = 1 … embed_dim / 2 (a Fourier basis on [0, 2]: smooth in t, so adaptive solvers take few
steps; octave-spaced frequencies up to 2π·2⁷ made RK45 take ~5× more evaluations on the toy),
concatenated with x, and fed through ``depth`` hidden layers of width ``width`` with SiLU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rf.options.models import MLPOptions


class SinusoidalTimeEmbedding(nn.Module):
    """t ↦ [sin(πkt), cos(πkt)] for k = 1 … dim/2 (``dim`` even)."""

    def __init__(self, dim: int):
        super().__init__()
        frequencies = math.pi * torch.arange(1, dim // 2 + 1, dtype=torch.float32)
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.reshape(-1, 1).to(self.frequencies.dtype) * self.frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class MLPVelocity(nn.Module):
    """v(x, t) for x of shape (B, dim); keyword options ``dim``, ``width``, ``depth``,
    ``time_embed_dim`` (checked by :class:`rf.options.models.MLPOptions`)."""

    def __init__(self, **options: Any):
        super().__init__()
        self.options = MLPOptions(**options)
        dim, width, depth, time_embed_dim = (
            getattr(self.options, key) for key in ("dim", "width", "depth", "time_embed_dim")
        )
        self.dim = dim
        self.time_embedding = SinusoidalTimeEmbedding(time_embed_dim)
        layers: list[nn.Module] = []
        fan_in = dim + time_embed_dim
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.SiLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPVelocity(dim={self.dim}) expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        return self.net(torch.cat([x, self.time_embedding(t).to(x.dtype)], dim=1))

    def config(self) -> dict:
        """Constructor options: ``MLPVelocity(**m.config())`` rebuilds ``m``."""
        return self.options.as_dict()

"""Seedable 2D toy distributions, sampled as pure functions of (seed, example id).

``dist.sample(seed, ids)`` returns one point per id; the same id gives the same point however ids
are batched (uniforms and normals come from :mod:`rf.noise`, streams 1 and 2).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch

from rf.noise import noise, uniform
from rf.registry import construct

_STREAM_UNIFORM = 1
_STREAM_NORMAL = 2

Ids = torch.Tensor | np.ndarray | Sequence[int]


class ToyDistribution(ABC):
    """A distribution on R² sampled per id."""

    dim = 2

    @abstractmethod
    def sample(self, seed: int, ids: Ids) -> torch.Tensor:
        """Points of shape (len(ids), 2), float32."""

    def sample_n(self, n: int, seed: int = 0) -> torch.Tensor:
        """Points for ids 0 … n − 1."""
        return self.sample(seed, np.arange(n))


class GaussianMixture(ToyDistribution):
    """Σ_k w_k N(μ_k, s_k² I): component by inverse CDF of a uniform, then μ + s·z."""

    def __init__(
        self,
        centers: Sequence[Sequence[float]],
        scales: Sequence[float] | float = 1.0,
        weights: Sequence[float] | None = None,
    ):
        self.centers = torch.tensor(centers, dtype=torch.float32)
        if self.centers.dim() != 2 or self.centers.shape[1] != 2 or len(self.centers) == 0:
            raise ValueError(f"centers must be a non-empty list of 2D points, got {centers!r}")
        k = len(self.centers)
        scale_list = [float(scales)] * k if isinstance(scales, (int, float)) else list(scales)
        weight_list = [1.0] * k if weights is None else list(weights)
        if len(scale_list) != k or len(weight_list) != k:
            raise ValueError(f"need one scale and one weight per centre ({k})")
        if min(scale_list) <= 0 or min(weight_list) < 0 or sum(weight_list) <= 0:
            raise ValueError("scales must be positive and weights non-negative with a positive sum")
        self.scales = torch.tensor(scale_list, dtype=torch.float32)
        w = torch.tensor(weight_list, dtype=torch.float64)
        self.cumulative = torch.cumsum(w / w.sum(), 0)

    def components(self, seed: int, ids: Ids) -> torch.Tensor:
        """The mixture component of each id."""
        u = uniform(seed, ids, stream=_STREAM_UNIFORM).double()
        return torch.clamp(torch.searchsorted(self.cumulative, u), max=len(self.centers) - 1)

    def sample(self, seed: int, ids: Ids) -> torch.Tensor:
        k = self.components(seed, ids)
        z = noise(seed, ids, (2,), stream=_STREAM_NORMAL)
        return self.centers[k] + self.scales[k, None] * z


class EightGaussians(GaussianMixture):
    """Eight equal Gaussians on a circle of ``radius``."""

    def __init__(self, radius: float = 4.0, scale: float = 0.5):
        angles = [2 * math.pi * k / 8 for k in range(8)]
        super().__init__([[radius * math.cos(a), radius * math.sin(a)] for a in angles], scale)


class Moons(ToyDistribution):
    """Two interleaved half circles with Gaussian jitter ``noise_scale``, centred at the origin."""

    def __init__(self, noise_scale: float = 0.1, scale: float = 1.0):
        self.noise_scale = float(noise_scale)
        self.scale = float(scale)

    def sample(self, seed: int, ids: Ids) -> torch.Tensor:
        u = uniform(seed, ids, (2,), stream=_STREAM_UNIFORM)
        angle = math.pi * u[:, 1]
        upper = torch.stack([angle.cos(), angle.sin()], 1)
        lower = torch.stack([1 - angle.cos(), 0.5 - angle.sin()], 1)
        points = torch.where((u[:, :1] < 0.5), upper, lower) - torch.tensor([0.5, 0.25])
        jitter = self.noise_scale * noise(seed, ids, (2,), stream=_STREAM_NORMAL)
        return self.scale * (points + jitter)


class Checkerboard(ToyDistribution):
    """Uniform on the black squares of a 4×4 board of side ``size``, centred at the origin."""

    def __init__(self, size: float = 8.0):
        self.size = float(size)

    def sample(self, seed: int, ids: Ids) -> torch.Tensor:
        u = uniform(seed, ids, (3,), stream=_STREAM_UNIFORM)
        x = 4 * u[:, 0] - 2
        y = u[:, 1] - 2 * torch.floor(2 * u[:, 2]) + torch.remainder(torch.floor(x), 2)
        return torch.stack([x, y], 1) * (self.size / 4)


TOYS: dict[str, type[ToyDistribution]] = {
    "gaussian_mixture": GaussianMixture,
    "eight_gaussians": EightGaussians,
    "moons": Moons,
    "checkerboard": Checkerboard,
}


def make_toy(kind: str, **options: Any) -> ToyDistribution:
    """The toy distribution ``kind`` with keyword ``options``."""
    return construct(TOYS, kind, "toy distribution", **options)


def three_gaussians(x: float, spacing: float = 6.0, scale: float = 1.0) -> GaussianMixture:
    """Three equal Gaussians stacked vertically at abscissa ``x`` (the seed talk's toy:
    π0 = three_gaussians(-10), π1 = three_gaussians(10), about 20 apart)."""
    return GaussianMixture([[x, -spacing], [x, 0.0], [x, spacing]], scale)

"""Seedable 2D toy distributions, sampled as pure functions of (seed, example id).

``dist.sample(seed, ids)`` returns one point per id; the same id gives the same point however ids
are batched (uniforms and normals come from :mod:`rf.noise`, streams ``STREAMS.toy_uniform`` and
``STREAMS.toy_normal``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rf.noise import STREAMS, noise, uniform
from rf.options.toy import (
    TOY_OPTIONS,
    CheckerboardOptions,
    EightGaussiansOptions,
    GaussianMixtureOptions,
    MoonsOptions,
)
from rf.registry import construct, implementations

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


@dataclass(frozen=True)
class GaussianMixture(GaussianMixtureOptions, ToyDistribution):
    """Σ_k w_k N(μ_k, s_k² I): component by inverse CDF of a uniform, then μ + s·z."""

    def components(self, seed: int, ids: Ids) -> torch.Tensor:
        """The mixture component of each id."""
        w = torch.tensor(self.weights, dtype=torch.float64)
        cumulative = torch.cumsum(w / w.sum(), 0)
        u = uniform(seed, ids, stream=STREAMS.toy_uniform).double()
        return torch.clamp(torch.searchsorted(cumulative, u), max=len(self.centers) - 1)

    def sample(self, seed: int, ids: Ids) -> torch.Tensor:
        k = self.components(seed, ids)
        z = noise(seed, ids, (2,), stream=STREAMS.toy_normal)
        centers = torch.tensor(self.centers, dtype=torch.float32)
        scales = torch.tensor(self.scales, dtype=torch.float32)
        return centers[k] + scales[k, None] * z


@dataclass(frozen=True)
class EightGaussians(EightGaussiansOptions, ToyDistribution):
    """Eight equal Gaussians on a circle of ``radius``."""

    def sample(self, seed: int, ids: Ids) -> torch.Tensor:
        mixture = self.mixture()
        return GaussianMixture(mixture.centers, mixture.scales).sample(seed, ids)


@dataclass(frozen=True)
class Moons(MoonsOptions, ToyDistribution):
    """Two interleaved half circles with Gaussian jitter ``noise_scale``, centred at the origin."""

    def sample(self, seed: int, ids: Ids) -> torch.Tensor:
        u = uniform(seed, ids, (2,), stream=STREAMS.toy_uniform)
        angle = math.pi * u[:, 1]
        upper = torch.stack([angle.cos(), angle.sin()], 1)
        lower = torch.stack([1 - angle.cos(), 0.5 - angle.sin()], 1)
        points = torch.where((u[:, :1] < 0.5), upper, lower) - torch.tensor([0.5, 0.25])
        jitter = self.noise_scale * noise(seed, ids, (2,), stream=STREAMS.toy_normal)
        return self.scale * (points + jitter)


@dataclass(frozen=True)
class Checkerboard(CheckerboardOptions, ToyDistribution):
    """Uniform on the black squares of a 4×4 board of side ``size``, centred at the origin."""

    def sample(self, seed: int, ids: Ids) -> torch.Tensor:
        u = uniform(seed, ids, (3,), stream=STREAMS.toy_uniform)
        x = 4 * u[:, 0] - 2
        y = u[:, 1] - 2 * torch.floor(2 * u[:, 2]) + torch.remainder(torch.floor(x), 2)
        return torch.stack([x, y], 1) * (self.size / 4)


TOYS: dict[str, type[ToyDistribution]] = implementations(TOY_OPTIONS, ToyDistribution)


def make_toy(kind: str, **options: Any) -> ToyDistribution:
    """The toy distribution ``kind`` with keyword ``options``."""
    return construct(TOYS, kind, "toy distribution", **options)


def three_gaussians(x: float, spacing: float = 6.0, scale: float = 1.0) -> GaussianMixture:
    """Three equal Gaussians stacked vertically at abscissa ``x`` (the seed talk's toy:
    π0 = three_gaussians(-10), π1 = three_gaussians(10), about 20 apart)."""
    return GaussianMixture([[x, -spacing], [x, 0.0], [x, spacing]], scale)

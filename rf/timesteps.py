"""Distributions of the training time t.

Each sampler maps uniforms u ∈ (0, 1) to times, so the training loop can feed it counter-based
uniforms (:func:`rf.noise.uniform`) and stay a pure function of (seed, example id).

Continuous samplers draw a shape s ∈ (0, 1) and place it on [ε, t_max]: t = ε + (t_max − ε)·s.

- :class:`UniformTime` — s = u.
- :class:`LogitNormalTime` — s = sigmoid(m + σ·Φ⁻¹(u)), more weight mid-path.
- :class:`UShapedTime` — density ∝ cosh(a(s − ½)) (the U-shaped schedule of rfpp, 2-rectified
  flow++), more weight near both ends; inverse CDF s = ½ + asinh((2u − 1)·sinh(a/2)) / a.

Distillation samples a grid instead (:class:`GridTime`): t ∈ {0, 1/k, …, (k−1)/k}. With k = 1 it is
the one-step schedule t = 0; k-step Euler from Z0 then lands on Z1 when the model matches
(Z1 − Z0) on the grid of the straight interpolation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from rf.options.timesteps import (
    TIME_SAMPLER_OPTIONS,
    GridTimeOptions,
    LogitNormalTimeOptions,
    UniformTimeOptions,
    UShapedTimeOptions,
)
from rf.registry import construct, implementations


class TimeSampler(ABC):
    """Maps uniforms to training times."""

    name: str

    @abstractmethod
    def from_uniform(self, u: torch.Tensor, t_max: float = 1.0) -> torch.Tensor:
        """Times for uniforms ``u`` of shape (B,), none above ``t_max``."""

    def sample(self, n: int, generator: torch.Generator | None = None, t_max: float = 1.0) -> torch.Tensor:
        """``n`` times from torch's generator (for notebooks; stages use counter uniforms)."""
        return self.from_uniform(torch.rand(n, generator=generator), t_max)


class _ContinuousTime(TimeSampler):
    @abstractmethod
    def shape(self, u: torch.Tensor) -> torch.Tensor:
        """The sampler's distribution on (0, 1), as a map of uniforms."""

    def from_uniform(self, u: torch.Tensor, t_max: float = 1.0) -> torch.Tensor:
        if t_max <= self.eps:
            raise ValueError(f"t_max={t_max} must exceed eps={self.eps}")
        return self.eps + (t_max - self.eps) * self.shape(u)


@dataclass(frozen=True)
class UniformTime(UniformTimeOptions, _ContinuousTime):
    """t ~ U[ε, t_max]."""

    name = "uniform"

    def shape(self, u: torch.Tensor) -> torch.Tensor:
        return u


@dataclass(frozen=True)
class LogitNormalTime(LogitNormalTimeOptions, _ContinuousTime):
    """logit(s) ~ N(mean, std²) (Esser et al. 2024)."""

    name = "logit_normal"

    def shape(self, u: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mean + self.std * torch.special.ndtri(u))


@dataclass(frozen=True)
class UShapedTime(UShapedTimeOptions, _ContinuousTime):
    """Density ∝ cosh(a(s − ½)) on (0, 1) (rfpp's U-shaped schedule, a = 4 by default)."""

    name = "u_shaped"

    def shape(self, u: torch.Tensor) -> torch.Tensor:
        return 0.5 + torch.asinh((2 * u - 1) * math.sinh(self.a / 2)) / self.a


@dataclass(frozen=True)
class GridTime(GridTimeOptions, TimeSampler):
    """t uniform on the k-grid {0, 1/k, …, (k−1)/k}; k = 1 is one-step distillation (t = 0)."""

    name = "grid"

    def from_uniform(self, u: torch.Tensor, t_max: float = 1.0) -> torch.Tensor:
        index = torch.clamp(torch.floor(u * self.k), max=self.k - 1)
        return index / self.k


TIME_SAMPLERS: dict[str, type[TimeSampler]] = implementations(TIME_SAMPLER_OPTIONS, TimeSampler)


def make_time_sampler(name: str, **options: float) -> TimeSampler:
    """The sampler called ``name`` with keyword ``options`` (e.g. ``eps``, ``k``)."""
    return construct(TIME_SAMPLERS, name, "time sampler", **options)

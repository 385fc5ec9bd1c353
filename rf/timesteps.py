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

import torch

from rf.registry import construct


class TimeSampler(ABC):
    """Maps uniforms to training times."""

    name: str

    @abstractmethod
    def from_uniform(self, u: torch.Tensor, t_max: float = 1.0) -> torch.Tensor:
        """Times for uniforms ``u`` of shape (B,), none above ``t_max``."""

    def sample(
        self, n: int, generator: torch.Generator | None = None, t_max: float = 1.0
    ) -> torch.Tensor:
        """``n`` times from torch's generator (for notebooks; stages use counter uniforms)."""
        return self.from_uniform(torch.rand(n, generator=generator), t_max)


class _ContinuousTime(TimeSampler):
    def __init__(self, eps: float = 1e-3):
        if not 0 <= eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.eps = float(eps)

    @abstractmethod
    def shape(self, u: torch.Tensor) -> torch.Tensor:
        """The sampler's distribution on (0, 1), as a map of uniforms."""

    def from_uniform(self, u: torch.Tensor, t_max: float = 1.0) -> torch.Tensor:
        if t_max <= self.eps:
            raise ValueError(f"t_max={t_max} must exceed eps={self.eps}")
        return self.eps + (t_max - self.eps) * self.shape(u)


class UniformTime(_ContinuousTime):
    """t ~ U[ε, t_max]."""

    name = "uniform"

    def shape(self, u: torch.Tensor) -> torch.Tensor:
        return u


class LogitNormalTime(_ContinuousTime):
    """logit(s) ~ N(mean, std²) (Esser et al. 2024)."""

    name = "logit_normal"

    def __init__(self, mean: float = 0.0, std: float = 1.0, eps: float = 1e-3):
        super().__init__(eps)
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.mean = float(mean)
        self.std = float(std)

    def shape(self, u: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mean + self.std * torch.special.ndtri(u))


class UShapedTime(_ContinuousTime):
    """Density ∝ cosh(a(s − ½)) on (0, 1) (rfpp's U-shaped schedule, a = 4 by default)."""

    name = "u_shaped"

    def __init__(self, a: float = 4.0, eps: float = 1e-3):
        super().__init__(eps)
        if a <= 0:
            raise ValueError(f"a must be positive, got {a}")
        self.a = float(a)

    def shape(self, u: torch.Tensor) -> torch.Tensor:
        return 0.5 + torch.asinh((2 * u - 1) * math.sinh(self.a / 2)) / self.a


class GridTime(TimeSampler):
    """t uniform on the k-grid {0, 1/k, …, (k−1)/k}; k = 1 is one-step distillation (t = 0)."""

    name = "grid"

    def __init__(self, k: int = 1):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)

    def from_uniform(self, u: torch.Tensor, t_max: float = 1.0) -> torch.Tensor:
        index = torch.clamp(torch.floor(u * self.k), max=self.k - 1)
        return index / self.k


TIME_SAMPLERS: dict[str, type[TimeSampler]] = {
    cls.name: cls for cls in (UniformTime, LogitNormalTime, UShapedTime, GridTime)
}


def make_time_sampler(name: str, **options: float) -> TimeSampler:
    """The sampler called ``name`` with keyword ``options`` (e.g. ``eps``, ``k``)."""
    return construct(TIME_SAMPLERS, name, "time sampler", **options)

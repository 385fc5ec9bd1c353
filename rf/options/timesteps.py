"""Options of the training-time samplers of :mod:`rf.timesteps`, checked without torch.

Each sampler class of :mod:`rf.timesteps` derives from its options class here, so the options and
their checks live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rf.registry import construct


@dataclass(frozen=True)
class ContinuousTimeOptions:
    """Times on [ε, t_max]: ``eps`` = ε in [0, 1)."""

    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")


@dataclass(frozen=True)
class UniformTimeOptions(ContinuousTimeOptions):
    """t ~ U[ε, t_max]."""


@dataclass(frozen=True)
class LogitNormalTimeOptions(ContinuousTimeOptions):
    """logit(s) ~ N(``mean``, ``std``²), ``std`` > 0."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")


@dataclass(frozen=True)
class UShapedTimeOptions(ContinuousTimeOptions):
    """Density ∝ cosh(a(s − ½)), ``a`` > 0."""

    a: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.a <= 0:
            raise ValueError(f"a must be positive, got {self.a}")


@dataclass(frozen=True)
class GridTimeOptions:
    """t on the ``k``-grid {0, 1/k, …, (k−1)/k}, k >= 1."""

    k: int = 1

    def __post_init__(self) -> None:
        if self.k < 1 or self.k != int(self.k):
            raise ValueError(f"k must be a whole number >= 1, got {self.k}")


TIME_SAMPLER_OPTIONS: dict[str, type] = {
    "uniform": UniformTimeOptions,
    "logit_normal": LogitNormalTimeOptions,
    "u_shaped": UShapedTimeOptions,
    "grid": GridTimeOptions,
}


def time_sampler_options(name: str, **options: Any) -> Any:
    """The checked options of the time sampler ``name``; ValueError naming the problem."""
    return construct(TIME_SAMPLER_OPTIONS, name, "time sampler", **options)

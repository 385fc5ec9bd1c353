"""Options of the 2D toy distributions of :mod:`rf.toy`, checked without torch.

Each distribution class of :mod:`rf.toy` derives from its options class here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rf.registry import construct


@dataclass(frozen=True)
class GaussianMixtureOptions:
    """Σ_k w_k N(μ_k, s_k² I): ``centers`` μ_k (2D points), ``scales`` s_k > 0 (one, or one per
    centre), ``weights`` w_k >= 0 with a positive sum (default equal)."""

    centers: Sequence[Sequence[float]]
    scales: Sequence[float] | float = 1.0
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        try:
            centers = tuple((float(x), float(y)) for x, y in self.centers)
        except (TypeError, ValueError):
            raise ValueError(f"centers must be a non-empty list of 2D points, got {self.centers!r}") from None
        if not centers:
            raise ValueError(f"centers must be a non-empty list of 2D points, got {self.centers!r}")
        k = len(centers)
        scales = (float(self.scales),) * k if isinstance(self.scales, (int, float)) else tuple(map(float, self.scales))
        weights = (1.0,) * k if self.weights is None else tuple(map(float, self.weights))
        if len(scales) != k or len(weights) != k:
            raise ValueError(f"need one scale and one weight per centre ({k})")
        if min(scales) <= 0 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("scales must be positive and weights non-negative with a positive sum")
        for name, value in (("centers", centers), ("scales", scales), ("weights", weights)):
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class EightGaussiansOptions:
    """Eight equal Gaussians of std ``scale`` on a circle of ``radius``."""

    radius: float = 4.0
    scale: float = 0.5

    def mixture(self) -> GaussianMixtureOptions:
        angles = [2 * math.pi * k / 8 for k in range(8)]
        return GaussianMixtureOptions(
            [[self.radius * math.cos(a), self.radius * math.sin(a)] for a in angles], self.scale
        )


@dataclass(frozen=True)
class MoonsOptions:
    """Two interleaved half circles with Gaussian jitter ``noise_scale``, scaled by ``scale``."""

    noise_scale: float = 0.1
    scale: float = 1.0


@dataclass(frozen=True)
class CheckerboardOptions:
    """Uniform on the black squares of a 4×4 board of side ``size``."""

    size: float = 8.0


TOY_OPTIONS: dict[str, type] = {
    "gaussian_mixture": GaussianMixtureOptions,
    "eight_gaussians": EightGaussiansOptions,
    "moons": MoonsOptions,
    "checkerboard": CheckerboardOptions,
}


def toy_options(kind: str, **options: Any) -> Any:
    """The checked options of the toy distribution ``kind``; ValueError naming the problem."""
    return construct(TOY_OPTIONS, kind, "toy distribution", **options)

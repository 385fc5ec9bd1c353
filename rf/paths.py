"""Probability paths: how a pair (X0, X1) is interpolated, and the velocity a flow must learn.

Every path here is affine in the pair (the paper's nonlinear extension, Section 2.3)::

    X_t = α_t · X1 + β_t · X0,        dX_t/dt = α̇_t · X1 + β̇_t · X0,

with t = 0 at π0 (noise) and t = 1 at π1 (data): α_0 = 0, β_0 = 1, α_1 = 1, β_1 = 0.

- :class:`StraightPath` — rectified flow: α_t = t, β_t = 1 − t, velocity X1 − X0.
- :class:`VPPath` — the VP ODE baseline: α_t = exp(−¼a(1−t)² − ½b(1−t)), β_t = √(1 − α_t²).
- :class:`SubVPPath` — the sub-VP ODE baseline: same α_t, β_t = 1 − α_t².
- :class:`VPConstPath` — the "VP ODE with constant speed" of the paper's straight-paths figure:
  α_t = t, β_t = √(1 − t²), still α² + β² = 1 but α moving at constant speed.

With a = 19.9 and b = 0.1, α_0 = exp(−5.025) ≈ 0.0066 rather than 0, as in the paper.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from rf.registry import construct


class Coefficients(NamedTuple):
    """(α_t, β_t, α̇_t, β̇_t), each a tensor of the shape of t."""

    alpha: torch.Tensor
    beta: torch.Tensor
    dalpha: torch.Tensor
    dbeta: torch.Tensor


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) time tensor to broadcast against a (B, ...) batch."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


class ProbabilityPath(ABC):
    """X_t = α_t X1 + β_t X0 and its time derivative, for t in [0, ``t_max``]."""

    name: str
    t_max: float = 1.0
    """Largest t at which the target velocity is finite."""

    @abstractmethod
    def coefficients(self, t: torch.Tensor) -> Coefficients:
        """(α_t, β_t, α̇_t, β̇_t) at times ``t``."""

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(X_t, dX_t/dt)`` for a batch of pairs at per-sample times ``t`` of shape (B,)."""
        a, b, da, db = (_per_sample(c, x0) for c in self.coefficients(t))
        return a * x1 + b * x0, da * x1 + db * x0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StraightPath(ProbabilityPath):
    """Rectified flow: X_t = t X1 + (1 − t) X0, target velocity X1 − X0."""

    name = "straight"

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        one = torch.ones_like(t)
        return Coefficients(t, 1 - t, one, -one)


class _VPFamily(ProbabilityPath):
    """Shared α_t = exp(−¼a(1−t)² − ½b(1−t)), so α̇_t = α_t · (½a(1−t) + ½b)."""

    def __init__(self, a: float = 19.9, b: float = 0.1):
        if a < 0 or b < 0 or a + b <= 0:
            raise ValueError(f"VP coefficients need a, b >= 0 and a + b > 0, got a={a}, b={b}")
        self.a = float(a)
        self.b = float(b)

    def _alpha(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = 1 - t
        alpha = torch.exp(-0.25 * self.a * s**2 - 0.5 * self.b * s)
        return alpha, alpha * (0.5 * self.a * s + 0.5 * self.b)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(a={self.a}, b={self.b})"


class VPPath(_VPFamily):
    """VP ODE: β_t = √(1 − α_t²), β̇_t = −α_t α̇_t / β_t.

    β̇_t diverges as t → 1 (β_1 = 0), so training times stop at ``t_max`` = 1 − 1e-3.
    """

    name = "vp"
    t_max = 1.0 - 1e-3

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        alpha, dalpha = self._alpha(t)
        beta = torch.sqrt(torch.clamp(1 - alpha**2, min=0.0))
        dbeta = -alpha * dalpha / beta
        return Coefficients(alpha, beta, dalpha, dbeta)


class SubVPPath(_VPFamily):
    """sub-VP ODE: β_t = 1 − α_t², β̇_t = −2 α_t α̇_t (finite on all of [0, 1])."""

    name = "subvp"

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        alpha, dalpha = self._alpha(t)
        return Coefficients(alpha, 1 - alpha**2, dalpha, -2 * alpha * dalpha)


class VPConstPath(ProbabilityPath):
    """VP ODE with constant speed: α_t = t, β_t = √(1 − t²), so α̇_t = 1, β̇_t = −t / √(1 − t²).

    Variance preserving (α² + β² = 1) like :class:`VPPath`, with exact ends α_0 = 0, α_1 = 1.
    β̇_t ≈ −1/√(2(1 − t)) diverges as t → 1 (integrably: β itself is continuous), so training
    times stop at ``t_max`` = 1 − ε, ε = 10⁻³, the cut-off of :class:`VPPath`, and the paper's
    path comparison trains every path on the same interval. There β = √(2ε − ε²) ≈ 0.045 and
    β̇ ≈ −22.3: the target α̇X1 + β̇X0 weighs the noise at most ≈ 22×, and over the unseen
    (t_max, 1] X_t still moves by εX1 − β_{t_max}X0, about 4.5 % of the noise. A smaller ε grows
    the target like ε^(−½) (ε = 10⁻⁴: |β̇| ≈ 71) while shrinking that remainder only like ε^½.
    """

    name = "vp_const"
    t_max = 1.0 - 1e-3

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        beta = torch.sqrt(torch.clamp(1 - t**2, min=0.0))
        return Coefficients(t, beta, torch.ones_like(t), -t / beta)


PATHS: dict[str, type[ProbabilityPath]] = {cls.name: cls for cls in (StraightPath, VPPath, SubVPPath, VPConstPath)}


def make_path(name: str) -> ProbabilityPath:
    """The path called ``name`` (``straight``, ``vp``, ``subvp`` or ``vp_const``)."""
    return construct(PATHS, name, "path")

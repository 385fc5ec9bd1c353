"""ODE solvers for dZ/dt = v(Z, t) from t0 to t1 (by default 0 → 1, π0 → π1).

Each solver returns a :class:`Solution` with the end state, the number of velocity evaluations
(NFE) **per sample**, and optionally the trajectory.

- :func:`euler` — N steps: Z_{k+1} = Z_k + h·v(Z_k, t_k), h = (t1 − t0)/N. NFE = N.
- :func:`heun` — N steps of the explicit trapezoidal rule:
  Z̃ = Z_k + h·v(Z_k, t_k), Z_{k+1} = Z_k + ½h·(v(Z_k, t_k) + v(Z̃, t_{k+1})). NFE = 2N.
- :func:`rk45` — adaptive Dormand–Prince 5(4) with the error controlled **per sample**: every
  sample has its own time, step size and accept/reject decision, so its result does not depend
  on the other samples in the batch (the official code integrates the whole batch as one system,
  which makes a pair depend on its batch). Error norm, step-size rule and first step follow
  Hairer, Nørsett & Wanner (and SciPy's ``RK45``):
  err = h·Σ eᵢkᵢ, sc = atol + rtol·max(|Z|, |Z_new|), accept when rms(err/sc) ≤ 1,
  h_new = h·clip(0.9·rms^(−1/5), 0.2, 10).

Per-sample reductions use a fixed pairwise tree of element-wise additions, so they give the same
bits whatever the batch size or thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rf.options.solvers import SolverSpec

if TYPE_CHECKING:
    from rf.paths import ProbabilityPath

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""v(x, t): x of shape (B, ...), t of shape (B,) → velocity of shape (B, ...)."""


@dataclass
class Solution:
    """End state ``x`` at t1, evaluations per sample ``nfe`` (int64, shape (B,)), and, when asked
    for, the ``trajectory`` as a list of (t of shape (B,), state) after every step (the start
    included)."""

    x: torch.Tensor
    nfe: torch.Tensor
    trajectory: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def _times(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)


def _fixed_grid(
    step: Callable[[torch.Tensor, float, float], torch.Tensor],
    evaluations_per_step: int,
    x0: torch.Tensor,
    steps: int,
    t0: float,
    t1: float,
    return_trajectory: bool,
) -> Solution:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    h = (t1 - t0) / steps
    x = x0
    trajectory = [(_times(t0, x0), x0)] if return_trajectory else None
    for k in range(steps):
        t = t0 + k * h
        x = step(x, t, h)
        if trajectory is not None:
            trajectory.append((_times(t0 + (k + 1) * h, x), x))
    nfe = torch.full((x0.shape[0],), evaluations_per_step * steps, dtype=torch.int64)
    return Solution(x, nfe, trajectory)


def euler(
    velocity: Velocity,
    x0: torch.Tensor,
    steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
    return_trajectory: bool = False,
) -> Solution:
    """N explicit Euler steps on the uniform grid."""

    def step(x: torch.Tensor, t: float, h: float) -> torch.Tensor:
        return x + h * velocity(x, _times(t, x))

    return _fixed_grid(step, 1, x0, steps, t0, t1, return_trajectory)


def heun(
    velocity: Velocity,
    x0: torch.Tensor,
    steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
    return_trajectory: bool = False,
) -> Solution:
    """N steps of Heun's method (explicit trapezoidal rule), 2 evaluations per step."""

    def step(x: torch.Tensor, t: float, h: float) -> torch.Tensor:
        v = velocity(x, _times(t, x))
        x_euler = x + h * v
        return x + 0.5 * h * (v + velocity(x_euler, _times(t + h, x)))

    return _fixed_grid(step, 2, x0, steps, t0, t1, return_trajectory)


def tree_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over all non-batch dimensions by pairwise halving: (B, ...) → (B,).

    Only element-wise additions are used, so a sample's sum is bitwise the same whatever the
    batch size, memory layout or number of threads.
    """
    flat = values.reshape(values.shape[0], -1)
    while flat.shape[1] > 1:
        if flat.shape[1] % 2:
            flat = torch.cat([flat, torch.zeros_like(flat[:, :1])], dim=1)
        half = flat.shape[1] // 2
        flat = flat[:, :half] + flat[:, half:]
    return flat[:, 0]


def rms(values: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square over non-batch dimensions, batch-invariant (see tree_sum)."""
    return torch.sqrt(tree_sum(values * values) / values[0].numel())


# Dormand–Prince 5(4): nodes, stage coefficients, 5th-order weights and the error weights
# e = b5 − b4 (the 7th stage is the FSAL evaluation at the new point).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


def _per_sample(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _initial_step(
    velocity: Velocity,
    x: torch.Tensor,
    t: torch.Tensor,
    f0: torch.Tensor,
    span: float,
    rtol: float,
    atol: float,
) -> torch.Tensor:
    """Hairer's starting step size, per sample (one extra evaluation)."""
    scale = atol + x.abs() * rtol
    d0, d1 = rms(x / scale).double(), rms(f0 / scale).double()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.clamp(h0, max=span)
    f1 = velocity(x + _per_sample(h0, x) * f0, (t + h0).to(x.dtype))
    d2 = rms((f1 - f0) / scale).double() / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(
        dmax <= 1e-15,
        torch.clamp(h0 * 1e-3, min=1e-6),
        (0.01 / dmax.clamp(min=1e-300)) ** (1 / 5),
    )
    return torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, span))


def rk45(
    velocity: Velocity,
    x0: torch.Tensor,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t0: float = 0.0,
    t1: float = 1.0,
    max_steps: int = 100_000,
    return_trajectory: bool = False,
) -> Solution:
    """Adaptive Dormand–Prince 5(4) with per-sample error control (see the module docstring).

    Times and step sizes are kept in float64 per sample. Raises ``RuntimeError`` when some
    sample needs more than ``max_steps`` attempted steps.
    """
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    if t1 <= t0:
        raise ValueError(f"rk45 integrates forward: need t1 > t0, got t0={t0}, t1={t1}")
    batch = x0.shape[0]
    x = x0.clone()
    t = torch.full((batch,), t0, dtype=torch.float64, device=x0.device)
    k1 = velocity(x, t.to(x.dtype))
    h = _initial_step(velocity, x, t, k1, t1 - t0, rtol, atol)
    nfe = torch.full((batch,), 2, dtype=torch.int64, device=x0.device)
    trajectory = [(t.to(x.dtype, copy=True), x.clone())] if return_trajectory else None
    rejected_last = torch.zeros(batch, dtype=torch.bool, device=x0.device)

    for _ in range(max_steps):
        active = (t < t1).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        xa, ta, ka = x[active], t[active], k1[active]
        ha = torch.minimum(h[active], t1 - ta)
        hx = _per_sample(ha, xa)
        stages = [ka]
        for c, row in zip(_C[1:], _A[1:]):
            increment = sum(a * k for a, k in zip(row, stages))
            stages.append(velocity(xa + hx * increment, (ta + c * ha).to(xa.dtype)))
        x_new = xa + hx * sum(b * k for b, k in zip(_B5, stages))
        t_new = torch.where(ha >= t1 - ta, torch.full_like(ta, t1), ta + ha)
        k7 = velocity(x_new, t_new.to(xa.dtype))
        stages.append(k7)
        nfe[active] += 6

        error = hx * sum(e * k for e, k in zip(_E, stages))
        scale = atol + rtol * torch.maximum(xa.abs(), x_new.abs())
        error_norm = rms(error / scale).double()
        accept = error_norm <= 1.0
        factor = torch.where(
            error_norm == 0,
            torch.full_like(error_norm, _MAX_FACTOR),
            _SAFETY * error_norm.clamp(min=1e-300) ** (-1 / 5),
        )
        max_factor = torch.where(rejected_last[active], 1.0, _MAX_FACTOR)
        factor = torch.minimum(factor.clamp(min=_MIN_FACTOR), max_factor.to(factor.dtype))

        done = active[accept]
        x[done] = x_new[accept]
        t[done] = t_new[accept]
        k1[done] = k7[accept]
        h[active] = ha * factor
        rejected_last[active] = ~accept
        if trajectory is not None:
            trajectory.append((t.to(x.dtype, copy=True), x.clone()))
    else:
        unfinished = int((t < t1).sum())
        raise RuntimeError(
            f"rk45 did not reach t1={t1} within max_steps={max_steps} for {unfinished} of "
            f"{batch} samples (rtol={rtol}, atol={atol}); the velocity field may be stiff or "
            "non-finite"
        )
    if not torch.isfinite(x).all():
        raise FloatingPointError("rk45 produced non-finite states")
    return Solution(x, nfe, trajectory)


@dataclass(frozen=True)
class Solver(SolverSpec):
    """A solver spec (:class:`rf.options.solvers.SolverSpec`: ``euler@N``, ``heun@N``,
    ``rk45@TOL``, ``sde@N[:SCALE]``) that can integrate a velocity field."""

    def solve(
        self,
        velocity: Velocity,
        x0: torch.Tensor,
        return_trajectory: bool = False,
        *,
        path: ProbabilityPath | None = None,
        seed: int = 0,
        ids: torch.Tensor | Sequence[int] | None = None,
    ) -> Solution:
        """Integrate from t = 0 to t = 1.

        ``path`` (default straight), ``seed`` and ``ids`` (the samples' ids, default ``arange(B)``)
        are used by ``sde`` only (see :func:`rf.sde.euler_maruyama`); the ODE solvers ignore them.
        """
        if self.kind == "euler":
            return euler(velocity, x0, self.steps, return_trajectory=return_trajectory)
        if self.kind == "heun":
            return heun(velocity, x0, self.steps, return_trajectory=return_trajectory)
        if self.kind == "sde":
            from rf.sde import euler_maruyama  # rf.sde imports this module

            return euler_maruyama(
                velocity,
                x0,
                self.steps,
                path=path,
                scale=self.scale,
                seed=seed,
                ids=ids,
                return_trajectory=return_trajectory,
            )
        return rk45(velocity, x0, rtol=self.tolerance, atol=self.tolerance, return_trajectory=return_trajectory)

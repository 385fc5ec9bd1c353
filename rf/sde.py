"""Stochastic sampling of a trained flow: an SDE with the same marginals as dX = v(X, t) dt.

Math. Let π0 = N(0, I), X0 independent of X1 (the pairs a 1-rectified flow or a VP / sub-VP /
constant-speed VP model is trained on; a reflow or distilled model's pairs are coupled and
Tweedie's formula below does not hold for them), X_t = α_t X1 + β_t X0 (see :mod:`rf.paths`),
p_t the law of X_t and v(x, t) = E[α̇_t X1 + β̇_t X0 | X_t = x] the velocity the flow learns.
Write μ0 = E[X0 | X_t = x], μ1 = E[X1 | X_t = x]. Tweedie's formula for the Gaussian part gives
the score ∇log p_t(x) = −μ0 / β_t, and μ0 follows from the two linear relations
x = α μ1 + β μ0 and v = α̇ μ1 + β̇ μ0::

    μ0 = (α̇ x − α v) / D,    D = α̇ β − α β̇,      ∇log p_t(x) = −(α̇ x − α v) / (β D).

For any g_t ≥ 0 the SDE  dX = [v + ½ g_t² ∇log p_t(X)] dt + g_t dW  has the marginals p_t of the
ODE (its Fokker–Planck equation is the continuity equation of v plus ½g²(Δp − ∇·(p∇log p)) = 0).
So the drift is v − κ_t (α̇ x − α v) with κ_t = g_t² / (2 β_t D_t), computed once per step in
float64 from the path's coefficients (the grid times are Python floats).

Noise schedule g_t², multiplied by the user's factor σ² (``scale`` = σ, default 1):

- :class:`~rf.paths.VPPath`: the diffusion of the VP SDE of Song et al. (2021). In their time
  τ = 1 − t it reads dx = −½b(τ) x dτ + √b(τ) dw, whose mean coefficient is
  α = exp(−½∫₀^τ b), so b(τ) = −2 d log α/dτ = 2 α̇_t/α_t (= a(1−t) + b for α_t of rf.paths)::

      g_t² = 2 α̇_t / α_t,   κ_t = σ² / α_t   (here β D = α̇ since β² = 1 − α²).

  With σ = 1 the drift is 2v − (α̇/α) x = ½b x + b ∇log p, exactly the reverse-time VP SDE, so
  ``sde@N`` on a VP-trained model is the Euler–Maruyama "VP SDE" sampler.
- :class:`~rf.paths.SubVPPath`: the sub-VP SDE's diffusion b(τ)(1 − exp(−2∫₀^τ b)), i.e.
  g_t² = (2 α̇_t / α_t)(1 − α_t⁴), which again gives κ_t = σ² / α_t.
- every other path: g_t² = 2 β_t. Then κ_t = σ² / D_t and ½g²∇log p = −σ² E[X0 | x]: the 1/β_t
  of the score cancels, the correction stays as bounded as the flow's own denoiser, and the
  injected noise vanishes at the data end t = 1. At t = 0 (α = 0, β = 1) the stochastic part is
  the Langevin dynamics dX = −σ² X dt + √2 σ dW that leaves π0 = N(0, I) invariant.

  - :class:`~rf.paths.StraightPath` (α = t, β = 1 − t): D = 1, g_t² = 2(1 − t), κ_t = σ², and
    over [0, 1] a total injected variance ∫g² dt = σ².
  - :class:`~rf.paths.VPConstPath` (α = t, β = √(1 − t²), α̇ = 1, β̇ = −t/β)::

        D_t = β + t²/β = (β² + t²)/β = 1/β_t,   so β D = 1,   ∇log p_t(x) = −(x − t v),

    and g_t² = 2√(1 − t²) gives κ_t = σ² β_t ≤ σ², a total variance ∫g² dt = σ²π/2. The VP
    SDE's rule above would not do: the path is variance preserving (α² + β² = 1) but α_0 = 0
    exactly, so 2α̇/α = 2/t and κ_t = σ²/t are infinite at the first step t = 0. The per-pair
    target α̇X1 + β̇X0 diverges as t → 1, but v = μ1 + β̇ μ0 = μ1 + t ∇log p_t (Tweedie,
    μ0 = −β ∇log p_t) stays finite as t → 1 when π1 has a smooth density (∇log p_t → ∇log π1),
    and so does the drift v − σ² μ0: Euler–Maruyama keeps weak order 1 on it (tested).

Discretisation: N Euler–Maruyama steps on the uniform grid t_k = k/N (k = 0 … N−1)::

    X_{k+1} = X_k + h [v_k − κ_{t_k} (α̇ X_k − α v_k)] + σ g_{t_k} √h Z_k,   h = 1/N,

one velocity evaluation per step (NFE = N per sample). The drift is only evaluated at t_k < 1, so
the score is never taken at β_1 = 0; the last step starts from t = 1 − h. With σ = 0 every step
is the plain Euler step ``x + h * v``, so the result equals :func:`rf.solvers.euler` bit for bit.

Noise: Z_k of example ``ids[r]`` is ``rf.noise.noise(seed, [ids[r]], shape, stream=STREAMS.sde_step(k))``
— a pure function of (seed, id, step), so a sample's path does not depend on its batch. Or pass
``noise(k) -> tensor shaped like x`` to supply Z_k yourself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rf.noise import STREAMS
from rf.noise import noise as philox_normal
from rf.paths import ProbabilityPath, StraightPath, SubVPPath, VPPath
from rf.solvers import Solution, Velocity, _fixed_grid, _times

Noise = Callable[[int], torch.Tensor]
"""noise(k) → standard normal Z_k shaped like x, for step k = 0 … N−1."""


def _coefficients(path: ProbabilityPath, t: float) -> tuple[float, float, float, float]:
    """(α_t, β_t, α̇_t, β̇_t) as float64 Python numbers."""
    c = path.coefficients(torch.tensor([t], dtype=torch.float64))
    return float(c.alpha[0]), float(c.beta[0]), float(c.dalpha[0]), float(c.dbeta[0])


def diffusion_squared(path: ProbabilityPath, t: float, scale: float = 1.0) -> float:
    """σ² g_t²: 2α̇/α (VP), (2α̇/α)(1 − α⁴) (sub-VP), 2β (straight, constant-speed VP and
    others); see the module."""
    alpha, beta, dalpha, _ = _coefficients(path, t)
    if isinstance(path, VPPath):
        g2 = 2 * dalpha / alpha
    elif isinstance(path, SubVPPath):
        g2 = 2 * dalpha / alpha * (1 - alpha**4)
    else:
        g2 = 2 * beta
    return scale**2 * g2


def drift(path: ProbabilityPath, x: torch.Tensor, v: torch.Tensor, t: float, scale: float) -> torch.Tensor:
    """v + ½σ²g_t² ∇log p_t(x) = v − κ_t (α̇ x − α v), κ_t = σ²g_t² / (2β_t(α̇β − αβ̇))."""
    g2 = diffusion_squared(path, t, scale)
    if g2 == 0:
        return v
    alpha, beta, dalpha, dbeta = _coefficients(path, t)
    if beta <= 0:
        raise ValueError(f"the score is undefined at t={t} where β_t = {beta}")
    kappa = g2 / (2 * beta * (dalpha * beta - alpha * dbeta))
    return v - kappa * (dalpha * x - alpha * v)


def euler_maruyama(
    velocity: Velocity,
    x0: torch.Tensor,
    steps: int,
    *,
    path: ProbabilityPath | None = None,
    scale: float = 1.0,
    seed: int = 0,
    ids: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    noise: Noise | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    return_trajectory: bool = False,
) -> Solution:
    """Sample the marginal-preserving SDE of ``velocity`` along ``path`` (default straight) with
    ``steps`` Euler–Maruyama steps from t0 to t1 (see the module docstring).

    ``scale`` is σ ≥ 0 (0: plain Euler). The increments come from ``noise(k)`` when given,
    otherwise from counter-based noise of ``(seed, ids[r], STREAMS.sde_step(k))`` with ``ids``
    defaulting to ``arange(B)`` — pass the samples' global ids to make them batch-independent.
    Returns a :class:`rf.solvers.Solution` with NFE = ``steps`` per sample.
    """
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be finite and >= 0, got {scale}")
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={t0}, t1={t1}")
    path = StraightPath() if path is None else path
    batch = x0.shape[0]
    if noise is None:
        ids = torch.arange(batch) if ids is None else ids
        if len(ids) != batch:
            raise ValueError(f"got {len(ids)} ids for a batch of {batch}")

        def noise(k: int) -> torch.Tensor:
            z = philox_normal(seed, ids, tuple(x0.shape[1:]), stream=STREAMS.sde_step(k), device=x0.device)
            return z.to(device=x0.device, dtype=x0.dtype)

    elif ids is not None:
        raise ValueError("pass either a noise callable or ids, not both")

    taken = itertools.count()

    def step(x: torch.Tensor, t: float, h: float) -> torch.Tensor:
        k = next(taken)
        v = velocity(x, _times(t, x))
        if scale == 0:
            return x + h * v  # exactly rf.solvers.euler's step
        z = noise(k)
        if z.shape != x.shape:
            raise ValueError(f"noise({k}) has shape {tuple(z.shape)}, expected {tuple(x.shape)}")
        g = math.sqrt(diffusion_squared(path, t, scale))
        return x + h * drift(path, x, v, t, scale) + (g * math.sqrt(h)) * z

    return _fixed_grid(step, 1, x0, steps, t0, t1, return_trajectory)

"""Metrics of a coupling (Z0, Z1): how straight, how costly, how close to optimal transport.

- straightness S(Z) = ∫₀¹ E‖(Z1 − Z0) − Ż_t‖² dt (the paper's Definition 3.4); 0 iff every
  path is a straight line traversed at constant speed.
- transport cost E‖Z1 − Z0‖^p.
- exact OT cost min_γ E_γ‖X − Y‖^p between two empirical measures (network simplex, POT).
- pairing ratio: E‖Z1 − Z0‖ ÷ exact OT cost between the sets {Z0} and {Z1}; ≥ 1, = 1 iff the
  pairing is optimal for the Euclidean cost.
- W2 = (min_γ E_γ‖X − Y‖²)^½.
- crossing rate (2D): the fraction of pairs of segments [Z0_i, Z1_i], [Z0_j, Z1_j] that intersect.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import ot
import torch

from rf.solvers import tree_sum


def straightness_per_sample(trajectory: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """S_i of each sample from a solver trajectory [(t_k, Z_k)] (t_k of shape (B,), per sample).

    On each interval Ż is the difference quotient (Z_{k+1} − Z_k)/(t_{k+1} − t_k), so
    S_i = Σ_k Δt_k · ‖(Z1 − Z0) − ΔZ_k/Δt_k‖² for sample i; intervals with Δt = 0 (a rejected
    RK45 step, a finished sample) add 0. Float64 of shape (B,); the squared norm is a
    :func:`rf.solvers.tree_sum`, so a sample's value does not depend on its batch.
    """
    if len(trajectory) < 2:
        raise ValueError("straightness needs a trajectory of at least two states")
    z0, z1 = trajectory[0][1].double(), trajectory[-1][1].double()
    chord = z1 - z0
    total = torch.zeros(z0.shape[0], dtype=torch.float64, device=z0.device)
    for (t_a, z_a), (t_b, z_b) in zip(trajectory[:-1], trajectory[1:]):
        dt = (t_b.double() - t_a.double()).reshape(-1)
        moving = dt > 0
        if not moving.any():
            continue
        step = torch.where(moving, dt, torch.ones_like(dt)).reshape(-1, *([1] * (z0.dim() - 1)))
        slope = (z_b.double() - z_a.double()) / step
        total += torch.where(moving, dt * tree_sum((chord - slope) ** 2), torch.zeros_like(dt))
    return total


def straightness(trajectory: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """S(Z) ≈ E_i S_i: the batch mean of :func:`straightness_per_sample`."""
    return float(straightness_per_sample(trajectory).mean())


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return array.reshape(array.shape[0], -1).astype(np.float64)


def transport_cost(x0: torch.Tensor, x1: torch.Tensor, power: float = 1.0) -> float:
    """E‖x1 − x0‖^power over the pairs."""
    if x0.shape != x1.shape:
        raise ValueError(f"pairs must have equal shapes, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    return float(np.mean(np.linalg.norm(_as_numpy(x1) - _as_numpy(x0), axis=1) ** power))


def exact_ot_cost(x: torch.Tensor, y: torch.Tensor, power: float = 1.0) -> float:
    """min over couplings γ of the uniform empirical measures of E_γ‖X − Y‖^power (exact)."""
    a, b = _as_numpy(x), _as_numpy(y)
    cost = ot.dist(a, b, metric="euclidean") ** power
    weights_a = np.full(len(a), 1.0 / len(a))
    weights_b = np.full(len(b), 1.0 / len(b))
    return float(ot.emd2(weights_a, weights_b, cost, numItermax=10_000_000))


def pairing_ratio(x0: torch.Tensor, x1: torch.Tensor) -> float:
    """Cost of the given pairing ÷ exact OT cost between the same two point sets (≥ 1)."""
    return transport_cost(x0, x1) / exact_ot_cost(x0, x1)


def wasserstein2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact W2 distance between two empirical measures."""
    return exact_ot_cost(x, y, power=2.0) ** 0.5


class Crossings(NamedTuple):
    """The crossing pairs i < j of segments [p_k, q_k] of n, and where on each they meet: the
    point is p_i + s (q_i − p_i) = p_j + u (q_j − p_j)."""

    i: np.ndarray
    j: np.ndarray
    s: np.ndarray
    u: np.ndarray
    n: int

    def rate(self) -> float:
        """The fraction of the n(n − 1)/2 unordered pairs that cross."""
        return len(self.i) / (self.n * (self.n - 1) / 2)

    def per_segment(self) -> np.ndarray:
        """c_k: how many other segments segment k crosses."""
        return np.bincount(np.concatenate([self.i, self.j]), minlength=self.n)


def crossings(x0: torch.Tensor, x1: torch.Tensor, chunk: int = 512) -> Crossings:
    """Every pair of 2D segments [x0_i, x1_i] that properly intersect.

    Segments i and j cross when the endpoints of each lie strictly on opposite sides of the
    other: orient(p_i, q_i, p_j)·orient(p_i, q_i, q_j) < 0 and vice versa, with
    orient(a, b, c) = (b − a) × (c − a). The distances of p_i and q_i to the line of segment j are
    in the ratio orient(p_j, q_j, p_i) : orient(p_j, q_j, q_i), so s = o_i / (o_i − o_i′), and
    likewise u.
    """
    p, q = _as_numpy(x0), _as_numpy(x1)
    if p.shape[1] != 2:
        raise ValueError(f"crossings are defined for 2D pairs, got dimension {p.shape[1]}")
    n = len(p)
    if n < 2:
        raise ValueError("crossings need at least two pairs")

    def orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        return (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])

    found: list[tuple[np.ndarray, ...]] = []
    for start in range(0, n, chunk):
        pi, qi = p[start : start + chunk, None], q[start : start + chunk, None]
        pj, qj = p[None], q[None]
        o_pj, o_qj = orient(pi, qi, pj), orient(pi, qi, qj)  # j's ends against segment i
        o_pi, o_qi = orient(pj, qj, pi), orient(pj, qj, qi)  # i's ends against segment j
        rows = np.arange(start, start + len(pi))[:, None]
        a, b = np.nonzero((o_pj * o_qj < 0) & (o_pi * o_qi < 0) & (np.arange(n)[None] > rows))
        found.append((a + start, b, o_pi[a, b] / (o_pi[a, b] - o_qi[a, b]), o_pj[a, b] / (o_pj[a, b] - o_qj[a, b])))
    i, j, s, u = (np.concatenate(column) for column in zip(*found))
    return Crossings(i, j, s, u, n)


def crossing_rate(x0: torch.Tensor, x1: torch.Tensor, chunk: int = 512) -> float:
    """Fraction of unordered pairs of 2D segments [x0_i, x1_i] that properly intersect
    (:func:`crossings`)."""
    return crossings(x0, x1, chunk).rate()

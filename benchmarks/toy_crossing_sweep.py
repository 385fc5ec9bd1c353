"""Does the toy's 2-RF crossing rate fall with more compute, and what are the crossings that remain?

The seed talk's toy (``benchmarks/toy_table.py``): π0 = three unit Gaussians at x = −10, π1 the same
at x = +10 (centres y = −6, 0, 6). One factor at a time around toy_table's default (width 256,
4000 steps per round, 20 000 reflow pairs solved with rk45@1e-5), this script varies the 2-RF
steps, the number of reflow pairs, the network width (which changes the 1-RF too), the 1-RF steps
and the coupling solver, and prints per point the crossing % of the 1-RF and 2-RF couplings on
fresh Z0.

The exact 1-RF map of this toy is the translation T(z) = z + (20, 0). Both π0 and π1 have
independent x and y coordinates (unit Gaussian in x, the same three-mode mixture in y), and so
do independent pairs; the velocity E[X1 − X0 | X_t] then splits into a field of x_t alone and one
of y_t alone, and each coordinate is a 1D flow. A 1D flow keeps the order of points, so its map is
the monotone rearrangement of its marginals: x ↦ x + 20 from N(−10, 1) to N(10, 1), y ↦ y from
the mixture to itself. Its segments are parallel: crossing 0 %. So every crossing measured here is
error of the learned coupling. Per point:

- crossing % on ``n`` = ``--eval`` fresh Z0 (ids 0 … n − 1 of toy_table's eval seed, the same
  for every point, so the points are compared on the same segments), solved with rk45@1e-5 as in
  toy_table, and for the 2-RF also with a float64 rk45@1e-8 reference solve;
- its sampling error. The rate is the mean of h(i, j) = [segments i and j cross] over the
  N = n(n − 1)/2 pairs of segments, a U-statistic: the N terms are not independent, so the
  binomial SE √(R(1 − R)/N) understates the error. The jackknife over the n segments,
  SE² = (n − 1)/n · Σ_i (R_{−i} − R̄)², with R_{−i} the rate without segment i, is the honest one;
- map error: rms ‖Z1 − T(Z0)‖ of the 1-RF and 2-RF; ‖2-RF − 1-RF‖: mean distance between the two
  rounds' Z1 for the same Z0; shared: the share of the 2-RF's crossing segment pairs that also
  cross in the 1-RF's coupling;
- coupling %: crossing % of the first n reflow pairs the 2-RF is trained on, and their mean NFE.

After the default point it examines the crossings themselves (solver error, geometry, location,
vertical order) and calibrates the metric on T plus i.i.d. endpoint noise.

Run: ``python benchmarks/toy_crossing_sweep.py`` (one thread; the whole sweep took 932 CPU-seconds
where it was written, the CPU s column says where; ``--only default,2rf-steps-1000`` runs a
subset). The last line is JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from toy_table import FINE, PI0, PI1, SEED_EVAL, reflow_pairs, train_1rf, train_reflow

from rf.coupling import Pairs, generate_pairs
from rf.metrics.transport import Crossings, crossing_rate, crossings
from rf.models import MLPVelocity
from rf.solvers import Solver

REFERENCE = Solver.parse("rk45@1e-8")
"""The reference solve, 1000× tighter than toy_table's, run in float64 (float32 states cannot
honour a tolerance below ~1e-7)."""
BATCH = 256
SHIFT = torch.tensor(PI1.centers) - torch.tensor(PI0.centers)
assert bool((SHIFT == SHIFT[0]).all()) and PI0.scales == PI1.scales, "the exact map is a translation"
EXACT_SHIFT = SHIFT[0].double()
"""The exact 1-RF map is z ↦ z + EXACT_SHIFT = z + (20, 0) (see the module docstring)."""


@dataclass(frozen=True)
class Point:
    """One sweep point: the settings that make its 1-RF and its 2-RF."""

    label: str
    width: int = 256
    rf1_steps: int = 4000
    rf2_steps: int = 4000
    pairs: int = 20000
    solver: str = "rk45@1e-5"

    def rf1_key(self) -> tuple[int, int]:
        return self.width, self.rf1_steps

    def coupling_key(self) -> tuple[int, int, str]:
        return self.width, self.rf1_steps, self.solver


DEFAULT = Point("default")
POINTS = [
    DEFAULT,
    replace(DEFAULT, label="2rf-steps-1000", rf2_steps=1000),
    replace(DEFAULT, label="2rf-steps-16000", rf2_steps=16000),
    replace(DEFAULT, label="pairs-5000", pairs=5000),
    replace(DEFAULT, label="pairs-80000", pairs=80000),
    replace(DEFAULT, label="solver-rk45@1e-3", solver="rk45@1e-3"),
    replace(DEFAULT, label="solver-rk45@1e-7", solver="rk45@1e-7"),
    replace(DEFAULT, label="solver-euler@8", solver="euler@8"),
    replace(DEFAULT, label="solver-euler@32", solver="euler@32"),
    replace(DEFAULT, label="width-64", width=64),
    replace(DEFAULT, label="width-512", width=512),
    replace(DEFAULT, label="1rf-steps-16000", rf1_steps=16000),
]


def reference_solve(model: MLPVelocity, x0: torch.Tensor) -> torch.Tensor:
    """Z1 of ``model`` by float64 rk45@1e-8."""
    model64 = copy.deepcopy(model).double()
    with torch.inference_mode():
        return REFERENCE.solve(lambda x, t: model64(x, t), x0.double()).x.float()


def binomial_se(result: Crossings) -> float:
    r = result.rate()
    return (r * (1 - r) / (result.n * (result.n - 1) / 2)) ** 0.5


def map_error(x0: torch.Tensor, x1: torch.Tensor) -> float:
    """rms ‖Z1 − T(Z0)‖ for the exact map T(z) = z + (20, 0)."""
    return float((x1.double() - x0.double() - EXACT_SHIFT).norm(dim=1).pow(2).mean().sqrt())


def run_point(point: Point, cache: dict, x0_eval: torch.Tensor, max_pairs: dict) -> dict:
    """Train (or reuse) the point's 1-RF and coupling, train its 2-RF, evaluate both."""
    start = time.process_time()
    if point.rf1_key() not in cache:
        rf1 = train_1rf(point.width, point.rf1_steps, BATCH)[0]
        z1 = generate_pairs(rf1, FINE, x0_eval).x1
        cache[point.rf1_key()] = (rf1, z1, crossings(x0_eval, z1))
    rf1, rf1_z1, rf1_cross = cache[point.rf1_key()]
    if point.coupling_key() not in cache:
        # pair k is a pure function of (teacher, solver, k): the first m of a longer run are the m-pair run
        count = max_pairs[point.coupling_key()]
        cache[point.coupling_key()] = reflow_pairs(rf1, count, Solver.parse(point.solver))
    coupling: Pairs = cache[point.coupling_key()]
    train_pairs = Pairs(coupling.x0[: point.pairs], coupling.x1[: point.pairs], coupling.nfe[: point.pairs])
    n = len(x0_eval)
    rf2 = train_reflow(rf1, train_pairs, point.rf2_steps, BATCH)[0]
    rf2_z1 = generate_pairs(rf2, FINE, x0_eval).x1
    rf2_cross = crossings(x0_eval, rf2_z1)
    rf2_reference = reference_solve(rf2, x0_eval)
    row = {
        **asdict(point),
        "eval_segments": n,
        "segment_pairs": n * (n - 1) // 2,
        "coupling_nfe": float(train_pairs.nfe.double().mean()),
        "coupling_crossing_pct": 100 * crossing_rate(train_pairs.x0[:n], train_pairs.x1[:n]),
        "rf1_crossing_pct": 100 * rf1_cross.rate(),
        "rf2_crossing_pct": 100 * rf2_cross.rate(),
        "rf2_se_binomial_pct": 100 * binomial_se(rf2_cross),
        "rf2_se_jackknife_pct": 100 * rf2_cross.jackknife_se(),
        "rf2_reference_crossing_pct": 100 * crossing_rate(x0_eval, rf2_reference),
        "rf1_map_error": map_error(x0_eval, rf1_z1),
        "rf2_map_error": map_error(x0_eval, rf2_z1),
        "rf2_to_rf1": float((rf2_z1 - rf1_z1).norm(dim=1).mean()),
        "shared_pct": 100 * len(rf2_cross.pairs() & rf1_cross.pairs()) / max(len(rf2_cross.i), 1),
        "cpu_seconds": time.process_time() - start,
    }
    cache["models", point.label] = rf1, rf2, rf2_z1, rf2_reference
    return row


def quantiles(values: np.ndarray, qs: tuple[float, ...] = (10, 50, 90, 99)) -> str:
    return " ".join(f"p{q}={v:.4g}" for q, v in zip(qs, np.percentile(values, qs)))


def examine(x0: torch.Tensor, rf1: MLPVelocity, rf2_z1: torch.Tensor, rf2_reference: torch.Tensor) -> dict:
    """Print what the default point's remaining crossings are; return the headline numbers."""
    out: dict = {}
    print("\n== the default point's crossings ==")
    # 1. solver: the same 2-RF solved 1000× more tightly, in float64
    fine, ref = crossings(x0, rf2_z1), crossings(x0, rf2_reference)
    solve_error = (rf2_z1.double() - rf2_reference.double()).norm(dim=1)
    shared = len(fine.pairs() & ref.pairs())
    print(
        f"solver: rk45@1e-5 {100 * fine.rate():.4f} % vs float64 rk45@1e-8 {100 * ref.rate():.4f} %; "
        f"{shared} of {len(fine.i)} / {len(ref.i)} crossing pairs shared; endpoint difference "
        f"mean {solve_error.mean():.2e}, max {solve_error.max():.2e}"
    )
    rf1_fine, rf1_ref = generate_pairs(rf1, FINE, x0).x1, reference_solve(rf1, x0)
    print(
        f"        1-RF: rk45@1e-5 {100 * crossing_rate(x0, rf1_fine):.4f} % "
        f"vs rk45@1e-8 {100 * crossing_rate(x0, rf1_ref):.4f} %"
    )
    out["solver"] = {"rk45@1e-5": 100 * fine.rate(), "rk45@1e-8": 100 * ref.rate(), "shared": shared}

    # 2. geometry of the crossing pairs (reference solve)
    p, q = x0.double().numpy(), rf2_reference.double().numpy()
    d = q - p
    i, j = ref.i, ref.j
    length = np.linalg.norm(d, axis=1)
    sine = np.abs(d[i, 0] * d[j, 1] - d[i, 1] * d[j, 0]) / (length[i] * length[j])
    angle = np.degrees(np.arcsin(np.clip(sine, 0, 1)))
    gap0, gap1 = p[i] - p[j], q[i] - q[j]  # X_t^i − X_t^j = gap0 + t (gap1 − gap0)
    slope = gap1 - gap0
    t_star = np.clip(-(gap0 * slope).sum(1) / np.maximum((slope**2).sum(1), 1e-300), 0, 1)
    same_time = np.linalg.norm(gap0 + t_star[:, None] * slope, axis=1)
    swap_gain = length[i] + length[j] - np.linalg.norm(q[j] - p[i], axis=1) - np.linalg.norm(q[i] - p[j], axis=1)
    print(f"geometry of the {len(i)} crossing pairs (segments ≈ {length.mean():.2f} long):")
    print(f"  angle between the segments, degrees: {quantiles(angle)}")
    print(
        f"  |s − u|, the gap in time at which the two interpolations pass the crossing point: "
        f"{quantiles(np.abs(ref.s - ref.u))}"
    )
    print(f"  closest approach at the same time, min_t ‖X_t^i − X_t^j‖: {quantiles(same_time)}")
    print(f"  ‖Z0_i − Z0_j‖: {quantiles(np.linalg.norm(gap0, axis=1))}; |Δy0|: {quantiles(np.abs(gap0[:, 1]))}")
    print(f"  cost saved by swapping the partners (‖·‖ summed over the two): {quantiles(swap_gain)}")
    out["median_angle_deg"] = float(np.median(angle))
    out["median_same_time_distance"] = float(np.median(same_time))

    # 3. where, and what the map's y-error looks like there. Per band of |y| of Z0 (π0's modes at
    # y = 0, ±6, boundaries at |y| = 3; y folded by the toy's mirror symmetry y ↦ −y), the affine
    # least-squares fit sign(y0)·(Z1_y − Z0_y) ≈ a + shear·(x0 + 10) + stretch·(|y0| − its band mean):
    # T has no y-error at all; a shear (y-error growing along the transport direction x) swaps
    # the y-order of points at about the same height, a stretch does not.
    counts = ref.per_segment()
    height, error_y = np.abs(p[:, 1]), np.abs(d[:, 1])
    folded = np.sign(p[:, 1]) * d[:, 1]
    print(
        f"location: {100 * (counts > 0).mean():.1f} % of segments cross at least one other. By |y| of Z0 (modes at 0 "
        f"and 6, boundary at 3): crossings per segment, share of all, mean |Z1_y − Z0_y|, and the affine fit:"
    )
    for low, high in ((0, 1.5), (1.5, 3), (3, 4.5), (4.5, 6), (6, 7.5), (7.5, np.inf)):
        chosen = (height >= low) & (height < high)
        design = np.stack([np.ones(chosen.sum()), p[chosen, 0] + 10, height[chosen] - height[chosen].mean()], 1)
        fit, *_ = np.linalg.lstsq(design, folded[chosen], rcond=None)
        residual = folded[chosen] - design @ fit
        print(
            f"  |y0| in [{low}, {high}): {chosen.sum():5d} segments, {counts[chosen].mean():6.2f} crossings each, "
            f"{100 * counts[chosen].sum() / counts.sum():5.1f} % of all, |Δy| {error_y[chosen].mean():.3f}; "
            f"shear {fit[1]:+.3f}, stretch {fit[2]:+.3f}, residual sd {residual.std():.3f}"
        )

    # 4. vertical order: T keeps every y, so near-parallel segments cross when the map swaps their y-order
    above0, above1 = p[:, None, 1] > p[None, :, 1], q[:, None, 1] > q[None, :, 1]
    swapped = np.triu(above0 != above1, 1)
    crossing_swapped = swapped[i, j].mean()
    print(
        f"vertical order: {100 * swapped.sum() / (len(p) * (len(p) - 1) / 2):.4f} % of segment pairs "
        f"have their y-order "
        f"swapped by the map; {100 * crossing_swapped:.1f} % of the crossing pairs are such swaps, and "
        f"{100 * len(i) * crossing_swapped / swapped.sum():.1f} % of the swaps cross. Map error: mean |Z1_y − Z0_y| = "
        f"{error_y.mean():.4f}, mean |Z1_x − Z0_x − 20| = {np.abs(d[:, 0] - float(EXACT_SHIFT[0])).mean():.4f}"
    )
    out["crossings_that_swap_y_pct"] = float(100 * crossing_swapped)

    # 5. calibration: the exact map plus i.i.d. N(0, ε² I) endpoint noise
    print("calibration: crossing % of the exact map T plus i.i.d. N(0, ε²I) endpoint noise, same Z0:")
    generator = torch.Generator().manual_seed(0)
    out["calibration"] = {}
    for eps in (0.0, 0.01, 0.03, 0.1, 0.3):
        noisy = x0.double() + EXACT_SHIFT + eps * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        rate = 100 * crossing_rate(x0, noisy)
        out["calibration"][eps] = rate
        print(f"  ε = {eps:<5}: {rate:.4f} %")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=int, default=4000, help="evaluation segments n (N = n(n−1)/2 segment pairs)")
    parser.add_argument("--only", default="", help="comma-separated point labels (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels = [label for label in args.only.split(",") if label]
    unknown = set(labels) - {point.label for point in POINTS}
    if unknown:
        parser.error(f"unknown points {sorted(unknown)}; choose from {[point.label for point in POINTS]}")
    points = [point for point in POINTS if not labels or point.label in labels]
    max_pairs: dict = {}
    for point in points:
        max_pairs[point.coupling_key()] = max(max_pairs.get(point.coupling_key(), 0), point.pairs)

    x0_eval = PI0.sample(SEED_EVAL, np.arange(args.eval))
    cache: dict = {}
    rows, findings = [], {}
    start = time.process_time()
    for point in points:
        row = run_point(point, cache, x0_eval, max_pairs)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if point == DEFAULT:
            rf1, _, rf2_z1, rf2_reference = cache["models", point.label]
            findings = examine(x0_eval, rf1, rf2_z1, rf2_reference)

    n = args.eval
    print(
        f"\n{n} evaluation segments, N = {n * (n - 1) // 2} segment pairs; ± = jackknife SE (binomial SE in brackets)"
    )
    header = (
        f"{'point':<18}{'coupling':>14}{'1-RF %':>9}{'2-RF %':>9}{'± SE (binom)':>18}{'2-RF ref %':>11}"
        f"{'map err 1':>10}{'map err 2':>10}{'2-RF−1-RF':>10}{'shared %':>9}{'CPU s':>7}"
    )
    print(header)
    for row in rows:
        coupling = f"{row['coupling_crossing_pct']:.3f}@{row['coupling_nfe']:.0f}"
        spread = f"± {row['rf2_se_jackknife_pct']:.3f} ({row['rf2_se_binomial_pct']:.4f})"
        print(
            f"{row['label']:<18}{coupling:>14}{row['rf1_crossing_pct']:>9.3f}{row['rf2_crossing_pct']:>9.3f}"
            f"{spread:>18}"
            f"{row['rf2_reference_crossing_pct']:>11.3f}{row['rf1_map_error']:>10.3f}{row['rf2_map_error']:>10.3f}"
            f"{row['rf2_to_rf1']:>10.4f}{row['shared_pct']:>9.1f}{row['cpu_seconds']:>7.0f}"
        )
    print(json.dumps({"rows": rows, "findings": findings, "cpu_seconds": time.process_time() - start}))


if __name__ == "__main__":
    main()

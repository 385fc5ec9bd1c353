"""The seed talk's 2D table, in pure ``rf`` (no Ray): random pairing → 1-RF → 2-RF → 3-RF.

π0 is three Gaussians stacked at x = −10, π1 the same at x = +10 (about 20 apart). Round 1 trains
on independent pairs; round k + 1 is warm-started from round k and trained on its coupling
(Z0, Flow_k(Z0)) solved with RK45. Every round is then evaluated on fresh Z0:

- crossing %: share of pairs of segments [Z0, Z1] that cross;
- transport cost E‖Z1 − Z0‖, and the pairing ratio = that cost ÷ the exact OT cost between the
  same two point sets (≥ 1);
- one-step quality: mean ‖Euler₁(Z0) − RK45(Z0)‖, and W2 of the one-step samples to π1.

Run: ``python benchmarks/toy_table.py`` (about 2–4 minutes on 2 cores). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from rf.coupling import Pairs, generate_pairs
from rf.metrics import crossing_rate, pairing_ratio, transport_cost, wasserstein2
from rf.models import MLPVelocity
from rf.noise import STREAMS, uniform
from rf.paths import StraightPath
from rf.solvers import Solver, euler
from rf.timesteps import UniformTime
from rf.toy import ToyDistribution, three_gaussians
from rf.training import VelocityTrainer

PI0 = three_gaussians(-10.0)
PI1 = three_gaussians(10.0)
SEED_PI0, SEED_PI1, SEED_TIME, SEED_EVAL = 1, 2, 3, 4
FINE = Solver.parse("rk45@1e-5")


def train_round(
    trainer: VelocityTrainer,
    x0_of: callable,
    x1_of: callable,
    steps: int,
    batch: int,
) -> float:
    """``steps`` optimisation steps on pairs addressed by example id; returns the last loss."""
    sampler = UniformTime()
    loss = float("nan")
    for _ in range(steps):
        ids = np.arange(trainer.step_count * batch, (trainer.step_count + 1) * batch)
        t = sampler.from_uniform(uniform(SEED_TIME, ids, stream=STREAMS.time))
        loss = trainer.step(x0_of(ids), x1_of(ids), t)
    return float(loss)


def new_trainer(model: MLPVelocity) -> VelocityTrainer:
    """The optimiser settings of every round."""
    return VelocityTrainer(model, StraightPath(), lr=1e-3, warmup_steps=100, ema_decay=0.99)


def train_1rf(width: int, steps: int, batch: int) -> tuple[MLPVelocity, float]:
    """1-RF on independent pairs (weights initialised after ``torch.manual_seed(0)``): its EMA
    model and last loss."""
    torch.manual_seed(0)
    trainer = new_trainer(MLPVelocity(dim=2, width=width, depth=3))
    loss = train_round(trainer, sample_of(PI0, SEED_PI0), sample_of(PI1, SEED_PI1), steps, batch)
    return trainer.ema.model, loss


def reflow_pairs(model: MLPVelocity, count: int, solver: Solver = FINE) -> Pairs:
    """The coupling (Z0, Z1 = solver(model, Z0)) of ``count`` fresh draws of π0."""
    return generate_pairs(model, solver, PI0.sample(SEED_PI0 + 10, np.arange(count)))


def train_reflow(teacher: MLPVelocity, pairs: Pairs, steps: int, batch: int) -> tuple[MLPVelocity, float]:
    """The next round, warm-started from ``teacher`` and trained on ``pairs``: its EMA model and last loss."""
    model = MLPVelocity(**teacher.config())
    model.load_state_dict(teacher.state_dict())
    trainer = new_trainer(model)
    loss = train_round(
        trainer, lambda ids: pairs.x0[ids % len(pairs.x0)], lambda ids: pairs.x1[ids % len(pairs.x1)], steps, batch
    )
    return trainer.ema.model, loss


def sample_of(dist: ToyDistribution, seed: int) -> callable:
    return lambda ids: dist.sample(seed, ids)


def evaluate(model: torch.nn.Module, x0: torch.Tensor, ids: np.ndarray, pi1_sample: torch.Tensor) -> dict:
    model.eval()
    with torch.inference_mode():
        fine = FINE.solve(lambda x, t: model(x, t), x0).x
        one_step = euler(lambda x, t: model(x, t), x0, 1).x
    return {
        "crossing_pct": 100 * crossing_rate(x0, fine),
        "transport_cost": transport_cost(x0, fine),
        "pairing_ratio": pairing_ratio(x0, fine),
        "one_step_distance": float((one_step - fine).norm(dim=1).mean()),
        "one_step_w2": wasserstein2(one_step, pi1_sample),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="training steps per round")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=20000, help="reflow pairs per round")
    parser.add_argument("--eval", type=int, default=2000, help="evaluation samples")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    start = time.perf_counter()

    eval_ids = np.arange(args.eval)
    x0_eval = PI0.sample(SEED_EVAL, eval_ids)
    pi1_eval = PI1.sample(SEED_EVAL, eval_ids)
    random_x1 = PI1.sample(SEED_EVAL + 1, eval_ids)
    rows = {
        "random": {
            "crossing_pct": 100 * crossing_rate(x0_eval, random_x1),
            "transport_cost": transport_cost(x0_eval, random_x1),
            "pairing_ratio": pairing_ratio(x0_eval, random_x1),
        }
    }

    model, loss = train_1rf(256, args.steps, args.batch)
    for k in (1, 2, 3):
        rows[str(k)] = evaluate(model, x0_eval, eval_ids, pi1_eval)
        rows[str(k)]["final_loss"] = loss
        print(f"round {k}: trained {args.steps} steps, loss {loss:.4f}; {rows[str(k)]}", flush=True)
        if k < 3:
            model, loss = train_reflow(model, reflow_pairs(model, args.pairs), args.steps, args.batch)

    print()
    print(f"{'coupling':<10}{'crossing %':>12}{'cost':>10}{'pair ratio':>12}{'1-step dist':>13}{'1-step W2':>11}")
    for name, row in rows.items():
        print(
            f"{name:<10}{row['crossing_pct']:>12.2f}{row['transport_cost']:>10.3f}{row['pairing_ratio']:>12.4f}"
            + (f"{row['one_step_distance']:>13.3f}{row['one_step_w2']:>11.3f}" if "one_step_w2" in row else "")
        )
    seconds = time.perf_counter() - start
    summary = {
        key: {name: row[key] for name, row in rows.items() if key in row}
        for key in ("crossing_pct", "transport_cost", "pairing_ratio", "one_step_distance", "one_step_w2")
    }
    summary["seconds"] = seconds
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

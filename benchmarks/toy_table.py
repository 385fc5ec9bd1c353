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

from rf.coupling import generate_pairs
from rf.metrics import crossing_rate, pairing_ratio, transport_cost, wasserstein2
from rf.models import MLPVelocity
from rf.noise import uniform
from rf.paths import StraightPath
from rf.solvers import Solver, euler
from rf.timesteps import UniformTime
from rf.toy import ToyDistribution, three_gaussians
from rf.training import VelocityTrainer

PI0 = three_gaussians(-10.0)
PI1 = three_gaussians(10.0)
SEED_PI0, SEED_PI1, SEED_TIME, SEED_EVAL = 1, 2, 3, 4
STREAM_TIME = 5
FINE = Solver.parse("rk45@1e-5")


def train_round(
    trainer: VelocityTrainer,
    x0_of: "callable",
    x1_of: "callable",
    steps: int,
    batch: int,
) -> float:
    """``steps`` optimisation steps on pairs addressed by example id; returns the last loss."""
    sampler = UniformTime()
    loss = float("nan")
    for _ in range(steps):
        ids = np.arange(trainer.step_count * batch, (trainer.step_count + 1) * batch)
        t = sampler.from_uniform(uniform(SEED_TIME, ids, stream=STREAM_TIME))
        loss = trainer.step(x0_of(ids), x1_of(ids), t)
    return loss


def sample_of(dist: ToyDistribution, seed: int) -> "callable":
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

    model = MLPVelocity(dim=2, width=256, depth=3)
    x0_of, x1_of = sample_of(PI0, SEED_PI0), sample_of(PI1, SEED_PI1)
    for k in (1, 2, 3):
        model.train()
        trainer = VelocityTrainer(model, StraightPath(), lr=1e-3, warmup_steps=100, ema_decay=0.99)
        loss = train_round(trainer, x0_of, x1_of, args.steps, args.batch)
        model = trainer.ema.model
        rows[str(k)] = evaluate(model, x0_eval, eval_ids, pi1_eval)
        rows[str(k)]["final_loss"] = loss
        print(f"round {k}: trained {args.steps} steps, loss {loss:.4f}; {rows[str(k)]}", flush=True)
        if k < 3:
            pairs = generate_pairs(model, FINE, PI0.sample(SEED_PI0 + 10, np.arange(args.pairs)))
            reflow_x0, reflow_x1 = pairs.x0, pairs.x1

            def x0_of(ids, x=reflow_x0):
                return x[ids % len(x)]

            def x1_of(ids, x=reflow_x1):
                return x[ids % len(x)]

            model = MLPVelocity(**model.config())
            model.load_state_dict(trainer.ema.model.state_dict())

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

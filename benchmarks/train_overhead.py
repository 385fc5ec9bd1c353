"""Steps/s of the Ray Train stage against a plain in-process torch loop, and 2 workers against 1.

Same model (an MLP of width 1024, depth 4, on 64-dimensional data — heavy enough that the step,
not the plumbing, dominates), same global batch, same kind of data (independent Gaussian pairs).

- ``plain``: :class:`rf.training.VelocityTrainer` in this process on one thread doing the same
  work per step: draw the batch and its times by example id, take the step;
- ``ray ×1`` / ``ray ×2``: :func:`workflows.stages.train.run_train_stage` with 1 and 2 workers
  of 1 CPU each (DDP over gloo), data streamed through Ray Data.

Stage start-up (worker group, process group, first data block) is not training throughput, so
each stage arm runs twice, with a short and a long step count, and its rate is the marginal one:
(long − short steps) ÷ (long − short seconds). This machine's speed drifts by tens of percent over
minutes, so the arms run in the order plain, ×1, ×2, ×2, ×1, plain and each rate is the mean of
its two measurements. Target: ray ×1 ÷ plain ≥ 0.90.
Run: ``python benchmarks/train_overhead.py`` (about 8 minutes on 2 cores). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

import numpy as np
import torch

from rf.models import MLPVelocity
from rf.noise import STREAMS, uniform
from rf.paths import StraightPath
from rf.timesteps import UniformTime
from rf.training import VelocityTrainer
from workflows.distributions import sample_by_id
from workflows.settings import IndependentPairs, ModelSpec, NoiseSpec, TrainConfig
from workflows.stages import train
from workflows.storage import location

DIM, WIDTH, DEPTH, BATCH = 64, 1024, 4, 1024
SOURCE = IndependentPairs(pi0=NoiseSpec(shape=[DIM]), pi1=NoiseSpec(shape=[DIM]), seed0=1, seed1=2)


def plain_steps_per_second(steps: int) -> float:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    trainer = VelocityTrainer(MLPVelocity(dim=DIM, width=WIDTH, depth=DEPTH), StraightPath(), lr=1e-4)

    def step(k: int) -> None:
        ids = np.arange(k * BATCH, (k + 1) * BATCH)
        t = UniformTime().from_uniform(uniform(0, ids, stream=STREAMS.time))
        trainer.step(sample_by_id(SOURCE.pi0, 1, ids), sample_by_id(SOURCE.pi1, 2, ids), t)

    for k in range(3):
        step(k)
    started = time.perf_counter()
    for k in range(steps):
        step(k)
    return steps / (time.perf_counter() - started)


def stage_seconds(root: str, name: str, steps: int, workers: int) -> float:
    """Seconds of one stage run, from the call to its return."""
    config = TrainConfig(
        model=ModelSpec(kind="mlp", config={"dim": DIM, "width": WIDTH, "depth": DEPTH}),
        steps=steps,
        batch_size=BATCH,
        lr=1e-4,
        workers=workers,
        checkpoint_every=steps,
        log_every=steps,
        data=SOURCE,
    )
    started = time.perf_counter()
    train.run(config, {}, location(os.path.join(root, name)))
    return time.perf_counter() - started


def stage_steps_per_second(root: str, workers: int, short: int, long: int, attempt: int) -> float:
    quick = stage_seconds(root, f"short-{workers}-{attempt}", short, workers)
    slow = stage_seconds(root, f"long-{workers}-{attempt}", long, workers)
    rate = (long - short) / (slow - quick)
    print(
        f"ray x{workers}: {short} steps in {quick:.1f} s, {long} steps in {slow:.1f} s → {rate:.2f} steps/s", flush=True
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=140)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rates: dict[str, list[float]] = {"plain": [], "1": [], "2": []}
    with tempfile.TemporaryDirectory() as root:
        for attempt, order in enumerate((("plain", "1", "2"), ("2", "1", "plain"))):
            for arm in order:
                if arm == "plain":
                    rates[arm].append(plain_steps_per_second(args.long - args.short))
                    print(f"plain loop, 1 thread: {rates[arm][-1]:.2f} steps/s", flush=True)
                else:
                    rates[arm].append(stage_steps_per_second(root, int(arm), args.short, args.long, attempt))
    ray.shutdown()
    plain, one, two = (sum(rates[arm]) / len(rates[arm]) for arm in ("plain", "1", "2"))
    print(
        json.dumps(
            {
                "ray_vs_plain": round(one / plain, 3),
                "two_vs_one_worker": round(two / one, 3),
                "plain_steps_per_s": round(plain, 2),
            }
        )
    )


if __name__ == "__main__":
    main()

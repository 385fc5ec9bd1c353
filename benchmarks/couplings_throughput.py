"""Pairs/s of the coupling stage, against a raw in-process loop and across worker counts.

Three arms, measured side by side in one process, with the same model (an MLP of width 1024,
depth 4, dim 64 — heavy enough that sampling, not start-up, dominates), solver (Euler, 100 steps),
batch size (256) and noise:

- ``raw``: a plain loop on one thread — draw x0 by id, :func:`rf.coupling.generate_pairs` — no
  Ray, no encoding, no I/O;
- ``stage ×1``: :func:`workflows.stages.couple.run` with 1 worker of 1 CPU, ids →
  sample → Parquet shards on S3 (a moto server on loopback, started here);
- ``stage ×2``: the same with 2 workers;
- ``raw ×2``: two raw loops in two processes side by side, each on half the pairs — what two
  cores of this machine give at best: ``raw_two_vs_one`` = raw ×1 time ÷ raw ×2 time is the
  ceiling of ``two_vs_one_worker``.

The stage arms are timed from the call to its return, as a user sees them (actor start-up and
teacher loading included); ``ray.init`` and one tiny warm-up run (Ray Data's own first-use
start-up) are not. The arms run in two rounds, the second in reverse order, and the ratios are of
the summed times, so a machine that drifts (a shared VM) biases no arm. Targets: stage ÷ raw
≥ 0.90; 2 workers ÷ 1 ≥ 0.95 × ``raw_two_vs_one`` (``two_vs_one_of_ceiling`` ≥ 0.95).
Run: ``python benchmarks/couplings_throughput.py`` (about 5 minutes on 2 cores). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import socket
import time

import numpy as np
import torch

from rf.coupling import generate_pairs
from rf.models import MLPVelocity
from rf.solvers import Solver
from workflows.distributions import sample_by_id
from workflows.manifest import Manifest, write_manifest
from workflows.settings import CouplingConfig, NoiseSpec
from workflows.storage import Location, location
from workflows.weights import write_model

DIM, WIDTH, DEPTH = 64, 1024, 4
SOLVER = "euler@100"
BATCH = 256
BUCKET = "rectiflow-bench"
_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_s3() -> object:
    """A moto S3 server on loopback with an empty bucket; the AWS environment points at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(_S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return server


def teacher_model() -> MLPVelocity:
    torch.manual_seed(0)
    return MLPVelocity(dim=DIM, width=WIDTH, depth=DEPTH).eval()


def make_teacher(folder: Location) -> MLPVelocity:
    """A finished training stage holding :func:`teacher_model`."""
    model = teacher_model()
    write_model(folder.join("attempt-0", "model"), model)
    write_manifest(
        folder,
        Manifest(
            kind="train",
            hash="0" * 16,
            stage=folder.name,
            config={},
            identity={},
            inputs={},
            time={},
            code={},
            details={"model": "attempt-0/model"},
        ),
    )
    return model


def raw_loop(model: MLPVelocity, pairs: int, seed: int) -> float:
    """Seconds for a one-thread loop to make ``pairs`` pairs, without Ray or I/O."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    for start in range(0, pairs, BATCH):
        x0 = sample_by_id(NoiseSpec(shape=[DIM]), seed, np.arange(start, min(start + BATCH, pairs)))
        generate_pairs(model, Solver.parse(SOLVER), x0, chunk=BATCH)
    seconds = time.perf_counter() - started
    torch.set_num_threads(threads)
    return seconds


def _raw_half(pairs: int, barrier, results) -> None:
    model = teacher_model()
    barrier.wait()
    results.put(raw_loop(model, pairs, seed=1))


def two_raw_loops(pairs: int) -> float:
    """Seconds for two one-thread raw loops in two processes, started together, to make
    ``pairs`` // 2 pairs each."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_raw_half, args=(pairs // 2, barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    seconds = max(results.get() for _ in processes)
    for process in processes:
        process.join()
    return seconds


def stage_run(teacher: Location, output: Location, pairs: int, shard_size: int, workers: int, seed: int) -> float:
    """Seconds for the coupling stage to make ``pairs`` pairs, from the call to its return."""
    from workflows.stages import couple

    config = CouplingConfig(
        pairs=pairs,
        shard_size=shard_size,
        solver=SOLVER,
        seed=seed,
        pi0=NoiseSpec(shape=[DIM]),
        batch_size=BATCH,
        forward_batch=BATCH,
        workers=workers,
    )
    started = time.perf_counter()
    details = couple.run(config, {"teacher": teacher}, output).details
    seconds = time.perf_counter() - started
    assert details["shards_written"] == len(details["shards"]), "the stage found old shards"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6144)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all arms, in A B C D / D C B A order")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    server = start_s3()
    import ray

    ray.init(
        address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    root = location(f"s3://{BUCKET}/throughput")
    teacher = root.join("teacher")
    model = make_teacher(teacher)
    stage_run(teacher, root.join("warm-up"), BATCH, BATCH, 1, seed=9)

    arms = {
        "stage, 1 worker": lambda run: stage_run(teacher, root.join(f"one-{run}"), args.pairs, args.shard_size, 1, 1),
        "raw loop, 1 thread": lambda run: raw_loop(model, args.pairs, seed=1),
        "stage, 2 workers": lambda run: stage_run(teacher, root.join(f"two-{run}"), args.pairs, args.shard_size, 2, 1),
        "raw loops, 2 processes": lambda run: two_raw_loops(args.pairs),
    }
    seconds = dict.fromkeys(arms, 0.0)
    for run in range(args.rounds):
        for name in list(arms) if run % 2 == 0 else list(arms)[::-1]:
            taken = arms[name](run)
            seconds[name] += taken
            print(f"{name}: {args.pairs} pairs in {taken:.1f} s", flush=True)
    ray.shutdown()
    server.stop()

    one, raw = seconds["stage, 1 worker"], seconds["raw loop, 1 thread"]
    two, both = seconds["stage, 2 workers"], seconds["raw loops, 2 processes"]
    total = args.pairs * args.rounds
    print(
        json.dumps(
            {
                "stage_vs_raw": round(raw / one, 3),
                "two_vs_one_worker": round(one / two, 3),
                "raw_two_vs_one": round(raw / both, 3),
                "two_vs_one_of_ceiling": round((one / two) / (raw / both), 3),
                "raw_pairs_per_s": round(total / raw, 1),
                "stage_pairs_per_s": round(total / one, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

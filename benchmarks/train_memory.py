"""Peak memory of a reflow training run reading 10× more pairs, against the same run on 1×.

Two couplings of 256-dimensional float32 pairs (2 KiB a pair with x0 and x1) are written as
shards to a local folder: N pairs and 10·N pairs (≥ 1 GB at the default N). Each is read for
exactly one epoch (steps = pairs ÷ batch) by the training stage with 2 workers, each run on a
fresh local Ray. A sampler thread adds up the proportional set size (PSS: shared pages such as
the object store's are split between the processes that map them, so nothing is counted twice)
of this process and every process below it — the Ray driver, raylet, object store, train
workers and Ray Data read workers — every 0.5 s; the peak is reported. Loading every pair would
cost ≥ 1 GB more at 10×; streaming should cost nothing more.
Target: rss_ratio_10x ≤ 1.2.
Run: ``python benchmarks/train_memory.py`` (about 5 minutes on 2 cores). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from peak_memory import PeakPSS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests.workflows.helpers

from rf.noise import noise
from tests.workflows.helpers import fake_manifest
from workflows.couplings import CouplingFormat, encode_shard
from workflows.settings import CoupledPairs, ModelSpec, NoiseSpec, TrainConfig
from workflows.shard_format import ShardEntry, sha256, shard_count, shard_name, shard_range
from workflows.stages import train
from workflows.storage import Location, location

DIM, SHARD, BATCH = 256, 8192, 1024


def write_pairs(output: Location, pairs: int) -> None:
    """A finished coupling stage of ``pairs`` pairs x1 = 0.5·x0 + 1 (any deterministic map)."""
    fmt = CouplingFormat(
        shape=[DIM], seed=0, pi0=NoiseSpec(shape=[DIM]), teacher_hash="bench", solver="map", shard_size=SHARD
    )
    entries = []
    for index in range(shard_count(pairs, SHARD)):
        start, stop = shard_range(index, SHARD, pairs)
        x0 = noise(0, np.arange(start, stop), (DIM,))
        data = encode_shard(fmt, index, np.arange(start, stop), x0, 0.5 * x0 + 1, torch.ones(stop - start))
        output.join(shard_name(index)).write_bytes(data)
        entries.append(
            ShardEntry(index, shard_name(index), start, stop, stop - start, sha256(data), len(data)).as_dict()
        )
    fake_manifest(
        output, "couple", f"bench{pairs}", {"format": fmt.model_dump(mode="json"), "shards": entries, "pairs": pairs}
    )


def train_on(coupling: Location, output: Location, pairs: int) -> int:
    config = TrainConfig(
        model=ModelSpec(kind="mlp", config={"dim": DIM, "width": 256, "depth": 2}),
        steps=pairs // BATCH,
        batch_size=BATCH,
        lr=1e-4,
        workers=2,
        checkpoint_every=10**6,
        log_every=50,
        data=CoupledPairs(),
    )
    with PeakPSS(0.5) as rss:
        train.run(config, {"coupling": coupling}, output)
    return rss.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60_000, help="pairs of the 1x run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    with tempfile.TemporaryDirectory() as root:
        base = location(root)
        for factor in (1, 10):
            write_pairs(base.join(f"pairs-{factor}x"), factor * args.pairs)
        gigabytes = 10 * args.pairs * DIM * 4 * 2 / 1e9
        print(f"wrote {args.pairs} and {10 * args.pairs} pairs ({gigabytes:.2f} GB of x0 + x1 at 10x)", flush=True)
        peaks = {}
        for factor in (1, 10):
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
            peaks[factor] = train_on(base.join(f"pairs-{factor}x"), base.join(f"train-{factor}x"), factor * args.pairs)
            ray.shutdown()
            print(f"{factor}x: peak memory (PSS) {peaks[factor] / 2**20:.0f} MiB", flush=True)
    print(
        json.dumps(
            {
                "rss_ratio_10x": round(peaks[10] / peaks[1], 3),
                "rss_mb_1x": round(peaks[1] / 2**20, 1),
                "rss_mb_10x": round(peaks[10] / 2**20, 1),
                "pairs_1x": args.pairs,
            }
        )
    )


if __name__ == "__main__":
    main()

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
import tempfile
import threading
import time

import numpy as np
import psutil
import torch

from workflows.distributions import NoiseSpec
from workflows.shards import CouplingFormat, ShardEntry, encode_shard, sha256, shard_count, shard_name, shard_range
from workflows.stage import write_manifest
from workflows.stages.train import ModelSpec, TrainConfig, run_train_stage
from workflows.storage import Location, location
from rf.noise import noise

DIM, SHARD, BATCH = 256, 8192, 1024


def write_pairs(output: Location, pairs: int) -> None:
    """A finished coupling stage of ``pairs`` pairs x1 = 0.5·x0 + 1 (any deterministic map)."""
    fmt = CouplingFormat(shape=[DIM], seed=0, pi0=NoiseSpec(shape=[DIM]), teacher_hash="bench", solver="map", shard_size=SHARD)
    entries = []
    for index in range(shard_count(pairs, SHARD)):
        start, stop = shard_range(index, SHARD, pairs)
        x0 = noise(0, np.arange(start, stop), (DIM,))
        data = encode_shard(fmt, index, np.arange(start, stop), x0, 0.5 * x0 + 1, torch.ones(stop - start))
        output.join(shard_name(index)).write_bytes(data)
        entries.append(ShardEntry(index, shard_name(index), start, stop - start, sha256(data), len(data)).as_dict())
    write_manifest(output, {"hash": f"bench{pairs}", "coupling": fmt.model_dump(mode="json"), "shards": entries, "pairs": pairs})


class PeakRSS:
    """Samples the summed PSS of this process tree in a background thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        me = psutil.Process()
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(0.5)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def train_on(coupling: Location, output: Location, pairs: int) -> int:
    config = TrainConfig(
        model=ModelSpec(kind="mlp", config={"dim": DIM, "width": 256, "depth": 2}),
        steps=pairs // BATCH, batch_size=BATCH, lr=1e-4, workers=2, checkpoint_every=10**6, log_every=50,
    )
    with PeakRSS() as rss:
        run_train_stage(config, output, coupling)
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
    print(json.dumps({
        "rss_ratio_10x": round(peaks[10] / peaks[1], 3),
        "rss_mb_1x": round(peaks[1] / 2**20, 1),
        "rss_mb_10x": round(peaks[10] / 2**20, 1),
        "pairs_1x": args.pairs,
    }))


if __name__ == "__main__":
    main()

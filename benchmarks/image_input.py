"""Images/s of the training input stream for image π1 against a plain loop, and how it grows.

A generated dataset: N procedural RGB images of 128² (``--resolution``; a few random plane waves per channel plus
pixel noise: PNG stores them at ≈ 70 % of the raw bytes, as it does photographs), imported with
the real importer (:func:`workflows.images.import_images`) as PNG, and again as raw pixels, in
shards of 256 images. The stream is :class:`workflows.pair_stream.StreamPlan`'s dataset of one
rank (W = 1, batch 64) over three epochs, iterated as a train worker iterates it
(:func:`~workflows.pair_stream.rank_batches`: uint8 torch batches), in this process, nothing else
running, with windows of 2 shards (the window decides the order, not the work); the second epoch
is timed — the steady state of a training run, whose stream lives for many epochs: at both of its
ends the readers are the same depth ahead of the consumer (timing the last epoch would credit the
stream with the windows it decoded before the clock started). The dataset must be long against
that depth (``--images`` ≥ 16 shards). Every arm
runs once unmeasured (worker start-up, first imports), then side by side in rounds (A B C D E,
then E D C B A; ratios of summed times, so a drifting machine biases no arm):

- ``raw loop``: one process reads the shards in order and decodes them
  (:meth:`ImageDataset.shard_bytes` + :func:`decode_shard`) — one core, no Ray, no shuffle;
- ``raw loops ×2``: two such processes side by side, each on half the shards, timed on their
  second pass (the first warms each fresh process, as the stream's first epoch warms its
  readers) — what two cores of this machine give at best (the ceiling of ``two_vs_one_reader``);
- ``stream, 1 CPU``: ``train.input: {cpus: 1, readers: 1}``;
- ``stream, 2 CPUs``: ``{cpus: 2, readers: 2}``;
- ``stream raw, 1 CPU``: the raw-pixel import through the 1-CPU stream.

``readers_busy_1cpu`` / ``readers_busy_2cpus``: the read actors' CPU seconds in the timed epochs ÷
(their CPUs × the epochs' time) — how much of the CPUs given to decoding the readers got. Below 1
with two readers on two cores: the consumer (this process, as a train worker iterates) and Ray's
own processes share those cores, which the two raw loops of the ceiling do not have to.

Then, each on a fresh Ray with a ``worker_process_setup_hook`` that logs every shard read:

- peak memory (PSS summed over this process and every process below it — driver, raylet, object
  store, read actors — sampled every 0.2 s) of the stream over N and over 4N images, with the same
  settings (a window of 2 shards, ``buffer_mb`` the same: well below N's 200 MB of pixels, so
  1× already runs at the stream's bound);
- shard reads in the three epochs over N ÷ (3 × shards).

Targets: stream_vs_raw ≥ 0.9 (1 CPU), two_vs_one_reader ≥ 1.6 on 2 cores, rss_ratio_4x ≤ 1.2,
reads_per_shard ≤ 1.05. Run: ``python benchmarks/image_input.py`` (about 10 minutes on 2 cores,
most of it importing). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from peak_memory import PeakPSS

SHARD, BATCH, EPOCHS = 256, 64, 3
READ_LOG = "RECTIFLOW_BENCH_READ_LOG"


def window_mb(resolution: int) -> int:
    """A window of 2 shards (the window decides the order, not the work): enough windows an
    epoch for 2 readers."""
    return math.ceil(2.5 * SHARD * (3 * resolution**2 + 8) / 2**20)


def procedural_images(count: int, resolution: int, seed: int) -> np.ndarray:
    """uint8 (count, R, R, 3): per channel six plane waves of random frequency, phase and
    amplitude around grey, plus N(0, 6²) pixel noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.mgrid[0:resolution, 0:resolution], -1).reshape(-1, 2) / resolution
    out = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    for i in range(count):
        frequency, phase = rng.uniform(0.5, 6, (3, 6, 2)), rng.uniform(0, 2 * np.pi, (3, 6, 1))
        amplitude = rng.uniform(10, 40, (3, 6, 1))
        waves = (amplitude * np.sin(2 * np.pi * frequency @ grid.T + phase)).sum(1)  # (3, R²)
        pixels = 128 + waves + rng.normal(0, 6, waves.shape)
        out[i] = np.clip(pixels, 0, 255).astype(np.uint8).reshape(3, resolution, resolution).transpose(1, 2, 0)
    return out


def make_dataset(root: Path, name: str, count: int, resolution: int, encoding: str) -> str:
    from workflows.images import import_images

    source = root / f"{name}.npy"
    if not source.exists():
        np.save(source, procedural_images(count, resolution, seed=count))
    destination = str(root / f"{name}-{encoding}")
    import_images(str(source), destination, resolution=resolution, channels=3, shard_size=SHARD, encoding=encoding)
    return destination


# -------------------------------------------------------------------------- the arms


def raw_loop(uri: str, part: int = 0, parts: int = 1) -> tuple[float, int]:
    """(seconds, images) for one process to read and decode shards part, part + parts, … in order."""
    from workflows.images import ImageDataset, decode_shard

    dataset = ImageDataset.open(uri)
    started, images = time.perf_counter(), 0
    for entry in dataset.shards[part::parts]:
        _, pixels = decode_shard(
            dataset.shard_bytes(entry), entry, dataset.shape, dataset.encoding, dataset.shard_uri(entry)
        )
        images += len(pixels)
    return time.perf_counter() - started, images


def _raw_part(uri: str, part: int, barrier, results) -> None:
    raw_loop(uri, part, 2)  # unmeasured: imports and first-use costs of a fresh process
    barrier.wait()
    results.put(raw_loop(uri, part, 2))


def two_raw_loops(uri: str) -> tuple[float, int]:
    """(seconds until both finish, images) of two raw loops in two processes started together."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_raw_part, args=(uri, part, barrier, results)) for part in range(2)]
    for process in processes:
        process.start()
    parts = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return max(seconds for seconds, _ in parts), sum(images for _, images in parts)


def reader_cpu_seconds() -> float:
    """CPU seconds (user + system) the stream's read actors below this process have used."""
    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            if "SegmentReader" in " ".join(process.cmdline()):
                total += sum(process.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def stream_epoch(uri: str, count: int, **reading) -> tuple[float, int, float]:
    """(seconds, images) of the second epoch of a three-epoch stream: the steady state a train
    worker sees (read actors started, pipeline full at both ends), window boundaries and epoch
    changes included; and the read actors' CPU seconds in that epoch."""
    from workflows.images import ImageDataset
    from workflows.pair_stream import IndependentSource, StreamPlan, rank_batches
    from workflows.settings import ImagesSpec, IndependentPairs, NoiseSpec
    from workflows.settings.training import InputSettings

    shape = list(ImageDataset.open(uri).shape)
    data = IndependentPairs(pi0=NoiseSpec(shape=shape), pi1=ImagesSpec(shape=shape, uri=uri), seed0=1, seed1=2)
    plan = StreamPlan(IndependentSource.open(data), 1, BATCH, EPOCHS * count // BATCH, reading=InputSettings(**reading))
    images, started, finished = 0, None, None
    for batch in rank_batches(
        plan.dataset(0, 0).iterator(), batch_size=BATCH, device="cpu", prefetch_batches=plan.reading.prefetch_batches
    ):
        images += len(batch["x1"])
        if images == count:
            started, cpu = time.perf_counter(), reader_cpu_seconds()
        elif images == 2 * count:
            finished, cpu = time.perf_counter(), reader_cpu_seconds() - cpu
    assert images == EPOCHS * count, images
    return finished - started, count, cpu


# -------------------------------------------------------------------------- memory and reads


def log_shard_reads() -> None:
    """Worker setup hook: append the name of every shard a worker reads to the file $READ_LOG."""
    from workflows.images import ImageDataset

    read, log = ImageDataset.shard_bytes, os.environ[READ_LOG]

    def counted(self, entry):
        with open(log, "a") as file:
            file.write(f"{entry.name}\n")
        return read(self, entry)

    ImageDataset.shard_bytes = counted


def start_ray(read_log: str | None = None) -> None:
    import ray
    from ray.data import DataContext

    runtime_env = {"worker_process_setup_hook": log_shard_reads, "env_vars": {READ_LOG: read_log}} if read_log else None
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env=runtime_env,
    )
    DataContext.get_current().enable_progress_bars = False


def bounded_epoch(uri: str, count: int, window: int, read_log: str) -> tuple[int, int]:
    """(peak PSS, shard reads) of the stream on a fresh Ray, memory settings well below the data."""
    import ray

    start_ray(read_log)
    try:
        with PeakPSS(0.2) as pss:
            stream_epoch(uri, count, cpus=1, readers=1, window_mb=window, buffer_mb=window)
    finally:
        ray.shutdown()
    return pss.peak, len(Path(read_log).read_text().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="images of the 1x dataset (a multiple of 256)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds of all arms, in A B C D E / E D C B A order (single epochs on this 2-core machine differ by "
        "up to 15 %%; more rounds average that out)",
    )
    parser.add_argument("--no-growth", action="store_true", help="measure the rates only (no 4x dataset)")
    args = parser.parse_args()
    if args.images < 16 * SHARD or args.images % SHARD:
        parser.error(
            f"--images must be a multiple of {SHARD} and at least {16 * SHARD}: a timed epoch of fewer shards is "
            "short against the readers' lead, and the rates would measure the pipeline's edges"
        )
    logging.basicConfig(level=logging.WARNING)
    import ray

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        start_ray()  # the imports run on an actor pool
        started = time.perf_counter()
        png = make_dataset(root, "1x", args.images, args.resolution, "png")
        raw = make_dataset(root, "1x", args.images, args.resolution, "raw")
        big = None if args.no_growth else make_dataset(root, "4x", 4 * args.images, args.resolution, "png")
        print(
            f"imported {args.images} images of {args.resolution}² (png, raw{'' if big is None else ', and 4x png'}) "
            f"in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        window = window_mb(args.resolution)
        arms = {
            "raw loop": lambda: raw_loop(png),
            "stream, 1 CPU": lambda: stream_epoch(png, args.images, cpus=1, readers=1, window_mb=window),
            "stream, 2 CPUs": lambda: stream_epoch(png, args.images, cpus=2, readers=2, window_mb=window),
            "stream raw, 1 CPU": lambda: stream_epoch(raw, args.images, cpus=1, readers=1, window_mb=window),
            "raw loops x2": lambda: two_raw_loops(png),
        }
        for arm in arms.values():  # worker start-up and first imports, not measured
            arm()
        seconds, reader_cpu = dict.fromkeys(arms, 0.0), dict.fromkeys(arms, 0.0)
        for run in range(args.rounds):
            for name in list(arms) if run % 2 == 0 else list(arms)[::-1]:
                taken, images, *reader = arms[name]()  # the streams also give their readers' CPU seconds
                assert images == args.images, (name, images)
                seconds[name] += taken
                reader_cpu[name] += sum(reader)
                print(f"{name}: {images / taken:.0f} images/s", flush=True)
        ray.shutdown()
        streams = {1: "stream, 1 CPU", 2: "stream, 2 CPUs"}
        busy = {cpus: reader_cpu[arm] / (cpus * seconds[arm]) for cpus, arm in streams.items()}

        peaks, reads = {}, {}
        for factor, uri in ((1, png), (4, big)) if big is not None else ():
            log = str(root / f"reads-{factor}x.log")
            peaks[factor], reads[factor] = bounded_epoch(uri, factor * args.images, window, log)
            print(
                f"{factor}x: peak memory (PSS) {peaks[factor] / 2**20:.0f} MiB, {reads[factor]} shard reads "
                f"in {EPOCHS} epochs of {factor * args.images // SHARD} shards",
                flush=True,
            )

    total = args.images * args.rounds
    one, two = seconds["stream, 1 CPU"], seconds["stream, 2 CPUs"]
    loop, loops = seconds["raw loop"], seconds["raw loops x2"]
    growth = (
        {}
        if not peaks
        else {
            "rss_ratio_4x": round(peaks[4] / peaks[1], 3),
            "reads_per_shard": round(reads[1] / (EPOCHS * args.images // SHARD), 3),
            "rss_mb_1x": round(peaks[1] / 2**20, 1),
            "rss_mb_4x": round(peaks[4] / 2**20, 1),
        }
    )
    print(
        json.dumps(
            {
                "stream_vs_raw": round(loop / one, 3),
                "two_vs_one_reader": round(one / two, 3),
                "raw_two_vs_one": round(loop / loops, 3),
                "two_vs_one_of_ceiling": round((one / two) / (loop / loops), 3),
                "readers_busy_1cpu": round(busy[1], 3),
                "readers_busy_2cpus": round(busy[2], 3),
                **{key: value for key, value in growth.items() if not key.startswith("rss_mb")},
                "raw_vs_png": round(one / seconds["stream raw, 1 CPU"], 3),
                "png_images_per_s_per_core": round(total / loop, 1),
                "stream_png_images_per_s_1cpu": round(total / one, 1),
                "stream_png_images_per_s_2cpus": round(total / two, 1),
                "stream_raw_images_per_s_1cpu": round(total / seconds["stream raw, 1 CPU"], 1),
                **{key: value for key, value in growth.items() if key.startswith("rss_mb")},
                "images_1x": args.images,
                "resolution": args.resolution,
            }
        )
    )


if __name__ == "__main__":
    main()

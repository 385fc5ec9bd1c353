"""Training pairs as one deterministic Ray Dataset per train worker, resumable at any step.

Each rank r of W consumes exactly b = batch/W rows per step: row j of step s is position
p = s·b + j of the rank's stream and example g = s·W·b + r·b + j (the id of its training time t).
The stream is a pure function of (source, seed, W, b, r, window), so a run resumed at step s
reads exactly what the uninterrupted run read from step s on, and the number of readers
changes nothing (Ray Data keeps their order: ``preserve_order``).

Where the rows come from:

- **independent pairs** (1-RF): X0 = π0(seed₀, g) and X1 = π1(seed₁, g), drawn by example id
  (:func:`~workflows.distributions.sample_by_id`) — except images as π1, which are *streamed*:
  the import's shards in the shard-sequential, window-shuffled order of
  :mod:`workflows.shard_windows` (keyed by seed₁; each image once per epoch of the rank), each
  mirrored by the coin of its example g — on the train worker's device, not by the reader.
  X0 stays by id (pair id = g).
- **online reflow**: X0 = π0(seed, g) and X1 = Flow(X0), solved by the reader from a frozen
  teacher (no shards; every epoch pays the ODE again).
- **coupling shards** (reflow, distillation): the coupling's shards, streamed in the same
  shard-sequential order (keyed by the stage's data seed).

Where the work happens. Read actors — ``train.input.readers`` of them per rank, Ray actors sharing
``train.input.cpus`` CPUs of their own — read and decode one window at a time and send rows of
``step``, ``example``, ``pair_id`` and the values that come from storage: ``x1`` (uint8 pixels
for images, a quarter of the bytes of floats), and ``x0`` when a coupling stores it (or when it
cannot be drawn on a device: π0 made of images, read by id; online pairs, solved from it). What is
drawn by id — the noise X0 of independent pairs and of couplings that do not store it, a toy —
the train worker draws on its own device (:meth:`PairSource.model_pairs`), X0 from ``pair_id``
and X1 from ``example``: the numbers a CPU draws (:mod:`rf.noise`), so a coupling's pairs are
the pairs it stored. A reader yields a window's rows in blocks of about :data:`SEGMENT_BYTES`, and
a rank's stream keeps at most ``train.input.buffer_mb`` of them in Ray's object store: a rank's
input holds about readers × (window + a few blocks) in its readers, plus that buffer.

The datasets are built by :class:`RankStreams`, a factory Ray Train calls each time it (re)starts
the worker group: it reads the step of the checkpoint Ray will restore and starts the streams
there, so a worker restart does not re-read the data before it. Every row carries ``step`` (the
step that consumes it); the train loop skips rows of steps it has already done.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import torch

from rf.coupling import generate_pairs
from rf.noise import Device
from rf.solvers import Solver
from workflows.couplings import Coupling
from workflows.distributions import ImageShards, flip_coins, sample_by_id
from workflows.images import flip, to_unit_interval
from workflows.ray_errors import input_error
from workflows.settings import DistributionSpec, ImagesSpec, IndependentPairs
from workflows.settings.training import InputSettings
from workflows.shard_windows import Segment, ShardSet, ShardWindows, copy_rows, read_window
from workflows.storage import Location
from workflows.weights import load_stage_model

logger = logging.getLogger("rectiflow.train")

SEGMENT_BYTES = 16 << 20
"""The size of the blocks readers send (and Ray Data's block limit for these streams)."""
READER_QUEUE_BLOCKS = 16
"""Blocks a read actor may have sent and not yet handed on (≤ 256 MB at :data:`SEGMENT_BYTES`).
Ray Data's default, 2, pauses the reader after every second block until the executor collects
them: ``python benchmarks/image_input.py --resolution 256 --images 4096 --no-growth`` measured
stream_vs_raw 0.59 with this constant set to 2 and 0.84 with 16 (before the readers stopped
flipping and copying; 0.93 since)."""
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
_ID_BYTES = 24  # step, example, pair_id


def _values(column: torch.Tensor) -> torch.Tensor:
    """float32 model values of a streamed column: uint8 pixels x ↦ x / 127.5 − 1, floats as they are."""
    return to_unit_interval(column) if column.dtype == torch.uint8 else column.float()


def _floats(spec: DistributionSpec) -> int:
    return 4 * int(np.prod(spec.shape))


class PairSource:
    """Where a stream's rows come from (subclasses are frozen dataclasses):

    - ``shards``: the shard set streamed shard-sequentially, keyed by ``order_seed``; None when
      rows are made by example id;
    - :meth:`rows`: the columns a reader sends for its examples;
    - ``x0_by_id`` / ``x1_by_id``: (distribution, seed) of what the train worker draws on its
      device when the batch does not carry it (X0 by ``pair_id``, X1 by ``example``)."""

    shards: ShardSet | None = None
    order_seed: int = 0
    x0_by_id: tuple[DistributionSpec, int] | None = None
    x1_by_id: tuple[DistributionSpec, int] | None = None
    segment_multiple: int = 1
    """Rows made by id come in segments of a multiple of this many rows."""

    @property
    def shape(self) -> list[int]:
        raise NotImplementedError

    @property
    def row_bytes(self) -> int:
        """Bytes of one row a reader sends."""
        raise NotImplementedError

    def rows(self, read: dict[str, np.ndarray], examples: np.ndarray) -> dict[str, np.ndarray]:
        """``pair_id`` and the value columns of ``examples``, given ``read``: their rows of a
        window (empty when the source has no shards)."""
        raise NotImplementedError

    def model_pairs(self, batch: dict[str, torch.Tensor], device: Device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, x1) of a batch as float32 model inputs on ``device``: streamed columns converted
        (uint8 pixels to [−1, 1]), the others drawn there by id."""
        x0 = _values(batch["x0"]) if "x0" in batch else sample_by_id(*self.x0_by_id, batch["pair_id"], device=device)
        x1 = _values(batch["x1"]) if "x1" in batch else sample_by_id(*self.x1_by_id, batch["example"], device=device)
        return x0, x1


@dataclass(frozen=True)
class IndependentSource(PairSource):
    """X0 ~ π0 by example id; X1 ~ π1 by example id, or streamed from π1's shards (``images``,
    opened by :meth:`open`) when π1 is images."""

    pi0: DistributionSpec
    pi1: DistributionSpec
    seed0: int
    seed1: int
    images: ImageShards | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pi1, ImagesSpec) != (self.images is not None):
            raise ValueError("images as π1 are streamed from their shards: build the source by IndependentSource.open")

    @classmethod
    def open(cls, data: IndependentPairs) -> IndependentSource:
        """The source of ``data``, with π1's import opened (its manifest) when π1 is images."""
        images = ImageShards.open(data.pi1) if isinstance(data.pi1, ImagesSpec) else None
        return cls(data.pi0, data.pi1, data.seed0, data.seed1, images)

    @property
    def shape(self) -> list[int]:
        return list(self.pi1.shape)

    @property
    def shards(self) -> ImageShards | None:
        return self.images

    @property
    def order_seed(self) -> int:
        return self.seed1

    @property
    def x0_by_id(self) -> tuple[DistributionSpec, int] | None:
        return None if isinstance(self.pi0, ImagesSpec) else (self.pi0, self.seed0)

    @property
    def x1_by_id(self) -> tuple[DistributionSpec, int] | None:
        return None if self.images is not None else (self.pi1, self.seed1)

    @property
    def row_bytes(self) -> int:
        images = self.images.row_bytes if self.images is not None else 0
        return _ID_BYTES + images + (_floats(self.pi0) if self.x0_by_id is None else 0)

    def rows(self, read: dict[str, np.ndarray], examples: np.ndarray) -> dict[str, np.ndarray]:
        out = {"pair_id": examples}
        if self.images is not None:
            out["x1"] = read["image"]  # mirrored by model_pairs, on the device
        if self.x0_by_id is None:  # images as π0 (a transfer): random access by id, for small datasets
            out["x0"] = sample_by_id(self.pi0, self.seed0, examples).numpy()
        return out

    def model_pairs(self, batch: dict[str, torch.Tensor], device: Device) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`PairSource.model_pairs`, with streamed images mirrored there, on the device,
        by the coins of their examples: the readers' CPUs only read, decode and shuffle."""
        x0, x1 = super().model_pairs(batch, device)
        if self.images is not None and self.pi1.flip:
            x1 = flip(x1, flip_coins(self.seed1, batch["example"].to(x1.device)))
        return x0, x1


@dataclass(frozen=True)
class OnlineSource(PairSource):
    """X0 ~ π0 by example id and X1 = teacher flow of X0, solved by the reader."""

    teacher: Location
    pi0: DistributionSpec
    seed: int
    solver: str
    forward_batch: int = 256

    @property
    def shape(self) -> list[int]:
        return list(self.pi0.shape)

    @property
    def segment_multiple(self) -> int:
        return self.forward_batch

    @property
    def row_bytes(self) -> int:
        return _ID_BYTES + 2 * _floats(self.pi0)

    def rows(self, read: dict[str, np.ndarray], examples: np.ndarray) -> dict[str, np.ndarray]:
        x0 = sample_by_id(self.pi0, self.seed, examples)
        solved = generate_pairs(_teacher(self.teacher), Solver.parse(self.solver), x0, chunk=self.forward_batch)
        return {"pair_id": examples, "x0": solved.x0.numpy(), "x1": solved.x1.numpy()}


@functools.lru_cache(maxsize=4)
def _teacher(stage: Location) -> torch.nn.Module:
    """The teacher's model, loaded once per process."""
    model, _ = load_stage_model(stage)
    return model


@dataclass(frozen=True)
class CouplingShards:
    """A coupling as a :class:`~workflows.shard_windows.ShardSet`: shard s gives its pair ids
    (``id``), ``x1`` and, when stored, ``x0`` as float32, verified against the manifest."""

    coupling: Coupling

    @property
    def rows(self) -> tuple[int, ...]:
        return tuple(entry.rows for entry in self.coupling.shards)

    @property
    def columns(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        fmt = self.coupling.format
        return {name: (np.dtype(np.float32), tuple(fmt.shape)) for name in fmt.columns[1:]}

    @property
    def row_bytes(self) -> int:
        return 8 + 4 * self.coupling.format.dim * (len(self.coupling.format.columns) - 1)

    def read(self, shard: int, out: dict[str, np.ndarray]) -> None:
        entry = self.coupling.shards[shard]
        ids, x0, x1 = self.coupling.read(entry)
        values = {"id": ids, "x1": x1.numpy(), **({"x0": x0.numpy()} if x0 is not None else {})}
        copy_rows(out, values, self.coupling.location.join(entry.name).uri)


@dataclass(frozen=True)
class CouplingSource(PairSource):
    """(X0, X1) streamed from the shards of a finished coupling stage; X0 drawn by pair id when
    the coupling does not store it."""

    coupling: Coupling
    seed: int

    @property
    def shape(self) -> list[int]:
        return list(self.coupling.format.shape)

    @property
    def shards(self) -> CouplingShards:
        return CouplingShards(self.coupling)

    @property
    def order_seed(self) -> int:
        return self.seed

    @property
    def _x0_in_task(self) -> bool:
        """x0 neither stored nor drawable on a device: π0 images, read by id in the reader."""
        fmt = self.coupling.format
        return not fmt.x0_stored and isinstance(fmt.pi0, ImagesSpec)

    @property
    def x0_by_id(self) -> tuple[DistributionSpec, int] | None:
        fmt = self.coupling.format
        return None if fmt.x0_stored or self._x0_in_task else (fmt.pi0, fmt.seed)

    @property
    def row_bytes(self) -> int:
        return _ID_BYTES + self.shards.row_bytes + (_floats(self.coupling.format.pi0) if self._x0_in_task else 0)

    def rows(self, read: dict[str, np.ndarray], examples: np.ndarray) -> dict[str, np.ndarray]:
        out = {"pair_id": read["id"], "x1": read["x1"]}
        if "x0" in read:
            out["x0"] = read["x0"]
        elif self._x0_in_task:
            fmt = self.coupling.format
            out["x0"] = sample_by_id(fmt.pi0, fmt.seed, read["id"]).numpy()
        return out


@dataclass(frozen=True)
class StreamPlan:
    """Everything that defines the per-rank streams of one training run."""

    source: IndependentSource | OnlineSource | CouplingSource
    world: int
    rank_batch: int
    steps: int
    ray_run: Location | None = None
    resume_step: int = 0
    """The step of the checkpoint an earlier attempt left (where a new attempt starts)."""
    reading: InputSettings = InputSettings()

    @property
    def window_shards(self) -> int:
        """k: the whole shards of the largest size that fit in ``reading.window_mb`` (at least 1)."""
        shards = self.source.shards
        largest = max(shards.rows) * shards.row_bytes
        return max(1, self.reading.window_mb * 2**20 // max(1, largest))

    def windows(self, rank: int) -> ShardWindows:
        shards = self.source.shards
        return ShardWindows(shards.rows, self.source.order_seed, self.world, rank, self.window_shards)

    @property
    def block_rows(self) -> int:
        """Rows of a block: the fewest whose bytes reach :data:`SEGMENT_BYTES`."""
        return -(-SEGMENT_BYTES // self.source.row_bytes)

    def example_ids(self, rank: int, positions: np.ndarray) -> np.ndarray:
        """Global example index g of positions in rank ``rank``'s stream."""
        step, j = np.divmod(positions, self.rank_batch)
        return step * self.world * self.rank_batch + rank * self.rank_batch + j

    def segments(self, rank: int, start_step: int) -> list[Segment]:
        """The read items of rank ``rank``'s stream from ``start_step`` to the last step: pieces
        of shard windows, or rows by id in segments of about one block."""
        first = start_step * self.rank_batch
        count = (self.steps - start_step) * self.rank_batch
        if self.source.shards is not None:
            return list(self.windows(rank).segments(first, count))
        multiple = self.source.segment_multiple
        size = multiple * max(1, self.block_rows // multiple)
        return [Segment(start, min(size, first + count - start)) for start in range(first, first + count, size)]

    def read_segment(self, rank: int, segment: Segment) -> Iterator[dict[str, np.ndarray]]:
        """The rows of one segment as numpy columns, in blocks of about :data:`SEGMENT_BYTES`
        (a window's rows), or as one block (rows by id)."""
        window, block = None, segment.rows
        if segment.window >= 0:
            shards = self.windows(rank).shards(segment.epoch, segment.window)
            threads = max(1, round(self.reading.cpus / self.reading.readers))
            window = read_window(self.source.shards, shards, self.source.order_seed, segment.epoch, threads)
            block = self.block_rows
        for start in range(0, segment.rows, block):
            stop = min(segment.rows, start + block)
            positions = np.arange(segment.first + start, segment.first + stop)
            examples = self.example_ids(rank, positions)
            read = window.take(segment.offset + start, segment.offset + stop) if window is not None else {}
            yield {"step": positions // self.rank_batch, "example": examples, **self.source.rows(read, examples)}

    def dataset(self, rank: int, start_step: int) -> ray.data.Dataset:
        """Rank ``rank``'s stream from ``start_step`` to the last step, as a Ray Dataset: one item a
        segment, read by a pool of ``reading.readers`` actors (:class:`SegmentReader`) of
        ``reading.cpus / readers`` CPUs each — the same processes all along, so the stream's memory
        is that of ``readers`` windows."""
        items = [segment.__dict__ for segment in self.segments(rank, start_step)]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            SegmentReader,
            fn_constructor_kwargs={"plan": self, "rank": rank},
            batch_size=1,
            num_cpus=self.reading.cpus / self.reading.readers,
            compute=ray.data.ActorPoolStrategy(size=self.reading.readers, max_tasks_in_flight_per_actor=2),
        )
        dataset.context.target_max_block_size = SEGMENT_BYTES
        dataset.context._max_num_blocks_in_streaming_gen_buffer = READER_QUEUE_BLOCKS
        dataset.context.execution_options.preserve_order = True  # the stream's order, whatever the tasks' timing
        dataset.context.raise_original_map_exception = True  # a corrupt shard's error, naming it, reaches the worker
        return dataset


class SegmentReader:
    """A read actor of one rank's stream: reads the segments it is given, in blocks."""

    def __init__(self, plan: StreamPlan, rank: int):
        self.plan, self.rank = plan, rank

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for row in range(len(batch["first"])):
            segment = Segment(**{name: int(values[row]) for name, values in batch.items()})
            yield from self.plan.read_segment(self.rank, segment)


def rank_batches(stream: ray.data.DataIterator, **options: Any) -> Iterator[dict[str, torch.Tensor]]:
    """``stream.iter_torch_batches(**options)``, with an error a reader raised about its input (a
    corrupt shard: a ValueError naming the file) raised as itself, out of Ray's wrappers, so that
    the stage fails naming the shard."""
    try:
        yield from stream.iter_torch_batches(**options)
    except Exception as error:
        cause = input_error(error)
        if cause is None:
            raise
        raise cause from None


def restored_step(ray_run: Location | None) -> int:
    """The step of the checkpoint Ray Train will restore (from its run snapshot), else 0."""
    if ray_run is None:
        return 0
    try:
        snapshot = json.loads(ray_run.join(RAY_SNAPSHOT).read_bytes())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class RankStreams:
    """The ``datasets`` factory handed to Ray Train: rank r's stream is ``rank{r}``."""

    plan: StreamPlan
    rank: int

    def __call__(self) -> ray.data.Dataset:
        start = min(restored_step(self.plan.ray_run) or self.plan.resume_step, self.plan.steps)
        logger.info("rank %d data stream starts at step %d", self.rank, start)
        return self.plan.dataset(self.rank, start)


def rank_datasets(plan: StreamPlan) -> dict[str, Any]:
    """``{"rank0": factory, …}`` for ``TorchTrainer(datasets=…)``."""
    return {f"rank{r}": RankStreams(plan, r) for r in range(plan.world)}

"""Training pairs as one deterministic Ray Dataset per train worker, resumable at any step.

Each rank r of W consumes exactly b = batch/W rows per step. Its stream is a pure function of
(source, seed, W, b, r), so a run resumed at step s reads exactly what the uninterrupted run
read from step s on:

- **independent pairs** (1-RF): row j of step s on rank r is example g = s·W·b + r·b + j, with
  X0 = π0(seed₀, g) and X1 = π1(seed₁, g) drawn by id — fresh pairs every step.
- **online reflow**: like independent pairs, but X1 = Flow(X0) solved on the fly from a frozen
  teacher instead of read from a coupling stage (no shards; every epoch pays the ODE again).
- **coupling shards** (reflow, distillation): epoch e deals the shards, in an order permuted by
  (seed, e), round-robin to the ranks (rank r gets every W-th); a rank reads its shards one
  after another, each rotated by an (seed, e, shard)-dependent offset, then moves to epoch e + 1.
  Pairs of consecutive ids are independent draws, so contiguous reading gives i.i.d. batches,
  and no rank ever reads another rank's shards.

Every row carries ``step`` (the step that consumes it) and ``example`` (its global index g, used
for the training time t) and ``pair_id``. A stream starts at a step boundary; the train loop
skips rows of steps it has already done (:func:`start_step` is only a hint for efficiency).

The datasets are built by :class:`RankStreams`, a factory Ray Train calls each time it (re)starts
the worker group: it reads the step of the checkpoint Ray will restore and starts the streams
there, so a worker restart does not re-read the data before it.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import ray.data
import torch

from rf.coupling import generate_pairs
from rf.noise import uniform
from rf.solvers import Solver
from workflows.distributions import DistributionSpec, sample_by_id
from workflows.shards import Coupling
from workflows.storage import Location
from workflows.weights import load_stage_model

logger = logging.getLogger("rectiflow.train")

_SEGMENT_ROWS = 8192
_STREAM_SHUFFLE = 7
_STREAM_ROTATE = 8
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class IndependentSource:
    """X0 ~ π0 and X1 ~ π1 drawn independently by example id."""

    pi0: DistributionSpec
    pi1: DistributionSpec
    seed0: int
    seed1: int

    @property
    def shape(self) -> list[int]:
        return list(self.pi1.shape)


@dataclass(frozen=True)
class OnlineSource:
    """X0 ~ π0 by example id and X1 = teacher flow of X0, solved when the row is read."""

    teacher: Location
    pi0: DistributionSpec
    seed: int
    solver: str
    forward_batch: int = 256

    @property
    def shape(self) -> list[int]:
        return list(self.pi0.shape)

    def pairs(self, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x0 = sample_by_id(self.pi0, self.seed, examples)
        solved = generate_pairs(_teacher(self.teacher), Solver.parse(self.solver), x0, chunk=self.forward_batch)
        return solved.x0.numpy(), solved.x1.numpy()


@functools.lru_cache(maxsize=4)
def _teacher(stage: Location) -> torch.nn.Module:
    """The teacher's model, loaded once per process."""
    model, _ = load_stage_model(stage)
    return model


@dataclass(frozen=True)
class CouplingSource:
    """(X0, X1) read from the shards of a finished coupling stage."""

    coupling: Coupling
    seed: int

    @property
    def shape(self) -> list[int]:
        return list(self.coupling.format.shape)


@dataclass(frozen=True)
class Segment:
    """Rows [first, first + rows) of a rank's stream, all from one place."""

    first: int
    rows: int
    shard: int = -1
    shard_offset: int = 0
    epoch: int = 0


_SEGMENT_FIELDS = ("first", "rows", "shard", "shard_offset", "epoch")


def _epoch_order(seed: int, epoch: int, shards: int) -> np.ndarray:
    """Shard indices in the order of epoch ``epoch`` (argsort of counter-based uniforms)."""
    keys = uniform(seed, np.arange(shards), stream=_STREAM_SHUFFLE + 16 * epoch).numpy()
    return np.argsort(keys, kind="stable")


def _rotation(seed: int, epoch: int, shard: int, rows: int) -> int:
    u = float(uniform(seed, np.array([shard]), stream=_STREAM_ROTATE + 16 * epoch)[0])
    return int(u * rows) % max(rows, 1)


def coupling_segments(
    source: CouplingSource, rank: int, world: int, first: int, rows: int
) -> Iterator[Segment]:
    """Segments covering rows [first, first + rows) of rank ``rank``'s stream."""
    entries = source.coupling.shards
    if len(entries) < world:
        raise ValueError(
            f"coupling {source.coupling.location.uri} has {len(entries)} shards for {world} train "
            "workers; every worker needs at least one shard (use a smaller shard_size)"
        )
    position, end, epoch = 0, first + rows, 0
    while position < end:
        order = _epoch_order(source.seed, epoch, len(entries))[rank::world]
        for index in order:
            entry = entries[int(index)]
            start, stop = max(position, first), min(position + entry.rows, end)
            if start < stop:
                yield Segment(start, stop - start, int(index), start - position, epoch)
            position += entry.rows
            if position >= end:
                return
        epoch += 1


def _independent_segments(first: int, rows: int) -> Iterator[Segment]:
    for start in range(first, first + rows, _SEGMENT_ROWS):
        yield Segment(start, min(_SEGMENT_ROWS, first + rows - start))


@dataclass(frozen=True)
class StreamPlan:
    """Everything that defines the per-rank streams of one training run."""

    source: IndependentSource | OnlineSource | CouplingSource
    world: int
    rank_batch: int
    steps: int
    ray_run: Location | None = None
    cpus_per_read: float = 0.25

    def example_ids(self, rank: int, positions: np.ndarray) -> np.ndarray:
        """Global example index g of positions in rank ``rank``'s stream."""
        step, j = np.divmod(positions, self.rank_batch)
        return step * self.world * self.rank_batch + rank * self.rank_batch + j

    def segments(self, rank: int, start_step: int) -> list[Segment]:
        first = start_step * self.rank_batch
        rows = (self.steps - start_step) * self.rank_batch
        if isinstance(self.source, CouplingSource):
            return list(coupling_segments(self.source, rank, self.world, first, rows))
        return list(_independent_segments(first, rows))

    def read_segment(self, rank: int, segment: Segment) -> dict[str, np.ndarray]:
        """The rows of one segment as numpy columns."""
        positions = np.arange(segment.first, segment.first + segment.rows)
        examples = self.example_ids(rank, positions)
        if isinstance(self.source, IndependentSource):
            pair_ids = examples
            x0 = sample_by_id(self.source.pi0, self.source.seed0, examples).numpy()
            x1 = sample_by_id(self.source.pi1, self.source.seed1, examples).numpy()
        elif isinstance(self.source, OnlineSource):
            pair_ids = examples
            x0, x1 = self.source.pairs(examples)
        else:
            entry = self.source.coupling.shards[segment.shard]
            ids, x0_all, x1_all = self.source.coupling.read(entry)
            rotation = _rotation(self.source.seed, segment.epoch, segment.shard, entry.rows)
            rows = (np.arange(segment.shard_offset, segment.shard_offset + segment.rows) + rotation) % entry.rows
            pair_ids, x0, x1 = ids[rows], x0_all[rows].numpy(), x1_all[rows].numpy()
        return {
            "step": positions // self.rank_batch,
            "example": examples,
            "pair_id": pair_ids,
            "x0": x0,
            "x1": x1,
        }

    def dataset(self, rank: int, start_step: int) -> ray.data.Dataset:
        """Rank ``rank``'s stream from ``start_step`` to the last step, as a Ray Dataset."""
        items = [segment.__dict__ for segment in self.segments(rank, start_step)]
        plan = self

        def read(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            columns = [
                plan.read_segment(rank, Segment(*(int(batch[key][i]) for key in _SEGMENT_FIELDS)))
                for i in range(len(batch["first"]))
            ]
            return {key: np.concatenate([c[key] for c in columns]) for key in columns[0]}

        # One read task at a time per rank: a segment holds many steps' worth of rows, and more
        # concurrent reads would only take cores from the training step.
        return ray.data.from_items(items).map_batches(
            read, batch_size=1, num_cpus=self.cpus_per_read, compute=ray.data.TaskPoolStrategy(size=1)
        )


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
        start = min(restored_step(self.plan.ray_run), self.plan.steps)
        logger.info("rank %d data stream starts at step %d", self.rank, start)
        return self.plan.dataset(self.rank, start)


def rank_datasets(plan: StreamPlan) -> dict[str, Any]:
    """``{"rank0": factory, …}`` for ``TorchTrainer(datasets=…)``."""
    return {f"rank{r}": RankStreams(plan, r) for r in range(plan.world)}

"""The shard-sequential order of a training stream: which rows a rank reads, and in what order.

A *shard set* (:class:`ShardSet`: an image import, a coupling) is n shards; shard s gives
``rows[s]`` rows, each with an ``id`` unique in the set (an image's dataset position, a pair id).
Rank r of W reads, for a ``seed`` and a window of k shards:

1. **Epoch e permutes the shards.** σ_e = argsort_s u(seed, s, ``shard_order(e)``): a uniformly
   random permutation keyed by (seed, e), computed from counters (:mod:`rf.noise`), so any epoch's
   order is addressed directly. Rank r takes σ_e[r], σ_e[r + W], σ_e[r + 2W], … — W ranks
   partition the shards, and every shard of the set lands in exactly one rank's epoch e.
2. **Windows of k shards.** The rank's share of epoch e is cut into consecutive windows of k
   shards (the last may be shorter). One reader reads a window: each of its shards once,
   whole, one after the other (or in parallel threads), never a row of another window.
3. **A seeded shuffle inside the window.** The window's rows go out sorted by the key
   (u₀, u₁)(seed, id, ``image_epoch(e)``) — words 0 and 1 of the row's counter block, compared
   lexicographically. i.i.d. keys make the order a uniformly random permutation of the window
   (a tie of both words has probability below n²·2⁻⁴⁹ for n rows); word 0 alone is the key of
   the dataset's whole epoch-e permutation, so a window's order is that permutation restricted
   to the window.
4. The rank's stream is its windows, epoch after epoch. Position p of the stream is a pure
   function of (rows, seed, W, r, k, p), so a stream can start at any position (resume) and
   produces the same rows whatever the number of readers.

Exactly once: in rank r's epoch e every row of its shards appears once. Memory: a reader
holds one window, at most k shards decoded, whatever n — k comes from a byte budget
(:attr:`workflows.settings.training.InputSettings.window_mb`).

**Shuffle quality.** Within an epoch a batch is drawn without replacement from one window: k
shards out of the rank's ⌈n/W⌉, i.e. at most k·S consecutive rows of the source listing for
shards of S rows. When the source order says nothing about the content (LSUN's hashed keys,
CelebA-HQ's numbering), that is as good as a full shuffle. When it does (class folders sorted by
name, near-duplicate frames in sequence), a batch sees only a k/n slice of the data's variety per
window; the window composition is redrawn every epoch, and over a run every shard is visited at
the same expected rate, so the bias is within an epoch, not in the marginal. Make windows many
shards (smaller shards, larger ``window_mb``) when the source is ordered; when k ≥ ⌈n/W⌉ each
rank's epoch is a full shuffle of its share.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rf.noise import STREAMS, uniform


class ShardSet(Protocol):
    """A sharded dataset a stream reads shard by shard."""

    @property
    def rows(self) -> tuple[int, ...]:
        """The rows each shard gives (what :meth:`read` returns)."""

    @property
    def columns(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The value columns of a row: name → (dtype, shape of one row)."""

    @property
    def row_bytes(self) -> int:
        """Bytes one decoded row takes (the values and its id)."""

    def read(self, shard: int, out: dict[str, np.ndarray]) -> None:
        """Fill ``out`` — ``{"id": int64 (rows[shard],), column: (rows[shard], *shape), …}``, the
        shard's rows of a window's buffers — with the shard's rows, verified (decoding straight
        into them where it can); an error naming the shard's file otherwise."""


@dataclass(frozen=True)
class Segment:
    """Stream positions [first, first + rows): rows [offset, offset + rows) of window ``window``
    of epoch ``epoch`` (window −1: rows drawn by example id, nothing read)."""

    first: int
    rows: int
    epoch: int = -1
    window: int = -1
    offset: int = 0


def shard_order(seed: int, epoch: int, shards: int) -> np.ndarray:
    """σ_e: the shard indices of epoch ``epoch`` in order (argsort of counter-based uniforms)."""
    keys = uniform(seed, np.arange(shards), stream=STREAMS.shard_order(epoch)).numpy()
    return np.argsort(keys, kind="stable")


@dataclass(frozen=True)
class ShardWindows:
    """Rank ``rank`` of ``world``'s windows of ``window`` shards over shards of ``rows`` rows."""

    rows: tuple[int, ...]
    seed: int
    world: int
    rank: int
    window: int

    def __post_init__(self) -> None:
        if self.window < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"bad window {self.window} or rank {self.rank} of {self.world}")
        if len(self.rows) < self.world:
            raise ValueError(f"{len(self.rows)} shards for {self.world} ranks: every rank needs a shard")
        if sum(self.rows) == 0:
            raise ValueError("the shards hold no rows")

    def share(self, epoch: int) -> np.ndarray:
        """The rank's shards in epoch ``epoch``, in reading order."""
        return shard_order(self.seed, epoch, len(self.rows))[self.rank :: self.world]

    def shards(self, epoch: int, window: int) -> np.ndarray:
        """The shards of window ``window`` of epoch ``epoch``."""
        return self.share(epoch)[window * self.window : (window + 1) * self.window]

    def segments(self, first: int, count: int) -> Iterator[Segment]:
        """The pieces of windows that make stream positions [first, first + count), in order."""
        position, end, epoch = 0, first + count, 0
        rows = np.asarray(self.rows, dtype=np.int64)
        while position < end:
            share = self.share(epoch)
            for window, start in enumerate(range(0, len(share), self.window)):
                size = int(rows[share[start : start + self.window]].sum())
                lo, hi = max(position, first), min(position + size, end)
                if lo < hi:
                    yield Segment(lo, hi - lo, epoch, window, lo - position)
                position += size
                if position >= end:
                    return
            epoch += 1


@dataclass(frozen=True)
class Window:
    """The decoded rows of one window: ``columns`` (with ``id``) in shard order, and ``order``,
    the row indices in stream order."""

    columns: dict[str, np.ndarray]
    order: np.ndarray

    def take(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Stream rows [start, stop) of the window (a copy)."""
        chosen = self.order[start:stop]
        return {name: values[chosen] for name, values in self.columns.items()}

    @property
    def nbytes(self) -> int:
        return sum(values.nbytes for values in self.columns.values()) + self.order.nbytes


def window_order(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """Row indices of ``ids`` sorted by their epoch keys (u₀, u₁)(seed, id, image_epoch(e))."""
    keys = uniform(seed, ids, (2,), stream=STREAMS.image_epoch(epoch)).numpy()
    return np.lexsort((keys[:, 1], keys[:, 0]))


def copy_rows(out: dict[str, np.ndarray], values: dict[str, np.ndarray], source: str) -> None:
    """Copy a shard's decoded columns into ``out`` (its rows of a window); ``ValueError`` naming
    ``source`` when it gave other than the rows its set lists."""
    if len(values["id"]) != len(out["id"]):
        raise ValueError(f"shard {source} gave {len(values['id'])} rows, its set lists {len(out['id'])}")
    for name, target in out.items():
        target[...] = values[name]


def read_window(shard_set: ShardSet, shards: np.ndarray, seed: int, epoch: int, threads: int = 1) -> Window:
    """Read the window of ``shards`` of epoch ``epoch``: every shard once, into one buffer per
    column (images decoded straight into it), with ``threads`` shards decoding at a time (Pillow,
    zstd and sha256 release the GIL). Holds the window plus, per thread, one shard's bytes (and its
    decoded rows where they are copied: label-filtered images, couplings)."""
    sizes = [shard_set.rows[int(s)] for s in shards]
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    columns = {"id": np.empty(int(starts[-1]), dtype=np.int64)}
    for name, (dtype, shape) in shard_set.columns.items():
        columns[name] = np.empty((int(starts[-1]), *shape), dtype=dtype)

    def fill(i: int) -> None:
        shard_set.read(int(shards[i]), {name: values[starts[i] : starts[i + 1]] for name, values in columns.items()})

    if threads > 1 and len(shards) > 1:
        with ThreadPoolExecutor(min(threads, len(shards))) as pool:
            list(pool.map(fill, range(len(shards))))
    else:
        for i in range(len(shards)):
            fill(i)
    return Window(columns, window_order(seed, epoch, columns["id"]))

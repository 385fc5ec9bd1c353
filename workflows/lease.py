"""A lease per stage that fences: at most one run works on a stage, and a run that lost the lease
can no longer make anything of the stage count.

The lease is ``_LEASE.json`` in the stage's folder: the holder (run id, host, pid), since when, its
last heartbeat, and a **generation** that grows by one at every acquisition. Every change is a
compare-and-swap on storage (:mod:`workflows.storage`):

- **acquire**: create the file if absent (``If-None-Match: *`` / exclusive link), with generation
  1 + the highest ``attempt-N`` folder already there; or, when the holder is stale (no heartbeat
  for ``ttl`` seconds, or a dead process on this host), replace it conditionally on the version
  read (``If-Match: ETag`` / a flock-guarded compare-and-rename) with generation + 1. Of two runs
  racing, exactly one swap succeeds.
- **heartbeat** (every ``ttl / 4``) and **check** (before anything that makes the stage count):
  replace conditionally on the version this holder last wrote. If the swap fails, someone took
  over: the lease is **lost**, and :meth:`Lease.check` raises :class:`LeaseLost` from then on.
- **release**: delete conditionally on the last version: a successor's lease is never deleted.

Fencing: a stage writes what is not content-addressed (checkpoints, a model, evaluation files,
a report) under ``attempt-{generation}/`` and records the generation in its manifest; its
manifest is written only after a successful check; its Ray workers read the lease file and stop
when its generation is no longer theirs (:class:`Fence`). A run paused past the TTL (a stopped
VM, a long GC) therefore wakes up to a lost lease: whatever it still writes lands in its own
attempt folder, which no manifest names. Shards of couplings and imports are created exclusively
and are pure functions of their ids, so a fenced writer can only ever write identical bytes.

A run refuses a store that ignores conditional writes (:func:`probe_conditional_writes`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from workflows.storage import Location, StorageError

LEASE_FILE = "_LEASE.json"
ATTEMPT = re.compile(r"^attempt-(\d+)$")
logger = logging.getLogger("rectiflow.lease")


class LeaseHeld(RuntimeError):
    """Another live run holds the stage's lease (and the caller chose not to wait)."""


class LeaseLost(RuntimeError):
    """Another run took this stage's lease over: this run must stop working on the stage."""


class ConditionalWritesUnsupported(StorageError):
    """The storage root ignores conditional writes, so leases could not exclude each other."""


def attempt_folder(generation: int) -> str:
    return f"attempt-{generation}"


@dataclass(frozen=True)
class Holder:
    """The content of ``_LEASE.json``."""

    run_id: str
    host: str
    pid: int
    since: float
    heartbeat: float
    generation: int

    def describe(self, now: float) -> str:
        return (
            f"run {self.run_id} (host {self.host}, pid {self.pid}), holding it for {now - self.since:.0f} s, "
            f"last heartbeat {now - self.heartbeat:.0f} s ago"
        )

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder:
        """The holder in ``data``; an unreadable record reads as a long-dead holder of generation 0."""
        try:
            value = json.loads(data)
            return cls(**{**value, "generation": int(value.get("generation", 0))})
        except (ValueError, TypeError):
            return cls("unreadable", "", -1, 0.0, 0.0, 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(holder: Holder, ttl: float, now: float) -> bool:
    """A holder whose heartbeat is older than ``ttl``, or a dead process on this host."""
    if now - holder.heartbeat > ttl:
        return True
    return holder.host == socket.gethostname() and not _alive(holder.pid)


def _next_generation(stage: Location) -> int:
    """1 + the highest attempt folder under ``stage`` (so generations never repeat, even when a
    released lease file is gone)."""
    numbers = [int(match.group(1)) for match in map(ATTEMPT.match, stage.list_names()) if match]
    return 1 + max(numbers, default=0)


@dataclass(frozen=True)
class Fence:
    """What a worker needs to notice that its stage's lease moved on: the lease file, the
    generation it works for, and how often to look (the heartbeat interval)."""

    lease_file: Location
    generation: int
    interval: float

    def still_ours(self) -> bool:
        try:
            return Holder.parse(self.lease_file.read_bytes()).generation == self.generation
        except FileNotFoundError:
            return False


class FenceWatch:
    """Calls :meth:`Fence.still_ours` at most every ``interval`` seconds; :meth:`check` raises
    :class:`LeaseLost` once it is not. ``fence=None`` (a stage run outside a pipeline) never raises."""

    def __init__(self, fence: Fence | None):
        self.fence = fence
        self._next = time.monotonic()

    def check(self) -> None:
        if self.fence is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.fence.interval
        if not self.fence.still_ours():
            raise LeaseLost(
                f"{self.fence.lease_file.uri} no longer holds generation {self.fence.generation}: another run "
                "took the stage over; this worker stops"
            )


class Lease:
    """The lease of one stage, held by this process for one run (see the module docstring)."""

    def __init__(self, stage: Location, run_id: str | None = None, ttl: float = 60.0):
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.folder = stage
        self.file = stage.join(LEASE_FILE)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.ttl = ttl
        self.holder: Holder | None = None
        self._version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lost = False

    @property
    def generation(self) -> int:
        if self.holder is None:
            raise RuntimeError(f"the lease {self.file.uri} is not held")
        return self.holder.generation

    @property
    def attempt(self) -> Location:
        """Where this holder writes what is not content-addressed: ``attempt-{generation}``."""
        return self.folder.join(attempt_folder(self.generation))

    def fence(self) -> Fence:
        return Fence(self.file, self.generation, self.ttl / 4)

    def generation_record(self) -> dict[str, Any]:
        """What a manifest records of the lease it was written under."""
        return {"generation": self.generation, "run_id": self.run_id, "attempt": attempt_folder(self.generation)}

    def current(self) -> tuple[Holder, str] | None:
        """(holder, version) on storage now, or None when there is no lease."""
        try:
            data, version = self.file.read_versioned()
        except FileNotFoundError:
            return None
        return Holder.parse(data), version

    def _record(self, generation: int) -> Holder:
        now = time.time()
        return Holder(self.run_id, socket.gethostname(), os.getpid(), now, now, generation)

    def try_acquire(self) -> Holder | None:
        """Take the lease if it is free or stale; returns None on success, else the live holder."""
        mine = self._record(_next_generation(self.folder))
        if self.file.create_bytes(mine.to_bytes()):
            return self._won(mine)
        found = self.current()
        if found is None:
            return self.try_acquire()  # released between our create and our read
        holder, version = found
        now = time.time()
        if holder.run_id == self.run_id and holder.pid == os.getpid():
            # our own create reached storage but its answer was lost (a dropped connection retried)
            return self._won(holder, version)
        if not is_stale(holder, self.ttl, now):
            return holder
        logger.warning("taking over the stale lease of %s: %s", self.file.uri, holder.describe(now))
        successor = replace(mine, generation=max(holder.generation, mine.generation - 1) + 1)
        version = self.file.replace_if(successor.to_bytes(), version)
        if version is None:
            found = self.current()
            return found[0] if found else self.try_acquire()  # another run swapped first
        # the previous holder is gone: sweep its killed writes, but not the lease's own temporaries,
        # which belong to other runs trying to create the lease right now
        removed = self.folder.remove_temporaries(sparing=LEASE_FILE)
        if removed:
            logger.warning("removed %d temporary files left by %s", len(removed), holder.run_id)
        return self._won(successor, version)

    def _won(self, holder: Holder, version: str | None = None) -> None:
        self.holder = holder
        self._version = version or self.file.read_versioned()[1]
        self._lost = False
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name=f"lease-{self.file.uri}", daemon=True)
        self._heartbeat.start()
        return None

    def acquire(self, wait: bool = True, poll: float = 2.0) -> None:
        """Hold the lease, waiting for a live holder to finish when ``wait``; otherwise raise
        :class:`LeaseHeld` naming the holder."""
        announced = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                return
            message = f"{self.file.uri} is held by {holder.describe(time.time())}"
            if not wait:
                raise LeaseHeld(message)
            if not announced:
                logger.info("waiting: %s", message)
                announced = True
            time.sleep(poll)

    def _swap(self) -> bool:
        """One conditional heartbeat; False (and the lease lost) when someone else swapped."""
        with self._lock:
            if self._lost or self.holder is None:
                return False
            beat = replace(self.holder, heartbeat=time.time())
            data = beat.to_bytes()
            version = self.file.replace_if(data, self._version)
            if version is not None:
                self.holder, self._version = beat, version
                return True
            found = self.current()
            if found is not None and found[0] == beat:  # our write landed, its answer was lost
                self.holder, self._version = found
                return True
            self._lost = True
            holder = found[0].describe(time.time()) if found else "nobody (the lease file is gone)"
            logger.error("lost the lease %s (generation %d) to %s", self.file.uri, beat.generation, holder)
            return False

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self._swap():
                    return
            except OSError as error:  # storage unreachable: try again at the next beat
                logger.warning("heartbeat of %s failed: %s", self.file.uri, error)

    @property
    def lost(self) -> bool:
        return self._lost

    def check(self) -> None:
        """Prove the lease is still held, by a conditional heartbeat now; :class:`LeaseLost` if not."""
        if not self._swap():
            raise LeaseLost(
                f"the lease {self.file.uri} (generation {self.holder.generation if self.holder else '?'}) "
                "was taken over by another run: this run stops working on the stage"
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (conditionally)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        with self._lock:
            if not self._lost and self._version is not None:
                self.file.delete_if(self._version)
            self.holder, self._version = None, None
        if self.file.is_local:  # leave no empty stage folder behind a stage that wrote nothing
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.file.path))

    def clear_stale(self) -> bool:
        """Delete a stale lease (a holder killed between its stage's manifest and its release);
        True when one was deleted. A live holder's lease is left alone."""
        found = self.current()
        if found is None or not is_stale(found[0], self.ttl, time.time()):
            return False
        logger.info("removing the stale lease of finished stage %s: %s", self.file.uri, found[0].describe(time.time()))
        return self.file.delete_if(found[1])


_ACTIVE: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("rectiflow_lease", default=None)


def active_lease() -> Lease | None:
    """The lease the current stage runs under (None outside a pipeline)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def holding(lease: Lease) -> Iterator[Lease]:
    """Run the block as the holder of ``lease`` (what :func:`active_lease` returns in it)."""
    token = _ACTIVE.set(lease)
    try:
        yield lease
    finally:
        _ACTIVE.reset(token)


def probe_conditional_writes(root: Location) -> None:
    """Check that ``root``'s store honours conditional create, replace and delete, with a scratch
    object under ``root``; :class:`ConditionalWritesUnsupported` naming the store otherwise."""
    probe = root.join(f"_PROBE-{uuid.uuid4().hex}.json")
    problems = []
    try:
        if not probe.create_bytes(b'{"probe": 1}'):
            problems.append("a create of a new object failed")
        elif probe.create_bytes(b'{"probe": 2}'):
            problems.append("a second create of the same object succeeded (If-None-Match: * ignored)")
        else:
            _, version = probe.read_versioned()
            if probe.replace_if(b'{"probe": 3}', '"0000"' if not probe.is_local else "0" * 64) is not None:
                problems.append("a replace with a stale version succeeded (If-Match ignored)")
            else:
                if probe.replace_if(b'{"probe": 4}', version) is None:
                    problems.append("a replace with the current version failed")
                elif probe.delete_if(version):
                    problems.append("a delete with a stale version succeeded (If-Match on delete ignored)")
    finally:
        probe.delete()
    if problems:
        raise ConditionalWritesUnsupported(
            f"the storage root {root.uri} does not honour conditional writes ({'; '.join(problems)}), so two runs "
            "could both take a stage's lease. Use a store that supports them (AWS S3, recent MinIO, a local "
            "disk), or run one pipeline per storage root at a time on another store and say so"
        )

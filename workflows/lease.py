"""A lease per stage, so two runs of one pipeline on one storage root do not both do its work.

The lease is ``_LEASE.json`` in the stage's folder: who holds it (run id, host, pid), since when,
and a heartbeat the holder renews every ``ttl / 4`` seconds. Acquiring it is an exclusive create
(:meth:`workflows.storage.Location.create_bytes`). A lease is stale — and is taken over — when
its heartbeat is older than ``ttl`` or its holder is a dead process on this host. A take-over
writes the new holder and checks, after a short grace period, that it is still the holder, so of
two runs taking over at once only one proceeds.

Leases only save work: every stage is idempotent on its own (manifests last, shards created
exclusively, training resumed from checkpoints), so even a lease lost to a long pause costs time,
never correctness.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from workflows.storage import Location

LEASE_FILE = "_LEASE.json"
logger = logging.getLogger("rectiflow.lease")
class LeaseHeld(RuntimeError):
    """Another live run holds the stage's lease (and the caller chose not to wait)."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    since: float
    heartbeat: float

    def describe(self, now: float) -> str:
        return (
            f"run {self.run_id} (host {self.host}, pid {self.pid}), holding it for {now - self.since:.0f} s, "
            f"last heartbeat {now - self.heartbeat:.0f} s ago"
        )


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


class Lease:
    """The lease of one stage, held by this process for one run."""

    def __init__(self, stage: Location, run_id: str | None = None, ttl: float = 60.0, grace: float = 1.0):
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.folder = stage
        self.file = stage.join(LEASE_FILE)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.ttl = ttl
        self.grace = grace
        self._since = time.time()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.lost = threading.Event()

    def _record(self) -> bytes:
        holder = Holder(self.run_id, socket.gethostname(), os.getpid(), self._since, time.time())
        return json.dumps(asdict(holder), sort_keys=True).encode()

    def current(self) -> Holder | None:
        """The holder on storage now, or None when there is no (readable) lease."""
        try:
            return Holder(**json.loads(self.file.read_bytes()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            logger.warning("lease %s is unreadable; treating it as stale", self.file.uri)
            return Holder("unreadable", "", -1, 0.0, 0.0)

    def _mine(self) -> bool:
        holder = self.current()
        return holder is not None and holder.run_id == self.run_id

    def try_acquire(self) -> Holder | None:
        """Take the lease if it is free or stale; returns None on success, else the live holder."""
        if self.file.create_bytes(self._record()):
            self._start_heartbeat()
            return None
        holder = self.current()
        now = time.time()
        if holder is not None and holder.run_id == self.run_id and holder.pid == os.getpid():
            # our own create reached storage but its answer was lost (a dropped connection,
            # retried by the client, finds the object it made)
            self._start_heartbeat()
            return None
        if holder is not None and not is_stale(holder, self.ttl, now):
            return holder
        logger.warning("taking over the stale lease of %s: %s", self.file.uri, holder.describe(now) if holder else "gone")
        self.file.write_bytes(self._record())
        time.sleep(self.grace)
        if not self._mine():
            return self.current()
        removed = self.folder.remove_temporaries()  # the previous holder is gone: sweep what its killed writes left
        if removed:
            logger.warning("removed %d temporary files left by %s", len(removed), holder.run_id if holder else "?")
        self._start_heartbeat()
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

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name=f"lease-{self.file.uri}", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            if not self._mine():
                logger.error("lost the lease %s to another run", self.file.uri)
                self.lost.set()
                return
            self.file.write_bytes(self._record())

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._mine():
            self.file.delete()
            if self.file.is_local:  # leave no empty stage folder behind a stage that wrote nothing
                try:
                    os.rmdir(os.path.dirname(self.file.path))
                except OSError:
                    pass

    def clear_stale(self) -> bool:
        """Remove a stale lease (a holder killed between its stage's manifest and its release);
        True when one was removed. A live holder's lease is left alone."""
        holder = self.current()
        if holder is None or not is_stale(holder, self.ttl, time.time()):
            return False
        logger.info("removing the stale lease of finished stage %s: %s", self.file.uri, holder.describe(time.time()))
        self.file.delete()
        return True

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

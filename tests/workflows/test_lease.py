"""Leases that fence: one holder at a time, every change a compare-and-swap, a holder that lost its
lease learns it at its next heartbeat or check, generations that never repeat, and a store that
ignores conditional writes refused (on a local disk and on the S3 endpoint)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from workflows.lease import (
    LEASE_FILE,
    ConditionalWritesUnsupported,
    Fence,
    FenceWatch,
    Lease,
    LeaseHeld,
    LeaseLost,
    probe_conditional_writes,
)
from workflows.storage import location


def test_one_holder_and_a_clear_message_for_the_other(storage_root):
    stage = location(storage_root).join("train-1-abc")
    first = Lease(stage, "run-a", ttl=30)
    first.acquire()
    second = Lease(stage, "run-b", ttl=30)
    with pytest.raises(LeaseHeld, match=r"held by run run-a \(host .*, pid \d+\)"):
        second.acquire(wait=False)
    first.release()
    assert not stage.join(LEASE_FILE).exists()
    second.acquire(wait=False)
    second.release()


def _leave_a_dead_holders_lease(stage, run_id: str, generation: int = 1) -> None:
    """A fresh-looking lease of a process on this host that has exited."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": dead.pid,
        "since": time.time(),
        "heartbeat": time.time(),
        "generation": generation,
    }
    stage.join(LEASE_FILE).write_json(record)


def test_a_lease_of_a_dead_process_is_taken_over_with_the_next_generation(tmp_path):
    stage = location(str(tmp_path)).join("couple-2-abc")
    _leave_a_dead_holders_lease(stage, "crashed", generation=4)
    lease = Lease(stage, "run-b", ttl=3600)
    lease.acquire(wait=False)
    assert json.loads(stage.join(LEASE_FILE).read_bytes())["run_id"] == "run-b"
    assert lease.generation == 5 and lease.attempt.name == "attempt-5"
    lease.release()


def test_generations_never_repeat_even_when_the_lease_file_is_gone(tmp_path):
    stage = location(str(tmp_path)).join("train-2-abc")
    stage.join("attempt-7", "ray", "x").write_bytes(b"an earlier attempt's checkpoint")
    lease = Lease(stage, "run-a", ttl=30)
    lease.acquire(wait=False)
    assert lease.generation == 8
    lease.release()


def test_a_stale_lease_beside_a_finished_stage_is_cleared_and_a_live_one_kept(tmp_path):
    stage = location(str(tmp_path)).join("eval-abc")
    _leave_a_dead_holders_lease(stage, "killed")
    assert Lease(stage, "run-b", ttl=3600).clear_stale() and not stage.join(LEASE_FILE).exists()
    live = Lease(stage, "run-a", ttl=3600)
    live.acquire()
    assert not Lease(stage, "run-b", ttl=3600).clear_stale() and stage.join(LEASE_FILE).exists()
    live.release()


def _stop_heartbeat(lease: Lease) -> None:
    """The holder hangs (a paused VM, a long GC): no more heartbeats."""
    lease._stop.set()
    lease._heartbeat.join()


def test_a_holder_that_stops_beating_is_taken_over_and_fenced(storage_root):
    stage = location(storage_root).join("eval-abc")
    holder = Lease(stage, "run-a", ttl=0.8)
    holder.acquire()
    time.sleep(1.5)  # the heartbeat (every ttl/4) keeps it alive
    with pytest.raises(LeaseHeld):
        Lease(stage, "run-b", ttl=0.8).acquire(wait=False)
    fence = FenceWatch(holder.fence())
    _stop_heartbeat(holder)
    time.sleep(1.0)
    taker = Lease(stage, "run-b", ttl=0.8)
    taker.acquire(wait=False)
    assert taker.generation == holder.generation + 1
    # the paused holder wakes up: its next check (a conditional heartbeat) fails, and so do its workers'
    with pytest.raises(LeaseLost, match="was taken over by another run"):
        holder.check()
    assert holder.lost
    time.sleep(0.3)
    with pytest.raises(LeaseLost, match="no longer holds generation"):
        fence.check()
    holder.release()  # a lost lease is never deleted: the successor keeps it
    assert json.loads(stage.join(LEASE_FILE).read_bytes())["run_id"] == "run-b"
    taker.check()
    taker.release()
    assert not stage.join(LEASE_FILE).exists()


def test_of_runs_racing_for_a_stale_lease_exactly_one_wins(storage_root):
    stage = location(storage_root).join("train-3-abc")
    stale = Lease(stage, "crashed", ttl=0.5)
    stale.acquire()
    _stop_heartbeat(stale)
    time.sleep(0.8)
    contenders = [Lease(stage, f"run-{i}", ttl=0.5) for i in range(6)]  # the same TTL judges staleness
    outcomes: list[str] = [""] * len(contenders)
    barrier = threading.Barrier(len(contenders))

    def take(i: int) -> None:
        barrier.wait()
        try:
            contenders[i].acquire(wait=False)
            outcomes[i] = "won"
        except LeaseHeld:
            outcomes[i] = "held"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(contenders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [contenders[i] for i, outcome in enumerate(outcomes) if outcome == "won"]
    assert len(winners) == 1 and outcomes.count("held") == len(contenders) - 1
    assert json.loads(stage.join(LEASE_FILE).read_bytes())["run_id"] == winners[0].run_id
    winners[0].release()


def test_waiting_for_a_holder_that_finishes(tmp_path):
    stage = location(str(tmp_path)).join("train-2-abc")
    holder = Lease(stage, "run-a", ttl=30)
    holder.acquire()
    script = f"""
from workflows.lease import Lease
from workflows.storage import location
lease = Lease(location({str(stage.uri)!r}), "run-b", ttl=30)
lease.acquire(wait=True, poll=0.1)
print("acquired", lease.generation, flush=True)
lease.release()
"""
    waiter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and waiter.poll() is None and not stage.join(LEASE_FILE).exists():
        time.sleep(0.1)
    time.sleep(1.0)
    assert waiter.poll() is None, "the waiter did not wait for the live holder"
    holder.release()
    out, _ = waiter.communicate(timeout=30)
    assert out.split() == ["acquired", "1"]


def test_release_removes_an_empty_local_stage_folder(tmp_path):
    stage = location(str(tmp_path)).join("distill-2-abc")
    lease = Lease(stage, "run-a")
    lease.acquire()
    lease.release()
    assert not os.path.exists(stage.path)


def test_a_fence_outside_a_pipeline_never_stops_anything(tmp_path):
    FenceWatch(None).check()
    stage = location(str(tmp_path)).join("x")
    lease = Lease(stage, "run-a")
    lease.acquire()
    assert Fence(lease.file, lease.generation, 0.0).still_ours()
    lease.release()
    assert not Fence(lease.file, 1, 0.0).still_ours()


def test_the_store_probe_accepts_real_stores_and_refuses_one_that_ignores_conditions(storage_root, monkeypatch):
    root = location(storage_root)
    probe_conditional_writes(root)
    assert root.list_names() == []  # the probe leaves nothing behind
    from workflows.storage import Location

    monkeypatch.setattr(Location, "create_bytes", lambda self, data: self.write_bytes(data) or True)
    with pytest.raises(ConditionalWritesUnsupported, match=r"does not honour conditional writes \(a second create"):
        probe_conditional_writes(root)

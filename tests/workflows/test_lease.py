import json
import os
import socket
import subprocess
import sys
import time

import pytest

from workflows.lease import LEASE_FILE, Lease, LeaseHeld
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


def _leave_a_dead_holders_lease(stage, run_id: str) -> None:
    """A fresh-looking lease of a process on this host that has exited."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"run_id": run_id, "host": socket.gethostname(), "pid": dead.pid, "since": time.time(), "heartbeat": time.time()}
    stage.join(LEASE_FILE).write_json(record)


def test_a_lease_of_a_dead_process_is_taken_over(tmp_path):
    stage = location(str(tmp_path)).join("couple-2-abc")
    _leave_a_dead_holders_lease(stage, "crashed")
    lease = Lease(stage, "run-b", ttl=3600, grace=0.01)
    lease.acquire(wait=False)
    assert json.loads(stage.join(LEASE_FILE).read_bytes())["run_id"] == "run-b"
    lease.release()


def test_a_stale_lease_beside_a_finished_stage_is_cleared_and_a_live_one_kept(tmp_path):
    stage = location(str(tmp_path)).join("eval-abc")
    _leave_a_dead_holders_lease(stage, "killed")
    assert Lease(stage, "run-b", ttl=3600).clear_stale() and not stage.join(LEASE_FILE).exists()
    live = Lease(stage, "run-a", ttl=3600)
    live.acquire()
    assert not Lease(stage, "run-b", ttl=3600).clear_stale() and stage.join(LEASE_FILE).exists()
    live.release()


def test_a_lease_without_heartbeat_goes_stale_and_a_live_one_does_not(storage_root):
    stage = location(storage_root).join("eval-abc")
    holder = Lease(stage, "run-a", ttl=0.8)
    holder.acquire()
    time.sleep(1.5)  # the heartbeat (every ttl/4) keeps it alive
    with pytest.raises(LeaseHeld):
        Lease(stage, "run-b", ttl=0.8).acquire(wait=False)
    holder._stop.set()  # the holder hangs: no more heartbeats
    holder._heartbeat.join()
    time.sleep(1.0)
    taker = Lease(stage, "run-b", ttl=0.8, grace=0.05)
    taker.acquire(wait=False)
    assert Lease(stage, "x").current().run_id == "run-b"
    taker.release()


def test_waiting_for_a_holder_that_finishes(tmp_path):
    stage = location(str(tmp_path)).join("train-2-abc")
    holder = Lease(stage, "run-a", ttl=30)
    holder.acquire()
    started = time.time()
    script = f"""
import time
from workflows.lease import Lease
from workflows.storage import location
lease = Lease(location({str(stage.uri)!r}), "run-b", ttl=30)
lease.acquire(wait=True, poll=0.1)
print("acquired", flush=True)
lease.release()
"""
    waiter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert waiter.poll() is None, "the waiter did not wait for the live holder"
    holder.release()
    out, _ = waiter.communicate(timeout=30)
    assert "acquired" in out and time.time() - started >= 1.5


def test_release_removes_an_empty_local_stage_folder(tmp_path):
    stage = location(str(tmp_path)).join("distill-2-abc")
    lease = Lease(stage, "run-a")
    lease.acquire()
    lease.release()
    assert not os.path.exists(stage.path)

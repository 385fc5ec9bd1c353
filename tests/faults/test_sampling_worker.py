"""Sampling worker dies: SIGKILL the processes of Ray Data actors that write coupling shards while
the coupling stage runs → the stage completes with every pair exactly once, bytes equal to an
undisturbed run."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
from ray.util.state import list_actors

from tests.faults.test_storage_faults import reference_shards
from tests.workflows.test_couple import make_config, make_teacher, run_coupling_stage, shard_files
from workflows.couplings import Coupling
from workflows.manifest import SUCCESS_FILE
from workflows.storage import location

KILLS = 2


def _shard_writers(dashboard: str) -> list[dict]:
    """The live Ray Data actors running the coupling's ShardWriter (Ray Data names their class
    ``MapWorker(MapBatches(ShardWriter))``)."""
    actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
    return [actor for actor in actors if "ShardWriter" in actor["class_name"]]


def _kill_writers(dashboard: str, output, killed: list[tuple[int, str, int]], stop: threading.Event) -> None:
    """Kill one shard writer once 2 shards exist, then the other original writer as soon as one more
    shard lands. The second victim comes from the same actor listing, so no slow state-API call
    stands between the two kills and the stage cannot finish in between on a fast machine."""
    victims: list[dict] = []
    threshold = 2
    while len(killed) < KILLS and not stop.is_set():
        done = sum(name.startswith("shard-") for name in output.list_names())
        if done >= threshold:
            if not victims:
                victims = _shard_writers(dashboard)[:KILLS]
            if victims:
                victim = victims.pop(0)
                os.kill(victim["pid"], signal.SIGKILL)
                killed.append((victim["pid"], victim["class_name"], done))
                threshold = done + 1
        time.sleep(0.02)


def test_killed_sampling_workers_are_replaced_and_every_pair_is_written_once(ray_session, tmp_path):
    root = location(str(tmp_path))
    teacher = make_teacher(root.join("teacher"))
    config = make_config(pairs=480, shard_size=20, batch_size=20, workers=2, solver="rk45@1e-3")
    expected = reference_shards(config, teacher, root.join("reference"))

    output = root.join("couple")
    killed: list[tuple[int, str, int]] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_writers, args=(ray_session, output, killed, stop), daemon=True)
    killer.start()
    try:
        manifest = run_coupling_stage(config, teacher, output)
    finally:
        stop.set()
        killer.join(timeout=30)
    assert len(killed) == KILLS, f"killed {killed}: the stage finished before every kill"
    assert len({pid for pid, _, _ in killed}) == KILLS  # two different workers died
    assert all(done < 24 for _, _, done in killed)
    print("killed shard writers (pid, class, shards done):", killed)

    assert output.join(SUCCESS_FILE).exists() and manifest.details["pairs"] == 480
    coupling = Coupling.open(output)
    ids = np.concatenate([coupling.read(entry)[0] for entry in coupling.shards])
    assert ids.tolist() == list(range(480))  # exactly N rows, each pair id once
    assert shard_files(output) == expected  # bytes equal to an undisturbed run
    assert manifest.details["shards_written"] + manifest.details["shards_reused"] == 24
    assert not [name for name in output.list_names() if ".tmp" in name]

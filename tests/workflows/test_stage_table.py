"""The stage table from storage alone (manifest, lease with its generation, progress), and
`rectiflow status RUN_FOLDER` showing each configuration's own stages, newest first."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

from workflows import commands
from workflows.lease import LEASE_FILE, Holder
from workflows.manifest import Manifest, write_manifest
from workflows.stage import write_progress
from workflows.stage_table import manifest_summary, render, stage_rows
from workflows.storage import Location, location


def _entry(run: Location, name: str, kind: str = "train", digest: str = "h") -> dict:
    return {
        "name": name,
        "kind": kind,
        "hash": f"{name}{digest}",
        "uri": run.join(f"{name}-{name}{digest}").uri,
        "inputs": {},
    }


def _manifest(entry: dict) -> Manifest:
    return Manifest(
        kind=entry["kind"],
        hash=entry["hash"],
        stage=location(entry["uri"]).name,
        config={"seed": 1},
        identity={},
        inputs={},
        time={"wall_seconds": 75.0, "cpu_seconds": 150.0, "gpu_seconds": 0.0, "finished_at": "2025"},
        code={},
        details={
            "summary": "50 steps, final loss 0.1",
            "steps": 50,
            "final_loss": 0.1,
            "metrics": "attempt-1/metrics",
            "model_spec": {"kind": "mlp"},
        },
    )


def _lease(entry: dict, heartbeat_age: float, generation: int, host: str | None = None) -> None:
    now = time.time()
    holder = Holder(
        run_id="r1",
        host=host or socket.gethostname(),
        pid=os.getpid(),
        since=now - 90.0,
        heartbeat=now - heartbeat_age,
        generation=generation,
    )
    location(entry["uri"]).join(LEASE_FILE).write_bytes(holder.to_bytes())


def _stages(run: Location, digest: str = "h") -> list[dict]:
    """done, running (attempt 3), interrupted by a stale lease, interrupted with work but no lease, not started."""
    done, running, stale, left, fresh = (
        _entry(run, name, digest=digest) for name in ("done", "running", "stale", "left", "fresh")
    )
    write_manifest(location(done["uri"]), _manifest(done))
    _lease(running, heartbeat_age=1.0, generation=3)
    write_progress(location(running["uri"]), 20, 50, "steps", 4.0, loss=0.25)
    _lease(stale, heartbeat_age=600.0, generation=2, host="elsewhere")
    write_progress(location(left["uri"]), 10, 50, "steps", 4.0)
    return [done, running, stale, left, fresh]


def test_states_come_from_storage_alone(tmp_path):
    rows = stage_rows(_stages(location(str(tmp_path))))
    assert [row["state"] for row in rows] == ["done", "running", "interrupted", "interrupted", "not started"]
    done, running, stale, left, fresh = rows
    assert done["manifest"]["summary"] == "50 steps, final loss 0.1" and done["seconds"] == 75.0
    assert done["manifest"]["steps"] == 50 and "model_spec" not in done["manifest"]  # plain values only
    assert running["lease"]["generation"] == 3 and running["lease"]["attempt"] == "attempt-3"
    assert running["progress"]["done"] == 20 and 89 < running["seconds"] < 200
    assert stale["lease"]["generation"] == 2 and "seconds" not in stale
    assert left["progress"]["done"] == 10 and "lease" not in left
    assert set(fresh) == {"name", "kind", "state", "uri", "hash"}

    lines = render(rows).splitlines()
    assert lines[0].split() == ["stage", "state", "progress", "time", "details"]
    assert lines[1].split()[:3] == ["done", "done", "1:15"] and lines[1].endswith("50 steps, final loss 0.1")
    assert "20/50 steps (40%) 4.0/s loss 0.25" in lines[2] and "attempt-3 by run r1" in lines[2]
    assert "attempt-2 by run r1 on elsewhere, last heartbeat 600 s ago" in lines[3]


def test_the_live_table_rows_render_without_details():
    rows = [{"name": "train-1", "state": "running", "progress": None, "seconds": 61.0}]
    assert render(rows).splitlines() == ["stage    state    progress  time", "train-1  running            1:01"]


def test_a_broken_manifest_is_named_not_fatal(tmp_path):
    entry = _entry(location(str(tmp_path)), "broken")
    location(entry["uri"]).join("_SUCCESS.json").write_json({"hash": "x"})
    (row,) = stage_rows([entry])
    assert row["state"] == "done" and "is not a stage manifest" in row["problem"]


def test_manifest_summary_reads_no_kind_specific_keys():
    summary = manifest_summary(_manifest(_entry(location("/tmp"), "x")))
    assert summary == {
        "steps": 50,
        "final_loss": 0.1,
        "metrics": "attempt-1/metrics",
        "kind": "train",
        "hash": "xh",
        "summary": "50 steps, final loss 0.1",
        "wall_seconds": 75.0,
        "cpu_seconds": 150.0,
        "gpu_seconds": 0.0,
        "finished_at": "2025",
    }


def _document(run: Location, key: str, stages: list[dict], written: float) -> Location:
    where = run.join(f"pipeline-{key}.json")
    where.write_json({"name": "toy", "run": run.uri, "key": key, "config": {}, "stages": stages})
    os.utime(where.path, (written, written))
    return where


def test_status_shows_each_configuration_newest_first(tmp_path, capsys):
    run = location(str(tmp_path / "runs" / "toy"))
    old = _document(run, "k0ld", _stages(run, "a"), 1_700_000_000)
    _document(run, "n3w", _stages(run, "b")[:2], 1_800_000_000)
    location(str(tmp_path / "runs" / "toy" / "pipeline.json")).write_json({})  # not a run document

    assert commands.status(argparse.Namespace(run=run.uri, json=True)) == commands.EXIT_OK
    found = json.loads(capsys.readouterr().out)
    assert found["run"] == run.uri and [c["key"] for c in found["configurations"]] == ["n3w", "k0ld"]
    newer, older = found["configurations"]
    assert newer["written_at"] == "2027-01-15T08:00:00+00:00" and newer["document"] == run.join("pipeline-n3w.json").uri
    assert [s["name"] for s in newer["stages"]] == ["done", "running"]
    assert all(s["hash"].endswith("b") for s in newer["stages"])
    assert all(s["hash"].endswith("a") for s in older["stages"])
    assert [s["state"] for s in older["stages"]] == ["done", "running", "interrupted", "interrupted", "not started"]

    assert commands.status(argparse.Namespace(run=run.uri, json=False)) == commands.EXIT_OK
    text = capsys.readouterr().out
    assert text.startswith(f"run {run.uri}\n")
    assert text.index(
        "configuration n3w (pipeline-n3w.json, written 2027-01-15T08:00:00+00:00): toy, 2 stages"
    ) < text.index("configuration k0ld (pipeline-k0ld.json, written 2023-11-14T22:13:20+00:00): toy, 5 stages")

    assert commands.status(argparse.Namespace(run=old.uri, json=False)) == commands.EXIT_OK  # one configuration
    assert "k0ld" in capsys.readouterr().out


def test_status_of_a_folder_without_a_run(tmp_path, capsys):
    assert commands.status(argparse.Namespace(run=str(tmp_path / "nothing"), json=False)) == commands.EXIT_FAILED
    assert "has no run document (pipeline-{key}.json): is it a run folder" in capsys.readouterr().err

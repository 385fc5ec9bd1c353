"""Leases that fence (issue 17), with whole `rectiflow run` processes:

- a driver paused (SIGSTOP) past the lease TTL while a stage trains loses the stage to a second
  run; its Ray workers, still running, stop on their own (the fence), and once it is resumed
  (SIGCONT) it fails naming the lost lease, without anything it wrote counting; the second run
  finishes with the results of an undisturbed run;
- a store that ignores conditional writes (a proxy that drops ``If-None-Match`` / ``If-Match``)
  is refused before any work, naming the store, with nothing left in it;
- two configurations under one name on one storage root both finish, and each report shows
  only its own stages.

The lease TTL of a `rectiflow run` is set through ``RECTIFLOW_LEASE_TTL_S`` (read by
:func:`workflows.commands.run`); a run judges another's lease stale by its own TTL, so both runs
of the pause test get the same short one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import boto3
import pandas as pd
import psutil
import s3fs

from tests.faults.conftest import bucket_keys, model_bytes, snapshot_step
from tests.faults.run_processes import Run
from tests.faults.s3_proxy import FaultyProxy
from tests.workflows.pipeline_helpers import ONE_ROUND, SMALL, TINY, metrics_of, rectiflow
from workflows.config import load_pipeline
from workflows.lease import LEASE_FILE, Holder
from workflows.manifest import SUCCESS_FILE, read_manifest
from workflows.plan import build_plan
from workflows.stages.train import RAY_DIR, RAY_RUN_NAME
from workflows.storage import location

TTL_S = 4.0
"""The pause test's lease TTL: heartbeats, and the train workers' looks at the lease, every second."""
STEP = re.compile(r"^step-(\d+)$")


def _wait(condition, what: str, timeout: float, *alive: Run) -> float:
    """Poll ``condition`` until it holds (returns the seconds waited); fails when a run in
    ``alive`` ended meanwhile or after ``timeout`` seconds."""
    started = time.monotonic()
    while not condition():
        for run in alive:
            assert run.poll() is None, (
                f"a run ended (rc {run.process.returncode}) before {what}:\n{run.output()[-3000:]}"
            )
            run.tracked.descendants()
        assert time.monotonic() - started < timeout, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def _train_workers(run: Run) -> list[int]:
    """Pids of the run's Ray Train worker processes."""
    found = []
    for process in run.tracked.workers():
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process.pid)
        except psutil.Error:
            pass
    return found


def _logged(run: Run, text: str) -> bool:
    """Whether a log file of the run's Ray session (under its RAY_TMPDIR) contains ``text``."""
    for folder, _, names in os.walk(run.ray_tmp):
        for name in names:
            if name.endswith((".log", ".err", ".out")):
                try:
                    with open(os.path.join(folder, name), errors="replace") as handle:
                        if text in handle.read():
                            return True
                except OSError:
                    pass
    return False


def _holder(stage) -> Holder | None:
    try:
        return Holder.parse(stage.join(LEASE_FILE).read_bytes())
    except FileNotFoundError:
        return None


def _checkpoints(stage, attempt: str) -> list[int]:
    """Steps of the checkpoint folders Ray Train wrote in ``attempt`` of ``stage``."""
    folder = stage.join(attempt, RAY_DIR, RAY_RUN_NAME)
    return sorted(int(match.group(1)) for match in map(STEP.match, folder.list_names()) if match)


def test_a_paused_driver_loses_its_stage_and_nothing_it_writes_counts(s3_endpoint, clean_small):
    """Run 1 trains train-1 (generation 1, ``attempt-1``); its step-20 checkpoint upload is held
    by a proxy once step 10's is registered, so its train worker is caught mid-stage however fast
    the machine. Its driver is paused (SIGSTOP): no more heartbeats. Run 2 (straight to moto) takes
    the stale lease over as generation 2, resumes from attempt-1's step-10 checkpoint and
    checkpoints step 20 in ``attempt-2``. Then the held upload goes through: run 1's worker, still
    alive while its driver sleeps, looks at the lease before its next step and stops (Ray Train's
    retries stop the same way). Its driver is resumed (SIGCONT) and fails, naming the lost lease.
    Without the fence, run 1's worker would have trained on to step 40 in attempt-1."""
    s3fs.S3FileSystem.clear_instance_cache()  # talk to moto directly, whatever ran before
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="lease-pause")
    storage_uri = "s3://lease-pause/runs"
    plan = build_plan(load_pipeline(TINY, SMALL, storage=storage_uri))
    stage = plan.stages["train-1"].output
    key = stage.path.split("/", 1)[1]
    ttl = {"RECTIFLOW_LEASE_TTL_S": str(TTL_S)}
    times: dict[str, float] = {}
    runs: list[Run] = []
    try:
        with FaultyProxy(s3_endpoint) as proxy:
            # every try of the upload is held: under load, run 2 may take longer than the client's read timeout
            proxy.hold(rf"^PUT /lease-pause/{key}/attempt-1/{RAY_DIR}/{RAY_RUN_NAME}/step-00000020/", every=True)
            first = Run(TINY, storage_uri, SMALL, env={"AWS_ENDPOINT_URL": proxy.url, **ttl})
            runs.append(first)
            _wait(
                lambda: proxy.holding.is_set() and snapshot_step(stage, "attempt-1") == 10,
                "run 1's step-10 checkpoint and its held step-20 upload",
                300,
                first,
            )
            assert _train_workers(first)
            first.signal(signal.SIGSTOP)
            paused = time.monotonic()
            times["run 1 paused after (s)"] = paused - first.started

            second = Run(TINY, storage_uri, SMALL, env=ttl)
            runs.append(second)
            _wait(
                lambda: (_holder(stage) or Holder.parse(b"")).generation == 2,
                "run 2 to take train-1's lease over",
                300,
                second,
            )
            times["run 2 took over, after the pause (s)"] = time.monotonic() - paused
            assert _holder(stage).pid == second.pid
            _wait(
                lambda: snapshot_step(stage, "attempt-2") >= 20, "run 2's step-20 checkpoint in attempt-2", 300, second
            )
            assert snapshot_step(stage, "attempt-1") == 10  # run 1 is still held at its step-20 upload

            assert _train_workers(first), "run 1's train worker is gone before its upload was let through"
            proxy.release()  # run 1's worker goes on: its upload lands (retried), then it looks at the lease
            released = time.monotonic()
            fenced = f"{stage.join(LEASE_FILE).uri} no longer holds generation 1"
            _wait(lambda: _logged(first, fenced), "run 1's train worker to stop at the fence", 180, second)
            times["run 1's worker stopped at the fence, after the release (s)"] = time.monotonic() - released
            assert first.poll() is None  # the driver is still paused: the worker stopped on its own

            first.signal(signal.SIGCONT)
            resumed = time.monotonic()
            assert first.wait(timeout=300) != 0, first.output()[-4000:]
            times["run 1 exited, after SIGCONT (s)"] = time.monotonic() - resumed
            assert second.wait(timeout=600) == 0, second.output()[-4000:]
            times["run 2 total (s)"] = second.seconds
        clean = clean_small.plan()
    finally:
        for run in runs:
            run.cleanup()
    print("pause and takeover:", json.dumps({name: round(value, 1) for name, value in times.items()}))

    said = first.output()
    assert "the pipeline failed" in said, said[-4000:]
    failure = said[said.index("the pipeline failed") :]
    assert "train-1: " in failure and "LeaseLost" in failure, failure[-4000:]
    assert f"{stage.join(LEASE_FILE).uri} no longer holds generation 1" in failure, failure[-4000:]
    print("run 1 said:", failure[:1500])
    print("run 1's driver logged its lost lease:", "lost the lease" in said)

    # run 1's attempt stopped at the step its upload was held at; nothing names its attempt folder
    # (step 20's checkpoint is there when its retried upload landed; nothing after it)
    print("checkpoints of run 1's attempt-1:", _checkpoints(stage, "attempt-1"))
    assert max(_checkpoints(stage, "attempt-1")) <= 20, "run 1's workers trained on after losing the lease"
    assert not stage.join("attempt-1", "model").list_names()
    manifest = read_manifest(stage)
    assert manifest.lease["generation"] == 2 and manifest.details["model"] == "attempt-2/model"
    assert manifest.details["resumed_at_steps"] == [10]  # attempt-1's latest checkpoint when run 2 started
    assert "attempt-1" not in json.dumps(manifest.to_json())
    for name, other in plan.stages.items():
        text = other.output.join(SUCCESS_FILE).read_bytes().decode()
        assert f"{stage.name}/attempt-1" not in text, f"{name}'s manifest names run 1's attempt folder"

    # run 2's results are an undisturbed run's: weights bit for bit, evaluation rows
    for name in ("train-1", "train-2"):
        assert model_bytes(plan.stages[name].output) == model_bytes(clean.stages[name].output), name
    pd.testing.assert_frame_equal(metrics_of(plan), metrics_of(clean))
    leftover = [key for key in bucket_keys(s3_endpoint, "lease-pause") if key.endswith(LEASE_FILE)]
    assert not leftover, leftover  # run 2 released every lease; run 1 deleted none of its successor's


def test_a_store_that_ignores_conditional_writes_is_refused_before_any_work(s3_endpoint, tmp_path):
    """The run probes the storage root before anything else touches it: through a proxy that
    strips the conditional headers, a second exclusive create succeeds, and the run stops naming
    the store. The only objects it ever wrote were the probe's own, which it removed."""
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="no-conditions")
    with FaultyProxy(s3_endpoint, strip_conditions=True) as proxy:
        run = Run(TINY, "s3://no-conditions/runs", ONE_ROUND, env={"AWS_ENDPOINT_URL": proxy.url})
        try:
            code = run.wait(timeout=300)
        finally:
            run.cleanup()
    said = run.output()
    assert code == 2, said[-3000:]  # a storage error, as for a malformed storage URI
    assert "the storage root s3://no-conditions/runs/tiny does not honour conditional writes" in said, said[-3000:]
    assert "If-None-Match: * ignored" in said, said[-3000:]
    assert proxy.counts["stripped"] >= 1
    writes = [line for line in proxy.lines if not line.startswith(("GET", "HEAD"))]
    puts = [line for line in writes if line.startswith("PUT")]
    assert puts and all(line.startswith("PUT /no-conditions/runs/tiny/_PROBE-") for line in puts), writes
    assert set(writes) - set(puts) <= {"POST /no-conditions?delete"}, writes  # the probe's own removal
    assert bucket_keys(s3_endpoint, "no-conditions") == {}
    print("refused:", said[said.index("rectiflow: ") :][:400].strip(), "| requests:", dict(proxy.counts))


def _lineage(report_md: str) -> set[tuple[str, str]]:
    """(stage, hash) of every row of a report's lineage table."""
    section = report_md.split("## Lineage", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    return {(cells[0].strip(), cells[3].strip()) for cells in rows[1:]}  # the first row is the header


def test_two_configurations_of_one_name_on_one_root_report_only_their_own_stages(tmp_path):
    """Two one-round configurations named ``tiny`` that differ in the evaluation seed, run at the
    same time on one root: train-1 is the same stage for both (one trains it, the other waits for
    its lease and finds it done), eval-train-1 and the report are two stages each. Both finish;
    ``status`` lists two configurations; each report's lineage lists exactly its own stages."""
    storage = str(tmp_path / "storage")
    variants = {"a": ONE_ROUND, "b": [*ONE_ROUND, "evaluate.seed=7"]}
    plans = {name: build_plan(load_pipeline(TINY, sets, storage=storage)) for name, sets in variants.items()}
    assert plans["a"].key != plans["b"].key and plans["a"].run == plans["b"].run
    assert plans["a"].stages["train-1"].output == plans["b"].stages["train-1"].output
    runs = {name: Run(TINY, storage, sets) for name, sets in variants.items()}
    try:
        for name, run in runs.items():
            assert run.wait(timeout=600) == 0, f"configuration {name}:\n{run.output()[-4000:]}"
    finally:
        for run in runs.values():
            run.cleanup()
    print("two configurations, one name:", {name: round(run.seconds, 1) for name, run in runs.items()})

    status = rectiflow("status", plans["a"].run.uri, "--json")
    assert status.returncode == 0, status.stderr
    configurations = json.loads(status.stdout)["configurations"]
    assert sorted(c["key"] for c in configurations) == sorted(plan.key for plan in plans.values())
    for configuration in configurations:
        plan = next(plan for plan in plans.values() if plan.key == configuration["key"])
        assert [(s["name"], s["state"]) for s in configuration["stages"]] == [(n, "done") for n in plan.stages]

    manifests = {name: read_manifest(plan.stages["train-1"].output) for name, plan in plans.items()}
    assert manifests["a"] == manifests["b"]  # one stage, trained once
    for name, plan in plans.items():
        report = plan.stages["report"].output
        manifest = read_manifest(report)
        assert manifest.details["document"] == plan.document_location.name
        shown = _lineage(report.join(manifest.details["files"]["md"]).read_bytes().decode())
        own = {(stage.name, stage.hash) for stage in plan.stages.values() if stage.kind != "report"}
        assert shown == own, f"configuration {name}'s report shows {sorted(shown)}, its stages are {sorted(own)}"
    assert location(storage).join("tiny").list_names().count(plans["a"].document_location.name) == 1

"""The driver dies: SIGKILL the `rectiflow run` process group (the driver and the local Ray it
started) at several points of one run, re-running after each, on S3 (moto behind a proxy that
holds one chosen request, so that each kill lands deterministically at its point however slow
the machine is):

A. during training (train-1's step-10 checkpoint is recorded, the step-20 upload is held);
B. during coupling (couple-1 has shards, the PUT of one more is held, no manifest);
D. while writing a manifest (couple-1's `_SUCCESS.json` PUT is in flight, held by the proxy);
C. between stages (couple-1's manifest exists, train-2 holds its lease, its first PUT is held).

(Without distillation the small pipeline has no couple-2, so D and C land on couple-1/train-2.)

After each kill: the killed run's Ray processes are gone, its stale lease is left behind (and does
not block the next run), finished stages keep their manifests. At the end the results equal an
uninterrupted run and storage holds no half-written object.

The pipeline is tiny.yaml made smaller still (:data:`tests.workflows.pipeline_helpers.SMALL`); the uninterrupted reference run is
a second `rectiflow run` on local storage, started at the beginning and run alongside the
killed ones. All storage checks of the test use one view: the library's own :class:`Location`
talking to moto directly (never through the proxy the runs use).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import boto3
import pandas as pd
import psutil
import s3fs

from tests.faults.conftest import bucket_keys
from tests.faults.run_processes import RunProcesses
from tests.faults.s3_proxy import FaultyProxy
from tests.workflows.pipeline_helpers import SMALL, TINY, metrics_of, rectiflow, set_arguments, stage_times
from workflows.config import load_pipeline
from workflows.lease import LEASE_FILE
from workflows.pair_stream import RAY_SNAPSHOT
from workflows.plan import build_plan
from workflows.shards import Coupling
from workflows.stage import SUCCESS_FILE

BUCKET = "driver-faults"
SETS = set_arguments(SMALL)


class Storage:
    """One view of storage: the plan's own locations, talking to moto directly."""

    def __init__(self, plan):
        self.plan = plan

    def key(self, stage: str, *names: str) -> str:
        return "/".join([self.plan.stages[stage].output.path.split("/", 1)[1], *names])

    def exists(self, stage: str, *names: str) -> bool:
        return self.plan.stages[stage].output.join(*names).exists()

    def names(self, stage: str, prefix: str = "") -> list[str]:
        """Every object under the stage (recursively), relative to it, starting with ``prefix``."""
        output = self.plan.stages[stage].output
        try:
            found = output.fs.find(output.path)
        except FileNotFoundError:
            return []
        names = sorted(str(path)[len(output.path) + 1:] for path in found)
        return [name for name in names if name.startswith(prefix)]

    def shards(self, stage: str) -> list[str]:
        return [name for name in self.names(stage) if name.startswith("shard-")]


def kill_when(driver: subprocess.Popen, tracked: RunProcesses, condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            assert driver.poll() is None, f"the run ended (rc {driver.returncode}) before {what}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            tracked.descendants()
            time.sleep(0.1)
        tracked.descendants()
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=60)


def test_a_driver_killed_at_four_points_resumes_to_the_clean_result(s3_endpoint, tmp_path):
    s3fs.S3FileSystem.clear_instance_cache()  # talk to moto directly, whatever ran before
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    storage_uri = f"s3://{BUCKET}/runs"
    plan = build_plan(load_pipeline(TINY, SMALL, storage=storage_uri))
    clean_plan = build_plan(load_pipeline(TINY, SMALL, storage=str(tmp_path / "clean")))
    storage = Storage(plan)
    ray_tmps = []

    def ray_tmp() -> str:
        folder = tempfile.mkdtemp(prefix="rfd-", dir="/tmp")  # Ray's socket paths must stay short
        ray_tmps.append(folder)
        return folder

    clean_tmp = ray_tmp()
    clean = rectiflow("run", TINY, "--storage", str(tmp_path / "clean"), *SETS, background=True,
                      env={"RAY_TMPDIR": clean_tmp})
    finished: dict[str, str] = {}
    kills = []
    try:
        with FaultyProxy(s3_endpoint) as proxy:
            def killed_at(point: str, hold: str, condition, stage: str) -> None:
                proxy.hold(hold)
                folder = ray_tmp()
                driver = rectiflow("run", TINY, "--storage", storage_uri, *SETS, background=True,
                                   env={"AWS_ENDPOINT_URL": proxy.url, "RAY_TMPDIR": folder})
                started = time.monotonic()
                tracked = RunProcesses(driver.pid, folder)
                try:
                    kill_when(driver, tracked, condition, point)
                    leaked = tracked.leaked()
                    assert not leaked, f"{point}: processes of the killed run are still alive: {leaked}"
                finally:
                    proxy.release()  # only now: no worker of the killed run is left to retry the request
                assert not storage.exists(stage, SUCCESS_FILE), f"{point}: {stage} finished before the kill"
                assert storage.exists(stage, LEASE_FILE), f"{point}: the killed run left no lease (test is moot)"
                for name in plan.stages:  # what is finished now must never run again
                    if name not in finished and storage.exists(name, SUCCESS_FILE):
                        finished[name] = stage_times(plan, [name])[name]
                assert stage_times(plan, finished) == finished, f"{point}: a finished stage ran again"
                kills.append((point, stage, sorted(finished), round(time.monotonic() - started, 1)))

            def put(stage: str, name: str) -> str:
                return r"^PUT /%s/%s/%s" % (BUCKET, storage.key(stage), name)

            # A. during training: step 10's checkpoint is recorded, step 20's upload hangs
            killed_at("A during training", put("train-1", r"ray/train/step-00000020/"),
                      lambda: proxy.holding.is_set() and storage.exists("train-1", "ray", "train", RAY_SNAPSHOT),
                      "train-1")
            assert storage.names("train-1", "ray/train/step-00000010/")
            # B. during coupling: some shards of couple-1 exist, the PUT of shard 3 hangs
            killed_at("B during coupling", put("couple-1", r"shard-000003\.parquet"),
                      lambda: proxy.holding.is_set() and bool(storage.shards("couple-1")), "couple-1")
            # D. while couple-1's manifest is being written (every shard is there): its PUT hangs
            killed_at("D writing a manifest", put("couple-1", r"_SUCCESS\.json"), proxy.holding.is_set, "couple-1")
            assert len(storage.shards("couple-1")) == 8
            # C. between stages: couple-1 is done, train-2 holds its lease, its first PUT to Ray Train's folder hangs
            killed_at("C between stages", put("train-2", r"ray/train/"),
                      lambda: proxy.holding.is_set() and storage.exists("couple-1", SUCCESS_FILE)
                      and storage.exists("train-2", LEASE_FILE), "train-2")
            assert not storage.names("train-2", "ray/train/step-")

            checkpoints = {"train-1": storage.names("train-1", "ray/train/")}
            folder = ray_tmp()
            result = rectiflow("run", TINY, "--storage", storage_uri, *SETS, timeout=400,
                               env={"AWS_ENDPOINT_URL": proxy.url, "RAY_TMPDIR": folder})
            assert result.returncode == 0, result.stderr[-4000:]
        assert clean.wait(timeout=400) == 0, "the uninterrupted reference run failed"
    finally:
        if clean.poll() is None:
            os.killpg(clean.pid, signal.SIGKILL)
            clean.wait(timeout=60)
        for folder in ray_tmps:
            shutil.rmtree(folder, ignore_errors=True)

    print("kills (point, stage, finished before, seconds):", json.dumps(kills))
    assert stage_times(plan, finished) == finished, "a finished stage ran again"
    for name, names in checkpoints.items():
        assert storage.names(name, "ray/train/") == names, f"{name} trained again"
    couple1 = plan.stages["couple-1"].output.join(SUCCESS_FILE).read_json()
    assert couple1["shards_reused"] == 8 and couple1["shards_written"] == 0  # written by the run after D

    # the same results as a run that was never interrupted
    pd.testing.assert_frame_equal(metrics_of(plan).drop(columns=["uri"], errors="ignore"),
                                  metrics_of(clean_plan).drop(columns=["uri"], errors="ignore"))
    for name in ("couple-1",):
        assert Coupling.open(plan.stages[name].output).shards == Coupling.open(clean_plan.stages[name].output).shards

    # nothing half-written is visible; no lease is left behind, except (harmless: a finished stage is
    # never leased again) beside a stage whose manifest was written just before its run was killed
    objects = bucket_keys(s3_endpoint, BUCKET)
    assert not [key for key in objects if ".tmp" in key]
    for key in [key for key in objects if key.endswith(LEASE_FILE)]:
        assert key.replace(LEASE_FILE, SUCCESS_FILE) in objects, f"a lease is left beside an unfinished stage: {key}"
        assert not psutil.pid_exists(json.loads(objects[key])["pid"]), f"a live run holds {key}"
        print("stale lease left beside a finished stage:", key)
    for key, data in objects.items():
        if key.endswith(".json"):
            json.loads(data)

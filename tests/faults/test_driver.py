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
not block the next run), finished stages keep their manifests. The next run takes a killed run's
lease over with the next generation and works in a new attempt folder (``attempt-{generation}``);
a training stage resumes from the latest checkpoint of the earlier attempt. At the end the
results equal an uninterrupted run's (evaluation rows, coupling shards, final weights bit for bit)
and storage holds no half-written object.

The pipeline is tiny.yaml made smaller still (:data:`tests.workflows.pipeline_helpers.SMALL`); the
uninterrupted reference is the session's :func:`tests.faults.conftest.clean_small`, on local
storage, run alongside. All storage checks of the test use one view: the library's own
:class:`Location` talking to moto directly (never through the proxy the runs use).
"""

from __future__ import annotations

import json
import re
import time

import boto3
import pandas as pd
import psutil
import s3fs

from tests.faults.conftest import bucket_keys, model_bytes
from tests.faults.run_processes import Run
from tests.faults.s3_proxy import FaultyProxy
from tests.workflows.pipeline_helpers import SMALL, TINY, metrics_of, stage_times
from workflows.config import load_pipeline
from workflows.couplings import Coupling
from workflows.lease import LEASE_FILE
from workflows.manifest import SUCCESS_FILE, read_manifest
from workflows.plan import build_plan
from workflows.stages.train import RAY_SNAPSHOT

BUCKET = "driver-faults"
CHECKPOINT = re.compile(r"^attempt-\d+/ray/train/step-")


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
        names = sorted(str(path)[len(output.path) + 1 :] for path in found)
        return [name for name in names if name.startswith(prefix)]

    def shards(self, stage: str) -> list[str]:
        return [name for name in self.names(stage) if name.startswith("shard-")]


def kill_when(run: Run, condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            assert run.poll() is None, (
                f"the run ended (rc {run.process.returncode}) before {what}:\n{run.output()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            run.tracked.descendants()
            time.sleep(0.1)
        run.tracked.descendants()
    finally:
        run.kill()


def test_a_driver_killed_at_four_points_resumes_to_the_clean_result(s3_endpoint, clean_small):
    s3fs.S3FileSystem.clear_instance_cache()  # talk to moto directly, whatever ran before
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    storage_uri = f"s3://{BUCKET}/runs"
    plan = build_plan(load_pipeline(TINY, SMALL, storage=storage_uri))
    storage = Storage(plan)
    finished: dict[str, str] = {}
    contents: dict[str, list[str]] = {}
    kills = []
    runs: list[Run] = []
    try:
        with FaultyProxy(s3_endpoint) as proxy:

            def killed_at(point: str, hold: str, condition, stage: str) -> None:
                proxy.hold(hold)
                run = Run(TINY, storage_uri, SMALL, env={"AWS_ENDPOINT_URL": proxy.url})
                runs.append(run)
                try:
                    kill_when(run, condition, point)
                    leaked = run.leaked()
                    assert not leaked, f"{point}: processes of the killed run are still alive: {leaked}"
                finally:
                    proxy.release()  # only now: no worker of the killed run is left to retry the request
                assert not storage.exists(stage, SUCCESS_FILE), f"{point}: {stage} finished before the kill"
                assert storage.exists(stage, LEASE_FILE), f"{point}: the killed run left no lease (test is moot)"
                for name in plan.stages:  # what is finished now must never run again
                    if name not in finished and storage.exists(name, SUCCESS_FILE):
                        finished[name] = stage_times(plan, [name])[name]
                        contents[name] = [n for n in storage.names(name) if n != LEASE_FILE]
                assert stage_times(plan, finished) == finished, f"{point}: a finished stage ran again"
                kills.append((point, stage, sorted(finished), round(time.monotonic() - run.started, 1)))

            def put(stage: str, name: str) -> str:
                return rf"^PUT /{BUCKET}/{storage.key(stage)}/{name}"

            # A. during training: step 10's checkpoint is recorded, step 20's upload hangs (the first
            # run works on train-1 as generation 1, in attempt-1)
            killed_at(
                "A during training",
                put("train-1", r"attempt-1/ray/train/step-00000020/"),
                lambda: proxy.holding.is_set() and storage.exists("train-1", "attempt-1", "ray", "train", RAY_SNAPSHOT),
                "train-1",
            )
            assert storage.names("train-1", "attempt-1/ray/train/step-00000010/")
            # B. during coupling: some shards of couple-1 exist, the PUT of shard 3 hangs
            killed_at(
                "B during coupling",
                put("couple-1", r"shard-000003\.parquet"),
                lambda: proxy.holding.is_set() and bool(storage.shards("couple-1")),
                "couple-1",
            )
            # D. while couple-1's manifest is being written (every shard is there): its PUT hangs
            killed_at("D writing a manifest", put("couple-1", r"_SUCCESS\.json"), proxy.holding.is_set, "couple-1")
            assert len(storage.shards("couple-1")) == 8
            # C. between stages: couple-1 is done, train-2 holds its lease, its first PUT to Ray Train's folder hangs
            killed_at(
                "C between stages",
                put("train-2", r"attempt-\d+/ray/train/"),
                lambda: (
                    proxy.holding.is_set()
                    and storage.exists("couple-1", SUCCESS_FILE)
                    and storage.exists("train-2", LEASE_FILE)
                ),
                "train-2",
            )
            assert not [name for name in storage.names("train-2") if CHECKPOINT.match(name)]

            last = Run(TINY, storage_uri, SMALL, env={"AWS_ENDPOINT_URL": proxy.url})
            runs.append(last)
            assert last.wait(timeout=600) == 0, last.output()[-4000:]
        clean_plan = clean_small.plan()
    finally:
        for run in runs:
            run.cleanup()

    print("kills (point, stage, finished before, seconds):", json.dumps(kills))
    assert stage_times(plan, finished) == finished, "a finished stage ran again"
    for name, names in contents.items():
        assert [n for n in storage.names(name) if n != LEASE_FILE] == names, f"{name} was written to after it finished"

    # each takeover: the next generation, in its own attempt folder; training resumed from the
    # latest checkpoint of the killed attempt (train-1: step 10, since step 20's upload never landed)
    train1, couple1, train2 = (read_manifest(plan.stages[name].output) for name in ("train-1", "couple-1", "train-2"))
    assert train1.lease["generation"] == 2 and train1.details["model"] == "attempt-2/model"
    assert train1.details["resumed_at_steps"] == [10]
    # every shard was written by the runs before D's; the one after D only wrote the manifest
    assert couple1.details["shards_reused"] == 8 and couple1.details["shards_written"] == 0
    assert couple1.lease["generation"] == 3  # runs B, D and the one after D
    assert train2.lease["generation"] == 2 and train2.details["resumed_at_steps"] == []  # C left no checkpoint

    # the same results as a run that was never interrupted
    pd.testing.assert_frame_equal(
        metrics_of(plan).drop(columns=["uri"], errors="ignore"),
        metrics_of(clean_plan).drop(columns=["uri"], errors="ignore"),
    )
    shards = Coupling.open(plan.stages["couple-1"].output).shards
    assert shards == Coupling.open(clean_plan.stages["couple-1"].output).shards
    for name in ("train-1", "train-2"):
        assert model_bytes(plan.stages[name].output) == model_bytes(clean_plan.stages[name].output), name

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

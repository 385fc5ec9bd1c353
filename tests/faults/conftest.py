"""Fault-injection tests: every test in this folder carries the ``faults`` marker, so that
``pytest -m faults`` runs them alone (and ``make test`` runs them with the rest).

Several tests compare a disturbed run of the small pipeline (tiny.yaml with
:data:`tests.workflows.pipeline_helpers.SMALL`) with an undisturbed one: :func:`clean_small` runs
that once per session, in the background from the first test that asks for it, on local storage.
Stage hashes do not depend on the storage root, so its stages are the ones to compare with.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from tests.faults.run_processes import Run
from tests.faults.s3_proxy import FaultyProxy
from tests.workflows.pipeline_helpers import SMALL, TINY
from workflows.config import load_pipeline
from workflows.manifest import read_manifest
from workflows.plan import build_plan
from workflows.stages.train import RAY_DIR, RAY_RUN_NAME, RAY_SNAPSHOT
from workflows.weights import model_folder

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


@contextlib.contextmanager
def endpoint(url: str, **env: str):
    """This process talks to S3 at ``url`` (and with ``env``) inside the block: new s3fs
    filesystems only, since fsspec caches instances and botocore reads the endpoint once."""
    import s3fs

    values = {"AWS_ENDPOINT_URL": url, **env}
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def proxy(s3_endpoint):
    """A :class:`FaultyProxy` in front of the moto server (no faults until the test sets rates)."""
    with FaultyProxy(s3_endpoint, seed=1234) as running:
        yield running


def bucket_keys(s3_endpoint: str, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under ``prefix`` as moto holds it, read directly (not through any proxy)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            keys[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return keys


class CleanRun:
    """The small pipeline, undisturbed, in the background; :meth:`plan` waits for it to finish."""

    def __init__(self, storage: str):
        self.storage = storage
        self.run = Run(TINY, storage, SMALL)
        self._plan = None

    def plan(self, timeout: float = 900):
        if self._plan is None:
            code = self.run.wait(timeout=timeout)
            assert code == 0, f"the undisturbed reference run failed (rc {code}):\n{self.run.output()[-4000:]}"
            print(f"undisturbed small run: {self.run.seconds:.0f} s (alongside other tests)")
            self._plan = build_plan(load_pipeline(TINY, SMALL, storage=self.storage))
        return self._plan


@pytest.fixture(scope="session")
def clean_small(tmp_path_factory):
    """The small pipeline run once, undisturbed, on local storage (started at the first request)."""
    clean = CleanRun(str(tmp_path_factory.mktemp("clean-small") / "storage"))
    yield clean
    clean.run.cleanup()


def model_bytes(stage) -> bytes:
    """The final weights (``model.safetensors``) of the finished training stage at ``stage``."""
    return model_folder(stage, read_manifest(stage)).join("model.safetensors").read_bytes()


def snapshot_step(stage, attempt: str) -> int:
    """The step of the latest checkpoint Ray Train registered in ``attempt`` of the training stage
    at ``stage`` (0 when none yet)."""
    try:
        snapshot = json.loads(stage.join(attempt, RAY_DIR, RAY_RUN_NAME, RAY_SNAPSHOT).read_bytes())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return 0

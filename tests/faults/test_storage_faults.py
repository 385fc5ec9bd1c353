"""Object storage misbehaves: a fault-injecting proxy between rectiflow and the moto S3 endpoint
answers 500/503, drops connections (before and after forwarding) and stalls a fraction of the
requests. Work completes through retries, or fails with a clear error in bounded time; no partial
shard or manifest is ever visible (checked by listing moto directly, not through the proxy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
import torch

from tests.faults.conftest import bucket_keys, endpoint
from tests.workflows.helpers import fake_manifest, write_coupling
from tests.workflows.test_couple import TEACHER_HASH, make_config, make_teacher, run_coupling_stage
from workflows.couplings import Coupling, inspect_shard
from workflows.distributions import sample_by_id
from workflows.lease import LEASE_FILE, Lease
from workflows.manifest import SUCCESS_FILE, read_manifest
from workflows.settings import NoiseSpec
from workflows.shard_format import shard_count, shard_name
from workflows.stages.couple import ShardJob, ShardWriter, coupling_format
from workflows.storage import StorageIOError, location

FLAKY = dict(error_rate=0.12, drop_rate=0.10, stall_rate=0.04)  # 26 % of requests
"""The fault mix of the flaky endpoint: errors, dropped connections, stalls of 0.3 s."""

COUPLE_THROUGH = """
import json, sys, ray
from workflows.couplings import Coupling
from workflows.settings import CouplingConfig
from workflows.stages import couple
from workflows.storage import location
address, proxy, config, teacher, output = sys.argv[1:]
ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": {"AWS_ENDPOINT_URL": proxy}})
manifest = couple.run(CouplingConfig.model_validate_json(config), {"teacher": location(teacher)}, location(output))
coupling = Coupling.open(location(output))
coupling.verify()  # every shard read and checked by Ray tasks, through the proxy too
ids = [int(i) for entry in coupling.shards for i in coupling.read(entry)[0]]
print(json.dumps({"manifest": manifest.to_json(), "ids": ids}))
"""


def reference_shards(config, teacher, folder) -> dict[str, bytes]:
    """The shard bytes an undisturbed in-process writer makes (local disk)."""
    threads = torch.get_num_threads()
    job = ShardJob(
        teacher=teacher,
        output=folder,
        format=coupling_format(config, TEACHER_HASH),
        pairs=config.pairs,
        batch_size=config.batch_size,
        forward_batch=config.forward_batch,
        precision=config.precision,
        compile=config.compile,
        cpus=1,
        gpus=0,
    )
    try:
        writer = ShardWriter(job)
        for index in range(shard_count(config.pairs, config.shard_size)):
            writer.process({"shard": index, "present": False})
    finally:
        torch.set_num_threads(threads)  # the writer sets this process's threads as a worker's
    return {name: folder.join(name).read_bytes() for name in folder.list_names() if name.startswith("shard-")}


def assert_only_whole_objects(objects: dict[str, bytes], prefix: str, config) -> None:
    """Every object under ``prefix`` is whole: shards parse as their shard, JSON parses."""
    fmt = coupling_format(config, TEACHER_HASH)
    for key, data in objects.items():
        name = key[len(prefix) :].lstrip("/")
        assert ".tmp" not in name, key
        if name.startswith("shard-"):
            inspect_shard(data, fmt, int(name[6:12]), config.pairs, key)
        elif name.endswith(".json"):
            json.loads(data)


def test_a_coupling_is_written_and_read_through_a_flaky_endpoint(s3_endpoint, s3_bucket, ray_session, proxy, tmp_path):
    """The whole coupling stage — driver and Ray Data actors — talks to S3 through the proxy
    (26 % of requests fail, drop or stall); then every shard is read back through it."""
    root = location(s3_bucket)
    teacher = make_teacher(root.join("teacher"))
    config = make_config(pairs=480, shard_size=40, solver="euler@4", workers=2, batch_size=40)
    expected = reference_shards(config, teacher, location(str(tmp_path / "reference")))
    output = root.join("couple")

    proxy.set_rates(**FLAKY)
    proxy.stall_seconds = 0.3
    address = ray.get_runtime_context().gcs_address
    env = {"AWS_ENDPOINT_URL": proxy.url}
    result = subprocess.run(
        [sys.executable, "-c", COUPLE_THROUGH, address, proxy.url, config.model_dump_json(), teacher.uri, output.uri],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert proxy.faults >= 10, proxy.counts  # the run really met faults
    assert out["ids"] == list(range(480))  # read back through the proxy: each pair id once

    objects = bucket_keys(s3_endpoint, "rectiflow-test", "couple/")
    assert_only_whole_objects(objects, "couple/", config)
    shards = {key.split("/")[-1]: data for key, data in objects.items() if "/shard-" in key}
    assert shards == expected  # byte for byte what an undisturbed writer makes
    manifest = json.loads(objects[f"couple/{SUCCESS_FILE}"])
    assert manifest["details"]["shards"] == out["manifest"]["details"]["shards"]
    assert manifest["details"]["pairs"] == 480
    print("storage faults (coupling):", dict(proxy.counts))


def test_manifests_leases_and_exclusive_creates_through_a_flaky_endpoint(s3_endpoint, s3_bucket, proxy):
    """In this process, through the proxy at 30 %: manifests written and read back, shards
    created exclusively (a retried create whose first attempt landed is not a conflict with
    itself), leases taken, proved by a conditional heartbeat (``check``) and given back — every
    lease change a compare-and-swap whose answer may be lost. Dropped-after-forwarding requests
    are the hard case."""
    proxy.set_rates(error_rate=0.1, drop_rate=0.15, stall_rate=0.05)
    proxy.stall_seconds = 0.2
    rounds = 5
    with endpoint(proxy.url):
        root = location(s3_bucket).join("flaky")
        for i in range(rounds):
            stage = root.join(f"stage-{i}")
            lease = Lease(stage, f"run-{i}", ttl=30)
            lease.acquire(wait=False)
            assert lease.generation == 1
            data = bytes([i]) * (1000 + i)
            stage.join(shard_name(0)).create_bytes(data)  # True, or False when a retried create found its own object
            assert stage.join(shard_name(0)).read_bytes() == data
            assert not stage.join(shard_name(0)).create_bytes(b"other")
            for _ in range(3):
                lease.check()  # a replace If-Match whose answer was lost is recognised as our own write
            fake_manifest(stage, "couple", f"stage{i}", {"round": i, "shards": [shard_name(0)]})
            assert read_manifest(stage).details["round"] == i
            lease.release()
    assert proxy.faults >= 10, proxy.counts
    objects = bucket_keys(s3_endpoint, "rectiflow-test", "flaky/")
    for i in range(rounds):
        assert objects[f"flaky/stage-{i}/{shard_name(0)}"] == bytes([i]) * (1000 + i)
        assert json.loads(objects[f"flaky/stage-{i}/{SUCCESS_FILE}"])["details"]["round"] == i
        assert f"flaky/stage-{i}/{LEASE_FILE}" not in objects
    print("storage faults (manifests, leases):", dict(proxy.counts))


def test_an_endpoint_that_fails_everything_gives_a_clear_error_in_bounded_time(
    s3_endpoint, s3_bucket, proxy, ray_session
):
    root = location(s3_bucket)
    teacher = make_teacher(root.join("teacher"))
    proxy.set_rates(fail_all=503)
    started = time.monotonic()
    with endpoint(proxy.url, AWS_MAX_ATTEMPTS="3"):
        output = location(s3_bucket).join("couple")
        with pytest.raises(
            StorageIOError, match=r"cannot check s3://rectiflow-test/couple/_SUCCESS.json: .*Service Unavailable"
        ) as error:
            run_coupling_stage(make_config(), teacher, output)
    elapsed = time.monotonic() - started
    assert elapsed < 60, elapsed
    assert "s3://rectiflow-test/couple" in str(error.value)
    assert proxy.counts["fail_all"] >= 3  # it did retry
    assert [key for key in bucket_keys(s3_endpoint, "rectiflow-test") if key.startswith("couple")] == []
    print(f"fail-all: {proxy.counts['fail_all']} requests refused, error after {elapsed:.1f} s: {error.value}")


def test_reading_a_coupling_through_a_flaky_endpoint_verifies_every_shard(s3_endpoint, s3_bucket, proxy):
    """Every shard checked (size, checksum, schema) and read through the flaky endpoint. By design
    :meth:`Coupling.open` reads the manifest and one listing only (no shard: the driver reads
    none); the checks are :meth:`Coupling.check` — what ``verify()`` runs in Ray tasks, which
    would talk to S3 without the proxy — run here, in this process, through it."""
    x0 = sample_by_id(NoiseSpec(shape=[2]), 1, np.arange(600))
    write_coupling(location(s3_bucket).join("pairs"), x0, x0 + 1, shard_size=50)
    proxy.set_rates(**FLAKY)
    proxy.stall_seconds = 0.2
    with endpoint(proxy.url):
        coupling = Coupling.open(location(s3_bucket).join("pairs"))
        for entry in coupling.shards:
            coupling.check(entry)
        ids = np.concatenate([coupling.read(entry)[0] for entry in coupling.shards])
    assert ids.tolist() == list(range(600))
    assert proxy.faults >= 5, proxy.counts

"""Fault-injection tests: every test in this folder carries the ``faults`` marker, so that
``pytest -m faults`` runs them alone (and ``make test`` runs them with the rest)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from tests.faults.s3_proxy import FaultyProxy

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

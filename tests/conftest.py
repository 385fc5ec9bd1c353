"""Session fixtures: a real S3 HTTP endpoint on loopback (moto server mode) and one local Ray.

The S3 endpoint and its credentials are set in the environment before Ray starts, so Ray's
workers find them through the standard AWS chain exactly as they would on a cluster.
"""

from __future__ import annotations

import os
import socket

import pytest
import requests

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Ray Train V2's controller polls its workers every 2 s, and a worker's `ray.train.report` waits
# for that poll, so each checkpoint stalls training for up to 2 s. Real runs checkpoint every few
# hundred steps; tests checkpoint every few steps and would spend most of their time waiting.
# Set before any Ray starts, so the session's Ray and every `rectiflow` subprocess inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """``http://127.0.0.1:PORT`` of a moto S3 server shared by the session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = {key: os.environ.get(key) for key in [*_S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(_S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket: ``s3://rectiflow-test`` (the server is reset before each test)."""
    import boto3

    requests.post(f"{s3_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="rectiflow-test")
    yield "s3://rectiflow-test"


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """A storage root URI: a local folder, then a prefix in the moto bucket."""
    if request.param == "local":
        return str(tmp_path / "storage")
    return request.getfixturevalue("s3_bucket") + "/storage"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole session, started after the S3 environment is set; yields the
    URL of its dashboard (for the state API: ``list_actors(address=url)``).

    4 logical CPUs on a 2-core machine: train and sampling workers take 1 each and Ray Data's
    own tasks still find a free slot."""
    import ray

    context = ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=_free_port(),
        log_to_driver=False,
        configure_logging=False,
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # as `rectiflow run` does
    yield f"http://{context.dashboard_url}"
    ray.shutdown()


def kill_actor_process(dashboard: str, class_name: str, pick: int = -1) -> int | None:
    """SIGKILL the process of a live actor of ``class_name`` (the ``pick``-th listed); its pid,
    or None when there is none."""
    import signal

    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
    if not actors:
        return None
    pid = actors[pick]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid

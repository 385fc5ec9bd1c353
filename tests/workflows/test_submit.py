"""Submission through the real Ray Jobs API: a `ray start --head` cluster on 127.0.0.1, the tiny
pipeline (cut to one round) submitted with `rectiflow submit`, then again with
`ray job submit … -- rectiflow run`."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import psutil
import pytest

from tests.workflows.pipeline_helpers import ONE_ROUND, TINY, rectiflow, set_arguments

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.dirname(sys.executable)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster_processes(port: int) -> list[psutil.Process]:
    """The processes of the Ray session whose GCS listens on ``port``, and all their children."""
    commands = {}
    for process in psutil.process_iter(["cmdline"]):
        commands[process] = " ".join(process.info["cmdline"] or []) + " "
    sessions = {match.group(0) for line in commands.values() if str(port) in line
                for match in [re.search(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+", line)] if match}
    marks = {*sessions, f":{port} "}
    found = []
    for process, line in commands.items():
        if any(mark in line for mark in marks):
            try:
                found += [process, *process.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
    return found


def _forget_cluster(port: int) -> None:
    """Remove the address file `ray start` leaves behind (it would make later `ray.init()` calls
    without an address try to join the stopped cluster)."""
    marker = "/tmp/ray/ray_current_cluster"
    try:
        with open(marker) as handle:
            if handle.read().strip().endswith(f":{port}"):
                os.remove(marker)
    except FileNotFoundError:
        pass


@pytest.fixture(scope="module")
def cluster():
    """A head node started with `ray start --head`, token authentication on; stopped by killing
    its session's processes (`ray stop` would also stop the test session's own Ray)."""
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    # every port chosen free, so that nothing left on the machine's default ports gets in the way
    started = subprocess.run(
        [os.path.join(BIN, "ray"), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=4", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
         f"--metrics-export-port={_free_port()}"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        for process in _cluster_processes(port):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        _forget_cluster(port)


def test_submit_runs_the_pipeline_and_ray_job_submit_works_the_same(cluster, tmp_path):
    address, env = cluster
    storage = str(tmp_path / "runs")
    # no RAY_AUTH_MODE here: `rectiflow submit` finds the token (~/.ray/auth_token) by itself
    submitted = rectiflow("submit", os.path.relpath(TINY, REPO), "--address", address, "--storage", storage,
                          "--working-dir", REPO, *set_arguments(ONE_ROUND), env={"PATH": env["PATH"]}, cwd=REPO)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-2000:]
    assert re.search(r"submitted job (raysubmit_\w+)", submitted.stdout)
    assert "job raysubmit_" in submitted.stdout and "SUCCEEDED" in submitted.stdout
    report = os.path.join(storage, "tiny")
    assert any(name.startswith("report-") for name in os.listdir(report))

    again = subprocess.run(
        [os.path.join(BIN, "ray"), "job", "submit", "--address", address, "--working-dir", REPO,
         "--", "rectiflow", "run", os.path.relpath(TINY, REPO), "--storage", storage,
         *set_arguments(ONE_ROUND)],
        capture_output=True, text=True, env=env, timeout=900, cwd=REPO,
    )
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert "report:" in again.stdout and "cached" in again.stdout

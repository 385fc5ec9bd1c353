"""Submission through the real Ray Jobs API to a cluster whose Python does NOT have rectiflow.

The cluster is a ``ray start --head`` on 127.0.0.1 run by a throwaway virtual environment
(``python -m venv --without-pip``) whose only link to the test environment is a
``sitecustomize.py`` that *appends* the test venv's site-packages to ``sys.path``: that gives it
Ray, torch and the other dependencies, but no ``.pth`` file of that folder is processed, so the
editable install's finder for ``rf`` and ``workflows`` is absent, and the venv has no
``rectiflow`` script. The head starts in an empty folder with PYTHONPATH removed and that venv's
``bin`` first on PATH (so a job's ``python`` is the venv's). The fixture asserts all of this,
and a first job proves it from inside the cluster: ``python -c "import workflows"`` fails there.

Then ``rectiflow submit`` runs the tiny pipeline from the code it ships (the working dir holds
only the pipeline file), a second submission is interrupted with Ctrl-C and stopped with the
``rectiflow stop`` command the interruption prints, and the plain Ray CLI runs the documented
``ray job submit … --runtime-env cluster/runtime_env.yaml -- python -m workflows.cli run …``.
Token authentication is on throughout (a token made for this test, passed in RAY_AUTH_TOKEN).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from tests.workflows.pipeline_helpers import ONE_ROUND, RECTIFLOW, TINY, set_arguments

REPO = Path(__file__).resolve().parents[2]
SITE_PACKAGES = sysconfig.get_paths()["purelib"]
_LIMIT_S = 600  # a guard against hanging, never an assertion on time


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bare_environment(folder: Path) -> Path:
    """A venv with the test venv's packages on ``sys.path`` but without rectiflow: its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    # sys.path.append, not site.addsitedir: the folder's .pth files (the editable finder) stay unread
    Path(purelib, "sitecustomize.py").write_text(f"import sys\nsys.path.append({SITE_PACKAGES!r})\n")
    return python


class Cluster:
    """A head node in its own temp dir, run by the bare environment's python; stopped by killing
    the processes of its ``ray start --block`` tree and of its temp dir (``ray stop`` would also
    stop the test session's own Ray)."""

    def __init__(self, python: Path, workdir: Path, token: str):
        self.python, self.workdir, self.token = python, workdir, token
        self.temp_dir = tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp")  # short: unix socket paths
        self.port, dashboard = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        path = [part for part in os.environ["PATH"].split(os.pathsep) if part != os.path.dirname(sys.executable)]
        skip = {"PYTHONPATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "VIRTUAL_ENV"}
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in skip},
            "PATH": os.pathsep.join([str(python.parent), *path]),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
            "PYTHONUNBUFFERED": "1",
        }
        self.head = subprocess.Popen(
            [
                str(python),
                "-m",
                "ray.scripts.scripts",
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                f"--temp-dir={self.temp_dir}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                "--include-dashboard=true",
                "--num-cpus=4",
                "--disable-usage-stats",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}",
                f"--metrics-export-port={_free_port()}",
            ],
            env=self.env,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.head.stdout:
            self.output.append(line)

    def ray(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """The Ray CLI of the bare environment."""
        return subprocess.run(
            [str(self.python), "-m", "ray.scripts.scripts", *args],
            env=self.env,
            cwd=cwd or self.workdir,
            capture_output=True,
            text=True,
            timeout=_LIMIT_S,
            check=False,
        )

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.head.poll() is None, "ray start exited:\n" + "".join(self.output)
            if self.ray("job", "list", "--address", self.address).returncode == 0:
                return
            time.sleep(2)
        raise AssertionError("the head did not come up:\n" + "".join(self.output))

    def job_status(self, job_id: str) -> str:
        """The job's status, straight from the Jobs REST API (not through rectiflow)."""
        answer = requests.get(
            f"{self.address}/api/jobs/{job_id}", timeout=60, headers={"Authorization": f"Bearer {self.token}"}
        )
        answer.raise_for_status()
        return answer.json()["status"]

    def stop(self) -> None:
        processes = []
        try:
            processes = [psutil.Process(self.head.pid), *psutil.Process(self.head.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        for process in psutil.process_iter(["cmdline"]):
            if self.temp_dir in " ".join(process.info["cmdline"] or []):
                processes.append(process)
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        marker = "/tmp/ray/ray_current_cluster"  # `ray start`'s address file: later ray.init() would join it
        try:
            if Path(marker).read_text().strip().endswith(f":{self.port}"):
                os.remove(marker)
        except FileNotFoundError:
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node whose Python cannot import rectiflow (asserted here, before it starts)."""
    root = tmp_path_factory.mktemp("bare")
    python = bare_environment(root / "venv")
    empty = root / "cwd"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for package in ("workflows", "rf"):
        probe = subprocess.run(
            [str(python), "-c", f"import {package}"],
            capture_output=True,
            text=True,
            cwd=empty,
            env=env,
            timeout=120,
            check=False,
        )
        assert probe.returncode != 0 and f"No module named '{package}'" in probe.stderr, probe.stderr
    assert not list(python.parent.glob("rectiflow*")), "the bare environment has a rectiflow script"
    ready = subprocess.run(
        [str(python), "-c", "import ray, torch, fsspec"],
        capture_output=True,
        text=True,
        cwd=empty,
        env=env,
        timeout=120,
        check=False,
    )
    assert ready.returncode == 0, ready.stderr

    cluster = Cluster(python, empty, token=uuid.uuid4().hex)
    try:
        cluster.wait_until_up()
        yield cluster
    finally:
        cluster.stop()


def _client_env(cluster: Cluster) -> dict[str, str]:
    """The environment of a `rectiflow` client: the cluster's token, and no address variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env, "RAY_AUTH_TOKEN": cluster.token}


def _rectiflow(cluster: Cluster, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RECTIFLOW, *args],
        env=_client_env(cluster),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=_LIMIT_S,
        check=False,
    )


def test_the_cluster_requires_its_token(cluster):
    assert requests.get(f"{cluster.address}/api/jobs/", timeout=60).status_code == 401
    assert (
        requests.get(
            f"{cluster.address}/api/jobs/", timeout=60, headers={"Authorization": f"Bearer {cluster.token}"}
        ).status_code
        == 200
    )


def test_a_job_cannot_import_rectiflow_from_the_clusters_python(cluster):
    result = cluster.ray("job", "submit", "--address", cluster.address, "--", "python", "-c", "import workflows")
    assert result.returncode != 0
    assert "No module named 'workflows'" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's folder holding only the pipeline file: the code can only come from rectiflow."""
    folder = tmp_path_factory.mktemp("project")
    shutil.copy(TINY, folder / "pipeline.yaml")
    (folder / "runtime_env.yaml").write_text(
        yaml.safe_dump(
            {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}, "config": {"setup_timeout_seconds": 600}}
        )
    )
    return folder


def test_submit_ships_the_code_and_the_pipeline_runs_to_completion(cluster, project, tmp_path):
    storage = tmp_path / "runs"
    job_id = f"rectiflow-tiny-{uuid.uuid4().hex[:8]}"
    submitted = _rectiflow(
        cluster,
        "submit",
        "pipeline.yaml",
        "--address",
        cluster.address,
        "--storage",
        str(storage),
        "--submission-id",
        job_id,
        "--runtime-env",
        "runtime_env.yaml",
        *set_arguments(ONE_ROUND),
        cwd=project,
    )
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-2000:]
    assert f"submitted job {job_id} to {cluster.address}" in submitted.stdout
    # the driver's own output, streamed: its stage table and the report line, then the status
    assert "report:" in submitted.stdout and f"job {job_id}: SUCCEEDED" in submitted.stdout
    assert any(name.startswith("report-") for name in os.listdir(storage / "tiny"))
    assert cluster.job_status(job_id) == "SUCCEEDED"

    followed = _rectiflow(cluster, "logs", job_id, "--address", cluster.address, "--follow")
    assert followed.returncode == 0 and "report:" in followed.stdout
    assert followed.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")

    again = _rectiflow(
        cluster,
        "submit",
        "pipeline.yaml",
        "--address",
        cluster.address,
        "--storage",
        str(storage),
        "--submission-id",
        job_id,
        "--no-wait",
        cwd=project,
    )
    assert again.returncode == 1, again.stderr
    assert f"rectiflow: the cluster already has a job {job_id} (SUCCEEDED)" in again.stderr

    # the plain Ray CLI, as cluster/README.md shows it: the checkout is the working dir
    plain = cluster.ray(
        "job",
        "submit",
        "--address",
        cluster.address,
        "--working-dir",
        str(REPO),
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--",
        "python",
        "-m",
        "workflows.cli",
        "run",
        os.path.relpath(TINY, REPO),
        "--storage",
        str(storage),
        *set_arguments(ONE_ROUND),
        cwd=REPO,
    )
    assert plain.returncode == 0, plain.stdout[-4000:] + plain.stderr[-2000:]
    assert "report:" in plain.stdout and "cached" in plain.stdout


def test_ctrl_c_leaves_the_job_running_and_rectiflow_stop_stops_it(cluster, project, tmp_path):
    follow = subprocess.Popen(
        [
            RECTIFLOW,
            "submit",
            "pipeline.yaml",
            "--address",
            cluster.address,
            "--storage",
            str(tmp_path / "runs"),
            *set_arguments([*ONE_ROUND, "train.steps=100000"]),
        ],
        env=_client_env(cluster),
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follow.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + _LIMIT_S
    # Ray's first line of the job's log: the entrypoint runs, and its log streams here
    while not any(line.startswith("Running entrypoint for job ") for line in lines):
        assert follow.poll() is None and time.monotonic() < deadline, "".join(lines) + follow.stderr.read()
        time.sleep(0.5)
    (job_id,) = {match.group(1) for line in lines for match in [re.match(r"submitted job (\S+) to ", line)] if match}
    assert cluster.job_status(job_id) == "RUNNING"

    follow.send_signal(signal.SIGINT)
    assert follow.wait(timeout=120) == 1
    reader.join(timeout=30)
    stderr = follow.stderr.read()
    assert f"job {job_id} goes on running" in stderr
    (command,) = [line.split(":", 1)[1].strip() for line in stderr.splitlines() if line.startswith("stop it with:")]
    assert command == shlex.join(["rectiflow", "stop", job_id, "--address", cluster.address])
    assert cluster.job_status(job_id) == "RUNNING"

    stopped = _rectiflow(cluster, *shlex.split(command)[1:])
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"job {job_id}: STOPPED" in stopped.stdout
    assert cluster.job_status(job_id) == "STOPPED"
    again = _rectiflow(cluster, "stop", job_id, "--address", cluster.address)
    assert again.returncode == 0 and "had already ended: STOPPED" in again.stdout

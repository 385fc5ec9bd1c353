"""Credentials never leak: a whole (one-round, shortened) pipeline run with recognisable fake secrets in its
environment writes none of them anywhere — storage, stdout/stderr, the Ray session logs of the
run — and a failing S3 request's error does not carry them either."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.faults.conftest import endpoint
from tests.workflows.pipeline_helpers import ONE_ROUND, TINY, rectiflow, set_arguments
from workflows.storage import StorageIOError, location

SECRETS = {  # recognisable markers, not in any real credential's format
    "AWS_ACCESS_KEY_ID": "rectiflow-planted-access-key-id-0001",
    "AWS_SECRET_ACCESS_KEY": "rectiflow-planted-secret-access-key-0002",
    "AWS_SESSION_TOKEN": "rectiflow-planted-session-token-0003",
    "RAY_AUTH_TOKEN": "rectiflow-planted-ray-auth-token-0004",
}


def _leaks(folder: Path) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found += [f"{path}: {name}" for name, value in SECRETS.items() if value.encode() in data]
    return found


def test_a_run_writes_no_secret_anywhere(tmp_path, request):
    storage = tmp_path / "storage"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rf-", dir="/tmp"))  # Ray's socket paths must stay short
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    env = {**SECRETS, "RAY_TMPDIR": str(ray_tmp)}
    result = rectiflow("run", TINY, "--storage", str(storage), *set_arguments(ONE_ROUND), env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    files = [path for path in storage.rglob("*") if path.is_file()]
    logs = [path for path in ray_tmp.rglob("*") if path.is_file()]
    assert len(files) > 10 and any(path.name == "report.html" for path in files)
    assert logs, "the run's Ray session logs were not found under RAY_TMPDIR"
    streams = result.stdout + result.stderr
    leaked = [name for name, value in SECRETS.items() if value in streams] + _leaks(storage) + _leaks(ray_tmp)
    assert not leaked, leaked
    print(f"secrets: grepped {len(files)} storage files, {len(logs)} Ray session files, {len(streams)} bytes of output")


def test_a_failing_s3_request_does_not_carry_the_credentials(s3_endpoint, s3_bucket, proxy, monkeypatch):
    for name, value in SECRETS.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    proxy.set_rates(fail_all=403)
    with endpoint(proxy.url, AWS_MAX_ATTEMPTS="2"):
        for action in (
            lambda target: target.read_bytes(),
            lambda target: target.write_bytes(b"x"),
            lambda target: target.exists(),
        ):
            with pytest.raises((StorageIOError, PermissionError)) as error:
                action(location(s3_bucket).join("stage", "_SUCCESS.json"))
            text = f"{error.value!r} {error.value} {error.value.__cause__!r} {error.value.__context__!r}"
            assert "s3://rectiflow-test/stage/_SUCCESS.json" in str(error.value)
            assert not [name for name, value in SECRETS.items() if value in text], text
    assert os.environ["AWS_ACCESS_KEY_ID"] == SECRETS["AWS_ACCESS_KEY_ID"]

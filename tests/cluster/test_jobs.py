"""The Ray Jobs client's checks that need no cluster (:mod:`workflows.jobs`): the runtime env a
job gets and the user's runtime env file it merges, the entrypoint, the address rules, and the
CLI's answers (``--version``, refused runtime envs and addresses) before anything is uploaded.
Submitting, following and stopping on a real cluster: tests/workflows/test_submit.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from tests.workflows.pipeline_helpers import RECTIFLOW, TINY
from workflows import jobs
from workflows.config import ConfigError
from workflows.jobs import EXCLUDES, checked_address, job_runtime_env, load_runtime_env, run_entrypoint

ROOT = Path(__file__).resolve().parents[2]


def _problems(tmp_path: Path, text: str, name: str = "env.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_runtime_env(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path} is invalid:"), message
    return message


def test_a_runtime_env_file_is_read_and_merged(tmp_path):
    path = tmp_path / "env.json"  # JSON is YAML
    path.write_text(
        json.dumps(
            {
                "pip": ["einops==0.8.1"],
                "env_vars": {"A": "1"},
                "excludes": ["data/"],
                "config": {"setup_timeout_seconds": 900},
            }
        )
    )
    extra = load_runtime_env(str(path))
    env = job_runtime_env(tmp_path, extra)
    assert env["working_dir"] == str(tmp_path)
    assert [Path(folder).name for folder in env["py_modules"]] == ["rf", "workflows"]
    assert all((Path(folder) / "__init__.py").is_file() for folder in env["py_modules"])
    assert Path(env["py_modules"][1], "cli.py").is_file()
    assert env["excludes"] == [*EXCLUDES, "data/"]
    assert env["pip"] == ["einops==0.8.1"] and env["env_vars"] == {"A": "1"}
    assert env["config"]["setup_timeout_seconds"] == 900
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # what Ray's client builds from it
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_runtime_env(str(empty)) == {}


@pytest.mark.parametrize(
    "text,needles",
    [
        ("working_dir: .\n", ["working_dir: set by rectiflow itself", "--working-dir"]),
        ("py_modules: [./rf]\n", ["py_modules: set by rectiflow itself"]),
        (
            "image_uri: YOUR-REGISTRY/rectiflow:0.1.0\n",
            ["image_uri: Ray runs a job with image_uri only", "cluster/Dockerfile"],
        ),
        ("container: {image: x}\n", ["container: Ray runs a job with container only"]),
        ("pip: [a]\nconda: {dependencies: [b]}\n", ["pip, conda: only one of pip, uv and conda"]),
        ("env_vars: {WORKERS: 4}\n", ["env_vars.WORKERS: must be a string"]),
        ("env_vars: {AWS_SECRET_ACCESS_KEY: x}\n", ["env_vars.AWS_SECRET_ACCESS_KEY: looks like a credential"]),
        ("pip: ['rectiflow==0.1.0']\n", ["pip: 'rectiflow==0.1.0' installs rectiflow"]),
        ("pipp: [a]\n", ["pipp: not a runtime env field"]),
        ("- pip\n", ["a runtime env is a mapping of fields, not a list"]),
        ("pip: [a\n", ["not valid YAML or JSON"]),
        ("env_vars: [A]\n", ["env_vars: must be a mapping"]),
    ],
)
def test_a_bad_runtime_env_is_refused_naming_the_key(tmp_path, text, needles):
    message = _problems(tmp_path, text)
    for needle in needles:
        assert needle in message, message


def test_every_problem_is_reported_at_once(tmp_path):
    message = _problems(tmp_path, "working_dir: .\nimage_uri: x\nenv_vars: {GITHUB_TOKEN: x}\n")
    assert len(message.splitlines()) == 4, message  # the file line, then one per key


def test_an_unreadable_runtime_env_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml is invalid:\n  cannot read the file"):
        load_runtime_env(str(tmp_path / "missing.yaml"))


def test_ray_s_own_checks_still_apply(tmp_path):
    message = _problems(tmp_path, "config: {setup_timeout_seconds: 'soon'}\n")
    assert "setup_timeout_seconds" in message


def test_the_entrypoint_runs_the_module_from_the_working_dir(tmp_path):
    (tmp_path / "pipes").mkdir()
    pipeline = tmp_path / "pipes" / "my pipeline.yaml"
    pipeline.write_text("")
    args = Namespace(pipeline=str(pipeline), storage="s3://b/runs", overrides=["train.steps=5"])
    assert (
        run_entrypoint(args, tmp_path)
        == "python -m workflows.cli run 'pipes/my pipeline.yaml' --storage s3://b/runs --set train.steps=5"
    )
    with pytest.raises(ConfigError, match="not inside the working dir"):
        run_entrypoint(args, tmp_path / "pipes" / "elsewhere")


def test_the_address_rules(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert checked_address("http://a:8265") == "http://a:8265"
    assert checked_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "http://b:8265/")
    assert checked_address(None) == "http://b:8265/"
    assert checked_address("http://b:8265") == "http://b:8265"
    with pytest.raises(ConfigError) as caught:
        checked_address("http://a:8265")
    assert "--address http://a:8265 disagrees with RAY_ADDRESS=http://b:8265/" in str(caught.value)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://c:8265")  # the Jobs client reads it first
    assert checked_address(None) == "http://c:8265"
    with pytest.raises(ConfigError, match="RAY_API_SERVER_ADDRESS=http://c:8265"):
        checked_address("http://b:8265")
    assert checked_address("http://b:8265", ("RAY_ADDRESS",)) == "http://b:8265"  # what `run` checks


def _cli(*args: str, env: dict[str, str] | None = None, module: bool = False, cwd: Path | None = None):
    environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    command = [sys.executable, "-m", "workflows.cli"] if module else [RECTIFLOW]
    return subprocess.run(
        [*command, *args],
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        check=False,
    )


def test_version():
    from importlib.metadata import version

    installed = _cli("--version")
    assert installed.returncode == 0 and installed.stdout.strip() == f"rectiflow {version('rectiflow')}"
    assert _cli("--version", module=True).stdout == installed.stdout


def test_submit_refuses_a_bad_runtime_env_before_contacting_the_cluster(tmp_path):
    (tmp_path / "env.yaml").write_text("image_uri: x\nenv_vars: {N: 1}\n")
    result = _cli(
        "submit",
        os.path.relpath(TINY, ROOT),
        "--address",
        "http://127.0.0.1:9",
        "--runtime-env",
        str(tmp_path / "env.yaml"),
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert f"rectiflow: {tmp_path / 'env.yaml'} is invalid:" in result.stderr
    assert "image_uri:" in result.stderr and "env_vars.N:" in result.stderr and "Traceback" not in result.stderr


def test_an_address_that_disagrees_with_ray_address_is_an_error(tmp_path, monkeypatch):
    storage = tmp_path / "runs"
    result = _cli(
        "run", TINY, "--storage", str(storage), "--address", "127.0.0.1:9", env={"RAY_ADDRESS": "127.0.0.1:10"}
    )
    assert result.returncode == 2, result.stderr
    assert "--address 127.0.0.1:9 disagrees with RAY_ADDRESS=127.0.0.1:10" in result.stderr
    assert not storage.exists(), "nothing is written"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:10")
    for command in (jobs.logs, jobs.stop):
        with pytest.raises(ConfigError, match="--address http://127.0.0.1:9 disagrees with RAY_ADDRESS="):
            command(Namespace(job_id="raysubmit_x", address="http://127.0.0.1:9", follow=False))


def test_no_or_an_unreachable_cluster_is_one_line(capsys, monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="no cluster address: pass --address"):
        jobs.stop(Namespace(job_id="raysubmit_x", address=None))
    assert jobs.logs(Namespace(job_id="raysubmit_x", address="http://127.0.0.1:9", follow=False)) == 1
    assert capsys.readouterr().err.startswith("rectiflow: ")

"""The Ray Jobs client commands: ``rectiflow submit``, ``rectiflow logs`` and ``rectiflow stop``.

A submitted pipeline carries its code: the job's runtime env ships the ``rf`` and ``workflows``
packages this command runs from as ``py_modules`` and uploads ``--working-dir`` (which holds the
pipeline file) as ``working_dir``, and the entrypoint is ``python -m workflows.cli run …``. So the
cluster needs rectiflow's dependencies (the image of ``cluster/Dockerfile``, or a runtime env's
``pip``), never an installed rectiflow; where one is installed, the shipped code comes first on
the path. A user's runtime env file (``--runtime-env``) adds ``pip``, ``env_vars``, ``config`` …
and is checked before anything is uploaded.

Addresses: Ray's clients silently prefer ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` over the
address they are given; an explicit ``--address`` that disagrees with them is an error instead.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from workflows.config import ConfigError, load_pipeline

EXIT_OK, EXIT_FAILED = 0, 1
logger = logging.getLogger("rectiflow")

JOB_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
"""The variables Ray's Jobs client reads instead of its ``address`` argument, in its order."""
SHIPPED_PACKAGES = ("rf", "workflows")
EXCLUDES = [".venv", ".git", "runs", "**/__pycache__"]
"""Never uploaded (gitignore patterns, relative to the working dir and to each shipped package)."""
_OWNED = {
    "working_dir": "rectiflow submit uploads --working-dir as the working_dir; pass --working-dir instead",
    "py_modules": "rectiflow submit ships the rf and workflows packages as py_modules",
}
_IMAGE_KEYS = ("image_uri", "container")
_ONE_OF = ("pip", "uv", "conda")
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
_STOP_WAIT_S = 60.0


def checked_address(explicit: str | None, variables: tuple[str, ...] = JOB_ADDRESS_VARIABLES) -> str | None:
    """The address a Ray client will really use: the first of ``variables`` that is set, else
    ``explicit``. An explicit address that disagrees with a set variable is a
    :class:`ConfigError` naming both, since Ray would silently take the variable (the Jobs
    client) or leave the user unsure which cluster they reached (``ray.init``)."""
    for name in variables:
        value = os.environ.get(name)
        if not value:
            continue
        if explicit and explicit.rstrip("/") != value.rstrip("/"):
            raise ConfigError(
                "--address",
                [
                    (
                        f"--address {explicit} disagrees with {name}={value}, which Ray would use instead; "
                        f"unset {name} or pass the same address"
                    )
                ],
            )
        return explicit or value
    return explicit


def stop_command(job_id: str, address: str) -> str:
    """The exact command that stops ``job_id``."""
    return shlex.join(["rectiflow", "stop", job_id, "--address", address])


def follow_command(job_id: str, address: str) -> str:
    """The exact command that streams ``job_id``'s logs."""
    return shlex.join(["rectiflow", "logs", job_id, "--address", address, "--follow"])


# --- the job's runtime env ------------------------------------------------------------------


def shipped_package_dirs() -> list[Path]:
    """The folders of the ``rf`` and ``workflows`` packages this process imports (a checkout or
    site-packages), found without importing them."""
    return [Path(importlib.util.find_spec(name).submodule_search_locations[0]) for name in SHIPPED_PACKAGES]


def runtime_env_problems(env: dict[str, Any]) -> list[str]:
    """What is wrong with a user's runtime env for ``rectiflow submit``, one line per key: keys
    Ray does not know, keys rectiflow sets itself, keys Ray cannot combine with shipped code,
    more than one package manager, env vars that are not strings or look like credentials, a
    ``pip`` that installs rectiflow; then whatever Ray's own validation rejects."""
    from packaging.requirements import InvalidRequirement, Requirement
    from ray.runtime_env import RuntimeEnv

    problems = [
        f"{key}: not a runtime env field (Ray knows {', '.join(sorted(RuntimeEnv.known_fields))})"
        for key in env
        if key not in RuntimeEnv.known_fields
    ]
    problems += [f"{key}: set by rectiflow itself ({reason})" for key, reason in _OWNED.items() if key in env]
    problems += [
        f"{key}: Ray runs a job with {key} only beside env_vars and config, so it cannot carry the "
        "working_dir and py_modules that ship the pipeline and the code; make the image of "
        "cluster/Dockerfile the cluster's image instead"
        for key in _IMAGE_KEYS
        if key in env
    ]
    managers = [key for key in _ONE_OF if key in env]
    if len(managers) > 1:
        problems.append(f"{', '.join(managers)}: only one of pip, uv and conda can be set")
    variables = env.get("env_vars", {})
    if not isinstance(variables, dict):
        problems.append("env_vars: must be a mapping of names to strings")
        variables = {}
    for name, value in variables.items():
        if not isinstance(value, str):
            problems.append(f'env_vars.{name}: must be a string (quote it: "{value}")')
        if _SECRET_NAME.search(str(name)) and not str(name).endswith(("_PATH", "_FILE")):
            problems.append(
                f"env_vars.{name}: looks like a credential; a job's runtime env is shown in the "
                "dashboard and job info, so give the nodes an identity (IRSA, workload identity, "
                "instance profile) instead"
            )
    packages = env.get("pip", [])
    packages = packages.get("packages", []) if isinstance(packages, dict) else packages
    for package in packages if isinstance(packages, list) else []:
        try:
            if Requirement(str(package)).name.lower() == "rectiflow":
                problems.append(f"pip: {package!r} installs rectiflow, which rectiflow submit ships with the job")
        except InvalidRequirement:
            pass  # a path, URL or pip option: Ray checks it
    if not problems:
        try:
            RuntimeEnv(**env)
        except (TypeError, ValueError) as error:
            problems.append(str(error))
    return problems


def load_runtime_env(path: str) -> dict[str, Any]:
    """Read a runtime env file (YAML, or JSON, which YAML reads) and check it; a
    :class:`ConfigError` naming the file and each bad key otherwise."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(path, [f"cannot read the file: {error.strerror}"]) from None
    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(path, [f"not valid YAML or JSON: {error}"]) from None
    env = {} if env is None else env
    if not isinstance(env, dict):
        raise ConfigError(path, [f"a runtime env is a mapping of fields, not a {type(env).__name__}"])
    problems = runtime_env_problems(env)
    if problems:
        raise ConfigError(path, problems)
    return env


def job_runtime_env(working_dir: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The submitted job's runtime env: ``working_dir`` and the shipped packages as
    ``py_modules``, with a user's checked runtime env (``extra``) merged in (its ``excludes``
    added to rectiflow's)."""
    extra = dict(extra or {})
    return {
        **extra,
        "working_dir": str(working_dir),
        "py_modules": [str(folder) for folder in shipped_package_dirs()],
        "excludes": [*EXCLUDES, *extra.get("excludes", [])],
    }


def run_entrypoint(args: argparse.Namespace, working_dir: Path) -> str:
    """``python -m workflows.cli run PIPELINE …``, with the pipeline's path relative to the
    uploaded working dir: no installed ``rectiflow`` script is needed on the cluster."""
    pipeline = Path(args.pipeline).resolve()
    try:
        relative = pipeline.relative_to(working_dir)
    except ValueError:
        raise ConfigError(
            args.pipeline,
            [(f"not inside the working dir {working_dir} that is uploaded; pass --working-dir or move the file")],
        ) from None
    parts = ["python", "-m", "workflows.cli", "run", relative.as_posix()]
    if args.storage:
        parts += ["--storage", args.storage]
    for assignment in args.overrides:
        parts += ["--set", assignment]
    return shlex.join(parts)


# --- talking to the cluster -----------------------------------------------------------------


def _reports_cluster_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the Jobs API's failures (unreachable cluster, unknown job, refused submission) into
    one ``rectiflow: …`` line and exit status 1."""

    @functools.wraps(command)
    def reported(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ConnectionError, RuntimeError) as error:
            print(f"rectiflow: {error}", file=sys.stderr)
            return EXIT_FAILED

    return reported


def _client(address: str | None) -> Any:
    """A Ray Jobs client for ``address`` (token mode is set up by :func:`workflows.cli.main`)."""
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise ConfigError("--address", ["no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS"])
    return JobSubmissionClient(address)


def _existing_job(client: Any, job_id: str) -> Any:
    """The cluster's record of ``job_id`` (JobDetails), or None when it has no such job."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as error:
        if "status code 404" in str(error):
            return None
        raise


def _submit_with_retry(client: Any, attempts: int = 12, **job: Any) -> str:
    """Submit, retrying while a just-started cluster has no job agent yet (the Jobs API answers
    500 "No available agent" for its first seconds)."""
    for attempt in range(attempts):
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if "No available agent" not in str(error) or attempt == attempts - 1:
                raise
            logger.info("the cluster's job agent is not up yet; retrying in 5 s")
            time.sleep(5)
    raise AssertionError("unreachable")


async def _print_stream(client: Any, job_id: str) -> None:
    """Print the job's log as the cluster streams it, until the job ends."""
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _follow(client: Any, job_id: str, address: str) -> int | None:
    """Stream the job's logs (Ray's websocket tail) until it ends; None then. On Ctrl-C, say that
    the job goes on and how to stop it, and return the exit status."""
    try:
        asyncio.run(_print_stream(client, job_id))
    except KeyboardInterrupt:
        print(
            f"\nrectiflow: stopped following; job {job_id} goes on running on the cluster.\n"
            f"stop it with:   {stop_command(job_id, address)}\n"
            f"follow it with: {follow_command(job_id, address)}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_FAILED
    return None


def _final_status(client: Any, job_id: str) -> int:
    """Print the job's final status (and Ray's reason when it did not succeed)."""
    from ray.job_submission import JobStatus

    info = client.get_job_info(job_id)
    print(f"job {job_id}: {info.status.value}")
    if info.status != JobStatus.SUCCEEDED and info.message:
        print(f"  {info.message}")
    return EXIT_OK if info.status == JobStatus.SUCCEEDED else EXIT_FAILED


@_reports_cluster_errors
def submit(args: argparse.Namespace) -> int:
    """Submit ``rectiflow run`` with the code as a Ray job; print its id, and stream its logs
    until it ends unless --no-wait."""
    load_pipeline(args.pipeline, args.overrides, args.storage)  # fail here, not on the cluster
    working_dir = Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        raise ConfigError("--working-dir", [f"{args.working_dir} is not a folder"])
    entrypoint = run_entrypoint(args, working_dir)
    extra = load_runtime_env(args.runtime_env) if args.runtime_env else {}
    address = checked_address(args.address)
    client = _client(address)
    if args.submission_id and (existing := _existing_job(client, args.submission_id)) is not None:
        print(
            f"rectiflow: the cluster already has a job {args.submission_id} ({existing.status.value}); "
            "choose another --submission-id",
            file=sys.stderr,
        )
        return EXIT_FAILED
    job_id = _submit_with_retry(
        client, entrypoint=entrypoint, runtime_env=job_runtime_env(working_dir, extra), submission_id=args.submission_id
    )
    print(f"submitted job {job_id} to {address}", flush=True)
    if args.no_wait:
        print(f"follow it with: {follow_command(job_id, address)}")
        print(f"stop it with:   {stop_command(job_id, address)}")
        return EXIT_OK
    interrupted = _follow(client, job_id, address)
    return interrupted if interrupted is not None else _final_status(client, job_id)


@_reports_cluster_errors
def logs(args: argparse.Namespace) -> int:
    """Print a submitted job's logs; with --follow, stream them until the job ends."""
    address = checked_address(args.address)
    client = _client(address)
    if not args.follow:
        sys.stdout.write(client.get_job_logs(args.job_id))
        return EXIT_OK
    interrupted = _follow(client, args.job_id, address)
    return interrupted if interrupted is not None else _final_status(client, args.job_id)


@_reports_cluster_errors
def stop(args: argparse.Namespace) -> int:
    """Stop a submitted job (Ray sends its driver SIGTERM, then SIGKILL) and wait until it has
    ended; finished stages stay finished, and re-submitting resumes."""
    from ray.job_submission import JobStatus

    client = _client(checked_address(args.address))
    if not client.stop_job(args.job_id):
        print(f"job {args.job_id} had already ended: {client.get_job_status(args.job_id).value}")
        return EXIT_OK
    deadline = time.monotonic() + _STOP_WAIT_S
    status = client.get_job_status(args.job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(args.job_id)
    print(f"job {args.job_id}: {status.value}")
    return EXIT_OK if status == JobStatus.STOPPED else EXIT_FAILED

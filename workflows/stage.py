"""The stage contract, and the one helper every stage runs through.

A stage is a plain function ``run(config, inputs: {role: Location}, output: Location) → Manifest``.
It delegates to :func:`run_stage`, which

1. returns the existing manifest when ``output`` is already finished (without reading its inputs)
   — or refuses, naming the differences, when it holds a finished stage of another kind,
   configuration or inputs;
2. reads each input's manifest (an unfinished input is an error naming its role) and computes the
   stage hash from the kind, ``config.identity()`` and the inputs' hashes;
3. runs the stage's work under the clock, with the active lease (:mod:`workflows.lease`) checked
   before the manifest is written, so a stage that lost its lease never marks itself done;
4. writes the manifest (:mod:`workflows.manifest`) last.

So every manifest has the same shape, and the plan (:mod:`workflows.plan`) computes the same hash
from the config alone, before anything runs.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from workflows.lease import Lease, active_lease, attempt_folder
from workflows.manifest import (
    Manifest,
    StageNotFinished,
    describe_differences,
    is_done,
    read_manifest,
    write_manifest,
)
from workflows.settings import Strict, stage_hash
from workflows.storage import Location

PROGRESS_FILE = "_PROGRESS.json"


class StageInputError(ValueError):
    """A stage's inputs or output location do not fit its config (names the field or file)."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class StageClock:
    """Wall time of a stage run, the driver's CPU seconds, plus the CPU/GPU seconds its workers report."""

    started_at: str = field(default_factory=utc_now)
    _start: float = field(default_factory=time.perf_counter)
    _driver_cpu: float = field(default_factory=process_cpu_seconds)
    worker_cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0

    def add_worker(self, cpu_seconds: float, gpu_seconds: float = 0.0) -> None:
        self.worker_cpu_seconds += cpu_seconds
        self.gpu_seconds += gpu_seconds

    def summary(self) -> dict[str, Any]:
        driver = process_cpu_seconds() - self._driver_cpu
        return {
            "started_at": self.started_at,
            "finished_at": utc_now(),
            "wall_seconds": round(time.perf_counter() - self._start, 3),
            "cpu_seconds": round(self.worker_cpu_seconds + driver, 3),
            "gpu_seconds": round(self.gpu_seconds, 3),
            "host": platform.node(),
            "pid": os.getpid(),
        }


def code_version() -> dict[str, str | None]:
    """Versions that decide a result: rectiflow (and its git commit when run from a checkout),
    torch, ray, python."""
    from workflows import __version__

    versions: dict[str, str | None] = {"python": platform.python_version(), "rectiflow": __version__}
    for package in ("torch", "ray"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["git"] = _git_commit()
    return versions


def _git_commit() -> str | None:
    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_progress(output: Location, done: int, total: int, unit: str, rate: float, **extra: Any) -> None:
    """Record a running stage's progress beside its output (``_PROGRESS.json``; the underscore
    keeps Parquet readers of the folder away), for ``rectiflow status`` and the live stage table:
    ``done`` of ``total`` ``unit`` at ``rate``/s."""
    output.join(PROGRESS_FILE).write_json(
        {"done": done, "total": total, "unit": unit, "rate": round(rate, 3), "updated_at": time.time(), **extra}
    )


def read_progress(output: Location) -> dict[str, Any] | None:
    """The last progress a running (or interrupted) stage recorded, or None."""
    try:
        return output.join(PROGRESS_FILE).read_json()
    except (FileNotFoundError, ValueError):
        return None


@dataclass
class StageContext:
    """What a stage's work gets: its output, its inputs (with their manifests), the clock, and
    ``attempt``, the folder for what it writes that is not content-addressed (checkpoints, a
    model, evaluation files): ``attempt-{lease generation}`` (``attempt-0`` outside a pipeline),
    so a run that lost its lease can never overwrite what its successor's manifest names."""

    kind: str
    hash: str
    output: Location
    inputs: dict[str, Location]
    manifests: dict[str, Manifest]
    clock: StageClock
    lease: Lease | None = None

    @property
    def attempt(self) -> Location:
        return self.output.join(attempt_folder(self.lease.generation if self.lease is not None else 0))

    def relative(self, where: Location) -> str:
        """``where`` relative to the output folder (how manifests name their files)."""
        return where.path[len(self.output.path) + 1 :]

    def check_lease(self) -> None:
        """:class:`workflows.lease.LeaseLost` when another run took the stage over."""
        if self.lease is not None:
            self.lease.check()

    def progress(self, done: int, total: int, unit: str, rate: float, **extra: Any) -> None:
        write_progress(self.output, done, total, unit, rate, **extra)


def input_manifests(inputs: dict[str, Location], error: type[Exception]) -> dict[str, Manifest]:
    """The manifest of every input; ``error`` naming the role of one that is not finished."""
    manifests = {}
    for role, where in inputs.items():
        try:
            manifests[role] = read_manifest(where)
        except (StageNotFinished, ValueError) as problem:
            raise error(f"{role} {where.uri} is not a finished stage: {problem}") from None
    return manifests


def finished(
    output: Location, kind: str, identity: dict[str, Any], inputs: dict[str, Location], error: type[Exception]
) -> Manifest | None:
    """The manifest when ``output`` is this stage, finished — the same kind, config identity and
    input locations (their hashes are those it recorded: a finished stage is returned without
    reading its inputs); None when it is unfinished; ``error`` naming the differences when it
    holds a finished stage of another kind or configuration."""
    if not is_done(output):
        return None
    manifest = read_manifest(output)
    if manifest.kind != kind:
        raise error(f"output {output.uri} is a finished stage of kind {manifest.kind!r}, not {kind!r}")
    recorded = {role: entry.get("uri") for role, entry in manifest.inputs.items()}
    given = {role: where.uri for role, where in inputs.items()}
    if manifest.identity != identity or recorded != given:
        differences = describe_differences(identity, manifest.identity) or describe_differences(given, recorded)
        raise error(
            f"output {output.uri} is a finished {kind} stage of another configuration ({differences}); "
            "choose another output location"
        )
    return manifest


def run_stage(
    kind: str,
    config: Strict,
    inputs: dict[str, Location],
    output: Location,
    work: Callable[[StageContext], dict[str, Any]],
    error: type[Exception] = StageInputError,
) -> Manifest:
    """Run (or find finished) a stage of ``kind`` (see the module docstring); ``work(context)``
    does the stage's work and returns the manifest's ``details``."""
    identity = config.identity()
    done = finished(output, kind, identity, inputs, error)
    if done is not None:
        return done
    manifests = input_manifests(inputs, error)
    digest = stage_hash(kind, identity, {role: manifest.hash for role, manifest in manifests.items()})
    lease = active_lease()
    context = StageContext(kind, digest, output, dict(inputs), manifests, StageClock(), lease)
    details = work(context)
    context.check_lease()  # a stage that lost its lease stops here: nothing it made counts
    manifest = Manifest(
        kind=kind,
        hash=digest,
        stage=output.name,
        config=config.model_dump(mode="json"),
        identity=identity,
        inputs={role: {"uri": where.uri, "hash": manifests[role].hash} for role, where in inputs.items()},
        time=context.clock.summary(),
        code=code_version(),
        details=details,
        lease=lease.generation_record() if lease is not None else None,
    )
    write_manifest(output, manifest)
    return manifest

"""What every stage shares: its hash, its output location, its manifest, its clock.

A stage is a plain function ``(config, inputs) → output location + manifest``. Its output lives at
``{storage}/{run}/{stage}-{hash}``, the hash covering the stage's kind, config and its inputs'
hashes, so a changed setting or a changed input gets a new folder and an unchanged one is found
again. ``_SUCCESS.json`` — the manifest — is written last and marks the stage done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from workflows.storage import Location

SUCCESS_FILE = "_SUCCESS.json"
PLAN_FILE = "pipeline.json"
"""At a run's root: the plan of its stages (written by the pipeline, read by status and report)."""
HASH_LENGTH = 16
logger = logging.getLogger("rectiflow.stage")


class StageNotFinished(RuntimeError):
    """An input stage has no ``_SUCCESS.json``."""


def content_hash(value: Any) -> str:
    """sha256 of the canonical JSON of ``value`` (sorted keys), first 16 hex digits."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_LENGTH]


def stage_hash(kind: str, config: Any, input_hashes: dict[str, str]) -> str:
    """The hash that names a stage's output: its kind, config and inputs' hashes."""
    return content_hash({"kind": kind, "config": config, "inputs": input_hashes})


def is_done(output: Location) -> bool:
    return output.join(SUCCESS_FILE).exists()


def read_manifest(output: Location) -> dict[str, Any]:
    """The manifest of a finished stage; :class:`StageNotFinished` when there is none."""
    marker = output.join(SUCCESS_FILE)
    if not marker.exists():
        raise StageNotFinished(f"stage output {output.uri} is not finished (no {SUCCESS_FILE})")
    return marker.read_json()


def describe_differences(expected: dict[str, Any], found: dict[str, Any]) -> str:
    """``key: found (there) vs expected (here)`` for every top-level key whose values differ."""
    keys = sorted(set(expected) | set(found), key=str)
    return "; ".join(
        f"{key}: {json.dumps(found.get(key))} there vs {json.dumps(expected.get(key))} here"
        for key in keys
        if expected.get(key) != found.get(key)
    )


def finished_manifest(
    output: Location, kind: str, noun: str, expected: dict[str, dict[str, Any]], error: type[Exception]
) -> dict[str, Any] | None:
    """The manifest when ``output`` is a finished stage of ``kind`` whose manifest holds the
    ``expected`` values under each key (e.g. ``{"identity": config.identity()}``); None when it is
    unfinished. Raises ``error`` naming the differences when it is another stage's output."""
    if not is_done(output):
        return None
    manifest = read_manifest(output)
    article = "an" if noun[:1] in "aeiou" else "a"
    if manifest.get("kind") != kind:
        raise error(f"output {output.uri} is a finished stage of kind {manifest.get('kind')!r}, not {article} {noun}")
    differences = [
        describe_differences(values, manifest.get(key) or {})
        for key, values in expected.items()
        if manifest.get(key) != values
    ]
    if differences:
        raise error(
            f"output {output.uri} is a finished {noun} of another configuration "
            f"({'; '.join(differences)}); choose another output location"
        )
    return manifest


def write_manifest(output: Location, manifest: dict[str, Any]) -> None:
    """Write ``_SUCCESS.json``: call this last, after every other object of the stage. The stage's
    writers are done by then, so a temporary file still under a local output was left by a worker
    killed mid-write (its retry wrote the object again) and is removed first."""
    removed = output.remove_temporaries()
    if removed:
        logger.info("removed %d temporary files that killed writers left under %s", len(removed), output.uri)
    output.join(SUCCESS_FILE).write_json(manifest)


PROGRESS_FILE = "_PROGRESS.json"


def write_progress(output: Location, done: int, total: int, unit: str, rate: float, **extra: Any) -> None:
    """Record a running stage's progress beside its output (``_PROGRESS.json``; the underscore keeps Parquet readers of the folder away), for
    ``rectiflow status`` and the live stage table: ``done`` of ``total`` ``unit`` at ``rate``/s."""
    output.join(PROGRESS_FILE).write_json(
        {"done": done, "total": total, "unit": unit, "rate": round(rate, 3), "updated_at": time.time(), **extra}
    )


def read_progress(output: Location) -> dict[str, Any] | None:
    """The last progress a running (or interrupted) stage recorded, or None."""
    try:
        return output.join(PROGRESS_FILE).read_json()
    except (FileNotFoundError, ValueError):
        return None


def code_version() -> dict[str, str | None]:
    """Versions that decide a result: rectiflow (and its git commit when run from a checkout),
    torch, ray, python."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("rectiflow", "torch", "ray"):
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
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class StageClock:
    """Wall time of a stage run plus the CPU/GPU seconds its workers report."""

    started_at: str = field(default_factory=utc_now)
    _start: float = field(default_factory=time.perf_counter)
    worker_cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0

    def add_worker(self, cpu_seconds: float, gpu_seconds: float = 0.0) -> None:
        self.worker_cpu_seconds += cpu_seconds
        self.gpu_seconds += gpu_seconds

    def summary(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "finished_at": utc_now(),
            "wall_seconds": round(time.perf_counter() - self._start, 3),
            "cpu_seconds": round(self.worker_cpu_seconds, 3),
            "gpu_seconds": round(self.gpu_seconds, 3),
            "host": platform.node(),
            "pid": os.getpid(),
        }

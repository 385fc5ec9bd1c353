"""The stage table: one row per stage with its state, progress and time, for people and scripts.

:func:`stage_rows` reads the state of a run document's stages from storage alone, so
``rectiflow status`` needs no Ray and no running driver:

- **done**: the stage's ``_SUCCESS.json`` exists (its manifest gives the summary and seconds);
- **running**: no manifest, and a live lease (``_LEASE.json`` whose holder still beats; its
  generation is the attempt folder being written);
- **interrupted**: no manifest, and a stale lease or some work left behind (the next run resumes it);
- **not started**: nothing there.

:func:`render` formats rows as fixed-width text (the live table of ``rectiflow run`` too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from workflows.lease import LEASE_FILE, Holder, attempt_folder, is_stale
from workflows.manifest import SUCCESS_FILE, Manifest, ManifestError, read_manifest
from workflows.stage import read_progress
from workflows.storage import Location, location

DONE, RUNNING, INTERRUPTED, NOT_STARTED = "done", "running", "interrupted", "not started"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_progress(progress: dict[str, Any] | None) -> str:
    """``1200/2000 steps (60%) 35.2/s`` from a ``_PROGRESS.json`` record."""
    if not progress or not progress.get("total"):
        return ""
    done, total = progress["done"], progress["total"]
    text = f"{done}/{total} {progress['unit']} ({100 * done / total:.0f}%) {float(progress.get('rate') or 0):.1f}/s"
    if "loss" in progress:
        text += f" loss {progress['loss']:.4g}"
    return text


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    """What a finished stage made, from its manifest alone: kind, hash, the one-line summary, the
    plain values of its details (steps, final loss, pairs, …: whatever the kind records) and its
    seconds."""
    details = {
        key: value
        for key, value in manifest.details.items()
        if isinstance(value, (str, int, float, bool)) and key != "summary"
    }
    timing = {
        key: manifest.time[key]
        for key in ("wall_seconds", "cpu_seconds", "gpu_seconds", "finished_at")
        if key in (manifest.time or {})
    }
    return {
        **details,
        "kind": manifest.kind,
        "hash": manifest.hash,
        "summary": manifest.details.get("summary", ""),
        **timing,
    }


@dataclass(frozen=True)
class StoredState:
    """A stage's state as storage shows it, with its manifest (done) or lease holder (if any)."""

    state: str
    manifest: Manifest | None = None
    lease: Holder | None = None
    problem: str | None = None


def stored_state(output: Location, now: float, lease_ttl: float = 60.0) -> StoredState:
    """The state of the stage at ``output`` (see the module docstring); a lease whose heartbeat is
    older than ``lease_ttl`` seconds (or whose process on this host is gone) is stale."""
    names = set(output.list_names())
    if SUCCESS_FILE in names:
        try:
            return StoredState(DONE, manifest=read_manifest(output))
        except (ManifestError, ValueError, FileNotFoundError) as error:
            return StoredState(DONE, problem=str(error))
    if LEASE_FILE in names:
        try:
            holder = Holder.parse(output.join(LEASE_FILE).read_bytes())
        except FileNotFoundError:  # released between the listing and the read
            names.discard(LEASE_FILE)
        else:
            return StoredState(INTERRUPTED if is_stale(holder, lease_ttl, now) else RUNNING, lease=holder)
    return StoredState(INTERRUPTED if names else NOT_STARTED)


def _lease_record(holder: Holder, now: float) -> dict[str, Any]:
    return {
        "run_id": holder.run_id,
        "host": holder.host,
        "pid": holder.pid,
        "generation": holder.generation,
        "attempt": attempt_folder(holder.generation),
        "held_s": round(now - holder.since, 1),
        "heartbeat_age_s": round(now - holder.heartbeat, 1),
    }


def stage_rows(stages: list[dict[str, Any]], now: float | None = None, lease_ttl: float = 60.0) -> list[dict[str, Any]]:
    """One row per stage entry of a run document (``name``, ``kind``, ``hash``, ``uri``): its
    state, and the manifest's summary (done), or the progress, lease and seconds held (running or
    interrupted)."""
    now = time.time() if now is None else now
    rows = []
    for stage in stages:
        output = location(stage["uri"])
        found = stored_state(output, now, lease_ttl)
        row: dict[str, Any] = {
            "name": stage["name"],
            "kind": stage["kind"],
            "state": found.state,
            "uri": stage["uri"],
            "hash": stage["hash"],
        }
        if found.manifest is not None:
            row["manifest"] = manifest_summary(found.manifest)
            row["seconds"] = found.manifest.time.get("wall_seconds")
        if found.problem is not None:
            row["problem"] = found.problem
        if found.state in (RUNNING, INTERRUPTED):
            row["progress"] = read_progress(output)
        if found.lease is not None:
            row["lease"] = _lease_record(found.lease, now)
            if found.state == RUNNING:
                row["seconds"] = now - found.lease.since
        rows.append(row)
    return rows


def _details(row: dict[str, Any]) -> str:
    if "problem" in row:
        return row["problem"]
    if "manifest" in row:
        return str(row["manifest"].get("summary", ""))
    lease = row.get("lease")
    if lease:
        beat = f"last heartbeat {lease['heartbeat_age_s']:.0f} s ago"
        return f"{lease['attempt']} by run {lease['run_id']} on {lease['host']}, {beat}"
    return ""


def render(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: stage, state, progress, time, and — when some row has one — details
    (a finished stage's summary, or the attempt and holder of a lease)."""
    table = [["stage", "state", "progress", "time", "details"]]
    for row in rows:
        table.append(
            [
                row["name"],
                row["state"],
                format_progress(row.get("progress")),
                format_seconds(row.get("seconds")),
                _details(row),
            ]
        )
    if not any(line[4] for line in table[1:]):
        table = [line[:4] for line in table]
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)

"""The stage table: one row per stage with its state, progress and time, for people and scripts.

``stage_rows(plan document)`` reads a run's state from storage alone (manifests, leases, progress
records), so ``rectiflow status`` needs no Ray; :func:`render` formats rows as text.
"""

from __future__ import annotations

import time
from typing import Any

from workflows.lease import LEASE_FILE, Holder, is_stale
from workflows.stage import SUCCESS_FILE, read_progress
from workflows.storage import Location, location


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
    text = f"{done}/{total} {progress['unit']} ({100 * done / total:.0f}%) {progress['rate']:.1f}/s"
    if "loss" in progress:
        text += f" loss {progress['loss']:.4g}"
    return text


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a manifest that tell what a stage produced."""
    keys = ("kind", "hash", "steps", "final_loss", "examples_seen", "pairs", "nfe", "bytes", "shards_written",
            "shards_reused", "files")
    summary = {key: manifest[key] for key in keys if key in manifest}
    timing = manifest.get("time") or {}
    for key in ("wall_seconds", "cpu_seconds", "gpu_seconds", "finished_at"):
        if key in timing:
            summary[key] = timing[key]
    return summary


def stored_state(output: Location, now: float, lease_ttl: float = 60.0) -> tuple[str, dict[str, Any] | None]:
    """(state, manifest) of a stage from storage: done, running (a live lease), interrupted
    (work or a stale lease but no manifest) or not started."""
    names = set(output.list_names())
    if SUCCESS_FILE in names:
        return "done", output.join(SUCCESS_FILE).read_json()
    if LEASE_FILE in names:
        try:
            holder = Holder(**output.join(LEASE_FILE).read_json())
        except (FileNotFoundError, TypeError, ValueError):
            return "interrupted", None
        return ("interrupted" if is_stale(holder, lease_ttl, now) else "running"), None
    return ("interrupted" if names else "not started"), None


def stage_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage of a run's ``pipeline.json``: name, state, uri, progress, summary."""
    now = time.time()
    rows = []
    for stage in document["stages"]:
        output = location(stage["uri"])
        state, manifest = stored_state(output, now)
        row = {"name": stage["name"], "kind": stage["kind"], "state": state, "uri": stage["uri"], "hash": stage["hash"]}
        if manifest is not None:
            row["manifest"] = manifest_summary(manifest)
        elif state != "not started":
            row["progress"] = read_progress(output)
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: stage, state, progress, time."""
    table = [("stage", "state", "progress", "time")]
    for row in rows:
        seconds = row.get("seconds")
        if seconds is None and "manifest" in row:
            seconds = row["manifest"].get("wall_seconds")
        table.append((row["name"], row["state"], format_progress(row.get("progress")), format_seconds(seconds)))
    widths = [max(len(line[column]) for line in table) for column in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)

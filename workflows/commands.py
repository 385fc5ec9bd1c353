"""What each ``rectiflow`` command does (the argument parsing is in :mod:`workflows.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from workflows.config import config_warnings, load_pipeline
from workflows.lease import LeaseHeld
from workflows.plan import build_plan
from workflows.stage_table import format_seconds, render, stage_rows

if TYPE_CHECKING:
    from workflows.report.read import RunDocument

EXIT_OK, EXIT_FAILED = 0, 1
logger = logging.getLogger("rectiflow")


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, set inside Ray jobs); otherwise start a
    local Ray with at least 4 logical CPUs, so that Ray Data's own tasks find a slot beside the
    train and sampling workers even on a 2-core laptop. An ``address`` that disagrees with a set
    ``RAY_ADDRESS`` is a :class:`ConfigError` naming both."""
    import ray

    from workflows.jobs import checked_address

    if ray.is_initialized():
        return
    address = checked_address(address, ("RAY_ADDRESS",))
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        # address="local": a new Ray of our own, even where `ray start` left a cluster address file
        ray.init(
            address="local",
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


PROGRESS_INTERVAL_S = 30.0
"""Seconds between progress lines when stdout is not a terminal (a job's log, CI, a file)."""


def progress_line(name: str, progress: dict[str, Any] | None, seconds: float | None) -> str:
    """``train-2: 1200/2000 steps (60%), 35.2/s, ETA 0:23, loss 0.0123, 1:02 running``."""
    parts = [name]
    if progress and progress.get("total"):
        done, total, rate = progress["done"], progress["total"], float(progress.get("rate") or 0.0)
        parts.append(f"{done}/{total} {progress['unit']} ({100 * done / total:.0f}%)")
        parts.append(f"{rate:.3g}/s")
        if rate > 0 and done < total:
            parts.append(f"ETA {format_seconds((total - done) / rate)}")
        if "loss" in progress:
            parts.append(f"loss {progress['loss']:.4g}")
    if seconds is not None:
        parts.append(f"{format_seconds(seconds)} running")
    return parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")


def _live_table(pipeline: Any, finished: threading.Event, interval: float) -> None:
    """On a terminal, redraw the stage table every second. Elsewhere print the table on each
    change of state and, every ``interval`` seconds, one progress line per running stage."""
    interactive = sys.stdout.isatty()
    printed_lines, last, next_progress = 0, None, time.monotonic() + interval
    while not finished.wait(1.0 if interactive else 0.5):
        rows = _rows(pipeline)
        text = render(rows)
        if interactive:
            sys.stdout.write(f"\x1b[{printed_lines}F\x1b[J" if printed_lines else "")
            sys.stdout.write(text + "\n")
            printed_lines = text.count("\n") + 1
        else:
            states = [(row["name"], row["state"]) for row in rows]
            if states != last:
                print(text, flush=True)
                last = states
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + interval
                stamp = time.strftime("%H:%M:%S")
                for row in rows:
                    if row["state"] == "running":
                        print(f"[{stamp}] {progress_line(row['name'], row['progress'], row['seconds'])}", flush=True)
        sys.stdout.flush()
    print(render(_rows(pipeline)), flush=True)


def _rows(pipeline: Any) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {"name": name, "state": status.state, "progress": pipeline.progress(name), "seconds": status.elapsed(now)}
        for name, status in pipeline.statuses.items()
    ]


def run(args: argparse.Namespace) -> int:
    """Validate, plan, run or resume; print the live table and, at the end, the report."""
    from workflows.pipeline import PipelineFailed, PipelineRun
    from workflows.report import summary_table

    config = load_pipeline(args.pipeline, args.overrides, args.storage)
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    plan = build_plan(config)
    print(f"run {plan.run.uri} (configuration {plan.key}): {len(plan.stages)} stages", flush=True)
    connect_ray(args.address)
    # RECTIFLOW_LEASE_TTL_S: seconds without a heartbeat after which another run may take a stage's lease
    # over (default 60; the fault tests shorten it to pause a run past it)
    lease_ttl = float(os.environ.get("RECTIFLOW_LEASE_TTL_S", "60"))
    pipeline = PipelineRun(plan, wait_for_leases=not args.no_wait, lease_ttl=lease_ttl)
    finished = threading.Event()
    interval = float(getattr(args, "progress_interval", PROGRESS_INTERVAL_S))
    table = threading.Thread(target=_live_table, args=(pipeline, finished, interval), daemon=True)
    table.start()
    try:
        report = pipeline.run()
    except (PipelineFailed, LeaseHeld) as error:
        finished.set()
        table.join()
        print(f"rectiflow: {error}", file=sys.stderr)
        print(f"re-run the same command to resume: rectiflow run {shlex.quote(args.pipeline)} …", file=sys.stderr)
        return EXIT_FAILED
    finished.set()
    table.join()
    print()
    print(summary_table(plan.document_location))
    print()
    print(f"report: {plan.stages['report'].output.join(report.details['files']['html']).uri}")
    return EXIT_OK


def validate(args: argparse.Namespace) -> int:
    """Print the stages a run would have, with their locations, without running anything (and
    without importing Ray or torch)."""
    config = load_pipeline(args.pipeline, args.overrides, args.storage)
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    plan = build_plan(config)
    print(f"{args.pipeline} is valid: run {plan.run.uri} (configuration {plan.key})")
    for stage in plan.stages.values():
        needs = f" (needs {', '.join(stage.needs)})" if stage.needs and stage.kind != "report" else ""
        print(f"  {stage.name:<24} {stage.output.uri}{needs}")
    return EXIT_OK


def _run_document(run_uri: str) -> list[RunDocument]:
    """The configurations ``run_uri`` shows: the run document it names (``…/pipeline-{key}.json``),
    or every run document of a run folder, the most recently written first."""
    from workflows.report.read import is_document, read_document, run_documents

    if is_document(run_uri):
        return [read_document(run_uri)]
    documents = run_documents(run_uri)
    if not documents:
        raise FileNotFoundError(
            f"{run_uri} has no run document (pipeline-{{key}}.json): is it a run folder ({{storage}}/{{name}}), "
            "and did the run start?"
        )
    return documents


def _written(document: RunDocument) -> str | None:
    if document.written_at is None:
        return None
    return datetime.fromtimestamp(document.written_at, timezone.utc).isoformat(timespec="seconds")


def _configuration_line(document: RunDocument) -> str:
    written = _written(document)
    when = f", written {written}" if written else ""
    stages = len(document.stages)
    return f"configuration {document.key} ({document.location.name}{when}): {document.name}, {stages} stages"


def status(args: argparse.Namespace) -> int:
    """Each configuration's stage table (newest first), from storage alone."""
    try:
        documents = _run_document(args.run)
    except (FileNotFoundError, ValueError) as error:
        print(f"rectiflow: {error}", file=sys.stderr)
        return EXIT_FAILED
    configurations = [(document, stage_rows(document.stages)) for document in documents]
    if args.json:
        print(
            json.dumps(
                {
                    "run": documents[0].run.uri,
                    "configurations": [
                        {
                            "key": document.key,
                            "name": document.name,
                            "document": document.location.uri,
                            "written_at": _written(document),
                            "stages": rows,
                        }
                        for document, rows in configurations
                    ],
                },
                indent=1,
                default=str,
            )
        )
        return EXIT_OK
    print(f"run {documents[0].run.uri}")
    for document, rows in configurations:
        print()
        print(_configuration_line(document))
        print(render(rows))
    return EXIT_OK


def report(args: argparse.Namespace) -> int:
    """Rebuild the report of each configuration of a run from its stored results (nothing is
    recomputed), each into its own folder (:func:`workflows.report.report_folder`)."""
    from workflows.report import load_run, report_folder, write_files
    from workflows.report.tables import summary_text

    try:
        documents = _run_document(args.run)
    except (FileNotFoundError, ValueError) as error:
        print(f"rectiflow: {error}", file=sys.stderr)
        return EXIT_FAILED
    failed = False
    for document in documents:
        print(_configuration_line(document))
        try:
            results = load_run(document.location)
            files = write_files(results, report_folder(results))
        except (FileNotFoundError, ValueError) as error:
            print(f"rectiflow: configuration {document.key}: {error}", file=sys.stderr)
            failed = True
            continue
        print(summary_text(results))
        print(f"report: {files['html'].uri}")
        print()
    return EXIT_FAILED if failed else EXIT_OK

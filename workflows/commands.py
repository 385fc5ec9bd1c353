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
from pathlib import Path
from typing import Any

from workflows.config import load_pipeline
from workflows.lease import LeaseHeld
from workflows.plan import build_plan
from workflows.stage import PLAN_FILE
from workflows.stage_table import render, stage_rows
from workflows.storage import location

EXIT_OK, EXIT_FAILED = 0, 1
logger = logging.getLogger("rectiflow")


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, set inside Ray jobs); otherwise start a
    local Ray with at least 4 logical CPUs, so that Ray Data's own tasks find a slot beside the
    train and sampling workers even on a 2-core laptop."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        # address="local": a new Ray of our own, even where `ray start` left a cluster address file
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def _live_table(pipeline: Any, finished: threading.Event) -> None:
    """Redraw the stage table on a terminal; elsewhere print each change of state."""
    interactive = sys.stdout.isatty()
    printed_lines, last = 0, None
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
    plan = build_plan(config)
    print(f"run {plan.run.uri}: {len(plan.stages)} stages", flush=True)
    connect_ray(args.address)
    pipeline = PipelineRun(plan, wait_for_leases=not args.no_wait)
    finished = threading.Event()
    table = threading.Thread(target=_live_table, args=(pipeline, finished), daemon=True)
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
    print(summary_table(plan.run))
    print()
    print(f"report: {report['files']['html']}")
    return EXIT_OK


def validate(args: argparse.Namespace) -> int:
    """Print the stages a run would have, with their locations, without running anything."""
    plan = build_plan(load_pipeline(args.pipeline, args.overrides, args.storage))
    print(f"{args.pipeline} is valid: run {plan.run.uri}")
    for stage in plan.stages.values():
        needs = f" (needs {', '.join(stage.needs)})" if stage.needs else ""
        print(f"  {stage.name:<24} {stage.output.uri}{needs}")
    return EXIT_OK


def _run_document(run_uri: str) -> dict[str, Any]:
    plan_file = location(run_uri).join(PLAN_FILE)
    if not plan_file.exists():
        raise FileNotFoundError(f"{run_uri} has no {PLAN_FILE}: is it a run folder ({{storage}}/{{name}})?")
    return plan_file.read_json()


def status(args: argparse.Namespace) -> int:
    """The stage table of a run, from storage alone."""
    try:
        document = _run_document(args.run)
    except FileNotFoundError as error:
        print(f"rectiflow: {error}", file=sys.stderr)
        return EXIT_FAILED
    rows = stage_rows(document)
    if args.json:
        print(json.dumps({"run": document["run"], "name": document["name"], "stages": rows}, indent=1, default=str))
    else:
        print(f"run {document['run']}")
        print(render(rows))
    return EXIT_OK


def report(args: argparse.Namespace) -> int:
    """Rebuild a run's report from its stored results (nothing is recomputed)."""
    from workflows.report import summary_table, write_report

    try:
        document = _run_document(args.run)
    except FileNotFoundError as error:
        print(f"rectiflow: {error}", file=sys.stderr)
        return EXIT_FAILED
    files = write_report(location(document["run"]))
    print(summary_table(location(document["run"])))
    print(f"report: {files['html']}")
    return EXIT_OK


def _jobs_client(address: str) -> Any:
    """A Ray Jobs client (token mode is set up by :func:`workflows.cli.main`)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _entrypoint(args: argparse.Namespace, working_dir: Path) -> str:
    pipeline = Path(args.pipeline).resolve()
    try:
        relative = pipeline.relative_to(working_dir)
    except ValueError:
        raise SystemExit(f"rectiflow: {args.pipeline} is not inside the working dir {working_dir}; "
                         "pass --working-dir or move the file") from None
    parts = ["rectiflow", "run", str(relative)]
    if args.storage:
        parts += ["--storage", args.storage]
    for assignment in args.overrides:
        parts += ["--set", assignment]
    return shlex.join(parts)


def submit(args: argparse.Namespace) -> int:
    """Submit ``rectiflow run`` as a Ray job; print its id, and follow it unless --no-wait."""
    from ray.job_submission import JobStatus

    load_pipeline(args.pipeline, args.overrides, args.storage)  # fail here, not on the cluster
    working_dir = Path(args.working_dir).resolve()
    client = _jobs_client(args.address)
    job_id = _submit_with_retry(
        client,
        entrypoint=_entrypoint(args, working_dir),
        runtime_env={"working_dir": str(working_dir), "excludes": [".venv", ".git", "runs", "**/__pycache__"]},
    )
    print(f"submitted job {job_id} to {args.address}", flush=True)
    if args.no_wait:
        print(f"follow it with: rectiflow logs {job_id} --address {args.address} --follow")
        return EXIT_OK
    _follow(client, job_id)
    final = client.get_job_status(job_id)
    print(f"job {job_id}: {final.value}")
    return EXIT_OK if final == JobStatus.SUCCEEDED else EXIT_FAILED


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


def _follow(client: Any, job_id: str) -> None:
    """Print the job's logs as they come until it ends."""
    from ray.job_submission import JobStatus

    printed = 0
    while True:
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if client.get_job_status(job_id) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            logs = client.get_job_logs(job_id)
            sys.stdout.write(logs[printed:])
            return
        time.sleep(1.0)


def logs(args: argparse.Namespace) -> int:
    """Print a submitted job's logs (following them with --follow)."""
    client = _jobs_client(args.address)
    if args.follow:
        _follow(client, args.job_id)
    else:
        sys.stdout.write(client.get_job_logs(args.job_id))
    return EXIT_OK

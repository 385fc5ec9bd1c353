"""The pipeline on a real local Ray: end to end on S3, re-runs, config changes, leases, and the
`rectiflow` command line (a killed driver: tests/faults/test_driver.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.workflows.pipeline_helpers import TINY, metrics_of, rectiflow, stage_times
from workflows.config import load_pipeline
from workflows.lease import Lease
from workflows.manifest import SUCCESS_FILE
from workflows.pipeline import CACHED, DONE, PipelineRun
from workflows.plan import build_plan


@pytest.fixture(scope="module")
def clean_run(ray_session, s3_endpoint):
    """The tiny pipeline run once, uninterrupted, with storage on the moto S3 endpoint."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="pipeline-clean")
    plan = build_plan(load_pipeline(TINY, storage="s3://pipeline-clean/runs"))
    pipeline = PipelineRun(plan)
    report = pipeline.run()
    return plan, pipeline, report


def test_the_toy_pipeline_runs_end_to_end_on_s3(clean_run):
    plan, pipeline, report = clean_run
    assert [status.state for status in pipeline.statuses.values()] == [DONE] * len(plan.stages)
    assert list(plan.stages) == [
        "train-1",
        "couple-1",
        "train-2",
        "couple-2",
        "distill-2",
        "eval-train-1",
        "eval-train-2",
        "eval-distill-2",
        "report",
    ]
    for stage in plan.stages.values():
        assert stage.output.join(SUCCESS_FILE).exists(), stage.name
        assert stage.output.uri.startswith("s3://pipeline-clean/runs/tiny/")
    html = plan.stages["report"].output.join(report.details["files"]["html"])
    assert html.exists() and b"<table" in html.read_bytes()
    document = plan.document_location.read_json()
    assert [s["name"] for s in document["stages"]] == list(plan.stages) and document["key"] == plan.key


def test_a_rerun_skips_every_finished_stage(clean_run):
    plan, _, _ = clean_run
    before = stage_times(plan)
    again = PipelineRun(build_plan(load_pipeline(TINY, storage="s3://pipeline-clean/runs")))
    again.run()
    assert {status.state for status in again.statuses.values()} == {CACHED}
    assert stage_times(plan) == before


def test_a_config_change_reruns_only_what_it_touches(clean_run):
    plan, _, _ = clean_run
    changed = build_plan(load_pipeline(TINY, ["distill.0.train.steps=30"], storage="s3://pipeline-clean/runs"))
    pipeline = PipelineRun(changed)
    pipeline.run()
    ran = sorted(name for name, status in pipeline.statuses.items() if status.state == DONE)
    assert ran == ["distill-2", "eval-distill-2", "report"]
    for name in ("train-1", "couple-1", "train-2", "couple-2", "eval-train-1", "eval-train-2"):
        assert changed.stages[name].output == plan.stages[name].output


def test_a_held_lease_is_reported_and_a_dead_one_taken_over(ray_session, tmp_path):
    plan = build_plan(load_pipeline(TINY, storage=str(tmp_path / "runs")))
    holder = Lease(plan.stages["train-1"].output, "someone-else", ttl=600)
    holder.acquire()
    try:
        result = rectiflow("run", TINY, "--storage", str(tmp_path / "runs"), "--no-wait")
    finally:
        holder.release()
    assert result.returncode == 1
    assert "is held by run someone-else" in result.stderr


def test_status_reads_storage_alone(clean_run):
    plan, _, _ = clean_run
    result = rectiflow("status", plan.run.uri, "--json", env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert result.returncode == 0, result.stderr
    configurations = json.loads(result.stdout)["configurations"]
    assert [c["key"] for c in configurations][-1] == plan.key  # the first of the module's configurations
    stages = next(c for c in configurations if c["key"] == plan.key)["stages"]
    assert [(s["name"], s["state"]) for s in stages] == [(name, "done") for name in plan.stages]
    train = stages[0]["manifest"]
    assert train["kind"] == "train" and train["steps"] == 60 and train["wall_seconds"] > 0
    assert "60 steps" in train["summary"]
    table = rectiflow("status", plan.run.uri)
    assert "couple-2" in table.stdout and "done" in table.stdout


def test_the_report_is_rebuilt_from_storage_with_the_same_numbers(clean_run):
    plan, _, _ = clean_run
    before = metrics_of(plan)
    result = rectiflow("report", plan.run.uri)
    assert result.returncode == 0, result.stderr
    pd.testing.assert_frame_equal(metrics_of(plan), before)


def test_validate_and_bad_files_on_the_command_line(tmp_path):
    result = rectiflow("validate", TINY, "--storage", str(tmp_path))
    assert result.returncode == 0 and "couple-2" in result.stdout
    assert not os.listdir(tmp_path)
    bad = rectiflow("validate", TINY, "--set", "rounds=0")
    assert bad.returncode == 2 and "rounds: Input should be greater than or equal to 1" in bad.stderr
    missing = rectiflow("status", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "has no run document" in missing.stderr


def test_the_package_installs_the_command():
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "rectiflow"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "submit" in result.stdout


def test_the_python_api_runs_inside_an_existing_ray_job(ray_session, tmp_path):
    """``import rectiflow``: validate a mapping, plan, and run on the Ray the caller connected,
    without touching the caller's Ray Data context."""
    import yaml
    from ray.data import DataContext

    import rectiflow
    from tests.workflows.pipeline_helpers import ONE_ROUND
    from workflows.config import ConfigError

    with open(TINY) as handle:
        document = yaml.safe_load(handle)
    with pytest.raises(ConfigError, match="rounds: Input should be greater than or equal to 1"):
        rectiflow.validate({**document, "rounds": 0})
    plan = rectiflow.plan(document, overrides=ONE_ROUND, storage=str(tmp_path / "runs"))
    assert list(plan.stages) == ["train-1", "eval-train-1", "report"]
    context = DataContext.get_current()
    before = (context.enable_progress_bars, context.raise_original_map_exception)
    manifest = rectiflow.run(plan)
    assert manifest.kind == "report" and manifest.hash == plan.stages["report"].hash
    assert (context.enable_progress_bars, context.raise_original_map_exception) == before
    assert rectiflow.run(document, ONE_ROUND, str(tmp_path / "runs")) == manifest  # finished: nothing re-runs


def test_progress_lines_name_rate_eta_and_loss():
    from workflows.commands import progress_line

    line = progress_line("train-2", {"done": 1200, "total": 2000, "unit": "steps", "rate": 40.0, "loss": 0.0123}, 62.0)
    assert line == "train-2: 1200/2000 steps (60%), 40/s, ETA 0:20, loss 0.0123, 1:02 running"
    assert progress_line("couple-1", None, None) == "couple-1"


def test_a_stage_that_lost_ray_processes_runs_again_and_any_other_error_fails_it(tmp_path, monkeypatch):
    """Ray losing an actor or a node (e.g. Ray Data's pool when a worker node dies) re-runs the
    stage under its lease, up to STAGE_RETRIES times; an ordinary error fails it at once."""
    import ray.exceptions

    from workflows import pipeline
    from workflows.pipeline import STAGE_RETRIES, PipelineFailed, lost_to_ray

    assert lost_to_ray(ray.exceptions.ActorUnschedulableError("gone"))
    try:
        try:
            raise ray.exceptions.NodeDiedError("node")
        except ray.exceptions.NodeDiedError as cause:
            raise RuntimeError("a stage wrapped it") from cause
    except RuntimeError as wrapped:
        assert lost_to_ray(wrapped)
    assert not lost_to_ray(ValueError("a bad shard"))

    plan = build_plan(load_pipeline(TINY, ["rounds=1", "distill=[]"], storage=str(tmp_path / "runs")))
    calls: list[str] = []

    def flaky(errors):
        def run(config, inputs, output):
            calls.append(output.name)
            if errors:
                raise errors.pop(0)
            output.join(SUCCESS_FILE).write_json({"fake": True})

        return run

    lost = [ray.exceptions.ActorUnschedulableError(f"node {i}") for i in range(STAGE_RETRIES)]
    monkeypatch.setattr(pipeline, "stage_function", lambda kind: flaky(lost if kind == "train" else []))
    monkeypatch.setattr(pipeline, "read_manifest", lambda output: None)
    PipelineRun(plan).run()
    assert calls.count(plan.stages["train-1"].output.name) == STAGE_RETRIES + 1

    plan = build_plan(load_pipeline(TINY, ["rounds=1", "distill=[]"], storage=str(tmp_path / "other")))
    calls.clear()
    wrong = [ValueError("a bad shard")]
    monkeypatch.setattr(pipeline, "stage_function", lambda kind: flaky(wrong if kind == "train" else []))
    with pytest.raises(PipelineFailed, match="a bad shard"):
        PipelineRun(plan).run()
    assert calls == [plan.stages["train-1"].output.name]  # not retried; its dependents never ran

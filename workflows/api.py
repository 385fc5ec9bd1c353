"""The Python API, for teams that drive Ray themselves (re-exported as ``import rectiflow``).

    import rectiflow
    config = rectiflow.validate("configs/toy2d.yaml", overrides=["train.steps=500"])
    plan = rectiflow.plan({"name": "toy", "pi0": …, …}, storage="s3://bucket/runs")
    manifest = rectiflow.run(plan)          # inside your Ray job: uses the Ray already connected

Nothing here has global side effects on the caller's process: no ``ray.init`` when Ray is already
initialised (and, when it is not, ``run`` starts a local Ray only if asked to), no logging
configuration, no change to Ray Data's context. The CLI is a thin layer over the same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workflows.config import config_warnings, load_pipeline, parse_pipeline
from workflows.manifest import Manifest
from workflows.plan import Plan, build_plan
from workflows.settings import PipelineConfig

Source = str | Path | dict[str, Any] | PipelineConfig


def validate(source: Source, overrides: list[str] = (), storage: str | None = None) -> PipelineConfig:
    """The validated pipeline of a YAML file, a parsed mapping, or a config (``overrides``:
    ``key=value`` strings as ``--set`` takes them); :class:`workflows.config.ConfigError` with
    one line per problem otherwise."""
    if isinstance(source, PipelineConfig):
        source = source.model_dump(mode="json")
    if isinstance(source, dict):
        extra = [f"storage={storage}"] if storage else []
        return parse_pipeline(source, [*overrides, *extra], source="pipeline")
    return load_pipeline(source, list(overrides), storage)


def plan(source: Source | Plan, overrides: list[str] = (), storage: str | None = None) -> Plan:
    """The stages the pipeline would run, with their hashes and output locations (no I/O)."""
    return source if isinstance(source, Plan) else build_plan(validate(source, overrides, storage))


def warnings(source: Source) -> list[str]:
    """What is valid but probably not meant (e.g. GPU micro-batches that are too small)."""
    return config_warnings(validate(source))


def run(
    source: Source | Plan,
    overrides: list[str] = (),
    storage: str | None = None,
    *,
    wait_for_leases: bool = True,
    start_local_ray: bool = False,
) -> Manifest:
    """Run or resume the pipeline on the Ray this process is connected to; returns the report
    stage's manifest. Raises :class:`workflows.pipeline.PipelineFailed` naming every failed
    stage. Without an initialised Ray it refuses, unless ``start_local_ray`` (then it starts one
    as ``rectiflow run`` does)."""
    import ray

    from workflows.pipeline import PipelineRun

    if not ray.is_initialized():
        if not start_local_ray:
            raise RuntimeError("rectiflow.run needs Ray: call ray.init(...) first, or pass start_local_ray=True")
        from workflows.commands import connect_ray

        connect_ray(None)
    return PipelineRun(plan(source, overrides, storage), wait_for_leases=wait_for_leases).run()

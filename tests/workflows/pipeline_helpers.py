"""Running the `rectiflow` command in a subprocess, and fingerprints of finished stages."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pandas as pd

from workflows.manifest import SUCCESS_FILE, read_manifest

TINY = os.path.join(os.path.dirname(__file__), "data", "tiny.yaml")
RECTIFLOW = os.path.join(os.path.dirname(sys.executable), "rectiflow")
ONE_ROUND = [
    "rounds=1",
    "distill=[]",
    "train.steps=10",
    "train.checkpoint_every=5",
    "evaluate.samplers=[euler@1]",
    "evaluate.samples=32",
    "evaluate.ot_samples=16",
    "evaluate.trajectories=2",
]
"""tiny.yaml cut to one short round (train-1, its evaluation on Ray Data, the report): every kind
of stage that writes, quickly."""
SMALL = [
    "distill=[]",
    "train.steps=40",
    "train.checkpoint_every=10",
    "couple.pairs=256",
    "couple.shard_size=32",
    "evaluate.samplers=[euler@1]",
    "evaluate.samples=64",
    "evaluate.ot_samples=32",
    "evaluate.trajectories=2",
]
"""tiny.yaml without distillation (so: train-1, couple-1, train-2, two evaluations, the report), 40 steps,
8 shards of 32 pairs, one sampler: the pipeline the fault tests kill and resume."""


def set_arguments(overrides: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` → ``["--set", "a=1", "--set", "b=2"]``."""
    return [arg for item in overrides for arg in ("--set", item)]


def rectiflow(
    *args: str,
    background: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    cwd: str | None = None,
):
    """Run ``rectiflow ARGS``; in the background it gets its own process group (so that killing
    the group takes the local Ray it starts with it)."""
    environment = {**os.environ, **(env or {})}
    command = [RECTIFLOW, *args]
    if background:
        return subprocess.Popen(
            command,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
        )
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def stage_times(plan, names=None) -> dict[str, str]:
    """A fingerprint of each finished stage's manifest (any re-run rewrites it with new times)."""
    names = list(plan.stages) if names is None else names
    return {
        name: hashlib.sha256(plan.stages[name].output.join(SUCCESS_FILE).read_bytes()).hexdigest() for name in names
    }


TIMING = ("wall_seconds", "cpu_seconds", "gpu_seconds")


def metrics_of(plan) -> pd.DataFrame:
    """All evaluation rows of a run without the timing columns, in a fixed order."""
    report = plan.stages["report"].output
    metrics = report.join(read_manifest(report).details["files"]["metrics"])
    frame = pd.read_parquet(
        metrics.path if metrics.is_local else metrics.uri, filesystem=None if metrics.is_local else metrics.fs
    )
    frame = frame.drop(columns=[c for c in frame.columns if c in TIMING])
    return frame.sort_values(["model", "sampler"]).reset_index(drop=True)

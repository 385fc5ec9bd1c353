"""Distillation versus reflow (the talk's lesson) on the toy mixture: a one-step model distilled
from random pairs can at best learn E[X1 | X0] and collapses toward the conditional mean, while
one distilled from 1-RF's deterministic pairs reproduces them."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workflows.config import load_pipeline
from workflows.manifest import read_manifest
from workflows.pipeline import PipelineRun
from workflows.plan import build_plan
from workflows.report import load_run

CONFIG = os.path.join(os.path.dirname(__file__), "data", "distill.yaml")


def _one_step(evaluation) -> tuple[float, np.ndarray]:
    """W2 to π1 of the euler@1 row and its samples Z1."""
    samples = evaluation.samples.filter(pc.equal(evaluation.samples["sampler"], "euler@1"))
    points = samples["x1"].combine_chunks().flatten().to_numpy().reshape(-1, 2)
    return evaluation.row_of("euler@1")["w2"], points


def test_random_pairs_collapse_and_reflow_pairs_do_not(ray_session, tmp_path):
    plan = build_plan(load_pipeline(CONFIG, storage=str(tmp_path / "runs")))
    PipelineRun(plan).run()
    evaluations = {e.stage.name: e for e in load_run(plan.document_location).evaluations}
    w2_flow, _ = _one_step(evaluations["eval-train-1"])
    w2_reflow, reflow = _one_step(evaluations["eval-distill-1"])
    w2_random, random = _one_step(evaluations["eval-distill-1-random"])

    # π1 puts a third of its mass at each of y = -6, 0, 6: its y-variance is 24 + 1 = 25.
    # E[X1 | X0] does not depend on X0 for independent pairs, so the random-pair model maps
    # every Z0 near the mean (10, 0); the reflow-pair model keeps the three modes.
    assert np.var(random[:, 1]) < 0.2 * 25, np.var(random[:, 1])
    assert np.var(reflow[:, 1]) > 0.6 * 25, np.var(reflow[:, 1])
    assert w2_reflow < 0.5 * w2_random, (w2_reflow, w2_random)
    assert w2_reflow < w2_flow, (w2_reflow, w2_flow)

    report = plan.stages["report"].output
    files = read_manifest(report).details["files"]
    assert report.join(files["html"]).parent.join("figure-one-step.png").exists()
    metrics = pq.read_table(report.join(files["metrics"]).path)
    assert {"distill-1", "distill-1-random"} <= set(pc.unique(metrics["model"]).to_pylist())

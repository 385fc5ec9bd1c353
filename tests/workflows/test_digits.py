"""The real-image demo at a reduced size: scikit-learn's digits imported by the pipeline, a small
UNet through 1-RF → couplings → 2-RF → one-step distillation, evaluated in a digit classifier's
feature space; and the unpaired transfer config between two digit domains."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.compute as pc

from workflows.config import load_pipeline
from workflows.images import ImageDataset
from workflows.images.builtin import digits_array
from workflows.manifest import read_manifest
from workflows.pipeline import PipelineRun
from workflows.plan import build_plan
from workflows.report import load_run

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
SMALL = [
    "model.config.base_channels=8",
    "model.config.channel_mult=[1, 2]",
    "train.steps=40",
    "train.batch_size=32",
    "train.checkpoint_every=20",
    "train.log_every=20",
    "round_train={}",
    "couple.pairs=256",
    "couple.shard_size=128",
    "couple.solver=euler@8",
    "couple.batch_size=128",
    "couple.forward_batch=128",
    "evaluate.samples=128",
    "evaluate.ot_samples=64",
    "evaluate.samplers=[euler@1, euler@8]",
    "evaluate.reference_solver=euler@8",
    "evaluate.classifier.steps=60",
]


def report_file(plan, name: str):
    """A file the report stage wrote (in its attempt folder)."""
    report = plan.stages["report"].output
    return report.join(read_manifest(report).details["files"]["html"]).parent.join(name)


def _rows(evaluation) -> dict[str, dict]:
    return {row["sampler"]: row for row in evaluation.rows()}


def test_the_digits_pipeline_at_a_reduced_size(ray_session, tmp_path):
    plan = build_plan(
        load_pipeline(
            os.path.join(CONFIGS, "digits.yaml"), [*SMALL, "distill.0.train.steps=40"], storage=str(tmp_path / "runs")
        )
    )
    PipelineRun(plan).run()

    dataset = ImageDataset.open(plan.stages["import-pi1"].output.uri)
    images, labels = digits_array()
    assert dataset.count == len(images) == 1797 and tuple(dataset.shape) == (1, 16, 16)
    np.testing.assert_array_equal(dataset.labels(), labels)
    evaluations = {e.stage.name: e for e in load_run(plan.document_location).evaluations}
    assert set(evaluations) == {"eval-train-1", "eval-train-2", "eval-distill-2"}
    first, second = _rows(evaluations["eval-train-1"]), _rows(evaluations["eval-train-2"])
    for rows in (first, second):
        for row in rows.values():
            assert np.isfinite(row["fd_classifier"]) and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
            assert np.isnan(row["crossing_pct"])
    # 2-RF learns 1-RF's coupling, which is straighter than its own flow: its one step lands
    # closer to its fine solve than 1-RF's one step does.
    assert second["euler@1"]["one_step_distance"] < first["euler@1"]["one_step_distance"]
    features = evaluations["eval-train-1"].details["features"]
    assert features["classifier"]["hash"] == plan.stages["classifier"].hash
    assert report_file(plan, "figure-image-samples.png").exists()


def test_the_transfer_config_at_a_reduced_size(ray_session, tmp_path):
    plan = build_plan(
        load_pipeline(os.path.join(CONFIGS, "digits_transfer.yaml"), SMALL, storage=str(tmp_path / "runs"))
    )
    PipelineRun(plan).run()
    evaluation = {e.stage.name: e for e in load_run(plan.document_location).evaluations}["eval-train-2"]
    # Z0 are the digits 0-4 (pixels in [-1, 1]), not noise
    samples = evaluation.samples.filter(pc.equal(evaluation.samples["sampler"], "euler@8"))
    x0 = samples["x0"].combine_chunks().flatten().to_numpy()
    assert x0.min() >= -1.0 and x0.max() <= 1.0 and (x0 == -1.0).mean() > 0.2
    assert report_file(plan, "figure-image-samples.png").exists()

"""configs/digits_table.yaml — the paper's CIFAR-10 table on the digits — at a tiny size: every
stage it plans (3 reflow rounds, the VP and sub-VP baselines, five one-step distillations, the
classifier, ten evaluations, the report) runs, and the report's table has the paper's rows and
columns."""

from __future__ import annotations

import os

import numpy as np

from tests.workflows.test_digits import report_file
from workflows.config import load_pipeline
from workflows.pipeline import PipelineRun
from workflows.plan import build_plan
from workflows.report import load_run
from workflows.report.paper import method_table

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "digits_table.yaml")
SDE = "sde@16"
TINY = [
    "model.config.base_channels=8",
    "model.config.channel_mult=[1, 2]",
    "train.steps=20",
    "train.batch_size=32",
    "train.warmup_steps=5",
    "train.checkpoint_every=20",
    "train.log_every=10",
    "round_train={}",
    *(f"distill.{i}.train.steps=20" for i in range(5)),
    "couple.pairs=128",
    "couple.shard_size=128",
    "couple.solver=euler@4",
    "couple.workers=1",
    "couple.batch_size=128",
    "couple.forward_batch=128",
    "evaluate.samples=64",
    "evaluate.ot_samples=64",
    "evaluate.forward_batch=64",
    f"evaluate.samplers=[euler@1, rk45@0.1, {SDE}]",
    "evaluate.reference_solver=rk45@0.1",
    "evaluate.classifier.steps=30",
]
FLOWS = ["1-RF", "2-RF", "3-RF", "VP ODE", "sub-VP ODE"]
ONE_STEP, RK45, STOCHASTIC = (
    "One-step generation (Euler N = 1)",
    "Full simulation (RK45, rk45@0.1)",
    "Full simulation (Euler–Maruyama N = 16)",
)


def test_the_digits_table_config_at_a_tiny_size(ray_session, tmp_path):
    config = load_pipeline(CONFIG, storage=str(tmp_path / "runs"))
    assert config.rounds == 3 and config.baselines == ["vp", "subvp"] and config.evaluate.samples == 500
    assert [(d.from_round, d.from_baseline, d.k) for d in config.distill] == [
        (1, None, 1),
        (2, None, 1),
        (3, None, 1),
        (None, "vp", 1),
        (None, "subvp", 1),
    ]
    assert config.evaluate.samplers == ["euler@1", "rk45@0.001", "sde@500"] and config.evaluate.classifier

    plan = build_plan(load_pipeline(CONFIG, TINY, storage=str(tmp_path / "runs")))
    PipelineRun(plan).run()
    results = load_run(plan.document_location)
    evaluations = {e.stage.name: e for e in results.evaluations}
    assert len(evaluations) == 10 and not results.unfinished
    for name, evaluation in evaluations.items():
        samplers = [row["sampler"] for row in evaluation.rows()]
        independent = name in ("eval-train-1", "eval-train-vp", "eval-train-subvp")
        assert samplers == ["euler@1", "rk45@0.1", *([SDE] if independent else [])], (name, samplers)
        for row in evaluation.rows():
            assert np.isfinite(row["fd_classifier"]) and 1.0 <= row["is_classifier"] <= 10.0
            assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1

    table = method_table(results)
    assert table.header == ["method", "NFE", "IS (classifier)", "FD (classifier)", "precision", "recall"]
    assert [row[0] for row in table.rows] == [
        ONE_STEP,
        *(f"{flow} (+Distill)" for flow in FLOWS),
        RK45,
        *FLOWS,
        STOCHASTIC,
        "VP SDE",
        "sub-VP SDE",
    ]
    assert [len(row) for row in table.rows] == [1, *[6] * 5, 1, *[6] * 5, 1, 6, 6]  # 15 rows × 6 columns
    for row in table.rows[1:6]:  # one step: NFE 1, every score with its distilled value in parentheses
        assert row[1] == "1" and all(cell.count("(") == 1 and cell.endswith(")") for cell in row[2:])
    assert all(row[1] == "16" for row in table.rows[-2:])

    markdown = report_file(plan, "report.md").read_bytes().decode()
    assert "## The paper's table: one-step generation and full simulation" in markdown
    assert f"| **{ONE_STEP}** | | | | | |" in markdown and "| VP SDE | 16 |" in markdown

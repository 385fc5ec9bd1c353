"""configs/toy2d_paths.yaml — "straight paths matter" — at a reduced size: 1-RF, VP ODE, sub-VP ODE
and constant-speed VP ODE trained on the same 2D toy, each sampled with Euler N = 1, 2, 5, 100;
the report's grid has a row per path and a column per N, with its samples figure."""

from __future__ import annotations

import os

from tests.workflows.test_digits import report_file
from workflows.config import load_pipeline
from workflows.pipeline import PipelineRun
from workflows.plan import build_plan
from workflows.report import load_run
from workflows.report.paper import paths_grid

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "toy2d_paths.yaml")
SMALL = [
    "model.config.width=64",
    "model.config.depth=2",
    "train.steps=300",
    "train.warmup_steps=20",
    "train.checkpoint_every=300",
    "train.log_every=100",
    "evaluate.samples=256",
    "evaluate.ot_samples=256",
    "evaluate.trajectories=8",
    "evaluate.samplers=[euler@1, euler@2, euler@5, euler@100, rk45@1e-3]",
    "evaluate.reference_solver=rk45@1e-3",
]
PATHS = ["rectified flow, straight path (1-RF)", "VP ODE", "sub-VP ODE", "VP ODE (constant speed)"]


def test_the_paths_config_at_a_reduced_size(ray_session, tmp_path):
    config = load_pipeline(CONFIG, storage=str(tmp_path / "runs"))
    assert config.pi0.kind == "noise" and config.rounds == 1 and config.baselines == ["vp", "subvp", "vp_const"]
    assert config.evaluate.samplers[:4] == ["euler@1", "euler@2", "euler@5", "euler@100"]

    plan = build_plan(load_pipeline(CONFIG, SMALL, storage=str(tmp_path / "runs")))
    PipelineRun(plan).run()
    results = load_run(plan.document_location)
    grid = paths_grid(results)
    assert grid.header == ["path", "Euler N = 1", "Euler N = 2", "Euler N = 5", "Euler N = 100"]
    assert [row[0] for row in grid.rows] == PATHS and all(len(row) == 5 for row in grid.rows)  # 4 paths × 4 N

    distance = {e.subject["path"]: e.row_of("euler@1")["one_step_distance"] for e in results.evaluations}
    # One Euler step from t = 0 moves a VP / sub-VP sample by v(x, 0) ≈ α̇_0·E[X1 | x] with
    # α̇_0 = α_0(a + b)/2 ≈ 0.066: it stays near the noise, far from where the path's own ODE
    # ends (π1 is about 10 away); the straight path's step goes to E[X1 | X0], the mean of π1.
    assert distance["straight"] < min(distance["vp"], distance["subvp"]), distance

    markdown = report_file(plan, "report.md").read_bytes().decode()
    assert "## Straight paths matter" in markdown and "](figure-straight-paths.png)" in markdown
    assert report_file(plan, "figure-straight-paths.png").exists()

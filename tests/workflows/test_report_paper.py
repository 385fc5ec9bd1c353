"""The paper's layouts in the report, on fabricated runs (evaluation files and manifests in the
stages' formats): Table 1 — one-step rows with the "+Distill" value in parentheses, RK45 rows,
the baselines' Euler–Maruyama rows — and the straight-paths grid; rows and columns only for
what a run has."""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import pyarrow as pa
import pytest

from tests.workflows.test_report import RunBuilder, finish_training
from workflows.eval_files import (
    INDEPENDENT,
    METRICS_FILE,
    METRICS_SCHEMA,
    QUALITY_COLUMNS,
    SAMPLES_FILE,
    TRAJECTORIES_FILE,
    table_bytes,
    vectors,
)
from workflows.report import load_run, number, write_report
from workflows.report.paper import method_table, paths_grid
from workflows.report.render import markdown_text
from workflows.storage import Location, location

RK45 = "rk45@0.001"
SDE = "sde@2000"
ONE_STEP_HEADING = "One-step generation (Euler N = 1)"
RK45_HEADING = f"Full simulation (RK45, {RK45})"
SDE_HEADING = "Full simulation (Euler–Maruyama N = 2000)"
LABELS = {"vp": "VP ODE", "subvp": "sub-VP ODE", "vp_const": "VP ODE (constant speed)"}


def _nfe(sampler: str, model: str) -> float:
    """Euler N: N; RK45: a model-dependent mean; SDE: N."""
    if sampler.startswith("rk45@"):
        return 40.0 + len(model) + 0.25
    return float(sampler.split("@")[1].split(":")[0])


def quality(model: str, sampler: str, image: bool) -> dict[str, float]:
    """Distinct, recognisable scores per (model, sampler)."""
    seed = int(hashlib.sha256(f"{model}/{sampler}".encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    values = {"w2": float(rng.uniform(0.1, 9)), "mmd2": float(rng.uniform(0, 0.1))}
    if image:
        values |= {
            "fd_classifier": float(rng.uniform(1, 400)),
            "is_classifier": float(rng.uniform(1, 10)),
            "precision": float(rng.uniform(0, 1)),
            "recall": float(rng.uniform(0, 1)),
        }
    return values


def finish_evaluation(
    b: RunBuilder, name: str, subject: dict, samplers: list[str], dim: int, reference: str
) -> list[dict]:
    """An evaluation stage's files and manifest: one row per sampler for ``subject`` (a dict of
    :class:`workflows.settings.EvalSubject`'s fields), ``dim``-dimensional samples."""
    model, image = subject["name"], dim != 2
    rows = []
    for sampler in samplers:
        rows.append(
            {
                **dict.fromkeys(QUALITY_COLUMNS, math.nan),
                "model": model,
                "label": subject["label"],
                "family": subject["family"],
                "round": subject.get("round"),
                "k": subject.get("k"),
                "path": subject.get("path", "straight"),
                "sampler": sampler,
                "nfe_mean": _nfe(sampler, model),
                "nfe_max": int(_nfe(sampler, model)) + 3,
                "straightness": 0.1,
                "transport_cost": 20.0,
                "pairing_ratio": 1.0,
                "crossing_pct": math.nan if image else 1.0,
                **quality(model, sampler, image),
                "one_step_distance": 1.0 / _nfe(sampler, model),
                "wall_seconds": 1.0,
                "cpu_seconds": 1.0,
                "gpu_seconds": 0.0,
                "samples": 64,
                "ot_samples": 32,
                "seed": 7,
                "model_hash": b.stages[model]["hash"],
            }
        )
    rng, shown = np.random.default_rng(len(model)), 16
    names = [INDEPENDENT, *samplers]
    tables = {
        METRICS_FILE: pa.Table.from_pylist(rows, schema=METRICS_SCHEMA),
        SAMPLES_FILE: pa.table(
            {
                "sampler": pa.array([s for s in names for _ in range(shown)], pa.string()),
                "id": pa.array(np.tile(np.arange(shown, dtype=np.int64), len(names))),
                "x0": vectors(rng.normal(size=(shown * len(names), dim))),
                "x1": vectors(rng.normal(size=(shown * len(names), dim))),
            }
        ),
        TRAJECTORIES_FILE: pa.table(
            {
                "sampler": pa.array([], pa.string()),
                "id": pa.array([], pa.int64()),
                "step": pa.array([], pa.int64()),
                "t": pa.array([], pa.float32()),
                "x": vectors(np.zeros((0, dim))),
            }
        ),
    }
    folder, files = b.folder(name), {}
    for file, table in tables.items():
        data = table_bytes(table)
        folder.join("attempt-1", file).write_bytes(data)
        files[file] = {"path": f"attempt-1/{file}", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    full_subject = {"round": None, "k": None, "path": "straight", "teacher": None, **subject}
    b.finish(
        name,
        {
            "summary": f"{subject['label']}: 64 samples",
            "subject": full_subject,
            "rows": rows,
            "independent": {"crossing_pct": 46.0, "transport_cost": 22.0, "pairing_ratio": 1.08},
            "files": files,
            "features": {},
            "solvers": samplers,
            "skipped_samplers": {},
        },
    )
    return rows


class Fabricated:
    """A run planned like :mod:`workflows.plan` (k-RF rounds, baselines, distillations, an
    evaluation per model), with a chosen set of its evaluations finished."""

    def __init__(
        self,
        run: Location,
        rounds: int,
        baselines: list[str],
        distill: list[str],
        dim: int,
        samplers: list[str],
        random_distill: bool = False,
    ):
        self.b, self.dim, self.samplers = RunBuilder(run, "paper"), dim, samplers
        self.subjects: dict[str, dict] = {}
        b = self.b
        shape = [2] if dim == 2 else [1, 4, 4]
        for k in range(1, rounds + 1):
            inputs = {} if k == 1 else {"coupling": f"couple-{k - 1}", "init": f"train-{k - 1}"}
            b.plan(f"train-{k}", "train", {"seed": k, "path": "straight"}, inputs)
            b.plan(f"couple-{k}", "couple", {"seed": 10 + k}, {"teacher": f"train-{k}"})
            self.subjects[f"train-{k}"] = {"name": f"train-{k}", "label": f"{k}-RF", "family": "rectified", "round": k}
        for path in baselines:
            b.plan(f"train-{path}", "train", {"seed": 0, "path": path})
            b.plan(f"couple-{path}", "couple", {"seed": path}, {"teacher": f"train-{path}"})
            self.subjects[f"train-{path}"] = {
                "name": f"train-{path}",
                "label": LABELS[path],
                "family": "baseline",
                "round": 1,
                "path": path,
            }
        for teacher in distill:
            name, teacher_label = f"distill-{teacher}", self.subjects[f"train-{teacher}"]["label"]
            b.plan(
                name, "train", {"seed": 99, "grid": 1}, {"coupling": f"couple-{teacher}", "init": f"train-{teacher}"}
            )
            self.subjects[name] = {
                "name": name,
                "label": f"1-step distilled from {teacher_label} pairs",
                "family": "distilled",
                "round": int(teacher) if teacher.isdigit() else None,
                "k": 1,
                "teacher": f"train-{teacher}",
            }
        if random_distill:
            b.plan("distill-1-random", "train", {"seed": 98, "grid": 1}, {"init": "train-1"})
            self.subjects["distill-1-random"] = {
                "name": "distill-1-random",
                "label": "1-step distilled from random pairs",
                "family": "distilled",
                "round": 1,
                "k": 1,
                "teacher": "train-1",
            }
        self.config = {
            "pi0": {"kind": "noise", "shape": shape},
            "samples": 64,
            "ot_samples": 32,
            "seed": 7,
            "reference_solver": RK45,
            "samplers": samplers,
        }
        for model in self.subjects:
            inputs = {"model": model} | (
                {"teacher": self.subjects[model]["teacher"]} if self.subjects[model].get("teacher") else {}
            )
            b.plan(f"eval-{model}", "eval", {**self.config, "subject": {"name": model}}, inputs)
        b.plan("report", "report", {"name": "paper"}, {stage: stage for stage in list(b.stages)})
        b.write_document()
        self.rows: dict[str, dict[str, dict]] = {}

    def evaluate(self, *models: str) -> Fabricated:
        for model in models:
            subject = self.subjects[model]
            family = subject["family"]
            independent = family == "baseline" or (family == "rectified" and subject.get("round") == 1)
            samplers = [s for s in self.samplers if independent or not s.startswith("sde@")]
            rows = finish_evaluation(self.b, f"eval-{model}", subject, samplers, self.dim, RK45)
            self.rows[model] = {row["sampler"]: row for row in rows}
        return self

    @property
    def document(self) -> Location:
        return self.b.document


def _cells(table) -> dict[str, list[str]]:
    """Rows by their first cell, section titles left out."""
    return {row[0]: row[1:] for row in table.rows if len(row) > 1}


def _sections(table) -> list[str]:
    return [row[0] for row in table.rows if len(row) == 1]


# -- the method table (the paper's Table 1) ------------------------------------------------------


@pytest.fixture(scope="module")
def digits_like(tmp_path_factory) -> Fabricated:
    """Every row and column of the paper's table, on images: 1/2/3-RF, VP and sub-VP baselines,
    a one-step distillation of each from its coupling and one from random pairs, SDE rows."""
    run = location(str(tmp_path_factory.mktemp("paper") / "digits"))
    f = Fabricated(
        run,
        rounds=3,
        baselines=["vp", "subvp"],
        distill=["1", "2", "3", "vp", "subvp"],
        dim=16,
        samplers=["euler@1", RK45, SDE],
        random_distill=True,
    )
    return f.evaluate(*f.subjects)


def test_the_method_table_has_every_row_and_column_of_the_paper(digits_like):
    table = method_table(load_run(digits_like.document))
    assert table.header == ["method", "NFE", "IS (classifier)", "FD (classifier)", "precision", "recall"]
    assert _sections(table) == [ONE_STEP_HEADING, RK45_HEADING, SDE_HEADING]
    assert [row[0] for row in table.rows] == [
        ONE_STEP_HEADING,
        "1-RF (+Distill)",
        "2-RF (+Distill)",
        "3-RF (+Distill)",
        "VP ODE (+Distill)",
        "sub-VP ODE (+Distill)",
        RK45_HEADING,
        "1-RF",
        "2-RF",
        "3-RF",
        "VP ODE",
        "sub-VP ODE",
        SDE_HEADING,
        "VP SDE",
        "sub-VP SDE",  # the baselines' SDE rows; 1-RF's sde row is not the paper's
    ]
    assert len(table.rows) == 15 and all(len(row) in (1, 6) for row in table.rows)


def test_one_step_cells_show_the_distilled_value_in_parentheses(digits_like):
    cells, rows = _cells(method_table(load_run(digits_like.document))), digits_like.rows
    for teacher, label in (("1", "1-RF"), ("3", "3-RF"), ("vp", "VP ODE"), ("subvp", "sub-VP ODE")):
        own, distilled = rows[f"train-{teacher}"]["euler@1"], rows[f"distill-{teacher}"]["euler@1"]
        assert cells[f"{label} (+Distill)"] == [
            "1",
            f"{number(own['is_classifier'], '.2f')} ({number(distilled['is_classifier'], '.2f')})",
            f"{number(own['fd_classifier'], '.4g')} ({number(distilled['fd_classifier'], '.4g')})",
            f"{number(own['precision'], '.3f')} ({number(distilled['precision'], '.3f')})",
            f"{number(own['recall'], '.3f')} ({number(distilled['recall'], '.3f')})",
        ]
    # the model distilled from random pairs is not 1-RF's "+Distill"
    random = rows["distill-1-random"]["euler@1"]["fd_classifier"]
    assert number(random, ".4g") not in cells["1-RF (+Distill)"][2]


def test_full_simulation_rows_are_the_models_own(digits_like):
    cells, rows = _cells(method_table(load_run(digits_like.document))), digits_like.rows
    rk45 = rows["train-2"][RK45]
    assert cells["2-RF"] == [
        f"{rk45['nfe_mean']:.1f}",
        number(rk45["is_classifier"], ".2f"),
        number(rk45["fd_classifier"], ".4g"),
        number(rk45["precision"], ".3f"),
        number(rk45["recall"], ".3f"),
    ]
    assert "(" not in " ".join(cells["2-RF"])
    sde = rows["train-subvp"][SDE]
    assert cells["sub-VP SDE"][:3] == ["2000", number(sde["is_classifier"], ".2f"), number(sde["fd_classifier"], ".4g")]


def test_the_report_renders_the_table_with_section_rows(digits_like, tmp_path):
    uris = write_report(digits_like.document, location(str(tmp_path / "report")))
    markdown = location(uris["md"]).read_bytes().decode()
    page = location(uris["html"]).read_bytes().decode()
    assert "## The paper's table: one-step generation and full simulation" in markdown
    assert f"| **{markdown_text(ONE_STEP_HEADING)}** | | | | | |" in markdown
    assert "| method | NFE | IS (classifier) | FD (classifier) | precision | recall |" in markdown
    own, distilled = digits_like.rows["train-1"]["euler@1"], digits_like.rows["distill-1"]["euler@1"]
    fd = f"{number(own['fd_classifier'], '.4g')} ({number(distilled['fd_classifier'], '.4g')})"
    assert re.search(rf"\| 1-RF \(\+Distill\) \| 1 \| [^|]+ \| {re.escape(fd)} \|", markdown)
    assert f'<tr><th class="section" colspan="6">{SDE_HEADING}</th></tr>' in page
    assert "the paper's CIFAR-10 numbers" in markdown  # an image run's caption orients with the paper
    assert "## Straight paths matter" in markdown  # 1-RF, VP and sub-VP: flows on three paths, euler@1


def test_missing_models_and_scores_leave_rows_and_columns_out(tmp_path):
    """Vectors (W2, no image score), no baselines, no SDE rows, 3-RF not evaluated yet, and a
    distillation of 3-RF finished before its teacher's evaluation."""
    f = Fabricated(
        location(str(tmp_path / "run")),
        rounds=3,
        baselines=[],
        distill=["1", "3"],
        dim=2,
        samplers=["euler@1", "euler@4", RK45],
    ).evaluate("train-1", "train-2", "distill-1", "distill-3")
    table = method_table(load_run(f.document))
    assert table.header == ["method", "NFE", "W2 to π1"]
    assert _sections(table) == [ONE_STEP_HEADING, RK45_HEADING]
    rows = [row[0] for row in table.rows]
    assert rows == [ONE_STEP_HEADING, "1-RF (+Distill)", "2-RF", "3-RF (+Distill)", RK45_HEADING, "1-RF", "2-RF"]
    w2 = f.rows["distill-3"]["euler@1"]["w2"]
    assert table.rows[3] == ["3-RF (+Distill)", "1", f"– ({number(w2, '.4g')})"]  # teacher not evaluated
    assert table.rows[2] == ["2-RF", "1", number(f.rows["train-2"]["euler@1"]["w2"], ".4g")]  # nothing distilled
    assert "CIFAR-10" not in table.caption
    assert paths_grid(load_run(f.document)) is None  # one path only


def test_a_run_with_only_distilled_models_evaluated_has_no_rk45_section(tmp_path):
    f = Fabricated(
        location(str(tmp_path / "run")), rounds=1, baselines=[], distill=["1"], dim=2, samplers=["euler@1", RK45]
    ).evaluate("distill-1")
    table = method_table(load_run(f.document))
    assert [row[0] for row in table.rows] == [ONE_STEP_HEADING, "1-RF (+Distill)"]
    f.evaluate("train-1")
    assert _sections(method_table(load_run(f.document))) == [ONE_STEP_HEADING, RK45_HEADING]


# -- the straight-paths grid ---------------------------------------------------------------------


def test_the_straight_paths_grid(tmp_path):
    steps = [1, 2, 5, 100]
    f = Fabricated(
        location(str(tmp_path / "run")),
        rounds=2,
        baselines=["vp", "subvp", "vp_const"],
        distill=[],
        dim=2,
        samplers=[*(f"euler@{n}" for n in steps), "rk45@1e-05"],
    )
    f.evaluate(*f.subjects)
    grid = paths_grid(load_run(f.document))
    assert grid.header == ["path", "Euler N = 1", "Euler N = 2", "Euler N = 5", "Euler N = 100"]
    # 2-RF was trained on coupled pairs: the grid compares paths of flows trained on the same independent pairs
    assert [row[0] for row in grid.rows] == [
        "rectified flow, straight path (1-RF)",
        "VP ODE",
        "sub-VP ODE",
        "VP ODE (constant speed)",
    ]
    assert all(len(row) == 5 for row in grid.rows)
    row = f.rows["train-vp_const"]["euler@5"]
    assert grid.rows[3][3] == f"{number(row['w2'], '.3g')} / {number(row['one_step_distance'], '.3g')}"

    uris = write_report(f.document, location(str(tmp_path / "report")))
    markdown = location(uris["md"]).read_bytes().decode()
    assert "## Straight paths matter" in markdown and "](figure-straight-paths.png)" in markdown
    assert (tmp_path / "report" / "figure-straight-paths.png").stat().st_size > 5_000
    assert "| Euler N = 1 | Euler N = 2 | Euler N = 5 | Euler N = 100 |" in markdown


def test_no_grid_without_euler_samplers_or_a_second_path(tmp_path):
    f = Fabricated(
        location(str(tmp_path / "a")), rounds=1, baselines=["vp"], distill=[], dim=2, samplers=["rk45@1e-05"]
    ).evaluate("train-1", "train-vp")
    assert paths_grid(load_run(f.document)) is None
    f = Fabricated(
        location(str(tmp_path / "b")), rounds=1, baselines=["vp"], distill=[], dim=2, samplers=["euler@1", "euler@2"]
    ).evaluate("train-1")
    results = load_run(f.document)
    assert paths_grid(results) is None  # the VP baseline is not evaluated yet
    markdown = location(write_report(f.document, location(str(tmp_path / "out")))["md"]).read_bytes().decode()
    assert "Straight paths matter" not in markdown and "figure-straight-paths.png" not in markdown


def test_training_curves_do_not_disturb_the_layouts(tmp_path):
    """A finished training stage with metrics (the report's loss curves) beside the tables."""
    f = Fabricated(
        location(str(tmp_path / "run")), rounds=1, baselines=["vp"], distill=[], dim=2, samplers=["euler@1", RK45, SDE]
    )
    finish_training(f.b, "train-1", 50, 2.0)
    f.evaluate("train-1", "train-vp")
    table = method_table(load_run(f.document))
    assert [row[0] for row in table.rows] == [
        ONE_STEP_HEADING,
        "1-RF",
        "VP ODE",
        RK45_HEADING,
        "1-RF",
        "VP ODE",
        SDE_HEADING,
        "VP SDE",
    ]

"""The paper's two layouts, filled with a run's own numbers.

- :func:`method_table` — Table 1 of Liu, Gong & Liu (ICLR 2023; the CIFAR-10 table): rows grouped
  "One-step generation (Euler N = 1)" (each k-RF and baseline model, and in parentheses the
  one-step model distilled from its coupling: "1-RF (+Distill) … 378.1 (6.18)"), "Full simulation
  (RK45)" and "Full simulation (Euler–Maruyama N = …)" (the VP / sub-VP baselines' ``sde@N`` rows,
  "VP SDE", "sub-VP SDE"); columns NFE and the quality scores the run has (IS, FD / FID, precision,
  recall for images; W2 to π1 for vectors).
- :func:`paths_grid` — the straight-paths comparison: a row per probability path (1-RF on the
  straight path, VP ODE, sub-VP ODE, VP ODE with constant speed, each trained on independent
  pairs), a column per Euler N, each cell "W2 to π1 / distance to the reference solve".

Both only show what the run has: a model that was not evaluated has no row, a score no row has
no column, a section without rows is left out, and a run with nothing to show gets ``None``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from workflows.report.blocks import Table
from workflows.report.read import Evaluation, RunResults
from workflows.report.tables import Columns, display_label, number
from workflows.settings import BASELINE_LABELS

ONE_STEP = "euler@1"
METHOD_COLUMNS: Columns = (
    ("nfe_mean", "NFE", "nfe"),
    ("inception_score", "IS", ".2f"),
    ("is_classifier", "IS (classifier)", ".2f"),
    ("fid", "FID", ".4g"),
    ("fd_classifier", "FD (classifier)", ".4g"),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
)
"""The method table's columns, in the paper's order (NFE, IS, FID, recall) with the run's own
classifier's scores beside InceptionV3's; for vectors, W2 (:data:`VECTOR_COLUMNS`)."""
VECTOR_COLUMNS: Columns = (("nfe_mean", "NFE", "nfe"), ("w2", "W2 to π1", ".4g"))
PATH_ORDER = ("straight", "vp", "subvp", "vp_const")
_EULER = re.compile(r"^euler@(\d+)$")
_SDE = re.compile(r"^sde@(\d+)(?::(.+))?$")

PAPER_CIFAR10 = (
    "For orientation only — the paper's CIFAR-10 numbers (DDPM++ at GPU scale, FID with InceptionV3 "
    "on 50k samples: another data set and another feature space, so only the ordering compares): "
    "one step FID 1-RF 378 (6.18), 2-RF 12.21 (4.85), 3-RF 8.15 (5.21), VP ODE +Distill 16.23, "
    "sub-VP ODE +Distill 14.32; RK45 1-RF 2.58 at 127 NFE (IS 9.60, recall 0.57), 2-RF 3.36 at 110, "
    "3-RF 3.96 at 104."
)
"""The published numbers of the paper's Table 1 (as /work/shared/ANCHORS.md lists them), for the
caption of an image run's table; the table's cells are always the run's own."""


@dataclass(frozen=True)
class MethodRow:
    """One row of the method table: the model's row for the section's sampler and, for one-step
    rows, the row of the model distilled from its coupling (None when there is none)."""

    label: str
    row: dict[str, Any] | None
    distilled: dict[str, Any] | None = None


def nfe_text(value: Any) -> str:
    """An NFE as the paper prints it: whole numbers without decimals, RK45's mean with one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _value(row: dict[str, Any] | None, key: str, spec: str) -> str:
    value = None if row is None else row.get(key)
    return nfe_text(value) if spec == "nfe" else number(value, spec)


def _has(row: dict[str, Any] | None, key: str) -> bool:
    value = None if row is None else row.get(key)
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _flows(results: RunResults) -> list[Evaluation]:
    """The evaluated flows of the table in the run's stage order (the k-RF rounds, then the baselines)."""
    return [e for e in results.evaluations if e.subject.get("family") in ("rectified", "baseline")]


def distilled_from(results: RunResults, teacher: str) -> Evaluation | None:
    """The evaluated one-step model (k = 1) distilled from the coupling of the flow trained by
    stage ``teacher`` — the paper's "+Distill"; a model distilled from independent random pairs
    (its stage has no ``coupling`` input) is not one."""
    for evaluation in results.evaluations:
        subject = evaluation.subject
        if subject.get("family") != "distilled" or subject.get("teacher") != teacher or subject.get("k") != 1:
            continue
        stage = results.stage(str(subject.get("name")))
        if stage is None or "coupling" in stage.inputs:
            return evaluation
    return None


def _rk45_row(evaluation: Evaluation) -> dict[str, Any] | None:
    """The model's RK45 row: its reference solver's when that is RK45, else its first RK45 row."""
    reference = str(evaluation.config.get("reference_solver", ""))
    rows = [row for row in evaluation.rows() if str(row["sampler"]).startswith("rk45@")]
    return next((row for row in rows if row["sampler"] == reference), rows[0] if rows else None)


def sde_title(sampler: str) -> str:
    """``sde@2000`` → "Euler–Maruyama N = 2000" (with the noise scale when it is not 1)."""
    match = _SDE.match(sampler)
    if match is None:
        return sampler
    steps, scale = match.groups()
    return f"Euler–Maruyama N = {steps}" + (f", noise scale {scale}" if scale not in (None, "1", "1.0") else "")


def _teacher_label(results: RunResults, distilled: Evaluation) -> str:
    """The label of the flow a distilled model learnt from, when that flow has no evaluation yet."""
    teacher = str(distilled.subject.get("teacher"))
    evaluated = results.model_label(teacher)
    if evaluated is not None:
        return evaluated
    if distilled.subject.get("round") is not None:
        return f"{distilled.subject['round']}-RF"
    return BASELINE_LABELS.get(teacher.removeprefix("train-"), teacher)


def method_sections(results: RunResults) -> list[tuple[str, list[MethodRow]]]:
    """The table's sections, each (title, rows), leaving out sections without rows. A one-step
    row exists for every evaluated flow and for every flow whose one-step distillation was
    evaluated (its own cells "–" until its evaluation finishes)."""
    flows = _flows(results)
    teachers = {str(e.subject.get("name")): e.label for e in flows}
    for evaluation in results.evaluations:
        if evaluation.subject.get("family") == "distilled" and evaluation.subject.get("teacher"):
            teacher = str(evaluation.subject["teacher"])
            if teacher not in teachers and distilled_from(results, teacher) is evaluation:
                teachers[teacher] = _teacher_label(results, evaluation)
    order = {stage.name: i for i, stage in enumerate(results.stages)}
    one_step = []
    for teacher in sorted(teachers, key=lambda name: order.get(name, len(order))):
        own = next((e for e in flows if e.subject.get("name") == teacher), None)
        distilled = distilled_from(results, teacher)
        row = own.row_of(ONE_STEP) if own else None
        distilled_row = distilled.row_of(ONE_STEP) if distilled else None
        if row is None and distilled_row is None:
            continue
        label = teachers[teacher] + (" (+Distill)" if distilled_row is not None else "")
        one_step.append(MethodRow(label, row, distilled_row))
    full = [(evaluation, _rk45_row(evaluation)) for evaluation in flows]
    full = [(evaluation, row) for evaluation, row in full if row is not None]
    rk45_names = sorted({row["sampler"] for _, row in full})
    rk45_title = "Full simulation (RK45" + (f", {rk45_names[0]}" if len(rk45_names) == 1 else "") + ")"
    sections = [
        ("One-step generation (Euler N = 1)", one_step),
        (rk45_title, [MethodRow(evaluation.label, row) for evaluation, row in full]),
    ]
    stochastic: dict[str, list[MethodRow]] = {}
    for evaluation in flows:
        if evaluation.subject.get("family") != "baseline":
            continue
        for row in evaluation.rows():
            if _SDE.match(str(row["sampler"])):
                stochastic.setdefault(row["sampler"], []).append(MethodRow(display_label(row), row))
    for sampler in sorted(stochastic, key=lambda name: (int(_SDE.match(name).group(1)), name)):
        sections.append((f"Full simulation ({sde_title(sampler)})", stochastic[sampler]))
    return [(title, rows) for title, rows in sections if rows]


def method_columns(sections: list[tuple[str, list[MethodRow]]]) -> Columns:
    """NFE and the quality columns some row of ``sections`` fills (W2 when no image score is)."""
    rows = [row for _, section in sections for item in section for row in (item.row, item.distilled)]
    shown = tuple(column for column in METHOD_COLUMNS if any(_has(row, column[0]) for row in rows))
    if len(shown) <= 1:
        shown = tuple(column for column in VECTOR_COLUMNS if any(_has(row, column[0]) for row in rows))
    return shown or METHOD_COLUMNS[:1]


def _cell(item: MethodRow, key: str, spec: str) -> str:
    """The model's value, with the distilled model's in parentheses on one-step rows (not for NFE:
    both take one step)."""
    if key == "nfe_mean":
        return _value(item.row if item.row is not None else item.distilled, key, spec)
    own = _value(item.row, key, spec)
    return own if item.distilled is None else f"{own} ({_value(item.distilled, key, spec)})"


def method_table(results: RunResults) -> Table | None:
    """Table 1's layout with this run's numbers; a section title is a row of one cell. None when
    no k-RF or baseline model has an euler@1, RK45 or baseline SDE row."""
    sections = method_sections(results)
    if not sections:
        return None
    columns = method_columns(sections)
    rows: list[list[str]] = []
    for title, items in sections:
        rows.append([title])
        rows += [[item.label, *(_cell(item, key, spec) for key, _, spec in columns)] for item in items]
    first = results.evaluations[0].config
    image = len((first.get("pi0") or {}).get("shape") or []) == 3
    titles = [title for title, _ in sections]
    distilled = any(item.distilled is not None for _, items in sections for item in items)
    caption = "The paper's Table 1 in this run's numbers. "
    if titles[0].startswith("One-step"):
        caption += "One-step rows: euler@1 of each flow" + (
            " and, in parentheses, of the one-step model distilled from that flow's own coupling (+Distill: "
            "k = 1; a model distilled from random pairs is not one). "
            if distilled
            else ". "
        )
    if any(title.startswith("Full simulation (RK45") for title in titles):
        caption += "RK45 rows: the adaptive solver, NFE the mean per sample. "
    if any("Euler–Maruyama" in title for title in titles):
        caption += "Euler–Maruyama rows: the VP / sub-VP baselines sampled with the SDE of the same marginals. "
    caption += f"Every model starts from the same {first.get('samples')} draws Z0 (seed {first.get('seed')}). "
    keys = {key for key, _, _ in columns}
    if "fd_classifier" in keys:
        caption += (
            "IS (classifier), FD (classifier): the Inception Score recipe and the Fréchet distance in the "
            "feature space of the run's classifier stage; precision and recall: k-NN, in that space. "
        )
    if keys & {"fid", "inception_score"}:
        caption += "IS, FID: InceptionV3, with the weights the evaluation's manifest names. "
    if "w2" in keys:
        caption += f"W2 to π1: exact, on the first {first.get('ot_samples')} samples. "
    if image:
        caption += PAPER_CIFAR10
    return Table(["method", *(title for _, title, _ in columns)], rows, caption.strip())


def euler_steps(flows: list[Evaluation]) -> list[int]:
    """Every N of an ``euler@N`` row of ``flows``, ascending."""
    found = (_EULER.match(str(row["sampler"])) for evaluation in flows for row in evaluation.rows())
    return sorted({int(match.group(1)) for match in found if match is not None})


def path_flows(results: RunResults) -> list[Evaluation]:
    """One flow per probability path, each trained on independent pairs (1-RF on the run's path,
    the baselines on theirs), in the order straight, VP, sub-VP, VP constant speed."""
    chosen: dict[str, Evaluation] = {}
    for evaluation in results.evaluations:
        subject = evaluation.subject
        independent = subject.get("family") == "baseline" or (
            subject.get("family") == "rectified" and subject.get("round") == 1
        )
        if independent:
            chosen.setdefault(str(subject.get("path", "straight")), evaluation)
    order = {path: i for i, path in enumerate(PATH_ORDER)}
    return [chosen[path] for path in sorted(chosen, key=lambda path: (order.get(path, len(order)), path))]


def path_label(evaluation: Evaluation) -> str:
    """The row's name: "rectified flow, straight path (1-RF)" for the k-RF model, the baseline's
    own label ("VP ODE") otherwise."""
    subject = evaluation.subject
    if subject.get("family") == "baseline":
        return evaluation.label
    return f"rectified flow, {subject.get('path', 'straight')} path ({evaluation.label})"


def paths_grid(results: RunResults) -> Table | None:
    """The straight-paths grid: a row per path, a column per Euler N; None unless flows on more
    than one path were evaluated with ``euler@N`` samplers."""
    flows = path_flows(results)
    steps = euler_steps(flows)
    if len(flows) < 2 or not steps:
        return None
    rows = []
    for evaluation in flows:
        cells = []
        for n in steps:
            row = evaluation.row_of(f"euler@{n}")
            cells.append(
                "–"
                if row is None
                else f"{number(row.get('w2'), '.3g')} / {number(row.get('one_step_distance'), '.3g')}"
            )
        rows.append([path_label(evaluation), *cells])
    first = results.evaluations[0].config
    caption = (
        "Straight paths matter: each path's flow, trained on the same independent pairs, sampled with Euler N "
        "steps. Each cell: W2 to π1 (exact, on the first "
        f"{first.get('ot_samples')} samples) / the distance E‖Z1 − Z1 of the reference solve‖ "
        f"({first.get('reference_solver')}) over {first.get('samples')} samples — the error Euler's N steps make "
        "on the path's own ODE. The straighter the flow, the closer a few steps land: an exactly straight one "
        "would be solved by one."
    )
    return Table(["path", *(f"Euler N = {n}" for n in steps)], rows, caption)

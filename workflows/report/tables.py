"""The report's tables as rows of text cells: the paper-style model × sampler table, the
seed-style summary (also printed by ``rectiflow run``), the training table and the lineage.

Every number is copied from what :mod:`workflows.report.read` read (an evaluation's files, a
manifest, a training stage's metrics parts) and only formatted here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from workflows.report.read import RunResults, StageRecord, TrainingCurve

Columns = tuple[tuple[str, str, str], ...]
"""(key, header, format) per column; format ``s`` is text, anything else a number format."""

RESULT_COLUMNS: Columns = (
    ("label", "model", "s"),
    ("sampler", "sampler", "s"),
    ("nfe_mean", "NFE", ".1f"),
    ("nfe_max", "NFE max", "d"),
    ("w2", "W2 to π1", ".4g"),
    ("mmd2", "MMD²", ".3g"),
    ("fd_classifier", "FD (classifier)", ".4g"),
    ("is_classifier", "IS (classifier)", ".3f"),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
    ("fid", "FID", ".4g"),
    ("inception_score", "IS", ".3f"),
    ("kid", "KID", ".3g"),
    ("one_step_distance", "distance to ref.", ".4g"),
    ("straightness", "straightness", ".4g"),
    ("transport_cost", "transport cost", ".4g"),
    ("pairing_ratio", "pairing ratio", ".4f"),
    ("crossing_pct", "crossing %", ".2f"),
    ("wall_seconds", "worker s", ".2f"),
    ("cpu_seconds", "CPU s", ".2f"),
    ("gpu_seconds", "GPU s", ".2f"),
)
SUMMARY_COLUMNS: Columns = (
    ("label", "model", "s"),
    ("crossing_pct", "crossing %", ".2f"),
    ("transport_cost", "transport cost", ".3f"),
    ("pairing_ratio", "pairing ratio", ".4f"),
    ("one_step_distance", "1-step distance", ".3f"),
    ("one_step_w2", "1-step W2", ".3f"),
    ("one_step_fd", "1-step FD (classifier)", ".3f"),
    ("one_step_fid", "1-step FID", ".3f"),
    ("nfe", "NFE of the coupling", ".1f"),
)
TRAINING_COLUMNS: Columns = (
    ("stage", "stage", "s"),
    ("model", "model", "s"),
    ("state", "state", "s"),
    ("last_step", "last logged step", "d"),
    ("last_loss", "loss at that step", ".4g"),
    ("steps_per_second", "steps/s (median)", ".3g"),
    ("examples_per_second", "examples/s (median)", ".4g"),
    ("attempts", "attempts", "s"),
)
LINEAGE_HEADER = [
    "stage",
    "kind",
    "status",
    "hash",
    "inputs",
    "seed",
    "solver / samplers",
    "details",
    "wall s",
    "CPU s",
]


def number(value: Any, spec: str = ".4g") -> str:
    """``value`` formatted by ``spec``; "–" when missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def shown_columns(columns: Columns, rows: list[dict[str, Any]]) -> Columns:
    """``columns`` without the numeric ones that no row fills (e.g. crossings for images, FID for vectors)."""
    return tuple(
        column
        for column in columns
        if column[2] == "s" or any(number(row.get(column[0]), column[2]) != "–" for row in rows)
    )


def cells(row: dict[str, Any], columns: Columns) -> list[str]:
    return [str(row.get(key, "")) if spec == "s" else number(row.get(key), spec) for key, _, spec in columns]


def header(columns: Columns) -> list[str]:
    return [title for _, title, _ in columns]


def display_label(row: dict[str, Any]) -> str:
    """A result row's model as the paper names it: a VP / sub-VP baseline sampled with an SDE
    sampler is the "VP SDE" / "sub-VP SDE" row, with an ODE solver the "… ODE" row."""
    label = str(row.get("label", ""))
    if row.get("family") == "baseline" and str(row.get("sampler", "")).startswith("sde@"):
        return label.replace("ODE", "SDE")
    return label


def result_rows(results: RunResults) -> list[dict[str, Any]]:
    """The paper-style rows: every evaluation row, with the model named as in the paper."""
    return [{**row, "label": display_label(row)} for row in results.metrics().to_pylist()]


def summary_rows(results: RunResults) -> list[dict[str, Any]]:
    """The seed-style rows: independent pairs, then per evaluated model its coupling (crossing,
    cost, pairing ratio, NFE of the reference solve) and its one-step quality (``euler@1``)."""
    rows = []
    if results.evaluations:
        independent = results.evaluations[0].details.get("independent") or {}
        rows.append({"label": "independent pairs (Z0, X1 ~ π1)", **independent})
    for evaluation in results.evaluations:
        coupling, one_step = evaluation.coupling_row(), evaluation.row_of("euler@1") or {}
        rows.append(
            {
                "label": evaluation.label,
                **{key: coupling[key] for key in ("crossing_pct", "transport_cost", "pairing_ratio")},
                "one_step_distance": one_step.get("one_step_distance"),
                "one_step_w2": one_step.get("w2"),
                "one_step_fd": one_step.get("fd_classifier"),
                "one_step_fid": one_step.get("fid"),
                "nfe": coupling["nfe_mean"],
            }
        )
    return rows


def printable(text: str) -> str:
    """``text`` for a terminal: control characters (an escape sequence in a label) as ``?``."""
    return "".join(character if character.isprintable() else "?" for character in text)


def text_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Fixed-width lines: the first column left-aligned, the others right-aligned."""
    lines = [[printable(cell) for cell in line] for line in [head, *rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
        for line in lines
    ]


def summary_text(results: RunResults) -> str:
    """The seed-style table as plain text, with the settings it was measured under and the
    stages that have not finished."""
    summary = summary_rows(results)
    columns = shown_columns(SUMMARY_COLUMNS, summary)
    lines = text_table(header(columns), [cells(row, columns) for row in summary])
    if results.evaluations:
        evaluation = results.evaluations[0]
        lines.append(
            printable(
                f"coupling columns: Z1 of {evaluation.coupling_row()['sampler']}; 1-step columns: euler@1; "
                f"{evaluation.config.get('samples')} samples, OT on {evaluation.config.get('ot_samples')}, "
                f"seed {evaluation.config.get('seed')}"
            )
        )
    if results.unfinished:
        lines.append(printable(f"not finished: {', '.join(stage.name for stage in results.unfinished)}"))
    return "\n".join(lines)


def _median(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else None


def training_row(results: RunResults, curve: TrainingCurve) -> dict[str, Any]:
    """One training stage: its last logged step and loss, median logged speeds, attempt folders."""
    table = curve.table
    last = table.slice(table.num_rows - 1).to_pylist()[0]
    return {
        "stage": curve.stage.name,
        "model": results.model_label(curve.stage.name) or "",
        "state": "finished" if curve.stage.finished else "not finished",
        "last_step": int(last["step"]),
        "last_loss": last.get("loss"),
        "steps_per_second": _median(curve.column("steps_per_second")),
        "examples_per_second": _median(curve.column("examples_per_second")),
        "attempts": ", ".join(str(n) for n in curve.attempts),
    }


def stage_status(stage: StageRecord) -> str:
    if stage.finished:
        return "finished"
    progress = stage.progress
    if progress and progress.get("total"):
        return f"not finished ({progress.get('done')}/{progress.get('total')} {progress.get('unit')})"
    return "not finished"


def lineage_row(results: RunResults, stage: StageRecord) -> list[str]:
    """A stage as its manifest describes itself — inputs (role: the run document's stage name and
    hash), seed, solver or samplers, the one-line summary, wall and CPU seconds — or, unfinished,
    the inputs the run document plans for it."""
    manifest = stage.manifest
    if manifest is None:
        planned = {s.name: s.hash for s in results.stages}
        inputs = [f"{role}: {name} ({planned.get(name, '?')})" for role, name in stage.inputs.items()]
        return [stage.name, stage.kind, stage_status(stage), stage.hash, "; ".join(inputs), "", "", "", "–", "–"]
    inputs = [
        f"{role}: {results.stage_name(entry.get('uri'))} ({entry.get('hash', '?')})"
        for role, entry in manifest.inputs.items()
    ]
    config, spent = manifest.config, manifest.time or {}
    solver = config.get("solver") or ", ".join(map(str, config.get("samplers") or []))
    return [
        stage.name,
        stage.kind,
        stage_status(stage),
        manifest.hash,
        "; ".join(inputs),
        "" if config.get("seed") is None else str(config["seed"]),
        str(solver),
        str(manifest.details.get("summary", "")),
        number(spent.get("wall_seconds"), ".1f"),
        number(spent.get("cpu_seconds"), ".1f"),
    ]

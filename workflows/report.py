"""The run report, rebuilt from stored results alone: ``report.html``, ``report.md``, ``metrics.parquet``.

:func:`write_report` reads ``{run}/pipeline.json`` (the plan: the run's name, config and stages),
the ``_SUCCESS.json`` of every finished stage, and the Parquet files of every finished evaluation
(checked against the checksums of its manifest). It computes no metric: every number comes from
an evaluation stage, so rebuilding from the same storage gives the same table and the same text.
Unfinished stages are listed as such.

The report shows the paper-style table (a row per model × sampler: NFE, quality, straightness,
transport cost, pairing ratio, crossings, seconds), the seed-style summary (:func:`summary_table`),
a quality-vs-NFE plot, for 2D data the pairs and paths of every model (crossing segments
untangling from 1-RF to 2-RF …) and its samples per sampler, the lineage (which teacher made
which pairs, with which solver and seed), the configuration and code versions. ``report.html`` is
self-contained (figures embedded as base64 PNG, no script); ``report.md`` links the PNGs written
beside it. Every string that comes from a user (run name, labels, config values, URIs) is escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from workflows.figures import Panel, Series, image_grids, panels, quality_vs_nfe
from workflows.stage import PLAN_FILE, PROGRESS_FILE, SUCCESS_FILE
from workflows.stages.evaluate import (
    INDEPENDENT,
    METRICS_FILE,
    METRICS_SCHEMA,
    SAMPLES_FILE,
    TRAJECTORIES_FILE,
    read_table,
    table_bytes,
)
from workflows.storage import Location, location

HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
PAIR_LINES = 200
"""Pairs drawn per model in the pairs figure."""

logger = logging.getLogger("rectiflow.report")


# -- what is stored -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRecord:
    """A stage of the plan with its manifest (None when unfinished) and last recorded progress."""

    name: str
    kind: str
    hash: str
    location: Location
    needs: tuple[str, ...]
    manifest: dict[str, Any] | None
    progress: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        return self.manifest is not None


@dataclass(frozen=True)
class Evaluation:
    """A finished evaluation stage and its tables."""

    stage: StageRecord
    metrics: pa.Table
    samples: pa.Table
    trajectories: pa.Table

    @property
    def manifest(self) -> dict[str, Any]:
        return self.stage.manifest or {}

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})

    @property
    def label(self) -> str:
        return str(self.manifest.get("subject", {}).get("label", self.stage.name))

    def rows(self) -> list[dict[str, Any]]:
        return self.metrics.to_pylist()

    def coupling_row(self) -> dict[str, Any]:
        """The row of the model's own coupling: for a k-step distilled model its euler@k sampler
        (the only one it was trained for), else the reference solver's, else the finest sampler's."""
        rows = self.rows()
        subject = self.manifest.get("subject", {})
        if subject.get("family") == "distilled" and self.row_of(f"euler@{subject.get('k')}"):
            return self.row_of(f"euler@{subject.get('k')}")
        reference = [row for row in rows if row["sampler"] == self.config.get("reference_solver")]
        return reference[0] if reference else max(rows, key=lambda row: row["nfe_mean"])

    def row_of(self, sampler: str) -> dict[str, Any] | None:
        return next((row for row in self.rows() if row["sampler"] == sampler), None)


@dataclass(frozen=True)
class RunResults:
    """Everything the report shows, as stored."""

    run: Location
    document: dict[str, Any]
    stages: list[StageRecord]
    evaluations: list[Evaluation]

    def metrics(self) -> pa.Table:
        """All evaluation rows, in the plan's stage order."""
        tables = [evaluation.metrics for evaluation in self.evaluations]
        return pa.concat_tables(tables, promote_options="default") if tables else METRICS_SCHEMA.empty_table()

    @property
    def shown_stages(self) -> list[StageRecord]:
        """Every stage but the report itself (being written, its status would change on a rebuild)."""
        return [stage for stage in self.stages if stage.kind != "report"]

    def stage_name(self, uri: str | None) -> str:
        """The plan's name for a stage URI (the URI itself when it is not in the plan)."""
        names = {stage.location.uri: stage.name for stage in self.stages}
        return names.get(str(uri), str(uri))


def _read_optional(target: Location) -> dict[str, Any] | None:
    try:
        return target.read_json()
    except (FileNotFoundError, ValueError):
        return None


def _stage_record(run: Location, entry: Any, index: int) -> StageRecord:
    where = f"{run.join(PLAN_FILE).uri}: stages[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not a mapping")
    missing = [key for key in ("name", "kind", "hash", "uri") if not isinstance(entry.get(key), str)]
    if missing:
        raise ValueError(f"{where} has no {', '.join(missing)}")
    folder = location(entry["uri"])
    manifest = _read_optional(folder.join(SUCCESS_FILE))
    progress = None if manifest else _read_optional(folder.join(PROGRESS_FILE))
    return StageRecord(
        entry["name"], entry["kind"], entry["hash"], folder, tuple(entry.get("needs", ())), manifest, progress
    )


def _checked_table(stage: StageRecord, name: str) -> pa.Table:
    """A file of a finished evaluation, verified against the checksum in its manifest."""
    target = stage.location.join(name)
    expected = (stage.manifest or {}).get("files", {}).get(name, {}).get("sha256")
    data = target.read_bytes()
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(
            f"{target.uri} does not match the checksum in its _SUCCESS.json: it changed after the stage finished"
        )
    return read_table(target)


def load_run(run: str | Location) -> RunResults:
    """Read the plan, the manifests and the evaluation tables of ``run``."""
    run = location(run)
    plan = run.join(PLAN_FILE)
    try:
        document = plan.read_json()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{plan.uri} does not exist: {run.uri} is not a rectiflow run (or it never started)"
        ) from None
    if not isinstance(document, dict) or not isinstance(document.get("stages"), list):
        raise ValueError(f"{plan.uri} has no list of 'stages'")
    stages = [_stage_record(run, entry, index) for index, entry in enumerate(document["stages"])]
    evaluations = [
        Evaluation(stage, *(_checked_table(stage, name) for name in (METRICS_FILE, SAMPLES_FILE, TRAJECTORIES_FILE)))
        for stage in stages
        if stage.kind == "eval" and stage.finished
    ]
    return RunResults(run, document, stages, evaluations)


# -- numbers as text ------------------------------------------------------------------------------


def number(value: Any, spec: str = ".4g") -> str:
    """``value`` formatted by ``spec``; "–" when missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


# (column, header, format) of the paper-style table
RESULT_COLUMNS = (
    ("label", "model", "s"),
    ("sampler", "sampler", "s"),
    ("nfe_mean", "NFE", ".1f"),
    ("nfe_max", "NFE max", "d"),
    ("w2", "W2 to π1", ".4g"),
    ("mmd2", "MMD²", ".3g"),
    ("fd_classifier", "FD (classifier)", ".4g"),
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
SUMMARY_COLUMNS = (
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


def shown_columns(
    columns: tuple[tuple[str, str, str], ...], rows: list[dict[str, Any]]
) -> tuple[tuple[str, str, str], ...]:
    """``columns`` without the numeric ones that no row fills (e.g. crossings for images, FID for vectors)."""
    return tuple(
        column for column in columns
        if column[2] == "s" or any(number(row.get(column[0]), column[2]) != "–" for row in rows)
    )


def summary_rows(results: RunResults) -> list[dict[str, Any]]:
    """The seed-style rows: independent pairs, then per evaluated model its coupling (crossing,
    cost, pairing ratio, NFE of the reference solve) and its one-step quality (``euler@1``)."""
    rows = []
    if results.evaluations:
        independent = results.evaluations[0].manifest.get("independent", {})
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


def display_label(row: dict[str, Any]) -> str:
    """A result row's model as the paper names it: a VP / sub-VP baseline sampled with an SDE
    sampler is the "VP SDE" / "sub-VP SDE" row, with an ODE solver the "… ODE" row."""
    label = str(row.get("label", ""))
    if row.get("family") == "baseline" and str(row.get("sampler", "")).startswith("sde@"):
        return label.replace("ODE", "SDE")
    return label


def _cells(row: dict[str, Any], columns: tuple[tuple[str, str, str], ...]) -> list[str]:
    return [str(row.get(key, "")) if spec == "s" else number(row.get(key), spec) for key, _, spec in columns]


def _printable(text: str) -> str:
    return "".join(character if character.isprintable() else "?" for character in text)


def summary_table(run: str | Location) -> str:
    """The seed-style table as plain text (what ``rectiflow run`` prints at the end)."""
    results = load_run(run)
    summary = summary_rows(results)
    columns = shown_columns(SUMMARY_COLUMNS, summary)
    rows = [[_printable(cell) for cell in _cells(row, columns)] for row in summary]
    header = [title for _, title, _ in columns]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in [header, *rows]
    ]
    if results.evaluations:
        evaluation = results.evaluations[0]
        lines.append(
            f"coupling columns: Z1 of {evaluation.coupling_row()['sampler']}; 1-step columns: euler@1; "
            f"{evaluation.config.get('samples')} samples, OT on {evaluation.config.get('ot_samples')}, "
            f"seed {evaluation.config.get('seed')}"
        )
    unfinished = [stage.name for stage in results.shown_stages if not stage.finished]
    if unfinished:
        lines.append(f"not finished: {', '.join(unfinished)}")
    return "\n".join(lines)


# -- the document ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    """A section title."""

    text: str


@dataclass(frozen=True)
class Text:
    """A paragraph."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table of text cells with a caption."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass(frozen=True)
class Image:
    """A PNG figure: embedded in the HTML, written beside the Markdown as ``name``."""

    name: str
    png: bytes
    caption: str


@dataclass(frozen=True)
class Code:
    """Preformatted text (configuration, versions)."""

    text: str


Block = Union[Heading, Text, Table, Image, Code]


def _overview(results: RunResults) -> list[Block]:
    done = sum(stage.finished for stage in results.shown_stages)
    blocks: list[Block] = [
        Text(
            f"Run {results.document.get('name', '')} at {results.run.uri}: "
            f"{done} of {len(results.shown_stages)} stages finished."
        ),
    ]
    if results.evaluations:
        config = results.evaluations[0].config
        blocks.append(
            Text(
                f"Every model is sampled from the same {config.get('samples')} draws Z0 ~ π0 "
                f"(seed {config.get('seed')}); "
                f"exact OT, W2, MMD² and crossings use the first {config.get('ot_samples')}. "
                f"The reference solve is {config.get('reference_solver')}."
            )
        )
    waiting = [stage.name for stage in results.shown_stages if stage.kind == "eval" and not stage.finished]
    if waiting:
        blocks.append(Text(f"Not evaluated yet: {', '.join(waiting)}."))
    return blocks


def _tables(results: RunResults) -> list[Block]:
    if not results.evaluations:
        return [Heading("Results"), Text("No evaluation has finished yet.")]
    summary, metrics = summary_rows(results), results.metrics().to_pylist()
    summary_columns, result_columns = shown_columns(SUMMARY_COLUMNS, summary), shown_columns(RESULT_COLUMNS, metrics)
    return [
        Heading("Summary"),
        Table(
            [title for _, title, _ in summary_columns],
            [_cells(row, summary_columns) for row in summary],
            "Coupling columns from each model's reference solve (Z0, Z1); 1-step columns from euler@1: "
            "distance E‖Z1 − Z1 of the reference solve‖, W2 to π1 and, for images, feature distances. "
            "FD (classifier): Fréchet distance in the feature space of the run's classifier stage; "
            "FID / IS / KID: InceptionV3 with the weights named in the evaluation's manifest.",
        ),
        Heading("Results: model × sampler"),
        Table(
            [title for _, title, _ in result_columns],
            [_cells({**row, "label": display_label(row)}, result_columns) for row in metrics],
            "NFE: velocity evaluations per sample (RK45: mean and max). Straightness: E Σ Δt‖(Z1 − Z0) − ΔZ/Δt‖² "
            "of the sampler's own path. Transport cost E‖Z1 − Z0‖; pairing ratio: that cost ÷ the exact OT cost "
            "between the same point sets (≥ 1). Worker s: seconds the workers spent on the sampler, summed over "
            "workers; CPU s and GPU s likewise.",
        ),
    ]


def _vectors_of(table: pa.Table, sampler: str, column: str) -> np.ndarray:
    """Column ``column`` of the rows of ``sampler`` as an array (rows, size)."""
    rows = table.filter(pc.equal(table["sampler"], sampler))
    values = rows[column].combine_chunks()
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), -1)


def _paths_of(table: pa.Table, sampler: str) -> tuple[np.ndarray, ...]:
    rows = table.filter(pc.equal(table["sampler"], sampler))
    ids = rows["id"].to_numpy()
    states = _vectors_of(table, sampler, "x")
    return tuple(states[ids == sample] for sample in np.unique(ids))


def _densest_sampler(table: pa.Table) -> str | None:
    """The sampler with the most stored states per path (euler@100 by default)."""
    names = table["sampler"].to_pylist()
    counts = {name: names.count(name) for name in dict.fromkeys(names)}
    return max(counts, key=lambda name: counts[name]) if counts else None


def _settings(evaluation: Evaluation, shown: str) -> str:
    return f"{shown} of {evaluation.config.get('samples')} samples per model, seed {evaluation.config.get('seed')}"


def _pairs_figure(results: RunResults) -> Image:
    """Segments Z0 → Z1 of the independent pairs, then of each model's coupling (the seed figure:
    crossings untangling from 1-RF to 2-RF)."""
    first = results.evaluations[0]
    crossing = number(first.manifest.get("independent", {}).get("crossing_pct"), ".2f")
    items = [Panel(f"independent pairs (Z0, X1 ~ π1)\ncrossing {crossing} %", *_pairs_of(first, INDEPENDENT))]
    for evaluation in results.evaluations:
        row = evaluation.coupling_row()
        title = (
            f"{evaluation.label}\n{row['sampler']} · NFE {row['nfe_mean']:.1f} · "
            f"crossing {number(row['crossing_pct'], '.2f')} %"
        )
        items.append(Panel(title, *_pairs_of(evaluation, row["sampler"])))
    settings = _settings(first, f"pairs (Z0, Z1) of the reference solve: the first {len(items[0].starts)}")
    caption = f"Pairs of each model's coupling, coloured by the height of Z0 — {settings}."
    return Image("figure-pairs.png", panels(items, settings), caption)


def _pairs_of(evaluation: Evaluation, sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """The first :data:`PAIR_LINES` stored pairs (Z0, Z1) of ``sampler``."""
    return tuple(_vectors_of(evaluation.samples, sampler, column)[:PAIR_LINES] for column in ("x0", "x1"))


def _paths_figure(results: RunResults) -> Image | None:
    """Each model's stored paths Z_t of its densest sampler; None when no paths were kept."""
    items = []
    for evaluation in results.evaluations:
        densest = _densest_sampler(evaluation.trajectories)
        if densest is not None:
            paths = _paths_of(evaluation.trajectories, densest)
            items.append(Panel(f"{evaluation.label}\n{densest} · {len(paths)} paths", paths=paths))
    if not items:
        return None
    first = results.evaluations[0]
    settings = _settings(first, f"paths Z_t of the finest sampler: the first {first.config.get('trajectories')}")
    return Image("figure-trajectories.png", panels(items, settings), f"Paths of each model — {settings}.")


def _samples_figure(results: RunResults) -> Image:
    """A row per model, a column per sampler: Z1 over π1's reference sample."""
    items = []
    for evaluation in results.evaluations:
        reference = _vectors_of(evaluation.samples, INDEPENDENT, "x1")
        for row in evaluation.rows():
            title = f"{evaluation.label}\n{row['sampler']} · NFE {row['nfe_mean']:.1f} · W2 {number(row['w2'], '.3g')}"
            items.append(Panel(title, ends=_vectors_of(evaluation.samples, row["sampler"], "x1"), background=reference))
    first = results.evaluations[0]
    shown = len(_vectors_of(first.samples, INDEPENDENT, "x1"))
    settings = _settings(first, f"Z1 per sampler (grey: π1): the first {shown}")
    figure = panels(items, settings, columns=len(first.rows()))
    return Image("figure-samples.png", figure, f"Samples by sampler — {settings}.")


def _one_step_figure(results: RunResults) -> Image | None:
    """Distillation versus reflow: every model's one-step (euler@1) samples side by side with their
    W2 to π1; None unless a distilled model was evaluated with euler@1."""
    shown = [e for e in results.evaluations if e.row_of("euler@1")]
    if not any(e.manifest.get("subject", {}).get("family") == "distilled" for e in shown):
        return None
    items = []
    for evaluation in shown:
        row = evaluation.row_of("euler@1")
        items.append(Panel(
            f"{evaluation.label}\neuler@1 · W2 {number(row['w2'], '.3g')}",
            ends=_vectors_of(evaluation.samples, "euler@1", "x1"),
            background=_vectors_of(evaluation.samples, INDEPENDENT, "x1"),
        ))
    settings = _settings(shown[0], "one-step samples Z1 (grey: π1)")
    caption = (
        f"Distillation versus reflow — {settings}. Distilling random pairs can at best learn E[X1 | X0] "
        "and collapses toward the conditional mean; reflow pairs are deterministic, so a one-step model "
        "distilled from them can match them."
    )
    return Image("figure-one-step.png", panels(items, settings), caption)


GRID_IMAGES = 16
"""Images per panel of the sample grids."""


def _image_samples_figure(results: RunResults, shape: list[int]) -> Image:
    """Sample grids: a row per model, a column per sampler, after a column of the model's
    starting points Z0 (noise, or the source domain of a transfer) and one of π1's images."""
    first = results.evaluations[0]

    def images(evaluation: Evaluation, sampler: str, column: str) -> np.ndarray:
        return _vectors_of(evaluation.samples, sampler, column)[:GRID_IMAGES].reshape(-1, *shape)

    items = [("Z0 (source)", images(first, INDEPENDENT, "x0")), ("π1 (data)", images(first, INDEPENDENT, "x1"))]
    for evaluation in results.evaluations:
        for row in evaluation.rows():
            title = f"{evaluation.label}\n{row['sampler']} · NFE {row['nfe_mean']:.1f}"
            quality = row.get("fd_classifier")
            if quality is not None and not math.isnan(quality):
                title += f" · FD {number(quality, '.3g')}"
            items.append((title, images(evaluation, row["sampler"], "x1")))
    settings = _settings(first, f"the first {GRID_IMAGES} samples Z1 from the same Z0")
    columns = max(2, len(first.rows()))
    return Image("figure-image-samples.png", image_grids(items, settings, columns),
                 f"Samples by model and sampler, first panels: the starting points Z0 and π1 — {settings}.")


def _figures(results: RunResults) -> list[Block]:
    if not results.evaluations:
        return []
    first = results.evaluations[0]
    series = [
        Series(
            evaluation.label,
            *([row[key] for row in evaluation.rows()] for key in ("nfe_mean", "w2", "one_step_distance")),
        )
        for evaluation in results.evaluations
    ]
    settings = _settings(first, f"all samplers, W2 on the first {first.config.get('ot_samples')}")
    blocks: list[Block] = [
        Heading("Figures"),
        Image("figure-quality-vs-nfe.png", quality_vs_nfe(series, settings), f"Quality against NFE — {settings}."),
    ]
    shape = first.config.get("pi0", {}).get("shape", [])
    if len(shape) == 3:
        blocks.append(_image_samples_figure(results, shape))
    if first.samples["x0"].type.list_size == 2:
        blocks += [
            figure for figure in (
                _pairs_figure(results), _paths_figure(results), _samples_figure(results), _one_step_figure(results)
            ) if figure
        ]
    return blocks


def _link(results: RunResults, inputs: dict[str, Any] | None, key: str = "uri") -> str:
    if not inputs:
        return ""
    return f"{results.stage_name(inputs.get(key))} ({inputs.get('hash', '?')})"


def _lineage_facts(results: RunResults, stage: StageRecord) -> tuple[str, str, str, str]:
    """(inputs, seed, solver, details) of a finished stage from its manifest."""
    manifest, config = stage.manifest or {}, (stage.manifest or {}).get("config", {})
    inputs = manifest.get("inputs") or {}
    if stage.kind == "train":
        data = inputs.get("data") or {}
        pairs = _link(results, data, "coupling") if "coupling" in data else "independent π0 × π1"
        init = inputs.get("init")
        source = f"pairs: {pairs}" + (f"; warm start: {_link(results, init)}" if init else "")
        details = (
            f"{manifest.get('steps')} steps, {config.get('path')} path, final loss {number(manifest.get('final_loss'))}"
        )
        return source, str(config.get("seed", "")), "", details
    if stage.kind == "couple":
        nfe = manifest.get("nfe") or {}
        details = f"{manifest.get('pairs')} pairs, NFE mean {number(nfe.get('mean'), '.1f')}, {manifest.get('dtype')}"
        return (
            f"teacher: {_link(results, inputs.get('teacher'))}",
            str(config.get("seed", "")),
            str(manifest.get("solver", "")),
            details,
        )
    if stage.kind == "eval":
        details = f"{config.get('samples')} samples, reference {config.get('reference_solver')}"
        return (
            f"model: {_link(results, inputs.get('model'))}",
            str(config.get("seed", "")),
            ", ".join(config.get("samplers", [])),
            details,
        )
    return "", "", "", ""


def _status(stage: StageRecord) -> str:
    if stage.finished:
        return "finished"
    progress = stage.progress
    if progress:
        return f"not finished ({progress.get('done')}/{progress.get('total')} {progress.get('unit')})"
    return "not finished"


def _lineage(results: RunResults) -> list[Block]:
    rows = []
    for stage in results.shown_stages:
        waiting_for = f"needs {', '.join(stage.needs)}" if stage.needs else ""
        facts = _lineage_facts(results, stage) if stage.finished else (waiting_for, "", "", "")
        time_spent = (stage.manifest or {}).get("time") or {}
        rows.append(
            [
                stage.name,
                stage.kind,
                _status(stage),
                stage.hash,
                *facts,
                number(time_spent.get("wall_seconds"), ".1f"),
                number(time_spent.get("cpu_seconds"), ".1f"),
            ]
        )
    header = ["stage", "kind", "status", "hash", "inputs", "seed", "solver / samplers", "details", "wall s", "CPU s"]
    return [
        Heading("Lineage"),
        Table(header, rows, "From each stage's _SUCCESS.json: what it was made from, with which seed and solver."),
    ]


def _provenance(results: RunResults) -> list[Block]:
    config = results.document.get("config", {})
    versions = sorted(
        {
            json.dumps(stage.manifest.get("code"), sort_keys=True)
            for stage in results.shown_stages
            if stage.finished and stage.manifest.get("code")
        }
    )
    return [
        Heading("Configuration"),
        Code(yaml.safe_dump(config, sort_keys=True, allow_unicode=True, default_flow_style=None).rstrip()),
        Heading("Code"),
        Code("\n".join(versions) or "no finished stage recorded its code version"),
    ]


def build_document(results: RunResults) -> list[Block]:
    """The report's blocks, in order."""
    return [*_overview(results), *_tables(results), *_figures(results), *_lineage(results), *_provenance(results)]


# -- rendering ------------------------------------------------------------------------------------

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; }
td.text, th:first-child { text-align: left; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: 12px; padding-top: 4px; }
figure { margin: 1em 0 2em; } figcaption { color: #555; font-size: 12px; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
"""


_NUMBER = re.compile(r"^(–|[-+]?\d[\d.]*(e[-+]?\d+)?)$")


def _html_cell(cell: str) -> str:
    """A table cell: numbers right-aligned, text left-aligned."""
    kind = "" if _NUMBER.match(cell) else ' class="text"'
    return f"<td{kind}>{html.escape(cell)}</td>"


def _html_block(block: Block) -> str:
    escape = html.escape
    if isinstance(block, Heading):
        return f"<h2>{escape(block.text)}</h2>"
    if isinstance(block, Text):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Code):
        return f"<pre>{escape(block.text)}</pre>"
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return (
            f'<figure><img alt="{escape(block.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(block.caption)}</figcaption></figure>"
        )
    header = "".join(f"<th>{escape(cell)}</th>" for cell in block.header)
    body = "\n".join("<tr>" + "".join(_html_cell(cell) for cell in row) + "</tr>" for row in block.rows)
    return f"<table><caption>{escape(block.caption)}</caption>\n<tr>{header}</tr>\n{body}\n</table>"


def to_html(title: str, blocks: list[Block]) -> str:
    """A self-contained page: inline style, images as data URIs, no script."""
    body = "\n".join(_html_block(block) for block in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


def markdown_text(text: str) -> str:
    """``text`` safe in Markdown: HTML escaped, Markdown punctuation backslashed, one line."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def _markdown_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"## {markdown_text(block.text)}"
    if isinstance(block, Text):
        return markdown_text(block.text)
    if isinstance(block, Code):
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", block.text)), default=0))
        return f"{fence}\n{block.text}\n{fence}"
    if isinstance(block, Image):
        return f"![{markdown_text(block.caption)}]({block.name})\n\n{markdown_text(block.caption)}"
    lines = [
        "| " + " | ".join(markdown_text(cell) for cell in block.header) + " |",
        "|" + "---|" * len(block.header),
        *("| " + " | ".join(markdown_text(cell) for cell in row) + " |" for row in block.rows),
    ]
    return "\n".join(lines) + f"\n\n{markdown_text(block.caption)}"


def to_markdown(title: str, blocks: list[Block]) -> str:
    return f"# {markdown_text(title)}\n\n" + "\n\n".join(_markdown_block(block) for block in blocks) + "\n"


def _report_location(results: RunResults) -> Location:
    reports = [stage for stage in results.stages if stage.kind == "report"]
    if not reports:
        raise ValueError(
            f"{results.run.join(PLAN_FILE).uri} has no stage of kind 'report'; pass an output location"
        )
    return reports[0].location


def write_report(run: str | Location, output: str | Location | None = None) -> dict[str, str]:
    """Build the report of ``run`` from stored results into ``output`` (default: the plan's
    ``report`` stage folder); returns the URIs of ``html``, ``md`` and ``metrics``."""
    results = load_run(run)
    target = location(output) if output is not None else _report_location(results)
    blocks = build_document(results)
    title = f"rectiflow report: {results.document.get('name', results.run.name)}"
    for block in blocks:
        if isinstance(block, Image):
            target.join(block.name).write_bytes(block.png)
    target.join(METRICS_FILE).write_bytes(table_bytes(results.metrics()))
    target.join(MARKDOWN_FILE).write_bytes(to_markdown(title, blocks).encode())
    target.join(HTML_FILE).write_bytes(to_html(title, blocks).encode())
    logger.info("report of %s written to %s", results.run.uri, target.uri)
    return {
        "html": target.join(HTML_FILE).uri,
        "md": target.join(MARKDOWN_FILE).uri,
        "metrics": target.join(METRICS_FILE).uri,
    }

"""The blocks of one configuration's report, in order: overview, summary, the paper's layouts
(its Table 1 and the straight-paths grid, :mod:`workflows.report.paper`), the model × sampler
table, figures, training, lineage, configuration and code versions.

Everything comes from :class:`workflows.report.read.RunResults`; the report's own stage is left
out (while it is written it is unfinished, after that finished), so rebuilding from the same
storage gives the same blocks.
"""

from __future__ import annotations

import json

import yaml

from workflows.report.blocks import Block, Code, Heading, Table, Text
from workflows.report.gallery import figures, straight_paths_figure
from workflows.report.paper import method_table, paths_grid
from workflows.report.read import RunResults
from workflows.report.tables import (
    LINEAGE_HEADER,
    RESULT_COLUMNS,
    SUMMARY_COLUMNS,
    TRAINING_COLUMNS,
    cells,
    header,
    lineage_row,
    result_rows,
    shown_columns,
    summary_rows,
    training_row,
)


def title(results: RunResults) -> str:
    return f"rectiflow report: {results.document.name}"


def _overview(results: RunResults) -> list[Block]:
    document, shown = results.document, results.shown_stages
    blocks: list[Block] = [
        Text(
            f"Run {document.name} at {results.run.uri}, configuration {document.key} "
            f"({document.location.name}): {len(shown) - len(results.unfinished)} of {len(shown)} stages finished."
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
    waiting = [stage.name for stage in results.unfinished if stage.kind == "eval"]
    if waiting:
        blocks.append(Text(f"Not evaluated yet: {', '.join(waiting)}."))
    return blocks


def _results(results: RunResults) -> list[Block]:
    if not results.evaluations:
        return [Heading("Results"), Text("No evaluation has finished yet.")]
    summary, metrics = summary_rows(results), result_rows(results)
    summary_columns, result_columns = shown_columns(SUMMARY_COLUMNS, summary), shown_columns(RESULT_COLUMNS, metrics)
    return [
        Heading("Summary"),
        Table(
            header(summary_columns),
            [cells(row, summary_columns) for row in summary],
            "Coupling columns from each model's reference solve (Z0, Z1); 1-step columns from euler@1: "
            "distance E‖Z1 − Z1 of the reference solve‖, W2 to π1 and, for images, feature distances. "
            "FD (classifier): Fréchet distance in the feature space of the run's classifier stage; "
            "FID / IS / KID: InceptionV3 with the weights named in the evaluation's manifest.",
        ),
        *_paper(results),
        Heading("Results: model × sampler"),
        Table(
            header(result_columns),
            [cells(row, result_columns) for row in metrics],
            "NFE: velocity evaluations per sample (RK45: mean and max). Straightness: E Σ Δt‖(Z1 − Z0) − ΔZ/Δt‖² "
            "of the sampler's own path. Transport cost E‖Z1 − Z0‖; pairing ratio: that cost ÷ the exact OT cost "
            "between the same point sets (≥ 1). Worker s: seconds the workers spent on the sampler, summed over "
            "workers; CPU s and GPU s likewise.",
        ),
    ]


def _paper(results: RunResults) -> list[Block]:
    """The paper's layouts: its Table 1 and, when flows on several paths were evaluated with Euler
    samplers, the straight-paths grid with its samples."""
    blocks: list[Block] = []
    table = method_table(results)
    if table is not None:
        blocks += [Heading("The paper's table: one-step generation and full simulation"), table]
    grid = paths_grid(results)
    if grid is not None:
        blocks += [Heading("Straight paths matter"), grid]
        figure = straight_paths_figure(results)
        if figure is not None:
            blocks.append(figure)
    return blocks


def _figures(results: RunResults) -> list[Block]:
    shown = figures(results)
    return [Heading("Figures"), *shown] if shown else []


def _training(results: RunResults) -> list[Block]:
    if not results.curves:
        return []
    rows = [training_row(results, curve) for curve in results.curves]
    columns = shown_columns(TRAINING_COLUMNS, rows)
    return [
        Heading("Training"),
        Table(
            header(columns),
            [cells(row, columns) for row in rows],
            "From each training stage's metrics parts (attempt-N/metrics/steps-*.parquet); for a step that a "
            "resumed stage logged again, the latest attempt's row. Speeds: the median of the logged values.",
        ),
    ]


def _lineage(results: RunResults) -> list[Block]:
    return [
        Heading("Lineage"),
        Table(
            LINEAGE_HEADER,
            [lineage_row(results, stage) for stage in results.shown_stages],
            "From each stage's _SUCCESS.json: what it was made from (role: stage (hash)), with which seed and "
            "solver, what it made; an unfinished stage shows the inputs the run document plans for it.",
        ),
    ]


def _provenance(results: RunResults) -> list[Block]:
    versions = sorted(
        {
            json.dumps(stage.manifest.code, sort_keys=True)
            for stage in results.shown_stages
            if stage.manifest is not None and stage.manifest.code
        }
    )
    return [
        Heading("Configuration"),
        Code(
            yaml.safe_dump(
                results.document.config, sort_keys=True, allow_unicode=True, default_flow_style=None
            ).rstrip()
        ),
        Heading("Code"),
        Code("\n".join(versions) or "no finished stage recorded its code version"),
    ]


def build_document(results: RunResults) -> list[Block]:
    """The report's blocks, in order."""
    return [
        *_overview(results),
        *_results(results),
        *_figures(results),
        *_training(results),
        *_lineage(results),
        *_provenance(results),
    ]

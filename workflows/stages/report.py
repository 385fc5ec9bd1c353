"""The report stage: the run's report, written from stored results once every other stage finished.

``run(config, inputs, output) → Manifest`` through :func:`workflows.stage.run_stage` (kind
``report``). Its inputs are every other stage of the configuration, under roles = their stage
names, so it runs last and its hash changes with any of theirs. It finds its run document — the
pipeline writes ``pipeline-{key}.json`` into the run folder (``output``'s parent) before any stage
runs — as the document whose stages include this stage's output, and writes
:mod:`workflows.report`'s files into the attempt folder: ``report.html``, ``report.md``,
``metrics.parquet`` (every evaluation row) and the figures. The manifest's details name them
relative to the stage folder: ``files`` {html, md, metrics} and ``figures``.

No Ray, no torch: the report only reads what the other stages stored.
"""

from __future__ import annotations

import posixpath
from typing import Any

from workflows.manifest import Manifest
from workflows.plan import RUN_DOCUMENT
from workflows.report import load_run, run_documents, write_files
from workflows.settings import ReportConfig
from workflows.stage import StageContext, StageInputError, run_stage
from workflows.storage import Location

KIND = "report"


def run_document(output: Location) -> Location:
    """The run document (``pipeline-{key}.json`` in ``output``'s parent folder) whose stages
    include the report stage at ``output``; :class:`StageInputError` naming the folder otherwise."""
    folder = Location(output.protocol, posixpath.dirname(output.path))
    for document in run_documents(folder):
        if output.uri in document.stage_uris():
            return document.location
    raise StageInputError(
        f"no run document ({RUN_DOCUMENT.format(key='…')}) in {folder.uri} lists the report stage {output.uri}; "
        "the pipeline writes it before any stage runs"
    )


def _report(context: StageContext) -> dict[str, Any]:
    results = load_run(run_document(context.output))
    planned = {stage.location.uri for stage in results.stages}
    strangers = sorted(role for role, where in context.inputs.items() if where.uri not in planned)
    if strangers:
        raise StageInputError(
            f"inputs {', '.join(strangers)} of the report stage are not stages of {results.document.location.uri}"
        )
    written = write_files(results, context.attempt)
    figures = sorted(name for name in written if name.endswith(".png"))
    rows = results.metrics().num_rows
    return {
        "summary": f"report of {len(results.evaluations)} evaluations ({rows} model × sampler rows), "
        f"{len(results.curves)} loss curves, {len(figures)} figures",
        "document": results.document.location.name,
        "files": {name: context.relative(written[name]) for name in ("html", "md", "metrics")},
        "figures": [context.relative(written[name]) for name in figures],
    }


def run(config: ReportConfig, inputs: dict[str, Location], output: Location) -> Manifest:
    """Write (or return the finished) report of the run whose document lists ``output``; ``inputs``
    are the run's other stages by name."""
    config = ReportConfig.model_validate(config)
    return run_stage(KIND, config, inputs, output, _report)

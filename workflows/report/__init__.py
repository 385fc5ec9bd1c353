"""The run report, rebuilt from stored results alone: ``report.html``, ``report.md``,
``metrics.parquet`` and the figures' PNGs — one report per configuration of a run.

A run folder ``{storage}/{name}`` holds a run document ``pipeline-{key}.json`` per configuration
run under that name; a report covers exactly the stages of one document. It computes no metric:
every number comes from an evaluation's files (verified against the sha256 its manifest lists),
a manifest, or a training stage's metrics parts, so rebuilding from the same storage gives the
same tables and text. Unfinished stages are listed as such.

Modules, one concept each:

- :mod:`~workflows.report.read` — a run folder's documents, one configuration's stages,
  evaluations and training metrics (:func:`load_run`);
- :mod:`~workflows.report.tables` — the paper-style, summary, training and lineage tables as text;
- :mod:`~workflows.report.figures` — matplotlib renderers (PNG bytes);
- :mod:`~workflows.report.gallery` — which stored samples, paths and curves each figure shows;
- :mod:`~workflows.report.blocks`, :mod:`~workflows.report.document` — the report's blocks, in order;
- :mod:`~workflows.report.render` — the blocks as self-contained HTML and as Markdown.

Where a report goes by default (:func:`report_folder`): when the configuration's report stage
has finished, the attempt folder its manifest names (``{run}/report-{hash}/attempt-{n}/``, where
the stage wrote it: a rebuild replaces those files); before that, ``{run}/report-{key}/``, the key
of the configuration's ``pipeline-{key}.json`` (never an unfinished stage's folder: files there
would make the stage look interrupted).

Nothing here imports Ray or torch; matplotlib is imported only when a report is written.
"""

from __future__ import annotations

import logging
import posixpath

from workflows.eval_files import METRICS_FILE, table_bytes
from workflows.report.read import (
    Evaluation,
    RunDocument,
    RunResults,
    StageRecord,
    TrainingCurve,
    find_document,
    load_run,
    read_document,
    run_documents,
    training_metrics,
)
from workflows.report.tables import display_label, number, summary_text
from workflows.storage import Location, location

HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
REBUILT_FOLDER = "report-{key}"
"""The folder under the run folder for the report of a configuration whose report stage has not finished."""

logger = logging.getLogger("rectiflow.report")

__all__ = [
    "HTML_FILE",
    "MARKDOWN_FILE",
    "Evaluation",
    "RunDocument",
    "RunResults",
    "StageRecord",
    "TrainingCurve",
    "display_label",
    "find_document",
    "load_run",
    "number",
    "read_document",
    "report_folder",
    "run_documents",
    "summary_table",
    "training_metrics",
    "write_files",
    "write_report",
]


def report_folder(results: RunResults) -> Location:
    """Where the report of ``results`` goes by default (see the module docstring)."""
    stage = next((stage for stage in results.stages if stage.kind == "report"), None)
    if stage is not None and stage.manifest is not None:
        html = (stage.manifest.details.get("files") or {}).get("html")
        if isinstance(html, str) and posixpath.dirname(html):
            return stage.location.join(posixpath.dirname(html))
        return stage.location
    return results.run.join(REBUILT_FOLDER.format(key=results.document.key))


def write_files(results: RunResults, target: Location) -> dict[str, Location]:
    """Write the report of ``results`` into ``target``: the figures first, then
    ``metrics.parquet`` (every evaluation row), ``report.md`` and ``report.html``. Returns the
    locations by name: ``html``, ``md``, ``metrics`` and ``figure-….png`` for each figure."""
    from workflows.report.blocks import Image  # the document draws its figures: matplotlib starts here
    from workflows.report.document import build_document, title
    from workflows.report.render import to_html, to_markdown

    blocks = build_document(results)
    written: dict[str, Location] = {}
    for block in blocks:
        if isinstance(block, Image):
            written[block.name] = target.join(block.name)
            written[block.name].write_bytes(block.png)
    heading = title(results)
    for name, where, data in (
        ("metrics", target.join(METRICS_FILE), table_bytes(results.metrics())),
        ("md", target.join(MARKDOWN_FILE), to_markdown(heading, blocks).encode()),
        ("html", target.join(HTML_FILE), to_html(heading, blocks).encode()),
    ):
        where.write_bytes(data)
        written[name] = where
    logger.info("report of %s (configuration %s) written to %s", results.run.uri, results.document.key, target.uri)
    return written


def write_report(where: str | Location, output: str | Location | None = None) -> dict[str, str]:
    """Build the report of one configuration — ``where`` is its ``pipeline-{key}.json``, or a run
    folder with a single configuration — from stored results into ``output`` (default:
    :func:`report_folder`); returns the URIs of ``html``, ``md`` and ``metrics``."""
    results = load_run(where)
    target = location(output) if output is not None else report_folder(results)
    written = write_files(results, target)
    return {name: written[name].uri for name in ("html", "md", "metrics")}


def summary_table(where: str | Location) -> str:
    """The seed-style table of one configuration as plain text (what ``rectiflow run`` and
    ``rectiflow report`` print), with the stages not finished yet."""
    return summary_text(load_run(where))

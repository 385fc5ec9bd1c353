"""Reading one configuration of a run from storage: its run document, every stage's manifest and
progress, the evaluation files (verified against their manifests) and the training metrics.

A run folder ``{storage}/{name}`` holds one run document ``pipeline-{key}.json`` per
configuration that ran under that name (:mod:`workflows.plan`); :func:`run_documents` lists them,
newest first, and :func:`load_run` reads one of them with everything its stages stored. Nothing
here computes a metric: every number the report shows comes from what is read here.

Evaluation files are found through their manifest's ``details.files[name].path`` and checked
against the ``sha256`` listed there (:func:`workflows.eval_files.checked_table`). Training metrics
are the small Parquet parts ``attempt-{n}/metrics/steps-{first}-{last}.parquet`` of a training
stage; a resumed stage has several attempt folders that may log the same steps again, and for
each step the row of the highest attempt is the one kept.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from workflows.eval_files import (
    METRICS_FILE,
    METRICS_SCHEMA,
    SAMPLES_FILE,
    TRAJECTORIES_FILE,
    checked_table,
    read_table,
)
from workflows.lease import ATTEMPT
from workflows.manifest import SUCCESS_FILE, Manifest, StageNotFinished, read_manifest
from workflows.plan import RUN_DOCUMENT
from workflows.stage import read_progress
from workflows.storage import Location, location

DOCUMENT_NAME = re.compile("^" + re.escape(RUN_DOCUMENT).replace(re.escape("{key}"), "(?P<key>[0-9A-Za-z]+)") + "$")
"""The file name of a run document, ``pipeline-{key}.json``."""
TRAINING_METRICS_DIR = "metrics"
"""The folder of a training attempt that holds its metrics parts (``METRICS_DIR`` of
:mod:`workflows.stages.train_loop`, which cannot be imported here: it imports torch)."""
TRAINING_METRICS_PART = re.compile(r"^steps-\d+-\d+\.parquet$")
EVALUATION_FILES = (METRICS_FILE, SAMPLES_FILE, TRAJECTORIES_FILE)


# -- run documents --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDocument:
    """One configuration of a run: its ``pipeline-{key}.json`` and when that was last written
    (each ``rectiflow run`` of the configuration writes it again before any stage runs)."""

    location: Location
    key: str
    name: str
    run: Location
    config: dict[str, Any]
    stages: list[dict[str, Any]]
    written_at: float | None

    def stage_uris(self) -> set[str]:
        return {entry["uri"] for entry in self.stages}


def _modified(info: dict[str, Any]) -> float | None:
    """The modification time (POSIX seconds) of an fsspec listing entry: ``mtime`` on a local
    disk, ``LastModified`` on S3, ``updated`` on GCS, ``last_modified`` on Azure."""
    for key in ("mtime", "LastModified", "updated", "last_modified"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _stage_entry(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not a mapping")
    missing = [key for key in ("name", "kind", "hash", "uri") if not isinstance(entry.get(key), str)]
    if missing:
        raise ValueError(f"{where} has no {', '.join(missing)}")
    inputs = entry.get("inputs") or {}
    if not isinstance(inputs, dict) or not all(isinstance(value, str) for value in inputs.values()):
        raise ValueError(f"{where}: 'inputs' is not a mapping of role to stage name")
    return {**entry, "inputs": dict(inputs)}


def read_document(where: str | Location, written_at: float | None = None) -> RunDocument:
    """The run document at ``where`` (a ``pipeline-{key}.json``), checked for the fields the
    report and ``status`` read; a clear error naming the file otherwise."""
    where = location(where)
    try:
        value = where.read_json()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where.uri} does not exist: no run document (or the run never started)") from None
    if not isinstance(value, dict) or not isinstance(value.get("stages"), list):
        raise ValueError(f"{where.uri} is not a run document: it has no list of 'stages'")
    stages = [_stage_entry(entry, f"{where.uri}: stages[{i}]") for i, entry in enumerate(value["stages"])]
    match = DOCUMENT_NAME.match(where.name)
    key = str(value.get("key") or (match.group("key") if match else ""))
    if written_at is None:
        try:
            written_at = _modified(where.fs.info(where.path))
        except OSError:
            written_at = None
    parent = Location(where.protocol, posixpath.dirname(where.path))
    run = location(value["run"]) if isinstance(value.get("run"), str) else parent
    config = value.get("config") if isinstance(value.get("config"), dict) else {}
    return RunDocument(where, key, str(value.get("name", run.name)), run, config, stages, written_at)


def run_documents(run_folder: str | Location) -> list[RunDocument]:
    """Every run document in ``run_folder`` (one per configuration run under its name), the most
    recently written first; [] when there is none."""
    folder = location(run_folder)
    try:
        entries = folder.fs.ls(folder.path, detail=True)
    except FileNotFoundError:
        return []
    documents = []
    for entry in entries:
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        if entry.get("type") == "file" and DOCUMENT_NAME.match(name):
            documents.append(read_document(folder.join(name), _modified(entry)))
    return sorted(documents, key=lambda document: (-(document.written_at or 0.0), document.key))


def is_document(where: str | Location) -> bool:
    """Whether ``where`` names a run document (rather than a run folder)."""
    return DOCUMENT_NAME.match(location(where).name) is not None


def find_document(where: str | Location) -> Location:
    """``where`` when it is a run document; for a run folder, its only document (a folder with
    several configurations needs the document named: they are listed in the error)."""
    where = location(where)
    if is_document(where):
        return where
    documents = run_documents(where)
    if not documents:
        raise FileNotFoundError(
            f"{where.uri} has no run document ({RUN_DOCUMENT.format(key='…')}): it is not a rectiflow run folder "
            "({storage}/{name}), or the run never started"
        )
    if len(documents) > 1:
        names = ", ".join(document.location.name for document in documents)
        raise ValueError(f"{where.uri} holds {len(documents)} configurations ({names}): name one of them")
    return documents[0].location


# -- stages ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRecord:
    """A stage of the run document with its manifest (None when unfinished) and last progress."""

    name: str
    kind: str
    hash: str
    location: Location
    inputs: dict[str, str]
    manifest: Manifest | None
    progress: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        return self.manifest is not None


def _stage_record(entry: dict[str, Any]) -> StageRecord:
    folder = location(entry["uri"])
    try:
        manifest = read_manifest(folder)
    except StageNotFinished:
        manifest = None
    progress = None if manifest else read_progress(folder)
    return StageRecord(entry["name"], entry["kind"], entry["hash"], folder, entry["inputs"], manifest, progress)


@dataclass(frozen=True)
class Evaluation:
    """A finished evaluation stage and its three tables."""

    stage: StageRecord
    metrics: pa.Table
    samples: pa.Table
    trajectories: pa.Table

    @property
    def manifest(self) -> Manifest:
        assert self.stage.manifest is not None
        return self.stage.manifest

    @property
    def details(self) -> dict[str, Any]:
        return self.manifest.details

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.config

    @property
    def subject(self) -> dict[str, Any]:
        return self.details.get("subject") or {}

    @property
    def label(self) -> str:
        return str(self.subject.get("label", self.stage.name))

    def rows(self) -> list[dict[str, Any]]:
        return self.metrics.to_pylist()

    def row_of(self, sampler: str) -> dict[str, Any] | None:
        return next((row for row in self.rows() if row["sampler"] == sampler), None)

    def coupling_row(self) -> dict[str, Any]:
        """The row of the model's own coupling: for a k-step distilled model its euler@k sampler
        (the only one it was trained for), else the reference solver's, else the finest sampler's."""
        if self.subject.get("family") == "distilled" and self.row_of(f"euler@{self.subject.get('k')}"):
            return self.row_of(f"euler@{self.subject.get('k')}")
        return self.row_of(str(self.config.get("reference_solver"))) or max(self.rows(), key=lambda r: r["nfe_mean"])


def _evaluation(stage: StageRecord) -> Evaluation:
    """The files an evaluation's manifest lists, each verified against its sha256."""
    marker = stage.location.join(SUCCESS_FILE).uri
    files = stage.manifest.details.get("files") if stage.manifest else None
    tables = []
    for name in EVALUATION_FILES:
        entry = (files or {}).get(name) if isinstance(files, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry.get("sha256"):
            raise ValueError(f"{marker} lists no {name} with a path and a sha256 in details.files")
        tables.append(checked_table(stage.location.join(entry["path"]), entry["sha256"]))
    return Evaluation(stage, *tables)


# -- training metrics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingCurve:
    """The logged metrics of one training stage (finished or not): a row per step, in step order,
    with the columns the training loop logs (step, loss, lr, steps_per_second, …) and ``attempt``,
    the attempt folder the row came from."""

    stage: StageRecord
    table: pa.Table

    def column(self, name: str) -> np.ndarray:
        """A column as floats (NaN where missing; all NaN when no part logged it)."""
        if name not in self.table.column_names:
            return np.full(self.table.num_rows, np.nan)
        return np.asarray(self.table[name].to_pylist(), dtype=float)

    @property
    def attempts(self) -> list[int]:
        return sorted(set(self.table["attempt"].to_pylist()))


def training_metrics(stage: Location) -> pa.Table | None:
    """Every metrics part of every attempt folder of ``stage``, one row per step — for a step that
    several attempts logged (a resumed stage repeats the steps after its last checkpoint), the row
    of the highest attempt; None when no part exists."""
    parts = []
    for folder in stage.list_names():
        match = ATTEMPT.match(folder)
        if not match:
            continue
        metrics = stage.join(folder, TRAINING_METRICS_DIR)
        for name in metrics.list_names():
            if TRAINING_METRICS_PART.match(name):
                table = read_table(metrics.join(name))
                if "step" not in table.column_names:
                    raise ValueError(f"{metrics.join(name).uri} has no 'step' column")
                attempt = pa.array(np.full(table.num_rows, int(match.group(1)), dtype=np.int64))
                parts.append(table.append_column("attempt", attempt))
    if not parts:
        return None
    table = pa.concat_tables(parts, promote_options="permissive")
    table = table.sort_by([("step", "ascending"), ("attempt", "descending")])
    steps = table["step"].to_numpy()
    first_of_step = np.concatenate([[True], steps[1:] != steps[:-1]]) if len(steps) else np.zeros(0, bool)
    return table.filter(pa.array(first_of_step))


# -- the whole configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class RunResults:
    """Everything one configuration's report shows, as stored."""

    document: RunDocument
    stages: list[StageRecord]
    evaluations: list[Evaluation]
    curves: list[TrainingCurve]

    @property
    def run(self) -> Location:
        return self.document.run

    def metrics(self) -> pa.Table:
        """All evaluation rows, in the run document's stage order."""
        tables = [evaluation.metrics for evaluation in self.evaluations]
        return pa.concat_tables(tables, promote_options="default") if tables else METRICS_SCHEMA.empty_table()

    @property
    def shown_stages(self) -> list[StageRecord]:
        """Every stage but the report itself (being written, its status would change on a rebuild)."""
        return [stage for stage in self.stages if stage.kind != "report"]

    @property
    def unfinished(self) -> list[StageRecord]:
        return [stage for stage in self.shown_stages if not stage.finished]

    def stage(self, name: str) -> StageRecord | None:
        return next((stage for stage in self.stages if stage.name == name), None)

    def stage_name(self, uri: Any) -> str:
        """The run document's name for a stage URI (the URI itself when it is not one of them)."""
        return next((stage.name for stage in self.stages if stage.location.uri == uri), str(uri))

    def model_label(self, stage_name: str) -> str | None:
        """The label an evaluation gave the model trained by ``stage_name`` (``2-RF`` …), if any."""
        return next((e.label for e in self.evaluations if e.subject.get("name") == stage_name), None)


def load_run(where: str | Location) -> RunResults:
    """Read one configuration: the run document at ``where`` (or a run folder's only document),
    the manifest and progress of each of its stages, the files of every finished evaluation
    (checksums verified) and the metrics parts of every training stage."""
    document = read_document(find_document(where))
    stages = [_stage_record(entry) for entry in document.stages]
    evaluations = [_evaluation(stage) for stage in stages if stage.kind == "eval" and stage.finished]
    curves = []
    for stage in stages:
        if stage.kind == "train":
            table = training_metrics(stage.location)
            if table is not None and table.num_rows:
                curves.append(TrainingCurve(stage, table))
    return RunResults(document, stages, evaluations, curves)

"""The report of a fabricated toy run (manifests, evaluation files and training metrics written in
the stages' formats): it renders in a real browser, escapes user strings, is rebuilt from storage
with the same numbers on a local disk and S3, detects changed files, lists unfinished stages, draws
loss curves, and keeps two configurations under one run name apart."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from workflows import commands
from workflows.eval_files import (
    INDEPENDENT,
    METRICS_FILE,
    METRICS_SCHEMA,
    SAMPLES_FILE,
    TRAJECTORIES_FILE,
    read_table,
    table_bytes,
    vectors,
)
from workflows.manifest import Manifest, read_manifest, write_manifest
from workflows.plan import RUN_DOCUMENT
from workflows.report import display_label, load_run, number, report_folder, run_documents, summary_table, write_report
from workflows.report.read import TRAINING_METRICS_DIR
from workflows.report.render import markdown_text
from workflows.settings import ReportConfig, content_hash, stage_hash
from workflows.stage import write_progress
from workflows.stages import report as report_stage
from workflows.storage import Location, location

RUN_NAME = "toy<script>alert('run')</script>"
LABELS = ("1-RF", "2-RF <script>alert('label')</script>")
SAMPLERS = ("euler@1", "euler@2", "euler@100", "rk45@0.001")
REFERENCE = "rk45@0.001"
SHOWN = 60
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CODE = {"python": "3.x", "rectiflow": "test", "torch": None, "ray": None, "git": None}


# -- a fabricated run, in the stages' formats ----------------------------------------------------


class RunBuilder:
    """One configuration of a run: stages planned like :mod:`workflows.plan` (the run document's
    format), finished with real :class:`Manifest` s, evaluation files and training metrics parts."""

    def __init__(self, run: Location, name: str, salt: str = "a"):
        self.run, self.name, self.salt = run, name, salt
        self.stages: dict[str, dict] = {}
        self.configs: dict[str, dict] = {}

    def plan(self, name: str, kind: str, config: dict, inputs: dict[str, str] | None = None) -> dict:
        inputs = inputs or {}
        hashes = {role: self.stages[stage]["hash"] for role, stage in inputs.items()}
        if kind == "report":
            digest = stage_hash(kind, ReportConfig(name="toy").identity(), hashes)
        else:
            digest = stage_hash(kind, {"salt": self.salt, **config}, hashes)
        entry = {
            "name": name,
            "kind": kind,
            "hash": digest,
            "uri": self.run.join(f"{name}-{digest}").uri,
            "inputs": dict(inputs),
        }
        self.stages[name], self.configs[name] = entry, config
        return entry

    def folder(self, name: str) -> Location:
        return location(self.stages[name]["uri"])

    @property
    def key(self) -> str:
        return content_hash({name: entry["hash"] for name, entry in self.stages.items()})

    @property
    def document(self) -> Location:
        return self.run.join(RUN_DOCUMENT.format(key=self.key))

    def write_document(self) -> Location:
        self.document.write_json(
            {
                "name": self.name,
                "run": self.run.uri,
                "key": self.key,
                "config": {
                    "name": self.name,
                    "rounds": 2,
                    "evaluate": {"samplers": list(SAMPLERS)},
                    "note": "```backticks``` and <b>markup</b>",
                },
                "stages": list(self.stages.values()),
            }
        )
        return self.document

    def finish(self, name: str, details: dict, wall: float = 4.0) -> Manifest:
        entry = self.stages[name]
        manifest = Manifest(
            kind=entry["kind"],
            hash=entry["hash"],
            stage=self.folder(name).name,
            config=self.configs[name],
            identity=self.configs[name],
            inputs={
                role: {"uri": self.folder(stage).uri, "hash": self.stages[stage]["hash"]}
                for role, stage in entry["inputs"].items()
            },
            time={
                "started_at": "2025-01-01T00:00:00+00:00",
                "finished_at": "2025-01-01T00:01:00+00:00",
                "wall_seconds": wall,
                "cpu_seconds": 2 * wall,
                "gpu_seconds": 0.0,
                "host": "test",
                "pid": 1,
            },
            code=CODE,
            details=details,
            lease={"generation": 1, "run_id": "test", "attempt": "attempt-1"},
        )
        write_manifest(self.folder(name), manifest)
        return manifest


def write_metrics_part(stage: Location, attempt: int, steps: range, loss_scale: float) -> None:
    """A training loop's metrics part: one row per logged step."""
    step = np.asarray(steps, dtype=np.int64)
    table = pa.table(
        {
            "step": step,
            "loss": loss_scale / np.sqrt(step),
            "lr": np.full(len(step), 1e-3),
            "steps_per_second": np.full(len(step), 10.0 * attempt),
            "examples_per_second": np.full(len(step), 640.0),
        }
    )
    stage.join(f"attempt-{attempt}", "metrics", f"steps-{step[0]:08d}-{step[-1]:08d}.parquet").write_bytes(
        table_bytes(table)
    )


def finish_training(builder: RunBuilder, name: str, steps: int, loss_scale: float, resumed: bool = False) -> None:
    """Metrics parts every 20 steps; ``resumed``: attempt 1 stops after step 40 (last checkpoint
    at 30), attempt 2 logs steps 31… again with other losses."""
    folder = builder.folder(name)
    write_metrics_part(folder, 1, range(1, 21), loss_scale)
    write_metrics_part(folder, 1, range(21, 41), loss_scale)
    if resumed:
        write_metrics_part(folder, 2, range(31, steps + 1), loss_scale / 2)
    else:
        write_metrics_part(folder, 1, range(41, steps + 1), loss_scale)
    attempt = 2 if resumed else 1
    final = loss_scale / (2 if resumed else 1) / np.sqrt(steps)
    builder.finish(
        name,
        {
            "summary": f"{steps} steps on independent pairs, straight path, final loss {final:.4g}",
            "model": f"attempt-{attempt}/model",
            "steps": steps,
            "final_loss": float(final),
            "metrics": f"attempt-{attempt}/metrics",
        },
    )


def _points(rng: np.random.Generator, x: float, n: int) -> np.ndarray:
    centers = np.array([[x, -6.0], [x, 0.0], [x, 6.0]])
    return (centers[np.arange(n) % 3] + rng.normal(size=(n, 2))).astype(np.float32)


def finish_evaluation(builder: RunBuilder, name: str, label: str, round_number: int, straight: bool) -> list[dict]:
    """An evaluation stage's three files (in its attempt folder) and manifest; a straighter
    model has a smaller one-step distance and no crossings."""
    rng = np.random.default_rng(round_number)
    x0 = _points(np.random.default_rng(0), -10.0, SHOWN)
    target = x0 + np.array([20.0, 0.0], np.float32) if straight else _points(rng, 10.0, SHOWN)
    rows, samples, paths = [], {INDEPENDENT: _points(np.random.default_rng(9), 10.0, SHOWN)}, []
    for sampler in SAMPLERS:
        nfe = {"euler@1": 1, "euler@2": 2, "euler@100": 100, "rk45@0.001": 38}[sampler]
        error = (0.3 if straight else 3.0) / nfe
        rows.append(
            {
                "model": builder.stages[name]["inputs"]["model"],
                "label": label,
                "family": "rectified",
                "round": round_number,
                "k": None,
                "path": "straight",
                "sampler": sampler,
                "nfe_mean": float(nfe) if sampler != REFERENCE else 31.5,
                "nfe_max": nfe,
                "straightness": error / 10,
                "transport_cost": 20.5 + error,
                "pairing_ratio": 1.0 + error / 100,
                "crossing_pct": 0.0 if straight else 12.5,
                "w2": 0.2 + error,
                "mmd2": 0.001 * error,
                "one_step_distance": error,
                "wall_seconds": 0.5 * nfe,
                "cpu_seconds": nfe,
                "gpu_seconds": 0.0,
                "samples": 400,
                "ot_samples": 200,
                "seed": 1234,
                "model_hash": builder.stages[builder.stages[name]["inputs"]["model"]]["hash"],
            }
        )
        samples[sampler] = target + rng.normal(scale=error, size=target.shape).astype(np.float32)
        states = {"euler@1": 2, "euler@2": 3, "euler@100": 101}.get(sampler)
        if states:
            t = np.linspace(0.0, 1.0, states, dtype=np.float32)
            for sample in range(8):
                paths += [
                    (sampler, sample, step, t[step], (1 - t[step]) * x0[sample] + t[step] * target[sample])
                    for step in range(states)
                ]
    tables = {
        METRICS_FILE: pa.Table.from_pylist(rows, schema=METRICS_SCHEMA),
        SAMPLES_FILE: pa.table(
            {
                "sampler": pa.array([s for s in samples for _ in range(SHOWN)], pa.string()),
                "id": pa.array(np.tile(np.arange(SHOWN, dtype=np.int64), len(samples))),
                "x0": vectors(np.concatenate([x0] * len(samples))),
                "x1": vectors(np.concatenate(list(samples.values()))),
            }
        ),
        TRAJECTORIES_FILE: pa.table(
            {
                "sampler": pa.array([p[0] for p in paths], pa.string()),
                "id": pa.array([p[1] for p in paths], pa.int64()),
                "step": pa.array([p[2] for p in paths], pa.int64()),
                "t": pa.array([p[3] for p in paths], pa.float32()),
                "x": vectors(np.stack([p[4] for p in paths])),
            }
        ),
    }
    folder, files = builder.folder(name), {}
    for file, table in tables.items():
        data = table_bytes(table)
        folder.join("attempt-1", file).write_bytes(data)
        files[file] = {"path": f"attempt-1/{file}", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    subject = {
        "name": builder.stages[name]["inputs"]["model"],
        "label": label,
        "family": "rectified",
        "round": round_number,
        "k": None,
        "path": "straight",
        "teacher": None,
    }
    builder.finish(
        name,
        {
            "summary": f"{label}: 400 samples with {', '.join(SAMPLERS)}; reference {REFERENCE}",
            "subject": subject,
            "rows": rows,
            "independent": {"crossing_pct": 46.0, "transport_cost": 22.0, "pairing_ratio": 1.08},
            "files": files,
            "features": {},
            "solvers": list(SAMPLERS),
            "skipped_samplers": {},
        },
    )
    return rows


def eval_config(name: str) -> dict:
    return {
        "pi0": {"kind": "toy", "shape": [2]},
        "samples": 400,
        "ot_samples": 200,
        "seed": 1234,
        "reference_solver": REFERENCE,
        "samplers": list(SAMPLERS),
        "trajectories": 8,
        "subject": {"name": name},
    }


def fabricate_toy_run(run: Location, name: str = RUN_NAME, labels: tuple[str, str] = LABELS) -> RunBuilder:
    """train-1 → couple-1 → train-2 (resumed once) → couple-2, their evaluations, and a distillation
    still running (progress and metrics, no manifest) with its evaluation not started."""
    b = RunBuilder(run, name)
    b.plan("train-1", "train", {"seed": 1, "path": "straight", "steps": 50})
    b.plan("couple-1", "couple", {"seed": 11, "solver": "rk45@1e-4", "pairs": 4000}, {"teacher": "train-1"})
    b.plan(
        "train-2", "train", {"seed": 2, "path": "straight", "steps": 60}, {"coupling": "couple-1", "init": "train-1"}
    )
    b.plan("couple-2", "couple", {"seed": 12, "solver": "rk45@1e-4", "pairs": 4000}, {"teacher": "train-2"})
    b.plan(
        "distill-2", "train", {"seed": 3, "path": "straight", "steps": 100}, {"coupling": "couple-2", "init": "train-2"}
    )
    for model in ("train-1", "train-2", "distill-2"):
        b.plan(f"eval-{model}", "eval", eval_config(model), {"model": model})
    b.plan("report", "report", {"name": "toy"}, {stage: stage for stage in list(b.stages)})
    b.write_document()
    finish_training(b, "train-1", 50, 2.0)
    for k in (1, 2):
        b.finish(f"couple-{k}", {"summary": "4000 pairs by rk45@1e-4 (mean NFE 31.0), float32", "pairs": 4000})
    finish_training(b, "train-2", 60, 1.0, resumed=True)
    write_metrics_part(b.folder("distill-2"), 1, range(1, 41), 0.5)
    write_progress(b.folder("distill-2"), 40, 100, "steps", 10.0)
    finish_evaluation(b, "eval-train-1", labels[0], 1, straight=False)
    finish_evaluation(b, "eval-train-2", labels[1], 2, straight=True)
    return b


def fabricate_short_run(run: Location, name: str = RUN_NAME, salt: str = "b") -> RunBuilder:
    """Another configuration: train-1 and its evaluation, finished; the report stage not run yet."""
    b = RunBuilder(run, name, salt)
    b.plan("train-1", "train", {"seed": 5, "path": "straight", "steps": 50})
    b.plan("eval-train-1", "eval", eval_config("train-1"), {"model": "train-1"})
    b.plan("report", "report", {"name": "toy"}, {"train-1": "train-1", "eval-train-1": "eval-train-1"})
    b.write_document()
    finish_training(b, "train-1", 50, 3.0)
    finish_evaluation(b, "eval-train-1", "1-RF", 1, straight=False)
    return b


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> RunBuilder:
    """A run folder whose name is markup too (``<img …>``: a file name is user input)."""
    return fabricate_toy_run(location(str(tmp_path_factory.mktemp("report") / "run<img src=x onerror=alert(1)>")))


@pytest.fixture(scope="module")
def toy_report(toy_run, tmp_path_factory) -> dict[str, str]:
    """The toy run's report, written once into a folder of its own (figures take seconds)."""
    return write_report(toy_run.document, location(str(tmp_path_factory.mktemp("toy-report"))))


def _text(uri: str) -> str:
    return location(uri).read_bytes().decode()


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    return found


# -- the report ----------------------------------------------------------------------------------


def test_the_report_renders_in_a_browser(tmp_path, request):
    command = [browser(), *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    page = "file://" + request.getfixturevalue("toy_report")["html"]
    dom = subprocess.run([*command, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True).stdout
    rows = re.findall(r"<tr><td class=\"text\">([^<]*)</td><td class=\"text\">(euler@\d+|rk45@[0-9.e-]+)</td>", dom)
    assert len(rows) == 2 * 4 and {sampler for _, sampler in rows} == set(SAMPLERS)
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert len(images) == 5 and min(map(len, images)) > 10_000  # quality vs NFE, loss, pairs, paths, samples
    assert "<script" not in dom and "&lt;script&gt;alert('label')&lt;/script&gt;" in dom

    screenshot = tmp_path / "report.png"
    subprocess.run(
        [*command, f"--screenshot={screenshot}", "--window-size=1280,2000", page],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(screenshot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert image.size == (1280, 2000) and colours is not None and len(colours) > 200


def test_user_strings_are_escaped_and_the_page_is_self_contained(toy_report):
    page, markdown = _text(toy_report["html"]), _text(toy_report["md"])
    prose = re.sub(r"(`{3,})\n.*?\n\1", "", markdown, flags=re.S)  # code blocks show their text literally
    assert "````\n" in markdown and "name: toy<script>" in markdown and "name: toy<script>" not in prose
    for text in (page, prose):
        assert "<script" not in text and "<img src=x" not in text and "<b>markup" not in text
    assert "&lt;script&gt;alert(&#x27;run&#x27;)&lt;/script&gt;" in page
    assert "run&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;alert('label')&lt;/script&gt;" in markdown
    assert 'src="http' not in page and "<link" not in page  # nothing fetched: figures are data: URIs
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 5
    folder = os.path.dirname(location(toy_report["md"]).path)
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):  # the Markdown's PNGs lie beside it
        assert os.path.getsize(os.path.join(folder, name)) > 1_000


def test_rebuilding_from_storage_gives_the_same_numbers(toy_run, toy_report):
    first = toy_report
    second = write_report(toy_run.document)  # the report stage has not run: {run}/report-{key}/
    assert second["html"] == toy_run.run.join(f"report-{toy_run.key}", "report.html").uri
    for name in ("metrics", "md", "html"):
        assert location(first[name]).read_bytes() == location(second[name]).read_bytes()

    metrics = read_table(location(first["metrics"])).to_pylist()
    stored = [
        row
        for name in ("eval-train-1", "eval-train-2")
        for row in read_table(toy_run.folder(name).join("attempt-1", METRICS_FILE)).to_pylist()
    ]
    assert pd.DataFrame(metrics).equals(pd.DataFrame(stored)) and len(metrics) == 8  # NaN-aware
    markdown = location(first["md"]).read_bytes().decode()
    two_step = next(row for row in metrics if row["label"] == "1-RF" and row["sampler"] == "euler@2")
    assert f"| 1-RF | euler@2 | 2.0 | 2 | {number(two_step['w2'])} | {number(two_step['mmd2'], '.3g')} |" in markdown


def test_the_summary_and_the_unfinished_stages(toy_run, toy_report):
    results = load_run(toy_run.document)
    one, two = results.evaluations
    lines = summary_table(toy_run.document).splitlines()
    assert lines[0].split()[:3] == ["model", "crossing", "%"]
    assert lines[1].split()[:7] == ["independent", "pairs", "(Z0,", "X1", "~", "π1)", "46.00"]
    first_row, row = lines[2].split(), one.row_of("euler@1")
    assert one.coupling_row()["sampler"] == REFERENCE and first_row[1] == f"{one.coupling_row()['crossing_pct']:.2f}"
    assert first_row[0] == "1-RF" and first_row[4:6] == [f"{row['one_step_distance']:.3f}", f"{row['w2']:.3f}"]
    assert "2-RF <script>alert('label')</script>" in lines[3]
    assert lines[-2].startswith(f"coupling columns: Z1 of {REFERENCE}; 1-step columns: euler@1; 400 samples")
    assert lines[-1] == "not finished: distill-2, eval-distill-2"

    markdown = _text(toy_report["md"])
    hashes = {name: entry["hash"] for name, entry in toy_run.stages.items()}
    assert "6 of 8 stages finished" in markdown and "Not evaluated yet: eval-distill-2." in markdown
    assert (
        f"| distill-2 | train | not finished (40/100 steps) | {hashes['distill-2']} | "
        f"coupling: couple-2 ({hashes['couple-2']}); init: train-2 ({hashes['train-2']}) |"
    ) in markdown
    assert (
        f"| couple-1 | couple | finished | {hashes['couple-1']} | teacher: train-1 ({hashes['train-1']}) | 11 | "
        "rk45@1e-4 | 4000 pairs by rk45@1e-4 (mean NFE 31.0), float32 | 4.0 | 8.0 |"
    ) in markdown
    assert (
        f"| train-2 | train | finished | {hashes['train-2']} | coupling: couple-1 ({hashes['couple-1']}); "
        f"init: train-1 ({hashes['train-1']}) | 2 |  | 60 steps on independent pairs"
    ) in markdown
    assert (
        f"| eval-train-1 | eval | finished | {hashes['eval-train-1']} | model: train-1 ({hashes['train-1']}) | "
        f"1234 | {', '.join(SAMPLERS)} | 1-RF: 400 samples"
    ) in markdown
    assert "| report |" not in markdown  # the report does not list itself


def test_loss_curves_from_every_attempt(toy_run, toy_report):
    results = load_run(toy_run.document)
    curves = {curve.stage.name: curve for curve in results.curves}
    assert set(curves) == {"train-1", "train-2", "distill-2"}  # distill-2 is still running: its curve so far
    resumed = curves["train-2"]
    steps, loss = resumed.column("step"), resumed.column("loss")
    np.testing.assert_array_equal(steps, np.arange(1, 61))  # each step once
    assert resumed.attempts == [1, 2]
    np.testing.assert_allclose(loss[:30], 1.0 / np.sqrt(np.arange(1, 31)))  # attempt 1 before its checkpoint
    np.testing.assert_allclose(loss[30:], 0.5 / np.sqrt(np.arange(31, 61)))  # the steps attempt 2 logged again
    assert resumed.table["attempt"].to_pylist()[29:31] == [1, 2]

    markdown = _text(toy_report["md"])
    loss = os.path.join(os.path.dirname(location(toy_report["md"]).path), "figure-loss.png")
    assert "](figure-loss.png)" in markdown and os.path.getsize(loss) > 5_000
    assert (
        f"| train-2 | {markdown_text(LABELS[1])} | finished | 60 | {0.5 / np.sqrt(60):.4g} | 15 | 640 | 1, 2 |"
        in markdown
    )  # median steps/s of 30 rows at 10/s and 30 at 20/s
    assert "| distill-2 |  | not finished | 40 |" in markdown


def test_no_loss_curves_without_metrics(tmp_path):
    b = fabricate_short_run(location(str(tmp_path / "run")))
    shutil.rmtree(b.folder("train-1").join("attempt-1", "metrics").path)
    results = load_run(b.document)
    assert results.curves == []
    markdown = location(write_report(b.document, location(str(tmp_path / "out")))["md"]).read_bytes().decode()
    assert "figure-loss.png" not in markdown and "## Training" not in markdown and "figure-pairs.png" in markdown


def test_a_run_on_s3_gives_the_same_report(toy_run, toy_report, s3_bucket):
    """The same stored files under an S3 prefix (URIs in the documents and manifests rewritten)
    give the same table and the same text but for the run's location."""
    run = toy_run.run
    remote = location(s3_bucket).join("runs", "toy")
    for directory, _, files in os.walk(run.path):
        for name in files:
            relative = os.path.relpath(os.path.join(directory, name), run.path)
            if relative.startswith("report-"):
                continue
            data = open(os.path.join(directory, name), "rb").read()
            if name.endswith(".json"):
                data = data.decode().replace(json.dumps(run.uri)[1:-1], remote.uri).encode()
            remote.join(*relative.split(os.sep)).write_bytes(data)
    local_report = toy_report
    document = remote.join(toy_run.document.name)
    remote_report = write_report(document)
    assert remote_report["html"] == remote.join(f"report-{toy_run.key}", "report.html").uri
    assert location(remote_report["metrics"]).read_bytes() == location(local_report["metrics"]).read_bytes()
    assert summary_table(document) == summary_table(toy_run.document)
    local_md = location(local_report["md"]).read_bytes().decode()
    remote_md = location(remote_report["md"]).read_bytes().decode()
    assert remote_md == local_md.replace(markdown_text(run.uri), markdown_text(remote.uri))


def _copy_run(builder: RunBuilder, copy: Location) -> Location:
    """A copy of the run folder with the URIs in its documents and manifests rewritten; returns the
    copied run document."""
    shutil.copytree(builder.run.path, copy.path)
    for directory, _, files in os.walk(copy.path):
        for name in files:
            if name.endswith(".json"):
                path = os.path.join(directory, name)
                text = open(path).read().replace(json.dumps(builder.run.uri)[1:-1], copy.uri)
                open(path, "w").write(text)
    return copy.join(builder.document.name)


def test_changed_or_unlisted_files_are_named(toy_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no run document \(pipeline-…\.json\)"):
        write_report(location(str(tmp_path / "nothing")))
    document = _copy_run(toy_run, location(str(tmp_path / "copy")))
    metrics = location(toy_run.stages["eval-train-2"]["uri"].replace(toy_run.run.uri, str(tmp_path / "copy")))
    target = metrics.join("attempt-1", METRICS_FILE)
    stored, sink = target.read_bytes(), io.BytesIO()
    pq.write_table(read_table(target).slice(0, 3), sink)
    target.write_bytes(sink.getvalue())
    with pytest.raises(ValueError, match=r"metrics.parquet does not match the checksum in its _SUCCESS.json"):
        write_report(document, location(str(tmp_path / "out")))
    assert not os.path.exists(tmp_path / "out")  # nothing is written
    target.write_bytes(stored)
    manifest = read_manifest(metrics)
    del manifest.details["files"][SAMPLES_FILE]
    write_manifest(metrics, manifest)
    with pytest.raises(ValueError, match=r"_SUCCESS.json lists no samples.parquet with a path and a sha256"):
        load_run(document)


def test_an_image_run_gets_sample_grids(tmp_path):
    """Images (π0 of shape [C, R, R]): the sample grids, none of the 2D figures."""
    b = fabricate_short_run(location(str(tmp_path / "run")))
    folder = b.folder("eval-train-1")
    manifest = read_manifest(folder)
    rng = np.random.default_rng(0)
    samplers = [INDEPENDENT, *SAMPLERS]
    images = {
        SAMPLES_FILE: pa.table(
            {
                "sampler": pa.array([name for name in samplers for _ in range(16)], pa.string()),
                "id": pa.array(np.tile(np.arange(16, dtype=np.int64), len(samplers))),
                "x0": vectors(rng.uniform(-1, 1, size=(16 * len(samplers), 64))),
                "x1": vectors(rng.uniform(-1, 1, size=(16 * len(samplers), 64))),
            }
        ),
        TRAJECTORIES_FILE: pa.table(
            {
                "sampler": pa.array([], pa.string()),
                "id": pa.array([], pa.int64()),
                "step": pa.array([], pa.int64()),
                "t": pa.array([], pa.float32()),
                "x": vectors(np.zeros((0, 64))),
            }
        ),
    }
    files = dict(manifest.details["files"])
    for name, table in images.items():
        data = table_bytes(table)
        folder.join(files[name]["path"]).write_bytes(data)
        files[name] = {**files[name], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    config = {**manifest.config, "pi0": {"kind": "noise", "shape": [1, 8, 8]}}
    write_manifest(
        folder, Manifest(**{**manifest.to_json(), "config": config, "details": {**manifest.details, "files": files}})
    )
    out = tmp_path / "out"
    markdown = _text(write_report(b.document, location(str(out)))["md"])
    assert "](figure-image-samples.png)" in markdown and (out / "figure-image-samples.png").stat().st_size > 5_000
    assert "figure-pairs.png" not in markdown and "figure-trajectories.png" not in markdown


def test_a_run_with_nothing_finished_still_reports(tmp_path):
    run = location(str(tmp_path / "run"))
    stage = {"name": "train-1", "kind": "train", "hash": "abc", "uri": run.join("train-1-abc").uri, "inputs": {}}
    report = {
        "name": "report",
        "kind": "report",
        "hash": "def",
        "uri": run.join("report-def").uri,
        "inputs": {"train-1": "train-1"},
    }
    run.join("pipeline-k1.json").write_json(
        {"name": "empty", "run": run.uri, "key": "k1", "config": {}, "stages": [stage, report]}
    )
    uris = write_report(run)  # a run folder with a single configuration names it
    assert uris["md"] == run.join("report-k1", "report.md").uri
    markdown = location(uris["md"]).read_bytes().decode()
    assert "0 of 1 stages finished" in markdown and "No evaluation has finished yet." in markdown
    assert "| train-1 | train | not finished | abc |  |" in markdown
    assert read_table(location(uris["metrics"])).num_rows == 0
    assert summary_table(run).splitlines()[-1] == "not finished: train-1"


@pytest.mark.parametrize(
    "row, label",
    [
        ({"label": "VP ODE", "family": "baseline", "sampler": "sde@2000"}, "VP SDE"),
        ({"label": "sub-VP ODE", "family": "baseline", "sampler": "sde@500:0.5"}, "sub-VP SDE"),
        ({"label": "VP ODE", "family": "baseline", "sampler": "rk45@1e-05"}, "VP ODE"),
        ({"label": "2-RF", "family": "rectified", "sampler": "sde@100"}, "2-RF"),
    ],
)
def test_sde_rows_of_the_baselines_are_named_as_in_the_paper(row, label):
    assert display_label(row) == label


# -- configurations, the report stage, the command -----------------------------------------------


def test_the_report_stage_writes_into_its_attempt_folder(tmp_path):
    run = location(str(tmp_path / "runs" / "toy"))
    fabricate_toy_run(run, "toy")  # another configuration in the same folder
    b = fabricate_short_run(run, "toy")
    output = b.folder("report")
    inputs = {name: b.folder(name) for name in ("train-1", "eval-train-1")}
    manifest = report_stage.run(ReportConfig(name="toy"), inputs, output)
    assert manifest.kind == "report" and manifest.hash == b.stages["report"]["hash"]
    assert manifest.details["files"] == {
        "html": "attempt-0/report.html",
        "md": "attempt-0/report.md",
        "metrics": "attempt-0/metrics.parquet",
    }
    assert "figure-loss.png" in " ".join(manifest.details["figures"])
    assert manifest.details["summary"].startswith("report of 1 evaluations (4 model × sampler rows), 1 loss curves")
    written = output.join("attempt-0", "report.md").read_bytes()
    assert read_table(output.join("attempt-0", METRICS_FILE)).num_rows == 4
    assert report_stage.run(ReportConfig(name="toy"), inputs, output) == manifest  # finished: not run again

    results = load_run(b.document)
    assert report_folder(results) == output.join("attempt-0")
    rebuilt = write_report(b.document)  # `rectiflow report` after the run: the same files, in the same place
    assert rebuilt["md"] == output.join("attempt-0", "report.md").uri
    assert location(rebuilt["md"]).read_bytes() == written


def test_the_report_stage_needs_its_run_document(tmp_path):
    b = fabricate_short_run(location(str(tmp_path / "runs" / "toy")))
    b.document.delete()
    inputs = {name: b.folder(name) for name in ("train-1", "eval-train-1")}
    with pytest.raises(ValueError, match=r"no run document \(pipeline-…\.json\) in .* lists the report stage"):
        report_stage.run(ReportConfig(name="toy"), inputs, b.folder("report"))
    assert not b.folder("report").exists()


def test_two_configurations_under_one_name_keep_their_own_reports(tmp_path, capsys):
    """`rectiflow report RUN_FOLDER` rebuilds each configuration's report; each lists only its own stages."""
    run = location(str(tmp_path / "runs" / "toy"))
    long, short = fabricate_toy_run(run, "toy"), fabricate_short_run(run, "toy")
    os.utime(long.document.path, (1_700_000_000, 1_700_000_000))
    assert long.key != short.key and [d.key for d in run_documents(run)] == [short.key, long.key]  # newest first
    with pytest.raises(ValueError, match=r"holds 2 configurations \(pipeline-\w+\.json, pipeline-\w+\.json\)"):
        load_run(run)
    assert commands.report(argparse.Namespace(run=run.uri)) == commands.EXIT_OK
    out = capsys.readouterr().out
    assert out.index(f"configuration {short.key}") < out.index(f"configuration {long.key}")
    assert "not finished: distill-2, eval-distill-2" in out and out.count("independent pairs (Z0, X1 ~ π1)") == 2
    reports = {}
    for b in (short, long):
        html = run.join(f"report-{b.key}", "report.html")
        assert f"report: {html.uri}" in out
        reports[b.key] = _text(run.join(f"report-{b.key}", "report.md").uri)
    for own, other in ((long, short), (short, long)):
        text = reports[own.key]
        assert all(entry["hash"] in text for name, entry in own.stages.items() if name != "report")
        assert not any(entry["hash"] in text for entry in other.stages.values())
    assert "couple-1" in reports[long.key] and "couple-1" not in reports[short.key]
    assert commands.report(argparse.Namespace(run=str(tmp_path / "nothing"))) == commands.EXIT_FAILED
    assert "has no run document" in capsys.readouterr().err


def test_the_report_imports_neither_ray_nor_torch():
    code = (
        "import sys, workflows.report, workflows.stage_table, workflows.config, workflows.stages.report; "
        "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert result.stdout.strip() == "[]"


def test_the_training_metrics_folder_is_the_training_loops():
    """The report reads the folder the training loop writes (read from its source: importing it
    would start torch and Ray Train)."""
    import ast

    import workflows.stages

    source = os.path.join(os.path.dirname(workflows.stages.__file__), "train_loop.py")
    constants = {
        node.targets[0].id: node.value.value
        for node in ast.parse(open(source).read()).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    assert constants["METRICS_DIR"] == TRAINING_METRICS_DIR

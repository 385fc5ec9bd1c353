"""The report of a fabricated toy run (real evaluation stages): it renders in a real browser,
escapes user strings, is rebuilt from storage with the same numbers, on a local disk and S3."""

import io
import os
import re
import shutil
import subprocess

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.workflows.helpers import fabricate_toy_run
from workflows.report import display_label, load_run, number, summary_table, write_report
from workflows.stage import write_manifest
from workflows.stages.evaluate import EvalSettings, read_table
from workflows.storage import location

RUN_NAME = "toy<script>alert('run')</script>"
LABELS = ("1-RF", "2-RF <script>alert('label')</script>")
SETTINGS = EvalSettings(
    samplers=["euler@1", "euler@2", "euler@100", "rk45@1e-3"],
    samples=400,
    ot_samples=200,
    reference_solver="rk45@1e-3",
    trajectories=16,
    workers=2,
)
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


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, ray_session):
    """A run folder whose name is markup too (``<img …>``: a file name is user input)."""
    run = location(str(tmp_path_factory.mktemp("report") / "run<img src=x onerror=alert(1)>"))
    stages = fabricate_toy_run(run, RUN_NAME, SETTINGS, LABELS)
    return run, stages


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    return found


def test_the_report_renders_in_a_browser(toy_run, tmp_path):
    run, _ = toy_run
    uris = write_report(run, location(str(tmp_path / "report")))
    page = "file://" + uris["html"]
    command = [browser(), *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*command, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True).stdout
    rows = re.findall(r"<tr><td class=\"text\">([^<]*)</td><td class=\"text\">(euler@\d+|rk45@[0-9.e-]+)</td>", dom)
    assert len(rows) == 2 * 4 and {sampler for _, sampler in rows} == {"euler@1", "euler@2", "euler@100", "rk45@0.001"}
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert len(images) == 4 and min(map(len, images)) > 10_000  # quality vs NFE, pairs, paths, samples
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


def test_user_strings_are_escaped(toy_run, tmp_path):
    run, _ = toy_run
    uris = write_report(run, location(str(tmp_path / "report")))
    page = location(uris["html"]).read_bytes().decode()
    markdown = location(uris["md"]).read_bytes().decode()
    prose = re.sub(r"(`{3,})\n.*?\n\1", "", markdown, flags=re.S)  # code blocks show their text literally
    assert "```\n" in markdown and "name: toy<script>" in markdown and "name: toy<script>" not in prose
    for text in (page, prose):
        assert "<script" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(&#x27;run&#x27;)&lt;/script&gt;" in page
    assert "run&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;alert('label')&lt;/script&gt;" in markdown


def test_rebuilding_from_storage_gives_the_same_numbers(toy_run, tmp_path):
    run, stages = toy_run
    first = write_report(run, location(str(tmp_path / "first")))
    second = write_report(run)  # default: the plan's report folder
    assert second["html"] == location(stages["report"]["uri"]).join("report.html").uri
    assert location(first["metrics"]).read_bytes() == location(second["metrics"]).read_bytes()
    assert location(first["md"]).read_bytes() == location(second["md"]).read_bytes()
    report_stage = location(stages["report"]["uri"])
    write_manifest(report_stage, {"kind": "report", "hash": stages["report"]["hash"], "files": second})
    third = write_report(run)  # `rectiflow report` after the run: the report's own status is not part of it
    assert location(third["md"]).read_bytes() == location(second["md"]).read_bytes()

    metrics = read_table(location(first["metrics"])).to_pylist()
    stored = [
        row
        for name in ("eval-train-1", "eval-train-2")
        for row in read_table(location(stages[name]["uri"]).join("metrics.parquet")).to_pylist()
    ]
    assert pd.DataFrame(metrics).equals(pd.DataFrame(stored)) and len(metrics) == 8  # NaN-aware
    markdown = location(first["md"]).read_bytes().decode()
    two_step = next(row for row in metrics if row["label"] == "1-RF" and row["sampler"] == "euler@2")
    assert f"| 1-RF | euler@2 | 2.0 | 2 | {number(two_step['w2'])} |" in markdown


def test_the_summary_and_the_unfinished_stages(toy_run, tmp_path):
    run, _ = toy_run
    results = load_run(run)
    one, two = results.evaluations
    text = summary_table(run)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["model", "crossing", "%"]
    assert lines[1].startswith("independent pairs (Z0, X1 ~ π1)")
    first_row = lines[2].split()
    row = one.row_of("euler@1")
    assert first_row[0] == "1-RF" and first_row[4:6] == [f"{row['one_step_distance']:.3f}", f"{row['w2']:.3f}"]
    assert first_row[1] == f"{one.coupling_row()['crossing_pct']:.2f}" and one.coupling_row()["sampler"] == "rk45@0.001"
    assert two.row_of("euler@1")["one_step_distance"] < row["one_step_distance"]
    assert lines[-1] == "not finished: distill-2, eval-distill-2"

    markdown = location(write_report(run, location(str(tmp_path / "report")))["md"]).read_bytes().decode()
    assert "| distill-2 | train | not finished (40/100 steps) |" in markdown
    assert "Not evaluated yet: eval-distill-2." in markdown
    assert re.search(
        r"\| couple-1 \| couple \| finished \| \w+ \| teacher: train-1 \(\w+\) \| 11 \| rk45@1e-4 \|", markdown
    )
    assert re.search(
        r"\| train-2 \| train \| finished \| \w+ \| pairs: couple-1 \(\w+\); warm start: train-1", markdown
    )


def test_a_run_on_s3_gives_the_same_report(toy_run, s3_bucket, tmp_path):
    """The same stored files under an S3 prefix (the plan's URIs rewritten) give the same table
    and the same text but for the run's location."""
    run, _ = toy_run
    remote = location(s3_bucket).join("runs", "toy")
    for directory, _, files in os.walk(run.path):
        for name in files:
            relative = os.path.relpath(os.path.join(directory, name), run.path)
            data = open(os.path.join(directory, name), "rb").read()
            if name == "pipeline.json":
                data = data.decode().replace(run.uri, remote.uri).encode()
            remote.join(*relative.split(os.sep)).write_bytes(data)
    local_report = write_report(run, location(str(tmp_path / "local")))
    remote_report = write_report(remote)
    assert remote_report["html"].startswith(remote.uri)
    assert location(remote_report["metrics"]).read_bytes() == location(local_report["metrics"]).read_bytes()
    assert summary_table(remote) == summary_table(run)


def test_bad_runs_are_named(toy_run, tmp_path):
    run, stages = toy_run
    with pytest.raises(FileNotFoundError, match=r"pipeline.json does not exist: .* is not a rectiflow run"):
        write_report(location(str(tmp_path / "nothing")))
    copy = location(str(tmp_path / "copy"))
    shutil.copytree(run.path, copy.path)
    document = copy.join("pipeline.json").read_json()
    for entry in document["stages"]:
        entry["uri"] = entry["uri"].replace(run.uri, copy.uri)
    copy.join("pipeline.json").write_json(document)
    metrics = location(stages["eval-train-2"]["uri"].replace(run.uri, copy.uri)).join("metrics.parquet")
    table = read_table(metrics)
    sink = io.BytesIO()
    pq.write_table(table.slice(0, 3), sink)
    metrics.write_bytes(sink.getvalue())
    with pytest.raises(ValueError, match=r"metrics.parquet does not match the checksum in its _SUCCESS.json"):
        write_report(copy, location(str(tmp_path / "out")))


def test_a_run_with_nothing_finished_still_reports(tmp_path):
    run = location(str(tmp_path / "run"))
    stage = {"name": "train-1", "kind": "train", "hash": "abc", "uri": run.join("train-1-abc").uri, "needs": []}
    report = {
        "name": "report",
        "kind": "report",
        "hash": "def",
        "uri": run.join("report-def").uri,
        "needs": ["train-1"],
    }
    run.join("pipeline.json").write_json({"name": "empty", "run": run.uri, "config": {}, "stages": [stage, report]})
    uris = write_report(run)
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

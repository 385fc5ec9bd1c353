"""Local storage refuses writes: a full disk (a real, tiny tmpfs) and a read-only folder (as root
too: the run drops the capabilities that let root ignore permissions) → a clear error that names
the path, and no stage is marked done."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.workflows.pipeline_helpers import ONE_ROUND, TINY
from tests.workflows.test_couple import make_config, make_teacher, run_coupling_stage
from workflows.config import load_pipeline
from workflows.manifest import SUCCESS_FILE
from workflows.plan import build_plan
from workflows.storage import location


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs (needs root to mount; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_coupling_naming_the_shard_and_marks_nothing_done(ray_session, tmp_path, small_disk):
    teacher = make_teacher(location(str(tmp_path / "teacher")))
    output = location(str(small_disk / "couple"))
    # 12 shards of 2000 pairs (~45 KiB each): the disk holds about two of them
    config = make_config(pairs=24000, shard_size=2000, batch_size=2000, forward_batch=2000, solver="euler@1", workers=1)
    with pytest.raises(Exception) as error:
        run_coupling_stage(config, teacher, output)
    text = str(error.value)
    assert "No space left on device" in text, text[-3000:]
    assert f"cannot create {small_disk}/couple/shard-0000" in text, text[-3000:]
    assert not output.join(SUCCESS_FILE).exists()
    assert not [name for name in os.listdir(output.path) if ".tmp" in name]  # no partial shard left


DENIED_RUN = """
import sys
from workflows.config import load_pipeline
from workflows.pipeline import PipelineRun
from workflows.plan import build_plan
plan = build_plan(load_pipeline(sys.argv[1], sys.argv[3:], storage=sys.argv[2]))
try:
    PipelineRun(plan).run()
except Exception as error:
    print(f"{type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(3)
"""


def _denied_run(storage, read_only) -> subprocess.CompletedProcess:
    """The one-round pipeline run on ``storage`` by a process that may not write into the folder
    ``read_only`` (as root too: it drops the capabilities that let root ignore permissions)."""
    command = [sys.executable, "-c", DENIED_RUN, TINY, str(storage), *ONE_ROUND]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only folder does not deny root")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", *command]
    os.chmod(read_only, 0o555)
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(read_only, 0o755)


def test_a_read_only_run_folder_fails_the_run_before_any_work_naming_the_path(tmp_path):
    """Changed by design: the first write of a run is now the probe of conditional writes in the
    run folder (before the run document ``pipeline-{key}.json``), so that is what names it."""
    storage = tmp_path / "storage"
    run_folder = storage / "tiny"
    run_folder.mkdir(parents=True)
    result = _denied_run(storage, run_folder)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Permission denied" in result.stderr, result.stderr[-3000:]
    assert f"cannot create {run_folder}/_PROBE-" in result.stderr, result.stderr[-3000:]
    assert not [path for path in storage.rglob(SUCCESS_FILE)]
    assert os.listdir(run_folder) == []


def test_a_read_only_stage_folder_fails_that_stage_naming_the_path(tmp_path):
    """The run folder is writable (probe, run document) but train-1's folder is not: taking its
    lease fails naming the file, the stage fails, every stage that needs it is reported as not run,
    and nothing is marked done. No Ray work starts: the lease comes before any."""
    storage = tmp_path / "storage"
    plan = build_plan(load_pipeline(TINY, ONE_ROUND, storage=str(storage)))
    stage = plan.stages["train-1"].output
    os.makedirs(stage.path)
    result = _denied_run(storage, stage.path)
    assert result.returncode == 3, result.stderr[-3000:]
    message = result.stderr
    assert "PipelineFailed" in message and "train-1: StorageIOError" in message, message[-3000:]
    assert f"cannot create {stage.path}/_LEASE.json" in message and "Permission denied" in message, message[-3000:]
    assert "not run because of them: eval-train-1, report" in message, message[-3000:]
    assert not [path for path in storage.rglob(SUCCESS_FILE)]
    assert os.listdir(stage.path) == []
    assert set(os.listdir(plan.run.path)) == {stage.name, plan.document_location.name}

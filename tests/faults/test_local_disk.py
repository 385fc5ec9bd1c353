"""Local storage refuses writes: a full disk (a real, tiny tmpfs) and a read-only folder (as root
too: the run drops the capabilities that let root ignore permissions) → a clear error that names
the path, and no stage is marked done."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.workflows.pipeline_helpers import TINY
from tests.workflows.test_couple import make_config, make_teacher
from workflows.stage import SUCCESS_FILE
from workflows.stages.couple import run_coupling_stage
from workflows.storage import location


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs (needs root to mount; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True, text=True)
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
from workflows.pipeline import PipelineFailed, PipelineRun
from workflows.plan import build_plan
plan = build_plan(load_pipeline(sys.argv[1], storage=sys.argv[2]))
try:
    PipelineRun(plan).run()
except PipelineFailed as error:
    print(error, file=sys.stderr)
    sys.exit(3)
"""


def test_a_read_only_stage_folder_fails_the_run_naming_the_path(tmp_path):
    storage = tmp_path / "storage"
    plan_root = storage / "tiny"
    plan_root.mkdir(parents=True)
    command = [sys.executable, "-c", DENIED_RUN, TINY, str(storage)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only folder does not deny root")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", *command]
    os.chmod(plan_root, 0o555)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(plan_root, 0o755)
    assert result.returncode != 0
    assert "Permission denied" in result.stderr, result.stderr[-3000:]
    assert f"cannot write {plan_root}/pipeline.json" in result.stderr, result.stderr[-3000:]
    assert not [path for path in storage.rglob(SUCCESS_FILE)]
    assert os.listdir(plan_root) == []

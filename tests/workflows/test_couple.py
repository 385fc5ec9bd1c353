"""The coupling stage: batch/worker invariance, exactly-once resume (after deletions and after a
SIGKILL), storage formats read by other clients, a closed form, and bad input."""

import logging
import signal
import subprocess
import sys
import time

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import torch
from pydantic import ValidationError

from rf.coupling import generate_pairs
from rf.solvers import Solver
from tests.workflows.helpers import break_weights, constant_field, drop_hash, fake_manifest, random_mlp, write_teacher
from workflows.couplings import Coupling
from workflows.distributions import sample_by_id
from workflows.manifest import SUCCESS_FILE
from workflows.settings import CouplingConfig, NoiseSpec, stage_hash
from workflows.shard_format import ShardError, shard_count, shard_name
from workflows.stage import PROGRESS_FILE
from workflows.stages import couple
from workflows.stages.couple import STAGE_FILE, CouplingError, ShardJob, ShardWriter, coupling_format
from workflows.storage import location

TEACHER_HASH = "0123456789abcdef"


def make_teacher(folder, model=None):
    """A finished training stage holding ``model`` (default: :func:`random_mlp`)."""
    write_teacher(folder, model or random_mlp(), TEACHER_HASH)
    return folder


def run_coupling_stage(config: CouplingConfig, teacher, output):
    return couple.run(config, {"teacher": teacher}, output)


def coupling_hash(config: CouplingConfig, teacher_hash: str) -> str:
    return stage_hash("couple", config.identity(), {"teacher": teacher_hash})


def make_config(**overrides) -> CouplingConfig:
    values = dict(
        pairs=480,
        shard_size=120,
        solver="rk45@1e-3",
        seed=3,
        pi0=NoiseSpec(shape=[2]),
        batch_size=64,
        forward_batch=32,
        workers=1,
    )
    return CouplingConfig(**{**values, **overrides})


def shard_files(folder) -> dict[str, bytes]:
    return {name: folder.join(name).read_bytes() for name in folder.list_names() if name.startswith("shard-")}


def modified(folder) -> dict[str, object]:
    """Modification time of every object in ``folder`` (local mtime or S3 LastModified)."""
    times = {}
    for name in folder.list_names():
        info = folder.fs.info(folder.join(name).path)
        times[name] = info.get("mtime") or info.get("LastModified")
    return times


def wait_for_a_new_second(folder) -> None:
    """S3's LastModified counts whole seconds: let one pass so that a rewrite shows."""
    if not folder.is_local:
        time.sleep(1.1)


@pytest.fixture
def reference(tmp_path):
    """The shard files of a coupling as a plain in-process loop writes them, one shard at a time."""
    threads = torch.get_num_threads()

    def make(config: CouplingConfig, teacher) -> dict[str, bytes]:
        folder = location(str(tmp_path / "reference"))
        folder.delete()
        job = ShardJob(
            teacher=teacher,
            output=folder,
            format=coupling_format(config, TEACHER_HASH),
            pairs=config.pairs,
            batch_size=config.batch_size,
            forward_batch=config.forward_batch,
            precision="fp32",
            compile=False,
            cpus=1,
            gpus=0,
        )
        writer = ShardWriter(job)
        for index in range(shard_count(config.pairs, config.shard_size)):
            writer.process({"shard": index, "present": False})
        return shard_files(folder)

    yield make
    torch.set_num_threads(threads)


def assert_each_id_once(output, pairs: int) -> None:
    coupling = Coupling.open(output)
    ids = np.concatenate([coupling.read(entry)[0] for entry in coupling.shards])
    assert ids.tolist() == list(range(pairs))


def test_pairs_do_not_depend_on_batch_size_or_workers(storage_root, ray_session, reference, caplog):
    caplog.set_level(logging.INFO, logger="rectiflow.couple")
    root = location(storage_root)
    teacher = make_teacher(root.join("teacher"))
    one = make_config(workers=1, batch_size=64)
    two = make_config(workers=2, batch_size=256)
    first = run_coupling_stage(one, teacher, root.join("one"))
    second = run_coupling_stage(two, teacher, root.join("two"))

    files = shard_files(root.join("one"))
    assert sorted(files) == [shard_name(s) for s in range(4)]
    assert files == shard_files(root.join("two")) == reference(one, teacher)
    assert first.details["shards"] == second.details["shards"] and first.hash == coupling_hash(one, TEACHER_HASH)
    assert_each_id_once(root.join("two"), 480)
    assert (
        first.details["nfe"] == second.details["nfe"] and first.details["nfe"]["max"] > first.details["nfe"]["min"] > 2
    )
    assert any("480/480 pairs (100.0%)" in record.getMessage() for record in caplog.records)


def test_resume_rewrites_only_the_missing_shards(storage_root, ray_session, reference):
    root = location(storage_root)
    teacher, output = make_teacher(root.join("teacher")), root.join("couple")
    config = make_config(workers=2)
    first = run_coupling_stage(config, teacher, output)
    for name in (shard_name(1), shard_name(3), SUCCESS_FILE):
        output.join(name).delete()
    before = modified(output)
    wait_for_a_new_second(output)

    manifest = run_coupling_stage(config.model_copy(update={"workers": 1, "batch_size": 256}), teacher, output)
    after = modified(output)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {shard_name(1), shard_name(3), SUCCESS_FILE, PROGRESS_FILE}
    assert (manifest.details["shards_written"], manifest.details["shards_reused"]) == (2, 2)
    assert (
        manifest.details["shards"] == first.details["shards"]
        and manifest.details["bytes_written"] < manifest.details["bytes"]
    )
    assert shard_files(output) == reference(config, teacher)
    assert_each_id_once(output, 480)


KILLED_RUN = """
import sys, ray
from workflows.settings import CouplingConfig
from workflows.stages import couple
from workflows.storage import location
address, config, teacher, output = sys.argv[1:]
ray.init(address=address, log_to_driver=False)
couple.run(CouplingConfig.model_validate_json(config), {"teacher": location(teacher)}, location(output))
"""


def wait_until_settled(folder, seconds: float = 1.5, timeout: float = 60.0) -> None:
    """Until the listing of ``folder`` has not changed for ``seconds`` (the killed run's actors are gone)."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        names = folder.list_names()
        if names != last:
            last, since = names, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
        time.sleep(0.1)
    raise AssertionError(f"{folder.uri} kept changing after its run was killed")


def test_a_killed_run_resumes_exactly_once(storage_root, ray_session, reference, tmp_path):
    root = location(storage_root)
    teacher, output = make_teacher(root.join("teacher")), root.join("couple")
    config = make_config(shard_size=20, batch_size=20)
    address = ray.get_runtime_context().gcs_address
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN, address, config.model_dump_json(), teacher.uri, output.uri],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while len(shard_files(output)) < 2:
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run made no shards in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    wait_until_settled(output)
    before = modified(output)
    shards_before = [name for name in before if name.startswith("shard-")]
    assert SUCCESS_FILE not in before and STAGE_FILE in before and 2 <= len(shards_before) < 24
    wait_for_a_new_second(output)

    manifest = run_coupling_stage(config.model_copy(update={"workers": 2}), teacher, output)
    after = modified(output)
    assert all(after[name] == before[name] for name in shards_before)
    assert manifest.details["shards_written"] == 24 - len(shards_before) and manifest.details["shards_reused"] == len(
        shards_before
    )
    assert shard_files(output) == reference(config, teacher)
    assert_each_id_once(output, 480)


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_compact_formats_round_trip_and_any_client_reads_them(tmp_path, ray_session, dtype):
    root = location(str(tmp_path / "storage"))
    teacher, output = make_teacher(root.join("teacher")), root.join("couple")
    config = make_config(solver="euler@8", dtype=dtype, store_x0=False)
    run_coupling_stage(config, teacher, output)

    ids = np.arange(480)
    x0 = sample_by_id(config.pi0, config.seed, ids)
    x1 = generate_pairs(random_mlp(), Solver.parse("euler@8"), x0, chunk=32).x1
    coupling = Coupling.open(output)
    assert all(coupling.read(entry)[1] is None for entry in coupling.shards)  # x0 comes from the seed
    read_x1 = torch.cat([coupling.read(entry)[2] for entry in coupling.shards])
    if dtype == "float16":
        torch.testing.assert_close(read_x1, x1.half().float(), atol=0, rtol=0)
    else:
        torch.testing.assert_close(read_x1, x1.clamp(-1, 1), atol=0.5 / 127.5 + 1e-6, rtol=0)

    schema = pq.read_schema(output.join(shard_name(0)).path)
    assert schema.names == ["pair_id", "x1"] and b'"shape": [2]' in schema.metadata[b"rectiflow"]
    frame = pd.read_parquet(output.path)
    assert sorted(frame["pair_id"]) == ids.tolist()
    count, distinct, smallest, largest = duckdb.sql(
        f"SELECT count(*), count(DISTINCT pair_id), min(pair_id), max(pair_id) FROM '{output.path}/shard-*.parquet'"
    ).fetchall()[0]
    assert (count, distinct, smallest, largest) == (480, 480, 0, 479)


@pytest.mark.parametrize("solver, nfe", [("euler@4", 4), ("rk45@1e-5", None)])
def test_a_constant_field_moves_every_x0_by_b(tmp_path, ray_session, solver, nfe):
    b = [0.75, -1.5]
    root = location(str(tmp_path))
    teacher, output = make_teacher(root.join("teacher"), constant_field(b)), root.join("couple")
    manifest = run_coupling_stage(make_config(pairs=200, shard_size=100, solver=solver), teacher, output)
    coupling = Coupling.open(output)
    for entry in coupling.shards:
        _, x0, x1 = coupling.read(entry)
        torch.testing.assert_close(x1, x0 + torch.tensor(b), atol=1e-6, rtol=0)
    assert manifest.details["nfe"]["min"] == manifest.details["nfe"]["max"] == (nfe or manifest.details["nfe"]["min"])
    assert manifest.details["nfe"]["total"] == 200 * manifest.details["nfe"]["min"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pairs": 0}, "pairs"),
        ({"shard_size": 500}, r"shard_size \(500\) is larger than pairs \(480\)"),
        ({"shard_size": 0}, "shard_size"),
        ({"solver": "rk4@10"}, "not of the form euler@N"),
        ({"dtype": "uint8"}, "uint8 stores x1 only"),
        ({"workers": 0}, "workers"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ValidationError, match=message):
        make_config(**overrides)


def test_config_defaults_and_identity():
    config = CouplingConfig(pairs=50, solver="rk45@0.00001", seed=0, pi0=NoiseSpec(shape=[2]))
    assert config.shard_size == 50 and config.solver == "rk45@1e-05"
    assert CouplingConfig(pairs=10**6, solver="euler@1", seed=0, pi0=NoiseSpec(shape=[2])).shard_size == 10_000
    faster = config.model_copy(update={"workers": 4, "batch_size": 1024, "gpus_per_worker": 1.0})
    assert faster.identity() == config.identity() and "workers" not in config.identity()


@pytest.mark.parametrize(
    "spoil, pi0, message",
    [
        (lambda teacher: teacher.delete(), [2], r"teacher .* is not a finished stage"),
        (break_weights, [2], "not a valid safetensors file"),
        (drop_hash, [2], "is not a stage manifest: it has no hash"),
        (lambda teacher: None, [3], r"takes inputs of shape \[2\], but pi0 draws samples of shape \[3\]"),
    ],
)
def test_a_bad_teacher_is_refused_and_nothing_is_written(storage_root, spoil, pi0, message):
    root = location(storage_root)
    teacher, output = make_teacher(root.join("teacher")), root.join("couple")
    spoil(teacher)
    with pytest.raises(CouplingError, match=message):
        run_coupling_stage(make_config(pi0=NoiseSpec(shape=pi0)), teacher, output)
    assert output.list_names() == []


def test_an_output_of_another_configuration_is_refused(tmp_path, ray_session):
    root = location(str(tmp_path))
    teacher, output = make_teacher(root.join("teacher")), root.join("couple")
    config = make_config(pairs=80, shard_size=40, solver="euler@2")
    run_coupling_stage(config, teacher, output)
    output.join(SUCCESS_FILE).delete()
    before = modified(output)

    with pytest.raises(
        CouplingError, match=r"already holds shards of another configuration \(seed: 3 there vs 4 here\)"
    ):
        run_coupling_stage(config.model_copy(update={"seed": 4}), teacher, output)
    output.join(STAGE_FILE).delete()
    before.pop(STAGE_FILE)
    with pytest.raises(ShardError, match=r"shard-000000.parquet belongs to another coupling \(seed: 3 there vs 4 here"):
        run_coupling_stage(config.model_copy(update={"seed": 4}), teacher, output)
    smaller = make_config(pairs=40, shard_size=40, solver="euler@2")
    with pytest.raises(CouplingError, match="holds shard-000001.parquet, but this coupling has only 1 shards"):
        run_coupling_stage(smaller, teacher, output)
    assert modified(output) == before

    finished = run_coupling_stage(config, teacher, output)
    assert finished.details["shards_written"] == 0
    teacher.delete()  # a finished stage is returned without touching its teacher
    assert run_coupling_stage(config, teacher, output) == finished
    with pytest.raises(
        CouplingError, match=r"finished couple stage of another configuration \(seed: 3 there vs 4 here\)"
    ):
        run_coupling_stage(config.model_copy(update={"seed": 4}), teacher, output)
    trained = root.join("trained")
    fake_manifest(trained, "train", TEACHER_HASH, {})
    with pytest.raises(CouplingError, match="is a finished stage of kind 'train', not 'couple'"):
        run_coupling_stage(config, teacher, trained)


def test_bf16_pairs_are_their_own_stage_close_to_fp32(tmp_path, ray_session):
    """``precision: bf16`` runs the network under bf16 autocast: it is recorded in the manifest,
    it changes the stage hash (pairs are a function of the precision), and the pairs stay close
    to fp32's (the states are integrated in fp32)."""
    root = location(str(tmp_path))
    teacher = make_teacher(root.join("teacher"))
    fp32, bf16 = make_config(solver="euler@8"), make_config(solver="euler@8", precision="bf16")
    assert coupling_hash(fp32, TEACHER_HASH) != coupling_hash(bf16, TEACHER_HASH)
    manifests = {
        name: run_coupling_stage(config, teacher, root.join(name)) for name, config in (("fp32", fp32), ("bf16", bf16))
    }
    assert manifests["bf16"].config["precision"] == "bf16" and manifests["bf16"].identity["precision"] == "bf16"
    x1 = {
        name: torch.cat(
            [Coupling.open(root.join(name)).read(entry)[2] for entry in Coupling.open(root.join(name)).shards]
        )
        for name in manifests
    }
    x0 = sample_by_id(fp32.pi0, fp32.seed, np.arange(480))
    difference = (x1["bf16"] - x1["fp32"]).norm(dim=1).mean() / (x1["fp32"] - x0).norm(dim=1).mean()
    assert 0 < difference < 0.05

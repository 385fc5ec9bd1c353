"""Corrupt and hostile input: a training stage refuses a corrupt coupling before any training step
(naming the file, writing nothing), and loading weights or shards never unpickles anything."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rf.checkpoint import CheckpointError
from rf.noise import noise
from tests.workflows.helpers import random_mlp, write_coupling, write_teacher
from tests.workflows.test_train import config, run_train_stage
from workflows.couplings import Coupling
from workflows.manifest import SUCCESS_FILE, read_manifest, write_manifest
from workflows.shard_format import ShardError, sha256, shard_name
from workflows.storage import location
from workflows.weights import load_stage_model, model_folder


class _Exploit:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _relist(folder, name: str, data: bytes) -> None:
    """Replace shard ``name`` with ``data`` and list it in the manifest with matching size and
    checksum (a corrupt producer, not a corrupt disk)."""
    folder.join(name).write_bytes(data)
    manifest = read_manifest(folder)
    shards = [
        {**entry, "sha256": sha256(data), "bytes": len(data)} if entry["name"] == name else entry
        for entry in manifest.details["shards"]
    ]
    write_manifest(folder, dataclasses.replace(manifest, details={**manifest.details, "shards": shards}))


def _truncated(folder, name):
    data = folder.join(name).read_bytes()
    folder.join(name).write_bytes(data[: len(data) // 2])


def _truncated_and_relisted(folder, name):
    data = folder.join(name).read_bytes()
    _relist(folder, name, data[: len(data) // 2])


def _flipped_byte(folder, name):
    """Same size, one byte changed: only the checksum can tell."""
    data = bytearray(folder.join(name).read_bytes())
    data[len(data) // 3] ^= 0xFF
    folder.join(name).write_bytes(bytes(data))


def _rewritten(folder, name, transform):
    """The shard's table transformed, written with its rectiflow footer kept (a producer that
    knows the format but writes the wrong thing)."""
    original = pq.read_table(pa.BufferReader(folder.join(name).read_bytes()))
    table = transform(original).replace_schema_metadata(original.schema.metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _relist(folder, name, sink.getvalue().to_pybytes())


def _wrong_vector_size(folder, name):
    def three(table):
        x1 = np.stack(table.column("x1").to_numpy(zero_copy_only=False)).astype(np.float32)
        x1 = np.concatenate([x1, x1[:, :1]], axis=1)
        column = pa.FixedSizeListArray.from_arrays(pa.array(x1.reshape(-1)), 3)
        return table.set_column(table.column_names.index("x1"), "x1", column)

    _rewritten(folder, name, three)


def _wrong_schema(folder, name):
    _rewritten(folder, name, lambda table: table.rename_columns(["pair_id", "z0", "x1"]))


def _float64_values(folder, name):
    def widen(table):
        x1 = np.stack(table.column("x1").to_numpy(zero_copy_only=False)).astype(np.float64)
        column = pa.FixedSizeListArray.from_arrays(pa.array(x1.reshape(-1)), 2)
        return table.set_column(table.column_names.index("x1"), "x1", column)

    _rewritten(folder, name, widen)


def _pickle_as_shard(folder, name, marker=None):
    _relist(folder, name, pickle.dumps(_Exploit(str(marker))))


CORRUPTIONS = {  # (spoil, message); the size is checked by the driver's listing, the rest by verify()'s tasks
    "truncated": (_truncated, r"has \d+ bytes, the manifest says"),
    "truncated, manifest rewritten": (_truncated_and_relisted, "is not a readable rectiflow shard"),
    "one byte flipped": (_flipped_byte, "checksum mismatch"),
    "wrong vector size": (
        _wrong_vector_size,
        r"column x1 has type fixed_size_list<\w+: float>\[3\], expected vectors of 2",
    ),
    "wrong columns": (_wrong_schema, r"has columns \['pair_id', 'z0', 'x1'\]"),
    "wrong value type": (_float64_values, "expected vectors of 2 = 2 float32 values"),
    "missing": (lambda folder, name: folder.join(name).delete(), f"missing shard {shard_name(5)}"),
    "pickle": (_pickle_as_shard, "is not a readable rectiflow shard"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_coupling_fails_training_before_any_step(ray_session, tmp_path, corruption):
    spoil, message = CORRUPTIONS[corruption]
    root = location(str(tmp_path))
    x0 = noise(1, np.arange(512), (2,))
    pairs = root.join("pairs")
    write_coupling(pairs, x0, x0 + 1, shard_size=64)
    marker = tmp_path / "pwned"
    if spoil is _pickle_as_shard:
        spoil(pairs, shard_name(5), marker)
    else:
        spoil(pairs, shard_name(5))
    output = root.join("train")
    with pytest.raises(ShardError, match=message) as error:
        run_train_stage(config(steps=20, checkpoint_every=5, workers=2), output, pairs)
    assert pairs.join(shard_name(5)).uri in str(error.value) or shard_name(5) in str(error.value)
    assert not output.exists(), "the stage wrote something (a checkpoint?) before refusing its input"
    assert not marker.exists()


def test_a_corrupt_shard_is_refused_up_front_not_midway(tmp_path):
    """A reader learns of a corrupt shard before it uses any, not after the others. Changed by
    design: :meth:`Coupling.open` reads the manifest and one listing, never a shard (so a driver
    opening a coupling of millions of pairs reads none of them); a same-size corruption is found
    by :meth:`Coupling.verify`, which checks every shard up front (in Ray tasks when Ray runs)."""
    root = location(str(tmp_path))
    x0 = noise(1, np.arange(256), (2,))
    write_coupling(root.join("pairs"), x0, x0 + 1, shard_size=64)
    _flipped_byte(root.join("pairs"), shard_name(3))
    coupling = Coupling.open(root.join("pairs"))  # the size is right: the listing cannot tell
    assert coupling.pairs == 256
    with pytest.raises(ShardError, match=f"{shard_name(3)} does not match the manifest"):
        coupling.verify()
    with pytest.raises(ShardError, match=f"{shard_name(3)} does not match the manifest"):
        coupling.read(coupling.shards[3])  # and a reader that skipped verify() is refused the shard


@pytest.mark.parametrize("file", ["model.safetensors", "model.json"])
def test_stage_weights_that_are_a_pickle_are_refused_and_run_no_code(tmp_path, file):
    root = location(str(tmp_path))
    stage = root.join("train-1")
    write_teacher(stage, random_mlp())
    marker = tmp_path / "pwned"
    model_folder(stage, read_manifest(stage)).join(file).write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(
        CheckpointError, match="not a valid safetensors file and will not be unpickled|is not a model spec"
    ):
        load_stage_model(stage)
    assert not marker.exists()
    assert stage.join(SUCCESS_FILE).exists()  # refused on load, whatever the manifest says

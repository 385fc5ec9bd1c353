import json

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.workflows.helpers import fake_manifest
from workflows.couplings import Coupling, CouplingFormat, decode_shard, encode_shard, inspect_shard
from workflows.distributions import sample_by_id
from workflows.settings import NoiseSpec
from workflows.shard_format import ShardEntry, ShardError, sha256, shard_count, shard_name, shard_range
from workflows.storage import location

SHAPE = [2, 3]


def make_format(**overrides) -> CouplingFormat:
    values = dict(
        shape=SHAPE, seed=7, pi0=NoiseSpec(shape=SHAPE), teacher_hash="t" * 16, solver="euler@4", shard_size=5
    )
    return CouplingFormat(**{**values, **overrides})


def pairs_of(fmt: CouplingFormat, index: int, pairs: int):
    start, stop = shard_range(index, fmt.shard_size, pairs)
    ids = np.arange(start, stop)
    x0 = sample_by_id(fmt.pi0, fmt.seed, ids)
    x1 = torch.tanh(x0 + 0.25)
    return ids, x0, x1, torch.full((len(ids),), 4)


def encoded(fmt: CouplingFormat, index: int = 0, pairs: int = 12) -> bytes:
    return encode_shard(fmt, index, *pairs_of(fmt, index, pairs))


def entry_of(data: bytes, fmt: CouplingFormat, index: int = 0, pairs: int = 12) -> ShardEntry:
    return inspect_shard(data, fmt, index, pairs, "test")[0]


def test_opening_a_coupling_reads_no_shard_and_verify_names_the_bad_one(tmp_path, monkeypatch):
    """Open reads the manifest and one listing; verify (in Ray tasks when Ray runs) reads every
    shard: a flipped byte in any one of them is named."""
    folder, fmt = location(str(tmp_path)), make_format()
    write_coupling_manifest(folder, fmt, write_coupling(folder, fmt))
    from workflows.storage import Location

    reads = []
    original = Location.read_bytes
    monkeypatch.setattr(Location, "read_bytes", lambda self: reads.append(self.name) or original(self))
    coupling = Coupling.open(folder)
    assert [name for name in reads if name.startswith("shard-")] == []
    monkeypatch.undo()
    coupling.verify()
    for index in range(3):
        whole = folder.join(shard_name(index)).read_bytes()
        data = bytearray(whole)
        data[10] ^= 0xFF
        folder.join(shard_name(index)).write_bytes(bytes(data))
        with pytest.raises(ShardError, match=rf"{shard_name(index)} does not match the manifest .*checksum mismatch"):
            coupling.verify()
        folder.join(shard_name(index)).write_bytes(whole)


def test_shard_layout():
    assert shard_name(3) == "shard-000003.parquet"
    assert shard_count(12, 5) == 3 and shard_count(10, 5) == 2
    assert [shard_range(s, 5, 12) for s in range(3)] == [(0, 5), (5, 10), (10, 12)]


@pytest.mark.parametrize(
    "dtype, x0_stored", [("float32", True), ("float16", True), ("float16", False), ("uint8", False)]
)
def test_round_trip(dtype, x0_stored):
    fmt = make_format(dtype=dtype, x0_stored=x0_stored)
    ids, x0, x1, _ = pairs_of(fmt, 2, 12)
    data = encoded(fmt, 2)
    read_ids, read_x0, read_x1 = decode_shard(data, fmt, entry_of(data, fmt, 2), "test")
    assert read_ids.tolist() == [10, 11] and read_x1.shape == (2, *SHAPE)
    tolerance = {"float32": 0.0, "float16": 1e-3, "uint8": 0.5 / 127.5 + 1e-6}[dtype]
    torch.testing.assert_close(read_x1, x1, atol=tolerance, rtol=0)
    if x0_stored:
        torch.testing.assert_close(read_x0, x0, atol=tolerance, rtol=0)
    else:
        assert read_x0 is None  # drawn from (π0, seed, pair id) where the model runs


def test_encoding_is_deterministic_and_self_describing():
    fmt = make_format(dtype="float16")
    data = encoded(fmt)
    assert data == encoded(fmt)
    info = json.loads(pq.read_schema(pa.BufferReader(data)).metadata[b"rectiflow"])
    assert info["coupling"]["shape"] == SHAPE and info["coupling"]["dtype"] == "float16"
    assert (info["nfe_sum"], info["nfe_max"], info["nfe_min"]) == (20, 4, 4)


def test_any_parquet_client_reads_a_shard(tmp_path):
    for dtype in ("float32", "float16", "uint8"):
        fmt = make_format(dtype=dtype, x0_stored=dtype != "uint8")
        (tmp_path / f"{dtype}.parquet").write_bytes(encoded(fmt))
        x1 = pairs_of(fmt, 0, 12)[2].reshape(5, -1)
        frame = pd.read_parquet(tmp_path / f"{dtype}.parquet")
        assert frame["pair_id"].tolist() == list(range(5)) and len(frame["x1"][0]) == 6
        rows = duckdb.sql(f"SELECT pair_id, x1 FROM '{tmp_path / dtype}.parquet' ORDER BY pair_id").fetchall()
        assert [row[0] for row in rows] == list(range(5))
        if dtype != "uint8":
            np.testing.assert_allclose(np.array([row[1] for row in rows]), x1.numpy(), atol=1e-3)


def test_uint8_is_smaller_than_float16():
    images = make_format(shape=[3, 8, 8], pi0=NoiseSpec(shape=[3, 8, 8]), shard_size=50)
    sizes = {
        dtype: len(encoded(images.model_copy(update={"dtype": dtype, "x0_stored": False}), pairs=50))
        for dtype in ("float32", "float16", "uint8")
    }
    assert sizes["uint8"] < sizes["float16"] < sizes["float32"]


def test_non_finite_values_are_refused():
    fmt = make_format()
    ids, x0, x1, nfe = pairs_of(fmt, 0, 12)
    x1[1, 0, 0] = float("nan")
    with pytest.raises(ShardError, match="shard 0 column x1 has non-finite values"):
        encode_shard(fmt, 0, ids, x0, x1, nfe)
    with pytest.raises(ShardError, match="overflows float16"):
        encode_shard(make_format(dtype="float16"), 0, ids, x0, x0 * 1e6, nfe)
    with pytest.raises(ShardError, match="uint8 storage is for x1 only"):
        encode_shard(make_format(dtype="uint8"), 0, ids, x0, x1, nfe)


def test_inspect_checks_the_footer():
    fmt = make_format()
    data = encoded(fmt, 1)
    entry, nfe = inspect_shard(data, fmt, 1, 12, "s1")
    assert entry == ShardEntry(1, shard_name(1), 5, 10, 5, sha256(data), len(data))
    assert nfe == {"nfe_sum": 20, "nfe_max": 4, "nfe_min": 4}
    with pytest.raises(ShardError, match=r"belongs to another coupling \(seed: 7 there vs 8 here"):
        inspect_shard(data, make_format(seed=8), 1, 12, "s1")
    with pytest.raises(ShardError, match="holds shard 1 with 5 rows, expected shard 2 with the 2 pairs"):
        inspect_shard(data, fmt, 2, 12, "s1")
    with pytest.raises(ShardError, match="s1 is not a readable rectiflow shard"):
        inspect_shard(data[:-100], fmt, 1, 12, "s1")


def write_coupling(folder, fmt: CouplingFormat, pairs: int = 12) -> list[ShardEntry]:
    entries = []
    for index in range(shard_count(pairs, fmt.shard_size)):
        data = encoded(fmt, index, pairs)
        folder.join(shard_name(index)).write_bytes(data)
        entries.append(entry_of(data, fmt, index, pairs))
    return entries


def write_coupling_manifest(folder, fmt, entries, pairs=12):
    details = {"format": fmt.model_dump(mode="json"), "pairs": pairs, "shards": [entry.as_dict() for entry in entries]}
    fake_manifest(folder, "couple", "c" * 16, details)


def test_coupling_reads_and_verifies(storage_root):
    folder, fmt = location(storage_root).join("couple"), make_format()
    entries = write_coupling(folder, fmt)
    write_coupling_manifest(folder, fmt, entries)
    coupling = Coupling.open(folder)
    ids = np.concatenate([coupling.read(entry)[0] for entry in coupling.shards])
    assert ids.tolist() == list(range(12)) and coupling.hash == "c" * 16

    folder.join(shard_name(1)).write_bytes(encoded(make_format(seed=8), 1))
    with pytest.raises(ShardError, match="checksum mismatch"):
        coupling.read(coupling.shards[1])
    folder.join(shard_name(2)).delete()
    with pytest.raises(ShardError, match="is missing shard shard-000002.parquet"):
        Coupling.open(folder)


@pytest.mark.parametrize(
    "layout",
    [lambda e: [e[0], e[0], e[2]], lambda e: [e[1], e[0], e[2]], lambda e: e[:2]],
    ids=["duplicate", "order", "short"],
)
def test_coupling_refuses_a_manifest_that_does_not_cover_each_id_once(tmp_path, layout):
    folder, fmt = location(str(tmp_path)), make_format()
    entries = write_coupling(folder, fmt)
    write_coupling_manifest(folder, fmt, layout(entries), pairs=12)
    with pytest.raises(
        ShardError, match=r"the shards are not shard-000000.parquet … covering positions \[0, 12\) once each"
    ):
        Coupling.open(folder)

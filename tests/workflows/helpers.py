"""Test scaffolding: hand-made coupling stages and teacher stages with known contents."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from workflows.distributions import NoiseSpec
from workflows.shards import CouplingFormat, ShardEntry, encode_shard, sha256, shard_count, shard_name, shard_range
from workflows.stage import write_manifest
from workflows.storage import Location
from workflows.weights import write_model


def _with_nan_x1(data: bytes, row: int) -> bytes:
    """The shard re-written with x1 of one row set to NaN (the writer refuses NaN itself)."""
    table = pq.read_table(pa.BufferReader(data))
    x1 = np.stack(table.column("x1").to_numpy(zero_copy_only=False)).astype(np.float32)
    x1[row, 0] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(x1.reshape(-1)), x1.shape[1])
    table = table.set_column(table.column_names.index("x1"), "x1", column)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_coupling(
    output: Location,
    x0: torch.Tensor,
    x1: torch.Tensor,
    shard_size: int,
    seed: int = 0,
    stage_hash: str = "testcoupling",
    nan_at: int | None = None,
) -> CouplingFormat:
    """A finished coupling stage holding exactly the given pairs (x0 stored); ``nan_at`` puts a
    NaN into x1 of that pair, listed with a matching checksum (a corrupt producer)."""
    shape = list(x0.shape[1:])
    fmt = CouplingFormat(
        shape=shape, seed=seed, pi0=NoiseSpec(shape=shape), teacher_hash="none", solver="given", shard_size=shard_size
    )
    entries = []
    pairs = len(x0)
    for index in range(shard_count(pairs, shard_size)):
        start, stop = shard_range(index, shard_size, pairs)
        data = encode_shard(fmt, index, np.arange(start, stop), x0[start:stop], x1[start:stop], torch.ones(stop - start))
        if nan_at is not None and start <= nan_at < stop:
            data = _with_nan_x1(data, nan_at - start)
        output.join(shard_name(index)).write_bytes(data)
        entries.append(ShardEntry(index, shard_name(index), start, stop - start, sha256(data), len(data)).as_dict())
    write_manifest(output, {"hash": stage_hash, "coupling": fmt.model_dump(mode="json"), "shards": entries, "pairs": pairs})
    return fmt


def write_teacher(output: Location, model: torch.nn.Module, stage_hash: str = "testteacher") -> None:
    """A finished training stage whose final weights are ``model``'s."""
    write_model(output, model)
    write_manifest(output, {"hash": stage_hash, "model": "model"})

"""The coupling shard format: Parquet files of reflow pairs, and their verified reading.

Shard ``s`` of a coupling with shard size S holds pair ids [s·S, min((s+1)·S, N)) in order and is
named ``shard-{s:06d}.parquet``. Columns:

- ``pair_id`` int64;
- ``x0`` (unless omitted) and ``x1``: fixed-size lists of float32 / float16 (``uint8`` for x1 of
  images in [−1, 1], stored as round((x + 1)·127.5)), one flattened example per row. Values must
  be finite (a NaN or an overflow to float16 is refused when the shard is encoded). Encodings:
  float32 BYTE_STREAM_SPLIT, uint8 DELTA_BINARY_PACKED (Parquet has no 8-bit physical type, so a
  plain uint8 costs 4 bytes a value before compression), float16 PLAIN (DuckDB cannot read
  BYTE_STREAM_SPLIT float16); all with zstd.

The file's key/value metadata ``rectiflow`` holds the :class:`CouplingFormat` (shape, dtype,
seed, π0, teacher hash, solver) and the shard's NFE statistics, so any Parquet client (pandas,
pyarrow, duckdb) can read and interpret it. When x0 is omitted it is regenerated from (π0, seed,
pair_id) on read. Readers verify each file against the manifest (size, sha256, schema, rows).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict

from workflows.distributions import DistributionSpec, sample_by_id
from workflows.stage import describe_differences, read_manifest
from workflows.storage import Location

FORMAT_VERSION = 1
METADATA_KEY = b"rectiflow"
StoredDtype = Literal["float32", "float16", "uint8"]
_ARROW_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "uint8": pa.uint8()}
_ENCODINGS = {"float32": "BYTE_STREAM_SPLIT", "float16": "PLAIN", "uint8": "DELTA_BINARY_PACKED"}
_NFE_KEYS = ("nfe_sum", "nfe_max", "nfe_min")
_VERIFY_THREADS = 8


class ShardError(ValueError):
    """A shard or coupling manifest is missing, corrupt, or does not match what was expected."""


class CouplingFormat(BaseModel):
    """What a reader needs to interpret the shards of one coupling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: list[int]
    dtype: StoredDtype = "float32"
    x0_stored: bool = True
    seed: int
    pi0: DistributionSpec
    teacher_hash: str
    solver: str
    shard_size: int

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


def shard_range(index: int, shard_size: int, pairs: int) -> tuple[int, int]:
    """The pair ids [start, stop) of shard ``index``."""
    start = index * shard_size
    return start, min(start + shard_size, pairs)


def shard_count(pairs: int, shard_size: int) -> int:
    return -(-pairs // shard_size)


def _encode(values: torch.Tensor, dtype: StoredDtype, what: str) -> pa.FixedSizeListArray:
    flat = values.reshape(values.shape[0], -1).numpy()
    if not np.isfinite(flat).all():
        raise ShardError(f"{what} has non-finite values (NaN or infinity); the teacher or solver diverged")
    if dtype == "uint8":
        flat = np.clip(np.rint((flat.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    else:
        with np.errstate(over="ignore"):
            flat = flat.astype(dtype)
        if not np.isfinite(flat).all():
            raise ShardError(f"{what} overflows {dtype} (|x| > {np.finfo(dtype).max:g}); store it as float32")
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=_ARROW_TYPES[dtype]), flat.shape[1])


def _decode(column: pa.ChunkedArray, dtype: StoredDtype, rows: int, shape: list[int]) -> np.ndarray:
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    values = values.astype(np.float32)
    if dtype == "uint8":
        values = values / 127.5 - 1.0
    return values.reshape(rows, *shape)


def encode_shard(
    fmt: CouplingFormat, index: int, pair_ids: np.ndarray, x0: torch.Tensor, x1: torch.Tensor, nfe: torch.Tensor
) -> bytes:
    """One shard as Parquet bytes. Deterministic: the same pairs give the same bytes."""
    if fmt.dtype == "uint8" and fmt.x0_stored:
        raise ShardError("uint8 storage is for x1 only: omit x0 (x0_stored=false) with dtype uint8")
    columns = {"pair_id": pa.array(np.asarray(pair_ids, dtype=np.int64))}
    values = {"x0": x0, "x1": x1} if fmt.x0_stored else {"x1": x1}
    for name, tensor in values.items():
        columns[name] = _encode(tensor, fmt.dtype, f"shard {index} column {name}")
    info = {
        "format_version": FORMAT_VERSION,
        "coupling": fmt.model_dump(mode="json"),
        "shard": index,
        "nfe_sum": int(nfe.sum()),
        "nfe_max": int(nfe.max()),
        "nfe_min": int(nfe.min()),
    }
    table = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(info, sort_keys=True).encode()})
    encodings = {f"{name}.list.element": _ENCODINGS[fmt.dtype] for name in values}
    return parquet_bytes(table, ["pair_id"], encodings)


def parquet_bytes(table: pa.Table, statistics: list[str], encodings: dict[str, str] | None = None) -> bytes:
    """``table`` as one zstd row group without dictionaries, statistics on ``statistics`` only:
    the same table always gives the same bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        use_dictionary=False,
        write_statistics=statistics,
        row_group_size=max(1, table.num_rows),
        **({"column_encoding": encodings} if encodings else {}),
    )
    return sink.getvalue().to_pybytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    """A shard as listed in the coupling manifest."""

    index: int
    name: str
    start_id: int
    rows: int
    sha256: str
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def inspect_shard(
    data: bytes, fmt: CouplingFormat, index: int, pairs: int, source: str
) -> tuple[ShardEntry, dict[str, int]]:
    """(manifest entry, NFE statistics) of the bytes of shard ``index`` of a coupling of ``pairs``
    pairs, after checking from the file's footer that it is that shard: readable Parquet, written
    for ``fmt``, for this index, with the rows of its id range. :class:`ShardError` otherwise."""
    try:
        footer = pq.read_metadata(pa.BufferReader(data))
        info = json.loads(footer.metadata[METADATA_KEY])
        nfe = {key: int(info[key]) for key in _NFE_KEYS}
    except (pa.ArrowInvalid, OSError, KeyError, TypeError, ValueError) as error:
        raise ShardError(f"shard {source} is not a readable coupling shard ({error!r}); delete it to regenerate it") from None
    expected = fmt.model_dump(mode="json")
    if info.get("coupling") != expected:
        differences = describe_differences(expected, info.get("coupling") or {})
        raise ShardError(f"shard {source} belongs to another coupling ({differences})")
    start, stop = shard_range(index, fmt.shard_size, pairs)
    if info.get("shard") != index or footer.num_rows != stop - start:
        raise ShardError(
            f"shard {source} holds shard {info.get('shard')} with {footer.num_rows} rows, "
            f"expected shard {index} with the {stop - start} pairs [{start}, {stop})"
        )
    return ShardEntry(index, shard_name(index), start, stop - start, sha256(data), len(data)), nfe


def check_shard(data: bytes, fmt: CouplingFormat, entry: ShardEntry, source: str) -> None:
    """Check the bytes of a shard against its manifest entry (size, sha256) and, from the Parquet
    footer alone, its schema (columns, vector size, value type) and row count; :class:`ShardError`
    naming ``source`` otherwise."""
    if len(data) != entry.bytes or sha256(data) != entry.sha256:
        raise ShardError(
            f"shard {source} does not match the manifest ({len(data)} bytes, expected {entry.bytes}; "
            "checksum mismatch): it was changed or truncated after the coupling stage finished"
        )
    try:
        footer = pq.read_metadata(pa.BufferReader(data))
        schema = footer.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as error:
        raise ShardError(f"shard {source} is not a readable Parquet file: {error}") from None
    expected = ["pair_id", *(["x0"] if fmt.x0_stored else []), "x1"]
    if schema.names != expected:
        raise ShardError(f"shard {source} has columns {schema.names}, expected {expected}")
    if not pa.types.is_integer(schema.field("pair_id").type):
        raise ShardError(f"shard {source}: column pair_id has type {schema.field('pair_id').type}, expected int64")
    for name in expected[1:]:
        column_type = schema.field(name).type
        if (
            not pa.types.is_fixed_size_list(column_type)
            or column_type.list_size != fmt.dim
            or column_type.value_type != _ARROW_TYPES[fmt.dtype]
        ):
            raise ShardError(
                f"shard {source}: column {name} has type {column_type}, expected vectors of "
                f"{fmt.dim} = {'x'.join(map(str, fmt.shape))} {fmt.dtype} values"
            )
    if footer.num_rows != entry.rows:
        raise ShardError(f"shard {source} has {footer.num_rows} rows, the manifest says {entry.rows}")


def decode_shard(
    data: bytes, fmt: CouplingFormat, entry: ShardEntry, source: str
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(pair ids, x0, x1) of a shard, x0 regenerated when omitted; verifies everything."""
    check_shard(data, fmt, entry, source)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as error:
        raise ShardError(f"shard {source} is not a readable Parquet file: {error}") from None
    ids = table.column("pair_id").to_numpy()
    if table.num_rows != entry.rows or (
        entry.rows and not np.array_equal(ids, np.arange(entry.start_id, entry.start_id + entry.rows))
    ):
        raise ShardError(f"shard {source} holds other pair ids than [{entry.start_id}, {entry.start_id + entry.rows})")
    x1 = torch.from_numpy(_decode(table.column("x1"), fmt.dtype, entry.rows, fmt.shape))
    if fmt.x0_stored:
        x0 = torch.from_numpy(_decode(table.column("x0"), fmt.dtype, entry.rows, fmt.shape))
    else:
        x0 = sample_by_id(fmt.pi0, fmt.seed, ids)
    return ids, x0, x1


@dataclass(frozen=True)
class Coupling:
    """A finished coupling stage's shards, ready to be read and verified."""

    location: Location
    format: CouplingFormat
    shards: tuple[ShardEntry, ...]
    pairs: int
    hash: str

    @classmethod
    def open(cls, uri: Location, verify: bool = True) -> "Coupling":
        """Read the manifest and check that every listed shard is present with its size; with
        ``verify`` (the default) also read every shard once and check its checksum, schema and
        rows (:meth:`verify`), so that a consumer fails before it uses any pair, never midway."""
        manifest = read_manifest(uri)
        try:
            fmt = CouplingFormat.model_validate(manifest["coupling"])
            shards = tuple(ShardEntry(**entry) for entry in manifest["shards"])
            pairs = int(manifest["pairs"])
            stage_hash = str(manifest["hash"])
        except (KeyError, TypeError, ValueError) as error:
            raise ShardError(f"{uri.uri}/_SUCCESS.json is not a coupling manifest: {error}") from None
        layout = [(entry.index, entry.name, entry.start_id, entry.rows) for entry in shards]
        expected = []
        for index in range(shard_count(pairs, fmt.shard_size)):
            start, stop = shard_range(index, fmt.shard_size, pairs)
            expected.append((index, shard_name(index), start, stop - start))
        if layout != expected:
            raise ShardError(
                f"{uri.uri}: the manifest's shards are not shards 0 … {len(expected) - 1} covering pair ids "
                f"[0, {pairs}) once each in order of {fmt.shard_size}"
            )
        present = set(uri.list_names())
        for entry in shards:
            if entry.name not in present:
                raise ShardError(f"coupling {uri.uri} is missing shard {entry.name} listed in its manifest")
            size = uri.join(entry.name).size()
            if size != entry.bytes:
                raise ShardError(
                    f"shard {uri.join(entry.name).uri} has {size} bytes, the manifest says {entry.bytes}"
                )
        coupling = cls(uri, fmt, shards, pairs, stage_hash)
        if verify:
            coupling.verify()
        return coupling

    def verify(self, threads: int = _VERIFY_THREADS) -> None:
        """Read every shard and check it against the manifest (:func:`check_shard`); the first
        problem raises :class:`ShardError` naming the shard's URI."""

        def check(entry: ShardEntry) -> None:
            target = self.location.join(entry.name)
            try:
                data = target.read_bytes()
            except FileNotFoundError:
                raise ShardError(f"shard {target.uri} listed in the manifest is missing") from None
            check_shard(data, self.format, entry, target.uri)

        with ThreadPoolExecutor(max(1, min(threads, len(self.shards)))) as pool:
            for _ in pool.map(check, self.shards):
                pass

    def read(self, entry: ShardEntry) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(pair ids, x0, x1) of one shard, verified against the manifest."""
        target = self.location.join(entry.name)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise ShardError(f"shard {target.uri} listed in the manifest is missing") from None
        return decode_shard(data, self.format, entry, target.uri)

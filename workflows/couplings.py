"""The coupling shard format: Parquet files of reflow pairs, and their verified reading.

Shard ``s`` of a coupling of N pairs with shard size S holds pair ids [s·S, min((s+1)·S, N)) in
order (the vocabulary of :mod:`workflows.shard_format`). Columns:

- ``pair_id`` int64;
- ``x0`` (unless omitted) and ``x1``: fixed-size lists of float32 / float16 (``uint8`` for x1 of
  images in [−1, 1], stored as round((x + 1)·127.5)), one flattened example per row. Values must
  be finite (a NaN or an overflow to float16 is refused when the shard is encoded). Encodings:
  float32 BYTE_STREAM_SPLIT, uint8 DELTA_BINARY_PACKED (Parquet has no 8-bit physical type, so a
  plain uint8 costs 4 bytes a value before compression), float16 PLAIN (DuckDB cannot read
  BYTE_STREAM_SPLIT float16); all with zstd.

The footer's ``rectiflow`` metadata holds the :class:`CouplingFormat` (shape, dtype, seed, π0,
teacher hash, solver) and the shard's NFE statistics, so any Parquet client (pandas, pyarrow,
duckdb) can read and interpret it. When x0 is omitted it is regenerated from (π0, seed, pair_id).

Opening a coupling (:meth:`Coupling.open`) reads the manifest and one listing of the folder —
never a shard. Content is verified where bytes are read anyway: every reader checks a shard's
size and sha256 before using it; :meth:`Coupling.verify` checks every shard up front in parallel
Ray tasks (or threads without Ray), so a consumer can fail before its first step.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from workflows.manifest import describe_differences, read_manifest
from workflows.settings import DistributionSpec, StoredDtype, Strict
from workflows.shard_format import (
    ShardEntry,
    ShardError,
    check_layout,
    footer_info,
    parquet_bytes,
    read_table,
    sha256,
    shard_name,
    shard_range,
    with_metadata,
)
from workflows.storage import Location

_ARROW_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "uint8": pa.uint8()}
_ENCODINGS = {"float32": "BYTE_STREAM_SPLIT", "float16": "PLAIN", "uint8": "DELTA_BINARY_PACKED"}
NFE_KEYS = ("nfe_sum", "nfe_max", "nfe_min")
_VERIFY_TASKS = 16
_VERIFY_BYTES_PER_TASK = 1 << 30
"""Verification runs one task per GiB of shards (at most :data:`_VERIFY_TASKS`): a small coupling
is checked by one worker instead of paying for many worker processes."""


class CouplingFormat(Strict):
    """What a reader needs to interpret the shards of one coupling."""

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

    @property
    def columns(self) -> list[str]:
        return ["pair_id", *(["x0"] if self.x0_stored else []), "x1"]


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
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
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
        "kind": "coupling",
        "coupling": fmt.model_dump(mode="json"),
        "shard": index,
        "nfe_sum": int(nfe.sum()),
        "nfe_max": int(nfe.max()),
        "nfe_min": int(nfe.min()),
    }
    encodings = {f"{name}.list.element": _ENCODINGS[fmt.dtype] for name in values}
    return parquet_bytes(with_metadata(pa.table(columns), info), ["pair_id"], encodings)


def inspect_shard(
    data: bytes, fmt: CouplingFormat, index: int, pairs: int, source: str
) -> tuple[ShardEntry, dict[str, int]]:
    """(manifest entry, NFE statistics) of the bytes of shard ``index`` of a coupling of ``pairs``
    pairs, after checking from the footer that it is that shard: a readable rectiflow shard,
    written for ``fmt``, for this index, with the rows of its id range. :class:`ShardError` otherwise."""
    footer, info = footer_info(data, source)
    if info.get("kind") != "coupling" or info.get("coupling") != fmt.model_dump(mode="json"):
        differences = describe_differences(fmt.model_dump(mode="json"), info.get("coupling") or {})
        raise ShardError(f"shard {source} belongs to another coupling ({differences or info.get('kind')})")
    start, stop = shard_range(index, fmt.shard_size, pairs)
    if info.get("shard") != index or footer.num_rows != stop - start:
        raise ShardError(
            f"shard {source} holds shard {info.get('shard')} with {footer.num_rows} rows, "
            f"expected shard {index} with the {stop - start} pairs [{start}, {stop})"
        )
    nfe = {key: int(info[key]) for key in NFE_KEYS}
    return ShardEntry(index, shard_name(index), start, stop, stop - start, sha256(data), len(data)), nfe


def check_shard(data: bytes, fmt: CouplingFormat, entry: ShardEntry, source: str) -> None:
    """Check the bytes of a shard against its manifest entry (size, sha256) and, from the Parquet
    footer alone, its schema (columns, vector size, value type) and row count; :class:`ShardError`
    naming ``source`` otherwise."""
    entry.check_bytes(data, source)
    footer, _ = footer_info(data, source)
    schema = footer.schema.to_arrow_schema()
    if schema.names != fmt.columns:
        raise ShardError(f"shard {source} has columns {schema.names}, expected {fmt.columns}")
    if not pa.types.is_integer(schema.field("pair_id").type):
        raise ShardError(f"shard {source}: column pair_id has type {schema.field('pair_id').type}, expected int64")
    for name in fmt.columns[1:]:
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
) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor]:
    """(pair ids, x0 or None when it is not stored, x1) of a shard; verifies everything."""
    check_shard(data, fmt, entry, source)
    table = read_table(data, source)
    ids = table.column("pair_id").to_numpy()
    if not np.array_equal(ids, np.arange(entry.start, entry.stop)):
        raise ShardError(f"shard {source} holds other pair ids than [{entry.start}, {entry.stop})")
    x1 = torch.from_numpy(_decode(table.column("x1"), fmt.dtype, entry.rows, fmt.shape))
    x0 = torch.from_numpy(_decode(table.column("x0"), fmt.dtype, entry.rows, fmt.shape)) if fmt.x0_stored else None
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
    def open(cls, where: Location) -> Coupling:
        """Read the manifest and one listing of the folder: every listed shard must be present
        with its size. Reads no shard (see :meth:`verify`)."""
        manifest = read_manifest(where)
        source = f"{where.uri}/_SUCCESS.json"
        details = manifest.details
        if manifest.kind != "couple":
            raise ShardError(f"{source} is a {manifest.kind} stage, not a coupling")
        try:
            fmt = CouplingFormat.model_validate(details["format"])
            pairs = int(details["pairs"])
            shards = tuple(ShardEntry.parse(entry, source) for entry in details["shards"])
        except (KeyError, TypeError, ValueError) as error:
            raise ShardError(f"{source} is not a coupling manifest: {error}") from None
        check_layout(list(shards), pairs, fmt.shard_size, source)
        sizes = where.list_sizes()
        for entry in shards:
            if entry.name not in sizes:
                raise ShardError(f"coupling {where.uri} is missing shard {entry.name} listed in its manifest")
            if sizes[entry.name] != entry.bytes:
                raise ShardError(
                    f"shard {where.join(entry.name).uri} has {sizes[entry.name]} bytes, the manifest says {entry.bytes}"
                )
        return cls(where, fmt, shards, pairs, manifest.hash)

    def shard_bytes(self, entry: ShardEntry) -> bytes:
        target = self.location.join(entry.name)
        try:
            return target.read_bytes()
        except FileNotFoundError:
            raise ShardError(f"shard {target.uri} listed in the manifest is missing") from None

    def check(self, entry: ShardEntry) -> None:
        """Read one shard and check it against the manifest (:func:`check_shard`)."""
        check_shard(self.shard_bytes(entry), self.format, entry, self.location.join(entry.name).uri)

    def read(self, entry: ShardEntry) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor]:
        """(pair ids, x0 or None when it is regenerated from the seed, x1) of one shard, verified."""
        return decode_shard(self.shard_bytes(entry), self.format, entry, self.location.join(entry.name).uri)

    def verify(self) -> None:
        """Check every shard against the manifest, in parallel Ray tasks when Ray is initialised
        (threads otherwise); the first problem raises :class:`ShardError` naming the shard."""
        total = sum(entry.bytes for entry in self.shards)
        tasks = max(1, min(_VERIFY_TASKS, len(self.shards), total // _VERIFY_BYTES_PER_TASK + 1))
        groups = [list(self.shards[i::tasks]) for i in range(tasks)]
        if not ray.is_initialized():
            with ThreadPoolExecutor(len(groups) or 1) as pool:
                list(pool.map(lambda group: _check_group(self, group), groups))
            return
        try:
            ray.get([_check_group_task.remote(self, group) for group in groups])
        except ray.exceptions.RayTaskError as error:
            raise error.cause if isinstance(error.cause, ShardError) else error from None


def _check_group(coupling: Coupling, entries: list[ShardEntry]) -> None:
    for entry in entries:
        coupling.check(entry)


_check_group_task = ray.remote(num_cpus=0.5, max_retries=2)(_check_group)

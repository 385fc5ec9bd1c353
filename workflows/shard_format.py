"""What couplings and image datasets share: sharded Parquet with a manifest of checksums.

A sharded dataset of N items with shard size S is the files ``shard-{s:06d}.parquet`` for
s = 0 … ⌈N/S⌉ − 1; shard ``s`` covers the positions [s·S, min((s+1)·S, N)) (pair ids of a
coupling; source positions of an image import, where skipped unreadable images leave a shard
with fewer rows than its range). Each shard is written whole and becomes visible only complete;
its bytes are a pure function of its range and the dataset's settings. The manifest lists every
shard as a :class:`ShardEntry` (index, name, range, rows, sha256, bytes), and the file's own
key/value metadata ``rectiflow`` repeats what identifies it, so any Parquet client can read it.
Shards are written deterministically (:func:`parquet_bytes`): the same table gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 2
METADATA_KEY = b"rectiflow"
SHARD_FILE = re.compile(r"^shard-(\d{6})\.parquet$")


class ShardError(ValueError):
    """A shard or its manifest is missing, corrupt, or not what was expected (names the file)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


def shard_index(name: str) -> int | None:
    """The index of a shard file name (None for any other name)."""
    match = SHARD_FILE.match(name)
    return int(match.group(1)) if match else None


def present_shards(folder: Any, count: int, what: str, error: type[Exception] = ShardError) -> set[int]:
    """Indices of the shards already in ``folder`` (a :class:`workflows.storage.Location`; one
    listing, names only); ``error`` when one lies beyond the ``count`` shards of this ``what``
    (a coupling, an import): the folder holds another configuration's output."""
    present = {index for index in map(shard_index, folder.list_names()) if index is not None}
    beyond = sorted(index for index in present if index >= count)
    if beyond:
        raise error(
            f"output {folder.uri} holds {shard_name(beyond[0])}, but this {what} has only {count} shards: it belongs "
            "to another configuration; delete it or choose another output location"
        )
    return present


def shard_range(index: int, shard_size: int, count: int) -> tuple[int, int]:
    """The positions [start, stop) of shard ``index``."""
    start = index * shard_size
    return start, min(start + shard_size, count)


def shard_count(count: int, shard_size: int) -> int:
    return -(-count // shard_size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    """A shard as a manifest lists it: positions [start, stop), the rows it holds, its bytes."""

    index: int
    name: str
    start: int
    stop: int
    rows: int
    sha256: str
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, value: Any, source: str) -> ShardEntry:
        try:
            return cls(**{name: value[name] for name in cls.__dataclass_fields__})
        except (KeyError, TypeError) as error:
            raise ShardError(f"{source}: a shard entry is malformed ({error!r})") from None

    def check_bytes(self, data: bytes, source: str) -> None:
        """``data`` is this shard's file: its size and sha256 match; :class:`ShardError` naming
        ``source`` otherwise."""
        if len(data) != self.bytes or sha256(data) != self.sha256:
            raise ShardError(
                f"shard {source} does not match the manifest ({len(data)} bytes, expected {self.bytes}; "
                "checksum mismatch): it was changed or truncated after its stage finished"
            )


def check_layout(entries: list[ShardEntry], count: int, shard_size: int, source: str) -> None:
    """The entries are shards 0 … ⌈count/shard_size⌉ − 1 in order, each named for its index and
    covering its range; :class:`ShardError` naming ``source`` otherwise."""
    expected = [(i, shard_name(i), *shard_range(i, shard_size, count)) for i in range(shard_count(count, shard_size))]
    found = [(entry.index, entry.name, entry.start, entry.stop) for entry in entries]
    if found != expected:
        raise ShardError(
            f"{source}: the shards are not {shard_name(0)} … covering positions [0, {count}) once each, in "
            f"order of {shard_size}"
        )
    if any(not 0 <= entry.rows <= entry.stop - entry.start for entry in entries):
        raise ShardError(f"{source}: a shard lists more rows than its range")


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


def with_metadata(table: pa.Table, info: dict[str, Any]) -> pa.Table:
    """``table`` with ``info`` (plus the format version) as its ``rectiflow`` key/value metadata."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **info}, sort_keys=True).encode()
    return table.replace_schema_metadata({METADATA_KEY: payload})


def footer_info(data: bytes, source: str) -> tuple[pq.FileMetaData, dict[str, Any]]:
    """(Parquet footer, ``rectiflow`` metadata) of a shard's bytes, read from the footer alone;
    :class:`ShardError` naming ``source`` when it is not a readable rectiflow shard."""
    try:
        footer = pq.read_metadata(pa.BufferReader(data))
        info = json.loads(footer.metadata[METADATA_KEY])
    except (pa.ArrowInvalid, OSError, KeyError, TypeError, ValueError) as error:
        raise ShardError(
            f"shard {source} is not a readable rectiflow shard ({error!r}); delete it to regenerate it"
        ) from None
    if info.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"shard {source} has format version {info.get('format_version')}, expected {FORMAT_VERSION}")
    return footer, info


def read_table(data: bytes, source: str, columns: list[str] | None = None) -> pa.Table:
    """The Parquet table in ``data``; :class:`ShardError` naming ``source`` when it is unreadable."""
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise ShardError(f"shard {source} is not a readable Parquet file: {error}") from None

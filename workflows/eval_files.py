"""The files an evaluation stage writes and the report reads: names, columns, Parquet helpers.

Light on purpose (pyarrow only, no Ray or torch), so the report imports it.

- ``metrics.parquet``: one row per sampler, the columns of :data:`METRIC_COLUMNS`;
- ``samples.parquet``: the first figure samples (Z0, Z1) of every sampler, plus the independent
  pairs (Z0, X1 ~ π1) under the sampler name :data:`INDEPENDENT`;
- ``trajectories.parquet``: the kept paths, one row per (sampler, id, step) with t and Z_t.

All three live in the stage's attempt folder; its manifest names them with their sha256.
"""

from __future__ import annotations

import hashlib
import io
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workflows.storage import Location

METRICS_FILE = "metrics.parquet"
SAMPLES_FILE = "samples.parquet"
TRAJECTORIES_FILE = "trajectories.parquet"
INDEPENDENT = "independent"
"""Sampler name of the independent pairs (Z0, X1 ~ π1) in ``samples.parquet``."""

QUALITY_COLUMNS = (
    "w2",
    "mmd2",
    "fd_classifier",
    "is_classifier",
    "precision",
    "recall",
    "fid",
    "inception_score",
    "kid",
)
"""Every column a quality score may fill, in the order the report shows them."""

METRIC_COLUMNS = (
    "model",
    "label",
    "family",
    "round",
    "k",
    "path",
    "sampler",
    "nfe_mean",
    "nfe_max",
    "straightness",
    "transport_cost",
    "pairing_ratio",
    "crossing_pct",
    *QUALITY_COLUMNS,
    "one_step_distance",
    "wall_seconds",
    "cpu_seconds",
    "gpu_seconds",
    "samples",
    "ot_samples",
    "seed",
    "model_hash",
)
_STRING_COLUMNS = {"model", "label", "family", "path", "sampler", "model_hash"}
_INT_COLUMNS = {"round", "k", "nfe_max", "samples", "ot_samples", "seed"}
METRICS_SCHEMA = pa.schema(
    [
        (name, pa.string() if name in _STRING_COLUMNS else pa.int64() if name in _INT_COLUMNS else pa.float64())
        for name in METRIC_COLUMNS
    ]
)


def vectors(values: np.ndarray) -> pa.FixedSizeListArray:
    """Rows of ``values`` (n, d) as a fixed-size list column of float32."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def column_array(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size list column as an array (rows, size)."""
    values = table[column].combine_chunks()
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(table), -1)


def path_rows(data: bytes, numel: int) -> np.ndarray:
    """One sample's stored path: rows (t, Z_t…) of float32 (see the evaluation worker)."""
    return np.frombuffer(data, dtype=np.float32).reshape(-1, 1 + numel)


def table_bytes(table: pa.Table) -> bytes:
    """``table`` as Parquet bytes (zstd)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_table(target: Location, columns: list[str] | None = None) -> pa.Table:
    """A Parquet object (never unpickled: Parquet only)."""
    try:
        return pq.read_table(pa.BufferReader(target.read_bytes()), columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"{target.uri} is not a readable Parquet file: {error}") from None


def checked_table(target: Location, sha256: str | None) -> pa.Table:
    """A file a manifest lists, verified against the checksum recorded there."""
    data = target.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(
            f"{target.uri} does not match the checksum in its _SUCCESS.json: it changed after the stage finished"
        )
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"{target.uri} is not a readable Parquet file: {error}") from None


def json_safe(value: Any) -> Any:
    """``value`` with NaN floats as None (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value

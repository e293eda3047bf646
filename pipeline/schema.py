"""Row formats: the columns each stage hands the next, defined once, and the conversions between them.

    read rows        (sources.read_rows, from a shard's records)   READ_COLUMNS: image_id, source, key, bytes,
                     shard_images, shard_format, error
    marker rows      one per shard, after its image rows, in every stream below: shard_images = N >= 0 (the
                     images its reader produced), shard_format (`sources.Shard.format`), error (the shard's error)
    input rows       (preprocess -> predictor)   `input_batch`: read rows without bytes, plus INPUTS (uint8 model
                     input), width, height, status ("ok", "error", or MARKER_STATUS)
    prediction rows  (predictor -> driver)   stream_schema(embeddings): PREDICTION_FIELDS (+ embedding) + markers
    output rows      (the stored Parquet files)   output_schema(embeddings): PREDICTION_FIELDS (+ embedding) +
                     RUN_FIELDS; `model` and `dt` live only in the path (hive partitions)

Image rows carry shard_images = -1 and a null shard_format. Ray hands an all-null string column back as
float NaNs: `strings` is the one place that undoes it. `output_table` coerces whatever reaches the driver (Arrow, a
dict of numpy arrays, Ray tensor columns) to the output schema. This module imports no other stage and no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MARKER_COLUMN = "shard_images"  # -1 on image rows; N >= 0 on the one marker row per shard
FORMAT_COLUMN = "shard_format"  # null on image rows; the shard's format (webdataset, parquet, folder) on markers
INPUTS = "inputs"  # the model input column of input rows: patch tokens [N, P*P*3] or pixels [H, W, 3], uint8
READ_COLUMNS = ("image_id", "source", "key", "bytes", MARKER_COLUMN, FORMAT_COLUMN, "error")
STATUSES = ("ok", "error")  # of image rows
MARKER_STATUS = "marker"  # the status of marker rows from preprocess on (the driver tells them by MARKER_COLUMN)

# Columns every prediction row carries (besides the optional embedding and the marker columns).
PREDICTION_FIELDS: list[tuple[str, pa.DataType]] = [
    ("image_id", pa.string()),
    ("source", pa.string()),
    ("key", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("label", pa.string()),
    ("label_id", pa.int32()),
    ("score", pa.float32()),  # null for error rows (NaN is turned into null: SQL aggregates skip nulls)
    ("topk_labels", pa.list_(pa.string())),
    ("topk_ids", pa.list_(pa.int32())),
    ("topk_scores", pa.list_(pa.float32())),
]
EMBEDDING_FIELD = ("embedding", pa.list_(pa.float32()))
MARKER_FIELDS: list[tuple[str, pa.DataType]] = [(MARKER_COLUMN, pa.int64()), (FORMAT_COLUMN, pa.string())]
RUN_FIELDS: list[tuple[str, pa.DataType]] = [
    ("model_digest", pa.string()),
    ("run_id", pa.string()),
    ("labelled_at", pa.timestamp("us", tz="UTC")),
]
# What an error row holds besides its ids, source and error: no label, no size (also a row the commit distrusts).
ERROR_VALUES: dict[str, Any] = {"status": "error", "width": -1, "height": -1, "label": None, "label_id": -1,
                                "score": None, "topk_labels": [], "topk_ids": [], "topk_scores": [], "embedding": None}


def output_schema(embeddings: bool) -> pa.Schema:
    """Columns stored in each Parquet file. `model` and `dt` are NOT here: they are hive path partitions."""
    fields = list(PREDICTION_FIELDS) + ([EMBEDDING_FIELD] if embeddings else []) + list(RUN_FIELDS)
    return pa.schema(fields)


def stream_schema(embeddings: bool) -> pa.Schema:
    """Columns of the prediction stream the driver consumes: prediction rows and marker rows."""
    return pa.schema(list(PREDICTION_FIELDS) + ([EMBEDDING_FIELD] if embeddings else []) + list(MARKER_FIELDS))


def strings(values: Any) -> list[str | None]:
    """Ray hands an all-null string column back as float NaNs; keep strings, map anything else to null."""
    return [v if isinstance(v, str) else None for v in values]


# ------------------------------------------------------------------------------------------------ read rows


def image_row(image_id: str, source: str, key: str, data: bytes | None, error: str | None) -> tuple:
    """One read row of an image (or of an image that could not be read: data None, error set)."""
    return (image_id, source, key, data, -1, None, error)


def marker_row(source: str, shard_format: str | None, images: int, error: str | None) -> tuple:
    """The read row that ends a shard: how many images its reader produced, its format, and its error."""
    return ("", source, "", b"", images, shard_format, error)


def read_batch(rows: list[tuple]) -> dict[str, np.ndarray]:
    """Read rows (`image_row` / `marker_row` tuples) -> a numpy batch of READ_COLUMNS."""
    cols = {name: np.empty(len(rows), dtype=object) for name in READ_COLUMNS}
    for i, row in enumerate(rows):
        for name, value in zip(READ_COLUMNS, row, strict=True):
            cols[name][i] = value
    cols[MARKER_COLUMN] = cols[MARKER_COLUMN].astype(np.int64)
    return cols


def input_batch(read: Mapping[str, Any], *, inputs: np.ndarray, width: np.ndarray, height: np.ndarray,
                status: np.ndarray, error: np.ndarray) -> dict[str, Any]:
    """A numpy batch of input rows: the columns of the read rows `read` but their bytes, plus the model inputs
    [B, ...] uint8, each image's width and height (-1 where not decoded), status and error [B]."""
    out = {name: values for name, values in read.items() if name != "bytes"}
    out.update({INPUTS: inputs, "width": width, "height": height, "status": status, "error": error})
    return out


def marker_flags(batch: Mapping[str, Any]) -> np.ndarray:
    """bool [B]: which rows of a numpy batch are marker rows."""
    return np.asarray(batch[MARKER_COLUMN]) >= 0


def is_marker(table: pa.Table) -> pa.ChunkedArray:
    """bool per row of an Arrow table: marker rows (shard_images >= 0; a null counts as an image row)."""
    return pc.greater_equal(pc.fill_null(table.column(MARKER_COLUMN).cast(pa.int64()), -1), 0)


def split_markers(table: pa.Table) -> tuple[pa.Table, pa.Table | None]:
    """(image rows, marker rows) by the shard_images column; without it every row is an image row."""
    if MARKER_COLUMN not in table.column_names:
        return table, None
    marks = is_marker(table)
    return table.filter(pc.invert(marks)), table.filter(marks)


def markers(table: pa.Table) -> dict[str, dict[str, Any]]:
    """{source: {"images": N, "error": e, "format": f}} of marker rows; "format" only where a row has one (a
    table without an error column has no errors)."""
    sources, images = table.column("source").to_pylist(), table.column(MARKER_COLUMN).to_pylist()
    errors, formats = _optional(table, "error"), strings(_optional(table, FORMAT_COLUMN))
    return {src: {"images": int(n), "error": e, **({"format": f} if f else {})}
            for src, n, e, f in zip(sources, images, errors, formats, strict=True)}


def _optional(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


# ------------------------------------------------------------------------------------------ prediction rows


def prediction_table(columns: Mapping[str, Any], embeddings: bool) -> pa.Table:
    """The predictor's output batch: each column of `stream_schema` from an Arrow array or anything pa.array takes."""
    schema = stream_schema(embeddings)
    arrays = [v if isinstance(v := columns[f.name], pa.Array) else pa.array(v, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def as_table(batch: pa.Table | Mapping[str, Any]) -> pa.Table:
    """A batch as an Arrow table: a pyarrow Table, a pandas DataFrame or a dict of numpy arrays / lists."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch])
    if isinstance(batch, Mapping):
        cols = {}
        for name, value in batch.items():
            if isinstance(value, np.ndarray) and value.ndim > 1:
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), value.shape[1])
            else:
                cols[name] = value
        return pa.table(cols)
    return pa.Table.from_pandas(batch, preserve_index=False)  # a pandas DataFrame


def _to_list_array(arr: pa.Array, value_type: pa.DataType) -> pa.Array:
    """One chunk of a list-like column (list, large_list, fixed_size_list, Ray tensor extension) -> list<value_type>."""
    target = pa.list_(value_type)
    if isinstance(arr.type, pa.ExtensionType):
        # Ray stores [B, k] numpy columns as tensor extension arrays; numpy unicode becomes fixed-size
        # binary (UTF-32) in their storage, so go through numpy rather than casting the storage.
        nd = arr.to_numpy(zero_copy_only=False)
        return _numpy_to_list_array(nd, value_type)
    return arr.cast(target)


def _numpy_to_list_array(nd: np.ndarray, value_type: pa.DataType) -> pa.Array:
    target = pa.list_(value_type)
    if nd.dtype != object and nd.ndim == 2:  # [B, k]
        flat = pa.array(nd.reshape(-1)).cast(value_type)
        return pa.FixedSizeListArray.from_arrays(flat, nd.shape[1]).cast(target)
    return pa.array([None if x is None else list(x) for x in nd], type=target)


def _column(table: pa.Table, name: str, dtype: pa.DataType) -> pa.ChunkedArray:
    col = table.column(name)
    if pa.types.is_list(dtype):
        chunks = [_to_list_array(c, dtype.value_type) for c in col.chunks]
        return pa.chunked_array(chunks, type=dtype)
    if isinstance(col.type, pa.ExtensionType):
        col = pa.chunked_array([c.storage for c in col.chunks], type=col.type.storage_type)
    col = col.cast(dtype)
    if name == "score":  # NaN -> null, so AVG/quantiles over scores are not poisoned by error rows
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, dtype), col)
    return col


def output_table(table: pa.Table, schema: pa.Schema, run_cols: dict[str, pa.Scalar]) -> pa.Table:
    """Image rows of the stream -> rows of `schema` (an `output_schema`), the run's columns from `run_cols`."""
    names = [f.name for f in schema if f.name not in run_cols]
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise ValueError(f"prediction batch: expected columns {names}, got {table.column_names} (missing {missing})")
    arrays = [_column(table, f.name, f.type) if f.name not in run_cols else None for f in schema]
    n = table.num_rows
    arrays = [a if a is not None else pa.repeat(run_cols[f.name], n) for a, f in zip(arrays, schema, strict=True)]
    out = pa.Table.from_arrays(arrays, schema=schema)
    bad = pc.invert(pc.is_in(out.column("status"), pa.array(list(STATUSES))))
    if pc.any(bad).as_py():
        got = pc.unique(out.column("status").filter(bad)).to_pylist()
        raise ValueError(f"prediction batch: expected status 'ok' or 'error', got {got}")
    return out

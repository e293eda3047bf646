"""The staging writer: the driver streams a wave's image rows into one Parquet file under `_staging/`.

`write_staging` (called by `waves.WaveCommitter` on the driver) drops the per-shard MARKER rows (shard_images >= 0),
streams the image rows into ONE file `OUTPUT/_staging/<staging_id>/<uuid4>.parquet` (staging_id: the
run_id by default; the plan uses one per commit wave) and returns a small JSON-able result: the file,
its rows, rows per source shard, and the markers it saw. A staged file is part of the table only once a
commit names it (`pipeline.commit`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import redact
from pipeline.layout import check_name, fs_root, staging_prefix
from pipeline.schema import as_table, output_schema, output_table, split_markers
from pipeline.schema import markers as shard_markers

logger = logging.getLogger(__name__)

ROW_GROUP_ROWS = 65_536  # flush a row group at this many buffered rows ...
ROW_GROUP_BYTES = 64 << 20  # ... or this many buffered bytes, whichever comes first


def _redact_errors(table: pa.Table) -> pa.Table:
    """Error messages quote exceptions; make sure no credential rides along into the table."""
    col = table.column("error")
    if col.null_count == table.num_rows:
        return table
    values = [redact(v) if v else v for v in col.to_pylist()]
    return table.set_column(table.schema.get_field_index("error"), "error", pa.array(values, pa.string()))


def write_staging(
    tables: Iterable[pa.Table | Mapping[str, Any]],
    *,
    output: str,
    run_id: str,
    model_digest: str,
    embeddings: bool,
    staging_id: str | None = None,
) -> dict[str, Any]:
    """Stream the image rows of `tables` into one staged Parquet file; return what was written.

    Returns {"file": "_staging/<staging_id>/<uuid>.parquet" (relative to OUTPUT) or None when there were no
    image rows, "rows": n, "bytes": file size, "status_counts": {"ok": n, "error": n},
    "shard_rows": {source: n}, "markers": {source: {"images": N, "error": e, "format": f}}}.
    """
    check_name("run_id", run_id)
    staging_id = staging_id or run_id
    check_name("staging_id", staging_id)
    schema = output_schema(embeddings)
    now = datetime.now(UTC)
    run_cols = {
        "model_digest": pa.scalar(model_digest, pa.string()),
        "run_id": pa.scalar(run_id, pa.string()),
        "labelled_at": pa.scalar(now, pa.timestamp("us", tz="UTC")),
    }
    fs, root = fs_root(output)
    rel = f"{staging_prefix(staging_id)}/{uuid.uuid4().hex}.parquet"
    path = f"{root}/{rel}"

    shard_rows: dict[str, int] = {}
    markers: dict[str, dict[str, Any]] = {}
    status_counts = {"ok": 0, "error": 0}
    rows = 0
    nbytes = 0
    buffered: list[pa.Table] = []
    buffered_rows = buffered_bytes = 0
    f = writer = None

    def flush() -> None:
        nonlocal buffered, buffered_rows, buffered_bytes
        if buffered:
            writer.write_table(pa.concat_tables(buffered), row_group_size=max(buffered_rows, 1))
        buffered, buffered_rows, buffered_bytes = [], 0, 0

    try:
        for batch in tables:
            images, marks = split_markers(as_table(batch))
            if marks is not None and marks.num_rows:
                for src, m in shard_markers(marks).items():
                    markers[src] = {**m, "error": redact(m["error"]) if m["error"] else m["error"]}
            if images.num_rows == 0:
                continue
            out = _redact_errors(output_table(images, schema, run_cols))
            for row in pc.value_counts(out.column("source")).to_pylist():
                shard_rows[row["values"]] = shard_rows.get(row["values"], 0) + row["counts"]
            for row in pc.value_counts(out.column("status")).to_pylist():
                status_counts[row["values"]] += row["counts"]
            rows += out.num_rows
            if writer is None:
                fs.makedirs(f"{root}/{staging_prefix(staging_id)}", exist_ok=True)
                f = fs.open(path, "wb")
                writer = pq.ParquetWriter(f, schema, compression="zstd")
            buffered.append(out)
            buffered_rows += out.num_rows
            buffered_bytes += out.nbytes
            if buffered_rows >= ROW_GROUP_ROWS or buffered_bytes >= ROW_GROUP_BYTES:
                flush()
        if writer is not None:
            flush()
            writer.close()
            nbytes = f.tell()
            f.close()  # on S3 the object appears only now, complete
            writer = f = None
    finally:
        if f is not None:  # failed mid-way: abandon the partial file (the next attempt writes a new uuid)
            try:
                if hasattr(f, "discard"):
                    f.discard()  # s3fs: abort the multipart upload
                else:
                    f.close()
            except Exception:  # noqa: BLE001 - best effort, the original error is what matters
                logger.warning("could not discard partial staging file %s", rel, exc_info=True)

    return {
        "file": rel if rows else None,
        "rows": rows,
        "bytes": nbytes,
        "status_counts": status_counts,
        "shard_rows": shard_rows,
        "markers": markers,
    }


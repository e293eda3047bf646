"""Read the committed label table: only files named by committed manifests, never staging or orphans.

The table root holds `model=<name>/dt=<YYYY-MM-DD>/part-<commit_id>-<n>.parquet` files and
`_manifests/<commit_id>.json`. A part file that no manifest names (a commit that crashed before its
manifest) is not part of the table; `_staging/` never is. `dataset()` returns a pyarrow Dataset over
exactly the committed files, with `model` and `dt` (strings) from the hive-style path.

Other engines: DuckDB `read_parquet('ROOT/model=*/dt=*/*.parquet', hive_partitioning=true)` reads the
partitions (name them in the glob: `ROOT/*/*/*.parquet` would also match `_staging/<run>/<file>`);
for exactly-committed reads pass `committed_files(ROOT)` as the file list instead, or use `connect(ROOT)`:
a DuckDB connection with a `predictions` view over exactly the committed files and a `runs` view of the
manifests (`relation(ROOT, sql)` runs one query on such a connection).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.layout import PARTITION_COLUMNS, fs_root, list_manifests

if TYPE_CHECKING:
    import duckdb

PARTITION_SCHEMA = pa.schema([(name, pa.string()) for name in PARTITION_COLUMNS])
_MANIFEST_FILTERS = ("model", "model_digest", "dt", "run_id", "commit_id")


def _arrow_fs(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _select(manifests: list[dict[str, Any]], filters: dict[str, Any]) -> list[dict[str, Any]]:
    unknown = sorted(set(filters) - set(_MANIFEST_FILTERS))
    if unknown:
        raise TypeError(f"filters: expected some of {list(_MANIFEST_FILTERS)}, got {unknown}")
    out = []
    for m in manifests:
        if all(v is None or m.get(k) == v for k, v in filters.items()):
            out.append(m)
    return out


def _committed(output: str, filters: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str, list[dict], list[str]]:
    fs, root = fs_root(output)
    manifests = _select(list_manifests(output), filters)
    rels = [f["path"] for m in manifests for f in m.get("files", [])]
    return fs, root, manifests, rels


def committed_files(
    output: str,
    *,
    model: str | None = None,
    model_digest: str | None = None,
    dt: str | None = None,
    run_id: str | None = None,
) -> list[str]:
    """Paths (local paths, or URLs like s3://bucket/key) of the files named by committed manifests."""
    fs, root, _, rels = _committed(output, {"model": model, "model_digest": model_digest, "dt": dt, "run_id": run_id})
    paths = [f"{root}/{rel}" for rel in rels]
    if isinstance(fs, LocalFileSystem):
        return paths
    return [fs.unstrip_protocol(p) for p in paths]


def dataset(output: str, **filters: Any) -> ds.Dataset:
    """A pyarrow Dataset over exactly the committed files (filters: model, model_digest, dt, run_id, commit_id).

    Columns: the file columns (see `pipeline.schema.output_schema`) plus `model` and `dt` from the path.
    Runs with and without embeddings mix: the schema is unified (missing columns read as nulls).
    """
    fs, root, manifests, rels = _committed(output, filters)
    afs = _arrow_fs(fs)
    partitioning = ds.partitioning(PARTITION_SCHEMA, flavor="hive")
    if not rels:  # nothing committed yet: no rows, but the table's columns (a read by column names works)
        return ds.dataset([], schema=_empty_schema(), format="parquet", filesystem=afs)
    # One footer per commit is enough: all files of a commit share its schema.
    firsts = [f"{root}/{m['files'][0]['path']}" for m in manifests if m.get("files")]
    schemas = [pq.read_schema(p, filesystem=afs) for p in firsts]
    schema = pa.unify_schemas(schemas + [PARTITION_SCHEMA])
    return ds.dataset(
        [f"{root}/{rel}" for rel in rels],
        schema=schema,
        format="parquet",
        filesystem=afs,
        partitioning=partitioning,
        partition_base_dir=root,
    )


def _empty_schema() -> pa.Schema:
    """The columns of a table with no commit yet: the file columns without embeddings, then model and dt."""
    from pipeline.schema import output_schema

    return pa.unify_schemas([output_schema(embeddings=False), PARTITION_SCHEMA])


def read_table(output: str, columns: list[str] | None = None, filter: Any = None, **filters: Any) -> pa.Table:
    """Read the committed table (or some columns / a pyarrow `filter` expression) into memory."""
    return dataset(output, **filters).to_table(columns=columns, filter=filter)


# ------------------------------------------------------------------------------------------------- DuckDB

RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("commit_id", pa.string()),
    ("committed_at", pa.timestamp("us", tz="UTC")),
    ("model", pa.string()),
    ("model_digest", pa.string()),
    ("dt", pa.string()),
    ("images", pa.int64()),  # images read from the commit's shards (ok + error rows)
    ("ok", pa.int64()),
    ("error", pa.int64()),
    ("shards", pa.int64()),
    ("shard_errors", pa.int64()),  # shards that could not be read to their end
    ("seconds", pa.float64()),  # wall time of the commit's wave
    ("images_per_s", pa.float64()),
])


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def runs_table(manifests: list[dict[str, Any]]) -> pa.Table:
    """One row per committed manifest (a run commits one manifest per wave); columns: RUNS_SCHEMA."""
    rows = []
    for m in manifests:
        counts, stats = m.get("counts") or {}, m.get("stats") or {}
        seconds = stats.get("seconds", stats.get("wall_s"))
        images = counts.get("images")
        per_s = stats.get("images_per_s")
        if per_s is None and seconds and images is not None:
            per_s = images / seconds
        at = m.get("committed_at")
        rows.append({
            "run_id": m.get("run_id"), "commit_id": m.get("commit_id"),
            "committed_at": datetime.fromisoformat(at) if at else None,
            "model": m.get("model"), "model_digest": m.get("model_digest"), "dt": m.get("dt"),
            "images": images, "ok": counts.get("ok"), "error": counts.get("error"), "shards": counts.get("shards"),
            "shard_errors": counts.get("shard_errors"), "seconds": seconds, "images_per_s": per_s,
        })
    return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA)


def connect(output: str, con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection (new, or `con`) with two temporary views over the table at OUTPUT:

    - `predictions`: the rows of exactly the committed files (file columns, then `model` and `dt` as
      strings from the path); files of uncommitted or crashed runs are never part of it. An empty table
      still has the view, with no rows and the columns of `pipeline.schema.output_schema`.
    - `runs`: one row per committed manifest (see RUNS_SCHEMA).

    The file list is read from the manifests now: commits made later need a new `connect`. Object stores
    are read through fsspec (credentials from the environment), registered with DuckDB, so no DuckDB
    extension is downloaded.
    """
    import duckdb

    con = duckdb.connect() if con is None else con
    fs, root = fs_root(output)
    manifests = list_manifests(output)
    paths = [f"{root}/{f['path']}" for m in manifests for f in m.get("files", [])]
    if not isinstance(fs, LocalFileSystem):
        paths = [fs.unstrip_protocol(p) for p in paths]
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if paths and not con.filesystem_is_registered(protocol):
            con.register_filesystem(fs)
    if paths:
        files = ", ".join(_sql_str(p) for p in paths)
        # union_by_name: runs with and without embeddings mix; hive_types: dt stays a string, as in dataset()
        con.execute(
            "CREATE OR REPLACE TEMP VIEW predictions AS SELECT * EXCLUDE (model, dt), model, dt FROM read_parquet("
            f"[{files}], hive_partitioning = true, union_by_name = true,"
            " hive_types = {'model': VARCHAR, 'dt': VARCHAR})"
        )
    else:
        schema = _empty_schema()
        types = con.from_arrow(schema.empty_table()).types
        cols = ", ".join(f'CAST(NULL AS {t}) AS "{f.name}"' for f, t in zip(schema, types, strict=True))
        con.execute(f"CREATE OR REPLACE TEMP VIEW predictions AS SELECT {cols} WHERE false")
    con.register("runs", runs_table(manifests))
    return con


def relation(output: str, sql: str | None = None, con: duckdb.DuckDBPyConnection | None = None
             ) -> duckdb.DuckDBPyRelation:
    """A DuckDB relation of `sql` over `connect(output, con)`; lazy: `.to_arrow_table()`, `.df()`, `.fetchall()`.

    Default: every committed row, `SELECT * FROM predictions`.
    """
    return connect(output, con).sql(sql or "SELECT * FROM predictions")

"""Reading the committed table: only files named by committed manifests, with model and dt from the path."""

from __future__ import annotations

import os
import subprocess
import sys

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from _sinkrows import DIGEST, DT, MODEL, RUN, do_commit, image_rows, list_files, marker, shard

from pipeline import table
from pipeline.schema import output_schema
from pipeline.staging import write_staging

A, B, C = "s3://in/a.tar", "s3://in/b.tar", "s3://in/c.tar"


def stage(output, *tables, embeddings=False, run_id=RUN):
    return write_staging(tables, output=output, run_id=run_id, model_digest=DIGEST, embeddings=embeddings)


def populate(output: str) -> None:
    """Two models, two days, one run with embeddings, plus a failed attempt and an orphaned part file."""
    do_commit(output, [stage(output, shard(A, 3, errors=1))], [A], commit_id="c1")
    do_commit(output, [stage(output, shard(B, 2, embeddings=True), embeddings=True, run_id="run-2")], [B],
              commit_id="c2", dt="2024-05-02", run_id="run-2")
    do_commit(output, [stage(output, shard(C, 4), run_id="run-3")], [C], commit_id="c3", model="vit-other",
              digest="sha256:other", run_id="run-3", cleanup=False)
    stage(output, shard(C, 4), run_id="run-3")  # failed attempt, still staged
    fs, root = fsspec.core.url_to_fs(output)
    committed = f"{root}/model={MODEL}/dt={DT}/part-c1-00000.parquet"
    fs.copy(committed, f"{root}/model={MODEL}/dt={DT}/part-crashed-00000.parquet")  # no manifest names it


def test_empty_output(tmp_path):
    out = str(tmp_path / "nothing")
    assert table.list_manifests(out) == [] and table.committed_files(out) == []
    t = table.read_table(out)  # no rows, the table's columns: a reader polling a new table reads by name
    assert t.num_rows == 0 and t.column_names == [*output_schema(embeddings=False).names, "model", "dt"]
    assert table.read_table(out, columns=["image_id", "source"]).num_rows == 0


def test_committed_files_only(output):
    populate(output)
    files = table.committed_files(output)
    assert len(files) == 3
    assert not any("_staging" in f or "crashed" in f for f in files)
    if output.startswith("s3://"):
        assert all(f.startswith("s3://test-bucket/labels/model=") for f in files)
    assert any("_staging/run-3/" in f for f in list_files(output))  # the failed attempt is there ...
    assert table.committed_files(output, model="vit-other") == [f for f in files if "vit-other" in f]  # ... unseen
    assert len(table.committed_files(output, model_digest=DIGEST)) == 2
    assert len(table.committed_files(output, model=MODEL, dt="2024-05-02")) == 1
    assert table.committed_files(output, model="nope") == []


def test_list_manifests_sorted(output):
    populate(output)
    ms = table.list_manifests(output)
    assert [m["commit_id"] for m in ms] == ["c1", "c2", "c3"]
    assert [m["committed_at"] for m in ms] == sorted(m["committed_at"] for m in ms)


def test_dataset_and_read_table(output):
    populate(output)
    d = table.dataset(output)
    assert {"model", "dt", "embedding", "labelled_at"} <= set(d.schema.names)
    assert d.schema.field("dt").type == pa.string() and d.schema.field("model").type == pa.string()
    t = table.read_table(output)
    assert t.num_rows == 3 + 2 + 4  # not the orphan copy, not the staged attempt
    assert sorted(pc.unique(t["image_id"]).to_pylist()) == sorted(t["image_id"].to_pylist())  # nothing twice
    counts = t.group_by(["model", "dt"]).aggregate([("image_id", "count")]).to_pylist()
    by = {(r["model"], r["dt"]): r["image_id_count"] for r in counts}
    assert by == {(MODEL, DT): 3, (MODEL, "2024-05-02"): 2, ("vit-other", DT): 4}
    emb = t.filter(pc.equal(t["source"], B))["embedding"].to_pylist()
    assert emb[0] == [0.0] * 4 and t.filter(pc.equal(t["source"], A))["embedding"].null_count == 3

    ok = table.read_table(output, columns=["image_id", "label", "model"], model=MODEL,
                          filter=pc.field("status") == "ok")
    assert ok.column_names == ["image_id", "label", "model"] and ok.num_rows == 2 + 2
    assert table.read_table(output, model_digest="sha256:other").num_rows == 4
    with pytest.raises(TypeError, match="expected some of"):
        table.dataset(output, colour="red")


def test_marker_only_commit_has_no_files(tmp_path):
    out = str(tmp_path / "labels")
    do_commit(out, [stage(out, marker(A, 0, "shard_error: not a tar"))], [A])
    assert table.committed_files(out) == [] and table.read_table(out).num_rows == 0
    assert table.list_manifests(out)[0]["shards"][A]["error"] == "shard_error: not a tar"


def test_reads_exactly_after_more_commits(tmp_path):
    out = str(tmp_path / "labels")
    do_commit(out, [stage(out, shard(A, 2))], [A], commit_id="w1")
    assert table.read_table(out).num_rows == 2
    do_commit(out, [stage(out, image_rows(B, 3), marker(B, 3))], [B], commit_id="w2")
    assert table.read_table(out, columns=["source"])["source"].to_pylist().count(B) == 3


def test_plain_hive_readers_without_vitlabel(tmp_path):
    """pyarrow.dataset and DuckDB globbing read a committed table as plain hive-partitioned Parquet: the same rows
    as `read_table`, while a failed attempt's file sits in `_staging/` (a `_` folder neither reader lists)."""
    import duckdb
    import pyarrow.dataset as ds

    out = str(tmp_path / "labels")
    do_commit(out, [stage(out, shard(A, 3, errors=1))], [A], commit_id="c1")
    do_commit(out, [stage(out, shard(B, 2), run_id="run-2")], [B], commit_id="c2", dt="2024-05-02", run_id="run-2")
    do_commit(out, [stage(out, shard(C, 4), run_id="run-3")], [C], commit_id="c3", model="vit-other",
              digest="sha256:other", run_id="run-3")
    stage(out, shard(C, 4), run_id="run-9")  # never committed
    assert any(f.startswith("_staging/run-9/") for f in list_files(out))
    want = sorted((r["image_id"], r["model"], r["dt"]) for r in table.read_table(out).to_pylist())

    raw = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert sorted((r["image_id"], r["model"], r["dt"]) for r in raw.to_pylist()) == want

    rows = duckdb.connect().sql(
        f"SELECT image_id, model, CAST(dt AS VARCHAR) FROM read_parquet('{out}/model=*/dt=*/*.parquet', "
        "hive_partitioning = true)").fetchall()
    assert sorted(rows) == want


def test_reading_imports_no_writer_and_no_ray():
    """A reader (a notebook, `vitlabel query`) pays for neither Ray nor the commit code."""
    code = ("import sys, pipeline.table; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m in ('pipeline.commit', 'pipeline.staging')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"

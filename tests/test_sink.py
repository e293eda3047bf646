"""Staging writes, the commit protocol and recovery, and the WaveCommitter, on local disk and a moto S3 server."""

from __future__ import annotations

import json
import math

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from _sinkrows import DIGEST, DT, MODEL, RUN, do_commit, image_rows, list_files, marker, shard

from pipeline import commit as protocol  # the module; `commit` below is this file's helper
from pipeline import table
from pipeline.commit import CommitError
from pipeline.config import INTEGRITY_FAILED, UNTRUSTED_ROW_CODE
from pipeline.layout import committed_shards
from pipeline.schema import MARKER_COLUMN, output_schema
from pipeline.staging import write_staging
from pipeline.waves import WaveCommitter

A, B, C = "s3://in/a.tar", "s3://in/b.tar", "s3://in/c.tar"


def stage(output: str, *tables: pa.Table, embeddings: bool = False, run_id: str = RUN, staging_id=None) -> dict:
    return write_staging(tables, output=output, run_id=run_id, model_digest=DIGEST, embeddings=embeddings,
                         staging_id=staging_id)


def read_parquet(output: str, rel: str) -> pa.Table:
    fs, root = fsspec.core.url_to_fs(output)
    with fs.open(f"{root.rstrip('/')}/{rel}", "rb") as f:
        return pq.read_table(f)


def test_output_schema_has_no_partition_columns():
    names = output_schema(False).names
    assert names[:4] == ["image_id", "source", "key", "status"]
    assert names[-3:] == ["model_digest", "run_id", "labelled_at"]
    assert "model" not in names and "dt" not in names and "embedding" not in names
    assert output_schema(True).field("embedding").type == pa.list_(pa.float32())
    assert output_schema(False).field("labelled_at").type == pa.timestamp("us", tz="UTC")


def test_write_staging_drops_markers_and_reports(output):
    # a shard split over batches, a dict-of-numpy batch with [B, k] arrays, markers in their own batches
    tail = image_rows(B, 2, start=3).to_pydict()
    numpy_batch = {k: np.array(v) for k, v in tail.items() if not k.startswith("topk")}
    numpy_batch["topk_ids"] = np.array(tail["topk_ids"], dtype=np.int64)  # [2, 3]
    numpy_batch["topk_scores"] = np.array(tail["topk_scores"], dtype=np.float64)
    numpy_batch["topk_labels"] = np.array(tail["topk_labels"])  # numpy unicode [2, 3]
    res = stage(output, shard(A, 4, errors=1), image_rows(B, 3), numpy_batch, marker(B, 5))
    assert res["file"].startswith(f"_staging/{RUN}/") and res["file"].endswith(".parquet")
    assert res["rows"] == 9 and res["bytes"] > 0
    assert res["shard_rows"] == {A: 4, B: 5}
    assert res["markers"] == {A: {"images": 4, "error": None, "format": "webdataset"},
                              B: {"images": 5, "error": None, "format": "webdataset"}}
    assert res["status_counts"] == {"ok": 8, "error": 1}
    json.dumps(res)  # travels through Ray and into the manifest

    t = read_parquet(output, res["file"])
    assert t.schema == output_schema(False)
    assert t.num_rows == 9 and "" not in t.column("key").to_pylist()  # no marker rows
    err = t.filter(pa.compute.equal(t["status"], "error"))
    assert err["score"].to_pylist() == [None]  # NaN -> null
    last = t.to_pylist()[-1]
    assert last["topk_labels"] == ["digit_4", "digit_0", "digit_1"] and last["topk_ids"] == [4, 0, 1]
    assert set(t["run_id"].to_pylist()) == {RUN} and set(t["model_digest"].to_pylist()) == {DIGEST}
    with fsspec.open(f"{output}/{res['file']}", "rb") as f:
        assert pq.ParquetFile(f).metadata.row_group(0).column(0).compression == "ZSTD"


def test_write_staging_without_image_rows_writes_nothing(output):
    res = stage(output, marker(A, 0), marker(B, 0, "shard_error: truncated tar"))
    assert res["file"] is None and res["rows"] == 0 and res["shard_rows"] == {}
    assert res["markers"][B] == {"images": 0, "error": "shard_error: truncated tar", "format": "webdataset"}
    assert list_files(output) == []


def test_write_staging_embeddings_and_bad_input(tmp_path):
    out = str(tmp_path)
    res = stage(out, shard(A, 3, embeddings=True), embeddings=True)
    assert read_parquet(out, res["file"])["embedding"].to_pylist()[1] == [1.0] * 4
    with pytest.raises(ValueError, match="expected columns"):
        stage(out, shard(A, 2), embeddings=True)  # embeddings asked for, none produced
    bad = image_rows(A, 1).set_column(3, "status", pa.array(["maybe"]))
    with pytest.raises(ValueError, match="expected status"):
        stage(out, bad)


def test_commit_layout_and_manifest(output, monkeypatch):
    r1 = stage(output, shard(A, 4, errors=1), image_rows(B, 2))
    r2 = stage(output, image_rows(B, 3, start=2), marker(B, 5),
               marker(C, 0, "shard_error: truncated tar", fmt="parquet"))
    failed = stage(output, shard(A, 4))  # a failed/retried attempt: written, but not in results
    assert failed["file"] in list_files(output)

    real_write = protocol._write_manifest

    def write_manifest_last(fs, path, data):  # at the commit point every file is already in place
        files = list_files(output)
        assert not any(f.startswith("_manifests/") for f in files) and "_pending/c-0001.json" in files  # intent
        assert all(f["path"] in files for f in json.loads(data)["files"])
        real_write(fs, path, data)

    monkeypatch.setattr(protocol, "_write_manifest", write_manifest_last)
    m = do_commit(output, [r1, r2], [A, B, C])

    part = f"model={MODEL}/dt={DT}"
    assert [f["path"] for f in m["files"]] == [f"{part}/part-c-0001-00000.parquet", f"{part}/part-c-0001-00001.parquet"]
    assert list_files(output) == ["_manifests/c-0001.json"] + [f["path"] for f in m["files"]]  # staging is gone
    assert sum(f["rows"] for f in m["files"]) == 9 and all(f["bytes"] > 0 for f in m["files"])
    assert m["shards"] == {A: {"images": 4, "rows": 4, "error": None, "done": True, "format": "webdataset"},
                           B: {"images": 5, "rows": 5, "error": None, "done": True, "format": "webdataset"},
                           C: {"images": 0, "rows": 0, "error": "shard_error: truncated tar", "done": True,
                               "format": "parquet"}}
    assert m["counts"] == {"images": 9, "ok": 8, "error": 1, "shards": 3, "shard_errors": 1}
    assert (m["version"], m["run_id"], m["commit_id"], m["model"], m["model_digest"], m["dt"]) == (
        1, RUN, "c-0001", MODEL, DIGEST, DT)
    assert m["config"]["top_k"] == 3 and m["stats"] == {"wall_s": 1.5} and m["committed_at"].endswith("+00:00")
    fs, root = fsspec.core.url_to_fs(output)
    assert json.loads(fs.cat(f"{root}/_manifests/c-0001.json")) == m
    assert "secret" not in json.dumps(m).lower() and "testing-key" not in json.dumps(m)

    t = table.read_table(output)
    assert t.num_rows == 9 and sorted(set(t["key"].to_pylist())) == ["0000", "0001", "0002", "0003", "0004"]
    assert set(t["model"].to_pylist()) == {MODEL} and set(t["dt"].to_pylist()) == {DT}


def test_manifest_records_a_shards_format_only_when_its_marker_carries_one(tmp_path):
    out = str(tmp_path)
    m = do_commit(out, [stage(out, shard(A, 1), image_rows(B, 1), marker(B, 1, fmt=None))], [A, B])
    assert m["shards"][A]["format"] == "webdataset" and "format" not in m["shards"][B]  # readers fall back


def test_failed_attempt_is_never_visible(output):
    good = stage(output, shard(A, 3))
    failed = stage(output, shard(A, 3))
    do_commit(output, [good], [A], cleanup=False)
    assert failed["file"] in list_files(output)  # left in staging
    assert table.read_table(output).num_rows == 3
    assert all("_staging" not in p for p in table.committed_files(output))
    protocol.cleanup_staging(output, RUN)
    assert not any(f.startswith("_staging/") for f in list_files(output))


@pytest.mark.parametrize("case", ["short", "extra", "no_marker", "unexpected"])
def test_incomplete_shard_refused_and_nothing_published(output, case):
    results = [stage(output, shard(A, 3))]
    if case == "short":  # the reader saw 5 images, only 4 rows came back
        results.append(stage(output, image_rows(B, 4), marker(B, 5)))
    elif case == "extra":  # a shard's rows written twice
        results += [stage(output, shard(B, 2)), stage(output, image_rows(B, 2))]
    elif case == "no_marker":
        results.append(stage(output, image_rows(B, 2)))
    else:  # rows for a shard the driver did not ask for
        results += [stage(output, shard(B, 1)), stage(output, shard(C, 1))]
    before = list_files(output)
    with pytest.raises(CommitError) as e:
        do_commit(output, results, [A, B])
    assert e.value.shards == [C if case == "unexpected" else B] and A not in str(e.value)
    assert list_files(output) == before  # nothing moved, nothing deleted, no manifest
    assert table.list_manifests(output) == [] and table.committed_files(output) == []
    assert committed_shards(output, DIGEST) == set()


def test_missing_shards_named(tmp_path):
    res = stage(str(tmp_path), shard(A, 2))
    with pytest.raises(CommitError, match=r"b\.tar \(no shard marker, 0 rows\)"):
        do_commit(str(tmp_path), [res], [A, B])
    many = [f"s3://in/{i:03d}.tar" for i in range(30)]
    with pytest.raises(CommitError, match="30 shard.s. not exactly covered.*and 10 more") as e:
        do_commit(str(tmp_path), [res], [A, *many])
    assert e.value.shards == many


def test_recommit_refused(output):
    res = stage(output, shard(A, 2))
    m = do_commit(output, [res], [A])
    before = list_files(output)
    with pytest.raises(CommitError, match="already exists"):
        do_commit(output, [res], [A])
    again = stage(output, shard(B, 1))
    with pytest.raises(CommitError, match="already exists"):  # same id, other files: still refused
        do_commit(output, [again], [B])
    assert [x for x in list_files(output) if not x.startswith("_staging/")] == before
    assert table.list_manifests(output) == [m]


def test_crash_before_manifest_then_resume(output, monkeypatch):
    res = [stage(output, shard(A, 2)), stage(output, shard(B, 3))]

    def crash(*a, **k):
        raise OSError("driver died")

    monkeypatch.setattr(protocol, "_write_manifest", crash)
    with pytest.raises(OSError, match="driver died"):
        do_commit(output, res, [A, B])
    assert any(f.startswith(f"model={MODEL}/") for f in list_files(output))  # moved, but not committed
    assert table.committed_files(output) == [] and table.read_table(output).num_rows == 0
    monkeypatch.undo()
    m = do_commit(output, res, [A, B])  # same commit again: finds the files where it left them
    assert m["counts"]["images"] == 5 and table.read_table(output).num_rows == 5


def test_committed_shards_per_digest(output):
    do_commit(output, [stage(output, shard(A, 1)), stage(output, marker(B, 0, "shard_error: empty"))], [A, B],
              commit_id="c1")
    do_commit(output, [stage(output, shard(C, 2))], [C], commit_id="c2")
    do_commit(output, [stage(output, shard(A, 1), run_id="run-2")], [A], commit_id="c3", digest="sha256:other",
              run_id="run-2")
    assert committed_shards(output, DIGEST) == {A, B, C}
    assert committed_shards(output, "sha256:other") == {A}
    assert committed_shards(output, "sha256:none") == set()


def test_bad_names_refused(tmp_path):
    res = stage(str(tmp_path), shard(A, 1))
    for kw in ({"commit_id": "../x"}, {"model": "a/b"}, {"dt": "2024-5-1"}):
        with pytest.raises(ValueError, match="expected"):
            do_commit(str(tmp_path), [res], [A], **kw)
    with pytest.raises(CommitError, match="expected a file _staging/other/"):
        do_commit(str(tmp_path), [res], [A], staging_id="other")
    with pytest.raises(CommitError, match="expected a file"):
        do_commit(str(tmp_path), [{**res, "file": "model=x/dt=2024-01-01/part-0.parquet"}], [A])


def test_staging_per_wave_cleanup_leaves_other_waves(output):
    """One staging folder per wave (staging_id=commit_id): committing wave 0 removes its leftovers, never wave 1's."""
    w0 = [stage(output, shard(A, 2), staging_id="run-1-w0000")]
    stage(output, shard(A, 2), staging_id="run-1-w0000")  # failed attempt of wave 0
    w1 = [stage(output, shard(B, 3), staging_id="run-1-w0001")]
    assert w1[0]["file"].startswith("_staging/run-1-w0001/")
    do_commit(output, w0, [A], commit_id="run-1-w0000", staging_id="run-1-w0000")
    assert [f for f in list_files(output) if f.startswith("_staging/")] == [w1[0]["file"]]
    do_commit(output, w1, [B], commit_id="run-1-w0001")  # staging folder taken from the results
    assert not any(f.startswith("_staging/") for f in list_files(output))
    assert table.read_table(output).num_rows == 5


def test_pyarrow_and_duckdb_read_the_partitions(tmp_path):
    out = str(tmp_path / "labels")
    do_commit(out, [stage(out, shard(A, 3, errors=1))], [A], commit_id="c1", cleanup=False)
    do_commit(out, [stage(out, shard(B, 2), run_id="run-2")], [B], commit_id="c2", model="vit-other",
              dt="2024-05-02", run_id="run-2", cleanup=False)
    leftover = stage(out, shard(C, 4))  # a failed attempt still sitting in _staging/
    assert leftover["file"] in list_files(out)

    d = pads.dataset(out, format="parquet", partitioning="hive")  # `_`-prefixed folders are ignored
    t = d.to_table()
    assert t.num_rows == 5 and {"model", "dt"} <= set(t.column_names)
    assert sorted(set(zip(t["model"].to_pylist(), t["dt"].to_pylist(), strict=True))) == [
        ("vit-other", "2024-05-02"), (MODEL, DT)]

    con = duckdb.connect()
    rows = con.execute(
        f"select model, cast(dt as varchar), count(*), count(*) filter (where status = 'error') "
        f"from read_parquet('{out}/model=*/dt=*/*.parquet', hive_partitioning=true) group by all order by 1"
    ).fetchall()
    assert rows == [("vit-other", "2024-05-02", 2, 0), (MODEL, DT, 3, 1)]
    # why the glob names the partitions: `*/*/*.parquet` also matches _staging/<run>/<file>.parquet
    naive = con.execute(f"select count(*) from read_parquet('{out}/*/*/*.parquet')").fetchone()[0]
    assert naive == 9
    files = table.committed_files(out)
    exact = con.execute("select count(*) from read_parquet(?, hive_partitioning=true)", [files]).fetchone()[0]
    assert exact == 5


def stream_commit(out: str, ds, shards: list[str], *extra: pa.Table, embeddings: bool = False) -> WaveCommitter:
    """What the plan does with a run's stream: every block through a WaveCommitter (one wave), then finish."""
    committer = WaveCommitter(output=out, run_id=RUN, model_name=MODEL, model_digest=DIGEST, dt=DT, shards=shards,
                              wave_size=len(shards), embeddings=embeddings, config={}, stats={})
    for t in [*ds.iter_batches(batch_size=None, batch_format="pyarrow"), *extra]:
        committer.add(t)
    committer.finish()
    return committer


@pytest.mark.parametrize("where", ["local", "s3"])
def test_wave_committer_end_to_end(ray_local, tmp_path, where, request):
    """Ray Data blocks of image and marker rows, shards interleaved across blocks, committed by the driver."""
    if where == "s3":
        request.getfixturevalue("s3")
    out = str(tmp_path / "labels") if where == "local" else "s3://test-bucket/labels"
    tables = [shard(A, 5, errors=2), image_rows(B, 3), image_rows(B, 4, start=3), marker(B, 7),
              marker(C, 0, "shard_error: truncated tar")]
    committer = stream_commit(out, ray_local.data.from_arrow(tables), [A, B, C])
    [m] = committer.manifests
    assert m["commit_id"] == RUN
    assert m["counts"] == {"images": 12, "ok": 10, "error": 2, "shards": 3, "shard_errors": 1}
    assert not any(f.startswith("_staging/") for f in list_files(out))
    t = table.read_table(out)
    assert t.num_rows == 12 and t.filter(pa.compute.equal(t["status"], "error")).num_rows == 2
    assert committed_shards(out, DIGEST) == {A, B, C}


def test_wave_committer_waits_for_every_row_when_the_marker_comes_first(tmp_path):
    """With preprocessing tasks and an actor pool, a shard's blocks reach the driver in any order: its marker
    (the read task's last row) may come before some of its rows. The shard completes only with all of them."""
    out = str(tmp_path / "labels")
    committer = WaveCommitter(output=out, run_id=RUN, model_name=MODEL, model_digest=DIGEST, dt=DT, shards=[A, B],
                              wave_size=1, embeddings=False, config={}, stats={})
    committer.add(pa.concat_tables([marker(A, 5), image_rows(B, 2)]))
    committer.add(image_rows(A, 2))
    assert committer.manifests == [] and committer.pending == {A, B}
    committer.add(pa.concat_tables([image_rows(B, 1, start=2), marker(B, 3)]))
    assert [m["counts"]["images"] for m in committer.manifests] == [3]  # B, complete, committed alone
    committer.add(image_rows(A, 3, start=2))
    committer.finish()
    assert [sorted(m["shards"]) for m in committer.manifests] == [[B], [A]]
    assert table.read_table(out).num_rows == 8 and committed_shards(out, DIGEST) == {A, B}
    with pytest.raises(ValueError, match="complete already"):
        committer.add(image_rows(A, 1, start=5))


def test_wave_committer_names_incomplete_shards(tmp_path):
    committer = WaveCommitter(output=str(tmp_path / "labels"), run_id=RUN, model_name=MODEL, model_digest=DIGEST,
                              dt=DT, shards=[A, B], wave_size=2, embeddings=False, config={}, stats={})
    committer.add(pa.concat_tables([marker(A, 4), image_rows(A, 3), image_rows(B, 1)]))
    with pytest.raises(ValueError, match=r"2 shard\(s\) incomplete.*3 rows, marker 4 images.*1 rows, no marker row"):
        committer.finish()


def test_wave_committer_tensor_columns(ray_local, tmp_path):
    """Numpy [B, k] batches become Ray tensor extension columns on the way to the driver."""
    out = str(tmp_path / "labels")

    def to_numpy(batch: dict) -> dict:
        n = len(batch["id"])
        i = batch["id"]
        return {
            "image_id": np.array([f"{A}#{x}" for x in i]), "source": np.array([A] * n),
            "key": np.array([str(x) for x in i]), "status": np.array(["ok"] * n), "error": np.array([None] * n),
            "width": np.full(n, 8), "height": np.full(n, 8), "label": np.array(["cat"] * n),
            "label_id": np.zeros(n, np.int64), "score": np.full(n, 0.5),
            "topk_labels": np.array([["cat", "dog"]] * n), "topk_ids": np.zeros((n, 2), np.int64),
            "topk_scores": np.full((n, 2), 0.25, np.float32), "embedding": np.ones((n, 3), np.float32),
            MARKER_COLUMN: np.full(n, -1),
        }

    ds = ray_local.data.range(6, override_num_blocks=2).map_batches(to_numpy, batch_format="numpy")
    stream_commit(out, ds, [A], marker(A, 6, embeddings=True), embeddings=True)
    t = table.read_table(out)
    assert t.num_rows == 6 and t["topk_labels"].to_pylist()[0] == ["cat", "dog"]
    assert t["embedding"].to_pylist()[0] == [1.0, 1.0, 1.0] and t["topk_ids"].type == pa.list_(pa.int32())
    assert not math.isnan(t["score"].to_pylist()[0])


def test_manifest_write_is_exclusive(output, monkeypatch):
    """Two drivers racing past the existence check: the second publish still fails (link / If-None-Match)."""
    do_commit(output, [stage(output, shard(A, 1))], [A])
    fs, root = fsspec.core.url_to_fs(output)
    path = f"{root.rstrip('/')}/_manifests/c-0001.json"
    before = fs.cat(path)
    monkeypatch.setattr(protocol, "_exists", lambda fs, p: False)
    with pytest.raises(CommitError, match="already exists"):
        protocol._write_manifest(fs, path, b"{}")
    assert fs.cat(path) == before


# ------------------------------------------------------------------------------------ crash safety, recovery


def raw_partition_rows(output: str) -> int:
    """Rows a plain hive-partitioned reader sees, with no manifest in the way (what DuckDB/Spark globs see)."""
    files = [f for f in list_files(output) if f.startswith("model=")]
    return sum(read_parquet(output, f).num_rows for f in files)


@pytest.mark.parametrize("crash", ["after_intent", "mid_moves", "before_manifest", "after_manifest"])
def test_driver_killed_between_commit_steps_then_recover(output, monkeypatch, crash):
    res = [stage(output, shard(A, 2)), stage(output, shard(B, 3))]

    def killed(*a, **k):
        raise OSError("driver killed")

    if crash == "after_intent":
        monkeypatch.setattr(protocol, "_apply_moves", killed)
    elif crash == "mid_moves":
        real = protocol._apply_moves
        monkeypatch.setattr(protocol, "_apply_moves", lambda fs, root, moves: (real(fs, root, moves[:1]), killed()))
    elif crash == "before_manifest":
        monkeypatch.setattr(protocol, "_write_manifest", killed)
    else:
        monkeypatch.setattr(protocol, "_finish_commit", killed)
    with pytest.raises(OSError, match="driver killed"):
        do_commit(output, res, [A, B])
    monkeypatch.undo()
    assert "_pending/c-0001.json" in list_files(output)  # the intent outlives the driver
    if crash in ("mid_moves", "before_manifest"):  # moved but not committed: only raw globs could see it
        assert raw_partition_rows(output) > 0 and table.read_table(output).num_rows == 0

    report = protocol.recover(output, staging_grace_s=0)
    assert report["completed" if crash == "after_manifest" else "rolled_forward"] == ["c-0001"]
    [m] = table.list_manifests(output)
    assert m["counts"]["images"] == 5 and committed_shards(output, DIGEST) == {A, B}
    files = list_files(output)
    assert files == ["_manifests/c-0001.json"] + [f["path"] for f in m["files"]]  # no intent, no staging
    assert table.read_table(output).num_rows == raw_partition_rows(output) == 5
    assert protocol.recover(output, staging_grace_s=0) == {k: [] for k in report}  # idempotent


def test_recover_rolls_back_when_staged_files_are_gone(output, monkeypatch):
    res = [stage(output, shard(A, 2)), stage(output, shard(B, 3))]
    real = protocol._apply_moves

    def one_then_killed(fs, root, moves):
        real(fs, root, moves[:1])
        raise OSError("driver killed")

    monkeypatch.setattr(protocol, "_apply_moves", one_then_killed)
    with pytest.raises(OSError):
        do_commit(output, res, [A, B])
    monkeypatch.undo()
    fs, root = fsspec.core.url_to_fs(output)
    for f in list_files(output):
        if f.startswith("_staging/"):
            fs.rm(f"{root.rstrip('/')}/{f}")  # e.g. an operator cleaned staging by hand
    report = protocol.recover(output, staging_grace_s=0)
    assert report["rolled_back"] == ["c-0001"]
    assert list_files(output) == [] and raw_partition_rows(output) == 0
    assert committed_shards(output, DIGEST) == set()  # both shards stay pending for the next run


def test_recover_removes_orphan_parts_and_only_stale_staging(output):
    do_commit(output, [stage(output, shard(A, 2))], [A], commit_id="c1")
    leftover = stage(output, shard(B, 3))  # a killed run's staged file
    fs, root = fsspec.core.url_to_fs(output)
    orphan = f"model={MODEL}/dt={DT}/part-c-old-00000.parquet"  # moved by a driver that died before its manifest
    fs.pipe_file(f"{root.rstrip('/')}/{orphan}", fs.cat_file(f"{root.rstrip('/')}/{leftover['file']}"))
    assert raw_partition_rows(output) == 5

    report = protocol.recover(output)  # default grace: a fresh staging folder may belong to a live run
    assert report["orphans_removed"] == [orphan] and report["staging_removed"] == []
    assert leftover["file"] in list_files(output) and raw_partition_rows(output) == 2
    assert protocol.recover(output, staging_grace_s=0)["staging_removed"] == [f"_staging/{RUN}"]
    assert not any(f.startswith("_staging/") for f in list_files(output))
    assert table.read_table(output).num_rows == 2


def test_unreachable_shards_are_not_done_corrupt_ones_are(output):
    D, E = "s3://in/d.tar", "s3://in/e.tar"
    results = [stage(output, marker(A, 0, "shard_error: missing: the shard does not exist"),
                     marker(B, 0, "shard_error: unavailable: cannot open the shard: PermissionError: denied"),
                     image_rows(C, 2), marker(C, 2, "shard_error: unavailable: tar unreadable after 4 members"),
                     marker(D, 0, "shard_error: corrupt: parquet unreadable"), shard(E, 1))]
    m = do_commit(output, results, [A, B, C, D, E])
    assert {u: s["done"] for u, s in m["shards"].items()} == {A: False, B: False, C: True, D: True, E: True}
    assert committed_shards(output, DIGEST) == {C, D, E}  # A and B are tried again by the next run
    assert protocol.shard_done(None, 0) and protocol.shard_done("shard_error: truncated: x", 0)


def test_rows_of_a_shard_that_failed_its_integrity_check_become_error_rows(output, monkeypatch):
    """A gzip shard's CRC is checked at its end, after its rows went by: the commit turns them into error rows."""
    failed = f"shard_error: {INTEGRITY_FAILED}: the gzip data is damaged (BadGzipFile: CRC check failed)"
    results = [stage(output, image_rows(A, 2), image_rows(B, 3, errors=1)),
               stage(output, image_rows(B, 1, start=3), marker(B, 4, failed), shard(C, 1), marker(A, 2))]

    def crash(*a, **k):
        raise OSError("driver died")

    monkeypatch.setattr(protocol, "_write_manifest", crash)
    with pytest.raises(OSError, match="driver died"):
        do_commit(output, results, [A, B, C])
    monkeypatch.undo()
    m = do_commit(output, results, [A, B, C])  # the same commit again: rewrites the same copies, then commits
    assert m["counts"] == {"images": 7, "ok": 3, "error": 4, "shards": 3, "shard_errors": 1}
    assert m["shards"][B] == {"images": 4, "rows": 4, "error": failed, "done": True, "format": "webdataset"}
    rows = table.read_table(output).to_pylist()
    assert len(rows) == 7 and all(r["status"] == "ok" for r in rows if r["source"] != B)
    untrusted = [r for r in rows if r["source"] == B]
    assert len(untrusted) == 4
    for r in untrusted:
        assert r["error"] == (f"{UNTRUSTED_ROW_CODE}: integrity check failed: the gzip data is damaged "
                              "(BadGzipFile: CRC check failed)")
        assert (r["status"], r["label"], r["label_id"], r["score"], r["topk_ids"], r["width"]) == \
               ("error", None, -1, None, [], -1)
    assert not [f for f in list_files(output) if f.startswith("_staging/")]


def test_credentials_never_reach_manifest_or_rows(output, monkeypatch):
    canary = "canary-Zq8XvL2pW9"
    monkeypatch.setenv("VITLABEL_TEST_SECRET", canary)
    rows = image_rows(A, 2, errors=1).to_pydict()
    rows["error"][1] = f"decode_error: OSError: s3://AKIA:{canary}@b/x failed with {canary}"
    t = pa.Table.from_pydict(rows, schema=image_rows(A, 1).schema)
    res = stage(output, t, marker(A, 2), marker(B, 0, f"shard_error: unavailable: https://u:{canary}@h/b.tar"))
    m = commit(output, res, [A, B], config={"input": f"s3://key:{canary}@bucket/in", "extra": {"note": canary}})
    assert canary not in json.dumps(m) and canary not in str(res)
    assert m["config"] == {"input": "s3://bucket/in", "extra": {"note": "***"}}
    assert m["shards"][B]["error"] == "shard_error: unavailable: https://h/b.tar"
    errors = table.read_table(output).column("error").to_pylist()
    assert canary not in json.dumps(errors) and "decode_error: OSError: s3://b/x failed with ***" in errors
    fs, root = fsspec.core.url_to_fs(output)
    for f in list_files(output):
        assert canary.encode() not in fs.cat_file(f"{root.rstrip('/')}/{f}")


def commit(output, results, expected, config):
    res = results if isinstance(results, list) else [results]
    return protocol.commit(output=output, run_id=RUN, commit_id="c-0001", model_name=MODEL, model_digest=DIGEST, dt=DT,
                       results=res, expected_shards=expected, config=config, stats={})

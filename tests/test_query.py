"""`pipeline.table.connect` / `relation`, the named reports and `vitlabel query`: committed rows only."""

from __future__ import annotations

import csv
import io
import json
import math

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from _tables import commit_shards, rows

from jobs.cli import main as cli
from pipeline import queries, table
from pipeline.schema import output_schema
from pipeline.staging import write_staging

A, B = "s3://in/a.tar", "s3://in/b.tar"
DA, DB = "sha256:" + "1a" * 32, "sha256:" + "2b" * 32
SHARD_A = [("a0", "cat", 0.95), ("a1", "dog", 0.40), ("a2", "bird", 0.75), ("a3", "cat", 0.30),
           ("a4", None, None, "decode_error: cannot identify image"), ("a5", "fish", 0.55)]
SHARD_B = [("b0", "dog", 0.85), ("b1", "dog", 0.20), ("b2", None, None, "too_large: 90000x90000 pixels"),
           ("b3", None, None, "decode_error: truncated")]
# version B of the same model name relabels shard A: a1 and a3 change their top-1 label
SHARD_A_V2 = [("a0", "cat", 0.97), ("a1", "cat", 0.60), ("a2", "bird", 0.80), ("a3", "dog", 0.45),
              ("a4", None, None, "decode_error: cannot identify image"), ("a5", "fish", 0.65)]


@pytest.fixture()
def local_output(tmp_path):
    """The reports' numbers do not depend on the store: those tests run on local files only."""
    return str(tmp_path / "labels")


def populate(output: str) -> None:
    """Two versions of model vit-a (digests DA then DB), an embeddings run, plus leftovers of a crash."""
    commit_shards(output, {A: SHARD_A}, commit_id="c1", run_id="run-1", model="vit-a", digest=DA, seconds=3.0)
    commit_shards(output, {B: SHARD_B}, commit_id="c2", run_id="run-2", model="vit-a", digest=DA, dt="2024-05-02",
                  embeddings=True, seconds=1.0)
    commit_shards(output, {A: SHARD_A_V2}, commit_id="c3", run_id="run-3", model="vit-a", digest=DB, seconds=2.0)
    leftovers(output)


def leftovers(output: str) -> None:
    """A staged file of a run that never committed, and a part file no manifest names (crash before it)."""
    write_staging([rows("s3://in/staged.tar", [("s0", "cat", 0.1)])], output=output, run_id="run-9",
                  model_digest=DA, embeddings=False)
    res = write_staging([rows("s3://in/orphan.tar", [("o0", "cat", 0.1)])], output=output, run_id="run-8",
                        model_digest=DA, embeddings=False)
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(f"{root}/model=vit-a/dt=2024-05-01", exist_ok=True)
    fs.mv(f"{root}/{res['file']}", f"{root}/model=vit-a/dt=2024-05-01/part-crashed-00000.parquet")


def committed(output: str) -> pa.Table:
    return table.read_table(output)


# ------------------------------------------------------------------------------------------- connect


def test_predictions_has_committed_rows_only(output):
    populate(output)
    con = table.connect(output)
    got = con.sql("SELECT source, key, model, dt, model_digest FROM predictions").to_arrow_table()
    assert got.num_rows == len(SHARD_A) + len(SHARD_B) + len(SHARD_A_V2)
    sources = set(got["source"].to_pylist())
    assert sources == {A, B}  # not s3://in/staged.tar, not s3://in/orphan.tar
    fs, root = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    assert fs.glob(f"{root}/_staging/run-9/*.parquet") and fs.exists(f"{root}/model=vit-a/dt=2024-05-01/"
                                                                       "part-crashed-00000.parquet")
    for query in ("SELECT count(*) FROM predictions WHERE source LIKE '%staged%' OR source LIKE '%orphan%'",
                  "SELECT count(*) FROM predictions WHERE key IN ('s0', 'o0')"):
        assert con.sql(query).fetchall() == [(0,)]
    by = dict(con.sql("SELECT model || '/' || dt || '/' || model_digest, count(*) FROM predictions GROUP BY 1")
              .fetchall())
    assert by == {f"vit-a/2024-05-01/{DA}": 6, f"vit-a/2024-05-02/{DA}": 4, f"vit-a/2024-05-01/{DB}": 6}
    # same rows as the pyarrow reader; the view's columns are the file columns, then model and dt (strings)
    ref = committed(output)
    assert sorted(got["key"].to_pylist()) == sorted(ref["key"].to_pylist())
    cols = con.sql("SELECT * FROM predictions").columns
    assert cols[-2:] == ["model", "dt"] and set(cols) == set(ref.column_names)
    types = {r[0]: r[1] for r in con.sql("DESCRIBE predictions").fetchall()}
    assert types["dt"] == types["model"] == "VARCHAR"
    emb = con.sql("SELECT count(embedding) FROM predictions").fetchall()
    assert emb == [(len(SHARD_B),)]  # runs with and without embeddings mix


def test_empty_table_has_empty_views(tmp_path):
    out = str(tmp_path / "nothing-yet")
    con = table.connect(out)
    described = [(r[0], r[1]) for r in con.sql("DESCRIBE predictions").fetchall()]
    names = [f.name for f in output_schema(False)] + ["model", "dt"]
    assert [n for n, _ in described] == names
    types = dict(described)
    assert types["score"] == "FLOAT" and types["topk_labels"] == "VARCHAR[]" and types["width"] == "INTEGER"
    assert types["labelled_at"] == "TIMESTAMP WITH TIME ZONE"
    assert con.sql("SELECT count(*) FROM predictions").fetchall() == [(0,)]
    assert con.sql("SELECT * FROM runs").fetchall() == []
    for name in queries.REPORTS.keys() - {"diff", "totals", "confidence"}:
        assert queries.report(con, name).fetchall() == [], name
    assert queries.report(con, "totals").fetchall() == [(0, 0, 0, 0, None, 0, 0, 0, 0)]
    assert [r[-1] for r in queries.report(con, "confidence").fetchall()] == [0] * queries.BINS
    with pytest.raises(queries.ReportError, match="0 model versions"):
        queries.report(con, "diff")


def test_staging_only_table_is_empty(tmp_path):
    out = str(tmp_path / "labels")
    leftovers(out)  # a crashed first run: files on disk, no manifest at all
    assert table.connect(out).sql("SELECT count(*) FROM predictions").fetchall() == [(0,)]


def test_runs_view_matches_manifests(output):
    populate(output)
    runs = table.connect(output).sql("SELECT * FROM runs ORDER BY commit_id").to_arrow_table()
    at = runs.schema.get_field_index("committed_at")
    assert runs.schema.remove(at) == table.RUNS_SCHEMA.remove(at)  # DuckDB names UTC in its session time zone
    assert pa.types.is_timestamp(runs.schema.field(at).type) and runs.schema.field(at).type.tz is not None
    ms = sorted(table.list_manifests(output), key=lambda m: m["commit_id"])
    assert runs["commit_id"].to_pylist() == ["c1", "c2", "c3"]
    for r, m in zip(runs.to_pylist(), ms, strict=True):
        assert (r["run_id"], r["model"], r["model_digest"], r["dt"]) == (m["run_id"], m["model"], m["model_digest"],
                                                                          m["dt"])
        assert (r["images"], r["ok"], r["error"], r["shards"], r["shard_errors"]) == tuple(
            m["counts"][k] for k in ("images", "ok", "error", "shards", "shard_errors"))
        assert r["seconds"] == m["stats"]["seconds"]
        assert r["images_per_s"] == pytest.approx(m["counts"]["images"] / m["stats"]["seconds"])
        assert r["committed_at"].isoformat() == m["committed_at"]


def test_connect_sees_later_commits_on_reconnect(tmp_path):
    out = str(tmp_path / "labels")
    commit_shards(out, {A: SHARD_A}, commit_id="c1", run_id="run-1", model="vit-a", digest=DA)
    con = table.connect(out)
    commit_shards(out, {B: SHARD_B}, commit_id="c2", run_id="run-2", model="vit-a", digest=DA)
    assert con.sql("SELECT count(*) FROM predictions").fetchall() == [(6,)]  # the file list is a snapshot
    assert table.connect(out, con).sql("SELECT count(*) FROM predictions").fetchall() == [(10,)]


def test_python_api_dataset_and_relation(output):
    populate(output)
    d = table.dataset(output)
    assert isinstance(d, ds.Dataset) and d.count_rows() == 16
    rel = table.relation(output)
    assert isinstance(rel, duckdb.DuckDBPyRelation)
    assert rel.to_arrow_table().num_rows == 16
    labels = table.relation(output, "SELECT label, count(*) AS n FROM predictions WHERE status = 'ok' "
                                    "AND model_digest = 'sha256:" + "1a" * 32 + "' GROUP BY label ORDER BY label")
    assert labels.fetchall() == [("bird", 1), ("cat", 2), ("dog", 3), ("fish", 1)]
    con = duckdb.connect()
    con.execute("CREATE TABLE mine AS SELECT 1 AS x")
    assert table.relation(output, "SELECT count(*) FROM predictions, mine", con=con).fetchall() == [(16,)]


# ------------------------------------------------------------------------------------------- reports


def _ok(t: pa.Table) -> pa.Table:
    return t.filter(pc.equal(t["status"], "ok"))


def test_report_labels_matches_pyarrow(local_output):
    output = local_output
    populate(output)
    got = queries.report(table.connect(output), "labels").to_arrow_table().to_pylist()
    ok = _ok(committed(output))
    agg = ok.group_by(["model", "model_digest", "label"]).aggregate([("score", "count"), ("score", "mean"),
                                                                     ("score", "min")])
    want = {(r["model_digest"][:19], r["label"]): r for r in agg.to_pylist()}
    assert len(got) == len(want)
    totals = {d: sum(r["score_count"] for k, r in want.items() if k[0] == d) for d, _ in want}
    for r in got:
        w = want[(r["digest"], r["label"])]
        assert r["images"] == w["score_count"] and r["model"] == w["model"]
        assert r["mean_score"] == pytest.approx(w["score_mean"]) and r["min_score"] == pytest.approx(w["score_min"])
        assert r["share"] == pytest.approx(w["score_count"] / totals[r["digest"]])
    firsts = [r for r in got if r["digest"] == DA[:19]]
    assert [r["images"] for r in firsts] == sorted((r["images"] for r in firsts), reverse=True)


def test_report_low_confidence_matches_pyarrow(local_output):
    output = local_output
    populate(output)
    con = table.connect(output)
    got = queries.report(con, "low-confidence", threshold=0.5).to_arrow_table()
    ok = _ok(committed(output))
    low = ok.filter(pc.less(ok["score"], 0.5)).sort_by([("score", "ascending"), ("source", "ascending"),
                                                         ("key", "ascending")])
    assert got["key"].to_pylist() == low["key"].to_pylist() == ["b1", "a3", "a1", "a3"]
    assert got["score"].to_pylist() == low["score"].to_pylist()
    assert got["runner_up"].to_pylist() == [t[1] for t in low["topk_labels"].to_pylist()]
    assert queries.report(con, "low-confidence", threshold=0.0).fetchall() == []
    assert len(queries.report(con, "low-confidence", threshold=1.0).fetchall()) == ok.num_rows


def test_report_errors_matches_pyarrow(local_output):
    output = local_output
    populate(output)
    got = queries.report(table.connect(output), "errors").to_arrow_table().to_pylist()
    t = committed(output)
    err = t.filter(pc.equal(t["status"], "error"))
    want: dict[tuple[str, str], list] = {}
    for r in err.to_pylist():
        want.setdefault((r["model"], r["error"].split(":", 1)[0]), []).append(r)
    assert {(r["model"], r["reason"]): r["images"] for r in got} == {k: len(v) for k, v in want.items()}
    assert {(r["model"], r["reason"]): r["shards"] for r in got} == {
        k: len({x["source"] for x in v}) for k, v in want.items()}
    assert got[0]["reason"] == "decode_error" and got[0]["images"] == 3
    assert [r["images"] for r in got] == sorted((r["images"] for r in got), reverse=True)


def test_report_runs_matches_manifests(local_output):
    output = local_output
    populate(output)
    got = queries.report(table.connect(output), "runs").to_arrow_table().to_pylist()
    ms = table.list_manifests(output)
    assert [r["run_id"] for r in got] == [m["run_id"] for m in ms]
    for r, m in zip(got, ms, strict=True):
        assert r["images"] == m["counts"]["images"] and r["digest"] == m["model_digest"][:19]
        assert r["seconds"] == m["stats"]["seconds"]
        assert r["images_per_s"] == pytest.approx(m["counts"]["images"] / m["stats"]["seconds"])
        assert r["committed_at"].isoformat() == m["committed_at"]


def test_report_summary_matches_pyarrow(local_output):
    output = local_output
    populate(output)
    got = {r["digest"]: r for r in queries.report(table.connect(output), "summary").to_arrow_table().to_pylist()}
    t = committed(output)
    for digest in (DA, DB):
        sub = t.filter(pc.equal(t["model_digest"], digest))
        r = got[digest[:19]]
        assert r["images"] == sub.num_rows and r["ok"] == _ok(sub).num_rows
        assert r["error"] == sub.num_rows - _ok(sub).num_rows
        assert r["labels"] == len(pc.unique(_ok(sub)["label"]))
        assert r["mean_score"] == pytest.approx(pc.mean(sub["score"]).as_py())


def test_report_diff(local_output):
    output = local_output
    populate(output)
    con = table.connect(output)
    a = {r["key"]: r["label"] for r in _ok(table.read_table(output, model_digest=DA)).to_pylist()}
    b = {r["key"]: r["label"] for r in _ok(table.read_table(output, model_digest=DB)).to_pylist()}
    both = a.keys() & b.keys()
    differ = sorted(k for k in both if a[k] != b[k])
    for sel_a, sel_b in ((DA, DB), ("1a1a1a1a", "sha256:2b2b"), (None, None)):
        got = queries.report(con, "diff", model_a=sel_a, model_b=sel_b).to_arrow_table()
        assert got["key"].to_pylist() == differ == ["a1", "a3"]
        assert [(r["label_a"], r["label_b"]) for r in got.to_pylist()] == [(a[k], b[k]) for k in differ]
        s = queries.diff_summary(con, sel_a, sel_b)
        assert (s["both"], s["agree"], s["differ"]) == (len(both), len(both) - 2, 2)
        assert s["agreement"] == pytest.approx((len(both) - 2) / len(both))
        assert (s["images_a"], s["images_b"]) == (len(a), len(b))
    reverse = queries.report(con, "diff", model_a=DB, model_b=DA).to_arrow_table()
    assert reverse["label_a"].to_pylist() == [b[k] for k in differ]
    with pytest.raises(queries.ReportError, match="expected a model name or digest"):
        queries.report(con, "diff", model_a="nope", model_b=DA)
    with pytest.raises(queries.ReportError, match="two different"):
        queries.report(con, "diff", model_a=DA, model_b=DA[:20])
    with pytest.raises(queries.ReportError, match="expected both"):
        queries.report(con, "diff", model_a=DA)


def test_reports_of_one_model_version(local_output, capsys):
    """`model` keeps one version's rows and manifests in every report; the pooled reports the HTML page shows
    (totals, label-counts, error-reasons, lowest-per-label) agree with pyarrow and with the per-model ones."""
    output = local_output
    populate(output)
    con = table.connect(output)
    t = committed(output)
    for sel, digest in ((None, None), ("1a1a", DA), (DB, DB)):
        sub = t if digest is None else t.filter(pc.equal(t["model_digest"], digest))
        ok = _ok(sub)
        totals = queries.report(con, "totals", model=sel).to_arrow_table().to_pylist()[0]
        assert (totals["images"], totals["ok"], totals["error"]) == (sub.num_rows, ok.num_rows,
                                                                     sub.num_rows - ok.num_rows)
        assert (totals["models"], totals["commits"]) == ((2, 3) if digest is None else (1, 2 if digest == DA else 1))
        counts = queries.report(con, "label-counts", model=sel).fetchall()
        want = {r["label"]: r["count_all"] for r in ok.group_by("label").aggregate([([], "count_all")]).to_pylist()}
        assert {lab: n for lab, n, _ in counts} == want
        assert [n for _, n, _ in counts] == sorted(want.values(), reverse=True)
        errs = queries.report(con, "error-reasons", model=sel).fetchall()
        per_model = queries.report(con, "errors", model=sel).fetchall()
        assert sorted((r, n) for r, n, _, _ in errs) == sorted((r, n) for _, r, n, _, _ in per_model)  # one model
        lowest = queries.report(con, "lowest-per-label", model=sel, per_label=1, max_labels=2).to_arrow_table()
        top2 = [lab for lab, _, _ in counts[:2]]
        assert lowest["label"].to_pylist() == top2
        assert lowest["score"].to_pylist() == [min(r["score"] for r in ok.to_pylist() if r["label"] == lab)
                                               for lab in top2]
        hist = queries.report(con, "confidence", model=sel, bins=4).fetchall()
        assert [r[0] for r in hist] == [0, 1, 2, 3] and sum(r[3] for r in hist) == ok.num_rows
        runs = queries.report(con, "runs", model=sel).to_arrow_table()
        assert set(runs["digest"].to_pylist()) == {d[:19] for d in ([DA, DB] if digest is None else [digest])}
    with pytest.raises(queries.ReportError, match="expected --model-a and --model-b, got --model"):
        queries.report(con, "diff", model=DA)
    with pytest.raises(queries.ReportError, match="bins: expected an integer >= 1, got 0"):
        queries.report(con, "confidence", bins=0)
    rc, text, _ = run_cli(capsys, output, "--report", "lowest-per-label", "--model", DB[:15], "--per-label", "1",
                          "--max-labels", "1", "--format", "csv")
    assert rc == 0 and [r["key"] for r in csv.DictReader(io.StringIO(text))] == ["a1"]  # cat: a1 0.60 < a0 0.97
    rc, _, err = run_cli(capsys, output, "SELECT 1", "--model", DA)
    assert rc == 2 and "--model: expected with --report" in err
    with pytest.raises(SystemExit):
        cli(["query", "--help"])
    text = capsys.readouterr().out
    assert all(f"\n  {name} " in text for name in queries.REPORTS)  # each report listed with what it gives


def test_report_diff_by_model_name(tmp_path):
    out = str(tmp_path / "labels")
    commit_shards(out, {A: SHARD_A}, commit_id="c1", run_id="run-1", model="vit-small", digest=DA)
    commit_shards(out, {A: SHARD_A_V2}, commit_id="c2", run_id="run-2", model="vit-large", digest=DB)
    got = queries.report(table.connect(out), "diff", model_a="vit-small", model_b="vit-large").fetchall()
    assert [r[1] for r in got] == ["a1", "a3"]


# ------------------------------------------------------------------------------------------- CLI


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli(["-q", "query", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.slow
def test_cli_formats_parse_back(output, tmp_path, capsys):
    populate(output)
    sql = "SELECT key, label, score, topk_labels, labelled_at, model, dt FROM predictions ORDER BY model_digest, key"
    ref = table.relation(output, sql).to_arrow_table()

    rc, out, _ = run_cli(capsys, output, sql, "--format", "csv")
    assert rc == 0
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert [r["key"] for r in parsed] == ref["key"].to_pylist()
    assert [r["label"] or None for r in parsed] == ref["label"].to_pylist()
    assert [json.loads(r["topk_labels"]) for r in parsed] == ref["topk_labels"].to_pylist()
    scores = [float(r["score"]) if r["score"] else None for r in parsed]
    for x, y in zip(scores, ref["score"].to_pylist(), strict=True):
        assert (x is None and y is None) or math.isclose(x, y, rel_tol=1e-6)

    rc, out, _ = run_cli(capsys, output, sql, "--format", "json")
    assert rc == 0
    parsed = json.loads(out)
    assert [r["key"] for r in parsed] == ref["key"].to_pylist()
    assert [r["topk_labels"] for r in parsed] == ref["topk_labels"].to_pylist()
    assert parsed[0]["labelled_at"] == ref["labelled_at"][0].as_py().isoformat()

    dest = str(tmp_path / "out.parquet")
    rc, _, err = run_cli(capsys, output, sql, "--format", "parquet", "--out", dest)
    assert rc == 0 and "16 rows" in err
    back = pq.read_table(dest)
    assert back.num_rows == 16 and back["key"].to_pylist() == ref["key"].to_pylist()
    assert back["topk_labels"].to_pylist() == ref["topk_labels"].to_pylist()

    dest = str(tmp_path / "labels.json")
    rc, out, _ = run_cli(capsys, output, "--report", "labels", "--format", "json", "--out", dest)
    assert rc == 0 and out == ""
    with open(dest) as f:
        assert sum(r["images"] for r in json.load(f)) == _ok(committed(output)).num_rows


def test_cli_table_format(tmp_path, capsys):
    out = str(tmp_path / "labels")
    populate(out)
    rc, text, _ = run_cli(capsys, out)  # default: summary per model version
    lines = text.splitlines()
    assert rc == 0 and lines[0].split()[:3] == ["model", "digest", "images"] and set(lines[1]) <= {"-", " "}
    assert len(lines) == 4 and DA[:19] in lines[2] and DB[:19] in lines[3]
    rc, text, _ = run_cli(capsys, out, "SELECT key, score FROM predictions ORDER BY key", "--limit", "3")
    assert rc == 0 and len(text.splitlines()) == 2 + 3
    rc, text, _ = run_cli(capsys, out, "SELECT * FROM range(120)")
    assert rc == 0 and len(text.splitlines()) == 2 + 50 + 1 and "more rows not shown" in text
    rc, text, _ = run_cli(capsys, out, "--report", "diff", "--model-a", DA[:15], "--model-b", DB)
    assert rc == 0 and "label_a" in text and "agreement 0.6000: 3 of 5 images" in text
    rc, text, _ = run_cli(capsys, out, "--report", "low-confidence", "--threshold", "0.35")
    assert rc == 0 and [ln.split()[2] for ln in text.splitlines()[2:]] == ["dog", "cat"]  # b1 0.20, a3 0.30
    rc, text, _ = run_cli(capsys, out, "--report", "errors", "--format", "csv")
    assert rc == 0 and text.splitlines()[0] == "model,reason,images,shards,example"


def test_cli_errors_exit_2(tmp_path, capsys):
    out = str(tmp_path / "labels")
    populate(out)
    rc, _, err = run_cli(capsys, out, "SELEC key FROM predictions")
    assert rc == 2 and "bad SQL" in err and "syntax error" in err
    rc, _, err = run_cli(capsys, out, "SELECT nope FROM predictions")
    assert rc == 2 and "bad SQL" in err and "nope" in err
    rc, _, err = run_cli(capsys, out, "SELECT * FROM missing_view")
    assert rc == 2 and "missing_view" in err
    rc, _, err = run_cli(capsys, out, "--format", "parquet")
    assert rc == 2 and "--out" in err
    rc, _, err = run_cli(capsys, out, "SELECT 1", "--report", "labels")
    assert rc == 2 and "got both" in err
    rc, _, err = run_cli(capsys, out, "--report", "diff", "--model-a", "nope", "--model-b", DA)
    assert rc == 2 and "expected a model name or digest" in err
    rc, _, err = run_cli(capsys, out, "--model-a", DA)
    assert rc == 2 and "--report diff" in err


# ------------------------------------------------------------------------------- the Querying README


def test_readme_glob_excludes_staging(tmp_path):
    """The README's DuckDB glob names the partitions, so a staged file never matches; `*/*/*` would match it."""
    out = str(tmp_path / "labels")
    commit_shards(out, {A: SHARD_A}, commit_id="c1", run_id="run-1", model="vit-a", digest=DA)
    write_staging([rows("s3://in/staged.tar", [("s0", "cat", 0.1)])], output=out, run_id="run-9",
                  model_digest=DA, embeddings=False, staging_id="deep")
    con = duckdb.connect()
    good = con.sql(f"SELECT count(*) FROM read_parquet('{out}/model=*/dt=*/*.parquet', hive_partitioning=true)")
    assert good.fetchall() == [(len(SHARD_A),)]
    loose = con.sql(f"SELECT count(*) FROM read_parquet('{out}/*/*/*.parquet')")
    assert loose.fetchall() == [(len(SHARD_A) + 1,)]

"""Concurrent writers on one output: one lease per model version, and a `recover` scoped to its version.

Jobs of the same model version started together: one runs, the others exit 3 naming it, and every image is
in the table exactly once. Jobs of different model versions run side by side into one partition and both
commit, each exactly once. The jobs are real `vitlabel run`/`nightly` processes, drivers on the session's
local Ray, writing to local disk or the moto S3 server; the table is read with `pipeline.table` and DuckDB.
The sink-level tests pause one version's commit between its steps and recover as another version's writer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import fsspec
import pytest
from _digits import held_out_pngs
from _procs import end_session
from _sinkrows import DT, MODEL, do_commit, list_files, shard
from test_faults import assert_exactly_once, write_shards

from pipeline import commit, table
from pipeline.commit import CommitError, recover
from pipeline.layout import committed_shards, staging_name
from pipeline.lease import current, version_lease
from pipeline.staging import write_staging

ROOT = Path(__file__).resolve().parents[1]
DA = "sha256:" + "a1" * 32  # the recovering writer's model version
DB = "sha256:" + "b2" * 32  # another version's writer, committing at the same time
A, B, C = "s3://in/a.tar", "s3://in/b.tar", "s3://in/c.tar"
# Small and cheap on a 2-core machine: a commit per shard; one fused actor (the only worker a job starts) when
# one job of a version labels, and, for versions labelling side by side, a half-CPU predictor actor and
# half-CPU read tasks per job, so that both fit the session's 2 CPUs at once.
JOB = ["--batch-size", "16", "--preprocess-batch-size", "16", "--wave-shards", "1", "--no-progress"]
ONE_ACTOR = ["--layout", "fused", "--cpus-per-actor", "2"]
SIDE_BY_SIDE = ["--layout", "split", "--cpus-per-actor", "0.5", "--preprocess-cpus", "0.5"]


# ---------------------------------------------------------------------------------------- sink: recover


class Paused(Exception):
    """Stands for a live writer between two steps of its commit (nothing is undone)."""


def _pause(*a, **k):
    raise Paused


def _stage(output: str, staging_id: str, digest: str, *tables) -> dict:
    return write_staging(tables, output=output, run_id=staging_id.split(".")[0], model_digest=digest,
                         embeddings=False, staging_id=staging_id)


def _b_mid_commit(output: str, monkeypatch) -> tuple[list[dict], list[dict]]:
    """Version B's writer: wave 0 paused after its moves, before its manifest; wave 1 staged, not committed."""
    b0, b1 = staging_name("rb-w0000", DB), staging_name("rb-w0001", DB)
    wave0, wave1 = [_stage(output, b0, DB, shard(A, 2))], [_stage(output, b1, DB, shard(B, 3))]
    with monkeypatch.context() as m:
        m.setattr(commit, "_write_manifest", _pause)
        with pytest.raises(Paused):
            do_commit(output, wave0, [A], commit_id="rb-w0000", digest=DB, run_id="rb", staging_id=b0)
    assert any(f.startswith(f"model={MODEL}/dt={DT}/part-rb-w0000-") for f in list_files(output))  # moved
    return wave0, wave1


def test_recover_of_one_version_leaves_another_versions_commit_alone(output, monkeypatch):
    wave0, wave1 = _b_mid_commit(output, monkeypatch)
    # What version A's own killed run left: a staging folder of its version; plus an untagged young folder (an
    # older release's run, maybe live) and a part file that no manifest or intent names (abandoned).
    dead = _stage(output, staging_name("ra-w0000", DA), DA, shard(C, 4))
    _stage(output, "legacy-run", DA, shard(C, 1))
    fs, root = fsspec.core.url_to_fs(output)
    orphan = f"model={MODEL}/dt={DT}/part-gone-00000.parquet"
    fs.pipe_file(f"{root.rstrip('/')}/{orphan}", fs.cat_file(f"{root.rstrip('/')}/{dead['file']}"))
    before = set(list_files(output))

    report = recover(output, model_digest=DA, staging_grace_s=0)  # A holds its version's lease
    assert report["left"] == ["rb-w0000"] and report["rolled_forward"] == report["rolled_back"] == []
    assert report["orphans_removed"] == [orphan]
    assert report["staging_removed"] == [f"_staging/{staging_name('ra-w0000', DA)}"]
    assert set(list_files(output)) == before - {orphan, dead["file"]}  # B's intent, moved and staged files stay

    # B goes on as if nothing happened: its paused commit finishes, then its next wave commits.
    do_commit(output, wave0, [A], commit_id="rb-w0000", digest=DB, run_id="rb",
              staging_id=staging_name("rb-w0000", DB))
    do_commit(output, wave1, [B], commit_id="rb-w0001", digest=DB, run_id="rb",
              staging_id=staging_name("rb-w0001", DB))
    assert committed_shards(output, DB) == {A, B} and table.read_table(output).num_rows == 5
    assert recover(output, model_digest=DA, staging_grace_s=0)["left"] == []


def test_recover_finishes_another_versions_commit_once_it_is_abandoned(output, monkeypatch):
    """Past `others_grace_s` another version's intent and staging folders are taken for abandoned: the intent is
    rolled forward like one's own, the staged wave that never committed is deleted."""
    _b_mid_commit(output, monkeypatch)
    report = recover(output, model_digest=DA, staging_grace_s=0, others_grace_s=0)
    assert report["rolled_forward"] == ["rb-w0000"] and report["left"] == []
    assert report["staging_removed"] == [f"_staging/{staging_name('rb-w0001', DB)}"]
    assert committed_shards(output, DB) == {A} and table.read_table(output).num_rows == 2
    assert [f for f in list_files(output) if not f.startswith(("model=", "_manifests/"))] == []


def test_two_versions_with_one_run_id_cannot_share_a_commit(tmp_path, monkeypatch):
    out = str(tmp_path / "labels")
    _b_mid_commit(out, monkeypatch)
    mine = [_stage(out, staging_name("rb-w0000", DA), DA, shard(C, 2))]
    with pytest.raises(CommitError, match=rf"got one of model version {DB}: give this run another --run-id"):
        do_commit(out, mine, [C], commit_id="rb-w0000", digest=DA, run_id="rb")
    assert committed_shards(out, DA) == set()


# ------------------------------------------------------------------------------------ real jobs at once


@pytest.fixture(scope="module")
def pngs() -> tuple[bytes, ...]:
    return held_out_pngs()


def _start(ray_local, command: str, inp: str, out: str, run_id: str, *args: str) -> subprocess.Popen:
    """`vitlabel <command>` in a process of its own, a driver on the session's Ray."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT),
           "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "jobs.cli", "-q", command, "--input", inp, "--output", out, "--run-id", run_id,
           *JOB, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _together(procs: dict[str, subprocess.Popen], timeout_s: float = 240) -> dict[str, tuple[int, str, str]]:
    """{run_id: (exit code, stdout, stderr)} of jobs started together, once all have ended."""
    results = {}
    try:
        deadline = time.monotonic() + timeout_s
        for run_id, p in procs.items():
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results[run_id] = (p.returncode, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            end_session(p.pid, grace_s=1)  # only this job's own processes
    return results


def _one_winner(results: dict[str, tuple[int, str, str]], procs: dict[str, subprocess.Popen], images: int) -> str:
    """The one job that labelled (exit 0, every image); every other exited 3 naming it. Returns its run id."""
    winners = [r for r, (code, _, _) in results.items() if code == 0]
    assert len(winners) == 1, {r: (code, err[-1500:]) for r, (code, _, err) in results.items()}
    winner = winners[0]
    assert json.loads(results[winner][1])["images"] == images
    for run_id, (code, _, err) in results.items():
        if run_id == winner:
            continue
        assert code == 3, err[-1500:]
        line = next((x for x in err.splitlines() if x.startswith("vitlabel: ")), err[-1500:])
        assert re.search(rf"another job of model version sha256:[0-9a-f]{{16}} holds the lease on .* until "
                         rf"20\d\d-\S+ \(holder host={re.escape(socket.gethostname())} pid={procs[winner].pid} "
                         rf"run_id={winner}\)", line), line
        assert "nothing was labelled by this job" in line
    return winner


def _exactly_once_by_duckdb(out: str, ids: set[str], digest: str | None = None) -> None:
    where = f" WHERE model_digest = '{digest}'" if digest else ""
    sql = f"SELECT count(*), count(DISTINCT image_id) FROM predictions{where}"
    [(n, distinct)] = table.relation(out, sql).fetchall()
    assert n == distinct == len(ids), (n, distinct, len(ids))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_of_one_version_started_together(ray_local, tmp_path, pngs, where, request):
    """The user's report: two `vitlabel run` of builtin:digits on one input and output, default flags."""
    if where == "s3":
        request.getfixturevalue("s3")
    out = str(tmp_path / "labels") if where == "local" else "s3://test-bucket/labels"
    inp = str(tmp_path / "in")
    ids = write_shards(inp, list(pngs), shards=3, per=8)
    procs = {r: _start(ray_local, "run", inp, out, r, "--model", "builtin:digits", *ONE_ACTOR)
             for r in ("run-a", "run-b")}
    winner = _one_winner(_together(procs), procs, len(ids))
    assert_exactly_once(out, ids)
    _exactly_once_by_duckdb(out, ids)
    assert {r["run_id"] for r in table.read_table(out, columns=["run_id"]).to_pylist()} == {winner}


@pytest.mark.slow
def test_two_model_versions_write_one_partition_at_once(ray_local, tmp_path, pngs):
    """builtin:digits and builtin:digits-resnet32 under one --model-name: each its own lease, both commit."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "labels")
    ids = write_shards(inp, list(pngs), shards=3, per=8)
    procs = {f"run-{m}": _start(ray_local, "run", inp, out, f"run-{m}", "--model", f"builtin:{m}", "--model-name",
                                "digits", *SIDE_BY_SIDE) for m in ("digits", "digits-resnet32")}
    results = _together(procs)
    assert all(code == 0 for code, _, _ in results.values()), {r: err[-1500:] for r, (_, _, err) in results.items()}
    summaries = [json.loads(o) for _, o, _ in results.values()]
    digests = {s["model_digest"] for s in summaries}
    assert len(digests) == 2 and all(s["images"] == len(ids) for s in summaries)
    held = []  # each version held its own lease, and the two were held at the same time
    for d in digests:
        lease = current(out, version_lease(d))
        assert not lease.held  # released
        held.append(tuple(datetime.fromisoformat(lease.data[k]) for k in ("acquired_at", "renewed_at")))
    assert max(s for s, _ in held) < min(e for _, e in held), held
    for d in digests:
        got = table.read_table(out, columns=["image_id"], model_digest=d).column("image_id").to_pylist()
        assert sorted(got) == sorted(ids)
        _exactly_once_by_duckdb(out, ids, d)
    assert {m["model"] for m in table.list_manifests(out)} == {"digits"}  # one partition, both versions in it
    assert [f for f in list_files(out) if f.startswith(("_staging/", "_pending/"))] == []


@pytest.mark.slow
def test_four_nightlies_and_a_run_on_s3_one_labels(ray_local, s3, tmp_path, pngs):
    """Four nightlies and a run of one version started together on S3 (one race, to keep CI short)."""
    inp, out = str(tmp_path / "in"), "s3://test-bucket/labels"
    ids = write_shards(inp, list(pngs), shards=3, per=8)
    jobs = [f"nightly-{i}" for i in range(4)] + ["run-0"]
    procs = {r: _start(ray_local, r.split("-")[0], inp, out, r, "--model", "builtin:digits", *ONE_ACTOR) for r in jobs}
    _one_winner(_together(procs), procs, len(ids))
    assert_exactly_once(out, ids)
    _exactly_once_by_duckdb(out, ids)

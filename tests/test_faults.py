"""Faults during real runs: killed predictor actors, killed preprocessing workers, a killed driver, S3 errors,
and inputs that fail deterministically. Afterwards every image id is in the committed table exactly once, no
part file is visible without a manifest, and a failure that retrying cannot fix ends the run quickly with a
one-line reason.

Processes are found among this test's own descendants (the session's local Ray was started by this
process) by their Ray process title, and killed by pid.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from _digits import held_out_pngs
from _procs import descendants, end_session

from pipeline.config import JobConfig
from pipeline.plan import RunFailed, run
from pipeline.sources import make_image_id, write_webdataset
from pipeline.table import list_manifests, read_table

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers


class Killer(threading.Thread):
    """SIGKILLs, `times` times, a process of this test's Ray whose title matches, once it has run `after_s`."""

    def __init__(self, match, times: int, after_s: float):
        super().__init__(daemon=True)
        self.match, self.times, self.after_s = match, times, after_s
        self.killed: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        first_seen: dict[int, float] = {}
        while not self.done.is_set() and len(self.killed) < self.times:
            now = time.monotonic()
            for pid, cmd in descendants(os.getpid()).items():
                if pid in self.killed or not cmd.startswith("ray::") or not self.match(cmd):
                    continue
                if now - first_seen.setdefault(pid, now) >= self.after_s:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                    first_seen.clear()  # the next victim (a restart, a retry) must run a while too
                    break
            time.sleep(0.05)


@pytest.fixture(scope="module")
def pngs() -> tuple[bytes, ...]:
    return held_out_pngs()


def write_shards(where: str, pngs: list[bytes], shards: int, per: int | list[int]) -> set[str]:
    """`shards` WebDataset shards of `per` digits (or per[n] in shard n) under `where` (a path or s3:// prefix);
    returns every image id."""
    ids = set()
    sizes = per if isinstance(per, list) else [per] * shards
    for n in range(shards):
        uri = f"{where.rstrip('/')}/shard-{n:03d}.tar"
        samples = [(f"s{n}/{i:04d}", {"png": pngs[(sum(sizes[:n]) + i) % len(pngs)]}) for i in range(sizes[n])]
        write_webdataset(uri, samples)
        full = uri if uri.startswith("s3://") else f"file://{uri}"
        ids.update(make_image_id(full, k) for k, _ in samples)
    return ids


def cfg(inp: str, out: str, **kw) -> JobConfig:
    kw = {"model": "builtin:digits", "progress": False, "batch_size": 16, "preprocess_batch_size": 16, **kw}
    return JobConfig(input=inp, output=out, **kw)


def assert_exactly_once(out: str, ids: set[str]) -> None:
    """Every id once in the committed table, and a raw hive read of the partitions sees the very same rows."""
    got = read_table(out, columns=["image_id"]).column("image_id").to_pylist()
    assert len(got) == len(set(got)) and set(got) == ids, (len(got), len(set(got)), len(ids))
    raw = pads.dataset(out, format="parquet", partitioning="hive").to_table(columns=["image_id"])
    assert sorted(raw.column("image_id").to_pylist()) == sorted(got)  # no uncommitted part file in the way


# ------------------------------------------------------------------------------------------ Ray processes


@pytest.mark.slow
@pytest.mark.parametrize("layout,actor", [("split", "Predictor"), ("fused", "ShardLabeler")])
def test_predictor_actor_killed_three_times(ray_local, tmp_path, pngs, layout, actor):
    """The model's actor SIGKILLed mid-batch 3 times, in both layouts: split (predictor actors behind decode
    tasks) and fused (actors that read, decode and label whole shards; a shard in flight is read again)."""
    ids = write_shards(str(tmp_path / "in"), pngs, shards=20, per=300)
    # Ray titles an actor process "<class>.<method>" while it runs that method: kill it mid-batch.
    killer = Killer(lambda cmd: actor in cmd and cmd.split()[0].endswith(".submit"), times=3, after_s=0.05)
    killer.start()
    try:
        summary = run(cfg(str(tmp_path / "in"), str(tmp_path / "out"), layout=layout, wave_shards=5))
    finally:
        killer.done.set()
    assert len(killer.killed) == 3, "the run ended before the actor was killed 3 times: give it more images"
    assert summary.counts["images"] == len(ids) == 6000 and summary.counts["error"] == 0
    assert len(summary.manifests) == 4 and {m["stats"]["layout"] for m in summary.manifests} == {layout}
    assert_exactly_once(str(tmp_path / "out"), ids)
    at = summary.actor_time  # the model actors' time from Ray Data's stats, in the summary `vitlabel run` prints
    assert at["operator"] == f"MapBatches({actor})" and at["calls"] >= 1 and at["udf_wall_s"] > 0
    assert 0 < at["busy"] and at["actors"] >= 1 and summary.to_dict()["actor_time"] == at


@pytest.mark.slow
def test_preprocessing_worker_killed(ray_local, tmp_path, pngs):
    ids = write_shards(str(tmp_path / "in"), pngs, shards=6, per=300)
    is_reader = lambda cmd: "Predictor" not in cmd and "read_and_preprocess" in cmd  # Ray titles the task by its UDF
    killer = Killer(is_reader, times=2, after_s=0.3)
    killer.start()
    try:
        summary = run(cfg(str(tmp_path / "in"), str(tmp_path / "out"), layout="split"))
    finally:
        killer.done.set()
    assert len(killer.killed) == 2, "the run ended before a preprocessing worker was killed twice"
    assert summary.counts["images"] == len(ids) and summary.counts["error"] == 0  # retried tasks, no duplicates
    assert_exactly_once(str(tmp_path / "out"), ids)


@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun(ray_local, tmp_path, pngs):
    """`vitlabel run` in a subprocess (a second driver on the session's Ray), SIGKILLed twice: once just after
    its first wave committed, once as soon as a wave's staged files appear (often mid-commit). Then a run to
    the end: each image exactly once, committed waves kept, nothing half-committed left behind."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_shards(inp, pngs, shards=8, per=100)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "jobs.cli", "-q", "run", "--input", inp, "--output", out, "--model",
           "builtin:digits", "--wave-shards", "2", "--batch-size", "16", "--no-progress"]
    manifests = Path(out) / "_manifests"
    triggers = {
        "after_first_commit": lambda: len(list(manifests.glob("*.json"))) >= 1,
        "staged_files": lambda: any((Path(out) / "_staging").glob("*/*.parquet")),
    }
    committed_before = 0
    for name, trigger in triggers.items():
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while not trigger() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, f"{name}: the driver ended before the kill: {proc.stderr.read()[-2000:]}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            end_session(proc.pid, grace_s=1)  # only this driver's own processes
        committed = len(list_manifests(out))
        assert committed >= committed_before  # a kill never undoes a committed wave
        committed_before = committed
    assert committed_before < 4  # the kills did interrupt the job

    summary = run(cfg(inp, out, wave_shards=2, lease=True))  # the lease holder also sweeps stale staging
    assert summary.shards_skipped + sum(m["counts"]["shards"] for m in summary.manifests) == 8
    assert_exactly_once(out, ids)
    leftovers = [p for p in Path(out).rglob("*") if p.is_file() and "_lease" not in p.parts]
    assert all(p.parent.name == "_manifests" or p.name.startswith("part-") for p in leftovers), leftovers


# ------------------------------------------------------------------------------------------------ S3 faults


@pytest.mark.slow
def test_s3_throttling_and_5xx_are_retried(ray_local, s3_faults, pngs):
    ids = write_shards("s3://test-bucket/in", pngs, shards=4, per=40)
    rules = [s3_faults.add(r"^/test-bucket/in/shard-00[02]\.tar", methods=("GET",), times=3),  # SlowDown 503
             s3_faults.add(r"^/test-bucket/in/shard-001\.tar", methods=("GET",), status=500, code="InternalError",
                           times=2),
             s3_faults.add(r"^/test-bucket/out/_staging/", methods=("PUT", "POST"), times=2),
             s3_faults.add(r"^/test-bucket/out/_manifests/", methods=("PUT",), status=503, code="ServiceUnavailable",
                           times=2)]
    summary = run(cfg("s3://test-bucket/in/", "s3://test-bucket/out"))
    assert [r.hits for r in rules] == [3, 2, 2, 2], [r.seen for r in rules]  # every fault was really served
    assert summary.counts["images"] == len(ids) and summary.to_dict()["shard_error_list"] == {}
    assert_exactly_once("s3://test-bucket/out", ids)


@pytest.mark.slow
def test_s3_shard_denied_is_retried_by_the_next_run(ray_local, s3_faults, pngs):
    ids = write_shards("s3://test-bucket/in", pngs, shards=3, per=20)
    denied = s3_faults.add(r"^/test-bucket/in/shard-001\.tar", status=403, code="AccessDenied", times=None)
    first = run(cfg("s3://test-bucket/in/", "s3://test-bucket/out")).to_dict()
    assert denied.hits > 0
    uri = "s3://test-bucket/in/shard-001.tar"
    assert list(first["shard_error_list"]) == [uri] and first["shards_to_retry"] == [uri]
    assert first["shard_error_list"][uri].startswith("shard_error: unavailable: ")
    assert first["images"] == 40
    s3_faults.clear()  # permission fixed
    second = run(cfg("s3://test-bucket/in/", "s3://test-bucket/out")).to_dict()
    assert second["shards_skipped"] == 2 and second["images"] == 20 and second["shards_to_retry"] == []
    assert_exactly_once("s3://test-bucket/out", ids)


# ------------------------------------------------------------------------------------- deterministic failures


@pytest.mark.slow
def test_model_that_cannot_load_fails_fast_with_its_reason(ray_local, tmp_path, pngs):
    """A weights file cut short (an interrupted upload): its header reads fine on the driver, every actor fails
    to load it. Ray Data does not retry a constructor that raised: the run ends in seconds, saying why."""
    write_shards(str(tmp_path / "in"), pngs, shards=2, per=20)
    model = tmp_path / "model"
    shutil.copytree(ROOT / "pipeline" / "assets" / "digits-vit", model)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) * 2 // 3])
    t0 = time.monotonic()
    with pytest.raises(RunFailed) as e:
        run(cfg(str(tmp_path / "in"), str(tmp_path / "out"), model=str(model)))
    assert time.monotonic() - t0 < 60
    message = str(e.value)
    assert "\n" not in message and "wave 1/1 (2 shards) failed, nothing of it committed" in message
    assert "ModelError: model: expected a safetensors or torch state dict" in message
    assert list_manifests(str(tmp_path / "out")) == []


@pytest.mark.slow
def test_unwritable_output_fails_fast_with_its_reason(ray_local, tmp_path, pngs):
    write_shards(str(tmp_path / "in"), pngs, shards=2, per=20)
    out = tmp_path / "out"
    out.mkdir()
    (out / "_staging").write_text("a file where the staging folder should be")
    t0 = time.monotonic()
    with pytest.raises(RunFailed) as e:
        run(cfg(str(tmp_path / "in"), str(out), wave_shards=1))
    assert time.monotonic() - t0 < 60
    assert "wave 1/2 (1 shards) failed" in str(e.value)
    assert re.search(r": (NotADirectory|FileExists)Error: .*_staging", str(e.value)), str(e.value)
    assert list_manifests(str(out)) == []

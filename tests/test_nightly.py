"""`vitlabel nightly` over three days of arriving shards on a real (moto) S3 server, with a crash mid-run.

Day 1 and day 2 shards are labelled by a nightly in a subprocess (a driver on the session's Ray) that is
SIGKILLed once its first wave is committed; the next nightly takes over the dead process's lease at once and
labels the rest; day 3 brings one more shard; a last nightly labels nothing. Every image ends up exactly once,
and no image is ever relabelled (its run_id stays the one of the commit that first labelled it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _digits import png_bytes
from _procs import end_session

from jobs.cli import main
from pipeline.lease import Lease, current, version_lease
from pipeline.sources import write_webdataset
from pipeline.table import list_manifests, read_table

ROOT = Path(__file__).resolve().parents[1]
INPUT = "s3://test-bucket/shards/"
OUTPUT = "s3://test-bucket/table"
COMMON = ["--model", "builtin:digits", "--batch-size", "16", "--preprocess-batch-size", "16", "--wave-shards", "1"]


@pytest.fixture(scope="module")
def days():
    """Five shards of 6 digits each: two arrive on day 1, two on day 2, one on day 3 (one broken image)."""
    from jobs.train_digits import digits_split

    _, held = digits_split()
    shards = {}
    names = ["day1-a", "day1-b", "day2-a", "day2-b", "day3-a"]
    for n, name in enumerate(names):
        shards[name] = [(f"{name}-{i}", {"png": png_bytes(img)}) for i, (img, _) in enumerate(held[n * 6:(n + 1) * 6])]
    shards["day2-a"].append(("day2-a-broken", {"jpg": b"not a jpeg"}))
    return shards


def _arrive(shards: dict, prefix: str) -> None:
    for name, samples in shards.items():
        if name.startswith(prefix):
            write_webdataset(f"{INPUT}{name}.tar", samples)


def _nightly(capsys, *args: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main(["nightly", "--input", INPUT, "--output", OUTPUT, *COMMON, *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and out.strip() else None), err


def _image_runs() -> dict[str, str]:
    t = read_table(OUTPUT, columns=["image_id", "run_id"]).to_pylist()
    ids = [r["image_id"] for r in t]
    assert len(ids) == len(set(ids)), "an image appears twice in the table"
    return {r["image_id"]: r["run_id"] for r in t}


def _child_env(ray_address: str) -> dict[str, str]:
    """A driver on the session's Ray: a Ray of its own would cost the test its start (seconds on 2 cores), and
    what the crash leaves behind for the next nightly (a lease, maybe a half-done commit) is the same."""
    return {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.slow
def test_nightly_three_days_with_a_crash(ray_local, s3, days, capsys):
    _arrive(days, "day1")
    _arrive(days, "day2")

    # A nightly in its own process, killed once its first wave is committed.
    cmd = [sys.executable, "-m", "jobs.cli", "-q", "nightly", "--input", INPUT, "--output", OUTPUT, *COMMON,
           "--run-id", "crashed", "--dt", "2026-01-01"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(ray_local.get_runtime_context().gcs_address),
                            start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not s3.list_objects_v2(Bucket="test-bucket", Prefix="table/_manifests/").get("KeyCount"):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first wave never committed"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: nothing cleaned up (Ray ends the dead driver's actors)
        proc.wait()
        end_session(proc.pid, grace_s=0)  # anything else the driver started
    crashed = list_manifests(OUTPUT)
    assert 1 <= len(crashed) < 4, [m["commit_id"] for m in crashed]
    name = version_lease(crashed[0]["model_digest"])  # the lease of this model version on OUTPUT
    lease = current(OUTPUT, name)
    assert lease.held and lease.data["owner"]["pid"] == proc.pid  # left behind, unexpired, owner dead
    first_runs = _image_runs()
    assert set(first_runs.values()) == {"crashed"}

    # While another live process holds the lease, a nightly refuses to start (exit 3, clear message).
    with Lease.acquire(OUTPUT, name=name, run_id="someone-else", ttl_s=60, heartbeat=False):
        pass  # takes over the dead process's lease (same host, pid gone) ...
    holder = Lease.acquire(OUTPUT, name=name, run_id="someone-else", ttl_s=60, heartbeat=False)
    try:
        code, _, err = _nightly(capsys, "--dt", "2026-01-02")
        assert code == 3 and "another job of model version sha256:" in err and "holds the lease" in err
        assert f"until {current(OUTPUT, name).data['expires_at']}" in err and "run_id=someone-else" in err
    finally:
        holder.release()

    # Day 2: the re-run labels exactly what the crash left, in waves of one shard.
    code, summary, _ = _nightly(capsys, "--dt", "2026-01-02", "--run-id", "day2")
    assert code == 0
    done_before = sum(m["counts"]["shards"] for m in crashed)
    assert summary["shards_total"] == 4 and summary["shards_skipped"] == done_before
    assert len(summary["commits"]) == 4 - done_before
    runs = _image_runs()
    assert {k: runs[k] for k in first_runs} == first_runs  # nothing the crashed run committed was relabelled
    assert len(runs) == sum(len(days[n]) for n in days if not n.startswith("day3"))

    # Day 3: one new shard arrives; only it is labelled, into the day's partition.
    _arrive(days, "day3")
    code, summary, _ = _nightly(capsys, "--dt", "2026-01-03", "--run-id", "day3")
    assert code == 0 and summary["shards_skipped"] == 4 and summary["images"] == len(days["day3-a"])
    code, summary, _ = _nightly(capsys, "--dt", "2026-01-03", "--run-id", "again")
    assert code == 0 and summary["commits"] == [] and summary["images"] == 0 and summary["shards_skipped"] == 5

    final = _image_runs()
    assert len(final) == sum(len(s) for s in days.values())
    assert {k: final[k] for k in runs} == runs  # every image keeps the run that first committed it
    assert set(final.values()) == {"crashed", "day2", "day3"}
    table = read_table(OUTPUT, columns=["image_id", "dt", "status"]).to_pylist()
    assert {r["dt"] for r in table} == {"2026-01-01", "2026-01-02", "2026-01-03"}
    assert sum(r["status"] == "error" for r in table) == 1
    assert not current(OUTPUT, name).held  # released at the end of every run


def test_nightly_dry_run_shows_pending_and_lease(ray_local, s3, days, capsys):
    _arrive(days, "day1")
    code = main(["nightly", "--input", INPUT, "--output", OUTPUT, "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["shards"]["pending"] == 2 and plan["lease"]["state"] == "free"
    assert plan["config"]["wave_shards"] == 16 and plan["config"]["lease"] is True

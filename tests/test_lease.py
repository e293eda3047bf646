"""The output lease: create-only generations on local disk and on a real (moto) S3 server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import fsspec
import pytest

from pipeline.lease import Lease, LeaseHeld, LeaseLost, current, lease_dir, owner_dead, owner_identity, version_lease


def _write_generation(output: str, gen: int, data: dict) -> None:
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(f"{root}/{lease_dir('nightly')}", exist_ok=True)
    fs.pipe_file(f"{root}/{lease_dir('nightly')}/{gen:012d}.json", json.dumps(data).encode())
    fs.invalidate_cache()


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def test_acquire_refuse_release_reacquire(output):
    lease = Lease.acquire(output, run_id="first", ttl_s=60, heartbeat=False)
    with pytest.raises(LeaseHeld, match=r"another nightly job holds the lease on .* until 20\d\d-"):
        Lease.acquire(output, run_id="second", ttl_s=60, heartbeat=False)
    lease.renew()
    assert current(output).data["owner"]["run_id"] == "first" and current(output).held
    lease.release()
    lease.release()  # idempotent
    assert not current(output).held
    second = Lease.acquire(output, run_id="second", ttl_s=60, heartbeat=False)
    assert current(output).data["owner"]["run_id"] == "second"
    second.release()
    fs, root = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    assert len(fs.ls(f"{root}/{lease_dir('nightly')}")) <= 2  # old generations are cleaned up


def test_expired_lease_of_another_host_is_taken_over_and_the_old_holder_cannot_renew(output):
    old = Lease.acquire(output, run_id="old", ttl_s=60, heartbeat=False)
    cur = current(output)
    data = dict(cur.data, owner=dict(cur.data["owner"], host="elsewhere", pid=1),
                expires_at=_iso(datetime.now(UTC) - timedelta(seconds=1)))
    _write_generation(output, cur.generation + 1, data)  # the old holder, on another host, let it expire
    old.generation += 1
    new = Lease.acquire(output, run_id="new", ttl_s=60, heartbeat=False)
    assert current(output).data["owner"]["run_id"] == "new"
    with pytest.raises(LeaseLost, match="lost the nightly lease"):
        old.renew()
    old.release()  # a lost lease is left alone
    assert current(output).data["owner"]["run_id"] == "new" and current(output).held
    new.release()


def test_unexpired_lease_of_another_host_is_respected(output):
    future = _iso(datetime.now(UTC) + timedelta(hours=1))
    _write_generation(output, 7, {"state": "held", "token": "x", "expires_at": future,
                                  "owner": {"host": "elsewhere", "pid": 1, "run_id": "theirs"}})
    with pytest.raises(LeaseHeld, match="run_id=theirs"):
        Lease.acquire(output, ttl_s=60, heartbeat=False)


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    output = str(tmp_path / "table")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = dict(owner_identity("crashed"), pid=proc.pid, proc_start=None)
    assert not owner_dead(owner)
    proc.kill()
    proc.wait()
    assert owner_dead(owner)
    future = _iso(datetime.now(UTC) + timedelta(hours=1))
    _write_generation(output, 3, {"state": "held", "token": "x", "expires_at": future, "owner": owner})
    lease = Lease.acquire(output, run_id="next", ttl_s=60, heartbeat=False)
    assert lease.generation == 4
    lease.release()


def test_racing_acquirers_exactly_one_wins(output):
    winners, losers = [], []

    def take(i: int) -> None:
        try:
            winners.append(Lease.acquire(output, run_id=f"r{i}", ttl_s=60, heartbeat=False))
        except LeaseHeld:
            losers.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 5
    winners[0].release()


def test_heartbeat_keeps_a_short_lease_alive(tmp_path):
    output = str(tmp_path / "table")
    with Lease.acquire(output, run_id="beat", ttl_s=1.2) as lease:
        first = lease.generation
        import time

        time.sleep(2.0)
        assert lease.generation > first
        with pytest.raises(LeaseHeld):
            Lease.acquire(output, ttl_s=60, heartbeat=False)
    assert not current(output).held


def test_one_lease_per_model_version(output):
    """Jobs of one version exclude each other and the refusal names the holder; another version is not held up."""
    one, two = "sha256:" + "1f" * 32, "sha256:" + "2e" * 32
    assert version_lease(one) == "sha256-" + "1f" * 32
    with pytest.raises(ValueError, match="expected sha256:<64 hex digits>, got 'sha256:xyz'"):
        version_lease("sha256:xyz")
    first = Lease.acquire(output, name=version_lease(one), run_id="first", ttl_s=60, heartbeat=False)
    with pytest.raises(LeaseHeld) as e:
        Lease.acquire(output, name=version_lease(one), run_id="second", ttl_s=60, heartbeat=False)
    owner = first.owner
    assert str(e.value).startswith(
        f"another job of model version sha256:{'1f' * 8} holds the lease on {output} until {first.expires_at} "
        f"(holder host={owner['host']} pid={owner['pid']} run_id=first)")
    other = Lease.acquire(output, name=version_lease(two), run_id="other", ttl_s=60, heartbeat=False)
    assert current(output, version_lease(two)).data["owner"]["run_id"] == "other"
    other.release()
    first.release()

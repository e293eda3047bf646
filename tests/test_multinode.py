"""Runs across the nodes of a real multi-node Ray (`ray.cluster_utils.Cluster`: a GCS and three raylets on this
machine, token auth on), and the nodes dying under them (marker: cluster).

The head has 0 CPUs, so every read task and model actor lands on the two worker nodes (1 CPU and the custom
resource `worker` each); drivers are `vitlabel run --ray-address` subprocesses, as on a real cluster, and the
cluster runs in a process of its own (`_raycluster`). Afterwards every image id is in the table exactly once.
Three clusters per run of this file: one for each test that kills a node, and one shared by the rest (started
by the head test for its re-run, which must be on a fresh cluster).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from _digits import held_out_pngs
from _procs import end_session
from _raycluster import ClusterHost
from test_faults import assert_exactly_once, write_shards

from pipeline.table import list_manifests

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Fast failure detection, as a cluster on one network would set it: a node is declared dead 3 missed 1 s health
# checks after its raylet stops answering (Ray's defaults: 5 missed 3 s checks).
FAST_HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
# Two actors of half a CPU: one per worker node (Ray Data spreads them), and room for a restarted one on the node
# that is left when the other dies.
RAY_LOG_LINE = re.compile(r"^(\S+ \S+\t(INFO|WARNING) \w+\.py:\d+ -- "  # Ray's Python loggers (Ray Data)
                          r"|\[\S+ \S+ [WE] \d+ \d+\] \w+\.(cc|h):\d+: )")  # Ray's C++ core worker
# A fresh head's agent registers within seconds; a loaded CI machine may take far longer.
JOB_AGENT_WAIT_S = 180.0
RUN_ARGS = ["--model", "builtin:digits", "--batch-size", "16", "--preprocess-batch-size", "16", "--no-progress",
            "--max-actors", "2", "--min-actors", "2", "--cpus-per-actor", "0.5", "--preprocess-cpus", "0.5"]


def _env(token_file: Path) -> dict[str, str]:
    """This environment minus Ray/AWS settings, with this tree importable and the cluster's token. Ray Data starts
    labelling once both actors are up (actors start slowly on a loaded machine: the first would take every shard)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT),
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
               RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="300")
    return env


class Cluster:
    """A `ClusterHost` in a temp dir of its own (short: Ray's socket paths must fit 107 bytes), with its token."""

    def __init__(self, **config):
        self.tmp = tempfile.mkdtemp(prefix="vlmn-", dir="/tmp")
        self.token_file = Path(self.tmp) / "auth_token"
        self.token_file.write_text(secrets.token_hex(16))
        self.token_file.chmod(0o600)
        self.env = _env(self.token_file)
        self.job_agent: dict | None = None  # `job_agent`'s reply, once waited for
        try:
            self.host = ClusterHost({"workers": 2, "worker_cpus": 1, "system_config": FAST_HEALTH, **config},
                                    self.env, self.tmp)
        except Exception:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def close(self) -> None:
        self.host.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def _holding(port: int) -> Iterator[None]:
    """127.0.0.1:`port` listened on by this process while the block runs (if nothing else holds it already)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            pass  # held elsewhere: the same for the cluster
        yield


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The shared cluster, its head also running the dashboard and job server, once that can take a job (the head's
    agent registered, the job API answering: `_raycluster._job_agent`); tests that kill nodes make their own.

    Started while Ray's default agent port is held, as the session's own local Ray holds it in a whole-suite run:
    the head's agent must listen on a port of its own (with 52365 taken it never registered, and every submission
    got "No available agent to submit job, please try again later")."""
    from conftest import free_port
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

    with _holding(DEFAULT_DASHBOARD_AGENT_LISTEN_PORT):
        c = Cluster(dashboard_port=free_port())
        try:
            c.job_agent = c.host.call(op="job_agent", wait_s=JOB_AGENT_WAIT_S, timeout_s=JOB_AGENT_WAIT_S + 30)
        except BaseException:
            c.close()
            raise
    try:
        yield c
    finally:
        c.close()


@pytest.fixture()
def own_cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def pngs() -> tuple[bytes, ...]:
    return held_out_pngs()


def driver(c: Cluster, inp: str, out: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.cli", "-q", "run", "--input", inp, "--output", out, "--ray-address",
           c.host.address, *RUN_ARGS, *args]
    return subprocess.Popen(cmd, env=c.env, cwd=ROOT, start_new_session=True, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        end_session(proc.pid, grace_s=1)  # only this driver's own processes


def summary_of(stdout: str) -> dict:
    """The run's JSON summary on stdout (Ray prints its "(raylet) Task ... failed, retrying" lines about the lost
    node's tasks to the driver's stdout too, before and after it)."""
    start = 0 if stdout.startswith("{") else stdout.rfind("\n{\n") + 1
    assert start > 0 or stdout.startswith("{"), stdout[-3000:]
    return json.JSONDecoder().raw_decode(stdout, start)[0]


def wait_for_commits(proc: subprocess.Popen, out: str, n: int, timeout: float = 120) -> None:
    """Until `n` manifests are committed (the driver must still be running then)."""
    deadline = time.monotonic() + timeout
    while len(list(Path(out, "_manifests").glob("*.json"))) < n and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the driver ended before {n} commit(s): {proc.stderr.read()[-3000:]}"


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_a_worker_node_dies_mid_run(own_cluster, tmp_path, pngs):
    """Mid-run, worker node 0 dies whole while its actor labels a shard: Ray restarts the actor on the other node
    and retries its shard; the run ends with every image once and names the lost node.

    The kill waits for node 0's actor to be labelling, not for a first commit: waves commit in order, and when one
    actor starts late the first wave can commit only seconds before the last (seen: all 16 manifests within 3 s
    of the first), leaving no run to kill."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_shards(inp, pngs, shards=16, per=100)
    proc = driver(own_cluster, inp, out, "--wave-shards", "2")
    try:
        killed = own_cluster.host.call(op="kill", worker=0, busy="ShardLabeler")
        committed_before = len(list_manifests(out))
        running_at_kill = proc.poll() is None and committed_before < 8
    finally:
        stdout, stderr = finish(proc)
    assert killed["busy"], "worker node 0 had no actor labelling a shard when it died"
    assert running_at_kill, "the run had already ended (or committed everything) when the node died"
    assert proc.returncode == 0, stderr[-3000:]
    summary = summary_of(stdout)
    lost = [own_cluster.host.workers[0]]
    assert summary["nodes_lost"] == lost and summary["images"] == len(ids) == 1600 and summary["error"] == 0
    manifests = list_manifests(out)
    assert len(manifests) == 8 and manifests[-1]["stats"]["nodes_lost"] == lost
    assert all(m["stats"]["nodes_lost"] == [] for m in manifests[:committed_before])  # committed before the loss
    # Every manifest names the node or nothing, and once one names it every later one does: a commit made after
    # the kill but before Ray's GCS has declared the node dead (its health checks take a few seconds) names
    # nothing yet; the summary, read at the end, always names it.
    assert all(m["stats"]["nodes_lost"] in ([], lost) for m in manifests), [m["stats"] for m in manifests]
    named = [m["stats"]["nodes_lost"] == lost for m in manifests]  # in commit order
    assert named == sorted(named), [(m["committed_at"], m["stats"]["nodes_lost"]) for m in manifests]
    assert_exactly_once(out, ids)


@pytest.mark.slow
def test_the_head_dies_mid_run_then_a_fresh_cluster_resumes(own_cluster, request, tmp_path, pngs):
    """After the first commit the head dies: the driver ends with one line saying so. A run on another cluster
    labels exactly the shards no manifest covers."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_shards(inp, pngs, shards=8, per=100)
    proc = driver(own_cluster, inp, out, "--wave-shards", "2")
    try:
        wait_for_commits(proc, out, 1)
        own_cluster.host.call(op="kill_head")
        t0 = time.monotonic()
        stdout, stderr = finish(proc, timeout=60)
    finally:
        own_cluster.close()  # its worker nodes too, before the next cluster starts
    lines = [line for line in stderr.splitlines() if line.strip()]
    # No summary, no traceback. (Ray itself may print "(raylet) Raylet is terminated" and the head raylet's last log
    # lines on stdout as soon as it notices: the driver's raylet is the head's.)
    assert proc.returncode == 1 and '"run_id"' not in stdout and "Traceback" not in stdout + stderr, stderr[-3000:]
    assert "lost the Ray head" in lines[-1] and "re-run on a live cluster to resume" in lines[-1], stderr[-3000:]
    # The one line, last; before it only Ray's own log lines (Ray Data's "Progress bars disabled"; the C++ core
    # worker's "Failed to push error to driver" while the head goes down): no traceback, nothing else of ours.
    assert all(RAY_LOG_LINE.match(line) for line in lines[:-1]), stderr[-3000:]
    assert time.monotonic() - t0 < 30
    before = list_manifests(out)
    done = {uri for m in before for uri in m["shards"]}
    assert 1 <= len(before) < 4

    cluster = request.getfixturevalue("cluster")  # started only now: one cluster at a time on this machine
    stdout, stderr = finish(driver(cluster, inp, out, "--wave-shards", "2"))
    summary = summary_of(stdout)
    rerun = [m for m in list_manifests(out) if m["run_id"] == summary["run_id"]]
    relabelled = [uri for m in rerun for uri in m["shards"]]
    assert len(relabelled) + len(done) == 8 and done.isdisjoint(relabelled), (relabelled, done)
    assert summary["shards_skipped"] == len(done)
    assert_exactly_once(out, ids)


@pytest.mark.slow
def test_a_run_labels_across_the_worker_nodes(cluster, tmp_path, pngs):
    """Split layout: read tasks and model actors on both worker nodes (Ray's state API), none on the head."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_shards(inp, pngs, shards=4, per=60)
    stdout, stderr = finish(driver(cluster, inp, out, "--layout", "split", "--wave-shards", "2"))
    summary = summary_of(stdout)
    assert summary["images"] == len(ids) == 240 and summary["nodes_lost"] == [], stderr[-3000:]
    assert_exactly_once(out, ids)
    tasks = cluster.host.call(op="tasks")
    reads = {node for node, names in tasks.items() if any("read_and_preprocess" in n for n in names)}
    labels = {node for node, names in tasks.items() if any("Predictor" in n for n in names)}
    workers, head = set(cluster.host.workers), cluster.host.info["head"]
    # (a task whose events lack a node, if any, is listed under "null")
    assert workers <= reads and workers <= labels and head not in reads | labels, (tasks, workers)


@pytest.mark.slow
def test_submit_to_the_clusters_job_server(cluster, s3, pngs):
    """`vitlabel submit` as against a `ray start` head (test_submit): the token, S3 only through the submitted env.
    The fixture waited for the job server to take jobs, so the first submission is taken."""
    ids = write_shards("s3://test-bucket/in", pngs, shards=2, per=16)
    env = {**cluster.env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    env.pop("RAY_AUTH_TOKEN_PATH")
    env["RAY_AUTH_TOKEN"] = cluster.token_file.read_text()
    done = subprocess.run([str(BIN / "vitlabel"), "submit", "--address", cluster.host.dashboard, "--working-dir",
                           str(ROOT), "--", "run", "--input", "s3://test-bucket/in/", "--output",
                           "s3://test-bucket/out", *RUN_ARGS], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no job agent yet" not in done.stderr, (cluster.job_agent, done.stderr[-3000:])  # taken at once
    assert env["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr
    assert f'"images": {len(ids)}' in done.stdout and '"nodes_lost": []' in done.stdout
    assert_exactly_once("s3://test-bucket/out", ids)

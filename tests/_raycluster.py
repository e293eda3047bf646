"""A multi-node Ray on this machine: `ray.cluster_utils.Cluster` (a real GCS, real raylets) in a process of its own.

    python tests/_raycluster.py '{"workers": 2, "worker_cpus": 1, "dashboard_port": 0}'

starts a head with 0 CPUs (the GCS, optionally the dashboard and job server, and the raylet that drivers attach
to: no task or actor can land there) and worker nodes with CPUs and the custom resource `worker`, prints one JSON
line {"address", "dashboard", "head", "workers": [node ids]}, then answers one JSON command per stdin line with
one JSON line (stdin closed: the cluster ends):

    {"op": "kill", "worker": i, "busy": "ShardLabeler"}  worker node i dies like a lost machine (raylet, agents and
                                                          workers SIGKILLed at once), once an actor whose title
                                                          holds `busy` runs a task there (uses CPU)
    {"op": "kill_head"}                                   the head node dies the same way
    {"op": "procs"}                                       {node id: titles of its Ray worker processes}
    {"op": "tasks"}                                       {node id: names of the finished tasks it ran} (state API)
    {"op": "job_agent", "wait_s": 180}                    once the job server can take a job (see `_job_agent`):
                                                          {"agent": [ip, http port, grpc port], "waited_s"}

Here every node's dashboard agent listens on a port the OS picks. Ray's default for a head is the fixed 52365: Cluster
gives its worker nodes random ones but not its head, so another Ray on the machine (the test session's own local
Ray, another test's cluster) that holds 52365 leaves the head's agent without its HTTP server, never registered, and
the job server answers every submission "No available agent to submit job, please try again later".

In its own process because a Cluster is process-wide state: it writes its address where a plain `ray.init()` of
any process on this machine would find it (here: under $RAY_TMPDIR, which the caller points at the cluster's own
temp dir), and its teardown resets Ray's internal kv; the test process keeps its own local Ray untouched.
`ClusterHost` is the test side: it starts this, sends commands, and ends exactly this cluster's processes.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _procs import descendants, end_session


def _send(out: Any, obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _node_id(node: Any) -> str:
    return node.node_id


def _raylet_pid(node: Any) -> int:
    return node.all_processes["raylet"][0].process.pid


def _cpu_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _busy_actor(node: Any, busy: str) -> str:
    """The title of a worker process of `node` that runs an actor whose title holds `busy`, constructed and
    using CPU (Ray titles a threaded actor by its class only, so its CPU time tells that it runs a task); or ''."""
    actors = {pid: cmd.split()[0] for pid, cmd in descendants(_raylet_pid(node)).items()
              if cmd.startswith("ray::") and busy in cmd and not cmd.split()[0].endswith("__init__")}
    before = {pid: _cpu_ticks(pid) for pid in actors}
    time.sleep(0.3)
    return next((title for pid, title in actors.items() if _cpu_ticks(pid) - before[pid] >= 2), "")


def _kill(cluster: Any, node: Any, busy: str | None, timeout_s: float = 60.0) -> dict[str, Any]:
    """SIGKILL `node` whole: its Ray processes (Cluster.remove_node) and its workers, once `busy` runs there."""
    seen = ""
    deadline = time.monotonic() + timeout_s
    while busy and not seen and time.monotonic() < deadline:
        seen = _busy_actor(node, busy)
    workers = list(descendants(_raylet_pid(node)))
    cluster.remove_node(node, allow_graceful=False)
    for pid in workers:  # a lost machine takes its workers with it; Ray would end them a moment later
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"node": _node_id(node), "busy": seen, "killed_workers": len(workers)}


def _tasks(dashboard: str) -> dict[str, list[str]]:
    from ray.util.state import list_tasks

    by_node: dict[str, list[str]] = {}
    for t in list_tasks(address=dashboard, filters=[("state", "=", "FINISHED")], limit=10_000, detail=True,
                        raise_on_missing_output=False):
        by_node.setdefault(t.node_id, []).append(t.name)
    return by_node


def _get(url: str, token: str | None) -> int:
    """The HTTP status of GET `url` (0: no answer)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _job_agent(cluster: Any, dashboard: str | None, wait_s: float) -> dict[str, Any]:
    """Wait until the job server can take a job: the head node's dashboard agent (it runs the job's supervisor
    actor) has registered its address in the GCS, under the key the job server looks up for every submission
    (ray.dashboard.consts.DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX + the head's node id, namespace "dashboard"; the agent
    writes it once its HTTP server listens), and the job API answers GET /api/jobs/ with 200."""
    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

    if dashboard is None:
        raise ValueError("job_agent: expected a cluster started with a dashboard_port, got none")
    head = cluster.head_node
    key = f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{head.node_id}".encode()
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    token = Path(token_path).read_text().strip() if token_path else None
    gcs = head.get_gcs_client()
    t0 = time.monotonic()
    agent, status = None, 0
    while time.monotonic() - t0 < wait_s:
        if agent is None:
            value = gcs.internal_kv_get(key, KV_NAMESPACE_DASHBOARD)
            agent = json.loads(value) if value else None
        status = _get(f"{dashboard}/api/jobs/", token) if agent else 0
        if agent and status == 200:
            return {"agent": agent, "waited_s": round(time.monotonic() - t0, 1)}
        time.sleep(0.5)
    log = Path(head.get_logs_dir_path(), "dashboard_agent.log")
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else f"({log} missing)"
    raise TimeoutError(f"expected the head's job agent registered and the job API answering within {wait_s:.0f}s, "
                       f"got agent {agent}, GET /api/jobs/ {status or 'no answer'}; {log.name} ends:\n{tail}")


def serve(config: dict[str, Any]) -> None:
    """Start the cluster, print its addresses, answer commands until stdin closes."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever Ray or a child prints goes to stderr: stdout carries only the replies
    from ray.cluster_utils import Cluster

    dashboard_port = config.get("dashboard_port")
    head_args: dict[str, Any] = {"num_cpus": 0, "include_dashboard": dashboard_port is not None,
                                 "dashboard_agent_listen_port": 0,  # not Ray's fixed 52365: see the docstring
                                 "_system_config": config.get("system_config", {})}
    if dashboard_port is not None:
        head_args.update(dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    workers = [cluster.add_node(num_cpus=config.get("worker_cpus", 1), resources={"worker": 1},
                                object_store_memory=config.get("store", 150 << 20))
               for _ in range(config.get("workers", 2))]
    cluster.wait_for_nodes()
    dashboard = f"http://127.0.0.1:{dashboard_port}" if dashboard_port is not None else None
    _send(replies, {"address": cluster.address, "dashboard": dashboard, "head": _node_id(cluster.head_node),
                    "workers": [_node_id(n) for n in workers]})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "kill":
                _send(replies, _kill(cluster, workers[cmd["worker"]], cmd.get("busy")))
            elif cmd["op"] == "kill_head":
                _send(replies, _kill(cluster, cluster.head_node, cmd.get("busy")))
            elif cmd["op"] == "procs":
                _send(replies, {_node_id(n): sorted(c for c in descendants(_raylet_pid(n)).values()
                                                    if c.startswith("ray::"))
                                for n in cluster.list_all_nodes()})
            elif cmd["op"] == "tasks":
                _send(replies, _tasks(dashboard))
            elif cmd["op"] == "job_agent":
                _send(replies, _job_agent(cluster, dashboard, cmd.get("wait_s", 180.0)))
            else:
                _send(replies, {"error": f"op: expected kill, kill_head, procs, tasks or job_agent, got {cmd['op']!r}"})
        except Exception as e:  # noqa: BLE001 - the test reads it as its reply
            _send(replies, {"error": f"{type(e).__name__}: {e}"})
    for node in list(cluster.worker_nodes) + ([cluster.head_node] if cluster.head_node else []):
        cluster.remove_node(node, allow_graceful=False)


class ClusterHost:
    """The test side: `python tests/_raycluster.py` in a session of its own; `call` sends one command."""

    def __init__(self, config: dict[str, Any], env: dict[str, str], temp_dir: str, timeout_s: float = 120.0):
        self.log = Path(temp_dir) / "cluster.log"
        env = {**env, "RAY_TMPDIR": temp_dir}  # its ray_current_cluster file and sessions stay in temp_dir
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, json.dumps(config)], env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         start_new_session=True)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.info = self._reply(timeout_s)
        except Exception:
            self.close()
            raise
        self.address: str = self.info["address"]
        self.dashboard: str | None = self.info["dashboard"]
        self.workers: list[str] = self.info["workers"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)

    def _reply(self, timeout_s: float) -> dict[str, Any]:
        try:
            return json.loads(self._lines.get(timeout=timeout_s))
        except queue.Empty:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise TimeoutError(f"cluster: expected a reply within {timeout_s}s, got none; its log ends:\n{tail}") \
                from None

    def call(self, timeout_s: float = 90.0, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(timeout_s)
        if "error" in reply:
            raise RuntimeError(f"cluster {cmd}: {reply['error']}")
        return reply

    def close(self) -> None:
        """Close stdin (the host removes its nodes), then end whatever of its session is left."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        end_session(self.proc.pid, grace_s=2)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))

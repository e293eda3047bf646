"""What a run knows about the nodes of its Ray cluster: which it started with, which it lost, and the head.

- `NodeWatch`: the nodes alive when the run started; `lost()` names those gone since (dead in the GCS's node
  table, no longer in it, or with a raylet port that refuses connections: the GCS's health checks take
  seconds to declare a node dead), except nodes the autoscaler drained because they were idle. Read before each
  commit and at the end, so each manifest and the run summary say which nodes the run lost while it went on
  (Ray retried their work on the nodes left).
- `HeadWatch`: a thread that probes the head's GCS port. Every task, actor and object of a run goes through the
  GCS, so a run whose head is gone cannot go on. Ray's own driver then waits out its GCS reconnect timeout
  (`gcs_rpc_server_reconnect_timeout_s`, 60 s by default), then exits from C++ with one error line (Ray 2.60);
  the watch instead calls `on_lost` with one line, once the port has refused connections for `grace_s`.
  A GCS restarted with fault tolerance (KubeRay's external Redis) is back within seconds, on the same port;
  give `grace_s` at least that long there.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

HEAD_GRACE_S = 10.0  # the head's GCS port refusing connections this long means the head is gone
_PROBE_S = 0.5
DRAINED_IDLE = 4  # a node's DeathReason (NodeDeathInfo.AUTOSCALER_DRAIN_IDLE): removed by the autoscaler, idle


def node_table() -> list[dict[str, Any]]:
    """The GCS's node table (`ray.nodes()`): alive nodes and those that died, with why."""
    import ray

    return ray.nodes()


class NodeWatch:
    """The nodes alive now; `lost()` lists those of them gone since, in the order first seen gone. A node the
    autoscaler removed because it was idle held none of the run's work: not lost."""

    def __init__(self, nodes: Callable[[], list[dict[str, Any]]] = node_table):
        self._nodes = nodes
        self.start = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in nodes() if n.get("Alive")}
        self._lost: list[str] = []

    def lost(self) -> list[str]:
        try:
            table = {n["NodeID"]: n for n in self._nodes()}
        except Exception as e:  # noqa: BLE001 - the GCS did not answer: report what is known so far
            log.warning("nodes: expected the GCS's node table, got %s: %s", type(e).__name__, e)
            return list(self._lost)
        for node_id, address in self.start.items():
            node = table.get(node_id, {})
            if node_id in self._lost or node.get("DeathReason") == DRAINED_IDLE:
                continue
            if node.get("Alive"):  # the GCS's health checks take seconds to notice a dead node: ask its raylet
                if not node.get("NodeManagerPort") or not _refused(address, node["NodeManagerPort"], 1.0):
                    continue
                why = "its raylet refuses connections"
            else:
                why = node.get("DeathReasonMessage") or "gone from the node table"
            self._lost.append(node_id)
            log.warning("node %s (%s) lost (%s): Ray retries its work on the nodes left", node_id, address, why)
        return list(self._lost)


def watch_head(on_lost: Callable[[str], Any], grace_s: float = HEAD_GRACE_S) -> contextlib.AbstractContextManager:
    """A `HeadWatch` of this driver's GCS; nothing to watch (a no-op context) where Ray names no GCS address
    (Ray Client connections)."""
    import ray

    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - any failure here only means: no watch
        address = None
    if not address or ":" not in address:
        return contextlib.nullcontext()
    return HeadWatch(address, on_lost, grace_s)


def _refused(host: str, port: int, timeout_s: float) -> bool:
    """True when nothing accepts connections at host:port (refused or timed out); False when something does."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return False
    except OSError:
        return True


class HeadWatch:
    """While in its `with` block, probes `gcs_address` (host:port) every 0.5 s; once it has refused connections
    for `grace_s`, calls `on_lost(message)` (once, from the watch's thread)."""

    def __init__(self, gcs_address: str, on_lost: Callable[[str], Any], grace_s: float = HEAD_GRACE_S):
        host, _, port = gcs_address.rpartition(":")
        self.host, self.port = host.strip("[]") or "127.0.0.1", int(port)
        self.on_lost, self.grace_s = on_lost, grace_s
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="head-watch")

    def __enter__(self) -> HeadWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        down_since: float | None = None
        while not self._stop.wait(_PROBE_S):
            if not _refused(self.host, self.port, timeout_s=min(2.0, self.grace_s)):
                down_since = None
                continue
            now = time.monotonic()
            down_since = down_since if down_since is not None else now
            if now - down_since >= self.grace_s and not self._stop.is_set():
                self.lost = (f"lost the Ray head: its GCS at {self.host}:{self.port} has refused connections for "
                             f"{now - down_since:.0f}s")
                self.on_lost(self.lost)
                return

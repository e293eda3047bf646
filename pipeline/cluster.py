"""What a run knows about the nodes of its Ray cluster: which it started with, which it lost, and the head.

- `NodeWatch`: the nodes alive when the run started; `lost()` names those gone since (dead in the GCS's node
  table, or no longer in it). Read before each commit and at the end, so each manifest and the run summary
  say which nodes the run lost while it went on (Ray retried their work on the nodes left).
- `HeadWatch`: a thread that probes the head's GCS port. Every task, actor and object of a run goes through the
  GCS, so a run whose head is gone cannot go on. Ray's own driver then waits out its GCS reconnect timeout
  (`gcs_rpc_server_reconnect_timeout_s`, 60 s by default) and exits from C++, printing nothing useful; the
  watch instead calls `on_lost` with one line, once the port has refused connections for `grace_s`.
  A GCS restarted with fault tolerance (KubeRay's external Redis) is back within seconds, on the same port;
  give `grace_s` at least that long there.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

HEAD_GRACE_S = 10.0  # the head's GCS port refusing connections this long means the head is gone
_PROBE_S = 0.5


def alive_nodes() -> dict[str, str]:
    """{node id: address} of the nodes the GCS lists as alive."""
    import ray

    return {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")}


class NodeWatch:
    """The nodes alive now; `lost()` lists those of them not alive any more, in the order first seen lost."""

    def __init__(self, nodes: Callable[[], dict[str, str]] = alive_nodes):
        self._nodes = nodes
        self.start = nodes()
        self._lost: list[str] = []

    def lost(self) -> list[str]:
        try:
            alive = self._nodes()
        except Exception as e:  # noqa: BLE001 - the GCS did not answer: report what is known so far
            log.warning("nodes: expected the GCS's node table, got %s: %s", type(e).__name__, e)
            return list(self._lost)
        for node_id, address in self.start.items():
            if node_id not in alive and node_id not in self._lost:
                self._lost.append(node_id)
                log.warning("node %s (%s) lost: its work is retried on the %d node(s) left", node_id, address,
                            len(alive))
        return list(self._lost)


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

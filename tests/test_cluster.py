"""pipeline.cluster's head watch against a real TCP listener (nodes lost on a real cluster: test_multinode)."""

from __future__ import annotations

import re
import socket
import threading
import time

from pipeline.cluster import HeadWatch, NodeWatch


def test_head_watch_fires_once_the_port_refuses_for_the_grace_period():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    calls: list[str] = []
    fired = threading.Event()

    def on_lost(why: str) -> None:
        calls.append(why)
        fired.set()

    with HeadWatch(f"127.0.0.1:{port}", on_lost, grace_s=1.0):
        time.sleep(1.6)  # listening: several probes answered
        assert calls == []
        server.close()
        t0 = time.monotonic()
        assert fired.wait(10), "the watch never reported the closed port"
        assert time.monotonic() - t0 >= 0.9  # not before the grace period
    time.sleep(0.6)
    assert len(calls) == 1, calls
    assert re.fullmatch(rf"lost the Ray head: its GCS at 127.0.0.1:{port} has refused connections for \d+s", calls[0])


def test_node_watch_names_lost_nodes_not_idle_drained_ones():
    """The node table as `ray.nodes()` gives it (rows as a real Cluster's GCS returned them; DeathReason numbers are
    NodeDeathInfo's: 2 unexpected termination, 4 drained idle by the autoscaler)."""
    table = [{"NodeID": n, "Alive": True, "NodeManagerAddress": "127.0.0.1", "DeathReason": 0} for n in "abcd"]
    watch = NodeWatch(lambda: table)
    assert watch.lost() == []
    table[1] = {**table[1], "Alive": False, "DeathReason": 2, "DeathReasonMessage": "health check failed"}
    table[2] = {**table[2], "Alive": False, "DeathReason": 4, "DeathReasonMessage": "idle"}
    assert watch.lost() == ["b"]
    del table[3]  # gone from the table altogether
    assert watch.lost() == ["b", "d"] and watch.lost() == ["b", "d"]  # each named once, in the order seen
    with socket.create_server(("127.0.0.1", 0)) as raylet:  # alive for the GCS: its raylet port is asked
        table[0] = {**table[0], "NodeManagerPort": raylet.getsockname()[1]}
        assert watch.lost() == ["b", "d"]
    assert watch.lost() == ["b", "d", "a"]  # the port closed: dead before the GCS's health checks say so

"""Ending exactly the processes a test started: everything in the session of one `start_new_session` child.

Ray puts its workers in process groups of their own, so killing the child's group is not enough; they all
stay in the child's session, and nothing else does (`ray stop` would end every Ray on the machine).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(d.name))
    return pids


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every live descendant of `pid`."""
    procs: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] not in ("Z", "X"):
            procs[int(d.name)] = (int(fields[1]), cmd)
    found, frontier = {}, {pid}
    while frontier:
        frontier = {p for p, (ppid, _) in procs.items() if ppid in frontier and p not in found}
        found.update({p: procs[p][1] for p in frontier})
    return found


def end_session(sid: int, grace_s: float = 5.0) -> None:
    """SIGTERM every live process of session `sid`, then SIGKILL what is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        pids = session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = session_pids(sid)
        if not pids:
            return

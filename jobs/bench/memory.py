"""Peak memory of a job: its driver process and every process it started (Ray's GCS, raylet, workers).

Sampled in a thread from /proc/<pid>/smaps_rollup: PSS (each shared page, such as the object store's, counted
once, split among the processes that map it) and RSS (the plain sum, as `ps` would add it up).
"""

from __future__ import annotations

import os
import threading
from typing import Any


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # field 4; the name (field 2) may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, Pss_Anon (private heap), Pss_Shmem (object store pages) in bytes, from /proc/<pid>/smaps_rollup."""
    out = {"Rss": 0, "Pss": 0, "Pss_Anon": 0, "Pss_Shmem": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _proc_name(pid: int) -> str:
    """Ray retitles its workers (ray::IDLE, ray::MapWorker(...)); others by program name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    name = argv[0].decode(errors="replace")
    if name.startswith("ray::"):
        return name.split(" ")[0][:60]
    if "python" in os.path.basename(name) and len(argv) > 1:
        script = next((a.decode(errors="replace") for a in argv[1:] if a and not a.startswith(b"-")), "")
        return os.path.basename(script) if script else "python"
    return os.path.basename(name)


class MemorySampler:
    """Peak of the summed RSS and PSS of a process (the job's driver) and all its descendants, sampled in a thread."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root = root
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.peak_shmem = 0  # of which shared memory (Ray's object store) at the peak
        self.top: list[tuple[str, dict[str, int]]] = []  # the biggest processes (by PSS) at the peak
        self.available = os.path.exists(f"/proc/{os.getpid()}/smaps_rollup")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-memory", daemon=True)

    def sample(self) -> None:
        procs = [(pid, _rollup(pid)) for pid in _descendants(self.root)]
        rss = sum(m["Rss"] for _, m in procs)
        pss = sum(m["Pss"] for _, m in procs)
        if pss > self.peak_pss:
            self.peak_pss, self.peak_procs = pss, len(procs)
            self.peak_shmem = sum(m["Pss_Shmem"] for _, m in procs)
            self.top = [("driver" if pid == self.root else _proc_name(pid), m)
                        for pid, m in sorted(procs, key=lambda x: -x[1]["Pss"])[:8]]
        self.peak_rss = max(self.peak_rss, rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        if self.available:
            self.sample()
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.sample()

    def result(self) -> dict[str, Any]:
        if not self.available:  # not Linux: no /proc to read
            return {"peak_pss_mb": None, "peak_rss_mb": None, "processes": None}
        mb = lambda x: round(x / 2**20, 1)  # noqa: E731
        return {"peak_pss_mb": mb(self.peak_pss), "peak_rss_mb": mb(self.peak_rss), "processes": self.peak_procs,
                "peak_object_store_pss_mb": mb(self.peak_shmem),
                "top_processes_at_peak": {f"{name} #{i}": {"pss_mb": mb(m["Pss"]), "anon_mb": mb(m["Pss_Anon"]),
                                                           "object_store_mb": mb(m["Pss_Shmem"])}
                                          for i, (name, m) in enumerate(self.top)}}

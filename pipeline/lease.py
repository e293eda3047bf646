"""One writer at a time per output table and model version: a lease with an expiry, moved only by create-only puts.

    OUTPUT/_lease/<name>/<generation:012d>.json      the highest generation is the lease's current state

The plan names a lease after the model version it labels with (`version_lease`: `_lease/sha256-<hex>/`), so two
jobs of one model version on one output never run at once, while jobs of different versions (whose rows never
overlap: exactly once is per model digest) may.

Each generation is {state: held|released, token, owner: {host, pid, run_id, ...}, acquired_at, renewed_at,
expires_at, ttl_s}. Every change (acquire, take over, renew, release) writes the NEXT generation with a
create-only put (local disk: os.link of a finished temp file; S3: one PUT with If-None-Match: *, the same
mechanism as the manifest commit in `commit`), so of two processes racing for the same change exactly one
wins. Why generations rather than one `nightly.json` taken over by delete + create: with one object, two
processes that both saw it expired can both succeed (A deletes, A creates, B deletes A's, B creates);
here the loser's put fails, and a holder whose lease expired and was taken over finds out on its next
renewal (its put of generation + 1 fails) instead of committing next to the new holder.

The lease is free when no generation exists, the latest is released, it has expired, or its owner is a
dead process on this same host (same hostname, boot id and pid namespace: a crashed run on this
machine does not block the next one for a whole TTL). Expiry compares wall clocks, so hosts sharing an
output should keep their clocks in sync (NTP); the TTL must exceed the longest pause between renewals
(a heartbeat renews every ttl/3, the plan renews before every commit). Older generations are deleted
best effort; the latest is never deleted, so generation numbers only grow.

A stage-level helper: imports fsspec and `layout` (paths) only, never ray or another stage.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fsspec

from pipeline.layout import fs_root
from pipeline.storage import create_only

log = logging.getLogger(__name__)

LEASE_DIR = "_lease"
_GEN_RE = re.compile(r"(\d{12})\.json")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,80}")
_DIGEST_RE = re.compile(r"(sha256):([0-9a-f]{64})")


def version_lease(model_digest: str) -> str:
    """The lease of one model version on an output: `sha256:<hex>` -> `sha256-<hex>` (a folder name)."""
    m = _DIGEST_RE.fullmatch(model_digest)
    if m is None:
        raise ValueError(f"model_digest: expected sha256:<64 hex digits>, got {model_digest!r}")
    return f"{m.group(1)}-{m.group(2)}"


def _job_title(name: str) -> str:
    """How messages name a lease's jobs: 'job of model version sha256:<16 hex>' for version leases, else
    '<name> job' ('nightly job')."""
    m = re.fullmatch(r"(sha256)-([0-9a-f]{64})", name)
    return f"job of model version {m.group(1)}:{m.group(2)[:16]}" if m else f"{name} job"


class LeaseHeld(RuntimeError):
    """Another live owner holds the lease; `holder` is its current generation's content."""

    def __init__(self, output: str, name: str, holder: dict[str, Any]) -> None:
        o = holder.get("owner", {})
        super().__init__(
            f"another {_job_title(name)} holds the lease on {output} until {holder.get('expires_at')} "
            f"(holder host={o.get('host')} pid={o.get('pid')} run_id={o.get('run_id') or '-'}); "
            f"it is taken over once it expires or its process is gone")
        self.holder = holder


class LeaseLost(RuntimeError):
    """Our lease expired and another owner took it over (or it vanished): stop before committing."""


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse(t: str) -> datetime:
    return datetime.fromisoformat(t.replace("Z", "+00:00"))


# --------------------------------------------------------------------------------------------------- owner


def _host_identity() -> dict[str, str]:
    """What makes two processes comparable by pid: same host name, kernel boot and pid namespace."""
    ident = {"host": socket.gethostname()}
    try:
        ident["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ident["pid_ns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return ident


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from /proc, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    rest = stat[stat.rfind(")") + 2:].split()  # fields after "pid (comm)": state is field 3, starttime 22
    return rest[0], rest[19]


def owner_identity(run_id: str = "") -> dict[str, Any]:
    pid = os.getpid()
    owner: dict[str, Any] = {**_host_identity(), "pid": pid, "run_id": run_id}
    if Path("/proc/self/stat").exists():
        stat = _proc_stat(pid)
        owner["proc_start"] = stat[1] if stat else None
    return owner


def owner_dead(owner: dict[str, Any]) -> bool:
    """True only when the owner is provably gone: a process of this host that no longer runs (or is a zombie,
    or whose pid now belongs to a younger process). Owners on other hosts are never judged: expiry decides."""
    here = _host_identity()
    if any(owner.get(k) != v for k, v in here.items()) or not isinstance(owner.get("pid"), int):
        return False
    pid = owner["pid"]
    if Path("/proc/self/stat").exists():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return True
        return owner.get("proc_start") is not None and stat[1] != owner["proc_start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# ---------------------------------------------------------------------------------------------- storage


def lease_dir(name: str) -> str:
    """Folder of a lease's generations, relative to OUTPUT."""
    return f"{LEASE_DIR}/{name}"


def _generations(fs: fsspec.AbstractFileSystem, folder: str) -> list[int]:
    fs.invalidate_cache(folder)
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    gens = (_GEN_RE.fullmatch(n.rstrip("/").rsplit("/", 1)[-1]) for n in names)
    return sorted(int(m.group(1)) for m in gens if m)


def _gen_path(folder: str, gen: int) -> str:
    return f"{folder}/{gen:012d}.json"


def _read(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:  # only on filesystems without hard links, while being written
        return None


@dataclass(frozen=True)
class LeaseState:
    """One generation of a lease, as stored."""

    generation: int
    data: dict[str, Any]

    @property
    def held(self) -> bool:
        return self.data.get("state") == "held"

    @property
    def expires_at(self) -> datetime:
        return _parse(self.data["expires_at"])

    def free(self, now: datetime | None = None) -> bool:
        """Can be taken: released, expired, or held by a dead process of this host."""
        if not self.held:
            return True
        return (now or _now()) >= self.expires_at or owner_dead(self.data.get("owner", {}))


def current(output: str, name: str = "nightly") -> LeaseState | None:
    """The latest generation of a lease, or None if it was never taken."""
    fs, root = fs_root(output)
    folder = f"{root}/{lease_dir(name)}"
    for _ in range(5):  # the latest can be superseded and cleaned between listing and reading: list again
        gens = _generations(fs, folder)
        if not gens:
            return None
        data = _read(fs, _gen_path(folder, gens[-1]))
        if data is not None:
            return LeaseState(gens[-1], data)
    raise RuntimeError(f"lease {name} on {output}: its latest generation could not be read")


# ------------------------------------------------------------------------------------------------- lease


class Lease:
    """A held lease. Use `Lease.acquire(...)`; `renew()` before committing; `release()` (or `with`) at the end."""

    def __init__(self, output: str, name: str, *, token: str, owner: dict[str, Any], ttl_s: float,
                 generation: int, acquired_at: str) -> None:
        self.output, self.name = output, name
        self.token, self.owner, self.ttl_s = token, owner, float(ttl_s)
        self.generation, self.acquired_at = generation, acquired_at
        self.expires_at = ""
        self._fs, root = fs_root(output)
        self._folder = f"{root}/{lease_dir(name)}"
        self._lock = threading.Lock()
        self._lost: LeaseLost | None = None
        self._released = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, output: str, *, name: str = "nightly", run_id: str = "", ttl_s: float = 900.0,
                heartbeat: bool = True) -> Lease:
        """Take the lease, or raise LeaseHeld if a live owner holds it."""
        if _NAME_RE.fullmatch(name) is None:
            raise ValueError(f"lease name: expected letters, digits, '_', '.', '-', got {name!r}")
        if not ttl_s >= 1:
            raise ValueError(f"ttl_s: expected a number of seconds >= 1, got {ttl_s!r}")
        now = _iso(_now())
        lease = cls(output, name, token=secrets.token_hex(16), owner=owner_identity(run_id), ttl_s=ttl_s,
                    generation=0, acquired_at=now)
        for _ in range(5):
            cur = current(output, name)
            if cur is not None and not cur.free():
                raise LeaseHeld(output, name, cur.data)
            gen = cur.generation + 1 if cur else 1
            if lease._put(gen, "held"):
                if cur is not None and cur.held:
                    why = "its owner is gone" if owner_dead(cur.data.get("owner", {})) else "it expired"
                    log.warning("took over the %s lease on %s from %s (%s)", name, output, cur.data.get("owner"), why)
                lease._cleanup(gen)
                if heartbeat:
                    lease._start_heartbeat()
                log.info("acquired the %s lease on %s until %s", name, output, lease.expires_at)
                return lease
            # someone else wrote generation `gen` first: look again (it is theirs, or already released)
        cur = current(output, name)
        raise LeaseHeld(output, name, cur.data if cur else {})

    def _put(self, gen: int, state: str) -> bool:
        """Create generation `gen` with our token; True if it is ours (also when an earlier try of ours wrote it)."""
        now = _now()
        expires = _iso(now + timedelta(seconds=self.ttl_s)) if state == "held" else _iso(now)
        data = {"state": state, "token": self.token, "owner": self.owner, "acquired_at": self.acquired_at,
                "renewed_at": _iso(now), "expires_at": expires, "ttl_s": self.ttl_s}
        path = _gen_path(self._folder, gen)
        ok = create_only(self._fs, path, json.dumps(data, indent=1).encode())
        if not ok:
            theirs = _read(self._fs, path)
            ok = theirs is not None and theirs.get("token") == self.token
        if ok:
            self.generation, self.expires_at = gen, expires
        return ok

    def _cleanup(self, keep_from: int) -> None:
        """Delete generations older than `keep_from - 1`, best effort (the latest is never touched)."""
        for g in _generations(self._fs, self._folder):
            if g >= keep_from - 1:
                break
            try:
                self._fs.rm_file(_gen_path(self._folder, g))
            except FileNotFoundError:
                pass
            except Exception:  # noqa: BLE001 - stale generations are harmless
                log.debug("could not delete lease generation %d", g, exc_info=True)

    def renew(self) -> None:
        """Extend the expiry by ttl_s. Raises LeaseLost if another owner took the lease over."""
        with self._lock:
            if self._lost is not None:
                raise self._lost
            if self._released:
                raise LeaseLost(f"the {self.name} lease on {self.output} was already released")
            if not self._put(self.generation + 1, "held"):
                cur = current(self.output, self.name)
                self._lost = LeaseLost(
                    f"lost the {self.name} lease on {self.output}: generation {self.generation + 1} belongs to "
                    f"{cur.data.get('owner') if cur else 'nobody'}; ours expired at {self.expires_at}")
                raise self._lost
            self._cleanup(self.generation)

    def release(self) -> None:
        """Give the lease back (idempotent). A lease already lost is left to its new owner."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._lock:
            if self._released or self._lost is not None:
                return
            self._released = True
            if self._put(self.generation + 1, "released"):
                self._cleanup(self.generation)
                log.info("released the %s lease on %s", self.name, self.output)
            else:
                log.warning("could not release the %s lease on %s: another owner took it over", self.name,
                            self.output)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except LeaseLost as e:
                    log.error("%s", e)
                    return
                except Exception:  # noqa: BLE001 - a transient store error: try again next beat
                    log.warning("could not renew the %s lease on %s", self.name, self.output, exc_info=True)

        self._thread = threading.Thread(target=beat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

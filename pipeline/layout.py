"""The table's layout in OUTPUT: where everything lives, the names allowed in paths, and the manifests.

    OUTPUT/model=<name>/dt=<YYYY-MM-DD>/part-<commit_id>-<n:05d>.parquet   committed part files
    OUTPUT/_manifests/<commit_id>.json                                    one per commit: the commit point
    OUTPUT/_pending/<commit_id>.json                                      write-ahead intent of a commit
    OUTPUT/_staging/<staging_id>/<uuid4>.parquet                          staged files, not yet committed

`_staging` and `_manifests` start with `_`, so pyarrow.dataset ignores them; DuckDB globs should name the
partitions (`OUTPUT/model=*/dt=*/*.parquet`). `model` and `dt` live only in the path (hive style).
Object-store credentials come from the environment (fsspec), never from arguments or manifests.

Manifests are read here (`list_manifests`, `committed_shards`) and encoded here (`to_json`); `pipeline.commit`
publishes them. This module imports no stage and no Ray: `pipeline.table` reads the table through it.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Any

import fsspec
import numpy as np

STAGING_DIR = "_staging"
MANIFEST_DIR = "_manifests"
PENDING_DIR = "_pending"  # write-ahead intents; `_`-prefixed: readers skip it, and `_manifests/` holds only commits
MANIFEST_VERSION = 1
PARTITION_COLUMNS = ("model", "dt")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,120}")
DT_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
TAGGED_RE = re.compile(r".+\.(v[0-9a-f]{16})")  # a staging folder named by staging_name


def fs_root(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and root path (protocol stripped) for a local path or URL; creds from the env.

    For object stores, a filesystem without a listings cache. Writers and readers want fresh listings (commits
    happen in other processes), and a cache that one thread clears while another lists through it fails that
    listing: s3fs checks `path in dircache`, then reads `dircache[path]`, a KeyError in between (seen with
    concurrent readers; the driver's lease heartbeat thread shares the committing thread's filesystem too)."""
    protocol, _ = fsspec.core.split_protocol(output)
    options = {} if protocol in (None, "file", "local") else {"use_listings_cache": False}
    fs, root = fsspec.core.url_to_fs(output, **options)
    return fs, root.rstrip("/")


def check_name(what: str, value: str, pattern: re.Pattern[str] = NAME_RE) -> None:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        expected = "YYYY-MM-DD" if pattern is DT_RE else "letters, digits, '_', '.', '-' (at most 120)"
        raise ValueError(f"{what}: expected {expected}, got {value!r}")


def staging_prefix(staging_id: str) -> str:
    """Staging folder of a run (or of one wave of a run), relative to OUTPUT."""
    return f"{STAGING_DIR}/{staging_id}"


def staging_name(commit_id: str, model_digest: str) -> str:
    """Staging id of a commit: `<commit_id>.v<first 16 hex digits of the model digest>`. The version in the name
    lets `recover` tell its own version's folders (a dead run's: deleted at once under the lease) from those of
    another version's writer, which may be live."""
    return f"{commit_id}.{version_tag(model_digest)}"


def version_tag(model_digest: str) -> str:
    m = DIGEST_RE.fullmatch(model_digest)
    if m is None:
        raise ValueError(f"model_digest: expected sha256:<64 hex digits>, got {model_digest!r}")
    return f"v{m.group(1)[:16]}"


def partition_prefix(model_name: str, dt: str) -> str:
    """Partition folder, relative to OUTPUT."""
    return f"model={model_name}/dt={dt}"


def manifest_path(commit_id: str) -> str:
    """Manifest of a commit, relative to OUTPUT."""
    return f"{MANIFEST_DIR}/{commit_id}.json"


def pending_path(commit_id: str) -> str:
    """Write-ahead intent of a commit in progress, relative to OUTPUT."""
    return f"{PENDING_DIR}/{commit_id}.json"


# -------------------------------------------------------------------------------------------------- manifests


def to_json(obj: Any) -> bytes:
    """A manifest or an intent as the JSON bytes that are published."""
    return json.dumps(obj, indent=1, sort_keys=False, default=_json_default).encode()


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


def list_manifests(output: str) -> list[dict[str, Any]]:
    """Every committed manifest under OUTPUT/_manifests/, oldest first (by committed_at, then commit_id)."""
    fs, root = fs_root(output)
    fs.invalidate_cache()  # commits happen in other processes; cached listings would hide them
    try:
        paths = fs.glob(f"{root}/{MANIFEST_DIR}/*.json")
    except FileNotFoundError:
        return []
    manifests = []
    for p in paths:
        if p.rsplit("/", 1)[-1].startswith("."):  # a local manifest being written (tmp name)
            continue
        with fs.open(p, "rb") as f:
            try:
                manifests.append(json.loads(f.read()))
            except json.JSONDecodeError as e:
                raise ValueError(f"manifest {p.rsplit('/', 1)[-1]}: expected JSON, got unreadable content") from e
    return sorted(manifests, key=lambda m: (m.get("committed_at", ""), m.get("commit_id", "")))


def committed_shards(output: str, model_digest: str) -> set[str]:
    """Shard URIs that committed manifests for `model_digest` mark done (corrupt shards included, with their
    error; shards that could not be reached are not done: see `commit.shard_done`)."""
    done: set[str] = set()
    for m in list_manifests(output):
        if m.get("model_digest") == model_digest:
            done.update(uri for uri, s in m.get("shards", {}).items() if s.get("done", True))
    return done

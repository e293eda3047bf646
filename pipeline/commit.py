"""Commit and recovery: the driver publishes a wave's staged files with a manifest, or finishes a killed commit.

Commit protocol (a Parquet file is part of the table only when a committed manifest names it; paths:
`pipeline.layout`):

1. `staging.write_staging` streams a wave's image rows into files under `_staging/<staging_id>/` and returns,
   for each file, its rows and the shard markers it saw.
2. The committer keeps the results of the files it staged for the wave; only those are named, so a file a
   killed driver left in staging is never part of a commit (`recover` deletes it).
3. `commit` (driver) checks every expected shard is fully covered (a marker seen, rows == images),
   writes the whole manifest as an intent `OUTPUT/_pending/<commit_id>.json` (write-ahead), moves
   the staged files to `OUTPUT/model=<name>/dt=<dt>/part-<commit_id>-<n:05d>.parquet`, writes
   `OUTPUT/_manifests/<commit_id>.json` LAST and exclusively (the commit point), then deletes the intent and
   the staging folders of this commit (the files of failed attempts included). A shard whose marker says its
   compressed data failed its integrity check (`config.INTEGRITY_FAILED`: known only at the end of the
   stream, after its rows went by) has all its rows rewritten first, as `corrupt_shard` error rows: the staged
   files holding them are copied with those rows changed, and the copies are what the commit publishes.
4. `recover` (driver, at the start of every run, before listing) finishes what a killed driver left: an
   intent whose files are all still there (staged or moved) is rolled forward (moves finished, manifest
   written); otherwise rolled back (moved files deleted, its shards stay pending). Part files that no
   manifest or intent names are deleted; stale staging folders too. After it, every part file in a partition
   is named by a committed manifest (or by a commit in progress), so raw globs over the partitions see the table.
   Between a crash mid-commit and the next run, raw globs may see the moved files; `pipeline.table` never does.
   Writers of different model versions may share an output (one lease per version): the plan's recover is
   scoped to its own version (intents by their manifest's model_digest, staging folders by the version in
   their name, `layout.staging_name`) and leaves another version's alone until it is `OTHERS_GRACE_S` old.

A shard's manifest entry says whether it is `done`: yes unless its reader could not reach it at all
(marker error code `missing` or `unavailable`, no rows), so a shard deleted after listing or unreadable for
lack of permission is tried again by the next run, while a corrupt shard is recorded once, with its error.
It also records the shard's `format` as its marker row carried it (`sources.Shard.format`: webdataset, parquet,
folder, the names `--input-format` uses), so a reader of the manifest never guesses it from the suffix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import INTEGRITY_FAILED, RETRYABLE_SHARD_CODES, UNTRUSTED_ROW_CODE, redact, redact_obj
from pipeline.layout import (
    DT_RE,
    MANIFEST_DIR,
    MANIFEST_VERSION,
    NAME_RE,
    PENDING_DIR,
    STAGING_DIR,
    TAGGED_RE,
    check_name,
    fs_root,
    list_manifests,
    manifest_path,
    partition_prefix,
    pending_path,
    staging_prefix,
    to_json,
    version_tag,
)
from pipeline.schema import ERROR_VALUES
from pipeline.storage import create_only

logger = logging.getLogger(__name__)

STAGING_GRACE_S = 6 * 3600.0  # recover() leaves younger staging folders alone unless the caller is the only writer
OTHERS_GRACE_S = STAGING_GRACE_S  # ... and another model version's intents and folders younger than this, always


class CommitError(RuntimeError):
    """A commit was refused: incomplete shards, a missing staged file, or an existing manifest.

    `shards` lists every shard URI at fault (the message names at most the first 20).
    """

    def __init__(self, message: str, shards: list[str] | None = None) -> None:
        super().__init__(message)
        self.shards = list(shards or [])


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


# ----------------------------------------------------------------------------------------------------- commit


_STAGED_RE = re.compile(rf"{STAGING_DIR}/({NAME_RE.pattern})/[A-Za-z0-9_.-]+\.parquet")


def _merge_results(results: list[dict[str, Any]], staging_id: str | None):
    files: dict[str, dict[str, Any]] = {}
    shard_rows: dict[str, int] = {}
    markers: dict[str, dict[str, Any]] = {}
    status = {"ok": 0, "error": 0}
    conflicts: list[str] = []
    for r in results:
        rel = r.get("file")
        if rel is not None:
            match = _STAGED_RE.fullmatch(rel) if isinstance(rel, str) else None
            if match is None or ".." in rel or (staging_id and match.group(1) != staging_id):
                where = staging_prefix(staging_id or "<staging_id>")
                raise CommitError(f"result file: expected a file {where}/<name>.parquet, got {rel!r}")
            if rel in files:
                raise CommitError(f"result file {rel!r} appears twice in results")
            files[rel] = {"rows": int(r["rows"]), "bytes": int(r.get("bytes") or 0)}
        for src, n in r.get("shard_rows", {}).items():
            shard_rows[src] = shard_rows.get(src, 0) + int(n)
        for src, m in r.get("markers", {}).items():
            m = {"images": int(m["images"]), "error": m.get("error"),
                 **({"format": m["format"]} if "format" in m else {})}
            if src in markers and markers[src] != m:
                conflicts.append(src)
            markers[src] = m
        for k, v in r.get("status_counts", {}).items():
            status[k] = status.get(k, 0) + int(v)
    return files, shard_rows, markers, status, conflicts


def _exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        return fs.exists(path)
    except FileNotFoundError:
        return False


def _infos(fs: fsspec.AbstractFileSystem, pattern: str) -> dict[str, dict[str, Any]]:
    """{path: fsspec info} of the files matching a glob; {} when the folder does not exist."""
    try:
        found = fs.glob(pattern, detail=True)
    except FileNotFoundError:
        return {}
    return {p.rstrip("/"): info for p, info in found.items() if info.get("type") != "directory"}


def _listing(fs: fsspec.AbstractFileSystem, pattern: str) -> dict[str, int]:
    """{path: size} of the files matching a glob; {} when the folder does not exist."""
    return {p: int(info.get("size") or 0) for p, info in _infos(fs, pattern).items()}


def _write_manifest(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Publish the manifest exclusively: never overwrite an existing commit."""
    if not create_only(fs, path, data):
        raise CommitError(f"manifest {path.rsplit('/', 1)[-1]} already exists: commit already done")


def commit(
    *,
    output: str,
    run_id: str,
    commit_id: str,
    model_name: str,
    model_digest: str,
    dt: str,
    results: list[dict[str, Any]],
    expected_shards: list[str],
    config: dict[str, Any],
    stats: dict[str, Any],
    staging_id: str | None = None,
    cleanup: bool = True,
) -> dict[str, Any]:
    """Publish the staged files named in `results` as one commit; return the manifest.

    Raises CommitError, publishing nothing, when an expected shard is not fully covered (no marker, or
    rows != marker images), when results name shards outside `expected_shards`, or when the manifest
    of `commit_id` already exists. Resumable: if a previous attempt crashed after moving some files but
    before the manifest, calling again with the same arguments finishes the job.

    Staged files may live in any `_staging/<id>/` folder (the staging writer's staging_id); pass `staging_id` to
    accept only that folder. `cleanup=True` then removes, best effort, every staging folder this commit's
    files came from, plus `_staging/<staging_id>/` (failed-attempt leftovers included). With one staging
    folder per wave (staging_id=commit_id, as the WaveCommitter stages) that never touches another wave's files; with
    one folder per run and waves staged concurrently, pass `cleanup=False` and call `cleanup_staging`
    at the end of the run.
    """
    for what, value in (("run_id", run_id), ("commit_id", commit_id), ("model_name", model_name)):
        check_name(what, value)
    if staging_id is not None:
        check_name("staging_id", staging_id)
    check_name("dt", dt, DT_RE)
    fs, root = fs_root(output)
    fs.invalidate_cache()  # write tasks ran in other processes: never trust cached listings
    mpath = f"{root}/{manifest_path(commit_id)}"
    if _exists(fs, mpath):
        raise CommitError(f"commit {commit_id!r}: manifest already exists in {MANIFEST_DIR}/, refusing to re-commit")

    files, shard_rows, markers, status, conflicts = _merge_results(results, staging_id)
    staging_dirs = {rel.rsplit("/", 1)[0] for rel in files}  # "_staging/<id>"
    if staging_id:
        staging_dirs.add(staging_prefix(staging_id))
    expected = list(dict.fromkeys(expected_shards))
    problems: dict[str, str] = {}
    for src in expected:
        m = markers.get(src)
        if m is None:
            problems[src] = f"{src} (no shard marker, {shard_rows.get(src, 0)} rows)"
        elif shard_rows.get(src, 0) != m["images"]:
            problems[src] = f"{src} ({shard_rows.get(src, 0)} rows, expected {m['images']} images)"
    for src in sorted(set(conflicts)):
        problems[src] = f"{src} (conflicting shard markers)"
    for src in sorted((set(shard_rows) | set(markers)) - set(expected)):
        problems[src] = f"{src} (rows for a shard not in expected_shards)"
    if problems:
        shown = list(problems.values())[:20]
        more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise CommitError(f"commit {commit_id!r} refused, {len(problems)} shard(s) not exactly covered: "
                          + "; ".join(shown) + more, shards=list(problems))
    untrusted = _untrusted_shards(markers)
    if untrusted:  # rows streamed before their shard failed its integrity check: error rows, never labels
        results = [_distrust(fs, root, r, untrusted) for r in results]
        files, shard_rows, markers, status, _ = _merge_results(results, staging_id)

    # Plan the moves. Sorted so a resumed commit maps each file to the same name. Two listings instead of
    # a HEAD per file; a file already at its destination was moved by an earlier attempt of this same
    # commit (crash before the manifest).
    part_dir = partition_prefix(model_name, dt)
    staged: dict[str, int] = {}
    for d in staging_dirs:
        staged.update(_listing(fs, f"{root}/{d}/*.parquet"))
    placed = _listing(fs, f"{root}/{part_dir}/part-{commit_id}-*.parquet")
    moves: list[list[str]] = []  # [staged rel, destination rel]
    manifest_files = []
    for n, rel in enumerate(sorted(files)):
        dest_rel = f"{part_dir}/part-{commit_id}-{n:05d}.parquet"
        size = staged.get(f"{root}/{rel}", placed.get(f"{root}/{dest_rel}"))
        if size is None:
            raise CommitError(f"commit {commit_id!r}: staged file {rel} is missing")
        want = files[rel]["bytes"]
        if want and size != want:
            raise CommitError(f"commit {commit_id!r}: {rel} has {size} bytes, the write task wrote {want}")
        moves.append([rel, dest_rel])
        manifest_files.append({"path": dest_rel, "rows": files[rel]["rows"], "bytes": int(size)})

    shards = {}
    for src in expected:
        error = redact(markers[src]["error"]) if markers[src]["error"] else None
        rows = shard_rows.get(src, 0)
        shards[src] = {"images": markers[src]["images"], "rows": rows, "error": error,
                       "done": shard_done(error, rows)}
        if "format" in markers[src]:  # the reader's format (`sources.Shard.format`): webdataset, parquet, folder
            shards[src]["format"] = markers[src]["format"]
    manifest = {
        "version": MANIFEST_VERSION,
        "run_id": run_id,
        "commit_id": commit_id,
        "model": model_name,
        "model_digest": model_digest,
        "dt": dt,
        "committed_at": datetime.now(UTC).isoformat(),
        "files": manifest_files,
        "shards": shards,
        "counts": {
            "images": sum(s["images"] for s in shards.values()),
            "ok": status.get("ok", 0),
            "error": status.get("error", 0),
            "shards": len(shards),
            "shard_errors": sum(1 for s in shards.values() if s["error"]),
        },
        "config": redact_obj(config),
        "stats": stats,
    }
    intent = {"version": MANIFEST_VERSION, "commit_id": commit_id, "moves": moves,
              "staging_dirs": sorted(staging_dirs), "manifest": manifest}
    _refuse_another_versions_intent(fs, root, commit_id, model_digest)
    _write_intent(fs, root, commit_id, to_json(intent))  # write-ahead: from here on, recover() can finish it
    _apply_moves(fs, root, moves)
    _write_manifest(fs, mpath, to_json(manifest))  # the commit point
    logger.info("committed %s: %d files, %d rows, %d shards", commit_id, len(manifest_files),
                sum(f["rows"] for f in manifest_files), len(shards))
    _finish_commit(fs, root, commit_id, [rel for rel, _ in moves], staging_dirs if cleanup else ())
    return manifest


def _untrusted_shards(markers: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{shard: row error} for shards whose compressed data failed its integrity check once read to the end."""
    out = {}
    for src, m in markers.items():
        reason = (m["error"] or "").removeprefix("shard_error: ")
        if reason.startswith(INTEGRITY_FAILED):
            out[src] = f"{UNTRUSTED_ROW_CODE}: {reason.removeprefix('corrupt: ')}"
    return out


def _distrust(fs: fsspec.AbstractFileSystem, root: str, result: dict[str, Any], untrusted: dict[str, str]
              ) -> dict[str, Any]:
    """The write result, with its staged file replaced by a copy in which the rows of `untrusted` shards are
    error rows. The copy is named after the file, which stays: committing again writes the same copy."""
    if not result.get("file") or not untrusted.keys() & result.get("shard_rows", {}).keys():
        return result
    rel = result["file"].removesuffix(".parquet") + ".untrusted.parquet"
    with fs.open(f"{root}/{result['file']}", "rb") as f:
        table = pq.read_table(f)
    reasons = pa.array([untrusted.get(s) for s in table.column("source").to_pylist()], pa.string())
    bad = pc.is_valid(reasons)
    columns = []
    for field in table.schema:
        col = table.column(field.name).combine_chunks()
        if field.name == "error":
            col = pc.if_else(bad, reasons, col)
        elif field.name in ERROR_VALUES:  # an untrusted row keeps its ids and source, and reads as any error row
            col = pc.if_else(bad, pa.scalar(ERROR_VALUES[field.name], field.type), col)
        columns.append(col)
    table = pa.Table.from_arrays(columns, schema=table.schema)
    with fs.open(f"{root}/{rel}", "wb") as f:
        pq.write_table(table, f, compression="zstd")
        size = f.tell()
    counts = {row["values"]: row["counts"] for row in pc.value_counts(table.column("status")).to_pylist()}
    return {**result, "file": rel, "bytes": size, "status_counts": {"ok": counts.get("ok", 0),
                                                                     "error": counts.get("error", 0)}}


def shard_done(error: str | None, rows: int) -> bool:
    """A shard is done unless its reader could not reach it at all: then a later run tries it again.

    Marker errors read "shard_error: <code>: <message>" (codes from `pipeline.sources`). A shard that was
    reached and read in part keeps its rows and is done: retrying it would label those rows twice.
    """
    if not error:
        return True
    code = error.removeprefix("shard_error:").strip().split(":", 1)[0].strip()
    return not (code in RETRYABLE_SHARD_CODES and rows == 0)


def _write_intent(fs: fsspec.AbstractFileSystem, root: str, commit_id: str, data: bytes) -> None:
    """Publish the intent whole (local: temp file + rename; object stores: one PUT), overwriting a stale one."""
    path = f"{root}/{pending_path(commit_id)}"
    if _is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{os.path.dirname(path)}/.{commit_id}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)


def _refuse_another_versions_intent(fs: fsspec.AbstractFileSystem, root: str, commit_id: str, model_digest: str
                                    ) -> None:
    """A commit id is a run id (+ wave): two model versions run with the same --run-id would overwrite each
    other's intent and part files. An intent left by an earlier attempt of this same commit is fine."""
    try:
        theirs = json.loads(fs.cat_file(f"{root}/{pending_path(commit_id)}"))["manifest"]["model_digest"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # none (the usual case), or recover's business
        return
    if theirs != model_digest:
        raise CommitError(f"commit {commit_id!r}: expected no other commit in progress under this id, got one of "
                          f"model version {theirs}: give this run another --run-id")


def _apply_moves(fs: fsspec.AbstractFileSystem, root: str, moves: list[list[str]]) -> None:
    """Move staged files to their partitions; a file already at its destination (an earlier attempt) is skipped."""
    dirs = {dest.rsplit("/", 1)[0] for _, dest in moves}
    for d in sorted(dirs):
        fs.makedirs(f"{root}/{d}", exist_ok=True)
    for rel, dest in moves:
        src, dst = f"{root}/{rel}", f"{root}/{dest}"
        try:
            fs.mv(src, dst)
        except FileNotFoundError:
            if not _exists(fs, dst):
                raise


def _finish_commit(fs: fsspec.AbstractFileSystem, root: str, commit_id: str, staged: list[str],
                   staging_dirs: Iterable[str]) -> None:
    """After the manifest: drop the intent, then (best effort) this commit's staging leftovers."""
    _remove_quietly(fs, f"{root}/{pending_path(commit_id)}")
    for rel in staged:  # anything of this commit still in staging (e.g. mv copied, delete failed)
        _remove_quietly(fs, f"{root}/{rel}")
    for d in staging_dirs:
        _remove_quietly(fs, f"{root}/{d}", recursive=True)


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str, recursive: bool = False) -> None:
    try:
        if _exists(fs, path):
            fs.rm(path, recursive=recursive)
    except Exception:  # noqa: BLE001 - leftovers are harmless: no manifest names them
        logger.warning("could not remove staging leftover %s", path, exc_info=True)


def cleanup_staging(output: str, staging_id: str) -> None:
    """Best-effort removal of `OUTPUT/_staging/<staging_id>/` (the run_id, or the sink's staging_id).

    Only for folders whose commits are done or abandoned: their files are ones no manifest will ever name.
    """
    check_name("staging_id", staging_id)
    fs, root = fs_root(output)
    fs.invalidate_cache()
    _remove_quietly(fs, f"{root}/{staging_prefix(staging_id)}", recursive=True)


# --------------------------------------------------------------------------------------------------- recovery


_PART_RE = re.compile(r"part-(?P<commit>[A-Za-z0-9_.-]+)-\d{5}\.parquet")


def _mtime(info: dict[str, Any]) -> float | None:
    """Modification time (epoch seconds) from an fsspec info dict: local `mtime`, S3 `LastModified`."""
    t = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if isinstance(t, datetime):
        return t.timestamp()
    return float(t) if isinstance(t, (int, float)) else None


def recover(output: str, *, model_digest: str | None = None, staging_grace_s: float | None = STAGING_GRACE_S,
            others_grace_s: float = OTHERS_GRACE_S) -> dict[str, list[str]]:
    """Finish or undo what a killed driver left in OUTPUT; call before listing pending shards.

    - each intent `_pending/<commit_id>.json`: if its manifest exists, the commit is done (intent
      dropped); else if every file is still staged or already moved, roll forward (finish the moves, write the
      manifest it holds); else roll back (delete its moved files: its shards stay pending).
    - part files in `model=*/dt=*/` that neither a committed manifest nor an intent names are deleted (crash
      mid-commit under the old protocol, or a rolled-back commit).
    - staging folders no remaining intent needs, older than `staging_grace_s` (0: all; None: keep all), are
      deleted.

    `model_digest`: the caller holds that model version's lease, so it is the only writer of that version, but
    writers of other versions may be committing into the same output (and partition) right now. Then only
    intents of that version, and staging folders named for it (`layout.staging_name`), are handled as above;
    other intents and folders (other versions', or untagged ones) are left to their writer until they are older
    than `others_grace_s`, and are reported as `left`. Without `model_digest` the caller is the only writer of
    OUTPUT and every intent is its business.

    Part files are safe either way, because of the order of the listings: parts, then intents, then manifests.
    A part file exists only after its commit's intent was written, and the intent is deleted only after the
    manifest is, so a part file listed first is named by an intent listed after it or by a manifest listed
    last, unless its commit was abandoned. Returns what it did, by kind.
    """
    fs, root = fs_root(output)
    done: dict[str, list[str]] = {"completed": [], "rolled_forward": [], "rolled_back": [], "orphans_removed": [],
                                  "staging_removed": [], "left": []}
    now = datetime.now(UTC).timestamp()
    fs.invalidate_cache()
    parts = sorted(_listing(fs, f"{root}/model=*/dt=*/part-*.parquet"))  # first: see the docstring
    fs.invalidate_cache()
    intents = _infos(fs, f"{root}/{PENDING_DIR}/*.json")
    keep_commits: set[str] = set()  # commits whose part files are an intent's business, not orphans
    keep_staging: set[str] = set()  # staging folders of intents left to their writer
    for path in sorted(intents):
        name = path.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        try:
            try:
                intent = json.loads(fs.cat_file(path))
            except FileNotFoundError:  # finished meanwhile
                continue
            commit_id, moves, manifest = intent["commit_id"], intent["moves"], intent["manifest"]
            check_name("commit_id", commit_id)
            for rel, dest in moves:
                if _STAGED_RE.fullmatch(rel) is None or ".." in rel or ".." in dest or dest.startswith("/"):
                    raise ValueError(f"bad move {rel!r} -> {dest!r}")
        except (ValueError, KeyError, TypeError) as e:
            # Intents are published whole (rename / single PUT), so this is not a crash artefact: stop.
            raise CommitError(f"recover: expected a commit intent in {PENDING_DIR}/{name}, got unreadable "
                              f"content ({e}); inspect and delete it by hand") from e
        staging_dirs = set(intent.get("staging_dirs", []))
        keep_commits.add(commit_id)
        if model_digest is not None and manifest.get("model_digest") != model_digest \
                and not _older_than(intents[path], now, others_grace_s):
            keep_staging.update(staging_dirs)  # another version's commit, maybe in progress: its writer's
            done["left"].append(commit_id)
            continue
        done[_recover_intent(fs, root, path, commit_id, moves, manifest, staging_dirs)].append(commit_id)

    fs.invalidate_cache()
    named = {f["path"] for m in list_manifests(output) for f in m.get("files", [])}
    for path in parts:
        rel = path[len(root) + 1:]
        m = _PART_RE.fullmatch(rel.rsplit("/", 1)[-1])
        if rel not in named and m and m.group("commit") not in keep_commits:
            _remove_quietly(fs, path)
            done["orphans_removed"].append(rel)
    if done["orphans_removed"]:
        logger.warning("recover: removed %d part files no manifest names", len(done["orphans_removed"]))

    if staging_grace_s is not None:
        own = version_tag(model_digest) if model_digest is not None else None
        fs.invalidate_cache()
        try:
            entries = fs.ls(f"{root}/{STAGING_DIR}", detail=True)
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.get("type") != "directory":
                continue  # not ours: `_staging/` holds one folder per run or wave
            d = entry["name"].rstrip("/")
            rel = d[len(root) + 1:]
            if rel in keep_staging:
                continue
            tag = TAGGED_RE.fullmatch(rel.rsplit("/", 1)[-1])
            grace = staging_grace_s if own is None or (tag and tag.group(1) == own) else \
                max(staging_grace_s, others_grace_s)
            if grace > 0:  # a run may still be writing there: only folders quiet for the grace period
                times = [t for t in (_mtime(i) for i in fs.ls(d, detail=True)) if t is not None]
                if not times or now - max(times) < grace:
                    continue
            _remove_quietly(fs, d, recursive=True)
            done["staging_removed"].append(rel)
    return done


def _older_than(info: dict[str, Any], now: float, seconds: float) -> bool:
    t = _mtime(info)
    return t is not None and now - t >= seconds


def _recover_intent(fs: fsspec.AbstractFileSystem, root: str, path: str, commit_id: str, moves: list[list[str]],
                    manifest: dict[str, Any], staging_dirs: set[str]) -> str:
    """Finish or undo the commit of one intent; returns what was done ('completed', 'rolled_forward', ...)."""
    mpath = f"{root}/{manifest_path(commit_id)}"
    if _exists(fs, mpath):  # crashed after the commit point: only the clean-up was left
        _finish_commit(fs, root, commit_id, [rel for rel, _ in moves], staging_dirs)
        return "completed"
    present = [_exists(fs, f"{root}/{rel}") or _exists(fs, f"{root}/{dest}") for rel, dest in moves]
    if all(present):
        _apply_moves(fs, root, moves)
        try:
            _write_manifest(fs, mpath, to_json(manifest))
        except CommitError:  # its writer (or another recover) got there first: the same manifest
            _finish_commit(fs, root, commit_id, [rel for rel, _ in moves], staging_dirs)
            return "completed"
        _finish_commit(fs, root, commit_id, [rel for rel, _ in moves], staging_dirs)
        logger.warning("recover: finished commit %s left by a stopped driver (%d files)", commit_id, len(moves))
        return "rolled_forward"
    for _, dest in moves:
        _remove_quietly(fs, f"{root}/{dest}")
    _remove_quietly(fs, path)
    logger.warning("recover: rolled back commit %s: %d of its staged files are gone; its shards stay pending",
                   commit_id, present.count(False))
    return "rolled_back"


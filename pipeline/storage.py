"""Object-store primitives shared by the stages that publish things (the commit's manifests, the lease).

Not a stage: it imports fsspec only, so stages may use it without importing one another.
"""

from __future__ import annotations

import logging
import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)


def create_only(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist yet: True if this call created it, False if it existed.

    Local: write a temp file, then os.link it into place (atomic and exclusive; readers never see a
    partial file). S3 (s3fs): one PUT with If-None-Match: *; refused as existing, the object is read back: if
    it holds exactly `data`, the write was this call's own (see `_holds`). Backends without conditional writes fall
    back to check-then-put, which is not race-free (logged).
    """
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem: exclusive create (a reader may see it half-written)
            try:
                with open(path, "xb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False
        finally:
            os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return _holds(fs, path, data)
    except (TypeError, NotImplementedError):
        log.warning("conditional write not supported by %s; %s uses check-then-put", type(fs).__name__, path)
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def _holds(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """True if the object at `path` holds exactly `data`.

    A PUT whose answer was lost (the connection reset after the store took the object) is sent again by
    botocore, and that retry is refused as existing: without this check, a write that landed would be reported
    as another writer's. Every create-only write here (a manifest, a lease generation) carries its writer's
    ids and a timestamp, so another writer's object never holds the same bytes."""
    try:
        return fs.cat_file(path) == data
    except FileNotFoundError:
        return False

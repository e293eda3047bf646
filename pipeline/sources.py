"""Shard formats: find shards under any fsspec URL and stream (key, image bytes) records out of them.

Three formats, one record shape:
- webdataset: a .tar / .tar.gz / .tgz whose members are grouped into samples as WebDataset groups them: adjacent
  members with the same key (dirname + basename up to the first dot). Every member with an image extension is one
  record, keyed by the sample's key when it is the sample's only image and '<key>.<ext>' when the sample holds
  several ('img.v2.0001.jpg', 'both.png'). Read as a stream: never extracted to disk, never held in memory whole.
  A compressed tar (gzip, bz2 or xz, by its magic bytes) is read to the end of the compressed stream, past the
  tar's end marker, so that its integrity check (gzip's CRC-32 and length) runs.
- parquet: one row per image, read row group by row group (page CRCs verified where the file has them); the image
  is a binary column or a Hugging Face `Image` struct {bytes, path}. A struct with null bytes is read from its
  path, as `datasets` reads it (`_image_path_url`): one that cannot be read is a `read_error` record naming it.
- folder: a directory that directly holds image files; each file is one record keyed by its file name.

A record that cannot be an image (a sample without an image member, null bytes, a link or an unsafe member name,
a duplicate key: a sample key that comes back, or a member name repeated within a sample) is a `Record` with
`error` set, never an exception: one bad image never fails a shard. A shard that cannot
be read to the end (truncated or corrupt tar, unreadable parquet, missing file) raises `ShardError`, but only
after yielding every record read before the failure; so does a shard read to its end that held unsafe members
or duplicate keys (a shard-level summary of those error records), and a compressed shard whose integrity check
fails at its end: its message starts with `config.INTEGRITY_FAILED`, and none of its records can be trusted (the
commit turns their rows into error rows). `ShardError.message` starts with a code:

    missing, unavailable                      the shard could not be reached: worth retrying in a later run
    truncated, corrupt, bad_schema,           the shard's content is broken: retrying gives the same answer
    bad_member, duplicate_key, read_error

Keys are data, never paths: nothing is extracted, and member names are only compared and hashed. The one path
a shard names that is opened is a Hugging Face image's `path` when its bytes are null: read, never written.
Credentials come from the environment only and never appear in messages (`config.redact`).

`read_rows` turns one shard's records into the read rows of `pipeline.schema` (its image rows, then its marker
row): the rows the plan's read tasks hand preprocessing. Every record becomes exactly one image row, and the marker
counts them, whatever the shard's error.

This module reads and writes bytes; it does not decode images and does not import ray or other stages (it types
its rows with `pipeline.schema`, which imports none either).
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import (
    IMAGE_EXTENSIONS,
    INPUT_FORMATS,
    INTEGRITY_FAILED,
    RETRYABLE_SHARD_CODES,
    UNTRUSTED_ROW_CODE,
    redact,
)
from pipeline.schema import image_row, marker_row, read_batch

log = logging.getLogger(__name__)

SHARD_FORMATS = tuple(f for f in INPUT_FORMATS if f != "auto")  # Shard.format: webdataset, parquet, folder
WEBDATASET_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
KEY_COLUMNS = ("key", "__key__", "id", "path", "filename")  # auto key column candidates, in order
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "bytes")  # tie-breakers for image_column=auto
READ_BLOCK_SIZE = 8 * 2**20  # fsspec read-ahead block: bounds memory per open shard (s3fs default is 50 MiB)
TAR_BUFSIZE = 2**20  # tarfile's stream read size: fewer, larger reads through the fsspec file
_GLOB_CHARS = re.compile(r"[*?\[]")
# OSError numbers that mean "could not reach the bytes" rather than "the bytes are bad" (s3fs maps S3's
# 5xx/SlowDown to EIO/EBUSY/EREMOTEIO once its own and botocore's retries are spent).
_UNAVAILABLE_ERRNOS = {errno.EIO, errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                       errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EREMOTEIO, errno.EACCES}


class SourceError(ValueError):
    """The input does not name any shard, or cannot be listed."""


class ShardError(Exception):
    """A shard could not be read to its end (or held bad members); records read before were already yielded.

    `message` starts with a code (module docstring); `retryable` when the shard could not be reached."""

    def __init__(self, uri: str, message: str):
        message = redact(message)
        super().__init__(uri, message)  # both in args, so the error pickles (Ray ships it between processes)
        self.uri = uri
        self.message = message

    @property
    def code(self) -> str:
        return self.message.split(":", 1)[0]

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_SHARD_CODES

    def __str__(self) -> str:
        return f"{_redact(self.uri)}: {self.message}"


@dataclass(frozen=True)
class Shard:
    uri: str  # full URL with protocol: s3://bucket/key.tar, file:///abs/path.tar, file:///abs/dir (folder)
    format: str  # one of SHARD_FORMATS: webdataset | parquet | folder (what manifests record)
    size: int = -1  # bytes (a folder: sum of its image files), -1 when unknown


class Record(NamedTuple):
    key: str  # WebDataset key, parquet key/path/row number, or file name (repeats only on duplicate_key records)
    data: bytes | None  # encoded image bytes; None when error is set
    error: str | None = None  # "<code>: <message>", codes: no_image, bad_member, duplicate_key, read_error
    id_key: str | None = None  # what the image id hashes instead of `key`: unique in the shard (duplicates)

    def image_id(self, source_uri: str) -> str:
        return make_image_id(source_uri, self.key if self.id_key is None else self.id_key)


def make_image_id(source_uri: str, key: str) -> str:
    """Stable image id: the same shard URI and key give the same id in every run."""
    return hashlib.sha256(f"{source_uri}#{key}".encode()).hexdigest()[:32]


def _unique_id_key(key: str, seen: set[str]) -> str:
    """The n-th repeat of a key hashes as '<key>\\0<n>' (n chosen so it is unseen): every record keeps its own id."""
    n = 1
    while f"{key}\0{n}" in seen:
        n += 1
    return f"{key}\0{n}"


# ---------------------------------------------------------------------------------------------------------
# filesystems and names


def _url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem + protocol-less path. S3 endpoint from the environment; keys are left to botocore."""
    protocol, _ = fsspec.core.split_protocol(url)
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    return fsspec.core.url_to_fs(url, **options)


def _redact(url: str) -> str:
    """Drop any user:password@ part (and any other credential) of a URL before it goes into a message."""
    return redact(url)


def _ignored(relpath: str) -> bool:
    """Names starting with '_' or '.' (staging, manifests, temp files, hidden files) are never shards."""
    return any(part[:1] in ("_", ".") for part in relpath.split("/") if part)


def _file_format(path: str) -> str | None:
    """webdataset / parquet / image by suffix, else None."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(WEBDATASET_SUFFIXES):
        return "webdataset"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if _is_image_name(name):
        return "image"
    return None


def _is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _size(info: dict[str, Any]) -> int:
    size = info.get("size")
    return int(size) if isinstance(size, int) and size >= 0 else -1


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1:] if root and path.startswith(root + "/") else path


# ---------------------------------------------------------------------------------------------------------
# listing


def list_shards(input: str, input_format: str = "auto") -> list[Shard]:
    """Shards named by `input`, sorted by URI.

    `input` is a glob (s3://b/p/*.tar, /data/**/*.parquet), a prefix or directory (searched recursively), or
    a single shard file; local paths may be relative. Under a prefix, `auto` takes every .tar/.tar.gz/.tgz
    (webdataset), every .parquet, and every directory that directly holds image files (folder); an explicit
    format takes only that kind. Paths with a component starting with '_' or '.' below the input are ignored.
    """
    input = os.fspath(input) if isinstance(input, os.PathLike) else input
    if input_format not in INPUT_FORMATS:
        raise SourceError(f"input_format: expected one of {INPUT_FORMATS}, got {input_format!r}")
    if not isinstance(input, str) or not input:
        raise SourceError(f"input: expected a shard URL, glob or prefix, got {input!r}")
    shown = _redact(input)
    try:
        fs, path = _url_to_fs(input)
        if _GLOB_CHARS.search(path):
            root = _GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
            what = f"{shown!r}"
            fs.invalidate_cache()
            files = _glob_files(fs, path, root)
        elif fs.isdir(path):
            what = _describe(input_format)
            fs.invalidate_cache(path)
            files = _find_files(fs, path, path)
        elif fs.isfile(path):
            return [_single_file_shard(fs, path, input_format, shown)]
        else:
            raise SourceError(f"input: expected shards matching {_describe(input_format)}, got none at {shown}")
    except SourceError:
        raise
    except (OSError, ValueError) as e:  # unreachable bucket, bad glob, permission: say which input
        raise SourceError(f"input: cannot list {shown}: {type(e).__name__}: {e}") from e

    shards = _classify(fs, files, input_format)
    if not shards:
        raise SourceError(f"input: expected shards matching {what}, got none at {shown}")
    return sorted(shards, key=lambda s: s.uri)


def _describe(input_format: str) -> str:
    return {
        "auto": "*.tar, *.tar.gz, *.tgz, *.parquet or directories of image files",
        "webdataset": "*.tar, *.tar.gz, *.tgz",
        "parquet": "*.parquet",
        "folder": "directories of image files",
    }[input_format]


def _find_files(fs: fsspec.AbstractFileSystem, path: str, root: str) -> dict[str, dict[str, Any]]:
    found = fs.find(path, withdirs=False, detail=True)
    return {p: info for p, info in found.items() if not _ignored(_relative(p, root))}


def _glob_files(fs: fsspec.AbstractFileSystem, pattern: str, root: str) -> dict[str, dict[str, Any]]:
    """Files matched by the glob; a matched directory stands for the files below it."""
    files: dict[str, dict[str, Any]] = {}
    for p, info in fs.glob(pattern, detail=True).items():
        if _ignored(_relative(p, root)):
            continue
        if info.get("type") == "directory":
            files.update(_find_files(fs, p, root))
        else:
            files[p] = info
    return files


def _single_file_shard(fs: fsspec.AbstractFileSystem, path: str, input_format: str, shown: str) -> Shard:
    fmt = _file_format(path)
    if input_format in ("webdataset", "parquet"):
        fmt = input_format  # an explicitly named file with an explicit format: trust the caller
    if fmt not in ("webdataset", "parquet"):
        raise SourceError(f"input: expected a .tar, .tar.gz, .tgz or .parquet file or a directory, got {shown}")
    return Shard(fs.unstrip_protocol(path), fmt, _size(fs.info(path)))


def _classify(fs: fsspec.AbstractFileSystem, files: dict[str, dict[str, Any]], input_format: str) -> list[Shard]:
    shards: list[Shard] = []
    folders: dict[str, int] = {}
    for p, info in files.items():
        fmt = _file_format(p)
        if fmt == "image" and input_format in ("auto", "folder"):
            parent = p.rsplit("/", 1)[0] if "/" in p else p
            folders[parent] = folders.get(parent, 0) + max(_size(info), 0)
        elif fmt in ("webdataset", "parquet") and input_format in ("auto", fmt):
            shards.append(Shard(fs.unstrip_protocol(p), fmt, _size(info)))
    shards.extend(Shard(fs.unstrip_protocol(d), "folder", size) for d, size in folders.items())
    return shards


# ---------------------------------------------------------------------------------------------------------
# reading


def iter_shard(shard: Shard, *, image_column: str = "auto", key_column: str = "auto") -> Iterator[Record]:
    """Stream the records of one shard. Raises ShardError after the last readable record if the shard is broken."""
    if shard.format == "webdataset":
        return _iter_webdataset(shard.uri)
    if shard.format == "parquet":
        return _iter_parquet(shard.uri, image_column, key_column)
    if shard.format == "folder":
        return _iter_folder(shard.uri)
    raise SourceError(f"shard.format: expected one of {', '.join(SHARD_FORMATS)}, got {shard.format!r}")


def read_rows(shard: Shard, *, image_column: str = "auto", key_column: str = "auto", rows_per_batch: int = 64
              ) -> Iterator[dict[str, Any]]:
    """One shard as numpy batches of read rows (`schema.READ_COLUMNS`): its image rows, `rows_per_batch` at a
    time, then its one marker row, in the last batch.

    Every record is one image row (a record that is not an image carries its error). Never raises for a bad
    shard: a shard that fails part way keeps the rows read so far, and its marker carries how many images were
    read and the error, "shard_error: <code>: <message>" (`commit.shard_done` reads the code), so the images
    that were read are labelled and the manifest records the shard error.
    """
    rows: list[tuple] = []
    count, shard_error = 0, None
    try:
        for rec in iter_shard(shard, image_column=image_column, key_column=key_column):
            rows.append(image_row(rec.image_id(shard.uri), shard.uri, rec.key, rec.data, rec.error))
            count += 1
            if len(rows) >= rows_per_batch:
                yield read_batch(rows)
                rows = []
    except ShardError as e:
        shard_error = f"shard_error: {e.message}"
    except Exception as e:  # one bad shard never fails the job
        shard_error = redact(f"shard_error: read_error: {type(e).__name__}: {e}")
    if shard_error:
        log.warning("%s: %s (kept %d images read before it)", _redact(shard.uri), shard_error, count)
    rows.append(marker_row(shard.uri, shard.format, count, shard_error))
    yield read_batch(rows)


def guess_format(uri: str) -> str:
    """The format of a shard named `uri` as `list_shards` gives it under `auto`: webdataset or parquet by its
    suffix, else folder (for manifests older than their shards' recorded format)."""
    fmt = _file_format(uri)
    return fmt if fmt in ("webdataset", "parquet") else "folder"


def _unavailable(e: BaseException) -> bool:
    """An I/O failure reaching the bytes (permission, network, throttling), not bad bytes."""
    if isinstance(e, (gzip.BadGzipFile, tarfile.TarError)):
        return False
    if isinstance(e, (PermissionError, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError) and e.errno in _UNAVAILABLE_ERRNOS:
        return True
    return type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests")


def _open_error(uri: str, e: Exception) -> ShardError:
    if isinstance(e, FileNotFoundError):
        return ShardError(uri, "missing: the shard does not exist (deleted after listing?)")
    if _unavailable(e):
        return ShardError(uri, f"unavailable: cannot open the shard: {type(e).__name__}: {e}")
    return ShardError(uri, f"read_error: {type(e).__name__}: {e}")


def _unsafe_name(name: str) -> bool:
    """Absolute or parent-relative member names: harmless here (nothing is extracted), but never legitimate."""
    parts = re.split(r"[/\\]", name)
    return name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[/\\]", name) is not None or ".." in parts


class _Problems:
    """Counts a shard's bad-member and duplicate-key records, for one shard-level summary at its end."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, rec: Record) -> Record:
        code = rec.error.split(":", 1)[0] if rec.error else None
        if code in ("bad_member", "duplicate_key"):
            self.counts[code] = self.counts.get(code, 0) + 1
            self.first.setdefault(code, rec.key)
        return rec

    def summary(self) -> str | None:
        if not self.counts:
            return None
        what = {"bad_member": "unsafe or link member(s)", "duplicate_key": "duplicate key(s)"}
        parts = [f"{n} {what[c]} (first: {self.first[c][:80]!r})" for c, n in self.counts.items()]
        return f"{next(iter(self.counts))}: " + "; ".join(parts) + "; recorded as error rows"


class _TarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped: tarfile treats a truncated or garbled header as a quiet end of archive."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar._vitlabel_stop = e  # type: ignore[attr-defined]
            raise


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: 'a/b/x.seg.jpg' -> key 'a/b/x', extension 'seg.jpg'."""
    dirname, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{dirname}/{stem}" if dirname else stem), ext


class _Sample:
    """The members of one WebDataset sample: adjacent members with the same key, no extension twice."""

    __slots__ = ("key", "exts", "images", "unsafe")

    def __init__(self, key: str):
        self.key = key
        self.exts: list[str] = []  # every member's extension, in tar order
        self.images: list[tuple[str, bytes | None, str | None]] = []  # (extension, bytes, error) per image member
        self.unsafe: str | None = None  # a member name that is absolute or climbs out with '..'

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, ext: str) -> None:
        """Record one member; only image members are read (tarfile skips the data of the others)."""
        self.exts.append(ext)
        if _unsafe_name(name):
            self.unsafe = self.unsafe or name
        if ext.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
            return
        if self.unsafe is not None:
            self.images.append((ext, None, None))  # never read: the record is a bad_member error
        elif not member.isfile():
            self.images.append((ext, None, f"bad_member: image member {name} is a link, not a regular file"))
        else:
            fobj = tar.extractfile(member)
            assert fobj is not None  # regular member
            self.images.append((ext, fobj.read(), None))

    def records(self) -> list[Record]:
        """One record per image member, keyed '<key>.<ext>' when the sample holds more than one; a sample without
        any image member is one error record."""
        unsafe = None if self.unsafe is None else (f"bad_member: unsafe member name {self.unsafe[:200]!r} "
                                                    "(absolute or '..' path)")
        if not self.images:
            got = ", ".join(e or "''" for e in self.exts) or "nothing"
            return [Record(self.key, None, unsafe or f"no_image: sample has no member with an image extension "
                                                     f"(got {got})")]
        keys = [self.key] if len(self.images) == 1 else [f"{self.key}.{ext}" for ext, _, _ in self.images]
        if unsafe is not None:
            return [Record(k, None, unsafe) for k in keys]
        return [Record(k, data, error) for k, (_, data, error) in zip(keys, self.images, strict=True)]


def _member_name(member: tarfile.TarInfo) -> str:
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name


class _Decompressed:
    """A compressed shard's bytes, decompressed as a stream. Its integrity check (gzip's CRC-32 and length, bz2's
    block CRCs, xz's check) fails only once the stream is read to its end, after the tar's end marker: `drain` reads
    that far. `error` keeps the decompressor's first failure, which tarfile wraps or reports as a quiet end."""

    def __init__(self, kind: str, stream: Any):
        self.kind = kind
        self._stream = stream
        self.error: Exception | None = None

    def read(self, n: int = -1) -> bytes:
        """At most n bytes, as soon as there are some: a stream cut short still gives what precedes the cut."""
        try:
            return self._stream.read1(n)
        except Exception as e:
            self.error = self.error or e
            raise

    def drain(self) -> None:
        while self.read(TAR_BUFSIZE):
            pass


_COMPRESSIONS: tuple[tuple[bytes, str, Any], ...] = (
    (b"\x1f\x8b", "gzip", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", "bz2", lambda f: bz2.BZ2File(f, "rb")),
    (b"\xfd7zXZ\x00", "xz", lambda f: lzma.LZMAFile(f, "rb")),
)


def _decompressed(f: Any) -> _Decompressed | None:
    """The decompressing stream of a gzip, bz2 or xz shard (by its magic bytes); None for a plain tar."""
    head = f.read(6)
    f.seek(0)
    for magic, kind, opener in _COMPRESSIONS:
        if head.startswith(magic):
            return _Decompressed(kind, opener(f))
    return None


class _TarReader:
    """One WebDataset tar (plain, gzip, bz2 or xz) as records, then the shard's error, if any, as ShardError."""

    def __init__(self, uri: str):
        self.uri = uri
        self.seen: set[str] = set()
        self.problems = _Problems()
        self.members = 0
        self.stream: _Decompressed | None = None

    def records(self, f: Any) -> Iterator[Record]:
        try:
            self.stream = _decompressed(f)
            tar = tarfile.open(fileobj=self.stream or f, mode="r|", bufsize=TAR_BUFSIZE, tarinfo=_TarInfo)
            last = yield from self._all_but_last(tar)
            stop = self._stop(tar)
            if stop is None and last is not None:  # the last sample is complete only if the archive ended properly
                yield from self._finish(last)
            if self.stream is not None:
                self.stream.drain()
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            raise ShardError(self.uri, self._with_problems(self._error(e))) from e
        if stop is not None:
            raise ShardError(self.uri, self._with_problems(stop))
        problem = self.problems.summary()
        if problem:
            raise ShardError(self.uri, problem)

    def _all_but_last(self, tar: tarfile.TarFile) -> Generator[Record, None, _Sample | None]:
        """Records of every sample but the last, which is returned."""
        current: _Sample | None = None
        for member in tar:
            self.members += 1
            if not (member.isfile() or member.issym() or member.islnk()):
                continue  # directories, devices, fifos: not part of any sample
            name = _member_name(member)
            key, ext = _split_member(name)
            if current is None or key != current.key or ext in current.exts:  # a repeated name: a new sample
                if current is not None:
                    yield from self._finish(current)
                current = _Sample(key)
            current.add(tar, member, name, ext)
        return current

    def _finish(self, sample: _Sample) -> Iterator[Record]:
        """The sample's records. A key that comes back after other keys (or with an extension its sample already
        has) is a second sample with the same key: error records, each with its own id."""
        records = sample.records()
        if sample.key in self.seen:
            for rec in records:
                id_key = _unique_id_key(rec.key, self.seen)
                self.seen.add(id_key)
                yield self.problems.add(Record(rec.key, None, "duplicate_key: an earlier sample in this shard has "
                                                              "the same key", id_key))
            return
        self.seen.add(sample.key)
        for rec in records:
            yield self.problems.add(rec)

    def _stop(self, tar: tarfile.TarFile) -> str | None:
        """Why the member loop ended, unless at the end-of-archive marker: tarfile ends quietly on a bad header."""
        stop = getattr(tar, "_vitlabel_stop", None)
        if isinstance(stop, tarfile.InvalidHeaderError):  # a bad header checksum among them
            return f"corrupt: bad tar header after {self.members} members ({stop})"
        if not isinstance(stop, tarfile.EOFHeaderError):  # empty or short header: the file just stops
            return f"truncated: tar ends after {self.members} members without an end-of-archive marker"
        return None

    def _error(self, e: Exception) -> str:
        """The shard error for a failure while reading; a failure of the decompressor explains any that follows."""
        cause = e if self.stream is None or self.stream.error is None else self.stream.error
        where = f"after {self.members} members: {cause}"
        if isinstance(cause, EOFError) or "unexpected end" in str(cause):
            return f"truncated: tar unreadable {where}"
        if _unavailable(cause):
            return f"unavailable: tar unreadable {where}"
        if self.stream is not None and cause is self.stream.error:
            return (f"{INTEGRITY_FAILED}: the {self.stream.kind} data is damaged ({type(cause).__name__}: {cause}), "
                    f"found after {self.members} members: every image read from it is a {UNTRUSTED_ROW_CODE} "
                    "error row")
        if isinstance(cause, (tarfile.TarError, zlib.error)):
            return f"corrupt: tar unreadable {where}"
        return f"read_error: tar unreadable {where}"

    def _with_problems(self, message: str) -> str:
        problem = self.problems.summary()
        return message + (f" (before it: {problem})" if problem else "")


def _iter_webdataset(uri: str) -> Iterator[Record]:
    fs, path = _url_to_fs(uri)
    try:
        f = fs.open(path, "rb", block_size=READ_BLOCK_SIZE, cache_type="readahead")
    except Exception as e:
        raise _open_error(uri, e) from e
    with f:
        yield from _TarReader(uri).records(f)


def _image_column(schema: Any, requested: str) -> tuple[str, bool]:
    """(column name, is HF struct). A binary column, or a struct with a binary `bytes` field."""
    import pyarrow as pa

    is_view = getattr(pa.types, "is_binary_view", lambda _: False)  # pyarrow >= 16
    is_bytes = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or is_view(t)

    def kind(field: Any) -> str | None:
        t = field.type
        if is_bytes(t):
            return "binary"
        if pa.types.is_struct(t):
            idx = t.get_field_index("bytes")
            if idx >= 0 and is_bytes(t.field(idx).type):
                return "struct"
        return None

    if requested != "auto":
        if requested not in schema.names:
            raise ValueError(f"image_column: expected one of {schema.names}, got {requested!r}")
        k = kind(schema.field(requested))
        if k is None:
            raise ValueError(f"image_column: expected a binary or {{bytes, path}} struct column, got "
                             f"{requested!r} of type {schema.field(requested).type}")
        return requested, k == "struct"
    candidates = [(f.name, kind(f)) for f in schema if kind(f) is not None]
    if len(candidates) > 1:
        preferred = [c for c in candidates if c[0].lower() in IMAGE_COLUMN_NAMES]
        candidates = preferred if len(preferred) == 1 else candidates
    if len(candidates) != 1:
        got = [c[0] for c in candidates] or "none"
        raise ValueError(f"image_column: expected one binary or {{bytes, path}} struct column, got {got}; "
                         "set image_column")
    name, k = candidates[0]
    return name, k == "struct"


def _unique_strings(values: list[Any]) -> list[str] | None:
    if any(v is None for v in values):
        return None
    keys = [str(v) for v in values]
    return keys if len(set(keys)) == len(keys) else None


def _parquet_keys(pf: Any, image_col: str, is_struct: bool, key_column: str) -> list[str]:
    """One key per row, read before the images (key columns are small)."""
    schema = pf.schema_arrow
    n = pf.metadata.num_rows
    if key_column != "auto":
        if key_column not in schema.names:
            raise ValueError(f"key_column: expected one of {schema.names}, got {key_column!r}")
        values = pf.read(columns=[key_column]).column(0).to_pylist()
        width = max(6, len(str(max(n - 1, 0))))
        return [f"{i:0{width}d}" if v is None else str(v) for i, v in enumerate(values)]
    if n == 0:
        return []
    if is_struct and schema.field(image_col).type.get_field_index("path") >= 0:
        struct = pf.read(columns=[f"{image_col}.path"]).column(0).combine_chunks()
        keys = _unique_strings(struct.field("path").to_pylist())
        if keys is not None:
            return keys
    for name in KEY_COLUMNS:
        if name in schema.names and name != image_col:
            keys = _unique_strings(pf.read(columns=[name]).column(0).to_pylist())
            if keys is not None:
                return keys
    width = max(6, len(str(max(n - 1, 0))))
    return [f"{i:0{width}d}" for i in range(n)]


def _iter_parquet(uri: str, image_column: str, key_column: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    fs, path = _url_to_fs(uri)
    try:
        f = fs.open(path, "rb", block_size=READ_BLOCK_SIZE, cache_type="readahead")
    except Exception as e:
        raise _open_error(uri, e) from e
    with f:
        try:
            pf = pq.ParquetFile(f, page_checksum_verification=True)  # CRCs of the pages that carry one
        except Exception as e:  # not parquet, or I/O: the whole shard is unusable
            code = "unavailable" if _unavailable(e) else "corrupt"
            raise ShardError(uri, f"{code}: parquet unreadable: {type(e).__name__}: {e}") from e
        try:
            image_col, is_struct = _image_column(pf.schema_arrow, image_column)
            keys = _parquet_keys(pf, image_col, is_struct, key_column)
        except Exception as e:  # wrong or missing columns, or reading the key column failed (I/O, a page CRC)
            code = "unavailable" if _unavailable(e) else "corrupt" if isinstance(e, OSError) else "bad_schema"
            raise ShardError(uri, f"{code}: parquet unreadable: {type(e).__name__}: {e}") from e
        seen: set[str] = set()
        problems = _Problems()
        row = 0
        for rg in range(pf.metadata.num_row_groups):
            try:
                values, paths = _row_group_images(pf, rg, image_col, is_struct)
            except Exception as e:
                code = "unavailable" if _unavailable(e) else "corrupt"
                problem = problems.summary()
                also = f" (before it: {problem})" if problem else ""
                raise ShardError(uri, f"{code}: parquet row group {rg} unreadable after {row} rows: "
                                      f"{type(e).__name__}: {e}{also}") from e
            fetched = _read_image_paths(uri, [p for v, p in zip(values, paths, strict=True) if v is None and p])
            for data, path in zip(values, paths, strict=True):
                key = keys[row]
                row += 1
                if key in seen:
                    id_key = _unique_id_key(key, seen)
                    seen.add(id_key)
                    yield problems.add(Record(key, None, "duplicate_key: an earlier row in this shard has the same key",
                                              id_key))
                    continue
                seen.add(key)
                yield _parquet_record(key, data, path, fetched)
    problem = problems.summary()
    if problem:
        raise ShardError(uri, problem)


def _row_group_images(pf: Any, rg: int, image_col: str, is_struct: bool) -> tuple[list, list]:
    """(image bytes or None, path or None) per row of one row group. A null struct has neither."""
    column = pf.read_row_group(rg, columns=[image_col]).column(0).combine_chunks()
    if not is_struct:
        values = column.to_pylist()
        return values, [None] * len(values)
    valid = column.is_valid().to_pylist()
    values = [v if ok else None for v, ok in zip(column.field("bytes").to_pylist(), valid, strict=True)]
    if column.type.get_field_index("path") < 0:
        return values, [None] * len(values)
    paths = [p if ok else None for p, ok in zip(column.field("path").to_pylist(), valid, strict=True)]
    return values, paths


def _parquet_record(key: str, data: bytes | None, path: str | None, fetched: dict[str, bytes | str]) -> Record:
    """The record of one row: its bytes, else the bytes read from its path, else an error that says why not."""
    if data is not None:
        return Record(key, data)
    if not path:
        return Record(key, None, "no_image: null bytes")
    got = fetched[path]
    if isinstance(got, bytes):
        return Record(key, got)
    return Record(key, None, redact(f"read_error: cannot read image path {path[:300]!r}: {got}"))


def _image_path_url(shard_uri: str, path: str) -> str:
    """Where a Hugging Face `{bytes: null, path}` image is, as `datasets` reads it: a URL or an absolute path as it
    is (through fsspec), a relative path against the directory of the Parquet file. Chained URLs are refused."""
    if "::" in path:
        raise ValueError(f"path: expected a URL or a file path, got a chained URL {path!r}")
    if "://" in path or path.startswith("/"):
        return path
    protocol, parent = fsspec.core.split_protocol(shard_uri.rsplit("/", 1)[0])
    joined = posixpath.normpath(posixpath.join(parent, path))
    return f"{protocol}://{joined}" if protocol else joined


def _read_image_paths(shard_uri: str, paths: list[str]) -> dict[str, bytes | str]:
    """{path: its bytes, or why they cannot be read}. One batched read per filesystem (s3fs: concurrent GETs)."""
    out: dict[str, bytes | str] = {}
    by_fs: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[str, str]]]] = {}
    for p in dict.fromkeys(paths):
        try:
            fs, fs_path = _url_to_fs(_image_path_url(shard_uri, p))
        except Exception as e:  # an unknown protocol, a chained URL
            out[p] = f"{type(e).__name__}: {e}"
            continue
        by_fs.setdefault(id(fs), (fs, []))[1].append((p, fs_path))
    for fs, items in by_fs.values():
        got = fs.cat_ranges([fs_path for _, fs_path in items], None, None, on_error="return")
        for (p, _), data in zip(items, got, strict=True):
            out[p] = data if isinstance(data, bytes) else _path_error(data)
    return out


def _path_error(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such file"
    return f"{type(e).__name__}: {e}"


def _iter_folder(uri: str) -> Iterator[Record]:
    fs, path = _url_to_fs(uri)
    try:
        entries = fs.ls(path, detail=True)
    except Exception as e:
        raise _open_error(uri, e) from e
    names = sorted(
        posixpath.basename(e["name"].rstrip("/")) for e in entries
        if e.get("type") == "file" and not _ignored(posixpath.basename(e["name"]))
        and _is_image_name(posixpath.basename(e["name"]))
    )
    for name in names:
        try:
            data = fs.cat_file(f"{path.rstrip('/')}/{name}")
        except Exception as e:  # one unreadable file is one bad image, not a bad shard
            yield Record(name, None, redact(f"read_error: {type(e).__name__}: {e}"))
            continue
        yield Record(name, data)


def iter_examples(url: str) -> Iterator[tuple[str, str, bytes]]:
    """Few-shot examples: (label, file name, bytes) for each image file in each sub-folder of `url`, the
    sub-folder's name being the label; sorted, names starting with '_' or '.' ignored."""
    fs, path = _url_to_fs(url)
    try:
        folders = sorted(e["name"].rstrip("/") for e in fs.ls(path, detail=True) if e.get("type") == "directory")
    except Exception as e:
        raise SourceError(f"examples: expected a folder of label sub-folders, got {_redact(url)!r}: "
                          f"{redact(str(e))}") from e
    folders = [f for f in folders if not _ignored(posixpath.basename(f))]
    if not folders:
        raise SourceError(f"examples: expected one sub-folder of images per label in {_redact(url)!r}, got none")
    for folder in folders:
        label = posixpath.basename(folder)
        for rec in _iter_folder(fs.unstrip_protocol(folder)):
            if rec.data is not None:
                yield label, rec.key, rec.data


# ---------------------------------------------------------------------------------------------------------
# writing (tests, demo, benchmarks)


def _open_for_write(path_or_url: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(fs, path to write, final path). Local files are written under a '.'-name, then renamed into place,
    so a concurrent list_shards never sees half a file; object stores publish a put atomically already."""
    fs, path = _url_to_fs(path_or_url)
    if isinstance(fs, LocalFileSystem):
        parent, base = posixpath.split(path)
        fs.makedirs(parent, exist_ok=True)
        return fs, posixpath.join(parent, f".{base}.partial"), path
    return fs, path, path


@contextlib.contextmanager
def _publish(fs: fsspec.AbstractFileSystem, tmp: str, final: str) -> Iterator[Any]:
    """Open `tmp` for writing; on success move it to `final`, on failure remove it."""
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        if tmp != final:
            fs.mv(tmp, final)
    except BaseException:
        if tmp != final and fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_webdataset(path_or_url: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write a WebDataset tar (gzip when the name ends .gz/.tgz): members '<key>.<ext>'. Returns samples written."""
    fs, tmp, final = _open_for_write(path_or_url)
    mode = "w|gz" if final.endswith((".gz", ".tgz")) else "w|"
    count = 0
    with _publish(fs, tmp, final) as f, tarfile.open(fileobj=f, mode=mode, format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0  # same samples, same members (gzip adds its own timestamp)
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def write_image_parquet(path_or_url: str, rows: Iterable[tuple[str, bytes | None]], hf_layout: bool = False,
                        row_group_size: int = 256) -> int:
    """Write images as parquet: columns (key: string, image: binary), or with `hf_layout` one column
    image: struct<bytes: binary, path: string> as Hugging Face `datasets` writes it (path = key).
    Returns rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    keys = [k for k, _ in rows]
    blobs = pa.array([b for _, b in rows], type=pa.binary())
    if hf_layout:
        image = pa.StructArray.from_arrays([blobs, pa.array(keys, type=pa.string())], names=["bytes", "path"])
        features = {"info": {"features": {"image": {"_type": "Image"}}}}
        table = pa.table({"image": image}).replace_schema_metadata({"huggingface": json.dumps(features)})
    else:
        table = pa.table({"key": pa.array(keys, type=pa.string()), "image": blobs})
    fs, tmp, final = _open_for_write(path_or_url)
    with _publish(fs, tmp, final) as f:
        pq.write_table(table, f, row_group_size=row_group_size)
    return len(rows)

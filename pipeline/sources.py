"""Shard formats: find shards under any fsspec URL and stream (key, image bytes) records out of them.

Three formats, one record shape:
- webdataset: a .tar / .tar.gz / .tgz whose members are grouped into samples by key (dirname + basename up
  to the first dot); the sample's image is the member with an image extension. Read as a stream ('r|*'):
  never extracted to disk, never held in memory whole.
- parquet: one row per image, read row group by row group; the image is a binary column or a Hugging Face
  `Image` struct {bytes, path}.
- folder: a directory that directly holds image files; each file is one record keyed by its file name.

A record that cannot be an image (no image member, null bytes, a link or an unsafe member name, a duplicate
key) is a `Record` with `error` set, never an exception: one bad image never fails a shard. A shard that cannot
be read to the end (truncated or corrupt tar, unreadable parquet, missing file) raises `ShardError`, but only
after yielding every record read before the failure; so does a shard read to its end that held unsafe members
or duplicate keys (a shard-level summary of those error records). `ShardError.message` starts with a code:

    missing, unavailable                      the shard could not be reached: worth retrying in a later run
    truncated, corrupt, bad_schema,           the shard's content is broken: retrying gives the same answer
    bad_member, duplicate_key, read_error

Keys are data, never paths: nothing is extracted, and member names are only compared and hashed.
Credentials come from the environment only and never appear in messages (`config.redact`).

This module reads and writes bytes; it does not decode images and does not import ray or other stages.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import IMAGE_EXTENSIONS, INPUT_FORMATS, RETRYABLE_SHARD_CODES, redact

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
    format: str  # webdataset | parquet | folder
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
    raise SourceError(f"shard.format: expected one of webdataset, parquet, folder, got {shard.format!r}")


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
    __slots__ = ("key", "exts", "image", "image_exact", "link", "unsafe")

    def __init__(self, key: str):
        self.key = key
        self.exts: list[str] = []
        self.image: bytes | None = None
        self.image_exact = False  # the image member's whole extension is an image extension ("jpg", not "seg.jpg")
        self.link: str | None = None  # an image-named symlink/hardlink member
        self.unsafe: str | None = None  # a member name that is absolute or climbs out with '..'

    def record(self) -> Record:
        if self.unsafe is not None:
            return Record(self.key, None, f"bad_member: unsafe member name {self.unsafe[:200]!r} "
                                          "(absolute or '..' path)")
        if self.image is not None:
            return Record(self.key, self.image)
        if self.link is not None:
            return Record(self.key, None, f"bad_member: image member {self.link} is a link, not a regular file")
        got = ", ".join(e or "''" for e in self.exts) or "nothing"
        return Record(self.key, None, f"no_image: sample has no member with an image extension (got {got})")


def _iter_webdataset(uri: str) -> Iterator[Record]:
    fs, path = _url_to_fs(uri)
    try:
        f = fs.open(path, "rb", block_size=READ_BLOCK_SIZE, cache_type="readahead")
    except Exception as e:
        raise _open_error(uri, e) from e
    seen: set[str] = set()
    problems = _Problems()
    current: _Sample | None = None
    members = 0
    fatal: ShardError | None = None
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|*", bufsize=TAR_BUFSIZE, tarinfo=_TarInfo)
            for member in tar:
                members += 1
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                key, ext = _split_member(name)
                if not (member.isfile() or member.issym() or member.islnk()):
                    continue  # directories, devices, fifos: not part of any sample
                if current is None or key != current.key:
                    if current is not None:
                        yield problems.add(_finish(current, seen))
                    current = _Sample(key)
                current.exts.append(ext)
                if _unsafe_name(name):
                    current.unsafe = current.unsafe or name
                    continue
                last = ext.rsplit(".", 1)[-1].lower()
                if last not in IMAGE_EXTENSIONS:
                    continue  # not read: tarfile skips its data when it advances
                if not member.isfile():
                    current.link = current.link or name
                    continue
                exact = ext.lower() in IMAGE_EXTENSIONS
                if current.image is None or (exact and not current.image_exact):
                    fobj = tar.extractfile(member)
                    assert fobj is not None  # regular member
                    current.image = fobj.read()
                    current.image_exact = exact
            stop = getattr(tar, "_vitlabel_stop", None)
            if isinstance(stop, tarfile.InvalidHeaderError):
                fatal = ShardError(uri, f"corrupt: bad tar header after {members} members ({stop})")
            elif not isinstance(stop, tarfile.EOFHeaderError):  # empty or short header: the file just stops
                fatal = ShardError(uri, f"truncated: tar ends after {members} members without an end-of-archive "
                                        "marker")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            if isinstance(e, EOFError) or "unexpected end" in str(e):
                code = "truncated"
            elif isinstance(e, (tarfile.TarError, zlib.error, gzip.BadGzipFile)):
                code = "corrupt"
            else:
                code = "unavailable" if _unavailable(e) else "read_error"
            problem = problems.summary()
            also = f" (before it: {problem})" if problem else ""
            raise ShardError(uri, f"{code}: tar unreadable after {members} members: {e}{also}") from e
    if fatal is None and current is not None:  # the last sample is complete only if the archive ended properly
        yield problems.add(_finish(current, seen))
    problem = problems.summary()
    if fatal is not None:
        raise ShardError(fatal.uri, fatal.message + (f" (before it: {problem})" if problem else ""))
    if problem:
        raise ShardError(uri, problem)


def _finish(sample: _Sample, seen: set[str]) -> Record:
    """A key that comes back after other keys is a second sample with the same key: an error row with its own id."""
    if sample.key in seen:
        id_key = _unique_id_key(sample.key, seen)
        seen.add(id_key)
        return Record(sample.key, None, "duplicate_key: an earlier sample in this shard has the same key", id_key)
    seen.add(sample.key)
    return sample.record()


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
            pf = pq.ParquetFile(f)
        except Exception as e:  # not parquet, or I/O: the whole shard is unusable
            code = "unavailable" if _unavailable(e) else "corrupt"
            raise ShardError(uri, f"{code}: parquet unreadable: {type(e).__name__}: {e}") from e
        try:
            image_col, is_struct = _image_column(pf.schema_arrow, image_column)
            keys = _parquet_keys(pf, image_col, is_struct, key_column)
        except Exception as e:  # wrong or missing columns (or I/O reading the key column)
            code = "unavailable" if _unavailable(e) else "bad_schema"
            raise ShardError(uri, f"{code}: parquet unreadable: {type(e).__name__}: {e}") from e
        seen: set[str] = set()
        problems = _Problems()
        row = 0
        for rg in range(pf.metadata.num_row_groups):
            try:
                column = pf.read_row_group(rg, columns=[image_col]).column(0).combine_chunks()
                values = (column.field("bytes") if is_struct else column).to_pylist()
                if is_struct:  # a null struct means no image, whatever its bytes field says
                    valid = column.is_valid().to_pylist()
                    values = [v if ok else None for v, ok in zip(values, valid, strict=True)]
            except Exception as e:
                code = "unavailable" if _unavailable(e) else "corrupt"
                problem = problems.summary()
                also = f" (before it: {problem})" if problem else ""
                raise ShardError(uri, f"{code}: parquet row group {rg} unreadable after {row} rows: "
                                      f"{type(e).__name__}: {e}{also}") from e
            for data in values:
                key = keys[row]
                row += 1
                if key in seen:
                    id_key = _unique_id_key(key, seen)
                    seen.add(id_key)
                    yield problems.add(Record(key, None, "duplicate_key: an earlier row in this shard has the same key",
                                              id_key))
                    continue
                seen.add(key)
                if data is None:
                    yield Record(key, None, "no_image: null bytes")
                else:
                    yield Record(key, data)
    problem = problems.summary()
    if problem:
        raise ShardError(uri, problem)


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

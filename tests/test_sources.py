"""Shard formats over local disk and a real (moto) S3 server: listing, records, broken shards, streaming."""

from __future__ import annotations

import bz2
import gzip
import inspect
import io
import lzma
import os
import pickle
import random
import tarfile
from functools import cache
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _libshards import hf_parquet, put, remove, storage_options, wds_write
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from pipeline import sources
from pipeline.config import INTEGRITY_FAILED, UNTRUSTED_ROW_CODE
from pipeline.schema import FORMAT_COLUMN, MARKER_COLUMN, READ_COLUMNS
from pipeline.sources import (
    Record,
    Shard,
    ShardError,
    SourceError,
    _redact,
    iter_shard,
    list_shards,
    make_image_id,
    read_rows,
    write_image_parquet,
    write_webdataset,
)

BUCKET = "test-bucket"


@cache
def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", (8, 6), ((40 * i) % 256, (90 * i) % 256, (10 + 7 * i) % 256))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def wds_samples(n: int = 4) -> list[tuple[str, dict[str, bytes]]]:
    """Alternating PNG / JPEG samples with a label member, keys with a directory part."""
    out = []
    for i in range(n):
        ext, fmt = ("png", "PNG") if i % 2 == 0 else ("jpg", "JPEG")
        out.append((f"part/{i:04d}", {ext: image_bytes(i, fmt), "cls": str(i).encode()}))
    return out


def expected(samples: list[tuple[str, dict[str, bytes]]]) -> list[Record]:
    return [Record(k, next(v for e, v in m.items() if e in ("png", "jpg"))) for k, m in samples]


def parquet_rows(n: int = 5) -> list[tuple[str, bytes]]:
    return [(f"img-{i:03d}.png", image_bytes(i)) for i in range(n)]


def read_all(shard: Shard, **kw) -> list[Record]:
    return list(iter_shard(shard, **kw))


def read_until_error(shard: Shard) -> tuple[list[Record], ShardError | None]:
    got: list[Record] = []
    try:
        for r in iter_shard(shard):
            got.append(r)
    except ShardError as e:
        return got, e
    return got, None


def raw_tar(path: Path, members: list[tuple[str, bytes | None, bytes]]) -> None:
    """Members (name, data, tar type) written by hand, for links and directories."""
    with tarfile.open(path, "w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "elsewhere.png"
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


# --------------------------------------------------------------------------------------------------------
# ids and records


def test_make_image_id_is_stable_and_short():
    a = make_image_id("s3://b/x.tar", "part/0001")
    assert a == make_image_id("s3://b/x.tar", "part/0001")
    assert len(a) == 32 and int(a, 16) >= 0
    assert a != make_image_id("s3://b/x.tar", "part/0002")
    assert a != make_image_id("s3://b/y.tar", "part/0001")


def test_errors_pickle_and_redact():
    e = pickle.loads(pickle.dumps(ShardError("s3://b/x.tar", "read_error: boom")))
    assert isinstance(e, ShardError) and e.uri == "s3://b/x.tar" and str(e) == "s3://b/x.tar: read_error: boom"
    assert _redact("s3://AKIA:secret@bucket/key") == "s3://bucket/key"
    assert "secret" not in str(ShardError("s3://AKIA:secret@bucket/key", "x"))


# --------------------------------------------------------------------------------------------------------
# each format, local and S3, gives the same records


@pytest.mark.parametrize("name", ["shard.tar", "shard.tar.gz", "shard.tgz"])
def test_webdataset_local_and_s3_same_records(tmp_path, s3, name):
    samples = wds_samples(5)
    assert write_webdataset(str(tmp_path / name), samples) == 5
    assert write_webdataset(f"s3://{BUCKET}/wds/{name}", samples) == 5

    [local] = list_shards(str(tmp_path))
    [remote] = list_shards(f"s3://{BUCKET}/wds/")
    assert local == Shard(f"file://{tmp_path}/{name}", "webdataset", (tmp_path / name).stat().st_size)
    assert remote.uri == f"s3://{BUCKET}/wds/{name}" and remote.format == "webdataset" and remote.size == local.size
    assert read_all(local) == read_all(remote) == expected(samples)


@pytest.mark.parametrize("hf_layout", [False, True])
def test_parquet_local_and_s3_same_records(tmp_path, s3, hf_layout):
    rows = parquet_rows(5)
    write_image_parquet(str(tmp_path / "p.parquet"), rows, hf_layout, row_group_size=2)  # 3 row groups
    s3.upload_file(str(tmp_path / "p.parquet"), BUCKET, "pq/p.parquet")  # uploaded with boto3 this time

    [local] = list_shards(str(tmp_path / "*.parquet"))
    [remote] = list_shards(f"s3://{BUCKET}/pq")
    assert pq.ParquetFile(tmp_path / "p.parquet").metadata.num_row_groups == 3
    assert local.format == remote.format == "parquet" and remote.uri == f"s3://{BUCKET}/pq/p.parquet"
    assert read_all(local) == read_all(remote) == [Record(k, b) for k, b in rows]


def test_folder_local_and_s3_same_records(tmp_path, s3):
    files = {"b.png": image_bytes(1), "a.jpg": image_bytes(2, "JPEG"), "c.PNG": image_bytes(3)}
    d = tmp_path / "imgs"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
        s3.put_object(Bucket=BUCKET, Key=f"imgs/{name}", Body=data)
    for extra, data in {"notes.txt": b"hi", "_skip.png": b"x", ".hidden.png": b"x"}.items():
        (d / extra).write_bytes(data)
        s3.put_object(Bucket=BUCKET, Key=f"imgs/{extra}", Body=data)

    [local] = list_shards(str(d))
    [remote] = list_shards(f"s3://{BUCKET}/imgs", "folder")
    assert local == Shard(f"file://{d}", "folder", sum(len(v) for v in files.values()))
    assert remote == Shard(f"s3://{BUCKET}/imgs", "folder", local.size)
    want = [Record(k, files[k]) for k in sorted(files)]
    assert read_all(local) == read_all(remote) == want


# --------------------------------------------------------------------------------------------------------
# listing


@pytest.fixture()
def tree(tmp_path) -> Path:
    """root/{a/0.tar, a/1.tar.gz, b/2.tgz, c.parquet, imgs/x.png, imgs/sub/y.jpg} plus things to ignore."""
    root = tmp_path / "root"
    one = [("k", {"png": image_bytes(0)})]
    for rel in ["a/0.tar", "a/1.tar.gz", "b/2.tgz", "_staging/s.tar", ".cache/h.tar", "a/.partial.tar"]:
        write_webdataset(str(root / rel), one)
    write_image_parquet(str(root / "c.parquet"), parquet_rows(2), False)
    write_image_parquet(str(root / "_manifests/m.parquet"), parquet_rows(2), False)
    (root / "imgs/sub").mkdir(parents=True)
    (root / "imgs/x.png").write_bytes(image_bytes(1))
    (root / "imgs/sub/y.jpg").write_bytes(image_bytes(2, "JPEG"))
    (root / "notes.txt").write_text("not a shard")
    return root


def names(shards: list[Shard], root: Path) -> list[tuple[str, str]]:
    return [(s.uri.removeprefix(f"file://{root}/"), s.format) for s in shards]


def test_prefix_lists_every_kind_sorted_and_skips_underscore_and_dot(tree):
    assert names(list_shards(str(tree)), tree) == [
        ("a/0.tar", "webdataset"), ("a/1.tar.gz", "webdataset"), ("b/2.tgz", "webdataset"),
        ("c.parquet", "parquet"), ("imgs", "folder"), ("imgs/sub", "folder"),
    ]
    assert names(list_shards(str(tree), "webdataset"), tree) == [
        ("a/0.tar", "webdataset"), ("a/1.tar.gz", "webdataset"), ("b/2.tgz", "webdataset")]
    assert names(list_shards(str(tree), "parquet"), tree) == [("c.parquet", "parquet")]
    assert names(list_shards(str(tree), "folder"), tree) == [("imgs", "folder"), ("imgs/sub", "folder")]
    assert list_shards(str(tree)) == list_shards(f"file://{tree}/")  # deterministic, URL or path


def test_globs_select_matching_shards(tree):
    assert names(list_shards(f"{tree}/a/*.tar"), tree) == [("a/0.tar", "webdataset")]
    assert names(list_shards(f"{tree}/**/*.tar"), tree) == [("a/0.tar", "webdataset")]  # not _staging, .cache
    assert names(list_shards(f"{tree}/*/*.t*"), tree) == [
        ("a/0.tar", "webdataset"), ("a/1.tar.gz", "webdataset"), ("b/2.tgz", "webdataset")]
    assert names(list_shards(f"{tree}/**/*.parquet"), tree) == [("c.parquet", "parquet")]
    assert names(list_shards(f"{tree}/[ab]"), tree) == [  # a matched directory stands for its files
        ("a/0.tar", "webdataset"), ("a/1.tar.gz", "webdataset"), ("b/2.tgz", "webdataset")]
    assert names(list_shards(f"{tree}/_staging/*.tar"), tree) == [("_staging/s.tar", "webdataset")]  # named


def test_single_file_and_relative_paths(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    [s] = list_shards("root/a/0.tar")
    assert s.uri == f"file://{tree}/a/0.tar" and s.format == "webdataset" and s.size > 0
    assert names(list_shards("root/b"), tree) == [("b/2.tgz", "webdataset")]
    assert names(list_shards("root/*.parquet"), tree) == [("c.parquet", "parquet")]
    (tree / "shard.bin").write_bytes((tree / "a/0.tar").read_bytes())
    [s] = list_shards("root/shard.bin", "webdataset")  # a named file with an explicit format is trusted
    assert read_all(s) == [Record("k", image_bytes(0))]


def test_s3_globs_and_prefixes(s3):
    one = [("k", {"jpg": image_bytes(0, "JPEG")})]
    for key in ["d/2024/a.tar", "d/2024/b.tar", "d/2025/c.tar", "d/_staging/x.tar", "d/2025/.tmp.tar"]:
        write_webdataset(f"s3://{BUCKET}/{key}", one)
    s3.put_object(Bucket=BUCKET, Key="d/readme.md", Body=b"x")
    uris = lambda shards: [s.uri.removeprefix(f"s3://{BUCKET}/") for s in shards]
    assert uris(list_shards(f"s3://{BUCKET}/d")) == ["d/2024/a.tar", "d/2024/b.tar", "d/2025/c.tar"]
    assert uris(list_shards(f"s3://{BUCKET}/d/2024/*.tar")) == ["d/2024/a.tar", "d/2024/b.tar"]
    assert uris(list_shards(f"s3://{BUCKET}/d/**/c.tar")) == ["d/2025/c.tar"]
    assert uris(list_shards(f"s3://{BUCKET}/d/2025/c.tar")) == ["d/2025/c.tar"]


def test_nothing_matches_is_a_clear_source_error(tmp_path, s3):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only.txt").write_text("x")
    for url in [str(tmp_path / "empty"), str(tmp_path / "missing"), f"{tmp_path}/*.tar", str(tmp_path),
                f"s3://{BUCKET}/nothing/", f"s3://{BUCKET}/nothing/*.tar"]:
        with pytest.raises(SourceError, match=r"^input: expected shards matching .*, got none at ") as err:
            list_shards(url)
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(err.value)
    with pytest.raises(SourceError, match="expected a .tar"):
        list_shards(str(tmp_path / "only.txt"))
    with pytest.raises(SourceError, match="input_format: expected one of"):
        list_shards(str(tmp_path), "zip")


# --------------------------------------------------------------------------------------------------------
# webdataset details and broken shards


def test_webdataset_sample_rules(tmp_path):
    png, jpg = image_bytes(1), image_bytes(2, "JPEG")
    raw_tar(tmp_path / "s.tar", [
        ("./dir/", None, tarfile.DIRTYPE),  # skipped
        ("./dir/a.seg.png", png, tarfile.REGTYPE),  # "./" stripped; image by last extension
        ("./dir/a.JPG", jpg, tarfile.REGTYPE),  # a second image member: each is a record, keyed <key>.<ext>
        ("b.json", b"{}", tarfile.REGTYPE),  # no image member
        ("b.cls", b"1", tarfile.REGTYPE),
        ("c.png", None, tarfile.SYMTYPE),  # link as image: error, never followed
        ("d.txt", b"x", tarfile.REGTYPE),
        ("d.png", None, tarfile.LNKTYPE),
        ("e.png", png, tarfile.REGTYPE),
        ("noext", b"x", tarfile.REGTYPE),
        ("e.png", jpg, tarfile.REGTYPE),  # key e again after another key: second sample, same key
    ])
    [shard] = list_shards(str(tmp_path))
    got, err = read_until_error(shard)  # every record, then a shard-level summary of the bad ones
    assert err is not None and err.code == "bad_member" and not err.retryable
    assert "2 unsafe or link member(s)" in err.message and "1 duplicate key(s) (first: 'e')" in err.message
    assert [r.key for r in got] == ["dir/a.seg.png", "dir/a.JPG", "b", "c", "d", "e", "noext", "e"]
    assert got[:2] == [Record("dir/a.seg.png", png), Record("dir/a.JPG", jpg)]
    got = got[1:]
    assert got[1].data is None and got[1].error.startswith("no_image: ") and "json, cls" in got[1].error
    assert got[2].data is None and got[2].error.startswith("bad_member: ")
    assert got[3].data is None and got[3].error.startswith("bad_member: ")
    assert got[4] == Record("e", png)
    assert got[5].error.startswith("no_image: ")
    assert got[6].data is None and got[6].error.startswith("duplicate_key: ")
    assert got[6].image_id(shard.uri) != got[4].image_id(shard.uri) == make_image_id(shard.uri, "e")  # own id
    assert all(r.error is None or r.error.split(": ", 1)[0].isidentifier() for r in got)


def test_webdataset_samples_with_several_images_give_a_record_per_image(input_root):
    """WebDataset groups members by the basename up to its first dot: every image member is one record."""
    img = [image_bytes(i, fmt) for i, fmt in enumerate(["JPEG", "PNG", "WEBP", "JPEG", "PNG"] * 2)]
    wds_write(f"{input_root}/multi.tar", [
        {"__key__": "img", "v2.0001.jpg": img[0], "v2.0002.png": img[1], "v2.0003.webp": img[2], "json": b"{}"},
        {"__key__": "both", "jpg": img[3], "png": img[4], "cls": b"3"},
        {"__key__": "dupB", "jpg": img[5]},
        {"__key__": "dupB", "webp": img[6]},  # the same key again, next to it: one sample with two images
        {"__key__": "dupC", "jpg": img[7]},
        {"__key__": "dupC", "jpg": img[8]},  # the same member name twice (webdataset's reader refuses the tar)
        {"__key__": "one", "png": img[9]},
    ])
    [shard] = list_shards(input_root)
    got, err = read_until_error(shard)
    assert [(r.key, r.data, r.error) for r in got[:-3]] == [
        ("img.v2.0001.jpg", img[0], None), ("img.v2.0002.png", img[1], None), ("img.v2.0003.webp", img[2], None),
        ("both.jpg", img[3], None), ("both.png", img[4], None), ("dupB.jpg", img[5], None),
        ("dupB.webp", img[6], None)]
    assert got[-3] == Record("dupC", img[7]) and got[-1] == Record("one", img[9])
    assert got[-2].key == "dupC" and got[-2].data is None and got[-2].error.startswith("duplicate_key: ")
    assert len({r.image_id(shard.uri) for r in got}) == len(got) == 10  # every image member, each its own id
    assert err is not None and err.code == "duplicate_key" and "1 duplicate key(s) (first: 'dupC')" in err.message


def test_truncated_tar_yields_leading_samples_then_raises(tmp_path):
    samples = [(f"{i:03d}", {"png": os.urandom(3000), "cls": b"1"}) for i in range(6)]
    write_webdataset(str(tmp_path / "full.tar"), samples)
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        offsets = {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}

    cuts = {
        "mid_data": offsets["003.png"][1] + 1000,  # inside sample 3's image
        "at_header": offsets["004.png"][0],  # exactly between members: tarfile alone would call this the end
        "mid_header": offsets["004.png"][0] + 100,
    }
    for name, cut in cuts.items():
        (tmp_path / f"{name}.tar").write_bytes(data[:cut])
        got, err = read_until_error(Shard(f"file://{tmp_path}/{name}.tar", "webdataset"))
        assert isinstance(err, ShardError) and err.message.startswith("truncated: "), (name, err)
        assert [r.key for r in got] == ["000", "001", "002"], name
        assert all(r.error is None for r in got)

    at = offsets["004.png"][0]  # a garbled header mid-archive is corruption, not a quiet end of archive
    (tmp_path / "garbled.tar").write_bytes(data[:at] + b"\xff" * 512 + data[at + 512:])
    got, err = read_until_error(Shard(f"file://{tmp_path}/garbled.tar", "webdataset"))
    assert isinstance(err, ShardError) and err.message.startswith("corrupt: ") and len(got) == 3

    write_webdataset(str(tmp_path / "full.tar.gz"), samples)
    gz = (tmp_path / "full.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(gz[: len(gz) * 2 // 3])
    got, err = read_until_error(Shard(f"file://{tmp_path}/cut.tar.gz", "webdataset"))
    assert isinstance(err, ShardError) and err.message.startswith("truncated: ") and 0 < len(got) < 6
    assert [r.key for r in got] == [k for k, _ in samples[: len(got)]]


def noise_samples(n: int = 6, size: int = 3000) -> list[tuple[str, dict[str, bytes]]]:
    """Incompressible members (gzip stores them as they are), the same in every run."""
    rng = random.Random(9)
    return [(f"{i:03d}", {"png": rng.randbytes(size), "cls": b"1"}) for i in range(n)]


COMPRESS = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}


@pytest.mark.parametrize("kind", list(COMPRESS))
def test_compressed_shards_are_read_to_their_end_and_checked(tmp_path, kind):
    """gzip's CRC (bz2's, xz's checks) comes after the tar's end marker: a shard whose check fails is corrupt, with
    the integrity reason that makes the commit turn its rows into error rows, even when every member decoded."""
    samples = noise_samples(size=64 * 1024)  # whole deflate blocks of noise: stored
    write_webdataset(str(tmp_path / "plain.tar"), samples)
    packed = COMPRESS[kind]((tmp_path / "plain.tar").read_bytes())
    want = [Record(k, m["png"]) for k, m in samples]

    (tmp_path / "good.tar").write_bytes(packed)
    assert read_until_error(Shard(f"file://{tmp_path}/good.tar", "webdataset")) == (want, None)

    damaged = {"middle": bytearray(packed)}
    damaged["middle"][len(packed) // 2] ^= 0x55
    if kind == "gzip":  # a byte of a stored member, and the CRC itself: both decode without an error
        at = packed.index(samples[3][1]["png"][30000:30064]) + 10
        damaged["member"] = bytearray(packed)
        damaged["member"][at] ^= 0x55
        damaged["crc"] = bytearray(packed)
        damaged["crc"][-8] ^= 0x55
    for name, data in damaged.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
        got, err = read_until_error(Shard(f"file://{tmp_path}/{name}.tar", "webdataset"))
        assert err is not None and err.code == "corrupt" and err.message.startswith(INTEGRITY_FAILED), (name, err)
        assert kind in err.message and UNTRUSTED_ROW_CODE in err.message
        assert [r.key for r in got] == [k for k, _ in samples[: len(got)]]
        if name != "middle":
            assert len(got) == 6 and (got == want) == (name == "crc")  # the member's damage went unseen


def test_tar_header_checksums_are_checked(tmp_path):
    """tarfile checks each header's checksum; a bad one ends the read as `corrupt`, also inside an intact gzip."""
    samples = noise_samples()
    write_webdataset(str(tmp_path / "full.tar"), samples)
    data = bytearray((tmp_path / "full.tar").read_bytes())
    with tarfile.open(tmp_path / "full.tar") as tar:
        at = next(m.offset for m in tar.getmembers() if m.name == "004.png")
    data[at + 2] ^= 0x01  # one bit of the member's name: its header no longer matches its checksum
    (tmp_path / "bad.tar").write_bytes(data)
    (tmp_path / "bad.tar.gz").write_bytes(gzip.compress(bytes(data)))
    for name in ("bad.tar", "bad.tar.gz"):
        got, err = read_until_error(Shard(f"file://{tmp_path}/{name}", "webdataset"))
        assert err is not None and err.message.startswith("corrupt: bad tar header after 8 members (bad checksum"), err
        assert [r.key for r in got] == ["000", "001", "002"] and all(r.error is None for r in got)


def test_parquet_page_checksums_are_verified(tmp_path):
    """A page whose CRC does not match ends the read as `corrupt`; without page CRCs the damage goes unseen."""
    rows = [(f"k{i}", image_bytes(i)) for i in range(8)]
    for checksums in (True, False):
        table = pa.table({"key": [k for k, _ in rows], "image": [b for _, b in rows]})
        path = tmp_path / f"crc-{checksums}.parquet"
        pq.write_table(table, path, row_group_size=2, write_page_checksum=checksums, compression="none",
                       use_dictionary=False)
        chunk = pq.ParquetFile(path).metadata.row_group(2).column(1)
        data = bytearray(path.read_bytes())
        data[chunk.data_page_offset + chunk.total_compressed_size - 30] ^= 0x55  # inside the last image's bytes
        path.write_bytes(data)
        got, err = read_until_error(Shard(f"file://{path}", "parquet"))
        if checksums:
            assert [r.key for r in got] == ["k0", "k1", "k2", "k3"] and all(r.data for r in got)
            assert err is not None and err.message.startswith("corrupt: parquet row group 2 unreadable after 4 rows")
            assert "CRC" in err.message
        else:
            assert err is None and len(got) == 8 and got[5].data != rows[5][1]
    key_chunk = pq.ParquetFile(tmp_path / "crc-True.parquet").metadata.row_group(1).column(0)
    data = bytearray((tmp_path / "crc-True.parquet").read_bytes())
    data[key_chunk.data_page_offset + key_chunk.total_compressed_size - 2] ^= 0x55  # a key: read before any image
    (tmp_path / "crc-True.parquet").write_bytes(data)
    got, err = read_until_error(Shard(f"file://{tmp_path}/crc-True.parquet", "parquet"))
    assert got == [] and err is not None and err.code == "corrupt" and "CRC" in err.message


def test_unreadable_shards_raise_shard_error(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive at all" * 40)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nope")
    for shard in [Shard(f"file://{tmp_path}/junk.tar", "webdataset"),
                  Shard(f"file://{tmp_path}/junk.parquet", "parquet"),
                  Shard(f"file://{tmp_path}/gone.tar", "webdataset"),
                  Shard(f"file://{tmp_path}/gone.parquet", "parquet"),
                  Shard(f"file://{tmp_path}/gone", "folder")]:
        got, err = read_until_error(shard)
        assert got == [] and isinstance(err, ShardError) and err.uri == shard.uri


def test_read_rows_give_one_row_per_record_then_the_shard_marker(tmp_path):
    """Read rows of a whole, a cut, a missing and an unknown-format shard: every record is one image row, in
    batches of rows_per_batch, and the last row is the marker counting them, with the format and shard error."""
    samples = [(f"{i:03d}", {"png": image_bytes(i)}) for i in range(5)]
    write_webdataset(str(tmp_path / "full.tar"), samples + [("bad", {"cls": b"1"})])  # "bad": a no_image record
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        (tmp_path / "cut.tar").write_bytes(data[:tar.getmember("003.png").offset_data + 10])

    def rows(name: str, fmt: str = "webdataset") -> tuple[list[int], list[dict]]:
        shard = Shard(f"file://{tmp_path}/{name}", fmt)
        batches = list(read_rows(shard, rows_per_batch=2))
        assert all(list(b) == list(READ_COLUMNS) for b in batches), name
        out = [{c: b[c][i] for c in READ_COLUMNS} for b in batches for i in range(len(b["key"]))]
        assert all(r["source"] == shard.uri for r in out), name
        return [len(b["key"]) for b in batches], out

    sizes, got = rows("full.tar")
    assert sizes == [2, 2, 2, 1]
    *images, mark = got
    assert [r["key"] for r in images] == [k for k, _ in samples] + ["bad"]
    assert [r["image_id"] for r in images] == [make_image_id(images[0]["source"], r["key"]) for r in images]
    assert [r[MARKER_COLUMN] for r in images] == [-1] * 6 and all(r[FORMAT_COLUMN] is None for r in images)
    assert images[0]["bytes"] == image_bytes(0) and images[0]["error"] is None
    assert images[-1]["bytes"] is None and images[-1]["error"].startswith("no_image: ")
    assert (mark["image_id"], mark["key"], mark[MARKER_COLUMN], mark[FORMAT_COLUMN], mark["error"]) == (
        "", "", 6, "webdataset", None)

    _, got = rows("cut.tar")
    assert [r["key"] for r in got[:-1]] == ["000", "001", "002"] and got[-1][MARKER_COLUMN] == 3
    assert got[-1]["error"].startswith("shard_error: truncated: ")
    for name, fmt, error in (("gone.tar", "webdataset", "shard_error: missing: "),
                             ("full.tar", "zip", "shard_error: read_error: SourceError: shard.format: expected")):
        sizes, got = rows(name, fmt)
        assert sizes == [1] and got[0][MARKER_COLUMN] == 0 and got[0]["error"].startswith(error), (name, got)


def test_tar_is_streamed_not_buffered(tmp_path):
    """The first record arrives after reading a small part of a large tar, through one streaming file object."""
    samples = [(f"{i:04d}", {"png": os.urandom(64 * 1024), "txt": b"t"}) for i in range(128)]  # ~8 MiB
    path = tmp_path / "big.tar"
    write_webdataset(str(path), samples)
    size = path.stat().st_size
    assert size > 4 * sources.TAR_BUFSIZE
    CountingFS.bytes_read = CountingFS.opens = 0

    records = iter_shard(Shard(f"counting://{path}", "webdataset"))
    assert inspect.isgenerator(records) and CountingFS.opens == 0  # nothing read before iteration
    first = next(records)
    assert first == Record("0000", samples[0][1]["png"])
    assert CountingFS.bytes_read <= 2 * sources.TAR_BUFSIZE, (CountingFS.bytes_read, size)
    rest = list(records)
    assert len(rest) == 127 and CountingFS.opens == 1
    assert size - 32 * 1024 <= CountingFS.bytes_read <= size + 64 * 1024


def test_failed_local_write_leaves_nothing_listable(tmp_path):
    def broken():
        yield "a", {"png": image_bytes(0)}
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError):
        write_webdataset(str(tmp_path / "out/a.tar"), broken())
    assert list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------------------------------------
# parquet details


def test_parquet_hf_layout_keys_and_null_bytes(tmp_path):
    rows = [("a.png", image_bytes(1)), ("b.png", None), ("c.png", image_bytes(3)), ("memory::/x.png", None)]
    write_image_parquet(str(tmp_path / "hf.parquet"), rows, hf_layout=True)
    schema = pq.read_schema(tmp_path / "hf.parquet")
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    image = pa.StructArray.from_arrays([pa.array([None, image_bytes(4)], pa.binary()), pa.array([None, None],
                                        pa.string())], names=["bytes", "path"], mask=pa.array([False, True]))
    pq.write_table(pa.table({"image": image}), tmp_path / "nulls.parquet")
    got = read_all(Shard(f"file://{tmp_path}/hf.parquet", "parquet"))  # null bytes: read from the path
    assert got[:3] == [Record("a.png", image_bytes(1)),
                       Record("b.png", None, "read_error: cannot read image path 'b.png': no such file"),
                       Record("c.png", image_bytes(3))]
    assert got[3].error == ("read_error: cannot read image path 'memory::/x.png': ValueError: path: expected a URL "
                            "or a file path, got a chained URL 'memory::/x.png'")
    got = read_all(Shard(f"file://{tmp_path}/nulls.parquet", "parquet"))  # neither bytes nor path; a null struct
    assert got == [Record("000000", None, "no_image: null bytes"), Record("000001", None, "no_image: null bytes")]


def test_hugging_face_parquet_of_image_paths_reads_each_path(input_root, tmp_path, monkeypatch):
    """`Dataset.to_parquet` of a dataset built from image files stores {bytes: null, path}. Each image is read from
    its path as `datasets` reads it: relative against the Parquet file's folder, absolute or a URL through fsspec."""
    url_root = input_root if "://" in input_root else f"file://{input_root}"
    src = tmp_path / "src"  # where the user built the dataset: `datasets` looks at every file as it writes
    for name, data in {"rel.png": image_bytes(2), "url.png": image_bytes(3), "gone.png": image_bytes(4)}.items():
        put(str(src / "_images" / name), data)
        put(f"{input_root}/_images/{name}", data)
    put(str(tmp_path / "elsewhere" / "abs.png"), image_bytes(1))
    paths = [str(tmp_path / "elsewhere" / "abs.png"), "_images/rel.png", f"{url_root}/_images/url.png",
             "_images/../_images/rel.png", "_images/gone.png"]
    monkeypatch.chdir(src)
    hf_parquet(f"{input_root}/hf.parquet", paths)
    with fsspec.open(f"{input_root}/hf.parquet", **storage_options(input_root)) as f:
        assert pq.read_table(f).column("image").to_pylist()[1] == {"bytes": None, "path": "_images/rel.png"}
    remove(f"{input_root}/_images/gone.png")  # deleted after the dataset was written

    [shard] = list_shards(input_root)
    got = read_all(shard)
    assert got[:4] == [Record(paths[0], image_bytes(1)), Record(paths[1], image_bytes(2)),
                       Record(paths[2], image_bytes(3)), Record(paths[3], image_bytes(2))]
    assert got[4:] == [Record(paths[4], None, "read_error: cannot read image path '_images/gone.png': no such file")]


def test_parquet_key_fallbacks(tmp_path):
    img = [image_bytes(i) for i in range(3)]
    # HF struct whose paths repeat: not a key; an `id` column is
    image = pa.StructArray.from_arrays([pa.array(img, pa.binary()), pa.array(["x.png"] * 3)], names=["bytes", "path"])
    pq.write_table(pa.table({"image": image, "id": [7, 8, 9]}), tmp_path / "ids.parquet")
    got = read_all(Shard(f"file://{tmp_path}/ids.parquet", "parquet"))
    assert [r.key for r in got] == ["7", "8", "9"] and [r.data for r in got] == img
    # no key column at all: zero-padded row numbers
    pq.write_table(pa.table({"label": [1, 2, 3], "jpg": pa.array(img, pa.large_binary())}), tmp_path / "n.parquet")
    got = read_all(Shard(f"file://{tmp_path}/n.parquet", "parquet"))
    assert [r.key for r in got] == ["000000", "000001", "000002"] and [r.data for r in got] == img
    # explicit columns; two binary columns without a preferred name need image_column
    pq.write_table(pa.table({"name": ["p", "q", "p"], "a": img, "b": img}), tmp_path / "two.parquet")
    shard = Shard(f"file://{tmp_path}/two.parquet", "parquet")
    with pytest.raises(ShardError, match="image_column"):
        read_all(shard)
    got = []
    with pytest.raises(ShardError, match="^.*: duplicate_key: 1 duplicate key") as e:
        for r in iter_shard(shard, image_column="b", key_column="name"):
            got.append(r)
    assert e.value.code == "duplicate_key" and not e.value.retryable
    assert [r.key for r in got] == ["p", "q", "p"] and got[2].error.startswith("duplicate_key: ")
    assert len({r.image_id(shard.uri) for r in got}) == 3
    with pytest.raises(ShardError, match="key_column"):
        read_all(shard, image_column="a", key_column="nope")


# --------------------------------------------------------------------------------------------------------
# a local filesystem under another protocol that counts what is read


class _CountingFile:
    def __init__(self, f):
        self._f = f

    def read(self, n=-1):
        data = self._f.read(n)
        CountingFS.bytes_read += len(data)
        return data

    def readinto(self, b):
        raise AssertionError("tar reading is expected to use read()")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class CountingFS(LocalFileSystem):
    protocol = ("counting",)
    bytes_read = 0
    opens = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("counting://"))

    def unstrip_protocol(self, name):
        return "counting://" + self._strip_protocol(name)

    def _open(self, path, mode="rb", **kwargs):
        CountingFS.opens += 1
        return _CountingFile(super()._open(path, mode, **kwargs))


fsspec.register_implementation("counting", CountingFS, clobber=True)


def test_shard_error_codes_say_whether_a_later_run_should_retry(tmp_path, s3_faults):
    """Unreachable shards (missing, permission, S3 errors) are retryable; broken content is not."""
    write_webdataset(str(tmp_path / "full.tar"), [(f"{i}", {"png": image_bytes(i)}) for i in range(4)])
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with tarfile.open(tmp_path / "full.tar") as tar:
        cut = tar.getmembers()[2].offset_data + 10
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nope")
    pq.write_table(pa.table({"n": [1]}), tmp_path / "noimage.parquet")
    cases = {
        "gone.tar": ("webdataset", "missing"), "gone.parquet": ("parquet", "missing"), "gone": ("folder", "missing"),
        "junk.tar": ("webdataset", "corrupt"), "cut.tar": ("webdataset", "truncated"),
        "junk.parquet": ("parquet", "corrupt"), "noimage.parquet": ("parquet", "bad_schema"),
    }
    for name, (fmt, code) in cases.items():
        _, err = read_until_error(Shard(f"file://{tmp_path}/{name}", fmt))
        assert err is not None and err.code == code, (name, err)
        assert err.retryable == (code == "missing"), name

    write_webdataset(f"s3://{BUCKET}/d/denied.tar", [("a", {"png": image_bytes(0)})])
    write_image_parquet(f"s3://{BUCKET}/d/denied.parquet", parquet_rows(2))
    s3_faults.add(r"/denied\.", status=403, code="AccessDenied", times=None)
    for name, fmt in (("denied.tar", "webdataset"), ("denied.parquet", "parquet")):
        got, err = read_until_error(Shard(f"s3://{BUCKET}/d/{name}", fmt))
        assert got == [] and err.code == "unavailable" and err.retryable, (name, err)
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(err)


def test_shard_errors_are_redacted(monkeypatch):
    monkeypatch.setenv("VITLABEL_TEST_SECRET", "hunter2-secret-value")
    e = ShardError("s3://AKIA:pw@b/x.tar", "unavailable: OSError: token hunter2-secret-value rejected")
    assert e.message == "unavailable: OSError: token *** rejected" and str(e) == f"s3://b/x.tar: {e.message}"

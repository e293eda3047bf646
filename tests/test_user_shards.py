"""Shards written the way users write them (the `webdataset` library's TarWriter, Hugging Face `datasets`'
to_parquet), labelled through the real plan with the input on local disk and on the moto S3 server: every image
member is exactly one row, and every damaged shard is reported (no row of a shard that failed its integrity check is
labelled).
"""

from __future__ import annotations

import contextlib
import io
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _digits import held_out_pngs
from _libshards import hf_parquet, put, remove, storage_options, wds_write
from PIL import Image

from pipeline import plan
from pipeline.config import JobConfig
from pipeline.table import list_manifests, read_table

Expected = dict[tuple[str, str], str]  # (shard name, key) -> "ok" or the error code of its row
ShardErrors = dict[str, str]  # shard name -> the code of its shard error


@pytest.fixture(scope="module")
def pngs() -> tuple[bytes, ...]:
    return held_out_pngs()


def webdataset_shards(root: str, pngs: tuple[bytes, ...]) -> tuple[Expected, ShardErrors]:
    """Samples with several image members, and the same key written twice in a row."""
    wds_write(f"{root}/multi.tar", [
        {"__key__": "img", "v2.0001.jpg": pngs[0], "v2.0002.png": pngs[1], "v2.0003.webp": pngs[2], "json": b"{}"},
        {"__key__": "both", "jpg": pngs[3], "png": pngs[4], "cls": b"1"},
        {"__key__": "dupB", "jpg": pngs[5]},
        {"__key__": "dupB", "webp": pngs[6]},
        {"__key__": "dupC", "png": pngs[7]},
        {"__key__": "dupC", "png": pngs[8]},
        {"__key__": "one", "png": pngs[9]},
    ])
    keys = ["img.v2.0001.jpg", "img.v2.0002.png", "img.v2.0003.webp", "both.jpg", "both.png", "dupB.jpg",
            "dupB.webp", "dupC", "one"]
    return ({("multi.tar", k): "ok" for k in keys} | {("multi.tar", "dupC#2"): "duplicate_key"},
            {"multi.tar": "duplicate_key"})


def noise_bmps(n: int) -> list[bytes]:
    """BMP images of noise: they decode whatever a damaged byte makes of them, and gzip stores them as they are."""
    rng = random.Random(3)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.frombytes("RGB", (160, 160), rng.randbytes(160 * 160 * 3)).save(buf, format="BMP")
        out.append(buf.getvalue())
    return out


def flip(url: str, locate: Callable[[bytes], int]) -> None:
    """Flip the bits of one byte of a file, at the position `locate` finds in its bytes."""
    with fsspec.open(url, "rb", **storage_options(url)) as f:
        data = bytearray(f.read())
    data[locate(bytes(data))] ^= 0x55
    with fsspec.open(url, "wb", **storage_options(url)) as f:
        f.write(bytes(data))


def in_stored_member(member: bytes) -> Callable[[bytes], int]:
    """A byte of `member` where the compressed file holds it as it is (a stored deflate block)."""
    return lambda data: next(data.index(w) for w in (member[i:i + 64] for i in range(5000, 70000, 3000))
                             if w in data) + 10


def in_page_data(row_group: int, column: int) -> Callable[[bytes], int]:
    """A byte near the end of a Parquet column chunk's (last) data page."""
    def locate(data: bytes) -> int:
        chunk = pq.ParquetFile(pa.BufferReader(data)).metadata.row_group(row_group).column(column)
        return chunk.data_page_offset + chunk.total_compressed_size - 30
    return locate


def damaged_shards(root: str, pngs: tuple[bytes, ...]) -> tuple[Expected, ShardErrors]:
    """A .tar.gz whose compressed data was damaged (the gzip CRC fails, the member still decodes), a tar whose 4th
    member header fails its checksum, a Parquet file (pyarrow, page CRCs on) with a damaged page in row group 1."""
    bmps = noise_bmps(4)
    wds_write(f"{root}/crc.tar.gz", [{"__key__": f"n{i}", "bmp": b} for i, b in enumerate(bmps)])
    flip(f"{root}/crc.tar.gz", in_stored_member(bmps[2]))
    wds_write(f"{root}/header.tar", [{"__key__": f"h{i}", "png": pngs[20 + i]} for i in range(5)])
    flip(f"{root}/header.tar", lambda data: data.index(b"h3.png\x00") + 1)
    table = pa.table({"key": [f"p{i}" for i in range(4)], "image": list(pngs[30:34])})
    with fsspec.open(f"{root}/pages.parquet", "wb", **storage_options(root)) as f:
        pq.write_table(table, f, row_group_size=2, write_page_checksum=True, compression="none", use_dictionary=False)
    flip(f"{root}/pages.parquet", in_page_data(1, 1))
    expected = {("crc.tar.gz", f"n{i}"): "corrupt_shard" for i in range(4)}
    expected |= {("header.tar", f"h{i}"): "ok" for i in range(2)}  # h2 may have members after its image: not read
    expected |= {("pages.parquet", f"p{i}"): "ok" for i in range(2)}
    return expected, {"crc.tar.gz": "corrupt", "header.tar": "corrupt", "pages.parquet": "corrupt"}


def hf_path_shards(root: str, pngs: tuple[bytes, ...], src: Path) -> tuple[Expected, ShardErrors]:
    """`datasets`' to_parquet of images given by path: relative (to the Parquet file), absolute, a URL, and one
    deleted after the dataset was written."""
    names = ["rel.png", "url.png", "gone.png"]
    for name, data in zip(names, pngs[40:], strict=False):
        put(str(src / "_images" / name), data)  # `datasets` looks at each file as it writes
        put(f"{root}/_images/{name}", data)  # '_': not a folder shard of its own
    put(str(src.parent / "abs.png"), pngs[44])
    url = f"{root if '://' in root else 'file://' + root}/_images/url.png"
    paths = [str(src.parent / "abs.png"), "_images/rel.png", url, "_images/gone.png"]
    with contextlib.chdir(src):
        hf_parquet(f"{root}/hf.parquet", paths)
    remove(f"{root}/_images/gone.png")
    return {("hf.parquet", p): "ok" for p in paths[:3]} | {("hf.parquet", paths[3]): "read_error"}, {}


def _outcomes(rows: list[dict]) -> Expected:
    """(shard name, key) -> "ok" or error code; the n-th row of a repeated key is keyed '<key>#<n>'."""
    got: Expected = {}
    seen: Counter[tuple[str, str]] = Counter()
    for r in rows:
        at = (r["source"].rsplit("/", 1)[-1], r["key"])
        seen[at] += 1
        n = seen[at]
        outcome = r["status"] if r["status"] == "ok" else r["error"].split(":", 1)[0]
        got[at if n == 1 else (at[0], f"{at[1]}#{n}")] = outcome
    return got


@pytest.mark.slow
def test_every_image_member_is_one_row(ray_local, input_root, tmp_path, pngs):
    expected, shard_errors = webdataset_shards(input_root, pngs)
    for more, errors in (damaged_shards(input_root, pngs), hf_path_shards(input_root, pngs, tmp_path / "src")):
        expected, shard_errors = expected | more, shard_errors | errors
    out = str(tmp_path / "out")
    layout = "split" if "://" in input_root else "fused"  # both layouts carry every row and marker to the commit
    summary = plan.run(JobConfig(input=input_root, output=out, model="builtin:digits", progress=False,
                                 batch_size=16, preprocess_batch_size=8, layout=layout)).to_dict()

    rows = sorted(read_table(out).to_pylist(), key=lambda r: (r["source"], r["key"], r["status"] != "ok"))
    assert _outcomes(rows) == expected
    assert len({r["image_id"] for r in rows}) == len(rows) == summary["images"] == len(expected)
    errors = {uri.rsplit("/", 1)[-1]: e.removeprefix("shard_error: ").split(":", 1)[0]
              for uri, e in summary["shard_error_list"].items()}
    assert errors == shard_errors
    untrusted = [r for r in rows if r["error"] and r["error"].startswith("corrupt_shard: ")]
    assert untrusted and all(r["label"] is None and "gzip" in r["error"] for r in untrusted)
    formats = {uri.rsplit("/", 1)[-1]: s["format"] for m in list_manifests(out) for uri, s in m["shards"].items()}
    assert formats == {"multi.tar": "webdataset", "crc.tar.gz": "webdataset", "header.tar": "webdataset",
                       "pages.parquet": "parquet", "hf.parquet": "parquet"}

"""Shards written the way users write them (the `webdataset` library's TarWriter), labelled through the real plan
with the input on local disk and on the moto S3 server: every image member is exactly one row, and every
damaged shard is reported.
"""

from __future__ import annotations

from collections import Counter

import pytest
from _digits import held_out_pngs
from _libshards import wds_write

from pipeline import plan
from pipeline.config import JobConfig
from pipeline.table import read_table

Expected = dict[tuple[str, str], str]  # (shard name, key) -> "ok" or the error code of its row


@pytest.fixture(scope="module")
def pngs() -> tuple[bytes, ...]:
    return held_out_pngs()


def webdataset_shards(root: str, pngs: tuple[bytes, ...]) -> Expected:
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
    return {("multi.tar", k): "ok" for k in keys} | {("multi.tar", "dupC#2"): "duplicate_key"}


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


def test_every_image_member_is_one_row(ray_local, input_root, tmp_path, pngs):
    expected = webdataset_shards(input_root, pngs)
    out = str(tmp_path / "out")
    summary = plan.run(JobConfig(input=input_root, output=out, model="builtin:digits", progress=False,
                                 batch_size=16, preprocess_batch_size=8)).to_dict()

    rows = sorted(read_table(out).to_pylist(), key=lambda r: (r["source"], r["key"], r["status"] != "ok"))
    assert _outcomes(rows) == expected
    assert len({r["image_id"] for r in rows}) == len(rows) == summary["images"] == len(expected)
    errors = {uri.rsplit("/", 1)[-1]: e.removeprefix("shard_error: ").split(":", 1)[0]
              for uri, e in summary["shard_error_list"].items()}
    assert errors == {"multi.tar": "duplicate_key"}

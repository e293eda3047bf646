"""Rows as the driver receives them from the plan (image rows + one marker row per shard), and test helpers."""

from __future__ import annotations

import fsspec
import pyarrow as pa

from pipeline.commit import commit
from pipeline.schema import ERROR_VALUES, MARKER_COLUMN, MARKER_STATUS, READ_COLUMNS, marker_row, stream_schema

RUN = "run-1"
MODEL = "vit-test"
DIGEST = "sha256:" + "ab" * 32
DT = "2024-05-01"


def image_rows(source: str, n: int, *, start: int = 0, errors: int = 0, embeddings: bool = False) -> pa.Table:
    """n image rows of `source` (keys start..start+n-1); the last `errors` of them are decode errors."""
    rows = []
    for i in range(start, start + n):
        bad = i >= start + n - errors
        ok = {"status": "ok", "width": 32, "height": 24, "label": f"digit_{i % 10}", "label_id": i % 10, "score": 0.9,
              "topk_labels": [f"digit_{i % 10}", "digit_0", "digit_1"], "topk_ids": [i % 10, 0, 1],
              "topk_scores": [0.9, 0.05, 0.01], "embedding": [float(i)] * 4}
        values = {**ERROR_VALUES, "score": float("nan")} if bad else ok  # the predictor's error rows score NaN
        rows.append({
            "image_id": f"{source}#{i:04d}",
            "source": source,
            "key": f"{i:04d}",
            "error": "decode_error: cannot identify image" if bad else None,
            **values,
            MARKER_COLUMN: -1,
        })
    return pa.Table.from_pylist(rows, schema=stream_schema(embeddings))


def marker(source: str, images: int, error: str | None = None, *, embeddings: bool = False,
           fmt: str | None = "webdataset") -> pa.Table:
    """The one marker row of a shard as the predictor passes it on: the read task's `schema.marker_row` (how many
    images its reader produced, its format, the shard-level error) with no prediction."""
    read = dict(zip(READ_COLUMNS, marker_row(source, fmt, images, error), strict=True))
    row = {**ERROR_VALUES, **read, "status": MARKER_STATUS}
    return pa.Table.from_pylist([row], schema=stream_schema(embeddings))


def shard(source: str, n: int, *, errors: int = 0, shard_error: str | None = None, embeddings: bool = False):
    return pa.concat_tables([image_rows(source, n, errors=errors, embeddings=embeddings),
                             marker(source, n, shard_error, embeddings=embeddings)])


def do_commit(output: str, results: list[dict], expected: list[str], *, commit_id: str = "c-0001",
              digest: str = DIGEST, model: str = MODEL, dt: str = DT, run_id: str = RUN, **kw) -> dict:
    return commit(output=output, run_id=run_id, commit_id=commit_id, model_name=model, model_digest=digest, dt=dt,
                  results=results, expected_shards=expected, config={"top_k": 3, "model": "builtin:digits"},
                  stats={"wall_s": 1.5}, **kw)


def list_files(output: str) -> list[str]:
    """Every file under output, relative to it, sorted."""
    fs, root = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    root = root.rstrip("/")
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return []
    return sorted(p[len(root) + 1:] for p in found)

"""Rows as the plan hands them to the sink (image rows + one marker row per shard), and test helpers."""

from __future__ import annotations

import fsspec
import pyarrow as pa

from pipeline.sink import commit

RUN = "run-1"
MODEL = "vit-test"
DIGEST = "sha256:" + "ab" * 32
DT = "2024-05-01"

_FIELDS = [
    ("image_id", pa.string()),
    ("source", pa.string()),
    ("key", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("label", pa.string()),
    ("label_id", pa.int32()),
    ("score", pa.float32()),
    ("topk_labels", pa.list_(pa.string())),
    ("topk_ids", pa.list_(pa.int32())),
    ("topk_scores", pa.list_(pa.float32())),
]


def input_schema(embeddings: bool = False) -> pa.Schema:
    extra = [("embedding", pa.list_(pa.float32()))] if embeddings else []
    return pa.schema(_FIELDS + extra + [("shard_images", pa.int64())])


def image_rows(source: str, n: int, *, start: int = 0, errors: int = 0, embeddings: bool = False) -> pa.Table:
    """n image rows of `source` (keys start..start+n-1); the last `errors` of them are decode errors."""
    rows = []
    for i in range(start, start + n):
        bad = i >= start + n - errors
        rows.append({
            "image_id": f"{source}#{i:04d}",
            "source": source,
            "key": f"{i:04d}",
            "status": "error" if bad else "ok",
            "error": "decode_error: cannot identify image" if bad else None,
            "width": -1 if bad else 32,
            "height": -1 if bad else 24,
            "label": None if bad else f"digit_{i % 10}",
            "label_id": -1 if bad else i % 10,
            "score": float("nan") if bad else 0.9,
            "topk_labels": [] if bad else [f"digit_{i % 10}", "digit_0", "digit_1"],
            "topk_ids": [] if bad else [i % 10, 0, 1],
            "topk_scores": [] if bad else [0.9, 0.05, 0.01],
            **({"embedding": [float(i)] * 4} if embeddings else {}),
            "shard_images": -1,
        })
    return pa.Table.from_pylist(rows, schema=input_schema(embeddings))


def marker(source: str, images: int, error: str | None = None, *, embeddings: bool = False) -> pa.Table:
    """The one marker row of a shard: how many images its reader produced, and the shard-level error."""
    row = {f: None for f, _ in _FIELDS}
    row.update(image_id="", source=source, key="", error=error, width=-1, height=-1, label_id=-1,
               topk_labels=[], topk_ids=[], topk_scores=[], shard_images=images)
    if embeddings:
        row["embedding"] = None
    return pa.Table.from_pylist([row], schema=input_schema(embeddings))


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

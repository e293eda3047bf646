"""Committed tables with chosen labels and scores, fabricated without a model (write_staging + commit)."""

from __future__ import annotations

import io

import pyarrow as pa
from _sinkrows import DT, marker

from pipeline.commit import commit
from pipeline.schema import MARKER_COLUMN, stream_schema
from pipeline.sources import make_image_id
from pipeline.staging import write_staging

LABELS = ["cat", "dog", "bird", "fish"]


def rows(source: str, items: list[tuple], *, embeddings: bool = False) -> pa.Table:
    """items: (key, label, score) for ok rows, (key, None, None, "code: message") for error rows.

    Returns the image rows followed by the shard's marker row, as the driver receives them from the plan."""
    out = []
    for item in items:
        key, label, score = item[:3]
        error = item[3] if len(item) > 3 else None
        ok = error is None
        runner = LABELS[(LABELS.index(label) + 1) % len(LABELS)] if ok else None
        out.append({
            "image_id": make_image_id(source, key), "source": source, "key": key,
            "status": "ok" if ok else "error", "error": error,
            "width": 64 if ok else -1, "height": 48 if ok else -1,
            "label": label, "label_id": LABELS.index(label) if ok else -1,
            "score": score if ok else float("nan"),
            "topk_labels": [label, runner] if ok else [], "topk_ids": [LABELS.index(label), LABELS.index(runner)]
            if ok else [], "topk_scores": [score, (1 - score) / 2] if ok else [],
            **({"embedding": [0.5] * 4} if embeddings else {}),
            MARKER_COLUMN: -1,
        })
    table = pa.Table.from_pylist(out, schema=stream_schema(embeddings))
    return pa.concat_tables([table, marker(source, len(items), embeddings=embeddings)])


def commit_shards(output: str, shards: dict[str, list[tuple]], *, commit_id: str, run_id: str, model: str,
                  digest: str, dt: str = DT, embeddings: bool = False, seconds: float = 2.0) -> dict:
    """One commit of `shards` ({source: items}) for a model version; returns the manifest."""
    res = write_staging([rows(src, items, embeddings=embeddings) for src, items in shards.items()], output=output,
                        run_id=run_id, model_digest=digest, embeddings=embeddings, staging_id=commit_id)
    images = sum(len(v) for v in shards.values())
    return commit(output=output, run_id=run_id, commit_id=commit_id, model_name=model, model_digest=digest, dt=dt,
                  results=[res], expected_shards=list(shards), config={"top_k": 2, "input_format": "auto"},
                  stats={"seconds": seconds, "images_per_s": images / seconds})


def png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    """A small colourful PNG: a gradient in `colour` with a contrasting disc (so thumbnails are not flat)."""
    from PIL import Image, ImageDraw

    w, h = size
    im = Image.new("RGB", size)
    px = im.load()
    for y in range(h):
        for x in range(w):
            t = (x + y) / (w + h)
            px[x, y] = tuple(int(c * (0.4 + 0.6 * t)) for c in colour)
    d = ImageDraw.Draw(im)
    r = 6 + seed % 9
    cx, cy = (seed * 17) % (w - 2 * r) + r, (seed * 11) % (h - 2 * r) + r
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(255 - c for c in colour))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()

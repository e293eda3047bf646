"""End to end through the real plan: real local Ray, real moto S3 server, the bundled digits model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _digits import png_bytes

from pipeline.config import JobConfig
from pipeline.models import load_model
from pipeline.plan import RunSummary, read_and_preprocess, run
from pipeline.preprocess import decode_image
from pipeline.schema import FORMAT_COLUMN, INPUTS, MARKER_COLUMN, MARKER_STATUS
from pipeline.sources import write_webdataset
from pipeline.table import list_manifests, read_table

COMPARED = ["key", "status", "error", "width", "height", "label", "label_id", "score",
            "topk_labels", "topk_ids", "topk_scores", "model_digest"]


@pytest.fixture(scope="module")
def digit_samples():
    """60 held-out digits in 3 shards, with an undecodable image and a zero-byte image in shard 0."""
    from jobs.train_digits import digits_split

    _, held = digits_split()
    shards: list[list[tuple[str, dict[str, bytes]]]] = [[], [], []]
    truth = {}
    for i, (img, label) in enumerate(held[:60]):
        key = f"d{i:04d}"
        truth[key] = str(label)
        shards[i % 3].append((key, {"png": png_bytes(img), "cls": str(label).encode()}))
    shards[0].append(("broken", {"jpg": b"this is not a jpeg at all"}))
    shards[0].append(("empty", {"png": b""}))
    return shards, truth


def _write_local(root: Path, shards) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n, samples in enumerate(shards):
        write_webdataset(str(root / f"shard-{n:03d}.tar"), samples)
    return root


def _cfg(**kw) -> JobConfig:
    kw.setdefault("dtype", "float32")  # the plain-loop checks compare with fp32: `auto` is bf16 on AMX CPUs
    return JobConfig(model="builtin:digits", progress=False, batch_size=16, preprocess_batch_size=16, **kw)


def _rows(output: str) -> list[dict]:
    rows = read_table(output).to_pylist()
    return sorted(rows, key=lambda r: r["key"])


def test_read_task_gives_every_image_one_row_then_the_marker_and_imports_no_torch(tmp_path, digit_samples):
    """The split layout's CPU task without Ray: one input row per image, each shard ending with its marker (a
    missing shard: the marker alone). Ray's CPU workers import its module to unpickle it: no torch there."""
    shards, _ = digit_samples
    inp = _write_local(tmp_path / "in", shards[:1])
    uris = [(inp / "shard-000.tar").as_uri(), (inp / "gone.tar").as_uri()]
    batch = {"uri": np.array(uris, dtype=object), "format": np.array(["webdataset"] * 2, dtype=object)}
    contract = load_model("builtin:digits").contract
    out = list(read_and_preprocess(batch, image_column="auto", key_column="auto", rows_per_batch=8,
                                   contract=contract, max_pixels=10**6))
    rows = [{k: b[k][i] for k in ("source", "key", "status", "error", MARKER_COLUMN, FORMAT_COLUMN)}
            for b in out for i in range(len(b["key"]))]
    assert [len(b["key"]) for b in out] == [8, 8, 7, 1] and all(INPUTS in b and "bytes" not in b for b in out)
    images, mark, gone = rows[:-2], rows[-2], rows[-1]
    assert [r["key"] for r in images] == [k for k, _ in shards[0]] and {r["source"] for r in images} == {uris[0]}
    assert [r["status"] for r in images].count("ok") == len(images) - 2
    assert {r["key"]: r["error"].split(":")[0] for r in images if r["status"] == "error"} == {
        "broken": "not_an_image", "empty": "empty"}
    assert (mark["status"], mark[MARKER_COLUMN], mark[FORMAT_COLUMN], mark["error"]) == (
        MARKER_STATUS, len(images), "webdataset", None)
    assert (gone["source"], gone[MARKER_COLUMN]) == (uris[1], 0) and gone["error"].startswith("shard_error: missing")

    code = "import sys, pipeline.plan; print(sorted(m for m in ('torch', 'pipeline.predict') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0 and got.stdout.strip() == "[]", got.stderr[-2000:]


@pytest.fixture(scope="module")
def local_run(ray_local, tmp_path_factory, digit_samples) -> tuple[RunSummary, Path, str]:
    """One local run of the digit shards in waves of 2 shards: (summary, input folder, output). Three tests read
    its table (rows against an S3 run's, against a plain torch loop, and the rerun's first run), so the module
    pays for one run instead of three. Its output is read only; the rerun test adds a shard to its input for
    the time of one run."""
    shards, _ = digit_samples
    root = tmp_path_factory.mktemp("local-run")
    inp = _write_local(root / "in", shards)
    out = str(root / "out")
    return run(_cfg(input=str(inp), output=out, wave_shards=2, run_id="wave-run")), inp, out


@pytest.mark.slow
def test_local_and_s3_give_identical_rows(s3, local_run, digit_samples):
    shards, truth = digit_samples
    local, local_in, local_out = local_run
    for n in range(len(shards)):
        s3.upload_file(str(local_in / f"shard-{n:03d}.tar"), "test-bucket", f"shards/shard-{n:03d}.tar")

    remote = run(_cfg(input="s3://test-bucket/shards/", output="s3://test-bucket/table", wave_shards=2))

    n_images = sum(len(s) for s in shards)
    for summary in (local, remote):
        assert summary.counts["images"] == n_images
        assert summary.counts["error"] == 2
        assert summary.counts["shards"] == 3

    a, b = _rows(local_out), _rows("s3://test-bucket/table")
    assert len(a) == len(b) == n_images
    assert len({r["image_id"] for r in a}) == n_images  # one row per image
    assert [{k: r[k] for k in COMPARED} for r in a] == [{k: r[k] for k in COMPARED} for r in b]
    assert all(r["source"].startswith("s3://test-bucket/shards/") for r in b)

    by_key = {r["key"]: r for r in a}
    assert by_key["broken"]["status"] == "error" and by_key["broken"]["error"].startswith("not_an_image")
    assert by_key["empty"]["status"] == "error" and by_key["empty"]["error"].startswith("empty")
    assert by_key["broken"]["label"] is None
    ok = [r for r in a if r["status"] == "ok"]
    assert len(ok) == len(truth)
    accuracy = np.mean([r["label"] == truth[r["key"]] for r in ok])
    assert accuracy >= 0.9, accuracy
    assert all(len(r["topk_ids"]) == 5 and r["topk_ids"][0] == r["label_id"] for r in ok)
    assert all(abs(r["topk_scores"][0] - r["score"]) < 1e-6 for r in ok)


@pytest.mark.slow
def test_top1_equals_plain_torch_loop(local_run, digit_samples):
    import torch

    shards, _ = digit_samples
    rows = {r["key"]: r for r in _rows(local_run[2])}

    bundle = load_model("builtin:digits")
    model = bundle.model.eval()
    checked = 0
    with torch.inference_mode():
        for samples in shards:
            for key, members in samples:
                data = next(iter(members.values()))
                if key in ("broken", "empty"):
                    continue
                tokens, _, _ = decode_image(data, bundle.contract)
                probs = model(torch.from_numpy(tokens)[None]).float().softmax(-1)[0]
                assert rows[key]["label_id"] == int(probs.argmax())
                assert rows[key]["label"] == bundle.labels[int(probs.argmax())]
                assert abs(rows[key]["score"] - float(probs.max())) < 1e-5
                checked += 1
    assert checked == 60


@pytest.mark.slow
def test_rerun_labels_nothing_twice_and_waves_commit_separately(local_run, tmp_path, digit_samples):
    shards, _ = digit_samples
    first, shared_in, shared_out = local_run
    assert [m["commit_id"] for m in first.manifests] == ["wave-run-w0000", "wave-run-w0001"]
    # The shared run's table, copied: its manifests name the shards by their paths, so the input stays where it is.
    out = str(shutil.copytree(shared_out, tmp_path / "out"))
    second = run(_cfg(input=str(shared_in), output=out))
    assert second.shards_skipped == 3 and second.manifests == []
    assert len(list_manifests(out)) == 2
    rows = _rows(out)
    assert len(rows) == sum(len(s) for s in shards)
    assert len({r["image_id"] for r in rows}) == len(rows)
    # A new shard arriving later is the only thing labelled next time (removed after: the input is shared).
    new = shared_in / "shard-100.tar"
    write_webdataset(str(new), shards[1][:5])
    try:
        third = run(_cfg(input=str(shared_in), output=out))
    finally:
        new.unlink()
    assert third.shards_skipped == 3 and third.counts["images"] == 5

"""`vitlabel bench --quick` on tiny sizes: every figure is present and sane (no timing thresholds).

Runs the CLI in a child process: the bench starts and stops its own local Rays and S3 server, which
must not meet the session-wide Ray of the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("bench")
    out = work / "bench.json"
    cmd = [sys.executable, "-m", "jobs.cli", "-q", "bench", "--quick", "--workdir", str(work / "w"), "--out", str(out),
           "--sizes", "48,96", "--compare-size", "96", "--unique-images", "24", "--shard-images", "24",
           "--seconds", "0.5", "--batch-size", "16", "--skip", "all-cpus"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    for k in [k for k in env if k.startswith("AWS_") or k == "RAY_ADDRESS"]:
        env.pop(k)  # the bench sets its own S3 endpoint, and starts its own local Ray
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "end-to-end, local shards" in proc.stdout
    return json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_every_figure_is_present_and_sane(bench_result):
    r = bench_result
    assert r["machine"]["cpus"] >= 1 and r["config"]["model_size"] == "tiny"
    assert r["corpus"]["distinct_photos"] == 24 and 300 <= r["corpus"]["mean_width"] <= 1024
    assert _positive(r["decode"]["images_per_s_per_core"]) and _positive(r["decode"]["ray_docs_images_per_s_per_core"])
    assert _positive(r["model_only"]["bound_images_per_s"]) and _positive(r["model_only"]["all_cpus_images_per_s"])
    for name in ("e2e_local", "e2e_s3", "ray_docs", "plain_loop"):
        v = r["variants"][name]
        assert v["images"] == 96, name
        assert _positive(v["seconds"]) and _positive(v["images_per_s"]), name
        assert _positive(v["peak_rss_mb"]), name
        assert v["peak_pss_mb"] is None or 0 < v["peak_pss_mb"] <= v["peak_rss_mb"], name
    for key in ("e2e_vs_model_bound", "e2e_compare_size_vs_model_bound", "e2e_vs_model_all_cpus",
                "e2e_s3_vs_model_bound", "e2e_vs_ray_docs",
                "e2e_vs_plain_loop", "seconds_per_image_growth", "peak_memory_growth", "steady_e2e_vs_model_bound"):
        assert key in r["ratios"], key
    for key in ("e2e_vs_model_bound", "e2e_vs_ray_docs", "e2e_vs_plain_loop", "peak_memory_growth"):
        assert _positive(r["ratios"][key]), key
    assert set(r["targets"]) == {"e2e >= 0.85 x model-only bound", "e2e >= 1.5 x Ray docs pattern",
                                 "peak memory flat (<= 1.25x from smallest to largest)"}


def test_scaling_rows_cover_every_size(bench_result):
    rows = bench_result["scaling"]
    assert [x["images"] for x in rows] == [48, 96]
    for x in rows:
        assert _positive(x["seconds_per_1k"]) and _positive(x["mb_per_1k_images"]) and _positive(x["images_per_s"])
    assert rows[1] == {**bench_result["variants"]["e2e_local"], **{k: rows[1][k] for k in
                                                                     ("seconds_per_1k", "mb_per_1k_images")}}

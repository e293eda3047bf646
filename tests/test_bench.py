"""`vitlabel bench` (jobs/bench/): every figure is present and sane at tiny sizes (no timing thresholds).

The bench runs as the CLI in a child process: it starts and stops its own local Rays and S3 server, which must
not meet the session-wide Ray of the other tests. Every measured job starts a Ray of its own (about 20 s each
on a 2-core machine, whatever its size), so the sizes are chosen for the fewest jobs: the suite's scaling sizes
are its wave corpus (4 shards of --shard-images) and its compare size, whose default-layout runs the suite
measures once and shares (7 Rays in all); one family, MobileNetV2 on one shard, stands for the family runner
(2 Rays). Both are marked slow; the settings, the machine section and the shared moto launcher are not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.bench.machine import BF16_FLAGS, cpu_info
from jobs.bench.s3server import moto_server
from jobs.bench.settings import FAMILIES, add_arguments, settings_from_args

ROOT = Path(__file__).resolve().parents[1]
# Two Ray CPUs on any machine (the default layout is then 2 actors); shards of 4 images; short timings.
TINY = ["--num-cpus", "2", "--unique-images", "16", "--shard-images", "4", "--seconds", "0.25", "--batch-size", "8"]
COMPARE, WAVES = 24, (4, 4)  # the side-by-side size; the wave corpus (shards x --shard-images)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One workdir for the module: the corpus and the ViT checkpoint are made once and reused."""
    return tmp_path_factory.mktemp("bench")


def run_bench(workdir: Path, name: str, *args: str, timeout: float = 600) -> tuple[dict, str]:
    out = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "jobs.cli", "-q", "bench", "--quick", "--workdir", str(workdir / "w"),
           "--out", str(out), *TINY, *args]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    for k in [k for k in env if k.startswith("AWS_") or k == "RAY_ADDRESS"]:
        env.pop(k)  # the bench sets its own S3 endpoint, and starts its own local Rays
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def _sane_run(v: dict, images: int, name: str) -> None:
    assert v["images"] == images, name
    assert _positive(v["seconds"]) and _positive(v["images_per_s"]), name
    assert _positive(v["peak_rss_mb"]), name
    assert v["peak_pss_mb"] is None or 0 < v["peak_pss_mb"] <= v["peak_rss_mb"], name


def _sane_machine(m: dict) -> None:
    assert m["cpus"] >= 1 and m["cpu_info"]["model"]
    assert set(m["cpu_info"]["bf16_flags"]) == set(BF16_FLAGS)
    assert isinstance(m["cpu_info"]["bf16_fast"], bool) and m["cpu_info"]["bf16_note"]


# --- the ViT suite --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite(workdir) -> tuple[dict, str]:
    waves = WAVES[0] * WAVES[1]
    return run_bench(workdir, "suite", "--sizes", f"{waves},{COMPARE}", "--compare-size", str(COMPARE),
                     "--wave-corpus", "{}x{}".format(*WAVES), "--wave-repeats", "2")


@pytest.mark.slow
def test_every_figure_is_present_and_sane(suite):
    r, stdout = suite
    assert "end-to-end, local shards" in stdout and "CPU: " in stdout and "wave cost" in stdout
    _sane_machine(r["machine"])
    assert r["config"]["model_size"] == "tiny" and r["config"]["dtype"] in ("bfloat16", "float32")
    assert r["config"]["num_cpus"] == 2 and r["config"]["skip"] == ["all-cpus", "bound-again"]
    assert r["corpus"]["distinct_photos"] == 16 and 300 <= r["corpus"]["mean_width"] <= 1024
    assert _positive(r["decode"]["images_per_s_per_core"]) and _positive(r["decode"]["ray_docs_images_per_s_per_core"])
    mo = r["model_only"]
    cpu = r["config"]["device"] == "cpu"
    assert [x["layout"] for x in mo["layouts"]] == (["job", "default"] if cpu else ["job"])
    assert [x["actors"] for x in mo["layouts"]] == ([1, 2] if cpu else [1])
    for key in ("bound_images_per_s", "default_bound_images_per_s", "all_cpus_images_per_s"):
        assert _positive(mo[key]), key
    assert mo["all_cpus_images_per_s"] == max(x["images_per_s"] for x in mo["layouts"])
    for name in ("e2e_local", "e2e_s3", "e2e_default", "ray_docs", "plain_loop"):
        _sane_run(r["variants"][name], COMPARE, name)
    assert "ImageClassifier" in r["variants"]["ray_docs"]["plan"]  # the transformers pipeline actor ran
    for name in ("e2e_local", "e2e_s3"):
        assert (r["variants"][name]["layout"], r["variants"][name]["plan_layout"]) == ("job", "split"), name
    default = r["variants"]["e2e_default"]
    assert default["layout"] == "default" and default["plan_layout"] == ("fused" if cpu else "split")
    assert _positive(default["wall_seconds"]) and default["wall_seconds"] >= default["seconds"]
    [loop] = r["run_vs_plain_loop"]
    assert loop["images"] == COMPARE and _positive(loop["ratio"]) and loop["target"] is None
    assert loop["run_wall_seconds"] == default["wall_seconds"]  # `vitlabel run` = the default-layout run
    w = r["waves"]
    assert (w["shards"], w["images_per_shard"]) == WAVES and len(w["pairs"]) == 2 and "median of 2 pairs" in stdout
    for pair in w["pairs"]:
        for waves, commits in ((0, 1), (2, 2)):
            run = pair[f"wave_shards_{waves}"]
            _sane_run(run, WAVES[0] * WAVES[1], f"wave {waves}")
            assert (run["wave_shards"], run["commits"]) == (waves, commits)
        assert pair["ratio"] == round(pair["wave_shards_2"]["seconds"] / pair["wave_shards_0"]["seconds"], 3)
    assert w["pairs"][0]["wave_shards_2"] != w["pairs"][1]["wave_shards_2"]  # two runs, not one reused
    assert w["ratio"] == max(p["ratio"] for p in w["pairs"])  # the median of two is the higher ratio
    assert any((w["wave_shards_0"], w["wave_shards_2"]) == (p["wave_shards_0"], p["wave_shards_2"])
               for p in w["pairs"] if p["ratio"] == w["ratio"])  # ... with that pair's runs
    if cpu:  # the model-only target's run: the job layout at the largest loop size (here the compare size, reused)
        assert r["job_scale"] == r["variants"]["e2e_local"] and "the model-only target's run" in stdout
        assert r["ratios"]["e2e_vs_model_bound"] == round(r["job_scale"]["images_per_s"] / mo["bound_images_per_s"], 3)
        # ... and the same run seen from its own actors (Ray Data's stats of that execution)
        at, ra = r["job_scale"]["actor_time"], r["ratios"]
        assert at["operator"] == "MapBatches(Predictor)" and at["actors"] == 1 and at["calls"] >= 1
        assert 0 < at["udf_cpu_s"] and 0 < at["udf_wall_s"] < r["job_scale"]["seconds"]
        assert ra["target_run_actor_busy"] == at["busy"]
        assert at["busy"] == pytest.approx(at["udf_wall_s"] / r["job_scale"]["seconds"], abs=2e-3)
        assert 0 < ra["target_run_actor_busy"] < 1 and 0 < ra["target_run_actor_cpu_per_wall"] <= 1.5
        model_rate = round(r["job_scale"]["images"] / at["udf_wall_s"], 2)
        assert ra["target_run_model_in_job_vs_bound"] == round(model_rate / mo["bound_images_per_s"], 3)
    for key in ("e2e_vs_model_bound", "e2e_compare_size_vs_model_bound", "e2e_vs_model_all_cpus",
                "e2e_s3_vs_model_bound", "e2e_vs_ray_docs", "run_vs_best_ray_docs", "e2e_vs_plain_loop",
                "run_vs_plain_loop", "wave_cost", "seconds_per_image_growth", "peak_memory_growth",
                "steady_e2e_vs_model_bound", "default_e2e_vs_its_model_bound"):
        assert key in r["ratios"], key
    for key in ("e2e_vs_model_bound", "e2e_vs_ray_docs", "run_vs_best_ray_docs", "e2e_vs_plain_loop",
                "run_vs_plain_loop", "wave_cost", "peak_memory_growth"):
        assert _positive(r["ratios"][key]), key
    v = r["variants"]
    best_docs = v["ray_docs"]["images_per_s"]  # the smoke measures the docs' code in the job layout only
    assert r["ratios"]["run_vs_best_ray_docs"] == round(v["e2e_default"]["images_per_s"] / best_docs, 3)
    assert set(r["targets"]) == {"e2e >= 0.85 x model-only bound (job layout)",
                                 "vitlabel run >= 1.5 x Ray docs pattern (its best layout)",
                                 "peak memory flat (<= 1.25x from smallest to largest)",
                                 "wave cost (--wave-shards 2 / 0) <= 1.1"}


@pytest.mark.slow
def test_scaling_rows_are_the_default_layout_runs(suite):
    """The scaling runs are `vitlabel run`'s default layout, each measured once: the smaller is the wave corpus's
    one-commit run (of the first wave pair), the larger the compare size's default run; the largest is compared
    with its layout's bound and with its ceiling (its actors also decode)."""
    r, stdout = suite
    rows = r["scaling"]
    assert [x["images"] for x in rows] == [WAVES[0] * WAVES[1], COMPARE] and "default layout" in stdout
    for x in rows:
        assert x["layout"] == "default" and x["wave_shards"] == 0
        assert _positive(x["seconds_per_1k"]) and _positive(x["mb_per_1k_images"]) and _positive(x["images_per_s"])
        assert x["seconds_per_1k"] == round(x["seconds"] / x["images"] * 1000, 3)
    per_1k = ("seconds_per_1k", "mb_per_1k_images")
    assert rows[0] == {**r["waves"]["pairs"][0]["wave_shards_0"], **{k: rows[0][k] for k in per_1k}}
    assert rows[1] == {**r["variants"]["e2e_default"], **{k: rows[1][k] for k in per_1k}}
    mo, ra = r["model_only"], r["ratios"]
    assert ra["default_e2e_vs_its_model_bound"] == round(rows[-1]["images_per_s"] / mo["default_bound_images_per_s"], 3)
    if r["config"]["device"] == "cpu":  # fused actors decode on the model's CPUs: its ceiling is below 1
        per_actor, decode = mo["default_bound_images_per_s"] / 2, r["decode"]["images_per_s_per_core"]
        assert ra["default_ceiling_with_decode"] == pytest.approx(decode / (per_actor + decode), abs=1e-3)
        assert 0 < ra["default_ceiling_with_decode"] < 1
        assert ra["default_e2e_vs_its_ceiling"] == round(ra["default_e2e_vs_its_model_bound"]
                                                         / ra["default_ceiling_with_decode"], 3)
    assert set(r["steady_state"]) == {"startup_seconds", "images_per_s"}


# --- families -------------------------------------------------------------------------------------------


def _sane_family(x: dict, name: str, images: int) -> None:
    assert x["status"] == "ok", x
    for key in ("decode_images_per_s_per_core", "decode_bound_images_per_s", "model_only_images_per_s",
                "e2e_vs_model_only", "e2e_vs_slower_bound"):
        assert _positive(x[key]), (name, key)
    _sane_run(x["e2e"], images, name)
    assert x["slower_bound"] in ("model-only", "decode") and x["head"] == "classifier"


@pytest.mark.slow
def test_family_mobilenetv2(workdir):
    """The family runner on one shard of MobileNetV2 at full size (random weights), the CNN that stands for the
    others (ResNet-50 costs 4x its model time; each family's model is parity-tested in its tests/test_models_*);
    a family the registry lacks is reported as skipped."""
    from pipeline.models import families

    r, stdout = run_bench(workdir, "family", "--family", "mobilenet_v2", "--family-images", "4")
    _sane_machine(r["machine"])
    assert list(r["families"]) == ["mobilenetv2"] and list(r["config"]["layouts"]) == ["job"]
    x = r["families"]["mobilenetv2"]
    if FAMILIES["mobilenetv2"] not in families():
        assert x["status"] == "skipped" and "mobilenetv2" in x["reason"]
        return
    _sane_family(x, "mobilenetv2", 4)
    assert "e2e/slower" in stdout and x["title"].startswith("MobileNetV2") and x["labels"] == 1001
    assert x["input"]["layout"] == "pixels" and x["input"]["shape"] == [224, 224, 3]
    assert x["e2e"]["layout"] == "job" and x["e2e"]["commits"] == 1
    assert x["decode_bound_images_per_s"] == round(x["decode_images_per_s_per_core"] * x["decode_cores"], 2)
    assert list(r["targets"]) == ["mobilenetv2: e2e >= 0.85 x the slower bound"]


# --- settings, machine, the shared S3 launcher (no Ray) -------------------------------------------------


def _settings(*argv: str):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return settings_from_args(p.parse_args(list(argv)))


def test_settings(tmp_path):
    s = _settings("--quick", "--workdir", str(tmp_path))
    assert (s.compare_size, s.loop_sizes, s.wave_shards_total, s.families) == (300, [300], 8, [])
    assert {"all-cpus", "bound-again"} <= s.skip
    s = _settings("--workdir", str(tmp_path), "--family", "ResNet-50,siglip-b16,vit", "--dtype", "float32")
    assert s.families == ["resnet50", "siglip", "vit"] and s.dtype == "float32"
    assert (s.compare_size, s.loop_sizes, s.wave_shards_total, s.wave_shard_images) == (3000, [3000, 20000], 40, 25)
    assert _settings("--family", "all").families == list(FAMILIES)
    cpu = _settings("--device", "cpu", "--num-cpus", "3")
    assert (cpu.default_layout.name, cpu.default_layout.actors, cpu.default_layout.preprocess_cpus) == ("default", 3, 0)
    auto = _settings("--device", "cpu")
    assert auto.dtype == ("bfloat16" if cpu_info()["bf16_fast"] else "float32") and auto.dtype_reason.startswith("auto")
    for bad in (["--family", "alexnet"], ["--wave-corpus", "40"], ["--skip", "everything"], ["--sizes", "1k"]):
        with pytest.raises(SystemExit, match="expected"):
            _settings(*bad)


def test_cpu_info_reads_lscpu():
    info = cpu_info()
    assert info["model"] and set(info["bf16_flags"]) == set(BF16_FLAGS)
    assert info["bf16_fast"] == (info["bf16_flags"]["amx_bf16"] or info["bf16_flags"]["avx512_bf16"]
                                 or "ARM" in info["bf16_note"])


def test_moto_launcher_child_process_sets_and_restores_env():
    import boto3

    before = os.environ.get("AWS_ENDPOINT_URL")
    with moto_server() as s3:
        assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint and s3.pid != os.getpid()
        client = boto3.client("s3", endpoint_url=s3.endpoint)
        client.create_bucket(Bucket="launcher-test")
        client.put_object(Bucket="launcher-test", Key="k", Body=b"x")
        assert client.get_object(Bucket="launcher-test", Key="k")["Body"].read() == b"x"
    assert os.environ.get("AWS_ENDPOINT_URL") == before

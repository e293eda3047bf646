"""The ViT suite: one corpus, one model, one dtype, one batch size, one Ray CPU count, every variant.

    decode       ours (measure.measure_decode) and the Ray docs' per-image work (peers), per core
    model-only   the job layout's bound, the all-CPU layout's, and one actor with every thread
    e2e          pipeline.plan.run over local shards and over S3 (moto) shards, in each layout
    ray-docs     Ray's documented transformers-pipeline example, in each layout (peers)
    plain-loop   the plain transformers loop (peers) against `vitlabel run`, at --compare-size and --loop-sizes
    waves        the same small shards with --wave-shards 2 and 0: what committing in waves costs
    scaling      e2e over --sizes in `vitlabel run`'s default layout: seconds and peak memory per image, and a
                 start-up + steady-rate fit
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from jobs.bench.corpus import upload
from jobs.bench.families import ensure_checkpoint
from jobs.bench.harness import bench_session, in_job_process
from jobs.bench.measure import ModelSpec, e2e_job, in_job_model, measure_decode, model_inputs, model_only_job
from jobs.bench.peers import measure_docs_decode, plain_loop_job, ray_docs_job
from jobs.bench.s3server import moto_server
from jobs.bench.settings import Layout, Settings

log = logging.getLogger(__name__)

S3_BUCKET = "bench"
# `vitlabel run` (job layout, whole wall time) against the plain loop: the targets of the issue, by size.
LOOP_TARGETS = {3000: 1.0, 20000: 1.15}
WAVE_TARGET = 1.10


def run_bench(s: Settings, argv: list[str] | None = None) -> dict[str, Any]:
    with bench_session(s, argv) as (result, corpus, scratch):
        _suite(s, result, corpus, scratch)
    return result


def _suite(s: Settings, result: dict[str, Any], corpus: Any, scratch: Any) -> None:
    from pipeline.models import describe_model

    model = ensure_checkpoint("vit", s)
    spec = ModelSpec(model, "vit")
    contract = describe_model(model, "vit").contract
    layouts = [s.layout] + ([s.all_cpus_layout] if s.all_cpus_layout else [])
    compare_shards = corpus.shards(s.compare_size)

    log.info("bench: decode per core")
    result["decode"] = {"images_per_s_per_core": measure_decode(corpus, contract, s.seconds),
                        "ray_docs_images_per_s_per_core": measure_docs_decode(corpus, model, s.seconds)}
    inputs = model_inputs(corpus, contract, s.batch_size)
    timed = list(layouts) + ([s.default_layout] if s.default_layout is not s.layout else [])
    if s.all_cpus_layout:
        timed.append(Layout("one-actor-all-threads", 1, float(s.num_cpus), s.num_cpus, 0.0, 0.0))
    log.info("bench: model-only for %s", [x.name for x in timed])
    rows = in_job_process(model_only_job, s, spec, inputs, timed)["layouts"]

    runs: dict[tuple[str, int], dict[str, Any]] = {}  # (layout, images) -> e2e on local shards (each run once)

    def e2e_at(n: int, lay: Layout | None = s.layout) -> dict[str, Any]:
        """e2e on n images of local shards: in `lay`, or with `vitlabel run`'s default layout (None)."""
        key = (lay.name if lay else "default", n)
        if key not in runs:
            log.info("bench: e2e on local shards, %s layout, %d images", key[0], n)
            out = scratch / f"e2e-{key[0]}-{n}"
            runs[key] = in_job_process(e2e_job, s, lay, spec, str(corpus.shards(n)), str(out))
            shutil.rmtree(out, ignore_errors=True)
        return runs[key]

    variants: dict[str, Any] = {}
    s3 = moto_server() if "s3" not in s.skip else contextlib.nullcontext(None)
    with s3 as server:
        for lay in layouts:
            suffix = "" if lay is s.layout else f"_{lay.name.replace('-', '_')}"
            variants["e2e_local" + suffix] = e2e_at(s.compare_size, lay)
            if "ray-docs" not in s.skip:
                log.info("bench: Ray docs pattern, %s, %d images", lay.name, s.compare_size)
                variants["ray_docs" + suffix] = in_job_process(ray_docs_job, s, lay, model,
                                                               corpus.files(s.compare_size),
                                                               scratch / f"ray-docs{suffix}")
        if server is not None:
            log.info("bench: e2e on S3 shards (%s), %d images", server.endpoint, s.compare_size)
            url = f"s3://{S3_BUCKET}/shards/n{s.compare_size}"
            upload(compare_shards, url)
            variants["e2e_s3"] = in_job_process(e2e_job, s, s.layout, spec, url, f"s3://{S3_BUCKET}/tables/e2e")
    variants["e2e_default"] = e2e_at(s.compare_size, None)
    loops = []
    if "plain-loop" not in s.skip:
        for n in s.loop_sizes:
            log.info("bench: plain transformers loop, %d images", n)
            loop = in_job_process(plain_loop_job, s, model, corpus.shards(n), scratch / f"plain-loop-{n}")
            shutil.rmtree(scratch / f"plain-loop-{n}", ignore_errors=True)
            if n == s.compare_size:
                variants["plain_loop"] = loop
            run = e2e_at(n, None)
            loops.append({"images": n, "run_wall_seconds": run["wall_seconds"],
                          "run_images_per_s": run["wall_images_per_s"], "loop_seconds": loop["seconds"],
                          "loop_images_per_s": loop["images_per_s"], "loop_peak_pss_mb": loop["peak_pss_mb"],
                          "ratio": _div(run["wall_images_per_s"], loop["images_per_s"]),
                          "target": LOOP_TARGETS.get(n)})
    if "waves" not in s.skip:
        result["waves"] = wave_cost(s, spec, corpus, scratch, e2e_at)
    if "bound-again" not in s.skip:
        # The model-only bound once more, after the side-by-side jobs: on a shared machine the larger one counts.
        again_for = [x for x in timed if x.name in (s.layout.name, s.default_layout.name)]
        log.info("bench: model-only for %s, again", [x.name for x in again_for])
        again = {x["layout"]: x for x in in_job_process(model_only_job, s, spec, inputs, again_for)["layouts"]}
        for row in rows:
            if row["layout"] in again:
                row["images_per_s_first"] = row["images_per_s"]
                row["images_per_s_again"] = again[row["layout"]]["images_per_s"]
                row["images_per_s"] = max(row["images_per_s"], row["images_per_s_again"])
    bounds = {r["layout"]: r["images_per_s"] for r in rows}
    result["model_only"] = {"bound_images_per_s": bounds[s.layout.name], "layouts": rows,
                            "default_bound_images_per_s": bounds[s.default_layout.name],
                            "default_layout": s.default_layout.name, "default_actors": s.default_layout.actors,
                            "all_cpus_images_per_s": max(bounds.values())}
    scaling: list[dict[str, Any]] = []
    if "scaling" not in s.skip:
        # In `vitlabel run`'s default layout (what users run): its 3k and 20k runs are the plain-loop ones.
        for n in s.sizes:
            row = dict(e2e_at(n, None))
            row["seconds_per_1k"] = round(row["seconds"] / row["images"] * 1000, 3)
            mem = row["peak_pss_mb"] if row["peak_pss_mb"] is not None else row["peak_rss_mb"]
            row["mb_per_1k_images"] = round(mem / row["images"] * 1000, 2) if mem is not None else None
            scaling.append(row)
    if "job-scale" not in s.skip and s.default_layout is not s.layout:
        # the job layout (decoding on its own CPUs, the model on its own) at the largest loop size: the
        # model-only target's run (the default layout's actors decode on the model's CPUs: see ratios)
        result["job_scale"] = e2e_at(max(s.loop_sizes), s.layout)
    result["variants"] = variants
    result["run_vs_plain_loop"] = loops
    result["scaling"] = scaling
    result["ratios"] = ratios(result)
    if len(scaling) >= 2:
        # seconds = startup + images / steady rate: least squares over the scaling runs
        n = np.array([x["images"] for x in scaling], dtype=float)
        t = np.array([x["seconds"] for x in scaling], dtype=float)
        slope, intercept = np.polyfit(n, t, 1)
        steady = float(1.0 / slope) if slope > 0 else None
        result["steady_state"] = {"startup_seconds": round(float(intercept), 2),
                                  "images_per_s": round(steady, 2) if steady else None}
        result["ratios"]["steady_e2e_vs_model_bound"] = _div(steady, result["model_only"]["default_bound_images_per_s"])
    result["targets"] = targets(result)


def wave_cost(s: Settings, spec: ModelSpec, corpus: Any, scratch: Any,
              e2e_at: Callable[[int, Layout | None], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The same small shards labelled with --wave-shards 2 and with 0 (one commit), `vitlabel run`'s default
    layout: e2e seconds of each. Shards of the corpus's own size make the --wave-shards 0 run the default-layout
    run at that many images: `e2e_at` (the suite's, which runs each job once) gives it."""
    n = s.wave_shards_total * s.wave_shard_images
    shards = corpus.shards(n, per_shard=s.wave_shard_images)
    out: dict[str, Any] = {"shards": s.wave_shards_total, "images_per_shard": s.wave_shard_images, "pairs": []}
    for rep in range(s.wave_repeats):
        pair: dict[str, Any] = {}
        for waves in (0, 2):
            log.info("bench: waves: %d shards with --wave-shards %d (pair %d/%d)", s.wave_shards_total, waves,
                     rep + 1, s.wave_repeats)
            if rep == 0 and waves == 0 and e2e_at is not None and s.wave_shard_images == corpus.shard_images:
                pair["wave_shards_0"] = e2e_at(n, None)
                continue
            dest = scratch / f"waves-{waves}"
            shutil.rmtree(dest, ignore_errors=True)  # a fresh table: every shard pending
            pair[f"wave_shards_{waves}"] = in_job_process(e2e_job, s, None, spec, str(shards), str(dest), waves)
        pair["ratio"] = _div(pair["wave_shards_2"]["seconds"], pair["wave_shards_0"]["seconds"])
        out["pairs"].append(pair)
    # one pair of ~10 s runs moves by +-10% on a shared 2-core machine; the median pair is the figure
    ranked = sorted((p for p in out["pairs"] if p["ratio"] is not None), key=lambda p: p["ratio"])
    median = ranked[len(ranked) // 2] if ranked else out["pairs"][0]  # of two: the higher (worse)
    out.update(wave_shards_0=median["wave_shards_0"], wave_shards_2=median["wave_shards_2"], ratio=median["ratio"])
    return out


def _div(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x is not None and y else None


def ratios(r: dict[str, Any]) -> dict[str, float | None]:
    v, mo = r["variants"], r["model_only"]
    bounds = {x["layout"]: x["images_per_s"] for x in mo["layouts"]}

    def ips(key: str) -> float | None:
        return v[key]["images_per_s"] if key in v else None

    e2e, bound = ips("e2e_local"), mo["bound_images_per_s"]
    sc, job_scale = r["scaling"], r.get("job_scale")
    default_is_job = mo.get("default_layout") == "job"  # GPUs: the default layout is the job layout
    # The target's ratio: the job layout (decode tasks on their own CPUs, the model on its own) at its largest
    # run against its bound; where the default layout is the job layout (GPUs), the largest scaling run.
    if job_scale:
        target_run = job_scale
    else:
        target_run = sc[-1] if sc and default_is_job else v.get("e2e_local")
    target_e2e = target_run["images_per_s"] if target_run else None
    out: dict[str, float | None] = {
        "e2e_vs_model_bound": _div(target_e2e, bound),
        "e2e_compare_size_vs_model_bound": _div(e2e, bound),
        "e2e_vs_model_all_cpus": _div(e2e, mo["all_cpus_images_per_s"]),
        "e2e_s3_vs_model_bound": _div(ips("e2e_s3"), bound),
        "e2e_vs_ray_docs": _div(e2e, ips("ray_docs")),
        # the target's ratio (issue 11): `vitlabel run` as a user runs it against the docs' code in the best layout
        # measured for it (the job layout's 1 actor, or every CPU's actors with --all-cpus)
        "run_vs_best_ray_docs": _div(ips("e2e_default"), max((x["images_per_s"] for k, x in v.items()
                                                              if k.startswith("ray_docs")), default=None)),
        "e2e_vs_plain_loop": _div(e2e, ips("plain_loop")),
    }
    if target_run:  # the same run seen from its own actors: busy share, and the model's rate while busy
        inside = in_job_model(target_run, bound)
        out["target_run_actor_busy"] = inside["busy"]
        out["target_run_actor_cpu_per_wall"] = inside["cpu_per_wall"]
        out["target_run_model_in_job_vs_bound"] = inside["model_vs_bound"]
    for row in r["run_vs_plain_loop"]:
        first = row is r["run_vs_plain_loop"][0]  # the compare size
        out["run_vs_plain_loop" if first else f"run_vs_plain_loop_{row['images']}"] = row["ratio"]
    if "waves" in r:
        out["wave_cost"] = r["waves"]["ratio"]
    if "e2e_local_all_cpus" in v:
        out["all_cpus_e2e_vs_its_model_bound"] = _div(ips("e2e_local_all_cpus"), bounds["all-cpus"])
        out["all_cpus_e2e_vs_ray_docs"] = _div(ips("e2e_local_all_cpus"), ips("ray_docs_all_cpus"))
        docs = [x["images_per_s"] for k, x in v.items() if k.startswith("ray_docs")]
        best = max(x["images_per_s"] for k, x in v.items() if k.startswith("e2e_local"))
        out["best_e2e_vs_best_ray_docs"] = _div(best, max(docs)) if docs else None
    if sc:
        # The default CPU layout's actors decode on the model's own CPUs, so its model-only bound is out of reach
        # by decoding's share: per actor, 1 / (1/model + 1/decode) images/s at best, i.e. a fraction
        # decode / (model + decode) of the model alone.
        d_bound = mo["default_bound_images_per_s"]
        out["default_e2e_vs_its_model_bound"] = _div(sc[-1]["images_per_s"], d_bound)
        decode = r.get("decode", {}).get("images_per_s_per_core")
        actors = mo.get("default_actors")
        if decode and actors and not default_is_job:
            per_actor = d_bound / actors
            out["default_ceiling_with_decode"] = _div(decode, per_actor + decode)
            out["default_e2e_vs_its_ceiling"] = _div(out["default_e2e_vs_its_model_bound"],
                                                     out["default_ceiling_with_decode"])
        out["seconds_per_image_growth"] = _div(sc[-1]["seconds_per_1k"], sc[0]["seconds_per_1k"])
        key = "peak_pss_mb" if sc[-1]["peak_pss_mb"] is not None else "peak_rss_mb"
        out["peak_memory_growth"] = _div(sc[-1][key], sc[0][key])
    return out


def targets(r: dict[str, Any]) -> dict[str, bool | None]:
    """Each target of the issues: met (True), missed (False) or not measured (None). Printed, never asserted."""
    ra = r["ratios"]

    def at_least(x: float | None, t: float) -> bool | None:
        return None if x is None else x >= t

    out = {"e2e >= 0.85 x model-only bound (job layout)": at_least(ra["e2e_vs_model_bound"], 0.85),
           "vitlabel run >= 1.5 x Ray docs pattern (its best layout)": at_least(ra.get("run_vs_best_ray_docs"), 1.5),
           "peak memory flat (<= 1.25x from smallest to largest)": (
               None if ra.get("peak_memory_growth") is None else ra["peak_memory_growth"] <= 1.25)}
    for row in r["run_vs_plain_loop"]:
        if row["target"] is not None:
            out[f"vitlabel run >= {row['target']:g} x plain loop at {row['images']:,} images"] = at_least(
                row["ratio"], row["target"])
    if "waves" in r:
        out[f"wave cost (--wave-shards 2 / 0) <= {WAVE_TARGET:g}"] = (
            None if r["waves"]["ratio"] is None else r["waves"]["ratio"] <= WAVE_TARGET)
    return out

"""The bench's printed tables: the ViT suite (`format_table`) and the families (`format_families`)."""

from __future__ import annotations

from typing import Any

from jobs.bench.settings import Layout

VARIANT_NAMES = {"e2e_local": "end-to-end, local shards", "e2e_s3": "end-to-end, S3 shards (moto)",
                 "e2e_default": "end-to-end, run's defaults",
                 "ray_docs": "Ray docs pattern (transformers pipeline)", "plain_loop": "plain transformers loop"}
RATIO_NOTES = {
    "e2e_vs_model_bound": "target >= 0.85 (the job layout's largest e2e run, wall clock)",
    "target_run_actor_busy": "(that run's actors: share of its seconds inside their UDF, Ray Data's stats)",
    "target_run_actor_cpu_per_wall": "(CPU seconds per UDF second per torch thread: < 1, they waited for a CPU)",
    "target_run_model_in_job_vs_bound": "(the model's images/s while busy in that run, over the isolated bound)",
    "default_e2e_vs_its_model_bound": "(largest default-layout run; its actors decode on the model's CPUs)",
    "default_ceiling_with_decode": "(the most it can reach: 1/(1/model + 1/decode) per actor, over model alone)",
    "default_e2e_vs_its_ceiling": "(the default layout against that ceiling)",
    "e2e_compare_size_vs_model_bound": "(side-by-side size, start-up included)",
    "e2e_vs_ray_docs": "(same images, layout, model, dtype, batch: both bound by one model thread)",
    "run_vs_best_ray_docs": "target >= 1.5 (run's defaults vs the docs' code in its best layout measured)",
    "e2e_vs_plain_loop": "(e2e with Ray up against the loop's whole wall time)",
    "run_vs_plain_loop": "whole wall times, Ray's start included; target >= 1.0 at 3,000, >= 1.15 at 20,000",
    "wave_cost": "e2e seconds with --wave-shards 2 / 0 (same shards); target <= 1.10",
}


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _row(label: str, width: int, *cells: tuple[Any, int, int]) -> str:
    """A table row: the label left-aligned in `width`, then each (value, width, decimals) right-aligned."""
    return f"{label:<{width}}" + "".join(f"{_f(v, nd):>{w}}" for v, w, nd in cells)


def _header(r: dict[str, Any], what: str) -> list[str]:
    c, m, co = r["config"], r["machine"], r["corpus"]
    cpu = m["cpu_info"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["bf16_flags"].items())
    return [
        f"vitlabel bench: {what}, {c['dtype']} on {c['device']} ({m['gpu'] or m['cpu']}), {c['num_cpus']} CPUs, "
        f"batch {c['batch_size']}",
        f"  CPU: {cpu['model']}; {flags}; bf16 {'fast' if cpu['bf16_fast'] else 'slow'} ({cpu['bf16_note']}); "
        f"dtype {c['dtype']} ({c['dtype_reason']})",
        f"  corpus: {co['distinct_photos']} distinct photos, mean {co['mean_width']}x{co['mean_height']} px, "
        f"{co['mean_kb']} KB, JPEG q75-95, {co['images_per_shard']} images per shard",
        *[f"  layout {name}: {Layout(**x).describe()}" for name, x in c["layouts"].items()],
        f"  load average {r['load_average_start']} -> {r['load_average_end']}",
    ]


def _targets(r: dict[str, Any]) -> list[str]:
    return ["targets: " + "; ".join(f"{k}: {'met' if ok else 'MISSED' if ok is not None else 'n/a'}"
                                    for k, ok in r["targets"].items()),
            f"bench took {r['bench_seconds']} s"]


def format_table(r: dict[str, Any]) -> str:
    v, mo, ra = r["variants"], r["model_only"], r["ratios"]
    lines = [
        *_header(r, r["config"]["model"]),
        "",
        f"{'measurement':<50}{'images':>8}{'seconds':>9}{'images/s':>10}{'peak PSS MB':>13}{'peak RSS MB':>13}",
        _row("decode+preprocess, 1 core (ours: draft, uint8)", 67, (r["decode"]["images_per_s_per_core"], 10, 1)),
        _row("decode+preprocess, 1 core (Ray docs: PIL + HF proc.)", 67,
             (r["decode"]["ray_docs_images_per_s_per_core"], 10, 1)),
    ]
    for row in mo["layouts"]:
        where = f"{row['gpus_per_actor']:g} GPU" if row["gpus_per_actor"] else f"{row['threads_per_actor']} thr"
        lines.append(_row(f"model-only [{row['layout']}] {row['actors']} actor x {where}", 67,
                          (row["images_per_s"], 10, 1)))
    for key, x in v.items():
        base = next((n for n in VARIANT_NAMES if key == n or key.startswith(n + "_")), key)
        where = x.get("layout", "") + (f": {x['plan_layout']}" if x.get("layout") == "default" else "")
        label = VARIANT_NAMES.get(base, key) + ("" if key == "plain_loop" else f" [{where}]")
        lines.append(_row(label, 50, (x["images"], 8, 0), (x["seconds"], 9, 1), (x["images_per_s"], 10, 1),
                          (x["peak_pss_mb"], 13, 0), (x["peak_rss_mb"], 13, 0)))
    if r["run_vs_plain_loop"]:
        lines += ["", f"{'vitlabel run (defaults) vs plain loop':<42}{'images':>8}{'run s':>9}{'run img/s':>11}"
                      f"{'loop s':>9}{'loop img/s':>12}{'ratio':>8}{'target':>8}"]
        for x in r["run_vs_plain_loop"]:
            lines.append(_row("", 42, (x["images"], 8, 0), (x["run_wall_seconds"], 9, 1),
                              (x["run_images_per_s"], 11, 1), (x["loop_seconds"], 9, 1),
                              (x["loop_images_per_s"], 12, 1), (x["ratio"], 8, 3), (x["target"], 8, 2)))
    if "waves" in r:
        w = r["waves"]
        lines += ["", f"wave cost: {w['shards']} shards x {w['images_per_shard']} images, e2e seconds with "
                      f"--wave-shards 2: {_f(w['wave_shards_2']['seconds'])} ({w['wave_shards_2']['commits']} "
                      f"commits), 0: {_f(w['wave_shards_0']['seconds'])} (1 commit); ratio {_f(w['ratio'], 3)}"]
        if len(w.get("pairs", [])) > 1:
            lines.append(f"  the median of {len(w['pairs'])} pairs (0 then 2, alternating): " + ", ".join(
                f"{_f(p['wave_shards_2']['seconds'])}/{_f(p['wave_shards_0']['seconds'])} = {_f(p['ratio'], 3)}"
                for p in w["pairs"]))
    if r.get("job_scale"):
        j = r["job_scale"]
        lines += ["", f"job layout at {j['images']:,} images (the model-only target's run): {_f(j['seconds'])} s, "
                      f"{_f(j['images_per_s'])} images/s, peak PSS {_f(j['peak_pss_mb'], 0)} MB"]
    lines += ["", "ratios:"]
    for k, x in ra.items():
        lines.append(f"  {k:<40}{_f(x, 3):>8}   {RATIO_NOTES.get(k, '')}".rstrip())
    if r.get("steady_state"):
        st = r["steady_state"]
        lines.append(f"  steady state (fit over the scaling runs): {_f(st['images_per_s'])} images/s after "
                     f"{_f(st['startup_seconds'], 1)} s of startup")
    if r["scaling"]:
        lines += ["", f"{'scaling (e2e, local, default layout)':<34}{'images':>8}{'seconds':>9}{'images/s':>10}"
                      f"{'s per 1k':>10}{'peak PSS MB':>13}{'MB per 1k':>11}{'peak RSS MB':>13}"]
        for x in r["scaling"]:
            lines.append(_row("", 34, (x["images"], 8, 0), (x["seconds"], 9, 1), (x["images_per_s"], 10, 1),
                              (x["seconds_per_1k"], 10, 2), (x["peak_pss_mb"], 13, 0),
                              (x["mb_per_1k_images"], 11, 1), (x["peak_rss_mb"], 13, 0)))
    lines += ["", *_targets(r)]
    return "\n".join(lines)


def format_families(r: dict[str, Any]) -> str:
    lines = [*_header(r, "model families"), "",
             f"{'family':<13}{'decode/core':>12}{'decode bound':>13}{'model-only':>11}{'images':>8}{'e2e s':>8}"
             f"{'e2e img/s':>10}{'e2e/model':>10}{'e2e/slower':>11}  slower bound"]
    notes = []
    for name, x in r["families"].items():
        if x["status"] != "ok":
            lines.append(f"{name:<13}  {x['status']}: {x.get('reason') or x.get('error', '')}"[:240])
            continue
        e = x["e2e"]
        lines.append(_row(name, 13, (x["decode_images_per_s_per_core"], 12, 1), (x["decode_bound_images_per_s"], 13, 1),
                          (x["model_only_images_per_s"], 11, 1), (e["images"], 8, 0), (e["seconds"], 8, 1),
                          (e["images_per_s"], 10, 1), (x["e2e_vs_model_only"], 10, 3),
                          (x["e2e_vs_slower_bound"], 11, 3)) + f"  {x['slower_bound']}")
        i = x["input"]
        notes.append(f"  {name}: {x['title']}; {x['head']} head; input {i['layout']} {'x'.join(map(str, i['shape']))} "
                     f"({i['resize']}, crop {i['crop_pct']:g}, {i['interpolation']}); e2e peak PSS "
                     f"{_f(e['peak_pss_mb'], 0)} MB")
    lines += ["", "decode bound = decode images/s per core x the CPUs left to preprocessing", *notes, "",
              *_targets(r)]
    return "\n".join(lines)

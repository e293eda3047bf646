"""`vitlabel bench`: a realistic corpus, and the pipeline measured side by side with its bounds and its peers.

One run, one corpus, one model, one dtype, one batch size, one Ray CPU count:

    decode       pipeline.preprocess on one core (JPEG draft mode, uint8 model input): images/s per core
    model-only   the predictor on pre-made inputs, in Ray actors laid out exactly like the e2e job's (same actors,
                 CPUs, threads, batch): the bound the e2e job can reach with its model's CPUs; plus the best
                 layout over all CPUs (the machine's model ceiling)
    e2e          pipeline.plan.run over WebDataset shards on local disk, and on a local S3 server (moto)
    ray-docs     Ray's documented example on the same images as JPEG files: read_images + map_batches over an
                 actor holding a transformers pipeline("image-classification") + write_parquet
    plain-loop   the loop a user writes: PIL, the transformers processor and model, torch on every core;
                 against `vitlabel run`'s whole wall time at --compare-size and --loop-sizes
    waves        the same small shards with --wave-shards 2 and 0: the cost of committing in waves
    scaling      e2e over 1k, 3k, 20k, 50k images (`vitlabel run`'s default layout): seconds, peak memory per image
    --family     instead: ResNet-50, MobileNetV2, DINOv2-S/14, SigLIP-B/16 (and the ViT), each with decode per
                 core, model-only, e2e and e2e against the slower of its two bounds

Every measured job runs in a fresh Python process of its own (its driver), which starts its own local Ray;
its peak memory is summed over it and every process it started (PSS and RSS, from /proc). The dtype is the
same in every variant: auto = bf16 on a GPU or on a CPU with native bf16 (AMX-BF16, AVX512-BF16), else fp32.

Modules: settings (flags), machine (CPU and bf16), corpus, s3server (moto, shared with the tests), memory,
harness (job processes), measure (ours), peers (Ray docs, plain loop), families, suite (the ViT suite), report.
Needs the `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from jobs.bench.settings import add_arguments, settings_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure decode, model-only, end-to-end and peers on a generated corpus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    s = settings_from_args(args)
    argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else []
    if s.families:
        from jobs.bench.families import run_families
        from jobs.bench.report import format_families

        result = run_families(s, argv)
        text = format_families(result)
        ok = all(x["status"] != "failed" for x in result["families"].values())
    else:
        from jobs.bench.report import format_table
        from jobs.bench.suite import run_bench

        result = run_bench(s, argv)
        text = format_table(result)
        ok = math.isfinite(result["ratios"]["e2e_vs_model_bound"] or 0.0)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    print(f"\nresults: {args.out}")
    return 0 if ok else 1

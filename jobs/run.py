"""`vitlabel run`: label every pending shard of an input into an output table, once.

It holds the output's lease for its model version (`OUTPUT/_lease/sha256-<digest>/`) for the whole run, so a
second run (or nightly) of the same model version on the same output exits 3 at once, naming the holder
(host, pid, run_id, until), instead of labelling the same shards again; runs of other model versions go on
side by side. `--no-lease` skips the lease: UNSAFE, two such runs may label every image twice.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.cli import add_config_args, config_from_args, print_json
from pipeline.config import JobConfig

log = logging.getLogger(__name__)

EXIT_LEASE_HELD = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="label the shards of --input into --output (skips shards already committed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.set_defaults(func=main)


def dry_run(cfg: JobConfig) -> int:
    """Resolve everything the driver would (config, model, shards) without starting Ray."""
    print_json(describe(cfg))
    return 0


def describe(cfg: JobConfig) -> dict:
    """The resolved config and plan, as `--dry-run` prints it."""
    from pipeline.plan import plan_shards, resolve

    cfg, model = resolve(cfg)
    shards, pending = plan_shards(cfg, model.digest)
    return {
        "config": cfg.to_dict(),
        "model": {"name": cfg.model_name, **model.describe()},
        "shards": {"total": len(shards), "pending": len(pending), "first": [s.uri for s in pending[:5]]},
        "layout": cfg.layout if cfg.layout != "auto" else "auto (fused without GPUs, split with)",
        "stages": ["read_rows", "preprocess_batch",
                   f"Predictor x{cfg.min_actors}..{cfg.max_actors} (split) or ShardLabeler actors (fused)",
                   f"WaveCommitter: a commit every {cfg.wave_shards} shards" if cfg.wave_shards
                   else "WaveCommitter: one commit"],
    }


def execute(cfg: JobConfig) -> int:
    """Run the job; exit 3 when another job of this model version holds the output's lease (or took it over)."""
    from pipeline.lease import LeaseHeld, LeaseLost
    from pipeline.plan import run

    try:
        summary = run(cfg).to_dict()
    except LeaseHeld as e:
        # Exit rather than wait: on the same input the holder labels what this job would have (README).
        print(f"vitlabel: {e}; nothing was labelled by this job: run it again when the holder is done", file=sys.stderr)
        return EXIT_LEASE_HELD
    except LeaseLost as e:
        print(f"vitlabel: {e}; the waves committed so far stay committed", file=sys.stderr)
        return EXIT_LEASE_HELD
    print_json(summary)
    if summary["shard_error_list"]:
        print(f"vitlabel: {len(summary['shard_error_list'])} shard(s) had errors; see shard_error_list",
              file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    return dry_run(cfg) if args.dry_run else execute(cfg)

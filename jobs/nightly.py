"""`vitlabel nightly`: the scheduled, incremental run.

Same pipeline and flags as `vitlabel run`, with defaults suited to a schedule:
- labels only shards that no committed manifest covers for this model digest (new shards, and the
  shards a crashed run left), into today's date partition (UTC) unless `--dt` is given;
- commits every `--wave-shards` shards (default 16), so a crash loses at most one wave;
- holds the output's lease for its model version (`OUTPUT/_lease/sha256-<digest>/`, the one `run` takes)
  for the whole run, so two jobs of one model version never write the same output at once: the second
  exits 3 with "another job of model version ... holds the lease on ... until ... (holder host=... pid=...
  run_id=...)" instead.
Running it twice in a row labels nothing the second time.
"""

from __future__ import annotations

import argparse

from jobs.cli import add_config_args, config_from_args, print_json
from jobs.run import describe, execute
from pipeline.config import JobConfig

NIGHTLY_DEFAULTS = {"wave_shards": 16, "lease": True, "progress": False}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nightly", help="label the shards no commit covers yet, in waves, one nightly per output at a time",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.set_defaults(func=main)


def lease_status(cfg: JobConfig, model_digest: str) -> dict:
    from pipeline.lease import current, version_lease

    cur = current(cfg.output, version_lease(model_digest))
    if cur is None:
        return {"state": "free", "generation": 0}
    d = cur.data
    state = "free" if cur.free() else "held"
    return {"state": state, "generation": cur.generation, "last": d.get("state"), "owner": d.get("owner"),
            "expires_at": d.get("expires_at")}


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, **NIGHTLY_DEFAULTS)
    if args.dry_run:
        plan = describe(cfg)
        print_json({**plan, "lease": lease_status(cfg, plan["model"]["digest"]) if cfg.lease
                    else {"state": "not used"}})
        return 0
    return execute(cfg)  # exit 3 (run.EXIT_LEASE_HELD) when another job of this model version holds the lease

"""`vitlabel nightly`: the scheduled, incremental run.

Same pipeline and flags as `vitlabel run`, with defaults suited to a schedule:
- labels only shards that no committed manifest covers for this model digest (new shards, and the
  shards a crashed run left), into today's date partition (UTC) unless `--dt` is given;
- commits every `--wave-shards` shards (default 16), so a crash loses at most one wave;
- holds the output's lease (`OUTPUT/_lease/nightly/`) for the whole run, so two nightlies never write
  the same output at once: exits 3 with "another nightly job holds the lease ... until ..." instead.
Running it twice in a row labels nothing the second time.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import add_config_args, config_from_args, print_json
from jobs.run import describe, execute
from pipeline.config import JobConfig

NIGHTLY_DEFAULTS = {"wave_shards": 16, "lease": True, "progress": False}
EXIT_LEASE_HELD = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nightly", help="label the shards no commit covers yet, in waves, one nightly per output at a time",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.set_defaults(func=main)


def lease_status(cfg: JobConfig) -> dict:
    from pipeline.lease import current
    from pipeline.plan import LEASE_NAME

    cur = current(cfg.output, LEASE_NAME)
    if cur is None:
        return {"state": "free", "generation": 0}
    d = cur.data
    state = "free" if cur.free() else "held"
    return {"state": state, "generation": cur.generation, "last": d.get("state"), "owner": d.get("owner"),
            "expires_at": d.get("expires_at")}


def main(args: argparse.Namespace) -> int:
    from pipeline.lease import LeaseHeld, LeaseLost

    cfg = config_from_args(args, **NIGHTLY_DEFAULTS)
    if args.dry_run:
        print_json({**describe(cfg), "lease": lease_status(cfg) if cfg.lease else {"state": "not used"}})
        return 0
    try:
        return execute(cfg)
    except LeaseHeld as e:
        print(f"vitlabel: {e}", file=sys.stderr)
        return EXIT_LEASE_HELD
    except LeaseLost as e:
        print(f"vitlabel: {e}; the waves committed so far stay committed", file=sys.stderr)
        return EXIT_LEASE_HELD

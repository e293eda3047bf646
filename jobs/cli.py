"""`vitlabel` command line: one subcommand per job module, all filling the same JobConfig.

Each job module exposes `add_parser(subparsers)`, which registers its subcommand and sets
`func(args) -> int` as the handler. Flags for JobConfig fields are generated from the dataclass,
so the CLI, a job file (`--job-file job.toml`) and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import sys
from typing import Any

from pipeline.config import ConfigError, JobConfig, read_job_file

# subcommand -> the job module (jobs.<module>) that registers it
SUBCOMMANDS = {"run": "run", "nightly": "nightly", "submit": "submit", "query": "query", "report": "html_report",
               "demo": "demo", "bench": "bench", "models": "models"}
_FIELD_HELP: dict[str, str] = {}


def _field_help() -> dict[str, str]:
    """Field comments in config.py are the help text (read once from the source)."""
    if not _FIELD_HELP:
        import inspect
        import re

        import pipeline.config as config_module

        for line in inspect.getsource(config_module.JobConfig).splitlines():
            m = re.match(r"\s+(\w+): .*?#\s*(.+)$", line)
            if m:
                _FIELD_HELP[m.group(1)] = m.group(2).replace("%", "%%")
    return _FIELD_HELP


def add_config_args(p: argparse.ArgumentParser, *, positional_io: bool = False) -> None:
    """Add --job-file, --dry-run and one kebab-case flag per JobConfig field (default: unset)."""
    helps = _field_help()
    p.add_argument("--job-file", help="TOML, YAML or JSON job file; flags given here override it")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, run nothing")
    for f in dataclasses.fields(JobConfig):
        flag = "--" + f.name.replace("_", "-")
        h = helps.get(f.name, "")
        if f.name == "extra":
            p.add_argument("--tag", dest="extra", action="append", metavar="KEY=VALUE", help=h)
        elif str(f.type).startswith("tuple"):
            p.add_argument(flag, dest=f.name, action="append", default=None, help=h + " (repeatable)")
        elif f.type == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=h)


def config_from_args(args: argparse.Namespace, **defaults: Any) -> JobConfig:
    """`defaults` from the subcommand < job file < explicit flags."""
    values: dict[str, Any] = dict(defaults)
    if getattr(args, "job_file", None):
        values.update(read_job_file(args.job_file))
    for f in dataclasses.fields(JobConfig):
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if f.name == "extra":
            pairs = [s.split("=", 1) for s in v]
            bad = [s for s, kv in zip(v, pairs, strict=True) if len(kv) != 2]
            if bad:
                raise ConfigError(f"tag: expected KEY=VALUE, got {bad[0]!r}")
            v = dict(pairs)
        values[f.name] = v
    return JobConfig.from_dict(values)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitlabel", description="Batch image labelling on Ray: ViT, ResNet, "
                                     "MobileNetV2, DINOv2 or SigLIP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        if importlib.util.find_spec(f"jobs.{module}") is not None:  # each job module registers itself
            importlib.import_module(f"jobs.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"vitlabel: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitlabel: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"vitlabel: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


# Errors whose message says everything a user needs (no traceback): bad input, bad model, a failed wave.
_USER_ERRORS = (("pipeline.plan", "RunFailed"), ("pipeline.sources", "SourceError"),
                ("pipeline.models.checkpoint", "ModelError"), ("pipeline.commit", "CommitError"),
                ("pipeline.queries", "ReportError"))


def _is_user_error(e: Exception) -> bool:
    """Checked against modules already imported, so `vitlabel --help` never pays for torch or ray."""
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())

"""`vitlabel query`: SQL (DuckDB) or a built-in report over the committed rows of a table.

    vitlabel query OUTPUT                                   # summary per model version
    vitlabel query OUTPUT "SELECT label, count(*) FROM predictions GROUP BY label"
    vitlabel query OUTPUT --report low-confidence --threshold 0.3 --format csv --out low.csv
    vitlabel query OUTPUT --report diff --model-a sha256:1a2b3c --model-b vit-b16
    vitlabel query OUTPUT --report error-reasons --model vit-b16   # the errors table of `vitlabel report`

Views: `predictions` (committed rows only, with `model` and `dt`) and `runs` (one row per manifest);
see `pipeline.table.connect` and `pipeline.queries` (the named reports, also behind `vitlabel report`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import datetime as _dt
import decimal
import json
import math
import sys
from collections.abc import Iterator
from typing import IO, Any

from pipeline.queries import BINS, MAX_LABELS, PER_LABEL, REPORTS, THRESHOLD

FORMATS = ("table", "csv", "json", "parquet")
TABLE_ROWS = 50  # rows a table shows when --limit is not given
CELL_CHARS = 80  # a wider table cell is cut in the middle


class QueryError(Exception):
    """Bad arguments or bad SQL: exit status 2."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    width = max(map(len, REPORTS))
    reports = "\n".join(f"  {name:<{width}}  {what}" for name, what in REPORTS.items())
    p = sub.add_parser("query", help="run SQL or a built-in report over the committed rows of a table",
                       description="DuckDB SQL over the committed rows: views `predictions` and `runs`.",
                       epilog=f"reports (--report NAME):\n{reports}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", metavar="OUTPUT", help="table root: local path or fsspec URL (s3://bucket/labels)")
    p.add_argument("sql", metavar="SQL", nargs="?", help="a SELECT over predictions / runs ('-': read stdin)")
    p.add_argument("--report", choices=REPORTS, help="a built-in report instead of SQL (default: summary)")
    p.add_argument("--model", help="every report but diff: only this model version, name or digest (prefix)")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="low-confidence: score below (default: %(default)s)")
    p.add_argument("--bins", type=int, default=BINS, help="confidence: histogram bins (default: %(default)s)")
    p.add_argument("--per-label", type=int, default=PER_LABEL,
                   help="lowest-per-label: rows per label (default: %(default)s)")
    p.add_argument("--max-labels", type=int, default=MAX_LABELS,
                   help="lowest-per-label: most frequent labels (default: %(default)s)")
    p.add_argument("--limit", type=int, help=f"at most N rows (the table format shows {TABLE_ROWS} by default)")
    p.add_argument("--model-a", help="diff: model name or digest (prefix) of version A")
    p.add_argument("--model-b", help="diff: model name or digest (prefix) of version B")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: %(default)s)")
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout (required for parquet)")
    p.set_defaults(func=main)


# ------------------------------------------------------------------------------------------------ formats


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_cell(x) for x in v) + "]"
    if isinstance(v, _dt.datetime):
        return v.isoformat(sep=" ", timespec="seconds")
    s = str(v)
    if len(s) > CELL_CHARS:
        half = (CELL_CHARS - 1) // 2
        s = s[:half] + "…" + s[-half:]
    return s


def format_table(columns: list[str], rows: list[tuple]) -> str:
    """A plain aligned text table: numbers right-aligned, everything else left."""
    cells = [[_cell(v) for v in r] for r in rows]
    numeric = [all(isinstance(r[i], (int, float, decimal.Decimal)) and not isinstance(r[i], bool)
                   for r in rows if r[i] is not None) and any(r[i] is not None for r in rows)
               for i in range(len(columns))]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out) + "\n"


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, bytes):
        return base64.b64encode(v).decode()
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    return v


def _pylist_rows(reader: Any) -> Iterator[dict[str, Any]]:
    for batch in reader:
        yield from batch.to_pylist()


def write_csv(reader: Any, f: IO[str]) -> int:
    """CSV with a header; list and struct cells as JSON."""
    w = csv.writer(f, lineterminator="\n")
    w.writerow(reader.schema.names)
    n = 0
    for row in _pylist_rows(reader):
        w.writerow([json.dumps(_json_value(v)) if isinstance(v, (list, dict)) else _json_value(v)
                    for v in row.values()])
        n += 1
    return n


def write_json(reader: Any, f: IO[str]) -> int:
    """One JSON array of row objects (NaN -> null, timestamps ISO 8601)."""
    n = 0
    f.write("[")
    for row in _pylist_rows(reader):
        f.write(",\n" if n else "\n")
        f.write(json.dumps({k: _json_value(v) for k, v in row.items()}, ensure_ascii=False))
        n += 1
    f.write("\n]\n" if n else "]\n")
    return n


def write_parquet(reader: Any, out: str) -> int:
    import fsspec
    import pyarrow.parquet as pq

    n = 0
    with fsspec.open(out, "wb") as f, pq.ParquetWriter(f, reader.schema, compression="zstd") as w:
        for batch in reader:
            w.write_batch(batch)
            n += batch.num_rows
    return n


# ----------------------------------------------------------------------------------------------------- run


def _sql_text(args: argparse.Namespace) -> str | None:
    if args.sql == "-":
        return sys.stdin.read()
    return args.sql


def _check_args(args: argparse.Namespace) -> None:
    if args.sql and args.report:
        raise QueryError(f"expected SQL or --report, got both (SQL {args.sql[:40]!r}, --report {args.report})")
    if args.format == "parquet" and not args.out:
        raise QueryError("--format parquet: expected --out FILE, got none (Parquet is not written to a terminal)")
    if args.limit is not None and args.limit < 0:
        raise QueryError(f"--limit: expected N >= 0, got {args.limit}")
    if (args.model_a or args.model_b) and args.report != "diff":
        raise QueryError(f"--model-a/--model-b: expected with --report diff, got --report {args.report}")
    if args.model and args.sql:
        raise QueryError("--model: expected with --report, got SQL (filter on model / model_digest in the SQL)")


def run_query(args: argparse.Namespace, stdout: IO[str]) -> int:
    import duckdb

    from pipeline import queries, table

    _check_args(args)
    name = None if args.sql else (args.report or "summary")
    con = table.connect(args.output)
    try:
        if name is None:
            rel = con.sql(_sql_text(args))
            if rel is None:
                raise QueryError("SQL: expected a query that returns rows (SELECT ...), got a statement")
        else:
            rel = queries.report(con, name, model=args.model, threshold=args.threshold, bins=args.bins,
                                 per_label=args.per_label, max_labels=args.max_labels, model_a=args.model_a,
                                 model_b=args.model_b)
        summary = queries.diff_summary(con, args.model_a, args.model_b) if name == "diff" else None
        if args.limit is not None:
            rel = rel.limit(args.limit)
        out = args.out
        if args.format == "parquet":
            n = write_parquet(rel.to_arrow_reader(65_536), out)
            print(f"{n} rows -> {out}", file=sys.stderr)
        elif args.format == "table":
            shown = args.limit if args.limit is not None else TABLE_ROWS
            rows = rel.limit(shown + 1).fetchall() if args.limit is None else rel.fetchall()
            text = format_table(rel.columns, rows[:shown]) + ("(no rows)\n" if not rows else "")
            if len(rows) > shown:
                text += "(more rows not shown: use --limit N, or --format csv/json/parquet for all of them)\n"
            if summary is not None:
                text += _summary_line(summary) + "\n"
            with _open_text(out, stdout) as f:
                f.write(text)
        else:
            writer = write_csv if args.format == "csv" else write_json
            with _open_text(out, stdout) as f:
                writer(rel.to_arrow_reader(65_536), f)
            if summary is not None:
                print(_summary_line(summary), file=sys.stderr)
    except queries.ReportError as e:
        raise QueryError(str(e)) from e
    except (duckdb.IOException, duckdb.HTTPException):
        raise  # the table could not be read: not the SQL's fault
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QueryError(f"bad SQL ({type(e).__name__}): {first}") from e
    return 0


def _summary_line(s: dict[str, Any]) -> str:
    rate = "n/a" if s["agreement"] is None else f"{s['agreement']:.4f}"
    return (f"agreement {rate}: {s['agree']} of {s['both']} images labelled by both agree, {s['differ']} differ"
            f" (A {s['a']}: {s['images_a']} images, B {s['b']}: {s['images_b']} images)")


@contextlib.contextmanager
def _open_text(out: str | None, stdout: IO[str]) -> Iterator[IO[str]]:
    if out is None:
        yield stdout
        return
    import fsspec

    with fsspec.open(out, "w", encoding="utf-8", newline="") as f:
        yield f


def main(args: argparse.Namespace) -> int:
    try:
        return run_query(args, sys.stdout)
    except QueryError as e:
        print(f"vitlabel query: {e}", file=sys.stderr)
        return 2

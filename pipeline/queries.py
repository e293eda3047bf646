"""Named reports over the committed table: SQL over the `predictions` and `runs` views of `table.connect`.

    con = table.connect("s3://bucket/labels")
    report(con, "labels").to_arrow_table()            # label distribution per model version
    report(con, "low-confidence", threshold=0.3)      # ok rows below a score, lowest first
    report(con, "error-reasons", model="vit-b16")     # one model version's error rows by reason
    report(con, "diff", model_a="sha256:1a2b", model_b="vit-b16")   # top-1 changes between two versions

Every report is one SELECT (`report_sql` returns its text), so `vitlabel query --report NAME`, the HTML
page of `vitlabel report` (jobs/html_report.py, which has no SQL of its own) and a notebook run the same
numbers. A model version is a (model name, model digest) pair; `digest` columns show its first 12 hex
digits, which `model`, `model_a` and `model_b` accept as a prefix. Every report but `diff` takes `model` to
keep only the rows (and manifests) of the versions it selects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import duckdb

REPORTS: dict[str, str] = {  # name -> what it gives (the help of `vitlabel query --report`)
    "summary": "per model version: images, ok and error rows, labels, mean score, runs, dates",
    "totals": "one row: images, ok, error, labels, mean score, model versions, runs, commits, shard errors",
    "labels": "per model version and label: images, share, mean and min score",
    "label-counts": "per label over the selected rows: images and mean score, most frequent first",
    "confidence": "top-1 score histogram of the ok rows: --bins equal bins over [0, 1], empty bins included",
    "low-confidence": "ok rows scored below --threshold, lowest first, with the runner-up",
    "lowest-per-label": "the --per-label lowest-scored ok rows of each of the --max-labels most frequent labels",
    "errors": "error rows per model and reason (the code before ':'): images, shards, an example",
    "error-reasons": "error rows per reason over the selected rows: images, shards, an example",
    "runs": "per run and model version: commits, images, ok, errors, shards, seconds, images/s",
    "diff": "images both versions labelled ok whose top-1 label differs (--model-a, --model-b)",
}
DIGEST_CHARS = len("sha256:") + 12  # short digest shown in reports
# Defaults shared by `vitlabel query` and `vitlabel report`.
THRESHOLD, BINS, PER_LABEL, MAX_LABELS = 0.5, 20, 12, 100
# An error row's reason: the code before the first ':' of its error ("decode_error: ..." -> decode_error).
REASON = "coalesce(nullif(split_part(error, ':', 1), ''), 'unknown')"


class ReportError(ValueError):
    """A report's arguments do not fit the table (unknown model version, ambiguous digest prefix, ...)."""


@dataclass(frozen=True)
class Version:
    model: str
    model_digest: str
    first_committed: Any  # datetime of its first commit
    images: int

    @property
    def short(self) -> str:
        return f"{self.model} {self.model_digest[:DIGEST_CHARS]}"


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def versions(con: duckdb.DuckDBPyConnection, model: str | None = None) -> list[Version]:
    """Model versions with committed manifests (only those `model` selects), oldest first commit first."""
    cond = version_filter(con, model) if model else "true"
    rows = con.sql(
        "SELECT model, model_digest, min(committed_at) AS first, sum(images) AS images FROM runs"
        f" WHERE {cond} GROUP BY model, model_digest ORDER BY first, model, model_digest"
    ).fetchall()
    return [Version(m, d, first, int(n or 0)) for m, d, first, n in rows]


def version_filter(con: duckdb.DuckDBPyConnection, selector: str) -> str:
    """SQL condition on `predictions` for a model name, a full digest or a digest prefix (with or without
    `sha256:`), usable on `runs` too. Raises ReportError when nothing, or more than one digest, matches."""
    vs = versions(con)
    if any(v.model == selector for v in vs):
        return f"model = {_lit(selector)}"
    want = selector if selector.startswith("sha256:") else f"sha256:{selector}"
    digests = sorted({v.model_digest for v in vs if v.model_digest.startswith(want)})
    known = ", ".join(v.short for v in vs) or "none"
    if not selector or not digests:
        raise ReportError(f"model: expected a model name or digest (prefix) of a committed version ({known}), "
                          f"got {selector!r}")
    if len(digests) > 1:
        raise ReportError(f"model: digest prefix {selector!r} is ambiguous, it matches {len(digests)} versions")
    return f"model_digest = {_lit(digests[0])}"


def _latest_ok(condition: str) -> str:
    """The ok rows of one model version, one per image (the latest labelling if a name spans versions)."""
    return (f"SELECT image_id, source, key, label, score FROM predictions WHERE status = 'ok' AND ({condition})"
            " QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY labelled_at DESC, run_id DESC) = 1")


def diff_filters(con: duckdb.DuckDBPyConnection, model_a: str | None, model_b: str | None
                 ) -> tuple[tuple[str, str], tuple[str, str]]:
    """((condition, name) of A, same of B). Without selectors, a table with exactly two model versions
    diffs the older against the newer."""
    if model_a is None and model_b is None:
        vs = versions(con)
        if len(vs) != 2:
            known = ", ".join(v.short for v in vs) or "none"
            raise ReportError(f"diff: expected --model-a and --model-b (the table has {len(vs)} model versions: "
                              f"{known}), got neither")
        old, new = ((f"model = {_lit(v.model)} AND model_digest = {_lit(v.model_digest)}", v.short) for v in vs)
        return old, new
    if model_a is None or model_b is None:
        raise ReportError(f"diff: expected both --model-a and --model-b, got only {model_a or model_b!r}")
    a, b = version_filter(con, model_a), version_filter(con, model_b)
    if a == b:
        raise ReportError(f"diff: expected two different model versions, got {model_a!r} and {model_b!r}")
    return (a, model_a), (b, model_b)


def _positive(name: str, value: int, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ReportError(f"{name}: expected an integer >= {least}, got {value!r}")
    return value


def report_sql(con: duckdb.DuckDBPyConnection, name: str, *, model: str | None = None,
               threshold: float = THRESHOLD, bins: int = BINS, per_label: int = PER_LABEL,
               max_labels: int = MAX_LABELS, model_a: str | None = None, model_b: str | None = None) -> str:
    """The SELECT of a named report (see REPORTS); parameters a report does not use are ignored."""
    if name not in REPORTS:
        raise ReportError(f"report: expected one of {', '.join(REPORTS)}, got {name!r}")
    if name == "diff":
        if model:
            raise ReportError(f"diff: expected --model-a and --model-b, got --model {model!r}")
        (a, _), (b, _) = diff_filters(con, model_a, model_b)
        return (f"WITH a AS ({_latest_ok(a)}), b AS ({_latest_ok(b)})"
                " SELECT a.source, a.key, a.label AS label_a, a.score AS score_a, b.label AS label_b,"
                " b.score AS score_b, image_id FROM a JOIN b USING (image_id)"
                " WHERE a.label IS DISTINCT FROM b.label ORDER BY a.source, a.key")
    cond = version_filter(con, model) if model else "true"
    d = f"left(model_digest, {DIGEST_CHARS}) AS digest"
    ok = f"FROM predictions WHERE status = 'ok' AND ({cond})"
    label_counts = f"SELECT label, count(*) AS images, avg(score) AS mean_score {ok} GROUP BY label"
    if name == "summary":
        return (f"SELECT model, {d}, count(*) AS images, count(*) FILTER (WHERE status = 'ok') AS ok,"
                " count(*) FILTER (WHERE status = 'error') AS error, count(DISTINCT label) AS labels,"
                " avg(score) AS mean_score, count(DISTINCT run_id) AS runs, min(dt) AS first_dt, max(dt) AS last_dt"
                f" FROM predictions WHERE {cond} GROUP BY model, model_digest ORDER BY model, digest")
    if name == "totals":
        return ("SELECT p.*, r.* FROM (SELECT count(*) AS images, count(*) FILTER (WHERE status = 'ok') AS ok,"
                " count(*) FILTER (WHERE status = 'error') AS error, count(DISTINCT label) AS labels,"
                f" avg(score) AS mean_score FROM predictions WHERE {cond}) p,"
                f" (SELECT (SELECT count(*) FROM (SELECT DISTINCT model, model_digest FROM runs WHERE {cond}))"
                " AS models, count(DISTINCT run_id) AS runs, count(*) AS commits,"
                f" CAST(coalesce(sum(shard_errors), 0) AS BIGINT) AS shard_errors FROM runs WHERE {cond}) r")
    if name == "labels":
        return (f"SELECT model, {d}, label, count(*) AS images,"
                " count(*) / sum(count(*)) OVER (PARTITION BY model, model_digest) AS share,"
                f" avg(score) AS mean_score, min(score) AS min_score {ok} GROUP BY model, model_digest, label"
                " ORDER BY model, digest, images DESC, label")
    if name == "label-counts":
        return f"{label_counts} ORDER BY images DESC, label"
    if name == "confidence":
        n = _positive("bins", bins, 1)
        return (f"WITH s AS (SELECT least(CAST(floor(score * {n}) AS INTEGER), {n - 1}) AS bin {ok}"
                f" AND score IS NOT NULL) SELECT b.bin, b.bin / {float(n)!r} AS lo, (b.bin + 1) / {float(n)!r} AS hi,"
                f" count(s.bin) AS images FROM range({n}) AS b(bin) LEFT JOIN s ON s.bin = b.bin"
                " GROUP BY b.bin ORDER BY b.bin")
    if name == "low-confidence":
        return (f"SELECT model, {d}, label, score, topk_labels[2] AS runner_up, topk_scores[2] AS runner_up_score,"
                f" source, key, image_id {ok} AND score < {float(threshold)!r} ORDER BY score, source, key, model")
    if name == "lowest-per-label":
        top, per = _positive("max_labels", max_labels, 1), _positive("per_label", per_label, 0)
        return (f"WITH shown AS (SELECT label, row_number() OVER (ORDER BY images DESC, label) AS label_rank"
                f" FROM ({label_counts}) QUALIFY label_rank <= {top}),"
                f" picks AS (SELECT label, score, source, key, image_id {ok}"
                f" QUALIFY row_number() OVER (PARTITION BY label ORDER BY score, source, key) <= {per})"
                " SELECT label, label_rank, score, source, key, image_id FROM picks JOIN shown USING (label)"
                " ORDER BY label_rank, score, source, key")
    if name in ("errors", "error-reasons"):
        by = "model, " if name == "errors" else ""
        return (f"SELECT {by}{REASON} AS reason, count(*) AS images, count(DISTINCT source) AS shards,"
                f" min(error) AS example FROM predictions WHERE status = 'error' AND ({cond})"
                f" GROUP BY {by}reason ORDER BY images DESC, {by}reason")
    # runs
    return (f"SELECT run_id, max(committed_at) AS committed_at, model, {d}, count(*) AS commits,"
            " sum(images) AS images, sum(ok) AS ok, sum(error) AS error, sum(shards) AS shards,"
            " sum(shard_errors) AS shard_errors, sum(seconds) AS seconds,"
            " sum(images) / nullif(sum(seconds), 0) AS images_per_s"
            f" FROM runs WHERE {cond} GROUP BY run_id, model, model_digest ORDER BY committed_at, run_id")


def report(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> duckdb.DuckDBPyRelation:
    """A named report as a DuckDB relation (lazy: `.to_arrow_table()`, `.fetchall()`, `.df()`)."""
    return con.sql(report_sql(con, name, **params))


def diff_summary(con: duckdb.DuckDBPyConnection, model_a: str | None = None, model_b: str | None = None
                 ) -> dict[str, Any]:
    """Agreement of two model versions on the images both labelled ok: counts and the agreement rate."""
    (a, name_a), (b, name_b) = diff_filters(con, model_a, model_b)
    images_a, images_b, both, agree = con.execute(
        f"WITH a AS ({_latest_ok(a)}), b AS ({_latest_ok(b)})"
        " SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b), count(*),"
        " count(*) FILTER (WHERE a.label = b.label) FROM a JOIN b USING (image_id)"
    ).fetchall()[0]
    return {"a": name_a, "b": name_b, "images_a": images_a, "images_b": images_b, "both": both, "agree": agree,
            "differ": both - agree, "agreement": agree / both if both else None}

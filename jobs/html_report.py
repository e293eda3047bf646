"""`vitlabel report OUTPUT --html FILE`: one self-contained HTML page about the committed rows.

Summary numbers, images per label (bar chart), top-1 confidence (histogram), errors by reason, and a
contact sheet per label, lowest confidence first, with thumbnails read back from the source shards.
Everything is inline (CSS, SVG, thumbnails as data: URIs): the file opens anywhere, offline.

Each figure is a named report of pipeline.queries (totals, label-counts, confidence, error-reasons,
lowest-per-label), so `vitlabel query OUTPUT --report NAME` prints the numbers the page shows; this
module has no SQL of its own. It owns reading thumbnails back and rendering.

Stable hooks for tests and scripts: #summary [data-stat], #label-chart .bar[data-label][data-count],
#confidence-histogram .bin[data-count], #errors tr[data-reason][data-images][data-shards],
.sheet[data-label] .thumb[data-key][data-score].
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import html
import io
import logging
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.queries import BINS, MAX_LABELS, PER_LABEL, THRESHOLD

log = logging.getLogger(__name__)

THREADS = 8  # shards read at once for thumbnails


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report (charts and thumbnails per label)")
    p.add_argument("output", metavar="OUTPUT", help="table root: local path or fsspec URL (s3://bucket/labels)")
    p.add_argument("--html", required=True, metavar="FILE", help="where to write the page (local or fsspec URL)")
    p.add_argument("--per-label", type=int, default=PER_LABEL, help="thumbnails per label (default: %(default)s)")
    p.add_argument("--thumb", type=int, default=96, help="thumbnail size in pixels (default: %(default)s)")
    p.add_argument("--model", help="only this model version: name or digest (prefix); default: all rows")
    p.add_argument("--max-labels", type=int, default=MAX_LABELS,
                   help="labels shown, most frequent first (default: %(default)s)")
    p.add_argument("--bins", type=int, default=BINS, help="confidence histogram bins (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="low-confidence line on the histogram (default: %(default)s)")
    p.set_defaults(func=main)


# -------------------------------------------------------------------------------------------- thumbnails


@dataclass(frozen=True)
class Thumb:
    data_uri: str | None  # data:image/...;base64,... or None when the image could not be shown
    width: int = 0  # thumbnail pixels
    height: int = 0
    error: str | None = None


def make_thumb(data: bytes, size: int) -> Thumb:
    """Encoded image -> a thumbnail at most size x size (never enlarged) as a data: URI."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for big photos
            im = ImageOps.exif_transpose(im)
            alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            im = im.convert("RGBA" if alpha else "RGB")
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            if alpha or im.width * im.height <= 64 * 64:  # small or transparent: PNG is exact and small
                im.save(buf, format="PNG", optimize=True)
                mime = "image/png"
            else:
                im.save(buf, format="JPEG", quality=85)
                mime = "image/jpeg"
            return Thumb(f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}", im.width, im.height)
    except Exception as e:  # noqa: BLE001 - any undecodable image becomes a placeholder, never a failed report
        return Thumb(None, error=f"decode_error: {type(e).__name__}: {e}"[:200])


def _shard_for(source: str, config: dict[str, Any], recorded: str | None = None) -> tuple[Any, dict[str, str]]:
    """How to read `source` again: in the format its manifest recorded (`sources.Shard.format`); for older
    manifests (no format), the run's `input_format`, else the format `list_shards` gives its name."""
    from pipeline.sources import Shard, guess_format

    fmt = recorded or config.get("input_format") or "auto"
    kw = {"image_column": config.get("image_column") or "auto", "key_column": config.get("key_column") or "auto"}
    return Shard(uri=source, format=guess_format(source) if fmt == "auto" else fmt), kw


def _read_shard(source: str, keys: set[str], config: dict[str, Any], size: int, recorded: str | None = None
                ) -> dict[str, Thumb]:
    """Thumbnails of `keys` from one shard, read once, stopping as soon as all keys are found."""
    from pipeline.sources import iter_shard

    found: dict[str, Thumb] = {}
    reason = "key not found in the shard"
    try:
        shard, kw = _shard_for(source, config, recorded)
        with contextlib.closing(iter_shard(shard, **kw)) as records:
            for rec in records:
                if rec.key in keys and rec.key not in found:
                    ok = rec.data is not None
                    found[rec.key] = make_thumb(rec.data, size) if ok else Thumb(None, error=rec.error)
                    if len(found) == len(keys):
                        break
    except Exception as e:  # noqa: BLE001 - a missing or broken shard only costs its thumbnails
        reason = f"shard unreadable: {e}"[:200]
        log.warning("thumbnails: %s", reason)
    for k in keys - found.keys():
        found[k] = Thumb(None, error=reason)
    return found


def fetch_thumbnails(wanted: Iterable[tuple[str, str]], size: int, configs: dict[str, dict[str, Any]] | None = None,
                     formats: dict[str, str] | None = None) -> dict[tuple[str, str], Thumb]:
    """{(source, key): Thumb} for every wanted (source, key); each source shard is read at most once.

    `configs` maps a source to the run config that labelled it (input_format, image_column, key_column),
    `formats` to the shard format its manifest recorded (absent in manifests older than that field)."""
    by_source: dict[str, set[str]] = {}
    for source, key in wanted:
        by_source.setdefault(source, set()).add(key)
    configs, formats = configs or {}, formats or {}
    out: dict[tuple[str, str], Thumb] = {}
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        futures = {src: pool.submit(_read_shard, src, keys, configs.get(src, {}), size, formats.get(src))
                   for src, keys in by_source.items()}
        for src, fut in futures.items():
            out.update({(src, k): t for k, t in fut.result().items()})
    return out


# --------------------------------------------------------------------------------------------------- data


@dataclass
class ReportData:
    output: str
    stats: dict[str, Any]
    versions: list[Any]
    labels: list[tuple[str, int, float | None]]  # (label, images, mean score), most frequent first
    other_labels: tuple[int, int]  # (labels beyond max_labels, their images)
    bins: list[int]
    errors: list[tuple[str, int, int, str]]  # (reason, images, shards, example)
    sheets: dict[str, list[tuple[str, str, float, Thumb]]]  # label -> [(source, key, score, thumb)]


def gather(output: str, *, model: str | None = None, per_label: int = PER_LABEL, thumb: int = 96,
           max_labels: int = MAX_LABELS, bins: int = BINS) -> ReportData:
    """The page's figures, each one named report of pipeline.queries over the same selection, and the
    thumbnails of the `lowest-per-label` rows."""
    from pipeline import queries, table

    con = table.connect(output)
    stats = queries.report(con, "totals", model=model).to_arrow_table().to_pylist()[0]
    stats["errors"] = stats.pop("error")
    all_labels = queries.report(con, "label-counts", model=model).fetchall()
    labels, rest = all_labels[:max_labels], all_labels[max_labels:]
    hist = [n for _, _, _, n in queries.report(con, "confidence", model=model, bins=bins).fetchall()]
    errors = queries.report(con, "error-reasons", model=model).fetchall()
    picks = queries.report(con, "lowest-per-label", model=model, per_label=per_label, max_labels=max_labels
                           ).fetchall()

    configs: dict[str, dict[str, Any]] = {}
    formats: dict[str, str] = {}
    for m in table.list_manifests(output):
        for src, shard in m.get("shards", {}).items():
            configs[src] = m.get("config") or {}
            if isinstance(shard, dict) and shard.get("format"):
                formats[src] = shard["format"]
            else:
                formats.pop(src, None)  # the latest manifest naming a shard says how it was read
    thumbs = fetch_thumbnails(((s, k) for _, _, _, s, k, _ in picks), thumb, configs, formats)
    sheets: dict[str, list] = {lab: [] for lab, _, _ in labels}
    for lab, _, score, src, key, _ in picks:
        sheets[lab].append((src, key, score, thumbs[(src, key)]))
    return ReportData(output=output, stats=stats, versions=queries.versions(con, model), labels=labels,
                      other_labels=(len(rest), sum(r[1] for r in rest)), bins=hist, errors=errors, sheets=sheets)


# --------------------------------------------------------------------------------------------------- HTML

_CSS = """
:root { --ink:#1d2430; --muted:#5f6b7a; --line:#e3e7ee; --bg:#f6f7fb; --card:#fff; --accent:#3b6fd8; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:linear-gradient(120deg,#1f3b73,#3b6fd8); color:#fff; padding:28px 36px 22px; }
header h1 { margin:0 0 4px; font-size:24px; font-weight:650; }
header .meta { margin:0; opacity:.85; font-size:13px; word-break:break-all; }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin-top:18px; }
.card { background:rgba(255,255,255,.14); border-radius:10px; padding:10px 16px; min-width:112px; }
.card .value { display:block; font-size:26px; font-weight:700; font-variant-numeric:tabular-nums; }
.card .name { font-size:12px; text-transform:uppercase; letter-spacing:.06em; opacity:.85; }
.card.bad .value { color:#ffd0d0; }
main { padding:24px 36px 40px; max-width:1400px; }
h2 { font-size:18px; margin:28px 0 12px; }
.charts { display:flex; flex-wrap:wrap; gap:20px; }
figure.chart { margin:0; background:var(--card); border:1px solid var(--line); border-radius:12px; padding:14px 16px;
               flex:1 1 480px; }
figure.chart figcaption { font-weight:600; margin-bottom:8px; }
figure.chart svg { width:100%; height:auto; display:block; }
svg text { font:12px system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; fill:var(--ink); }
svg .axis { stroke:#aab3c0; stroke-width:1; }
svg .muted { fill:var(--muted); }
table { border-collapse:collapse; background:var(--card); border:1px solid var(--line); border-radius:10px;
        overflow:hidden; min-width:520px; }
th, td { text-align:left; padding:7px 12px; border-bottom:1px solid var(--line); font-size:14px; }
th { background:#eef1f7; font-weight:600; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
td code { font-size:12px; color:var(--muted); }
.empty { color:var(--muted); font-style:italic; }
.sheet { background:var(--card); border:1px solid var(--line); border-radius:12px; padding:12px 16px 16px;
         margin-bottom:16px; }
.sheet h3 { margin:0 0 10px; font-size:16px; display:flex; align-items:center; gap:10px; }
.sheet h3 .swatch { width:12px; height:12px; border-radius:3px; display:inline-block; }
.sheet h3 .sub { font-weight:400; color:var(--muted); font-size:13px; }
.grid { display:flex; flex-wrap:wrap; gap:10px; }
figure.thumb { margin:0; width:calc(var(--t) + 12px); background:#fafbfd; border:1px solid var(--line);
               border-radius:8px; padding:5px; border-bottom:4px solid var(--c); }
figure.thumb .frame { width:var(--t); height:var(--t); display:flex; align-items:center; justify-content:center;
                      background:#111; border-radius:4px; overflow:hidden; }
figure.thumb img { display:block; }
figure.thumb img.small { image-rendering:pixelated; }
figure.thumb.placeholder .frame { background:repeating-linear-gradient(45deg,#eceff4 0 8px,#f7f8fb 8px 16px);
                                  color:var(--muted); font-size:12px; text-align:center; padding:6px; }
figure.thumb figcaption { font-size:11px; margin-top:4px; display:flex; justify-content:space-between; gap:4px; }
figure.thumb .key { overflow:hidden; text-overflow:ellipsis; white-space:nowrap; color:var(--muted); }
figure.thumb .score { font-weight:700; color:var(--c); font-variant-numeric:tabular-nums; }
footer { color:var(--muted); font-size:12px; padding:0 36px 28px; }
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _colour(i: int) -> str:
    return f"hsl({(i * 137.508) % 360:.1f}, 62%, 52%)"  # golden-angle hues: neighbours differ


def _score_colour(score: float | None) -> str:
    s = 0.0 if score is None else max(0.0, min(1.0, float(score)))
    return f"hsl({s * 120:.0f}, 70%, 40%)"  # red (0) .. green (1)


def _fmt(n: Any) -> str:
    if n is None:
        return "–"
    if isinstance(n, float):
        return f"{n:.3f}"
    return f"{n:,}"


def label_chart(labels: list[tuple[str, int, float | None]], other: tuple[int, int]) -> str:
    rows = list(labels)
    if other[0]:
        rows.append((f"{other[0]} other labels", other[1], None))
    longest = max([min(len(label), 22) for label, _, _ in rows] + [4])
    row_h, label_w, bar_w, pad = 24, 16 + 7 * longest, 400, 8  # label column as wide as the longest label
    height = max(1, len(rows)) * row_h + pad * 2
    top = max([n for _, n, _ in rows] + [1])
    parts = [f'<svg viewBox="0 0 {label_w + bar_w + 70} {height}" role="img" aria-label="images per label">']
    if not rows:
        parts.append(f'<text x="10" y="{pad + 16}" class="muted">no ok rows</text>')
    for i, (label, n, mean) in enumerate(rows):
        y = pad + i * row_h
        w = max(1.0, bar_w * n / top)
        shown = label if len(label) <= 22 else label[:21] + "…"
        cls = "bar other" if other[0] and i == len(rows) - 1 else "bar"
        tip = f"{label}: {n:,} images" + (f", mean score {mean:.3f}" if mean is not None else "")
        parts.append(
            f'<g class="{cls}" data-label="{_e(label)}" data-count="{n}"><title>{_e(tip)}</title>'
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">{_e(shown)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" rx="3" '
            f'fill="{"#b8c0cc" if cls != "bar" else _colour(i)}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 16}" class="muted">{n:,}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(bins: list[int], threshold: float) -> str:
    w, h, left, bottom, top_pad = 560, 260, 48, 28, 12
    plot_w, plot_h = w - left - 12, h - bottom - top_pad
    top = max(bins + [1])
    nb = max(1, len(bins))
    bw = plot_w / nb
    parts = [f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="top-1 confidence histogram">',
             f'<line class="axis" x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}"/>',
             f'<line class="axis" x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}"/>',
             f'<text x="{left - 6}" y="{top_pad + 10}" text-anchor="end" class="muted">{top:,}</text>',
             f'<text x="{left - 6}" y="{top_pad + plot_h}" text-anchor="end" class="muted">0</text>']
    for i, n in enumerate(bins):
        lo, hi = i / nb, (i + 1) / nb
        bh = plot_h * n / top
        x = left + i * bw
        parts.append(
            f'<g class="bin" data-lo="{lo:.4g}" data-hi="{hi:.4g}" data-count="{n}">'
            f'<title>{lo:.2f}–{hi:.2f}: {n:,} images</title>'
            f'<rect x="{x + 1:.1f}" y="{top_pad + plot_h - bh:.1f}" width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" '
            f'rx="2" fill="{_score_colour((lo + hi) / 2)}"/>'
            + (f'<text x="{x + bw / 2:.1f}" y="{top_pad + plot_h - bh - 3:.1f}" text-anchor="middle" '
               f'class="muted" font-size="10">{n:,}</text>' if n else "")
            + "</g>")
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{left + t * plot_w:.1f}" y="{h - 8}" text-anchor="middle" class="muted">{t:g}</text>')
    if 0 < threshold < 1:
        x = left + threshold * plot_w
        parts.append(f'<line id="threshold" x1="{x:.1f}" y1="{top_pad}" x2="{x:.1f}" y2="{top_pad + plot_h}" '
                     'stroke="#d33" stroke-dasharray="4 3"/>'
                     f'<text x="{x + 4:.1f}" y="{top_pad + 12}" fill="#d33">low confidence &lt; {threshold:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _errors_table(errors: list[tuple[str, int, int, str]], shard_errors: int) -> str:
    note = (f'<p class="shard-errors">{shard_errors:,} shard(s) could not be read to their end '
            "(see <code>vitlabel query OUTPUT --report runs</code>).</p>") if shard_errors else ""
    if not errors:
        return '<p class="empty">No error rows.</p>' + note
    rows = "".join(f'<tr data-reason="{_e(r)}" data-images="{n}" data-shards="{s}"><td>{_e(r)}</td>'
                   f'<td class="num">{n:,}</td><td class="num">{s:,}</td><td><code>{_e(ex[:160])}</code></td></tr>'
                   for r, n, s, ex in errors)
    return ("<table><thead><tr><th>reason</th><th>images</th><th>shards</th><th>example</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>" + note)


def _sheet(i: int, label: str, count: int, mean: float | None, items: list, size: int) -> str:
    figs = []
    for src, key, score, t in items:
        attrs = (f'data-key="{_e(key)}" data-source="{_e(src)}" data-score="{score:.6f}" '
                 f'style="--c:{_score_colour(score)}"')
        cap = (f'<figcaption><span class="key" title="{_e(src)}#{_e(key)}">{_e(key)}</span>'
               f'<span class="score">{score:.2f}</span></figcaption>')
        if t.data_uri:
            scale = size / max(t.width, t.height, 1)
            dw, dh = round(t.width * scale), round(t.height * scale)
            small = ' class="small"' if max(t.width, t.height) * 2 <= size else ""
            figs.append(f'<figure class="thumb" {attrs}><div class="frame"><img{small} src="{t.data_uri}" '
                        f'width="{dw}" height="{dh}" alt="{_e(key)}"></div>{cap}</figure>')
        else:
            figs.append(f'<figure class="thumb placeholder" {attrs} data-error="{_e(t.error or "")}">'
                        f'<div class="frame" title="{_e(t.error or "")}">no preview</div>{cap}</figure>')
    sub = f"{count:,} images" + (f" · mean score {mean:.3f}" if mean is not None else "")
    body = "".join(figs) or '<p class="empty">no images</p>'
    return (f'<section class="sheet" id="sheet-{i}" data-label="{_e(label)}"><h3>'
            f'<span class="swatch" style="background:{_colour(i)}"></span>{_e(label)} <span class="sub">{sub}</span>'
            f'</h3><div class="grid">{body}</div></section>')


def render(d: ReportData, *, thumb: int = 96, threshold: float = THRESHOLD) -> str:
    s = d.stats
    cards = [("images", s["images"]), ("ok", s["ok"]), ("errors", s["errors"]), ("labels", s["labels"]),
             ("models", s["models"]), ("runs", s["runs"]), ("mean score", s["mean_score"])]
    card_html = "".join(
        f'<div class="card{" bad" if k == "errors" and v else ""}" data-stat="{_e(k)}" data-value="{_e(v)}">'
        f'<span class="value">{_fmt(v)}</span><span class="name">{_e(k)}</span></div>' for k, v in cards)
    models = ", ".join(f"{_e(v.short)} ({v.images:,} images)" for v in d.versions) or "none"
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    sheets = "".join(_sheet(i, lab, n, mean, d.sheets.get(lab, []), thumb) for i, (lab, n, mean) in enumerate(d.labels))
    more = (f'<p class="empty">{d.other_labels[0]:,} less frequent labels are not shown '
            "(raise --max-labels).</p>") if d.other_labels[0] else ""
    per = max((len(v) for v in d.sheets.values()), default=0)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>vitlabel report: {_e(d.output)}</title><style>{_CSS}</style></head>
<body style="--t:{thumb}px">
<header id="summary"><h1>Image labels</h1>
<p class="meta">{_e(d.output)} · models: {models} · {s["commits"]:,} commits · generated {now}</p>
<div class="cards">{card_html}</div></header>
<main>
<section class="charts">
<figure class="chart" id="label-chart"><figcaption>Images per label</figcaption>{label_chart(d.labels, d.other_labels)}
</figure>
<figure class="chart" id="confidence-histogram"><figcaption>Top-1 confidence (ok images)</figcaption>
{histogram(d.bins, threshold)}</figure>
</section>
<h2>Errors by reason</h2><section id="errors">{_errors_table(d.errors, s["shard_errors"])}</section>
<h2>Lowest-confidence images per label</h2>
<section id="contact-sheets" data-per-label="{per}">{sheets or '<p class="empty">No ok rows yet.</p>'}{more}</section>
</main>
<footer>Committed rows only (files named by manifests in _manifests/). Thumbnails are read from the source shards.
</footer>
</body></html>
"""


def main(args: argparse.Namespace) -> int:
    import fsspec

    from pipeline.queries import ReportError

    for name in ("per_label", "thumb", "max_labels", "bins"):
        if getattr(args, name) < (0 if name == "per_label" else 1):
            print(f"vitlabel report: --{name.replace('_', '-')}: expected a positive number, got "
                  f"{getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        d = gather(args.output, model=args.model, per_label=args.per_label, thumb=args.thumb,
                   max_labels=args.max_labels, bins=args.bins)
    except ReportError as e:
        print(f"vitlabel report: {e}", file=sys.stderr)
        return 2
    page = render(d, thumb=args.thumb, threshold=args.threshold)
    with fsspec.open(args.html, "w", encoding="utf-8") as f:
        f.write(page)
    shown = sum(1 for v in d.sheets.values() for _, _, _, t in v if t.data_uri)
    print(f"{args.html}: {len(page.encode()) / 1024:.0f} KiB, {len(d.labels)} labels, {shown} thumbnails")
    return 0

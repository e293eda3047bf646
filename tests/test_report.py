"""`vitlabel report`: the self-contained HTML page, its numbers, its thumbnails, and how Chromium renders it."""

from __future__ import annotations

import base64
import glob
import io
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pyarrow.compute as pc
import pytest
from _tables import LABELS, commit_shards, png, rows
from PIL import Image

from jobs import html_report
from jobs.cli import main as cli
from pipeline import queries, table
from pipeline.sources import iter_shard, list_shards, write_webdataset
from pipeline.staging import write_staging

CHROMIUM = "/usr/bin/chromium"
COLOURS = {"cat": (220, 120, 40), "dog": (60, 140, 220), "bird": (90, 190, 90), "fish": (170, 80, 200)}
DIGEST = "sha256:" + "1a" * 32
PER_LABEL, THUMB, BINS = 4, 64, 20


def build(root: str) -> tuple[str, str]:
    """Two WebDataset shards of colourful PNGs under ROOT/shards, a table at ROOT/table labelling them.

    In the table: 4 labels with scores off the histogram's bin edges, error rows, an ok row whose image
    bytes do not decode (key x-05), an ok row whose key is not in its shard (gone), and an uncommitted
    staged row with the lowest score of all (it must never show)."""
    items: dict[str, list[tuple]] = {}
    for s in range(2):
        samples, its = [], []
        for i in range(14):
            key = f"x-{s}{i:02d}"
            label = LABELS[(i + s) % len(LABELS)]
            data = png(COLOURS[label], (64 + 16 * (i % 3), 48), seed=i + 7 * s)
            score = round(0.012 + ((i * 37 + s * 11) % 97) / 100, 3)
            if (s, i) == (0, 5):
                data, score = b"these bytes are not an image", 0.071
            samples.append((key, {"png": data, "cls": label.encode()}))
            if i in (3, 11):
                its.append((key, None, None, "decode_error: cannot identify image" if i == 3 else "too_large: big"))
            else:
                its.append((key, label, score))
        write_webdataset(f"{root}/shards/s-{s}.tar", samples)
        uri = next(sh.uri for sh in list_shards(f"{root}/shards") if sh.uri.endswith(f"/s-{s}.tar"))
        items[uri] = its
    first = next(iter(items))
    items[first].append(("gone", "cat", 0.051))
    out = f"{root}/table"
    commit_shards(out, items, commit_id="c1", run_id="run-1", model="vit-a", digest=DIGEST)
    write_staging([rows(first, [("x-001", "cat", 0.001)])], output=out, run_id="run-9", model_digest=DIGEST,
                  embeddings=False)
    for its in items.values():
        for it in its:
            assert it[2] is None or abs(it[2] * BINS - round(it[2] * BINS)) > 1e-3, it  # off the bin edges
    return out, first


class Page(HTMLParser):
    """The parts of the report tests look at: bars, bins, stats, error rows and thumbnails per sheet."""

    VOID = {"img", "meta", "br", "hr", "input", "link", "source"}

    def __init__(self, text: str):
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.bars: list[dict] = []
        self.bins: list[dict] = []
        self.stats: dict[str, str] = {}
        self.errors: list[tuple[str, int, int]] = []  # (reason, images, shards)
        self.sheets: dict[str, list[dict]] = {}
        self.ids: set[str] = set()
        self.feed(text)

    def _inside(self, cls: str) -> dict | None:
        for _, attrs in reversed(self.stack):
            if cls in attrs.get("class", "").split():
                return attrs
        return None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if "id" in a:
            self.ids.add(a["id"])
        if "bar" in classes and self._inside("chart") is not None:
            self.bars.append(a)
        if "bin" in classes:
            self.bins.append(a)
        if "data-stat" in a:
            self.stats[a["data-stat"]] = a["data-value"]
        if tag == "tr" and "data-reason" in a:
            self.errors.append((a["data-reason"], int(a["data-images"]), int(a["data-shards"])))
        if "sheet" in classes:
            self.sheets[a["data-label"]] = []
        if "thumb" in classes:
            sheet = self._inside("sheet")
            self.sheets[sheet["data-label"]].append({**a, "classes": classes, "img": None})
        if tag == "img":
            thumb = self._inside("thumb")
            if thumb is not None:
                self.sheets[self._inside("sheet")["data-label"]][-1]["img"] = a
        if tag not in self.VOID:
            self.stack.append((tag, a))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break


def expected(out: str) -> dict:
    t = table.read_table(out)
    ok = t.filter(pc.equal(t["status"], "ok")).to_pylist()
    counts: dict[str, int] = {}
    for r in ok:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    bins = [0] * BINS
    for r in ok:
        bins[min(math.floor(r["score"] * BINS), BINS - 1)] += 1
    sheets = {}
    for label in counts:
        mine = sorted((r for r in ok if r["label"] == label), key=lambda r: (r["score"], r["source"], r["key"]))
        sheets[label] = [r["key"] for r in mine[:PER_LABEL]]
    reasons = sorted({r["error"].split(":")[0] for r in t.filter(pc.equal(t["status"], "error")).to_pylist()})
    return {"rows": t.num_rows, "ok": len(ok), "counts": counts, "bins": bins, "sheets": sheets, "reasons": reasons}


def decode_data_uri(uri: str) -> Image.Image:
    m = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", uri)
    assert m, uri[:60]
    im = Image.open(io.BytesIO(base64.b64decode(m.group(2))))
    im.load()
    return im


def check_page(page: Page, want: dict) -> None:
    """The page's numbers against pyarrow's, and every thumbnail against Pillow."""
    assert {"summary", "label-chart", "confidence-histogram", "errors", "contact-sheets"} <= page.ids
    assert {b["data-label"]: int(b["data-count"]) for b in page.bars} == want["counts"]
    assert [int(b["data-count"]) for b in page.bars] == sorted(want["counts"].values(), reverse=True)
    assert [int(b["data-count"]) for b in page.bins] == want["bins"]
    assert int(page.stats["images"]) == want["rows"] and int(page.stats["ok"]) == want["ok"]
    assert int(page.stats["errors"]) == want["rows"] - want["ok"] and page.stats["models"] == "1"
    assert sorted(r for r, _, _ in page.errors) == want["reasons"]
    assert list(page.sheets) == [b["data-label"] for b in page.bars]  # most frequent label first
    for label, thumbs in page.sheets.items():
        assert [t["data-key"] for t in thumbs] == want["sheets"][label]  # lowest confidence first
        scores = [float(t["data-score"]) for t in thumbs]
        assert scores == sorted(scores)
        for t in thumbs:
            if t["data-key"] in ("x-005", "gone"):
                assert "placeholder" in t["classes"] and t["img"] is None
                assert t["data-error"].startswith("decode_error" if t["data-key"] == "x-005" else "key not found")
            else:
                im = decode_data_uri(t["img"]["src"])
                assert max(im.size) <= THUMB and len(set(im.convert("RGB").getdata())) > 10
    assert sum(len(v) for v in page.sheets.values()) == sum(len(v) for v in want["sheets"].values())


def check_page_is_queries(page: Page, out: str, model: str | None = None) -> None:
    """Every figure on the page is the result of a named report (pipeline.queries) on the same table."""
    con = table.connect(out)

    def q(name: str, **kw) -> list[dict]:
        return queries.report(con, name, model=model, **kw).to_arrow_table().to_pylist()

    totals = q("totals")[0]
    cards = {"images": "images", "ok": "ok", "errors": "error", "labels": "labels", "models": "models",
             "runs": "runs", "mean score": "mean_score"}
    assert {k: page.stats[k] for k in cards} == {k: str(totals[c]) for k, c in cards.items()}
    assert [(b["data-label"], int(b["data-count"])) for b in page.bars] == [
        (r["label"], r["images"]) for r in q("label-counts")]
    hist = q("confidence", bins=BINS)
    assert [int(b["data-count"]) for b in page.bins] == [r["images"] for r in hist]
    assert [float(b["data-lo"]) for b in page.bins] == pytest.approx([r["lo"] for r in hist], abs=1e-4)
    assert page.errors == [(r["reason"], r["images"], r["shards"]) for r in q("error-reasons")]
    assert [(label, t["data-source"], t["data-key"]) for label, ts in page.sheets.items() for t in ts] == [
        (r["label"], r["source"], r["key"]) for r in q("lowest-per-label", per_label=PER_LABEL)]


def render(out: str, dest: str, *extra: str) -> str:
    assert cli(["-q", "report", out, "--html", dest, "--per-label", str(PER_LABEL), "--thumb", str(THUMB),
                "--bins", str(BINS), *extra]) == 0
    with open(dest, encoding="utf-8") as f:
        return f.read()


def test_report_page_matches_table(tmp_path, capsys):
    out, _ = build(str(tmp_path))
    text = render(out, str(tmp_path / "r.html"))
    want = expected(out)
    assert "gone" in want["sheets"]["cat"] and "x-005" in want["sheets"]["dog"]  # the fixture hits both cases
    assert want["sheets"]["cat"][0] != "x-001"  # the staged row (score 0.001) is not in the table
    page = Page(text)
    check_page(page, want)
    check_page_is_queries(page, out)
    capsys.readouterr()
    assert cli(["-q", "query", out, "--report", "error-reasons", "--format", "json"]) == 0  # what the page shows
    shown = [(r["reason"], r["images"], r["shards"]) for r in json.loads(capsys.readouterr().out)]
    assert shown == page.errors and len(shown) == 2
    # self-contained: nothing is fetched from anywhere
    assert re.search(r'\b(src|href)\s*=\s*"(?!data:)', text) is None
    assert "@import" not in text and "url(" not in text and "<script" not in text and "<link" not in text


def test_report_model_filter_and_bad_model(tmp_path, capsys):
    out, first = build(str(tmp_path))
    relabel = [("x-000", "dog", 0.333), ("x-001", "dog", 0.444)]
    commit_shards(out, {first: relabel}, commit_id="c2", run_id="run-2", model="vit-b", digest="sha256:" + "2b" * 32)
    page = Page(render(out, str(tmp_path / "b.html"), "--model", "vit-b"))
    check_page_is_queries(page, out, model="vit-b")
    assert {b["data-label"]: int(b["data-count"]) for b in page.bars} == {"dog": 2}
    assert page.stats["images"] == "2" and page.stats["models"] == "1"
    assert [t["data-key"] for t in page.sheets["dog"]] == ["x-000", "x-001"]
    page = Page(render(out, str(tmp_path / "all.html")))
    check_page_is_queries(page, out)
    assert page.stats["models"] == "2"
    assert cli(["-q", "report", out, "--html", str(tmp_path / "x.html"), "--model", "nope"]) == 2
    assert "expected a model name or digest" in capsys.readouterr().err


def test_report_empty_table(tmp_path):
    text = render(str(tmp_path / "nothing"), str(tmp_path / "e.html"))
    page = Page(text)
    assert page.stats["images"] == "0" and page.bars == [] and page.sheets == {}
    assert "No ok rows yet" in text and "No error rows" in text


def test_report_from_s3(s3, tmp_path):
    out, _ = build("s3://test-bucket/data")
    check_page(Page(render(out, str(tmp_path / "s3.html"))), expected(out))


def test_report_reads_shards_in_their_recorded_format(tmp_path):
    """A manifest's `shards[src]["format"]` says how to read a shard back; without it (older manifests) the
    report guesses from the name, which fails for a WebDataset shard not named .tar."""
    samples = [(f"k{i}", {"png": png(COLOURS["cat"], seed=i)}) for i in range(3)]
    write_webdataset(str(tmp_path / "odd.shard"), samples)
    uri = (tmp_path / "odd.shard").as_uri()
    out = str(tmp_path / "table")
    commit_shards(out, {uri: [(k, "cat", 0.2 + i / 10) for i, (k, _) in enumerate(samples)]}, commit_id="c1",
                  run_id="run-1", model="vit-a", digest=DIGEST)
    (path,) = glob.glob(f"{out}/_manifests/*.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)

    def thumbs(recorded: str | None) -> list:
        manifest["shards"][uri].pop("format", None)
        if recorded:
            manifest["shards"][uri]["format"] = recorded
        with open(path, "w", encoding="utf-8") as f:
            json.dump(manifest, f)
        return [t for _, _, _, t in html_report.gather(out, per_label=3, thumb=32).sheets["cat"]]

    old = thumbs(None)  # the guess: not a .tar or .parquet name, so a folder, which holds no such keys
    assert len(old) == 3 and all(t.data_uri is None and t.error == "key not found in the shard" for t in old)
    new = thumbs("webdataset")
    assert len(new) == 3 and all(t.data_uri and t.error is None for t in new)
    bad = html_report.fetch_thumbnails([(uri, "k0")], 32, formats={uri: "tar"})[(uri, "k0")]
    assert bad.data_uri is None and "expected one of webdataset, parquet, folder, got 'tar'" in bad.error


def test_fetch_thumbnails_reads_each_shard_once_and_stops_early(tmp_path, monkeypatch):
    import pipeline.sources

    samples = [(f"k{i}", {"png": png((200, 60, 60), seed=i)}) for i in range(6)]
    good, cut = str(tmp_path / "good.tar"), str(tmp_path / "cut.tar")
    write_webdataset(good, samples)
    write_webdataset(cut, samples)
    with open(cut, "r+b") as f:  # chop the tail: reading past the first samples raises ShardError
        f.truncate(os.path.getsize(cut) // 2)
    uris = {sh.uri.rsplit("/", 1)[-1]: sh.uri for sh in list_shards(str(tmp_path))}
    calls: list[str] = []

    def counting(shard, **kw):
        calls.append(shard.uri)
        return iter_shard(shard, **kw)

    monkeypatch.setattr(pipeline.sources, "iter_shard", counting)
    wanted = [(uris["good.tar"], "k4"), (uris["good.tar"], "k1"), (uris["cut.tar"], "k0"), (uris["good.tar"], "k1")]
    got = html_report.fetch_thumbnails(wanted, 32)
    assert sorted(calls) == sorted([uris["good.tar"], uris["cut.tar"]])  # one read per shard
    assert set(got) == set(wanted)
    assert all(t.data_uri and t.error is None for t in got.values())  # k0 read before the cut: no error
    got = html_report.fetch_thumbnails([(uris["cut.tar"], "k5"), (uris["cut.tar"], "k0")], 32)
    assert got[(uris["cut.tar"], "k0")].data_uri and got[(uris["cut.tar"], "k5")].error.startswith("shard unreadable")
    got = html_report.fetch_thumbnails([("file:///nowhere/x.tar", "k0")], 32)
    assert got[("file:///nowhere/x.tar", "k0")].error.startswith("shard unreadable")


def test_make_thumb():
    t = html_report.make_thumb(png((10, 200, 30), (300, 120)), 96)
    assert (t.width, t.height) == (96, 38) and decode_data_uri(t.data_uri).size == (96, 38)
    t = html_report.make_thumb(png((10, 200, 30), (20, 10)), 96)  # never enlarged: the page scales it
    assert (t.width, t.height) == (20, 10) and t.data_uri.startswith("data:image/png")
    t = html_report.make_thumb(b"\x89PNG\r\n\x1a\n broken", 96)
    assert t.data_uri is None and t.error.startswith("decode_error")


# ------------------------------------------------------------------------------------------- Chromium


def chromium_or_skip() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.environ.get("VITLABEL_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"VITLABEL_REQUIRE_CHROMIUM=1 but {CHROMIUM} is missing (apt-get install -y chromium)")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); set VITLABEL_REQUIRE_CHROMIUM=1 to fail")


def chromium(browser: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=True)


def test_report_renders_in_chromium(tmp_path):
    browser = chromium_or_skip()
    out, _ = build(str(tmp_path))
    dest = tmp_path / "report.html"
    render(out, str(dest))
    url = dest.as_uri()

    dom = chromium(browser, tmp_path, "--dump-dom", url).stdout
    page = Page(dom)
    want = expected(out)
    check_page(page, want)  # the DOM Chromium built has every bar, bin and thumbnail, with decodable data URIs
    shown = [t for v in page.sheets.values() for t in v if t["img"] is not None]
    assert len(shown) == sum(len(v) for v in want["sheets"].values()) - 2  # all but the two placeholders

    shot = tmp_path / "report.png"
    chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars", url)
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 2000)
    colours = im.getcolors(maxcolors=1 << 20)
    assert len(colours) > 1000  # charts, gradients and thumbnails, not a blank or error page
    top = max(colours)[0] / (im.width * im.height)
    assert top < 0.8  # no single colour (a blank background) fills the page
    if os.environ.get("VITLABEL_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["VITLABEL_KEEP_SCREENSHOT"])

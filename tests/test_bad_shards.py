"""Bad shards in one real run: each gets a clear per-shard error (manifest and run summary), the others commit.

Which shards count as done (never read again for this model digest) is part of the contract:
- corrupt content (truncated or garbled tar, not a tar, not parquet, no image column, unsafe members,
  duplicate keys): done, with the error; the images read before the damage are labelled, once;
- a shard the reader could not reach (deleted after listing, permission denied): not done, so the next run
  tries it again (`shards_to_retry` in the summary).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _digits import held_out_pngs

from pipeline import plan
from pipeline.config import JobConfig
from pipeline.sources import make_image_id, write_webdataset
from pipeline.table import list_manifests, read_table


@pytest.fixture(scope="module")
def pngs() -> tuple[bytes, ...]:
    return held_out_pngs()


def _raw_tar(path: Path, members: list[tuple[str, bytes | None, bytes, str]]) -> None:
    """(name, data, tar type, link target) members written as given: links, absolute and '..' names."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kind, target in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _cfg(inp: Path, out: Path) -> JobConfig:
    return JobConfig(input=str(inp), output=str(out), model="builtin:digits", progress=False, batch_size=16,
                     preprocess_batch_size=8)


def _code(error: str) -> str:
    return error.removeprefix("shard_error: ").split(":", 1)[0]


@pytest.mark.slow
def test_bad_shards_get_errors_and_the_rest_commit(ray_local, tmp_path, pngs, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    good = {f"good-{n}.tar": [(f"g{n}-{i}", {"png": pngs[n * 6 + i], "cls": b"1"}) for i in range(6)] for n in range(2)}
    for name, samples in good.items():
        write_webdataset(str(inp / name), samples)

    six = [(f"t-{i}", {"png": pngs[12 + i]}) for i in range(6)]
    write_webdataset(str(tmp_path / "full.tar"), six)
    full = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        offsets = {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}
    (inp / "truncated.tar").write_bytes(full[: offsets["t-3.png"][1] + 100])  # cut inside sample 3
    at = offsets["t-4.png"][0]
    (inp / "corrupt.tar").write_bytes(full[:at] + b"\xff" * 512 + full[at + 512:])  # garbled header of sample 4
    (inp / "junk.tar").write_bytes(b"not a tar archive, only words " * 50)
    _raw_tar(inp / "unsafe.tar", [
        ("ok-0.png", pngs[20], tarfile.REGTYPE, ""),
        ("../../escape.png", pngs[21], tarfile.REGTYPE, ""),
        ("/abs/path.png", pngs[22], tarfile.REGTYPE, ""),
        ("link.png", None, tarfile.SYMTYPE, "/etc/passwd"),
        ("hard.png", None, tarfile.LNKTYPE, "ok-0.png"),
        ("ok-1.png", pngs[23], tarfile.REGTYPE, ""),
    ])
    write_webdataset(str(inp / "dupes.tar"), [("a", {"png": pngs[24]}), ("b", {"png": pngs[25]}),
                                              ("a", {"png": pngs[26]}), ("c", {"png": pngs[27]}),
                                              ("a", {"png": pngs[28]})])
    (inp / "junk.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 40 + b"PAR1")
    pq.write_table(pa.table({"id": [1, 2], "label": ["x", "y"]}), inp / "noimage.parquet")
    write_webdataset(str(inp / "vanishing.tar"), [(f"v-{i}", {"png": pngs[30 + i]}) for i in range(3)])

    real_plan_shards = plan.plan_shards
    vanished = {}

    def list_then_delete(cfg, digest):  # the shard disappears between listing and reading
        shards, pending = real_plan_shards(cfg, digest)
        victim = inp / "vanishing.tar"
        if victim.exists():
            vanished["bytes"] = victim.read_bytes()
            victim.unlink()
        return shards, pending

    monkeypatch.setattr(plan, "plan_shards", list_then_delete)
    summary = plan.run(_cfg(inp, out)).to_dict()
    monkeypatch.undo()

    uri = {p.name: f"file://{p}" for p in inp.iterdir()} | {"vanishing.tar": f"file://{inp}/vanishing.tar"}
    expected_codes = {"truncated.tar": "truncated", "corrupt.tar": "corrupt", "junk.tar": "corrupt",
                      "unsafe.tar": "bad_member", "dupes.tar": "duplicate_key", "junk.parquet": "corrupt",
                      "noimage.parquet": "bad_schema", "vanishing.tar": "missing"}
    errors = summary["shard_error_list"]
    assert {name: _code(errors[uri[name]]) for name in expected_codes} == expected_codes
    assert set(errors) == {uri[n] for n in expected_codes}  # the good shards have none
    assert summary["shards_to_retry"] == [uri["vanishing.tar"]]
    assert summary["shards"] == 10 and summary["shard_errors"] == 8
    assert "4 unsafe or link member(s)" in errors[uri["unsafe.tar"]]
    assert "2 duplicate key(s) (first: 'a')" in errors[uri["dupes.tar"]]

    [manifest] = list_manifests(str(out))
    shards = manifest["shards"]
    assert {n: shards[uri[n]]["done"] for n in uri} == {n: n != "vanishing.tar" for n in uri}
    assert all(s["rows"] == s["images"] for s in shards.values())  # every image read is a row, once

    rows = read_table(str(out)).to_pylist()
    assert len({r["image_id"] for r in rows}) == len(rows) == summary["images"]
    by_shard: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_shard.setdefault(r["source"], {}).setdefault(r["key"], []).append(r)
    for name, samples in good.items():
        got = by_shard[uri[name]]
        assert sorted(got) == sorted(k for k, _ in samples) and all(v[0]["status"] == "ok" for v in got.values())
    assert sorted(by_shard[uri["truncated.tar"]]) == ["t-0", "t-1", "t-2"]  # read before the cut
    # t-3 precedes the bad header, but a sample may have more members after its image: not emitted (the
    # shard error says after how many members reading stopped)
    assert sorted(by_shard[uri["corrupt.tar"]]) == ["t-0", "t-1", "t-2"]
    unsafe = {k: v[0] for k, v in by_shard[uri["unsafe.tar"]].items()}
    assert {k: r["status"] for k, r in unsafe.items()} == {
        "ok-0": "ok", "../../escape": "error", "/abs/path": "error", "link": "error", "hard": "error", "ok-1": "ok"}
    assert unsafe["../../escape"]["error"].startswith("bad_member: unsafe member name")
    assert unsafe["link"]["error"].startswith("bad_member: image member link.png is a link")
    dupes = by_shard[uri["dupes.tar"]]
    assert [r["status"] for r in dupes["a"]] == ["ok", "error", "error"]
    assert dupes["b"][0]["status"] == dupes["c"][0]["status"] == "ok"
    assert dupes["a"][0]["image_id"] == make_image_id(uri["dupes.tar"], "a")  # the first keeps the plain id
    for name in ("junk.tar", "junk.parquet", "noimage.parquet", "vanishing.tar"):
        assert uri[name] not in by_shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.tar", "in", "out"]  # keys never became paths

    # The shard comes back: the next run labels it and nothing else (corrupt shards are not retried).
    (inp / "vanishing.tar").write_bytes(vanished["bytes"])
    again = plan.run(_cfg(inp, out)).to_dict()
    assert again["shards_skipped"] == 9 and again["images"] == 3 and again["shard_error_list"] == {}
    rows = read_table(str(out)).to_pylist()
    assert len({r["image_id"] for r in rows}) == len(rows) == summary["images"] + 3
    assert plan.run(_cfg(inp, out)).to_dict()["shards_skipped"] == 10  # and then everything is done

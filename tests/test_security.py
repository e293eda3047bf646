"""Security properties: credentials never written anywhere, keys never used as paths, and a Ray cluster
started the documented way (`ray start --head`, token auth) refuses its dashboard and job API without the token.
(The decompression-bomb limit: tests/test_bad_input.py.)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from _digits import held_out_pngs
from _procs import end_session

from pipeline.config import JobConfig, redact
from pipeline.lease import version_lease
from pipeline.plan import run
from pipeline.sources import write_image_parquet, write_webdataset
from pipeline.table import list_manifests, read_table

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pngs() -> tuple[bytes, ...]:
    return held_out_pngs()


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --------------------------------------------------------------------------------------------- credentials


def test_redact_strips_every_kind_of_credential(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "tok-0123456789abcdef")
    monkeypatch.setenv("SHORT_SECRET", "1234")  # too short to be a secret, and would mangle messages
    text = ("open s3://AKIA:pa55word@bucket/k failed; https://u:p@host/x?X-Amz-Signature=abc&X-Amz-Credential=AK"
            "&part=1 sent tok-0123456789abcdef, code 1234")
    assert redact(text) == ("open s3://bucket/k failed; https://host/x?X-Amz-Signature=***&X-Amz-Credential=***"
                            "&part=1 sent ***, code 1234")


@pytest.mark.slow
def test_canary_secret_never_reaches_logs_manifests_errors_or_parquet(s3, s3_faults, tmp_path, pngs):
    """A real `vitlabel run` (its own local Ray, reading and writing the moto S3) with a canary as its S3 secret
    key and as a job option (a tag), while one shard is denied and some images are broken, so that error
    paths run too. The canary must not be in the driver's output, in any file of the Ray session (logs of
    every worker), in the manifest, or anywhere in the bucket (Parquet files included, decoded and raw). The driver's
    output has none of the Ray lines that read as failures either."""
    canary = "canary-" + secrets.token_hex(8)
    good = [(f"k{i}", {"png": data}) for i, data in enumerate(pngs[:12])]
    write_webdataset("s3://test-bucket/in/a.tar", good[:6] + [("broken", {"jpg": b"not a jpeg"})])
    write_webdataset("s3://test-bucket/in/b.tar", good[6:])
    write_webdataset("s3://test-bucket/in/denied.tar", good[:2])
    s3_faults.add(r"^/test-bucket/in/denied\.tar", status=403, code="AccessDenied", times=None)

    ray_tmp = tempfile.mkdtemp(prefix="vlsec-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(AWS_SECRET_ACCESS_KEY=canary, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_TOKEN_PATH=str(Path(ray_tmp) / "token"))
    (Path(ray_tmp) / "token").write_text(secrets.token_hex(16))
    cmd = [sys.executable, "-m", "jobs.cli", "-v", "run", "--input", "s3://test-bucket/in/", "--output",
           "s3://test-bucket/out", "--model", "builtin:digits", "--tag", f"owner_token={canary}", "--tag",
           "team=vision", "--batch-size", "8", "--no-progress", "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        end_session(proc.pid, grace_s=2)
    try:
        assert proc.returncode == 0, err[-3000:]
        summary = json.loads(out[out.index("{"):])
        assert summary["images"] == 13 and summary["shards_to_retry"] == ["s3://test-bucket/in/denied.tar"]
        assert canary not in out + err
        assert "DEBUG" in err  # verbose: everything the driver logs was looked at
        # and none of Ray's lines that read as failures (pipeline/ray_noise.py); ours counts images, not markers
        for noise in ("core_worker.cc", "constructor arguments in the object store", "ray_remote_args",
                      "Data sink Label finished"):
            assert noise not in err, noise
        assert "3 shards, 13 images (12 ok, 1 errors)" in err
        logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file()]
        assert any(p.name.startswith("worker-") for p in logs), "expected the Ray session's worker logs"
        assert not [p for p in logs if canary.encode() in p.read_bytes()]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    [manifest] = list_manifests("s3://test-bucket/out")
    assert manifest["config"]["extra"] == {"owner_token": "***", "team": "vision"}
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="test-bucket", Prefix="out/")
            for o in page.get("Contents", [])]
    assert any(k.endswith(".parquet") for k in keys)
    for key in keys:
        body = s3.get_object(Bucket="test-bucket", Key=key)["Body"].read()
        assert canary.encode() not in body, key
        if key.endswith(".parquet"):  # compressed pages would hide it from a byte search: decode them too
            assert canary not in json.dumps(pq.read_table(pa.BufferReader(body)).to_pylist(), default=str), key
    errors = read_table("s3://test-bucket/out").column("error").to_pylist()
    assert any(e and e.startswith("not_an_image") for e in errors)


# ------------------------------------------------------------------------------------ keys are never paths


ADVERSARIAL = ["../../../../tmp/vitlabel-escape", "/tmp/vitlabel-absolute", "..\\..\\windows", "a/../../b",
               "~/.ssh/id", "x" * 300, "nul\x00byte", "新しい/画像"]


@pytest.mark.slow  # over 5 s alone on 2 cores: out of the quick lane
def test_adversarial_keys_write_nothing_outside_output(ray_local, tmp_path, pngs):
    """Keys go into rows and hashes only: whatever they say, every file the run writes is under OUTPUT, named
    by the run (part-<commit>-<n>.parquet, <commit>.json) or its model version (its lease), never by a key."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write_image_parquet(str(inp / "keys.parquet"), list(zip(ADVERSARIAL, pngs, strict=False)))
    write_webdataset(str(inp / "members.tar"), [(k, {"png": p}) for k, p in zip(ADVERSARIAL[:2], pngs, strict=False)])
    before = _files(tmp_path.parent)
    outside = [Path("/tmp/vitlabel-escape"), Path("/tmp/vitlabel-absolute"), Path("/tmp/b")]
    assert not any(p.exists() for p in outside)

    summary = run(JobConfig(input=str(inp), output=str(out), model="builtin:digits", progress=False))
    assert summary.counts["images"] == len(ADVERSARIAL) + 2
    rows = read_table(str(out)).to_pylist()
    parquet_rows = {r["key"]: r for r in rows if r["source"].endswith("keys.parquet")}
    assert set(parquet_rows) == set(ADVERSARIAL) and all(r["status"] == "ok" for r in parquet_rows.values())
    tar_rows = [r for r in rows if r["source"].endswith("members.tar")]
    assert sorted(r["error"].split(":")[0] for r in tar_rows) == ["bad_member", "bad_member"]  # ../ and /abs

    assert not any(p.exists() for p in outside)
    new = _files(tmp_path.parent) - before
    assert all(p.startswith(f"{tmp_path.name}/out") for p in new), sorted(new)
    for p in out.rglob("*"):
        if p.is_file():
            rel = p.relative_to(out).as_posix()
            assert rel.startswith(("_manifests/", f"_lease/{version_lease(summary.model_digest)}/")) or (
                rel.startswith("model=") and p.name.startswith("part-")), rel


# --------------------------------------------------------------------------------------- Ray token auth


@pytest.mark.slow
@pytest.mark.cluster
def test_dashboard_and_job_api_refuse_requests_without_the_token(ray_head):
    url, token = ray_head.url, ray_head.token
    deadline = time.monotonic() + 60
    while True:  # the dashboard comes up shortly after `ray start` returns
        try:
            if requests.get(f"{url}/api/gcs_healthz", timeout=5).status_code == 200:  # public: no token
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "dashboard did not come up"
        time.sleep(0.5)
    bad = {"Authorization": f"Bearer {secrets.token_hex(16)}"}
    for path in ("/api/jobs/", "/api/version", "/api/cluster_status", "/nodes?view=summary", "/api/v0/actors"):
        assert requests.get(url + path, timeout=10).status_code == 401, path
        assert requests.get(url + path, headers=bad, timeout=10).status_code == 403, path
    good = {"Authorization": f"Bearer {token}"}
    before = requests.get(f"{url}/api/jobs/", headers=good, timeout=10)
    assert before.status_code == 200
    submit = {"entrypoint": "touch /tmp/vitlabel-should-not-run"}
    assert requests.post(f"{url}/api/jobs/", json=submit, timeout=10).status_code == 401
    assert requests.post(f"{url}/api/jobs/", json=submit, headers=bad, timeout=10).status_code == 403
    jobs = requests.get(f"{url}/api/jobs/", headers=good, timeout=10)
    assert jobs.status_code == 200 and len(jobs.json()) == len(before.json())  # the refused calls added no job
    assert submit["entrypoint"] not in json.dumps(jobs.json())
    assert requests.get(f"{url}/api/version", headers=good, timeout=10).status_code == 200
    assert requests.get(f"{url}/api/jobs/", cookies={"ray-authentication-token": token}, timeout=10).ok


@pytest.mark.slow
@pytest.mark.cluster
def test_drivers_without_the_token_cannot_connect(ray_head):
    gcs, token, env = ray_head.gcs, ray_head.token, ray_head.env | {"RAY_AUTH_TOKEN": ray_head.token}
    probe = [sys.executable, "-c", f"import ray; ray.init(address={gcs!r}); print(ray.cluster_resources()['CPU'])"]
    wrong = secrets.token_hex(16)
    for name, extra in (("no token", {}), ("wrong token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": wrong})):
        # 2 connection attempts instead of Ray's 20 (one a second): a refusal is final anyway
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | extra
        refused = subprocess.run(probe, env=no_token | {"RAY_gcs_server_port_wait_time_s": "2"}, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode != 0 and f"{ray_head.cpus:.1f}" not in refused.stdout, name
        assert "AuthenticationError" in refused.stderr and token not in refused.stdout + refused.stderr, name
    allowed = subprocess.run(probe, env=env | {"RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0 and allowed.stdout.strip().endswith(f"{ray_head.cpus:.1f}"), allowed.stderr[-2000:]

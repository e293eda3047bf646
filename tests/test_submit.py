"""`vitlabel submit`: the job it builds, and a real `ray start --head` cluster with token auth (marker: cluster)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import clean_env

from jobs.cli import main
from jobs.submit import SubmitError, auth_token, check_no_secrets, dashboard_address, job_entrypoint, job_env
from pipeline.sources import write_webdataset
from pipeline.table import read_table

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECRET = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY0001", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-never-shown"}


# ------------------------------------------------------------------------------------------ no cluster


def test_entrypoint_is_checked_by_the_real_parser():
    assert job_entrypoint("run", ["--", "--input", "s3://b/in dir/", "--output", "s3://b/out"]) == \
        "vitlabel run --input 's3://b/in dir/' --output s3://b/out"
    assert job_entrypoint("nightly", ["--input", "x", "--wave-shards", "4"]).startswith("vitlabel nightly")
    with pytest.raises(SubmitError, match="does not accept"):
        job_entrypoint("run", ["--wave-shards", "many"])
    with pytest.raises(SubmitError, match="does not accept"):
        job_entrypoint("nightly", ["--no-such-flag"])
    with pytest.raises(SubmitError, match="expected one of"):
        job_entrypoint("query", [])


def test_job_env_copies_only_named_or_default_credentials():
    environ = {**SECRET, "AWS_CA_BUNDLE": "/etc/ssl/mine.pem", "AWS_PROFILE": "me", "HOME": "/root"}
    assert job_env(None, False, environ) == SECRET  # defaults: credentials, region, endpoint; never file paths
    assert job_env(["AWS_PROFILE"], False, environ) == {"AWS_PROFILE": "me"}
    assert job_env(None, True, environ) == {}
    with pytest.raises(SubmitError, match="expected a variable set"):
        job_env(["AWS_SESSION_TOKEN"], False, environ)
    with pytest.raises(SubmitError, match="got both"):
        job_env(["AWS_PROFILE"], True, environ)


def test_credentials_in_the_entrypoint_are_refused():
    entry = job_entrypoint("run", ["--input", "x", "--output", "y", "--tag", f"k={SECRET['AWS_SECRET_ACCESS_KEY']}"])
    with pytest.raises(SubmitError, match="AWS_SECRET_ACCESS_KEY"):
        check_no_secrets(entry, {}, SECRET)
    check_no_secrets(job_entrypoint("run", ["--input", "x"]), SECRET, SECRET)


def test_token_is_found_where_ray_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_token({}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "tok").write_text("from-path")
    assert auth_token({}) == "from-home"
    assert auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}) == "from-path"
    assert auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}) == "from-env"
    assert auth_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "from-env"}) is None
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH"):
        auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_dashboard_address():
    assert dashboard_address(None, {}) == "http://127.0.0.1:8265"
    assert dashboard_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "http://127.0.0.1:8265"  # a GCS address
    assert dashboard_address(None, {"RAY_ADDRESS": "http://head:8265/"}) == "http://head:8265"
    assert dashboard_address(None, {"RAY_DASHBOARD_ADDRESS": "svc:8265"}) == "http://svc:8265"
    assert dashboard_address("https://ray.example.com", {"RAY_API_SERVER_ADDRESS": "http://x"}) == \
        "https://ray.example.com"


def test_dry_run_shows_names_never_values(capsys, monkeypatch):
    for k, v in SECRET.items():
        monkeypatch.setenv(k, v)
    code = main(["submit", "--dry-run", "--working-dir", str(ROOT), "--", "nightly", "--input", "s3://b/in/",
                 "--output", "s3://b/out", "--wave-shards", "8"])
    out = capsys.readouterr().out
    spec = json.loads(out)
    assert code == 0 and spec["entrypoint"] == "vitlabel nightly --input s3://b/in/ --output s3://b/out --wave-shards 8"
    assert spec["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "<set>"
    assert spec["runtime_env"]["working_dir"] == str(ROOT)
    assert not any(v in out for v in SECRET.values())
    assert main(["submit", "--dry-run", "--", "run", "--top-k", "five"]) == 2


# ---------------------------------------------------------------------------------------- real cluster


def _submit(args: list[str], env: dict[str, str], timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vitlabel"), "submit", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _submit_here(args: list[str], env: dict[str, str], capsys) -> tuple[int, str, str]:
    """`vitlabel submit ARGS` parsed by the CLI's own parser and run in this process with `env` as its environment
    (the job API is HTTP; the token comes from `env`). The run is submitted by a real `vitlabel` process; the other
    calls go through here, without an interpreter start and Ray's import each (seconds on a busy machine).
    Returns (exit code, stdout, stderr)."""
    from jobs import submit as submit_command
    from jobs.cli import build_parser

    capsys.readouterr()
    code = submit_command.main(build_parser().parse_args(["submit", *args]), environ=env)
    out, err = capsys.readouterr()
    return code, out, err


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.cluster
def test_submit_a_run_to_a_token_auth_cluster(ray_head, s3, capsys):
    from jobs.train_digits import digits_split

    address, token_file = ray_head.url, ray_head.token_file
    got = subprocess.run([str(BIN / "ray"), "get-auth-token"], capture_output=True, text=True, timeout=30,
                         env=clean_env(RAY_AUTH_TOKEN_PATH=str(token_file)))
    token = got.stdout.strip()
    assert got.returncode == 0 and token == token_file.read_text()

    _, held = digits_split()
    for n in range(2):
        write_webdataset(f"s3://test-bucket/shards/s{n}.tar",
                         [(f"s{n}-{i}", {"png": _png(img)}) for i, (img, _) in enumerate(held[n * 8:(n + 1) * 8])])
    # The submitter has the S3 settings (from the moto fixture) and the token; the cluster has neither
    # S3 credentials nor an endpoint: the job reaches S3 only through the env passed with the submission.
    env = {**clean_env(RAY_AUTH_TOKEN=token), **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    secret = env["AWS_SECRET_ACCESS_KEY"]

    assert _submit(["--address", address, "list"], clean_env(HOME=str(token_file.parent))).returncode == 2
    for _ in range(20):  # the job server may need a moment after `ray start` returns
        if _submit_here(["--address", address, "list"], env, capsys)[0] == 0:
            break
        time.sleep(1)

    done = _submit(["--address", address, "--working-dir", str(ROOT), "--", "run",
                    "--input", "s3://test-bucket/shards/", "--output", "s3://test-bucket/table",
                    "--model", "builtin:digits", "--batch-size", "16", "--preprocess-batch-size", "16",
                    "--no-progress"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr
    rows = read_table("s3://test-bucket/table", columns=["image_id", "status", "label"]).to_pylist()
    assert len(rows) == 16 and len({r["image_id"] for r in rows}) == 16
    assert all(r["status"] == "ok" and r["label"] is not None for r in rows)
    assert '"images": 16' in done.stdout  # the job's summary came back through the followed logs

    job_id = done.stderr.split("submitted ", 1)[1].split()[0]
    code, status, _ = _submit_here(["--address", address, "status", job_id], env, capsys)
    info = json.loads(status)
    assert code == 0 and info["status"] == "SUCCEEDED" and info["entrypoint"].startswith("vitlabel run --input s3://")
    assert info["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "<set>"
    logs = _submit_here(["--address", address, "logs", job_id], env, capsys)
    listed = _submit_here(["--address", address, "list"], env, capsys)
    assert logs[0] == listed[0] == 0 and '"images": 16' in logs[1]
    for shown in (status, *logs[1:], *listed[1:]):
        assert secret not in shown
    assert job_id in listed[1]

    code, _, err = _submit_here(["--address", address, "--working-dir", str(ROOT), "--", "run", "--input",
                                 "s3://test-bucket/shards/", "--output", "s3://test-bucket/other", "--model",
                                 "/no/such/model"], env, capsys)
    assert code == 1 and "FAILED" in err

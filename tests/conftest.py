"""Shared fixtures: a real moto S3 server on a free 127.0.0.1 port, one real local Ray per session, and one
real `ray start --head` cluster with token auth per session (`ray_head`, for the submit and security tests).

The S3 server is reset before each test that asks for `s3`. Credentials are fake but real in form,
and set in the environment before Ray starts, so Ray workers reach the same server.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's server mode once; yields its endpoint URL. Env is set for boto3, s3fs, pyarrow.

    The server answers through `_s3faults.FaultyApp`: with no rules (the default) it is plain moto. The launcher
    is the benchmark's (`jobs.bench.s3server`), here in this process so that fault rules set by a test reach it."""
    from _s3faults import FaultyMotoServer

    from jobs.bench.s3server import moto_server

    with moto_server(in_process=True, server_class=FaultyMotoServer, key_id="testing-key-id",
                     secret="testing-secret-key") as server:
        yield server.endpoint


@pytest.fixture()
def s3(s3_server):
    """A freshly reset S3 server with an empty bucket `test-bucket`; yields a boto3 client.

    s3fs instances of this process are kept, their cached listings dropped: a new instance builds a new botocore
    session (its service models parsed again), which cost about a second per test on the 2-core machine."""
    import boto3
    import requests
    import s3fs

    requests.post(f"{s3_server}/moto-api/reset", timeout=10)
    for fs in list(s3fs.S3FileSystem._cache.values()):
        fs.invalidate_cache()
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="test-bucket")
    return client


@pytest.fixture()
def s3_faults(s3):
    """`_s3faults.FAULTS`, empty: rules added to it make the S3 server fail matching requests (this test only)."""
    from _s3faults import FAULTS

    FAULTS.clear()
    yield FAULTS
    FAULTS.clear()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session, started after the S3 env is set so workers inherit it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    """This environment minus Ray/AWS settings (nothing connects to the in-process Ray), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


@dataclass(frozen=True)
class RayHead:
    url: str  # dashboard and job API, http://127.0.0.1:PORT
    gcs: str  # 127.0.0.1:PORT, for ray.init(address=...)
    token: str
    token_file: Path  # mode 0600, in the cluster's temp dir (which is also HOME in `env`)
    env: dict[str, str]  # clean_env() with HOME = the temp dir: no token, no AWS settings
    cpus: int = 2


@pytest.fixture(scope="session")
def ray_head():
    """`ray start --head` on 127.0.0.1 with token auth (Ray 2.60's default for `ray start`), free ports, its own
    temp dir and process session, no AWS env: one cluster for the whole session. Teardown ends exactly this
    cluster's processes (its session), never `ray stop` (that would end every Ray on the machine)."""
    from _procs import end_session

    tmp = tempfile.mkdtemp(prefix="vlray-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    token = secrets.token_hex(16)
    token_file = Path(tmp) / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port")}
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--include-dashboard=true", "--num-cpus", str(RayHead.cpus), "--temp-dir", tmp, "--disable-usage-stats",
           *[a for name, port in ports.items() for a in (f"--{name}", str(port))]]
    env = clean_env(HOME=tmp)
    proc = subprocess.Popen(cmd, env=env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode()[-3000:]
        yield RayHead(f"http://127.0.0.1:{ports['dashboard-port']}", f"127.0.0.1:{ports['port']}", token,
                      token_file, env)
    finally:
        end_session(proc.pid)
        shutil.rmtree(tmp, ignore_errors=True)


def _local_or_s3(request, tmp_path, name: str) -> str:
    """tmp_path/<name> for the "local" param; for "s3", s3://test-bucket/<name> on the (reset) S3 server."""
    if request.param == "local":
        return str(tmp_path / name)
    request.getfixturevalue("s3")
    return f"s3://test-bucket/{name}"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """A table root, once on local disk and once on the (reset) S3 server: tests using it run on both."""
    return _local_or_s3(request, tmp_path, "labels")


@pytest.fixture(params=["local", "s3"])
def input_root(request, tmp_path):
    """A folder for input shards, once on local disk and once on the (reset) S3 server."""
    return _local_or_s3(request, tmp_path, "in")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core CPU: one intra-op thread is several times faster (and far less CPU) than
    threads that wait for each other. Model test modules use it with `pytestmark`; the count is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

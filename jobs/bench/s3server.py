"""A local S3 server (moto) on a free 127.0.0.1 port: the one launcher of the benchmark and the tests.

    with moto_server() as s3:                                  # a child process (the bench: its CPU and memory
        ...  s3.endpoint, s3.pid                               # stay out of the measured job's)
    with moto_server(in_process=True, server_class=FaultyMotoServer, key_id=..., secret=...) as s3:
        ...                                                    # a thread of this process (the tests' fixture:
                                                               # fault rules set here reach the server)

While it runs, the AWS_* variables (endpoint, fake credentials, region) are set in `os.environ`, so boto3,
s3fs, pyarrow and any Ray started afterwards (its workers inherit the environment) reach it; they are
restored on exit. Imports nothing from pipeline. `python -m jobs.bench.s3server --port N` serves until its
standard input closes (the child-process mode).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def s3_env(endpoint: str, key_id: str, secret: str, region: str = "us-east-1") -> dict[str, str]:
    """The environment that points boto3, s3fs and pyarrow at `endpoint` (credentials are fake but real in form)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": region, "AWS_REGION": region}


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set `values` in os.environ; restore what was there (or its absence) on exit."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    pid: int  # the process that serves it (this one for in_process)
    env: dict[str, str]


def _wait_listening(port: int, alive: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"moto server: expected it to listen on {HOST}:{port} within {timeout:g} s, got "
                               f"{'an exited process' if not alive() else 'no answer'}")
        time.sleep(0.1)


@contextlib.contextmanager
def moto_server(*, in_process: bool = False, server_class: Any = None, key_id: str = "bench-key-id",
                secret: str = "bench-secret", region: str = "us-east-1") -> Iterator[S3Server]:
    """moto's server mode on a free port, AWS_* set for its lifetime; yields its endpoint and serving pid.

    `server_class` (in_process only): a ThreadedMotoServer subclass, e.g. one that puts a WSGI layer in front.
    """
    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    if in_process:
        if server_class is None:
            from moto.moto_server.threaded_moto_server import ThreadedMotoServer as server_class
        server = server_class(ip_address=HOST, port=port, verbose=False)
        server.start()
        stop, pid = server.stop, os.getpid()
        _wait_listening(port, lambda: True)
    else:
        if server_class is not None:
            raise ValueError("moto_server: expected server_class only with in_process=True, got a child process")
        proc = subprocess.Popen([sys.executable, "-m", "jobs.bench.s3server", "--port", str(port)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop() -> None:
            with contextlib.suppress(Exception):
                proc.stdin.close()  # type: ignore[union-attr]  # the child stops its server and exits
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

        pid = proc.pid
        try:
            _wait_listening(port, lambda: proc.poll() is None)
        except BaseException:
            stop()
            raise
    env = s3_env(endpoint, key_id, secret, region)
    try:
        with environ(env):
            yield S3Server(endpoint=endpoint, pid=pid, env=env)
    finally:
        stop()


def _serve(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="serve moto S3 on 127.0.0.1:PORT until standard input closes")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=HOST, port=args.port, verbose=False)
    server.start()
    try:
        sys.stdin.read()
    finally:
        server.stop()


if __name__ == "__main__":
    _serve()

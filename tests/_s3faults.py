"""S3 faults for the moto server: a WSGI middleware that fails chosen requests.

moto has no fault injection of its own, so the session's ThreadedMotoServer serves its app through
`FaultyApp`. A test adds rules to `FAULTS` (through the `s3_faults` fixture); every request, from the
test process or from a Ray worker, goes through the same server, so the pipeline's own retries (botocore,
s3fs) and error paths are what is exercised. Rules are checked in order; a rule with `times=None` never
runs out; a rule with `probability` < 1 fails that share of the requests it matches (a seeded RNG: `seed`).

Three kinds of fault:
- `delay_s`: the request waits that long, then moto serves it as usual (a slow S3, not a failing one);
- an S3 error response (`status`, `code`: SlowDown 503, InternalError 500, AccessDenied 403, ...), served
  before moto sees the request, so it has no effect;
- `drop=True`: moto serves the request (a PUT takes effect), then the client gets the status line, the
  headers (with the full Content-Length) and half of the body, and the connection is reset (RST). A
  bodiless answer (PUT, DELETE) is reset before any of it is sent: the write landed, the client never
  heard so.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

_REASONS = {403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Rule:
    path: re.Pattern[str]  # matched (search) against "/bucket/key"
    methods: tuple[str, ...] | None  # None: any method
    status: int
    code: str
    times: int | None  # None: forever
    probability: float = 1.0  # share of the matching requests that fail
    drop: bool = False  # reset the connection mid-body instead of answering with an error
    delay_s: float = 0.0  # > 0: wait this long, then serve the request (no error)
    hits: int = 0
    seen: list[str] = field(default_factory=list)  # "METHOD /path" of each failed request

    @property
    def kind(self) -> str:
        if self.delay_s:
            return f"delayed {self.delay_s:g} s"
        return "reset mid-body" if self.drop else f"{self.status} {self.code}"


class S3Faults:
    """Rules for which requests fail, and a record of what failed (thread-safe: werkzeug serves threaded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rules: list[Rule] = []
        self.rng = random.Random(0)
        self.requests: Counter[str] = Counter()  # every request served (failed or not), by method

    def add(self, path: str = ".*", *, methods: tuple[str, ...] | None = None, status: int = 503,
            code: str = "SlowDown", times: int | None = 1, probability: float = 1.0, drop: bool = False,
            delay_s: float = 0.0) -> Rule:
        if not 0 < probability <= 1:
            raise ValueError(f"probability: expected 0 < p <= 1, got {probability}")
        if delay_s < 0 or (delay_s and drop):
            raise ValueError(f"delay_s: expected >= 0 and not with drop, got {delay_s}")
        rule = Rule(re.compile(path), methods, status, code, times, probability, drop, delay_s)
        with self._lock:
            self.rules.append(rule)
        return rule

    def seed(self, n: int) -> None:
        with self._lock:
            self.rng.seed(n)

    def clear(self) -> None:
        with self._lock:
            self.rules = []
            self.rng.seed(0)
            self.requests = Counter()

    def injected(self) -> Counter[str]:
        """Faults served so far, by method and kind ("GET 503 SlowDown", "PUT reset mid-body", ...)."""
        with self._lock:
            return Counter(f"{seen.split(' ', 1)[0]} {rule.kind}" for rule in self.rules for seen in rule.seen)

    def match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.requests[method] += 1
            for rule in self.rules:
                if rule.times is not None and rule.hits >= rule.times:
                    continue
                if (rule.methods is None or method in rule.methods) and rule.path.search(path):
                    if rule.probability < 1 and self.rng.random() >= rule.probability:
                        continue
                    rule.hits += 1
                    rule.seen.append(f"{method} {path}")
                    return rule
        return None


FAULTS = S3Faults()


class FaultyApp:
    def __init__(self, app, faults: S3Faults):
        self.app = app
        self.faults = faults

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        rule = self.faults.match(method, path)
        if rule is None:
            return self.app(environ, start_response)
        if rule.delay_s:
            time.sleep(rule.delay_s)  # werkzeug serves each request on a thread of its own: only this one waits
            return self.app(environ, start_response)
        if rule.drop:
            return self._cut(environ, start_response)
        _drain(environ)  # an unread request body would be parsed as the next request on a kept-alive socket
        message = "Please reduce your request rate." if rule.code == "SlowDown" else f"injected {rule.code}"
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{rule.code}</Code><Message>{message}'
                f"</Message><RequestId>injected-fault</RequestId></Error>").encode()
        start_response(f"{rule.status} {_REASONS.get(rule.status, 'Error')}",
                       [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [] if method == "HEAD" else [body]

    def _cut(self, environ, start_response) -> Iterator[bytes]:
        """moto's whole answer, then the status, headers and half the body of it, then a reset."""
        answer: dict = {}
        chunks: list[bytes] = []

        def capture(status, headers, exc_info=None):
            answer["status"], answer["headers"] = status, headers
            return chunks.append

        result = self.app(environ, capture)
        try:
            chunks.extend(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        body = b"".join(chunks)
        if body and environ["REQUEST_METHOD"] != "HEAD":
            start_response(answer["status"], answer["headers"])
        return _reset_after(body[: len(body) // 2], environ["werkzeug.socket"])


def _reset_after(part: bytes, sock: socket.socket) -> Iterator[bytes]:
    """Yield `part` (werkzeug sends the status and headers with it), then reset the connection: SO_LINGER 0
    makes the server's close of the socket an RST; the shutdown ends the body here. The ConnectionResetError
    tells werkzeug the connection is gone (it logs nothing and sends nothing more)."""
    if part:
        yield part
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RDWR)
    raise ConnectionResetError("injected: connection reset mid-body")


def _drain(environ) -> None:
    stream = environ.get("wsgi.input")
    if stream is None:
        return
    length = environ.get("CONTENT_LENGTH")
    if length:
        stream.read(int(length))
    elif environ.get("wsgi.input_terminated"):
        stream.read()


class NoDelayRequestHandler(MotoRequestHandler):
    """moto's request handler on a socket with TCP_NODELAY. werkzeug writes an answer's status line and headers,
    then its body, in two sends; with Nagle's algorithm on (a socket's default) the body waits for the client to
    acknowledge the headers, and the client delays that ACK (40 ms on Linux): each answer with a body would stall
    that long, and a run makes hundreds of requests."""

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FaultyMotoServer(ThreadedMotoServer):
    """moto's threaded server with `FaultyApp` in front of its app, answering without Nagle's delay."""

    def __init__(self, *args, faults: S3Faults = FAULTS, **kwargs):
        super().__init__(*args, **kwargs)
        self.faults = faults

    def _server_entry(self) -> None:
        app = FaultyApp(DomainDispatcherApplication(create_backend_app), self.faults)
        self._server = make_server(self._ip_address, self._port, app, True, request_handler=NoDelayRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

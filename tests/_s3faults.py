"""S3 faults for the moto server: a WSGI middleware that answers chosen requests with S3 error responses.

moto has no fault injection of its own, so the session's ThreadedMotoServer serves its app through
`FaultyApp`. A test adds rules to `FAULTS` (through the `s3_faults` fixture); every request, from the
test process or from a Ray worker, goes through the same server, so the pipeline's own retries (botocore,
s3fs) and error paths are what is exercised. Rules are checked in order; a rule with `times=None` never
runs out.
"""

from __future__ import annotations

import re
import threading
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
    hits: int = 0
    seen: list[str] = field(default_factory=list)  # "METHOD /path" of each failed request


class S3Faults:
    """Rules for which requests fail, and a record of what failed (thread-safe: werkzeug serves threaded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rules: list[Rule] = []

    def add(self, path: str = ".*", *, methods: tuple[str, ...] | None = None, status: int = 503,
            code: str = "SlowDown", times: int | None = 1) -> Rule:
        rule = Rule(re.compile(path), methods, status, code, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules = []

    def match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.times is not None and rule.hits >= rule.times:
                    continue
                if (rule.methods is None or method in rule.methods) and rule.path.search(path):
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
        _drain(environ)  # an unread request body would be parsed as the next request on a kept-alive socket
        message = "Please reduce your request rate." if rule.code == "SlowDown" else f"injected {rule.code}"
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{rule.code}</Code><Message>{message}'
                f"</Message><RequestId>injected-fault</RequestId></Error>").encode()
        start_response(f"{rule.status} {_REASONS.get(rule.status, 'Error')}",
                       [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [] if method == "HEAD" else [body]


def _drain(environ) -> None:
    stream = environ.get("wsgi.input")
    if stream is None:
        return
    length = environ.get("CONTENT_LENGTH")
    if length:
        stream.read(int(length))
    elif environ.get("wsgi.input_terminated"):
        stream.read()


class FaultyMotoServer(ThreadedMotoServer):
    """moto's threaded server with `FaultyApp` in front of its app."""

    def __init__(self, *args, faults: S3Faults = FAULTS, **kwargs):
        super().__init__(*args, **kwargs)
        self.faults = faults

    def _server_entry(self) -> None:
        app = FaultyApp(DomainDispatcherApplication(create_backend_app), self.faults)
        self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

"""A fault-injecting HTTP proxy for an S3 endpoint (stdlib only), for the storage fault tests.

``FaultyProxy(upstream, seed, error_rate=…, drop_rate=…, stall_rate=…)`` listens on loopback and
forwards every request to ``upstream`` (the moto server), except that, drawn from one seeded RNG
per request:

- ``error_rate``: answers 500 InternalError or 503 ServiceUnavailable itself (nothing forwarded);
- ``drop_rate``: closes the connection without an answer — half of these before forwarding the
  request, half after (the request took effect, but the client never learns it);
- ``stall_rate``: waits ``stall_seconds`` before forwarding (a slow, not a dead, endpoint);
- ``fail_all``: answers every request with that status (503, 500 or 403) when set;
- ``strip_conditions``: removes the conditional headers (``If-None-Match``, ``If-Match``) from
  every request it forwards — a store that ignores conditional writes (a create overwrites, a
  replace or delete of a stale version succeeds); ``counts["stripped"]`` counts the requests.

``hold(pattern)`` makes the next request whose ``METHOD path`` matches the regex wait, without
being forwarded, until :meth:`release` — then its connection is dropped; :attr:`holding` is set
while it waits (``hold(pattern, every=True)``: every matching request until the release). So a
test can kill a client in the middle of a given request, deterministically.
``counts`` tells how many requests met which fate, and ``counts["bytes_out"]`` the response bytes sent;
``lines`` lists every request's ``METHOD path``.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
_CONDITIONS = {"if-none-match", "if-match"}
_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("ServiceUnavailable", "Service is unable to handle request."),
    403: ("AccessDenied", "Access Denied"),
}


class FaultyProxy:
    def __init__(
        self,
        upstream: str,
        seed: int = 0,
        error_rate: float = 0.0,
        drop_rate: float = 0.0,
        stall_rate: float = 0.0,
        stall_seconds: float = 1.0,
        fail_all: int = 0,
        strip_conditions: bool = False,
    ):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.error_rate, self.drop_rate, self.stall_rate = error_rate, drop_rate, stall_rate
        self.stall_seconds = stall_seconds
        self.fail_all = fail_all
        self.strip_conditions = strip_conditions
        self.counts: Counter[str] = Counter()
        self.lines: list[str] = []
        self.holding = threading.Event()
        self._release = threading.Event()
        self._hold: re.Pattern[str] | None = None
        self._hold_every = False
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def hold(self, pattern: str, every: bool = False) -> None:
        """Hold the next request matching ``pattern`` (a regex searched in ``METHOD path``) — or,
        with ``every``, each one until :meth:`release` (a client's retries of a held request, after
        its read timeout, are held too)."""
        with self._lock:
            self._hold = re.compile(pattern)
            self._hold_every = every
            self.holding.clear()
            self._release.clear()

    def release(self) -> None:
        with self._lock:
            if self._hold_every:
                self._hold = None
        self._release.set()

    def set_rates(
        self, error_rate: float = 0.0, drop_rate: float = 0.0, stall_rate: float = 0.0, fail_all: int = 0
    ) -> None:
        with self._lock:
            self.error_rate, self.drop_rate, self.stall_rate, self.fail_all = (
                error_rate,
                drop_rate,
                stall_rate,
                fail_all,
            )

    @property
    def faults(self) -> int:
        """Requests that were answered with an error, dropped or stalled."""
        return sum(self.counts[kind] for kind in ("error", "drop_before", "drop_after", "stall", "fail_all"))

    def _fate(self, request_line: str) -> str:
        with self._lock:
            self.counts["requests"] += 1
            self.lines.append(request_line)
            if self._hold is not None and self._hold.search(request_line):
                if not self._hold_every:
                    self._hold = None
                self.counts["held"] += 1
                return "hold"
            if self.fail_all:
                self.counts["fail_all"] += 1
                return "fail_all"
            draw = self._random.random()
            for fate, rate in (("error", self.error_rate), ("drop", self.drop_rate), ("stall", self.stall_rate)):
                if draw < rate:
                    if fate == "drop":
                        fate = self._random.choice(["drop_before", "drop_after"])
                    self.counts[fate] += 1
                    return fate
                draw -= rate
            self.counts["forwarded"] += 1
            return "forward"

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _error(self, status: int) -> None:
                code, message = _ERRORS[status]
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>faulty-proxy</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, body: bytes) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if proxy.strip_conditions:
                    kept = {k: v for k, v in headers.items() if k.lower() not in _CONDITIONS}
                    if len(kept) < len(headers):
                        with proxy._lock:
                            proxy.counts["stripped"] += 1
                    headers = kept
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    return response, data
                finally:
                    connection.close()

            def _reply(self, response, data: bytes) -> None:
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() in _HOP_BY_HOP or (key.lower() == "content-length" and self.command != "HEAD"):
                        continue
                    self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                    with proxy._lock:
                        proxy.counts["bytes_out"] += len(data)

            def _handle(self) -> None:
                body = self._body()
                fate = proxy._fate(f"{self.command} {self.path}")
                if fate == "hold":
                    proxy.holding.set()
                    proxy._release.wait(600)
                    self._drop()
                elif fate in ("error", "fail_all"):
                    with proxy._lock:
                        status = proxy.fail_all if fate == "fail_all" else proxy._random.choice([500, 503])
                    self._error(status)
                elif fate == "drop_before":
                    self._drop()
                elif fate == "drop_after":
                    self._forward(body)
                    self._drop()
                else:
                    if fate == "stall":
                        threading.Event().wait(proxy.stall_seconds)
                    self._reply(*self._forward(body))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler

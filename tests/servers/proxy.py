"""An HTTP reverse proxy on 127.0.0.1 that forwards to a real server and misbehaves on request.

Put it in front of moto's S3 server or the GCS emulator to get real faults on the wire: an
error status instead of the upstream's answer, or a connection cut in the middle of a body;
or to cap the rate of each connection, as busy stores and CDNs do (:meth:`FaultProxy.throttle`).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["FaultProxy"]

Match = Callable[[str, str], bool]
"""``match(method, path) -> bool``: which requests a fault applies to."""

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_CODES = {403: "AccessDenied", 404: "NoSuchKey", 429: "SlowDown", 500: "InternalError"}


def _error_body(status: int) -> bytes:
    code = _CODES.get(status, "ServiceUnavailable" if status >= 500 else "InvalidRequest")
    return (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
        "<Message>injected by the test proxy</Message></Error>"
    ).encode()


def _any(method: str, path: str) -> bool:
    return True


@dataclass
class _Fault:
    match: Match
    times: int
    status: int | None = None
    cut_after: int | None = None
    delay: float = 0.0
    location: Callable[[str], str] | None = None


class FaultProxy:
    """Forwards every request to ``upstream``; faults armed with :meth:`fail` or :meth:`cut`."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        """``(method, path)`` of every request received, in order."""
        self.headers: list[dict[str, str]] = []
        """The headers of each of those requests."""
        self.bytes_sent = 0
        """Body bytes relayed to clients so far (all requests)."""
        self.rate: float | None = None
        self._sending: dict[int, tuple[str, str]] = {}  # bodies being sent, by thread
        self._together: list[tuple[tuple[str, str], ...]] = []  # each body's start: all sent
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fail(
        self, times: int = 1, status: int = 503, match: Match = _any, delay: float = 0.0
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (not forwarded), each
        after ``delay`` seconds."""
        with self._lock:
            self._faults.append(_Fault(match, times, status=status, delay=delay))

    def cut(self, after: int, times: int = 1, match: Match = _any) -> None:
        """Close the connection after ``after`` body bytes of the next matching responses."""
        with self._lock:
            self._faults.append(_Fault(match, times, cut_after=after))

    def redirect(self, location: Callable[[str], str], times: int = 1, match: Match = _any) -> None:
        """Answer the next matching requests with ``307`` to ``location(path)``."""
        with self._lock:
            self._faults.append(_Fault(match, times, location=location))

    def throttle(self, rate: float | None) -> None:
        """Send each response body at most ``rate`` bytes per second (``None``: no cap)."""
        self.rate = rate

    def most_at_once(self, match: Match) -> int:
        """The most matching response bodies that were being sent at the same time."""
        with self._lock:
            return max(
                (sum(1 for m, p in together if match(m, p)) for together in self._together),
                default=0,
            )

    def clear(self) -> None:
        """Disarm every fault, lift the cap, and forget the requests seen (and the bytes sent)."""
        with self._lock:
            self._faults.clear()
            self.bytes_sent = 0
            self.requests.clear()
            self.headers.clear()
            self._together.clear()
            self.rate = None

    def count(self, match: Match) -> int:
        """How many requests received so far match."""
        with self._lock:
            return sum(1 for method, path in self.requests if match(method, path))

    def sent(self, nbytes: int) -> None:
        """Count ``nbytes`` of body relayed."""
        with self._lock:
            self.bytes_sent += nbytes

    def _take(self, method: str, path: str, headers: dict[str, str]) -> _Fault | None:
        with self._lock:
            self.requests.append((method, path))
            self.headers.append(headers)
            for fault in self._faults:
                if fault.times > 0 and fault.match(method, path):
                    fault.times -= 1
                    return fault
        return None

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(*self._upstream, timeout=60)


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._forward()

        def do_HEAD(self) -> None:
            self._forward()

        def do_PUT(self) -> None:
            self._forward()

        def do_POST(self) -> None:
            self._forward()

        def do_DELETE(self) -> None:
            self._forward()

        def do_PATCH(self) -> None:
            self._forward()

        def _body(self) -> bytes | None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline().strip():
                            pass
                        return bytes(data)
                    data += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else None

        def _forward(self) -> None:
            body = self._body()
            fault = proxy._take(self.command, self.path, dict(self.headers.items()))
            if fault is not None and fault.location is not None:
                self.send_response(307)
                self.send_header("Location", fault.location(self.path))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if fault is not None and fault.status is not None:
                time.sleep(fault.delay)
                payload = _error_body(fault.status)
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            upstream = proxy._connect()
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                self._relay(response, fault.cut_after if fault is not None else None)
            except OSError:
                self.close_connection = True
            finally:
                upstream.close()

        def _relay(self, response: http.client.HTTPResponse, cut: int | None) -> None:
            chunked = response.getheader("Transfer-Encoding", "").lower() == "chunked"
            whole = response.read() if chunked else None
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP and not (chunked and name.lower() == "content-length"):
                    self.send_header(name, value)
            if whole is not None:
                self.send_header("Content-Length", str(len(whole)))
            self.end_headers()
            if self.command == "HEAD":
                return
            me = threading.get_ident()
            with proxy._lock:
                proxy._sending[me] = (self.command, self.path)
                proxy._together.append(tuple(proxy._sending.values()))
            try:
                self._send(response, whole, cut)
            finally:
                with proxy._lock:
                    del proxy._sending[me]

        def _send(
            self, response: http.client.HTTPResponse, whole: bytes | None, cut: int | None
        ) -> None:
            rate = proxy.rate
            piece = 256 * 1024 if rate is None else 32 * 1024
            began = time.monotonic()
            sent = 0
            while True:
                data = whole if whole is not None else response.read(piece)
                whole = b"" if whole is not None else None
                if not data:
                    return
                if cut is not None and sent + len(data) >= cut:
                    self.wfile.write(data[: cut - sent])
                    proxy.sent(cut - sent)
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)
                proxy.sent(len(data))
                sent += len(data)
                if rate is not None:  # this connection's cap: wait until it allows the next
                    time.sleep(max(0.0, began + sent / rate - time.monotonic()))

    return Handler

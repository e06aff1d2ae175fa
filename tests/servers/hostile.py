"""An origin that misbehaves on purpose, on 127.0.0.1: each path answered by a test's function.

The functions write raw responses (a wrong ``Content-Length``, a trickle of bytes, redirects,
an ETag that changes between ranges), which :class:`modelcache.testing.ModelServer` is too
well-behaved to send. TLS is available (a self-signed certificate) for https->http redirects.
"""

from __future__ import annotations

import re
import ssl
import threading
from collections import defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["Handler", "HostileServer", "Request", "ranged"]

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class Request:
    """What a route sees: the path, the headers, and the raw connection to answer on."""

    def __init__(self, handler: BaseHTTPRequestHandler, number: int) -> None:
        self.path = handler.path.split("?", 1)[0]
        self.headers = {k.lower(): v for k, v in handler.headers.items()}
        self.number = number
        """How many requests this path had before this one."""
        self._handler = handler

    def head(self, status: int, headers: dict[str, str]) -> None:
        """Send the status line and headers."""
        self._handler.send_response(status)
        for name, value in headers.items():
            self._handler.send_header(name, value)
        self._handler.end_headers()

    def write(self, data: bytes) -> bool:
        """Send body bytes; False when the client hung up."""
        try:
            self._handler.wfile.write(data)
            self._handler.wfile.flush()
        except OSError:
            return False
        return True

    def hang_up(self) -> None:
        """Close the connection now."""
        self._handler.close_connection = True
        try:
            self._handler.wfile.flush()
            self._handler.connection.shutdown(2)
        except OSError:
            pass


Handler = Callable[[Request], None]


def ranged(request: Request, size: int) -> tuple[int, int] | None:
    """``(start, end)`` of the request's ``Range: bytes=a-b`` header (end exclusive), if any."""
    match = _RANGE.match(request.headers.get("range", "").strip())
    if not match:
        return None
    start = int(match.group(1))
    end = min(size, int(match.group(2)) + 1) if match.group(2) else size
    return start, end


class HostileServer:
    """Serves each path with the function given to :meth:`route`; counts requests per path."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self._routes: dict[str, Handler] = {}
        self.requests: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._server = _Quiet(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:<port>``."""
        return f"{self.scheme}://127.0.0.1:{self._server.server_address[1]}"

    def route(self, path: str, handler: Handler) -> str:
        """Answer ``path`` with ``handler``; the URL."""
        self._routes[path] = handler
        return self.url + path

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        with self._lock:
            number = self.requests[path]
            self.requests[path] += 1
        route = self._routes.get(path)
        request = Request(handler, number)
        if route is None:
            request.head(404, {"Content-Length": "0"})
            return
        route(request)


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up on a hostile answer is the point of these tests


def _handler_class(server: HostileServer) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            server._answer(self)

        def do_HEAD(self) -> None:
            server._answer(self)

    return _Handler

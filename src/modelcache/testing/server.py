"""A real HTTP server on 127.0.0.1 for tests: Range support, counters and faults you can arm."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["ModelServer"]

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class _Faults:
    fail: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    cut_after: list[int] = field(default_factory=list)
    delay: float = 0.0
    rate: float | None = None
    ignore_range: bool = False


class ModelServer:
    """Serves files you add, counts what it sends, and misbehaves on request.

    Use as the ``model_server`` fixture, or as a context manager::

        with ModelServer() as server:
            url = server.add("model.safetensors", path)
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._files: dict[str, Path | bytes] = {}
        self._faults: dict[str, _Faults] = defaultdict(_Faults)
        self._lock = threading.Lock()
        self.requests: dict[str, int] = defaultdict(int)
        """Requests received per path (``/name``)."""
        self.bytes_sent: dict[str, int] = defaultdict(int)
        """Body bytes written per path."""
        self.request_headers: list[tuple[str, dict[str, str]]] = []
        """``(path, headers)`` of every request, in order."""
        self._server = _QuietServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:<port>``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ModelServer:
        """Serve in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content ------------------------------------------------------------------------------

    def add(self, name: str, content: str | os.PathLike[str] | bytes) -> str:
        """Serve ``content`` (a file's path or the bytes themselves) at ``/name``; its URL."""
        path = "/" + name.lstrip("/")
        self._files[path] = content if isinstance(content, bytes) else Path(content)
        return self.url + path

    def remove(self, name: str) -> None:
        """Stop serving ``/name`` (it answers 404 from now on)."""
        self._files.pop("/" + name.lstrip("/"), None)

    def reset_counts(self) -> None:
        """Zero the request and byte counters."""
        with self._lock:
            self.requests.clear()
            self.bytes_sent.clear()
            self.request_headers.clear()

    def count(self, name: str) -> tuple[int, int]:
        """``(requests, body bytes sent)`` for ``/name``."""
        path = "/" + name.lstrip("/")
        return self.requests[path], self.bytes_sent[path]

    # -- faults -------------------------------------------------------------------------------

    def fail_next(
        self, name: str, times: int = 1, status: int = 503, headers: dict[str, str] | None = None
    ) -> None:
        """Answer the next ``times`` requests for ``/name`` with ``status``."""
        with self._lock:
            self._faults["/" + name.lstrip("/")].fail += [(status, headers or {})] * times

    def cut_after(self, name: str, nbytes: int, times: int = 1) -> None:
        """Close the connection after ``nbytes`` of body, on the next ``times`` responses."""
        with self._lock:
            self._faults["/" + name.lstrip("/")].cut_after += [nbytes] * times

    def set_delay(self, name: str, seconds: float) -> None:
        """Wait ``seconds`` before answering each request for ``/name``."""
        self._faults["/" + name.lstrip("/")].delay = seconds

    def set_rate(self, name: str, bytes_per_second: float | None) -> None:
        """Cap each connection's body rate for ``/name`` (``None``: no cap)."""
        self._faults["/" + name.lstrip("/")].rate = bytes_per_second

    def set_ignore_range(self, name: str, ignore: bool = True) -> None:
        """Answer 200 with the whole body even when a Range is asked (like http.server)."""
        self._faults["/" + name.lstrip("/")].ignore_range = ignore

    # -- serving ------------------------------------------------------------------------------

    def _content(self, path: str) -> bytes | Path | None:
        return self._files.get(path)

    def _take_fault(self, path: str) -> tuple[tuple[int, dict[str, str]] | None, int | None]:
        with self._lock:
            faults = self._faults[path]
            fail = faults.fail.pop(0) if faults.fail else None
            cut = faults.cut_after.pop(0) if (faults.cut_after and fail is None) else None
        return fail, cut

    def _record(self, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests[path] += 1
            self.request_headers.append((path, headers))

    def _sent(self, path: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent[path] += nbytes


class _QuietServer(ThreadingHTTPServer):
    """A client hanging up mid-body is normal in fault tests: no traceback for it."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def _etag(content: bytes | Path) -> str:
    if isinstance(content, bytes):
        return '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    st = content.stat()
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'


def _make_handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            server._record(path, dict(self.headers.items()))
            faults = server._faults[path]
            if faults.delay:
                time.sleep(faults.delay)
            fail, cut = server._take_fault(path)
            if fail is not None:
                status, headers = fail
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            content = server._content(path)
            if content is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size = len(content) if isinstance(content, bytes) else content.stat().st_size
            etag = _etag(content)
            start, end = 0, size
            status = 200
            wanted = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if wanted and not faults.ignore_range and (if_range in (None, etag)):
                match = _RANGE.match(wanted.strip())
                if match and (match.group(1) or match.group(2)):
                    if match.group(1):
                        start = int(match.group(1))
                        end = min(size, int(match.group(2)) + 1) if match.group(2) else size
                    else:
                        start, end = max(0, size - int(match.group(2))), size
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(end - start))
            if not faults.ignore_range:
                self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if body:
                self._send_body(path, content, start, end, cut, faults.rate)

        def _send_body(
            self,
            path: str,
            content: bytes | Path,
            start: int,
            end: int,
            cut: int | None,
            rate: float | None,
        ) -> None:
            limit = end if cut is None else min(end, start + cut)
            position = start
            block = 256 * 1024 if rate is None else max(4096, int(rate / 50))
            began = time.monotonic()
            handle = None if isinstance(content, bytes) else open(content, "rb")  # noqa: SIM115
            try:
                while position < limit:
                    n = min(block, limit - position)
                    if handle is None:
                        data = content[position : position + n]  # type: ignore[index]
                    else:
                        handle.seek(position)
                        data = handle.read(n)
                    try:
                        self.wfile.write(data)
                    except OSError:
                        return
                    server._sent(path, len(data))
                    position += len(data)
                    if rate is not None:
                        ahead = (position - start) / rate - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)
            finally:
                if handle is not None:
                    handle.close()
            if cut is not None and position < end:
                self.close_connection = True
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    return Handler

"""A small static HTTP origin on 127.0.0.1 with Range support: the demo's stand-in for a CDN.

It serves the files of one directory (no listing, nothing outside it), answers ``HEAD`` and
single ``Range`` requests like a CDN, and can cap each connection's rate so a download lasts
long enough to watch on the ``/models`` page.
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["Origin"]

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_BLOCK = 256 * 1024


class Origin:
    """Serve ``directory``'s files at ``http://host:port/<name>``; use as a context manager."""

    def __init__(
        self, directory: Path, host: str = "127.0.0.1", port: int = 0, rate: float | None = None
    ) -> None:
        self.directory = Path(directory).resolve()
        self.rate = rate
        """Bytes per second per connection, or ``None`` for no cap."""
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def file(self, url_path: str) -> Path | None:
        """The file a URL path names, or ``None`` (missing, a directory, or outside)."""
        name = unquote(urlsplit(url_path).path).lstrip("/")
        candidate = (self.directory / name).resolve()
        if candidate.is_file() and candidate.is_relative_to(self.directory):
            return candidate
        return None

    def start(self) -> Origin:
        """Serve in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="modelcache-demo-origin", daemon=True
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

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler(origin: Origin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "modelcache-demo-origin"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _empty(self, status: int, **headers: str) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _serve(self, body: bool) -> None:
            path = origin.file(self.path)
            if path is None:
                self._empty(404)
                return
            stat = path.stat()
            size = stat.st_size
            etag = f'"{size:x}-{stat.st_mtime_ns:x}"'
            start, end, status = 0, size, 200
            wanted = self.headers.get("Range")
            if wanted and self.headers.get("If-Range") in (None, etag):
                match = _RANGE.match(wanted.strip())
                if match and (match.group(1) or match.group(2)):
                    if match.group(1):
                        start = int(match.group(1))
                        end = min(size, int(match.group(2)) + 1) if match.group(2) else size
                    else:
                        start = max(0, size - int(match.group(2)))
                    if start >= size or start >= end:
                        self._empty(416, Content_Range=f"bytes */{size}")
                        return
                    status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if body:
                self._send(path, start, end)

        def _send(self, path: Path, start: int, end: int) -> None:
            rate = origin.rate
            block = _BLOCK if rate is None else max(4096, min(_BLOCK, int(rate / 20)))
            began, position = time.monotonic(), start
            with path.open("rb") as handle:
                handle.seek(start)
                while position < end:
                    data = handle.read(min(block, end - position))
                    if not data:
                        return
                    try:
                        self.wfile.write(data)
                    except OSError:
                        return
                    position += len(data)
                    if rate is not None:
                        ahead = (position - start) / rate - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)

    return Handler

"""A stand-in for the Hugging Face Hub on 127.0.0.1 (point ``HF_ENDPOINT`` at it).

It serves the routes huggingface_hub calls, with the Hub's headers:

- ``GET /api/{models,datasets,spaces}/<repo>[/revision/<rev>][?blobs=true]``: repo info (the
  commit ``sha`` and ``siblings`` with size, ``blobId`` and ``lfs`` metadata);
- ``GET /api/<type>s/<repo>/tree/<rev>[/<path>][?recursive=true]``: the tree listing;
- ``POST /api/<type>s/<repo>/paths-info/<rev>`` (form ``paths=...``): the listing of some paths;
- ``HEAD|GET /[<type>s/]<repo>/resolve/<rev>/<path>``: small files answered directly (``ETag`` =
  git blob id), LFS files redirected to a second server standing for the CDN (``X-Linked-Etag``
  = sha256, ``X-Linked-Size``), both with ``X-Repo-Commit``; the CDN honours ``Range``.

Branches and tags move like git refs (:meth:`HubStandIn.push`, :meth:`HubStandIn.tag`), private
repos need ``Authorization: Bearer <token>``, and faults can be armed (an error status, a
connection cut mid-body). It can also play a sparser mirror: repo info whose siblings carry no
sizes or digests (``info_metadata=False``, as olah's), and no listing routes at all
(``listing_routes=False``).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["HubStandIn", "git_blob_id"]

Match = Callable[[str, str], bool]
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_id(data: bytes) -> str:
    """``git hash-object`` of ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _pointer(data: bytes) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:"
        f"{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n"
    ).encode()


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    token: str | None
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


@dataclass
class _Fault:
    match: Match
    times: int
    status: int | None = None
    cut_after: int | None = None
    retry_after: float | None = None


class HubStandIn:
    """The Hub (``url``) and its CDN (``cdn_url``) on two ports of 127.0.0.1.

    Args:
        lfs_threshold: files of at least this many bytes are stored with LFS.
        info_metadata: whether repo info's siblings carry sizes and digests (``?blobs=true``).
        listing_routes: whether the tree and paths-info routes answer (else 404).
    """

    def __init__(
        self,
        lfs_threshold: int = 1024,
        *,
        info_metadata: bool = True,
        listing_routes: bool = True,
    ) -> None:
        self.lfs_threshold = lfs_threshold
        self.info_metadata = info_metadata
        self.listing_routes = listing_routes
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._served: dict[tuple[str, str, str], bytes] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        """``(method, path)`` of every request to either server, in order."""
        self.cdn_credentials: list[str] = []
        """The ``Authorization`` headers the CDN was sent (it should never be sent one)."""
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, cdn=False))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, cdn=True))
        self._threads = []
        for server in (self._hub, self._cdn):
            server.daemon_threads = True
            server.block_on_close = False
            thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def url(self) -> str:
        """The Hub's endpoint, for ``HF_ENDPOINT``."""
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """Where LFS files are redirected to."""
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def close(self) -> None:
        """Stop both servers."""
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> HubStandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- content --------------------------------------------------------------------------------

    def push(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        branch: str = "main",
        repo_type: str = "model",
        token: str | None = None,
    ) -> str:
        """Commit ``files`` (the whole tree) on ``branch``; the new commit's sha."""
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), _Repo(repo_type, repo_id, token))
            parent = repo.refs.get(branch, "")
            digest = hashlib.sha1(parent.encode())
            for name in sorted(files):
                digest.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n".encode())
            digest.update(str(len(repo.commits)).encode())
            commit = digest.hexdigest()
            repo.commits[commit] = dict(files)
            repo.refs[branch] = commit
            for data in files.values():
                self._blobs[hashlib.sha256(data).hexdigest()] = data
            return commit

    def tag(self, repo_id: str, name: str, commit: str, repo_type: str = "model") -> None:
        """Point the ref ``name`` at ``commit``."""
        with self._lock:
            self._repos[(repo_type, repo_id)].refs[name] = commit

    def tamper(self, sha256: str, data: bytes) -> None:
        """Make the CDN serve ``data`` for the LFS object ``sha256`` (the Hub still lists the
        original's size and sha256)."""
        with self._lock:
            self._blobs[sha256] = data

    def tamper_small(self, repo_id: str, name: str, data: bytes, repo_type: str = "model") -> None:
        """Make resolve serve ``data`` for a small file (its listed blob id stays the same)."""
        with self._lock:
            self._served[(repo_type, repo_id, name)] = data

    def is_lfs(self, data: bytes) -> bool:
        """Whether a file of this content is stored with LFS."""
        return len(data) >= self.lfs_threshold

    # -- faults and counters ------------------------------------------------------------------

    def fail(
        self,
        times: int = 1,
        status: int = 503,
        match: Match = lambda m, p: True,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (and ``Retry-After``)."""
        with self._lock:
            self._faults.append(_Fault(match, times, status=status, retry_after=retry_after))

    def cut(self, after: int, times: int = 1, match: Match = lambda m, p: True) -> None:
        """Close the connection after ``after`` body bytes of the next matching responses."""
        with self._lock:
            self._faults.append(_Fault(match, times, cut_after=after))

    def count(self, match: Match = lambda m, p: True) -> int:
        """How many requests so far match."""
        with self._lock:
            return sum(1 for method, path in self.requests if match(method, path))

    def clear(self) -> None:
        """Disarm faults and forget the requests seen."""
        with self._lock:
            self._faults.clear()
            self.requests.clear()

    def _take(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for fault in self._faults:
                if fault.times > 0 and fault.match(method, path):
                    fault.times -= 1
                    return fault
        return None

    # -- lookups --------------------------------------------------------------------------------

    def _repo(self, repo_type: str, repo_id: str, auth: str | None) -> _Repo | None:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.token is not None and auth != f"Bearer {repo.token}"):
            return None
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> str | None:
        with self._lock:
            if revision in repo.commits:
                return revision
            return repo.refs.get(revision)

    def _sibling(self, name: str, data: bytes, blobs: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"rfilename": name}
        if blobs:
            item["size"] = len(data)
            if self.is_lfs(data):
                pointer = _pointer(data)
                item["blobId"] = git_blob_id(pointer)
                item["lfs"] = {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": len(pointer),
                }
            else:
                item["blobId"] = git_blob_id(data)
        return item

    def _tree_item(self, name: str, data: bytes) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "path": name, "size": len(data)}
        if self.is_lfs(data):
            pointer = _pointer(data)
            item["oid"] = git_blob_id(pointer)
            item["lfs"] = {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": len(pointer),
            }
        else:
            item["oid"] = git_blob_id(data)
        return item


def _make_handler(hub: HubStandIn, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._handle(body=False)

        def do_GET(self) -> None:
            self._handle(body=True)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self._form = parse_qs(self.rfile.read(length).decode()) if length else {}
            self._handle(body=True)

        # -- answers ----------------------------------------------------------------------------

        def _answer(
            self,
            status: int,
            payload: bytes = b"",
            headers: dict[str, str] | None = None,
            body: bool = True,
            content_type: str = "application/json",
        ) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body and payload:
                self.wfile.write(payload)

        def _error(
            self,
            status: int,
            code: str,
            message: str,
            body: bool,
            extra: dict[str, str] | None = None,
        ) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
            self._answer(status, json.dumps({"error": message}).encode(), headers, body)

        def _json(self, data: Any, headers: dict[str, str] | None = None) -> None:
            self._answer(200, json.dumps(data).encode(), headers)

        # -- routing ----------------------------------------------------------------------------

        def _handle(self, body: bool) -> None:
            parts = urlsplit(self.path)
            fault = hub._take(self.command, parts.path)
            if fault is not None and fault.status is not None:
                wait = (
                    {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
                )
                self._error(fault.status, "Injected", "injected by the test stand-in", body, wait)
                return
            cut = fault.cut_after if fault is not None else None
            segments = [unquote(s) for s in parts.path.strip("/").split("/")]
            if cdn:
                self._cdn(segments, body, cut)
            elif segments == ["api", "agent-harnesses"]:  # huggingface_hub's user-agent registry
                self._json({"standardEnvVars": [], "harnesses": {}})
            elif segments[0] == "api" and len(segments) >= 4 and segments[1] in _TYPES:
                self._api(_TYPES[segments[1]], segments[2:], parse_qs(parts.query))
            else:
                self._resolve(segments, body, cut)

        def _api(self, repo_type: str, rest: list[str], query: dict[str, list[str]]) -> None:
            repo_id = "/".join(rest[:2])
            repo = hub._repo(repo_type, repo_id, self.headers.get("Authorization"))
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found", True)
                return
            action = rest[2] if len(rest) > 2 else "revision"
            revision = rest[3] if len(rest) > 3 else "main"
            if action in ("tree", "paths-info") and not hub.listing_routes:
                self._error(404, "NotFound", "no such route", True)
                return
            commit = hub._resolve(repo, revision)
            if commit is None or action not in ("revision", "tree", "paths-info"):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", True)
                return
            files = repo.commits[commit]
            if action == "paths-info":
                wanted = getattr(self, "_form", {}).get("paths", [])
                self._json([hub._tree_item(n, files[n]) for n in wanted if n in files])
                return
            if action == "revision":
                blobs = query.get("blobs", ["false"])[0].lower() == "true"
                blobs = blobs and hub.info_metadata
                self._json(
                    {
                        "id": repo_id,
                        "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                        "sha": commit,
                        "private": repo.token is not None,
                        "tags": [],
                        "siblings": [hub._sibling(n, files[n], blobs) for n in sorted(files)],
                    }
                )
                return
            prefix = "/".join(rest[4:]).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            items: list[dict[str, Any]] = []
            seen_dirs: set[str] = set()
            for name in sorted(files):
                if prefix and not name.startswith(prefix + "/"):
                    continue
                relative = name[len(prefix) + 1 :] if prefix else name
                if "/" in relative and not recursive:
                    directory = (prefix + "/" if prefix else "") + relative.split("/", 1)[0]
                    if directory not in seen_dirs:
                        seen_dirs.add(directory)
                        items.append(
                            {"type": "directory", "path": directory, "oid": "0" * 40, "size": 0}
                        )
                    continue
                items.append(hub._tree_item(name, files[name]))
            self._json(items)

        def _resolve(self, segments: list[str], body: bool, cut: int | None) -> None:
            repo_type = "model"
            if segments and segments[0] in _TYPES and segments[0] != "models":
                repo_type = _TYPES[segments[0]]
                segments = segments[1:]
            if len(segments) < 5 or segments[2] != "resolve":
                self._error(404, "NotFound", "no such route", body)
                return
            repo_id = "/".join(segments[:2])
            repo = hub._repo(repo_type, repo_id, self.headers.get("Authorization"))
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found", body)
                return
            commit = hub._resolve(repo, segments[3])
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {segments[3]}", body)
                return
            name = "/".join(segments[4:])
            data = repo.commits[commit].get(name)
            if data is None:
                self._error(
                    404,
                    "EntryNotFound",
                    f"{name} does not exist",
                    body,
                )
                return
            headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
            if hub.is_lfs(data):
                sha256 = hashlib.sha256(data).hexdigest()
                headers.update(
                    {
                        "ETag": f'"{git_blob_id(_pointer(data))}"',
                        "X-Linked-Etag": f'"{sha256}"',
                        "X-Linked-Size": str(len(data)),
                        "Location": f"{hub.cdn_url}/lfs/{sha256}?Expires=9999999999&"
                        f"Signature=cdn-secret-{quote(name)}&Key-Pair-Id=K1",
                    }
                )
                self._answer(302, b"", headers, body, "text/plain")
                return
            headers["ETag"] = f'"{git_blob_id(data)}"'
            with hub._lock:
                served = hub._served.get((repo_type, repo_id, name), data)
            self._send(served, headers, body, cut)

        def _cdn(self, segments: list[str], body: bool, cut: int | None) -> None:
            with hub._lock:
                if self.headers.get("Authorization"):
                    hub.cdn_credentials.append(self.headers["Authorization"])
                data = hub._blobs.get(segments[-1]) if segments[0] == "lfs" else None
            if data is None:
                self._answer(
                    404, b"<Error>NoSuchKey</Error>", body=body, content_type="application/xml"
                )
                return
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            self._send(data, {"ETag": etag, "Accept-Ranges": "bytes"}, body, cut)

        def _send(self, data: bytes, headers: dict[str, str], body: bool, cut: int | None) -> None:
            start, end, status = 0, len(data), 200
            wanted = self.headers.get("Range")
            if wanted and self.headers.get("If-Range") in (None, headers.get("ETag")):
                match = _RANGE.match(wanted.strip())
                if match and match.group(1):
                    start = int(match.group(1))
                    end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
                    if start >= len(data):
                        self._answer(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body)
                        return
                    status = 206
                    headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if not body:
                return
            stop = end if cut is None else min(end, start + cut)
            position = start
            try:
                while position < stop:
                    block = data[position : min(stop, position + 256 * 1024)]
                    self.wfile.write(block)
                    position += len(block)
            except OSError:
                return
            if position < end:
                self.close_connection = True
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    return Handler

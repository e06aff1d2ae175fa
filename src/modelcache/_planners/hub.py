"""The Hugging Face Hub: ``hf://[datasets/|spaces/]<owner>/<repo>[@<revision>][/<path>]``.

huggingface_hub answers the questions (``repo_info`` with file metadata: the commit a branch or
tag points at, every file's size, the sha256 of LFS files and the git blob id of the others, in
one request); the bytes come through the resolve URLs of that commit with modelcache's ranged,
resumable HTTP reader, each file checked against the digest the Hub gives.

Any Hub mirror works (olah, a proxy, your own): no revision means ``main``, asked as
``/revision/main`` (mirrors answer the bare repo route only for repos they proxied), and when the
repo info lists files without sizes or digests, the paths-info route (one file) or the recursive
tree (a directory) is asked for them. A file whose digest no route gives is still fetched, and
recorded as such: its path is listed in the entry's ``meta.json`` under ``"unverified"`` and
logged at DEBUG.

Revisions: a cache entry is keyed by the URL, so ``hf://org/repo@<commit>/file`` (or any URL
already cached) starts warm with no network at all. A branch or tag is resolved once, when the
entry is made; the commit is recorded in the entry's ``meta.json`` (``"revision"``) and kept
until the entry is fetched again with ``refresh=True``. Offline, the recorded entry is used.

Options (``storage_options={"hf": {...}}`` or flat): ``token`` (else ``HF_TOKEN`` or the token
saved by ``hf auth login``), ``endpoint`` (else ``HF_ENDPOINT``, else https://huggingface.co).
``HF_HUB_OFFLINE=1`` is honoured like ``MODELCACHE_OFFLINE``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from modelcache import _config as config
from modelcache._filesystems import classify, require_extra, retrying, transfer_options
from modelcache._plan import Plan, RemoteFile, Selection
from modelcache._readers import HTTPReader
from modelcache._sources import Source, parse_hf_url
from modelcache._transfer import FatalError, Reader, TransferOptions
from modelcache.errors import NotCachedError

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_REVISION",
    "HubLocation",
    "endpoint_for",
    "hub_offline",
    "hub_progress_disabled",
    "parse_hub_url",
    "plan_hub",
]

log = logging.getLogger("modelcache")

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
"""What no revision means, as for huggingface_hub's downloads."""
_REPO_TYPES = {"datasets": "dataset", "spaces": "space"}
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubLocation:
    """The parts of an ``hf://`` URL."""

    repo_type: str
    repo_id: str
    revision: str | None
    path: str
    directory: bool

    @property
    def pinned(self) -> bool:
        """Whether the revision is a full commit hash (the content can never change)."""
        return (
            self.revision is not None
            and len(self.revision) == 40
            and all(c in "0123456789abcdef" for c in self.revision)
        )


def parse_hub_url(url: str) -> HubLocation:
    """Split an ``hf://`` URL (its query, the file selection, is ignored here)."""
    parts = urlsplit(url)
    bare = f"hf://{parts.netloc}{parts.path}"
    repo_type = "model"
    if parts.netloc in _REPO_TYPES:
        repo_type = _REPO_TYPES[parts.netloc]
        bare = f"hf://{parts.path.lstrip('/')}"
    location = parse_hf_url(bare)
    directory = location.path == "" or parts.path.endswith("/")
    return HubLocation(
        repo_type, location.repo_id, location.revision, location.path.strip("/"), directory
    )


def endpoint_for(source: Source) -> str:
    """The Hub's base URL: ``storage_options["endpoint"]``, ``$HF_ENDPOINT`` or the default."""
    value = source.storage_options.get("endpoint") or config.env("HF_ENDPOINT")
    return str(value or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """Whether ``$HF_HUB_OFFLINE`` says never to touch the network (as huggingface_hub reads it)."""
    return (config.env("HF_HUB_OFFLINE") or "").lower() in _TRUE


def hub_progress_disabled() -> bool:
    """Whether ``$HF_HUB_DISABLE_PROGRESS_BARS`` turns progress bars off."""
    return (config.env("HF_HUB_DISABLE_PROGRESS_BARS") or "").lower() in _TRUE


def plan_hub(source: Source, options: TransferOptions) -> Plan:
    """Ask the Hub what ``source`` names: the commit, and each file with its size and digest."""
    require_extra("hf")
    try:
        location = parse_hub_url(source.url)
    except ValueError as error:
        raise FatalError(f"bad URL: {error}") from None
    if hub_offline():
        raise NotCachedError("not in the cache and HF_HUB_OFFLINE is set", source=source.redacted)
    from huggingface_hub import HfApi

    endpoint = endpoint_for(source)
    token = source.storage_options.get("token")
    api = HfApi(endpoint=endpoint, token=token)
    revision = location.revision or DEFAULT_REVISION
    where = f"{location.repo_id}@{revision}"

    def ask() -> Any:
        return api.repo_info(
            location.repo_id,
            repo_type=location.repo_type,
            revision=revision,
            files_metadata=True,
        )

    info = retrying(ask, options, describe=lambda e: _describe(e, where, source))
    commit = str(info.sha)
    listing = _Listing(api, location, commit, options, source)
    listed = [_Listed.of(s) for s in info.siblings or []]
    shape = transfer_options(source, options, chunk_size=None, connections=None)
    meta: dict[str, Any] = {"revision": {"requested": location.revision, "commit": commit}}
    opener = _Opener(location, commit, endpoint, token, source)
    selection = Selection.from_source(source)
    if not location.directory:
        found = [f for f in listed if f.path == location.path]
        if not listed:  # a mirror that lists nothing: ask for the one path
            found = listing.paths([location.path])
        if found:
            if selection:
                raise FatalError(
                    "include/exclude choose files of a repo or directory; this is one file"
                )
            (one,) = listing.complete(found, directory=False)
            _note_unverified([one], meta, source)
            return Plan("file", [one.remote("", opener)], commit, meta, shape)
    prefix = f"{location.path}/" if location.path else ""
    if not listed:
        listed = listing.tree(prefix)
    chosen = sorted(
        (f for f in listed if f.path.startswith(prefix) and selection.wants(f.path[len(prefix) :])),
        key=lambda f: f.path,
    )
    if not chosen:
        what = f"{location.path!r}" if location.path else "any file"
        raise FatalError(
            f"{what} not found in {location.repo_id} at commit {commit[:12]}{selection.describe()}",
            404,
        )
    chosen = listing.complete(chosen, directory=True, prefix=prefix)
    _note_unverified(chosen, meta, source)
    files = [f.remote(f.path[len(prefix) :], opener) for f in chosen]
    return Plan("directory", files, commit, meta, shape)


def _describe(error: BaseException, where: str, source: Source) -> str:
    reason = str(error)
    if isinstance(error, FatalError) and error.status in (401, 403, 404):
        reason = (
            f"{where}: repository or revision not found, or private/gated "
            "(set HF_TOKEN or storage_options={'hf': {'token': ...}}): " + reason
        )
    else:
        reason = f"{where}: {reason}"
    return source.scrub(reason)


@dataclass(frozen=True)
class _Listed:
    """One file of the repo as a listing gave it: its size and digests when it said."""

    path: str
    size: int | None
    sha256: str | None
    git_oid: str | None

    @classmethod
    def of(cls, item: Any) -> _Listed:
        """From huggingface_hub's ``RepoSibling`` (repo info) or ``RepoFile`` (tree, paths-info)."""
        path = getattr(item, "rfilename", None) or item.path
        lfs = getattr(item, "lfs", None)
        if lfs:
            sha256 = lfs.get("sha256") or lfs.get("oid")
            return cls(path, _size(lfs.get("size", item.size)), str(sha256).lower(), None)
        blob_id = getattr(item, "blob_id", None)
        return cls(path, _size(getattr(item, "size", None)), None, blob_id or None)

    @property
    def verifiable(self) -> bool:
        """Whether a digest of the content is known."""
        return self.sha256 is not None or self.git_oid is not None

    @property
    def complete(self) -> bool:
        """Whether both the size and a digest are known."""
        return self.size is not None and self.verifiable

    def remote(self, relative: str, opener: _Opener) -> RemoteFile:
        """The plan's file at ``relative``."""
        return RemoteFile(
            relative,
            self.size,
            opener.for_file(self.path),
            sha256=self.sha256,
            git_oid=self.git_oid,
        )


def _size(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


class _Listing:
    """The routes that list files with their sizes and digests, asked when repo info did not."""

    def __init__(
        self,
        api: Any,
        location: HubLocation,
        commit: str,
        options: TransferOptions,
        source: Source,
    ) -> None:
        self._api = api
        self._location = location
        self._commit = commit
        self._options = options
        self._source = source

    def _ask(self, what: str, call: Any) -> list[_Listed] | None:
        """``call()``'s files; ``None`` when the server has no such route."""
        where = f"{self._location.repo_id}@{self._commit[:12]} {what}"
        try:
            found = retrying(
                lambda: list(call()),
                self._options,
                describe=lambda e: self._source.scrub(f"{where}: {e}"),
            )
        except FatalError as error:
            if error.status in _NO_ROUTE:
                log.debug("%s: %s (%s)", self._source.redacted, where, error)
                return None
            raise
        return [_Listed.of(item) for item in found if hasattr(item, "blob_id")]

    def paths(self, paths: list[str]) -> list[_Listed]:
        """The paths-info route's answer for ``paths`` (files only)."""
        api, location = self._api, self._location
        found = self._ask(
            "paths-info",
            lambda: api.get_paths_info(
                location.repo_id, paths, revision=self._commit, repo_type=location.repo_type
            ),
        )
        return [f for f in found or [] if f.path in paths]

    def tree(self, prefix: str) -> list[_Listed]:
        """Every file below ``prefix`` (recursive tree)."""
        api, location = self._api, self._location
        found = self._ask(
            "tree",
            lambda: api.list_repo_tree(
                location.repo_id,
                path_in_repo=prefix.rstrip("/") or None,
                recursive=True,
                revision=self._commit,
                repo_type=location.repo_type,
            ),
        )
        return found or []

    def complete(self, files: list[_Listed], *, directory: bool, prefix: str = "") -> list[_Listed]:
        """``files`` with the sizes and digests the repo info left out, where a route gives them."""
        if all(f.complete for f in files):
            return files
        if directory and len(files) > 1:
            better = {f.path: f for f in self.tree(prefix)}
        else:
            better = {f.path: f for f in self.paths([f.path for f in files])}
        return [_better(f, better.get(f.path)) for f in files]


_NO_ROUTE = (400, 404, 405, 501)
"""Statuses that say a server has no such listing route (not that the repo is missing)."""


def _better(known: _Listed, other: _Listed | None) -> _Listed:
    if other is None:
        return known
    if known.verifiable and not other.verifiable:
        return _Listed(known.path, known.size or other.size, known.sha256, known.git_oid)
    return _Listed(known.path, other.size or known.size, other.sha256, other.git_oid)


def _note_unverified(files: list[_Listed], meta: dict[str, Any], source: Source) -> None:
    """Record, in the entry's metadata and at DEBUG, the files no route gave a digest for."""
    unverified = [f.path for f in files if not f.verifiable]
    if unverified:
        meta["unverified"] = unverified
        log.debug(
            "%s: the Hub gives no digest for %d file(s) (%s): fetched unverified "
            '(listed under "unverified" in the entry\'s meta.json)',
            source.redacted,
            len(unverified),
            ", ".join(unverified[:5]) + (", ..." if len(unverified) > 5 else ""),
        )


class _Opener:
    """Makes readers of one commit's files through their resolve URLs."""

    def __init__(
        self, location: HubLocation, commit: str, endpoint: str, token: Any, source: Source
    ) -> None:
        self._location = location
        self._commit = commit
        self._endpoint = endpoint
        self._token = token
        self._source = source

    def for_file(self, filename: str) -> Any:
        def open_reader(transfer: TransferOptions) -> Reader:
            from huggingface_hub import hf_hub_url
            from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

            try:
                url = hf_hub_url(
                    self._location.repo_id,
                    filename,
                    repo_type=self._location.repo_type,
                    revision=self._commit,
                    endpoint=self._endpoint,
                )
                headers = build_hf_headers(token=self._token)
            except Exception as error:
                raise classify(error) from None
            headers["Accept-Encoding"] = "identity"
            return HTTPReader(Source(url, {"headers": headers}), transfer)

        return open_reader

"""The Hugging Face Hub: ``hf://[datasets/|spaces/]<owner>/<repo>[@<revision>][/<path>]``.

huggingface_hub answers the questions (``repo_info`` with file metadata: the commit a branch or
tag points at, every file's size, the sha256 of LFS files and the git blob id of the others, in
one request); the bytes come through the resolve URLs of that commit with modelcache's ranged,
resumable HTTP reader, each file checked against the digest the Hub gives.

Revisions: a cache entry is keyed by the URL, so ``hf://org/repo@<commit>/file`` (or any URL
already cached) starts warm with no network at all. A branch or tag is resolved once, when the
entry is made; the commit is recorded in the entry's ``meta.json`` (``"revision"``) and kept
until the entry is fetched again with ``refresh=True``. Offline, the recorded entry is used.

Options (``storage_options={"hf": {...}}`` or flat): ``token`` (else ``HF_TOKEN`` or the token
saved by ``hf auth login``), ``endpoint`` (else ``HF_ENDPOINT``, else https://huggingface.co).
``HF_HUB_OFFLINE=1`` is honoured like ``MODELCACHE_OFFLINE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from modelcache import config
from modelcache._plan import Plan, RemoteFile, Selection
from modelcache.errors import NotCachedError
from modelcache.filesystems import classify, require_extra, retrying, transfer_options
from modelcache.readers import HTTPReader
from modelcache.sources import Source, parse_hf_url
from modelcache.transfer import FatalError, Reader, TransferOptions

__all__ = ["DEFAULT_ENDPOINT", "HubLocation", "endpoint_for", "parse_hub_url", "plan_hub"]

DEFAULT_ENDPOINT = "https://huggingface.co"
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


def _offline() -> bool:
    return (config.env("HF_HUB_OFFLINE") or "").lower() in _TRUE


def plan_hub(source: Source, options: TransferOptions) -> Plan:
    """Ask the Hub what ``source`` names: the commit, and each file with its size and digest."""
    require_extra("hf")
    try:
        location = parse_hub_url(source.url)
    except ValueError as error:
        raise FatalError(f"bad URL: {error}") from None
    if _offline():
        raise NotCachedError("not in the cache and HF_HUB_OFFLINE is set", source=source.redacted)
    from huggingface_hub import HfApi

    endpoint = endpoint_for(source)
    token = source.storage_options.get("token")
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{location.repo_id}@{location.revision or 'main'}"

    def ask() -> Any:
        return api.repo_info(
            location.repo_id,
            repo_type=location.repo_type,
            revision=location.revision,
            files_metadata=True,
        )

    info = retrying(ask, options, describe=lambda e: _describe(e, where, source))
    commit = str(info.sha)
    siblings = list(info.siblings or [])
    shape = transfer_options(source, options, chunk_size=None, connections=None)
    meta = {"revision": {"requested": location.revision, "commit": commit}}
    opener = _Opener(location, commit, endpoint, token, source)
    selection = Selection.from_source(source)
    if not location.directory:
        for sibling in siblings:
            if sibling.rfilename == location.path:
                if selection:
                    raise FatalError(
                        "include/exclude choose files of a repo or directory; this is one file"
                    )
                return Plan("file", [_remote_file(sibling, "", opener)], commit, meta, shape)
    prefix = f"{location.path}/" if location.path else ""
    files = [
        _remote_file(s, s.rfilename[len(prefix) :], opener)
        for s in sorted(siblings, key=lambda s: s.rfilename)
        if s.rfilename.startswith(prefix) and selection.wants(s.rfilename[len(prefix) :])
    ]
    if not files:
        what = f"{location.path!r}" if location.path else "any file"
        raise FatalError(
            f"{what} not found in {location.repo_id} at commit {commit[:12]}{selection.describe()}",
            404,
        )
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


def _remote_file(sibling: Any, relative: str, opener: _Opener) -> RemoteFile:
    lfs = sibling.lfs
    sha256 = str(lfs["sha256"]).lower() if lfs else None
    git_oid = None if lfs else sibling.blob_id
    return RemoteFile(
        relative, sibling.size, opener.for_file(sibling.rfilename), sha256=sha256, git_oid=git_oid
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

"""Copy a model from its origin to your own bucket or volume, keeping its sha256.

The model is first fetched into the cache (verified, resumable, from a chain of mirrors if you
like), then copied file by file to the destination: an ``s3://`` or ``gs://`` URL (or any
fsspec URL), or a local directory such as a mounted network volume. Each copied object carries
its sha256 (S3 and GCS object metadata ``sha256``, which modelcache checks when it later reads
the object; a ``<file>.sha256`` file in ``sha256sum`` format beside a local file), so a handle
pinned to that sha256 can use the copy and the origin interchangeably.

An ``oci://<registry>/<repository>:<tag>`` destination receives the model as an OCI artifact
(one layer per file, titled with its path in the model, a ModelPack manifest): see
``docs/oci.md``. Layers are named by their sha256, which is what they are checked against
when read back.

Running it again is cheap: files already at the destination with the same size and sha256
are not copied again (a registry is asked with a ``HEAD`` per blob).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._filesystems import open_filesystem, retrying
from ._hashing import manifest_digest
from ._sources import Source, SourceLike, parse_sources
from ._transfer import FatalError, TransferOptions
from .errors import SourceError

__all__ = ["Mirrored", "mirror"]

_UPLOAD_CHUNK = 16 << 20


@dataclass(frozen=True)
class Mirrored:
    """What :func:`mirror` copied.

    Attributes:
        dest: where the copy is (redacted): the file, or the directory of a directory model.
        sha256: the model's sha256 (a directory's manifest digest, see ``tree.py``).
        size: bytes copied or found already there.
        files: how many files the model has.
        copied: how many of them were copied (the others were already there).
        source: the source the model came from (redacted).
        digest: for an ``oci://`` destination, the pushed manifest's digest (``sha256:...``),
            which pins it (``dest`` ends with it); else ``None``.
    """

    dest: str
    sha256: str
    size: int
    files: int
    copied: int
    source: str
    digest: str | None = None

    def __str__(self) -> str:
        return self.dest


def mirror(
    source: SourceLike | Sequence[SourceLike],
    dest: SourceLike,
    *,
    sha256: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    dest_options: Mapping[str, Any] | None = None,
    cache: Any = None,
    model: str | None = None,
) -> Mirrored:
    """Copy the model at ``source`` to ``dest``; return what was copied and its sha256.

    ``dest`` ending in ``/`` (or an existing local directory) receives the model under its own
    name (``s3://bucket/models/`` + ``sharp.pt``); otherwise ``dest`` is the copy's exact name.
    An ``oci://`` ``dest`` is a registry's repository and tag (see the module's docstring).
    ``storage_options`` are for the source, ``dest_options`` for the destination.
    Raises what :meth:`Cache.fetch` raises, and :class:`SourceError` when the destination
    cannot be written.
    """
    from .cache import Cache

    if cache is None:
        cache = Cache()
    elif not isinstance(cache, Cache):
        cache = Cache(cache)
    fetched = cache.fetch_details(source, sha256, storage_options, model=model)
    local = fetched.path
    target = Source.parse(dest, dest_options)
    files = _files(local)
    digests = _digests(fetched)
    pushed = None
    try:
        if target.is_local:
            where, copied = _to_local(local, target.local_path, files, digests)
            shown = where.as_posix()
        elif target.protocol == "oci":
            pushed = _to_registry(local, target, digests, cache.transfer, model, source)
            shown = pushed.reference
            copied = sum(1 for relative, _ in files if digests[relative] in _hexes(pushed.sent))
        else:
            shown, copied = _to_store(local, target, files, digests, cache.transfer)
    except FatalError as error:
        raise SourceError(
            f"cannot write the copy: {target.scrub(str(error))}",
            model=model,
            source=target.redacted,
            status=error.status,
        ) from None
    except OSError as error:
        raise SourceError(
            f"cannot write the copy: {target.scrub(str(error))}",
            model=model,
            source=target.redacted,
        ) from None
    size = sum(path.stat().st_size for _, path in files)
    digest = fetched.sha256 or (
        digests[""] if local.is_file() else manifest_digest(sorted(digests.items()))
    )
    manifest = None if pushed is None else pushed.digest
    return Mirrored(shown, digest, size, len(files), copied, fetched.source, manifest)


def _to_registry(
    local: Path,
    target: Source,
    digests: dict[str, str],
    options: TransferOptions,
    model: str | None,
    source: SourceLike | Sequence[SourceLike],
) -> Any:
    """Push the model as an OCI artifact; blobs of the registry's other repository the model
    came from (an ``oci://`` source there) are mounted rather than uploaded."""
    from ._oci import parse_reference, push_path

    reference = parse_reference(target.url)
    known = {local.name if rel == "" else rel: sha for rel, sha in digests.items()}
    mount_from = None
    for each in parse_sources(source):
        if each.protocol == "oci":
            with contextlib.suppress(ValueError):
                origin = parse_reference(each.url)
                same_registry = origin.registry == reference.registry
                if same_registry and origin.repository != reference.repository:
                    mount_from = origin.repository
                    break
    return push_path(
        local,
        target.url,
        storage_options=target.storage_options,
        transfer=options,
        name=model,
        sha256s=known,
        mount_from=mount_from,
    )


def _hexes(digests: frozenset[str]) -> set[str]:
    return {d.split(":", 1)[1] for d in digests}


def _files(local: Path) -> list[tuple[str, Path]]:
    """``(relative path, local path)`` of every file of the model (``""`` for a lone file)."""
    if local.is_file():
        return [("", local)]
    return sorted((p.relative_to(local).as_posix(), p) for p in local.rglob("*") if p.is_file())


def _digests(fetched: Any) -> dict[str, str]:
    """sha256 of each file, from the entry's metadata (hashing only files that lack one)."""
    from ._hashing import hash_file

    found: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        meta = json.loads((fetched.path.parent / "meta.json").read_text())
        if meta["name"] == fetched.path.name:
            for record in meta["files"]:
                found[record["path"][len(meta["name"]) :].lstrip("/")] = record["sha256"]
    for relative, path in _files(fetched.path):
        if relative not in found:
            found[relative] = hash_file(path)
    return found


def _join(base: str, relative: str) -> str:
    return f"{base.rstrip('/')}/{relative}" if relative else base


def _to_local(
    local: Path, dest: Path, files: list[tuple[str, Path]], digests: dict[str, str]
) -> tuple[Path, int]:
    into_directory = str(dest).endswith(os.sep) or dest.is_dir()
    target = dest / local.name if into_directory else dest
    copied = 0
    for relative, path in files:
        final = target / relative if relative else target
        digest = digests[relative]
        if _same_local(final, path.stat().st_size, digest):
            continue
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            shutil.copyfile(path, tmp)
            os.chmod(tmp, 0o664)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        copied += 1
    if local.is_file():
        sidecar = target.with_name(target.name + ".sha256")
        sidecar.write_text(f"{digests['']}  {target.name}\n")
    return target, copied


def _same_local(path: Path, size: int, digest: str) -> bool:
    from ._hashing import hash_file

    try:
        return path.stat().st_size == size and hash_file(path) == digest
    except OSError:
        return False


def _to_store(
    local: Path,
    target: Source,
    files: list[tuple[str, Path]],
    digests: dict[str, str],
    options: TransferOptions,
) -> tuple[str, int]:
    fs, base = open_filesystem(target)
    if target.url.split("?", 1)[0].endswith("/"):
        base = _join(base, local.name)
        shown = _join(target.redacted.rstrip("/"), local.name)
    else:
        shown = target.redacted
    protocol = target.protocol
    copied = 0
    for relative, path in files:
        remote = _join(base, relative)
        digest = digests[relative]
        size = path.stat().st_size
        if _same_remote(fs, remote, size, digest, options):
            continue
        _upload(fs, path, remote, protocol, digest, options)
        copied += 1
    return shown, copied


def _upload(
    fs: Any, path: Path, remote: str, protocol: str, digest: str, options: TransferOptions
) -> None:
    """Copy one file to the store with its sha256 in the object's metadata; check the size."""
    kwargs: dict[str, Any] = {}
    if protocol == "s3":
        kwargs = {"Metadata": {"sha256": digest}, "chunksize": _UPLOAD_CHUNK}
    elif protocol == "gs":
        kwargs = {"metadata": {"sha256": digest}, "chunksize": _UPLOAD_CHUNK}
    size = path.stat().st_size

    def describe(error: BaseException) -> str:
        return f"{remote}: {error}"

    def put() -> None:
        with warnings.catch_warnings():
            # gcsfs hands aiohttp each upload chunk as bytes, which aiohttp warns about
            warnings.simplefilter("ignore", ResourceWarning)
            fs.put_file(str(path), remote, **kwargs)

    retrying(put, options, describe=describe)
    fs.invalidate_cache(remote)
    written = retrying(lambda: fs.info(remote), options, describe=describe)
    if int(written.get("size", -1)) != size:
        raise FatalError(
            f"{remote}: the store holds {written.get('size')} bytes after the upload, "
            f"expected {size}"
        )


def _same_remote(fs: Any, remote: str, size: int, digest: str, options: TransferOptions) -> bool:
    """Whether ``remote`` already holds this file (same size and declared sha256)."""
    from ._planners.stores import _declared_sha256

    fs.invalidate_cache(remote)
    try:
        info = retrying(lambda: fs.info(remote), options)
    except FatalError:
        return False
    if int(info.get("size", -1)) != size:
        return False
    if "Metadata" not in info and "metadata" not in info and hasattr(fs, "_call_s3"):
        try:
            bucket, key, _ = fs.split_path(remote)
            info = {**info, **fs.call_s3("head_object", Bucket=bucket, Key=key)}
        except Exception:
            return False
    return _declared_sha256(info) == digest

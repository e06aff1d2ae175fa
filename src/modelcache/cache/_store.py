"""The layers of one cache seen together: read-only layers first, then the writable one.

A :class:`Store` finds refs and blobs in any layer, checks that their files are sound, serves a
ref as a hit (holding this process's lease on it), and publishes new refs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from modelcache._posix import Leases
from modelcache._sources import Source
from modelcache.errors import ModelCacheError

from ._entries import Fetched
from ._layout import Layer, Ref
from ._trust import Trust

__all__ = ["Store", "entry_meta"]

log = logging.getLogger("modelcache")

_LEASES = Leases()  # one per process: leases are per process, not per Cache object


class Store:
    """The layers of a cache at ``path`` under ``read_only_paths``.

    ``checked`` remembers the layers whose layout version was read (the caller keeps it).
    """

    leases = _LEASES

    def __init__(
        self, path: Path, read_only_paths: list[Path], checked: set[tuple[Path, bool]]
    ) -> None:
        self.path = path
        self._read_only_paths = read_only_paths
        self._checked = checked
        self.trust = Trust(path / ".trusted")

    def _layer(self, root: Path, read_only: bool) -> Layer:
        layer = Layer(root, read_only)
        if (root, read_only) not in self._checked:
            layer.check_version()
            self._checked.add((root, read_only))
        return layer

    def writable(self) -> Layer:
        """The writable layer (its directories may not exist yet)."""
        return self._layer(self.path, False)

    def layers(self) -> list[Layer]:
        """Every layer, in the order they are searched."""
        return [self._layer(p, True) for p in self._read_only_paths] + [self.writable()]

    def ready_to_write(self) -> Layer:
        """The writable layer, with the directories a writer needs."""
        layer = self.writable()
        try:
            layer.ensure()
        except OSError as error:
            raise ModelCacheError(f"cannot write the cache at {self.path}: {error}") from None
        return layer

    def all_refs(self) -> Iterator[tuple[Layer, Ref]]:
        """Every published ref of every layer."""
        for layer in self.layers():
            for ref in layer.all_refs():
                yield layer, ref

    # -- leases ---------------------------------------------------------------------------------

    @staticmethod
    def lease_path(layer: Layer, key: str) -> Path:
        """The file whose shared lock marks the ref ``key`` as used."""
        return layer.locks / f"{key}.use"

    def release(self, key: str) -> None:
        """This process no longer uses the writable layer's ref ``key``."""
        self.leases.give_back(self.lease_path(Layer(self.path, False), key))

    # -- hits -----------------------------------------------------------------------------------

    def find(self, source: Source, digest: str | None, recorded: dict[str, str]) -> Fetched | None:
        """The sound entry of ``source`` in any layer; a ``digest`` it does not have is noted
        in ``recorded`` instead."""
        for layer in self.layers():
            ref = layer.ref(source.key)
            if ref is None:
                continue
            if digest is not None and ref.sha256 != digest:
                recorded[source.key] = ref.sha256
                continue
            hit = self.serve(layer, ref, source.redacted)
            if hit is not None:
                return hit
        return None

    def find_key(self, key: str, label: str) -> Fetched | None:
        """The sound ref ``key`` (a derived entry) in any layer."""
        for layer in self.layers():
            ref = layer.ref(key)
            hit = None if ref is None else self.serve(layer, ref, label)
            if hit is not None:
                return hit
        return None

    def serve(self, layer: Layer, ref: Ref, label: str) -> Fetched | None:
        """``ref`` as a hit, once its files are found sound and this process holds its lease."""
        for record in ref.files:
            path = ref.directory / record["path"]
            if not self.trust.holds(
                path, record["size"], record["sha256"], reseal=not layer.read_only
            ):
                if layer.ref(ref.key) != ref:
                    return None  # evicted or replaced by another process meanwhile: a miss
                log.warning(
                    "cache entry %s is corrupt (%s); it will be fetched again",
                    ref.directory,
                    record["path"],
                )
                if not layer.read_only:
                    self._drop_corrupt(layer, ref, record["sha256"])
                return None
        if not layer.read_only:
            # a ref evicted meanwhile is a miss: the lease is taken, then looked at again; a
            # lease this process held already (a handle serves the entry while it is fetched
            # again, or replaced by another process) is kept: giving it back would let prune
            # evict an entry in use
            lease = self.lease_path(layer, ref.key)
            held = self.leases.holds(lease)
            if not self.leases.take(lease) or not ref.directory.is_dir():
                if not held:
                    self.leases.give_back(lease)
                return None
            layer.touch(ref)
        return Fetched(ref.path, True, ref.sha256, int(ref.meta["size"]), label, ref.key)

    @staticmethod
    def _drop_corrupt(layer: Layer, ref: Ref, sha256: str) -> None:
        with contextlib.suppress(OSError):
            layer.blob(sha256).unlink()  # corrupt: no other source may link it again
        layer.discard(ref.directory)
        layer.collect_garbage()

    def sound_blob(self, sha256: str, size: int | None) -> Path | None:
        """A blob of ``sha256`` in any layer whose bytes are sound."""
        for layer in self.layers():
            blob = layer.blob(sha256)
            if blob.is_file() and self.trust.holds(blob, size, sha256, reseal=not layer.read_only):
                return blob
        return None

    def from_blob(self, source: Source, digest: str) -> Fetched | None:
        """An entry for ``source`` made from a blob of ``digest`` that another source fetched."""
        if source.protocol == "oci":
            return None  # its file is named by a layer title, which only the manifest tells
        blob = self.sound_blob(digest, None)
        if blob is None:
            return None
        try:
            layer = self.ready_to_write()
        except ModelCacheError:
            return None
        name = source.name
        record = {"path": name, "size": blob.stat().st_size, "sha256": digest}
        meta = entry_meta(source, "file", digest, None, [record])
        ref = layer.publish(source.key, meta, {}, {name: blob}) or layer.ref(source.key)
        log.info("%s: the blob %s is already cached; no download", source.redacted, digest[:16])
        return None if ref is None else self.serve(layer, ref, source.redacted)

    # -- publishing -----------------------------------------------------------------------------

    def publish(
        self,
        layer: Layer,
        meta: Mapping[str, Any],
        parts: Mapping[str, Path],
        blobs: Mapping[str, Path],
        *,
        label: str,
        replace: bool = False,
        published: Callable[[], Fetched | None],
    ) -> Fetched:
        """Publish a ref (see :meth:`Layer.publish`) and hold its lease; when another writer
        published it first (possible only without working file locks), ``published()``."""
        ref = layer.publish(meta["key"], meta, parts, blobs, replace=replace)
        if ref is None:
            hit = published()
            if hit is None:
                raise ModelCacheError("another writer published a different entry meanwhile")
            return hit
        self.leases.take(self.lease_path(layer, ref.key))
        return Fetched(ref.path, False, ref.sha256, int(meta["size"]), label, ref.key)


def entry_meta(
    source: Source,
    kind: str,
    sha256: str,
    etag: str | None,
    files: list[dict[str, Any]],
    extra: Mapping[str, Any] | None = None,
    *,
    key: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """The ``meta.json`` of a ref (the layer adds its format and creation time)."""
    return {
        "key": key or source.key,
        "source": source.redacted,
        "name": name or source.name,
        "kind": kind,
        "size": sum(int(f["size"]) for f in files),
        "sha256": sha256,
        "etag": etag,
        "files": files,
        **(extra or {}),
    }

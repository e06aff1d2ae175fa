"""What a registry stores: manifests, their titled layers, and the artifact a reference names.

Pure data and checks, no I/O: an OCI image manifest's layers that carry an
``org.opencontainers.image.title`` are files; a title must be a relative path that stays inside
the entry, each title appears once, and each digest is a sha256.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelcache._plan import Selection, relative_path
from modelcache._transfer import FatalError

from ._reference import Reference

__all__ = [
    "ANNOTATION_TITLE",
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "INDEXES",
    "MANIFEST_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Artifact",
    "DigestError",
    "Layer",
    "Manifest",
    "titled_layers",
]

ANNOTATION_TITLE = "org.opencontainers.image.title"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
#: what a manifest request accepts, in order of preference
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
INDEXES = {OCI_INDEX, DOCKER_LIST}


class DigestError(FatalError):
    """The registry sent bytes whose digest is not the one they are named by."""


@dataclass(frozen=True)
class Layer:
    """One file of an artifact: a layer with an ``org.opencontainers.image.title``."""

    title: str
    digest: str
    size: int
    media_type: str

    @property
    def sha256(self) -> str:
        """The hex sha256 of the file (a layer's digest is the sha256 of its bytes)."""
        return self.digest.split(":", 1)[1]

    @property
    def name(self) -> str:
        """The file name alone (the title's last component)."""
        return self.title.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Manifest:
    """A manifest as the registry stored it: its exact bytes, digest and parsed document."""

    digest: str
    media_type: str
    raw: bytes
    document: Mapping[str, Any]


@dataclass(frozen=True)
class Artifact:
    """What an ``oci://`` reference names: a manifest and its titled layers.

    Attributes:
        reference: the reference pinned to :attr:`pinned` (the tag kept for display).
        pinned: the digest the reference resolved to (an index's, when it named an index).
        digest: the digest of the image manifest whose layers these are.
        media_type: that manifest's media type.
        artifact_type: its ``artifactType`` (or its config's media type), if any.
        layers: the titled layers, in manifest order.
    """

    reference: Reference
    pinned: str
    digest: str
    media_type: str
    artifact_type: str | None
    layers: tuple[Layer, ...]

    @property
    def kind(self) -> str:
        """``"file"`` for an artifact of one layer, else ``"directory"``."""
        return "file" if len(self.layers) == 1 else "directory"

    def select(self, selection: Selection | None = None) -> list[Layer]:
        """The layers ``selection`` (default: the reference's) chooses; raises when none."""
        selection = self.reference.selection if selection is None else selection
        chosen = [layer for layer in self.layers if selection.wants(layer.title)]
        if not chosen:
            raise FatalError(
                f"no layer of {self.reference.url(selection=False)} has a title"
                f"{selection.describe() or ''} (titles: "
                f"{', '.join(layer.title for layer in self.layers)})",
                404,
            )
        return chosen

    def files(self, selection: Selection | None = None) -> list[tuple[str, Layer]]:
        """``(path in the entry, layer)`` of the selected layers.

        An artifact of one layer is a file entry: its path is ``""`` and it is named
        :attr:`name`. Otherwise each layer's path is its title.
        """
        chosen = self.select(selection)
        if self.kind == "file":
            return [("", chosen[0])]
        return [(layer.title, layer) for layer in chosen]

    @property
    def name(self) -> str:
        """The entry's name: a one-file artifact's file name (loaders go by its suffix), else
        the repository's last component."""
        if self.kind == "file":
            return self.layers[0].name
        return self.reference.repository.rsplit("/", 1)[-1]

    @property
    def meta(self) -> dict[str, Any]:
        """What to record with a cache entry: the tag asked for (``requested``, None when
        pinned by digest), the digest it resolved to, and the image manifest's digest."""
        return {
            "oci": {
                "requested": self.reference.tag,
                "digest": self.pinned,
                "manifest": self.digest,
            }
        }


def titled_layers(manifest: Manifest, reference: Reference) -> tuple[Layer, ...]:
    """The layers of ``manifest`` that carry a title, checked: a safe relative path, each once."""
    layers = manifest.document.get("layers")
    if not isinstance(layers, list):
        raise FatalError(
            f"the manifest {manifest.digest} of {reference.repository} lists no layers"
        )
    found: list[Layer] = []
    seen: set[str] = set()
    for entry in layers:
        if not isinstance(entry, Mapping):
            continue
        annotations = entry.get("annotations") or {}
        title = annotations.get(ANNOTATION_TITLE) if isinstance(annotations, Mapping) else None
        if not title:
            continue
        title = str(title)
        digest, size = str(entry.get("digest", "")), entry.get("size")
        relative_path(title)  # raises for a title that would leave the entry
        if title in seen:
            raise FatalError(f"two layers are titled {title!r}")
        if not digest.startswith("sha256:") or len(digest) != 71:
            raise FatalError(f"layer {title!r} has digest {digest!r}; only sha256 is supported")
        if not isinstance(size, int) or size < 0:
            raise FatalError(f"layer {title!r} has no valid size")
        seen.add(title)
        found.append(Layer(title, digest, size, str(entry.get("mediaType", ""))))
    if not found:
        raise FatalError(
            f"no layer of {reference.url(selection=False)} has an {ANNOTATION_TITLE} "
            "annotation: it is not an artifact of files (a container image?)"
        )
    return tuple(found)

"""Push files as an OCI artifact that ``oras pull`` (and ``oci://`` sources) fetch back by title.

The manifest follows the CNCF ModelPack spec (``modelpack/model-spec``, ``docs/spec.md``) where it
fits: ``artifactType`` ``application/vnd.cncf.model.manifest.v1+json``; a config of type
``application/vnd.cncf.model.config.v1+json`` (the model's name, its format when the weights
say, and ``modelfs.diffIds``: for raw layers their own digests); one uncompressed layer per file
(``...weight.v1.raw`` for weights, ``...weight.config.v1.raw`` for configs and tokenizers,
``...doc.v1.raw``, ``...code.v1.raw``), each annotated with its path relative to the model as
``org.opencontainers.image.title`` (what ``oras pull`` names files by) and
``org.cncf.model.filepath``. Nothing time-dependent goes in, so pushing the same files twice
makes the same manifest digest.

Blobs the repository already has (HEAD, same size) are not uploaded again; a blob another
repository of the registry has can be mounted instead (``mount_from``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelcache._transfer import FatalError, TransferOptions

from ._client import RegistryClient
from ._manifest import ANNOTATION_TITLE, OCI_MANIFEST, DigestError
from ._reference import Reference, parse_reference

__all__ = [
    "ARTIFACT_TYPE",
    "CONFIG_TYPE",
    "PushFile",
    "Pushed",
    "build_manifest",
    "collect_files",
    "layer_media_type",
    "push",
    "push_path",
]

log = logging.getLogger("modelcache")

ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_TYPE = "application/vnd.cncf.model.config.v1+json"
ANNOTATION_FILEPATH = "org.cncf.model.filepath"
_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
_WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
_DOC = "application/vnd.cncf.model.doc.v1.raw"
_CODE = "application/vnd.cncf.model.code.v1.raw"
#: weight file suffixes -> the ModelPack ``config.format`` they mean (None: no single name)
_WEIGHTS: dict[str, str | None] = {
    ".safetensors": "safetensors",
    ".onnx": "onnx",
    ".gguf": "gguf",
    ".pt": "pt",
    ".pth": "pt",
    ".bin": None,
    ".ckpt": None,
    ".h5": None,
    ".msgpack": None,
    ".npz": None,
    ".pb": None,
    ".tflite": None,
}
_CODE_SUFFIXES = {".py", ".sh", ".ipynb"}
_DOC_SUFFIXES = {".md", ".rst"}
_DOC_NAMES = ("readme", "license", "licence", "notice", "copying")
_HASH_BLOCK = 8 << 20


@dataclass(frozen=True)
class PushFile:
    """One file to push: its title (path relative to the model) and where its bytes are."""

    title: str
    path: Path
    size: int
    sha256: str

    @property
    def digest(self) -> str:
        """``sha256:<hex>``."""
        return f"sha256:{self.sha256}"


@dataclass(frozen=True)
class Pushed:
    """What :func:`push` did.

    Attributes:
        reference: ``oci://registry/repository[:tag]@sha256:...`` of the pushed manifest.
        digest: the manifest's digest.
        files: how many files the artifact has.
        size: their bytes.
        uploaded: blobs uploaded (the config counts as one).
        mounted: blobs mounted from another repository.
        skipped: blobs the repository already had.
        sent: the digests of the blobs uploaded or mounted (the config's included).
    """

    reference: str
    digest: str
    files: int
    size: int
    uploaded: int
    mounted: int
    skipped: int
    sent: frozenset[str] = frozenset()


def layer_media_type(title: str) -> str:
    """The ModelPack raw layer media type for a file (weights, config, doc or code)."""
    name = title.rsplit("/", 1)[-1].lower()
    suffix = name[name.rfind(".") :] if "." in name else ""
    if suffix in _WEIGHTS:
        return _WEIGHT
    if suffix in _CODE_SUFFIXES:
        return _CODE
    if suffix in _DOC_SUFFIXES or name.startswith(_DOC_NAMES):
        return _DOC
    return _WEIGHT_CONFIG


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def collect_files(path: Path, sha256s: Mapping[str, str] | None = None) -> list[PushFile]:
    """The files to push for a model at ``path``: the file itself, or every file below it.

    ``sha256s`` maps titles to digests already known (a cache entry's record); the others
    are hashed here.
    """
    known = dict(sha256s or {})
    if path.is_file():
        pairs = [(path.name, path)]
    elif path.is_dir():
        pairs = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    else:
        raise FatalError(f"nothing to push at {path}")
    if not pairs:
        raise FatalError(f"no file to push under {path}")
    return [
        PushFile(title, file, file.stat().st_size, known.get(title) or _sha256_of(file))
        for title, file in pairs
    ]


def _format(files: list[PushFile]) -> str | None:
    formats = set()
    for file in files:
        name = file.title.lower()
        suffix = name[name.rfind(".") :] if "." in name else ""
        if suffix in _WEIGHTS:
            formats.add(_WEIGHTS[suffix])
    return formats.pop() if len(formats) == 1 else None


def _dump(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def build_manifest(files: list[PushFile], *, name: str | None = None) -> tuple[bytes, bytes]:
    """``(config, manifest)`` bytes of a ModelPack artifact holding ``files``."""
    config: dict[str, Any] = {
        "descriptor": {"name": name} if name else {},
        "config": {},
        "modelfs": {"type": "layers", "diffIds": [f.digest for f in files]},
    }
    fmt = _format(files)
    if fmt is not None:
        config["config"]["format"] = fmt
    config_raw = _dump(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": CONFIG_TYPE,
            "digest": "sha256:" + hashlib.sha256(config_raw).hexdigest(),
            "size": len(config_raw),
        },
        "layers": [
            {
                "mediaType": layer_media_type(f.title),
                "digest": f.digest,
                "size": f.size,
                "annotations": {ANNOTATION_TITLE: f.title, ANNOTATION_FILEPATH: f.title},
            }
            for f in files
        ],
    }
    return config_raw, _dump(manifest)


def push_path(
    path: Path,
    dest: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    transfer: TransferOptions | None = None,
    name: str | None = None,
    sha256s: Mapping[str, str] | None = None,
    mount_from: str | None = None,
) -> Pushed:
    """Push the model at ``path`` (a file or a directory) to the ``oci://`` URL ``dest``.

    ``sha256s``: digests already known by title (a cache entry's record), not hashed again.
    Raises ``ValueError`` for a bad URL, :class:`FatalError` when the registry refuses.
    """
    reference = parse_reference(dest)
    if reference.selection:
        raise ValueError("include/exclude choose files to read; a push destination has none")
    client = RegistryClient(reference.registry, storage_options, transfer=transfer)
    files = collect_files(path, sha256s)
    return push(client, reference, files, name=name or path.name, mount_from=mount_from)


def push(
    client: RegistryClient,
    reference: Reference,
    files: list[PushFile],
    *,
    name: str | None = None,
    mount_from: str | None = None,
) -> Pushed:
    """Push ``files`` to ``reference`` (its tag, else its digest) as one artifact.

    ``mount_from``: another repository of the same registry that may hold the blobs (where a
    cached model came from), mounted instead of uploaded when it has them.
    """
    if not files:
        raise FatalError("nothing to push")
    config_raw, manifest_raw = build_manifest(files, name=name)
    digest = "sha256:" + hashlib.sha256(manifest_raw).hexdigest()
    if reference.tag is None and reference.digest not in (None, digest):
        raise DigestError(
            f"the files make manifest {digest}, not the {reference.digest} the reference names"
        )
    repository = reference.repository
    config_digest = "sha256:" + hashlib.sha256(config_raw).hexdigest()
    blobs: dict[str, tuple[int, Callable[[], Any]]] = {
        config_digest: (len(config_raw), functools.partial(io.BytesIO, config_raw))
    }
    for file in files:
        blobs.setdefault(file.digest, (file.size, functools.partial(file.path.open, "rb")))
    done = {"uploaded": 0, "mounted": 0, "skipped": 0}
    sent: set[str] = set()
    for blob, (size, opener) in blobs.items():
        if client.blob_size(repository, blob) == size:
            done["skipped"] += 1
            continue
        how = client.upload_blob(repository, opener, blob, size, mount_from=mount_from)
        done[how] += 1
        sent.add(blob)
    target = reference.tag or digest
    client.put_manifest(repository, target, manifest_raw, OCI_MANIFEST)
    pushed = reference.at(digest).url(selection=False)
    log.info(
        "pushed %s (%d files; %d blobs uploaded, %d mounted, %d already there)",
        pushed,
        len(files),
        done["uploaded"],
        done["mounted"],
        done["skipped"],
    )
    return Pushed(
        pushed,
        digest,
        len(files),
        sum(f.size for f in files),
        done["uploaded"],
        done["mounted"],
        done["skipped"],
        frozenset(sent),
    )

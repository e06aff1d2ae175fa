"""OCI registries (``oci://``): the distribution API's protocol layer, knowing nothing of the cache.

- :mod:`._reference` parses ``oci://<registry>[:<port>]/<repository>[:<tag>|@sha256:<digest>]``;
- :mod:`._auth` finds credentials and answers Basic and Bearer token challenges;
- :mod:`._manifest` holds manifests, titled layers and artifacts (no I/O);
- :mod:`._client` resolves tags, reads manifests (an index's first), lists titled layers, opens
  blob ranges for the transfer engine, and uploads blobs and manifests;
- :mod:`._push` builds a ModelPack artifact of files and pushes it.
"""

from ._auth import Credentials, credentials_for, docker_config_path
from ._client import BlobReader, RegistryClient, RegistryOptions
from ._manifest import ANNOTATION_TITLE, Artifact, DigestError, Layer, Manifest
from ._push import (
    ARTIFACT_TYPE,
    CONFIG_TYPE,
    Pushed,
    PushFile,
    build_manifest,
    collect_files,
    push,
    push_path,
)
from ._reference import Reference, parse_reference

__all__ = [
    "ANNOTATION_TITLE",
    "ARTIFACT_TYPE",
    "CONFIG_TYPE",
    "Artifact",
    "BlobReader",
    "Credentials",
    "DigestError",
    "Layer",
    "Manifest",
    "PushFile",
    "Pushed",
    "Reference",
    "RegistryClient",
    "RegistryOptions",
    "build_manifest",
    "collect_files",
    "credentials_for",
    "docker_config_path",
    "parse_reference",
    "push",
    "push_path",
]

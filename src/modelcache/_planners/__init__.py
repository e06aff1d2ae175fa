"""Planners: ask an origin what a source names (files, sizes, digests), knowing no cache.

One module per kind of origin: ``http`` (a plain file), ``stores`` (S3, GCS and any fsspec
filesystem, one object or a prefix), ``hub`` (the Hugging Face Hub), ``oci`` (OCI registries).
"""

from __future__ import annotations

from modelcache._plan import Plan
from modelcache._sources import Source
from modelcache._transfer import TransferOptions

__all__ = ["plan"]


def plan(source: Source, options: TransferOptions) -> Plan:
    """The plan of ``source`` (a remote source; local paths are used in place, never planned)."""
    if source.protocol == "hf":
        from .hub import plan_hub

        return plan_hub(source, options)
    if source.protocol == "oci":
        from .oci import plan_oci

        return plan_oci(source, options)
    if source.protocol in ("http", "https"):
        from .http import plan_http

        return plan_http(source, options)
    from .stores import plan_store

    return plan_store(source, options)

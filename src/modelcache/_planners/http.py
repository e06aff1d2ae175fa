"""Plain ``http(s)://`` files: a one-file plan; the first ranged request tells the size."""

from __future__ import annotations

from modelcache._plan import Plan, RemoteFile
from modelcache._readers import HTTPReader
from modelcache._sources import Source
from modelcache._transfer import Reader, TransferOptions

__all__ = ["plan_http"]


def plan_http(source: Source, options: TransferOptions) -> Plan:
    """A plan of the one file at ``source``, made without a request."""

    def open_reader(transfer: TransferOptions) -> Reader:
        return HTTPReader(source, transfer)

    return Plan("file", [RemoteFile("", None, open_reader)], None, {}, options)

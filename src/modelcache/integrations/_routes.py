"""What the model routes answer, whatever the web framework: status codes, bodies, headers.

FastAPI and Flask both turn these :class:`Reply` objects into their own responses, so the two
integrations answer byte for byte the same JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelcache.handle import ModelHandle
from modelcache.registry import Registry

__all__ = [
    "RETRY_AFTER_S",
    "Reply",
    "health",
    "load",
    "models",
    "page",
    "ready",
    "unavailable",
    "wants_html",
]

RETRY_AFTER_S = 1
"""The ``Retry-After`` a 503 carries: models report progress often, so ask again soon."""


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: status code, JSON body and extra headers."""

    status_code: int
    body: Mapping[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def health() -> Reply:
    """``GET /health``: 200 while the process serves (a liveness probe; loads nothing)."""
    return Reply(200, {"status": "ok"})


def ready(registry: Registry) -> Reply:
    """``GET /ready``: 200 when every required model is READY, else 503; body ``status()``."""
    status = registry.status()
    if status["ready"]:
        return Reply(200, status)
    return Reply(503, status, {"Retry-After": str(RETRY_AFTER_S)})


def models(registry: Registry) -> Reply:
    """``GET /models``: ``registry.status()``."""
    return Reply(200, registry.status())


def load(registry: Registry, name: str) -> Reply:
    """``POST /models/{name}/load``: start loading in the background (202), 404 when unknown."""
    if name not in registry:
        return Reply(404, {"detail": f"unknown model {name!r}", "models": list(registry)})
    handle = registry[name]
    handle.begin_loading()
    return Reply(202, handle.status())


def unavailable(handle: ModelHandle) -> Reply:
    """503 for a route whose model is not ready (yet): the body holds the model's status."""
    return Reply(503, {"detail": handle.status()}, {"Retry-After": str(RETRY_AFTER_S)})


def page(registry: Registry) -> str:
    """The live HTML page for ``GET /models`` asked by a browser."""
    from ._page import render_page

    return render_page(registry.status())


def wants_html(accept: str | None) -> bool:
    """Whether an ``Accept`` header prefers ``text/html`` to JSON (a browser, not curl)."""
    if not accept:
        return False
    weights: dict[str, float] = {}
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.strip().lower()
        weights[media] = max(quality, weights.get(media, 0.0))
    html = weights.get("text/html", 0.0)
    json = weights.get("application/json", 0.0)
    return html > 0 and html >= json

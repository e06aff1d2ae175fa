"""FastAPI integration: start models with the app, probe them, hand them to routes.

Example::

    from fastapi import Depends, FastAPI
    from modelcache import ModelHandle, Registry
    from modelcache.integrations.fastapi import lifespan, model, router

    models = Registry([ModelHandle("net", source=URL, strategy="background")])
    app = FastAPI(lifespan=lifespan(models))
    app.include_router(router(models))

    @app.post("/predict")
    async def predict(net=Depends(model(models, "net"))): ...

The routes: ``GET /health`` (200 while the process serves), ``GET /ready`` (200 when every
required model is READY, else 503; body ``registry.status()``), ``GET /models`` (the status as
JSON, or a live HTML page for a browser), ``POST /models/{name}/load`` (202; unknown name 404).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

try:
    from fastapi import APIRouter, FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
except ImportError as error:
    raise ImportError(
        "modelcache.integrations.fastapi needs FastAPI: pip install 'modelcache[fastapi]'"
    ) from error

from modelcache.errors import ModelCacheError
from modelcache.integrations import _routes
from modelcache.registry import Registry

__all__ = ["lifespan", "model", "router"]


def lifespan(registry: Registry) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """An app lifespan: ``registry.start()`` on startup, ``registry.close()`` on shutdown.

    Background handles start their download and return at once, so the server answers
    ``/health`` right away; eager handles load before the server accepts requests (a
    failing required one stops the startup). Use as ``FastAPI(lifespan=lifespan(models))``.
    """

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(registry.start)
        try:
            yield
        finally:
            await asyncio.to_thread(registry.close)

    return run


def _respond(reply: _routes.Reply) -> JSONResponse:
    return JSONResponse(reply.body, status_code=reply.status_code, headers=reply.headers)


def router(registry: Registry) -> APIRouter:
    """The model routes: ``/health``, ``/ready``, ``/models``, ``POST /models/{name}/load``.

    Mount it with ``app.include_router(router(models))`` (a ``prefix=`` works too).
    """
    api = APIRouter(tags=["models"])

    @api.get("/health", summary="Liveness: 200 while the process serves")
    async def health() -> JSONResponse:
        return _respond(_routes.health())

    @api.get("/ready", summary="Readiness: 200 when every required model is ready, else 503")
    async def ready() -> JSONResponse:
        return _respond(_routes.ready(registry))

    @api.get("/models", summary="Every model's status (a live page for a browser)")
    async def models(request: Request) -> Response:
        if _routes.wants_html(request.headers.get("accept")):
            return HTMLResponse(_routes.page(registry), headers={"Cache-Control": "no-store"})
        return _respond(_routes.models(registry))

    @api.post("/models/{name}/load", status_code=202, summary="Start loading a model")
    async def load(name: str) -> JSONResponse:
        return _respond(_routes.load(registry, name))

    return api


def model(
    registry: Registry, name: str, *, timeout: float | None = 1.0
) -> Callable[[], Awaitable[Any]]:
    """A dependency giving a route the loaded model ``name``: ``Depends(model(models, "net"))``.

    It waits at most ``timeout`` seconds (``None``: until loaded) without blocking the event
    loop, then answers 503 with the model's status and ``Retry-After`` instead of holding the
    request. A lazy model starts loading on the first request; a failed one tries again.
    """
    handle = registry[name]

    async def dependency() -> Any:
        try:
            return await handle.aget(timeout=timeout)
        except ModelCacheError:
            reply = _routes.unavailable(handle)
            raise HTTPException(
                reply.status_code, detail=reply.body["detail"], headers=reply.headers
            ) from None

    dependency.__name__ = f"model_{name.replace('-', '_').replace('.', '_')}"
    return dependency

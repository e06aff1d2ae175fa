"""The web app (``uvicorn app.main:app``): the routes, with health and readiness from modelcache."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from modelcache.integrations.fastapi import lifespan, router

from .models import registry

app = FastAPI(lifespan=lifespan(registry))
app.include_router(router(registry))


@app.get("/classifier")
def classifier() -> dict[str, Any]:
    """What the classifier holds (a real service would run it on the request's input)."""
    weights = registry["classifier"].get()
    return {"tensors": len(weights), "parameters": sum(t.numel() for t in weights.values())}

"""The web app (``uvicorn app.main:app``): the routes, with health and readiness from modelcache."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI

from modelcache.integrations.fastapi import lifespan, model, router

from .models import registry

app = FastAPI(lifespan=lifespan(registry))
app.include_router(router(registry))  # /health, /ready, /models, POST /models/{name}/load


#: the loaded classifier, or a 503 with its status while it is not ready
Classifier = Annotated[dict[str, Any], Depends(model(registry, "classifier"))]


@app.get("/classifier")
async def classifier(weights: Classifier) -> dict[str, Any]:
    """What the classifier holds (a real service would run it on the request's input)."""
    return {"tensors": len(weights), "parameters": sum(t.numel() for t in weights.values())}

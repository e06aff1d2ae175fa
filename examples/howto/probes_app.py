"""Startup vs on-demand loading behind Kubernetes probes (seed 004).

    uvicorn probes_app:app --port 8000          # from examples/howto/

- ``/health`` answers 200 as soon as the process serves: the liveness probe.
- ``/ready`` answers 503 until every *required* model is READY, then 200: the readiness probe
  (the pod gets traffic only then). Its body is ``registry.status()``: state, bytes, timings.
- ``POST /models/{name}/load`` starts loading an on-demand model (``/download-models`` of the
  seed), ``GET /models`` shows the status (a live page in a browser).

``MODELCACHE_STRATEGY`` switches every model at once: ``lazy`` in development (fast restarts),
``background`` or ``eager`` in production.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from modelcache import ModelHandle, Registry
from modelcache.integrations.fastapi import lifespan, model, router

ORIGIN = os.environ.get("MODEL_ORIGIN", "https://models.example.com/v1").rstrip("/")

models = Registry(
    [
        # Startup loading: downloads and loads in the background from the first second;
        # /ready stays 503 (no traffic) until it is READY.
        ModelHandle("music", source=f"{ORIGIN}/music.safetensors", strategy="background"),
        # On demand: nothing happens until a request (or POST /models/vocals/load) asks;
        # not required, so it does not hold back readiness.
        ModelHandle(
            "vocals",
            source=f"{ORIGIN}/vocals.safetensors",
            strategy="lazy",
            required=False,
        ),
    ]
)

app = FastAPI(lifespan=lifespan(models))
app.include_router(router(models))


#: The loaded model, handed to a route; 503 with the model's status while it is not ready.
Music = Annotated[Any, Depends(model(models, "music"))]
#: The on-demand model: the first request loads it and waits (timeout=None).
Vocals = Annotated[Any, Depends(model(models, "vocals", timeout=None))]


@app.post("/predict")
async def predict(weights: Music) -> dict[str, int]:
    """Answers 503 with the model's status (and Retry-After) while it is still loading."""
    return {"tensors": len(weights)}


@app.post("/separate")
async def separate(weights: Vocals) -> dict[str, int]:
    """The first call loads the on-demand model and waits for it; later calls are immediate."""
    return {"tensors": len(weights)}

"""The demo service: all-MiniLM-L6-v2 behind FastAPI, loaded in the background by modelcache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, Field

from modelcache import Cache, ModelHandle, Registry
from modelcache.demo.model import (
    DIMENSIONS,
    MODEL_NAME,
    Tokenizer,
    embed,
    load_minilm,
    tokenizer_for,
)
from modelcache.integrations.fastapi import lifespan, model, router

__all__ = ["EmbedRequest", "EmbedResponse", "create_app"]


class EmbedRequest(BaseModel):
    """``{"texts": [...]}``: the sentences to embed."""

    texts: list[str] = Field(min_length=1, max_length=256)


class EmbedResponse(BaseModel):
    """One normalised vector per text, in order."""

    model: str
    dimensions: int
    embeddings: list[list[float]]


def create_app(
    source: str | Sequence[str],
    *,
    sha256: str | None,
    quantize: str | None = None,
    cache: Cache | None = None,
) -> tuple[FastAPI, Registry]:
    """The demo app and its registry: a background handle, ``POST /embed``, the model routes."""
    state: dict[str, Tokenizer] = {}

    def load(path: Path) -> Any:
        state["tokenizer"] = tokenizer_for(path)
        return load_minilm(path)

    def warmup(net: Any) -> None:
        embed(net, state["tokenizer"], ["warm up: one sentence through every layer"])

    handle = ModelHandle(
        MODEL_NAME,
        source=list(source) if not isinstance(source, str) else source,
        sha256=sha256,
        loader=load,
        strategy="background",
        quantize=quantize,
        cache=cache,
        warmup=warmup,
    )
    models = Registry([handle])
    app = FastAPI(
        title="modelcache demo",
        description=f"{MODEL_NAME} sentence embeddings, fetched, verified, cached and loaded "
        "by modelcache.",
        lifespan=lifespan(models),
    )
    app.include_router(router(models))

    @app.get("/", include_in_schema=False)
    async def index() -> RedirectResponse:
        return RedirectResponse("/models")

    @app.post("/embed")
    def embed_texts(
        request: EmbedRequest,
        net: Any = Depends(model(models, MODEL_NAME, timeout=2.0)),  # noqa: B008
    ) -> EmbedResponse:
        vectors = embed(net, state["tokenizer"], request.texts)
        return EmbedResponse(model=MODEL_NAME, dimensions=DIMENSIONS, embeddings=vectors)

    return app, models

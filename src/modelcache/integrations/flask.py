"""Flask integration: the same routes as the FastAPI one, and a helper to get a model in a view.

Example::

    from flask import Flask
    from modelcache import ModelHandle, Registry
    from modelcache.integrations.flask import get_model, init_app

    models = Registry([ModelHandle("net", source=URL, strategy="background")])
    app = Flask(__name__)
    init_app(app, models)

    @app.post("/predict")
    def predict():
        net = get_model("net")          # 503 with the model's status while it is not ready
        ...
"""

from __future__ import annotations

import atexit
from typing import Any

try:
    from flask import Blueprint, Flask, Response, abort, current_app, jsonify, request
except ImportError as error:
    raise ImportError(
        "modelcache.integrations.flask needs Flask: pip install 'modelcache[flask]'"
    ) from error

from modelcache.errors import ModelCacheError
from modelcache.integrations import _routes
from modelcache.registry import Registry

__all__ = ["get_model", "init_app"]

_EXTENSION = "modelcache"


def _respond(reply: _routes.Reply) -> Response:
    response = jsonify(reply.body)
    response.status_code = reply.status_code
    response.headers.update(reply.headers)
    return response


def init_app(
    app: Flask,
    registry: Registry,
    *,
    url_prefix: str | None = None,
    start: bool = True,
    close_at_exit: bool = True,
) -> Registry:
    """Add ``/health``, ``/ready``, ``/models`` and ``POST /models/<name>/load`` to ``app``.

    ``registry.start()`` runs now (eager models load before this returns; background ones
    start downloading), and ``registry.close()`` when the interpreter exits. The registry is
    kept in ``app.extensions["modelcache"]`` for :func:`get_model`.
    """
    blueprint = Blueprint("modelcache", __name__, url_prefix=url_prefix)

    @blueprint.get("/health")
    def health() -> Response:
        return _respond(_routes.health())

    @blueprint.get("/ready")
    def ready() -> Response:
        return _respond(_routes.ready(registry))

    @blueprint.get("/models")
    def models() -> Response:
        if _routes.wants_html(request.headers.get("Accept")):
            page = Response(_routes.page(registry), mimetype="text/html")
            page.headers["Cache-Control"] = "no-store"
            return page
        return _respond(_routes.models(registry))

    @blueprint.post("/models/<name>/load")
    def load(name: str) -> Response:
        return _respond(_routes.load(registry, name))

    app.register_blueprint(blueprint)
    app.extensions[_EXTENSION] = registry
    if start:
        registry.start()
    if close_at_exit:
        atexit.register(registry.close)
    return registry


def get_model(name: str, *, timeout: float | None = 1.0) -> Any:
    """The loaded model ``name`` of the current app's registry, for use in a view.

    Waits at most ``timeout`` seconds (``None``: until loaded); past that, or when loading
    failed, the request ends with 503, the model's status as JSON and ``Retry-After``.
    A lazy model starts loading on the first call.
    """
    registry: Registry = current_app.extensions[_EXTENSION]
    handle = registry[name]
    try:
        return handle.get(timeout=timeout)
    except ModelCacheError:
        abort(_respond(_routes.unavailable(handle)))

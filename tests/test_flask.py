"""The Flask integration through Flask's test client, against a real (throttled) origin."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import MiB, make_payload, sha, wait_for
from flask import Flask

from modelcache import Cache, ModelHandle, Registry, State
from modelcache.integrations.flask import get_model, init_app
from modelcache.testing import ModelServer


def size_loader(path: Path) -> dict[str, Any]:
    """A loader that needs no torch: the 'model' is the file's size."""
    return {"bytes": path.stat().st_size}


def make_app(registry: Registry, timeout: float | None = 0.2) -> Flask:
    app = Flask(__name__)
    init_app(app, registry, close_at_exit=False)

    @app.get("/predict")
    def predict() -> dict[str, Any]:
        return {"model": get_model("net", timeout=timeout)}

    return app


def registry_for(
    model_server: ModelServer,
    cache: Cache,
    *,
    rate: float | None = None,
    strategy: str = "background",
) -> Registry:
    payload = make_payload(2 * MiB, seed=7)
    url = model_server.add("net.bin", payload)
    model_server.set_rate("net.bin", rate)
    handle = ModelHandle(
        "net", source=url, sha256=sha(payload), loader=size_loader, strategy=strategy, cache=cache
    )
    return Registry([handle])


def test_background_load_health_at_once_ready_503_then_200(
    model_server: ModelServer, cache: Cache
) -> None:
    registry = registry_for(model_server, cache, rate=1 * MiB)
    started = time.monotonic()
    client = make_app(registry).test_client()
    try:
        assert time.monotonic() - started < 1.5  # init_app started the download, did not wait
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json == {"status": "ok"}

        not_ready = client.get("/ready")
        assert not_ready.status_code == 503
        assert not_ready.headers["Retry-After"] == "1"
        assert not_ready.json is not None
        assert not_ready.json["models"]["net"]["state"] == "fetching"

        busy = client.get("/predict")
        assert busy.status_code == 503
        assert busy.json is not None
        assert busy.json["detail"]["state"] == "fetching"

        wait_for(lambda: client.get("/ready").status_code == 200, what="ready")
        assert client.get("/predict").json == {"model": {"bytes": 2 * MiB}}
        models = client.get("/models").json
        assert models is not None
        assert models["ready"] is True
        assert models["models"]["net"]["state"] == "ready"
    finally:
        registry.close()
    assert registry["net"].state is State.UNLOADED


def test_same_json_as_fastapi(model_server: ModelServer, cache: Cache) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from modelcache.integrations.fastapi import router

    registry = registry_for(model_server, cache, strategy="lazy")
    flask_client = make_app(registry).test_client()
    fastapi_app = FastAPI()
    fastapi_app.include_router(router(registry))
    with TestClient(fastapi_app) as fastapi_client:
        for method, path in [("get", "/health"), ("get", "/ready"), ("post", "/models/nope/load")]:
            a = getattr(flask_client, method)(path)
            b = getattr(fastapi_client, method)(path)
            assert (a.status_code, a.json) == (b.status_code, b.json()), path
        a = flask_client.get("/models").json
        b = fastapi_client.get("/models").json()
        assert a is not None
        for status in (a, b):  # idle_s and such differ by the time between the two calls
            status["models"]["net"].pop("idle_s")
        assert a == b


def test_post_load_and_the_lazy_helper(model_server: ModelServer, cache: Cache) -> None:
    registry = registry_for(model_server, cache, strategy="lazy")
    client = make_app(registry, timeout=None).test_client()
    try:
        assert registry["net"].state is State.NOT_LOADED
        assert client.post("/models/nope/load").status_code == 404
        started = client.post("/models/net/load")
        assert started.status_code == 202
        assert started.json is not None
        assert started.json["name"] == "net"
        assert client.get("/predict").json == {"model": {"bytes": 2 * MiB}}  # waits (None)
        assert client.get("/ready").status_code == 200
        assert model_server.count("net.bin")[0] == 1
    finally:
        registry.close()


def test_a_browser_gets_the_live_page(model_server: ModelServer, cache: Cache) -> None:
    registry = registry_for(model_server, cache, strategy="lazy")
    client = make_app(registry).test_client()
    page = client.get("/models", headers={"Accept": "text/html,*/*;q=0.8"})
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    assert '"state": "not_loaded"' in text
    assert 'id="initial-status"' in text
    assert client.get("/models", headers={"Accept": "*/*"}).mimetype == "application/json"


def test_init_app_with_an_eager_model_loads_before_returning(
    model_server: ModelServer, cache: Cache
) -> None:
    registry = registry_for(model_server, cache, strategy="eager")
    client = make_app(registry).test_client()
    try:
        assert registry["net"].ready
        assert client.get("/ready").status_code == 200
    finally:
        registry.close()


def test_without_flask_the_import_says_what_to_install() -> None:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nsys.modules['flask'] = None\n"
            "try:\n    import modelcache.integrations.flask\n"
            "except ImportError as error:\n    print(error)\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    assert "pip install 'modelcache[flask]'" in probe.stdout


def test_routes_under_a_prefix(model_server: ModelServer, cache: Cache) -> None:
    registry = registry_for(model_server, cache, strategy="lazy")
    app = Flask(__name__)
    init_app(app, registry, url_prefix="/ops", close_at_exit=False)
    client = app.test_client()
    try:
        assert client.get("/health").status_code == 404
        assert client.get("/ops/health").status_code == 200
        assert client.post("/ops/models/net/load").status_code == 202
        wait_for(lambda: client.get("/ops/ready").status_code == 200, what="ready")
    finally:
        registry.close()

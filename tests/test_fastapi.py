"""The FastAPI integration through FastAPI's test client, against a real (throttled) origin."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import MiB, make_payload, sha, wait_for
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from modelcache import Cache, ModelHandle, Registry, State
from modelcache.integrations.fastapi import lifespan, model, router
from modelcache.testing import ModelServer


def size_loader(path: Path) -> dict[str, Any]:
    """A loader that needs no torch: the 'model' is the file's size."""
    return {"bytes": path.stat().st_size}


def served(
    model_server: ModelServer, name: str = "net.bin", size: int = 2 * MiB, rate: float | None = None
) -> tuple[str, str]:
    """Serve ``size`` random bytes at ``/name`` (throttled to ``rate`` B/s); (url, sha256)."""
    payload = make_payload(size, seed=size)
    url = model_server.add(name, payload)
    model_server.set_rate(name, rate)
    return url, sha(payload)


def make_app(registry: Registry, name: str = "net", timeout: float | None = 0.2) -> FastAPI:
    app = FastAPI(lifespan=lifespan(registry))
    app.include_router(router(registry))

    @app.get("/predict")
    async def predict(net: Any = Depends(model(registry, name, timeout=timeout))) -> Any:  # noqa: B008
        return {"model": net}

    return app


def handle(
    url: str, digest: str, cache: Cache, strategy: str = "background", **kw: Any
) -> ModelHandle:
    return ModelHandle(
        "net", source=url, sha256=digest, loader=size_loader, strategy=strategy, cache=cache, **kw
    )


def test_background_load_health_at_once_ready_503_then_200(
    model_server: ModelServer, cache: Cache
) -> None:
    url, digest = served(model_server, rate=1 * MiB)  # about two seconds
    registry = Registry([handle(url, digest, cache)])
    started = time.monotonic()
    with TestClient(make_app(registry)) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        assert time.monotonic() - started < 1.5  # the lifespan did not wait for the download

        not_ready = client.get("/ready")
        assert not_ready.status_code == 503
        assert not_ready.headers["retry-after"] == "1"
        body = not_ready.json()
        assert body["ready"] is False
        assert body["models"]["net"]["state"] == "fetching"

        wait_for(lambda: client.get("/ready").status_code == 200, what="ready")
        ready = client.get("/ready").json()
        assert ready["ready"] is True
        assert ready["models"]["net"]["state"] == "ready"
        assert ready["models"]["net"]["bytes_done"] == 2 * MiB
        assert ready["models"]["net"]["timings"]["fetch_s"] > 0.5
        models = client.get("/models")
        assert models.status_code == 200
        assert models.json()["ready"] is True
        assert models.json()["models"]["net"]["state"] == "ready"
    assert registry["net"].state is State.UNLOADED  # closed on shutdown


def test_models_is_the_registry_status(model_server: ModelServer, cache: Cache) -> None:
    url, digest = served(model_server)
    registry = Registry([handle(url, digest, cache, strategy="eager")])
    with TestClient(make_app(registry)) as client:
        assert registry["net"].ready  # eager: loaded during startup, before any request
        got = client.get("/models", headers={"Accept": "application/json"}).json()
        assert got["ready"] is True
        assert set(got["models"]) == {"net"}
        assert got["models"]["net"]["source"] == url
        assert got["models"]["net"]["sha256"] == digest
        assert client.get("/ready").status_code == 200


def test_dependency_answers_503_with_status_instead_of_hanging(
    model_server: ModelServer, cache: Cache
) -> None:
    url, digest = served(model_server, rate=1 * MiB)
    registry = Registry([handle(url, digest, cache)])
    with TestClient(make_app(registry, timeout=0.2)) as client:
        started = time.monotonic()
        busy = client.get("/predict")
        assert time.monotonic() - started < 1.5
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"
        detail = busy.json()["detail"]
        assert detail["name"] == "net"
        assert detail["state"] == "fetching"
        assert detail["bytes_done"] < 2 * MiB

        wait_for(lambda: client.get("/predict").status_code == 200, what="the model")
        assert client.get("/predict").json() == {"model": {"bytes": 2 * MiB}}


def test_dependency_starts_a_lazy_model_and_can_wait(
    model_server: ModelServer, cache: Cache
) -> None:
    url, digest = served(model_server)
    registry = Registry([handle(url, digest, cache, strategy="lazy")])
    with TestClient(make_app(registry, timeout=None)) as client:
        assert registry["net"].state is State.NOT_LOADED  # lazy: nothing at startup
        assert client.get("/ready").status_code == 503
        answer = client.get("/predict")  # timeout=None waits for the load
        assert answer.status_code == 200
        assert answer.json() == {"model": {"bytes": 2 * MiB}}
        assert client.get("/ready").status_code == 200
        assert model_server.count("net.bin")[0] == 1


def test_post_load_starts_a_lazy_model(model_server: ModelServer, cache: Cache) -> None:
    url, digest = served(model_server, rate=4 * MiB)
    registry = Registry([handle(url, digest, cache, strategy="lazy")])
    with TestClient(make_app(registry)) as client:
        assert client.get("/models").json()["models"]["net"]["state"] == "not_loaded"
        started = client.post("/models/net/load")
        assert started.status_code == 202
        assert started.json()["name"] == "net"
        assert started.json()["state"] in ("fetching", "loading", "ready")
        wait_for(lambda: registry["net"].ready, what="ready")
        assert client.post("/models/net/load").status_code == 202  # already ready: a no-op
        assert model_server.count("net.bin")[0] == 1

        unknown = client.post("/models/nope/load")
        assert unknown.status_code == 404
        assert unknown.json() == {"detail": "unknown model 'nope'", "models": ["net"]}


def test_a_failing_source_shows_in_ready_and_in_the_dependency(
    model_server: ModelServer, cache: Cache
) -> None:
    url = model_server.url + "/missing.bin"
    registry = Registry([handle(url, None, cache)])  # type: ignore[arg-type]
    with TestClient(make_app(registry)) as client:
        wait_for(lambda: registry["net"].state is State.FAILED, what="the failure")
        ready = client.get("/ready")
        assert ready.status_code == 503
        error = ready.json()["models"]["net"]["error"]
        assert "SourceError" in error
        assert "'net'" in error
        assert "missing.bin" in error
        answer = client.get("/predict")
        assert answer.status_code == 503
        assert answer.json()["detail"]["state"] in ("failed", "fetching")
        assert answer.json()["detail"]["name"] == "net"


def test_credentials_never_reach_the_routes(model_server: ModelServer, cache: Cache) -> None:
    url, digest = served(model_server)
    secret_url = url.replace("http://", "http://alice:s3cr3t-pw@") + "?X-Amz-Signature=t0ken"
    registry = Registry([handle(secret_url, digest, cache)])
    with TestClient(make_app(registry)) as client:
        wait_for(lambda: registry["net"].state in (State.READY, State.FAILED), what="an outcome")
        for path, accept in [
            ("/models", "application/json"),
            ("/models", "text/html"),
            ("/ready", "*/*"),
            ("/predict", "*/*"),
        ]:
            text = client.get(path, headers={"Accept": accept}).text
            assert "s3cr3t-pw" not in text
            assert "t0ken" not in text


def test_a_browser_gets_the_live_page(model_server: ModelServer, cache: Cache) -> None:
    url, digest = served(model_server, rate=1 * MiB)
    registry = Registry([handle(url, digest, cache)])
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    with TestClient(make_app(registry)) as client:
        page = client.get("/models", headers={"Accept": browser_accept})
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        embedded = _embedded_status(page.text)
        assert embedded["models"]["net"]["state"] == "fetching"
        assert embedded["models"]["net"]["source"] == url
        # curl, httpx and fetch() without an Accept preference get JSON
        for accept in ("*/*", "application/json", "application/json, text/html;q=0.5"):
            answer = client.get("/models", headers={"Accept": accept})
            assert answer.headers["content-type"] == "application/json"


def _embedded_status(page: str) -> dict[str, Any]:
    start = page.index('<script id="initial-status" type="application/json">')
    start = page.index(">", start) + 1
    end = page.index("</script>", start)
    status: dict[str, Any] = json.loads(page[start:end])
    return status


def test_the_page_escapes_what_it_embeds(model_server: ModelServer, cache: Cache) -> None:
    url = model_server.url + "/</script><script>alert(1)</script>.bin"
    registry = Registry([handle(url, None, cache, strategy="lazy")])  # type: ignore[arg-type]
    with TestClient(make_app(registry)) as client:
        page = client.get("/models", headers={"Accept": "text/html"}).text
    assert "<script>alert(1)" not in page
    assert _embedded_status(page)["models"]["net"]["name"] == "net"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_import_modelcache_imports_no_web_framework() -> None:
    probe = _run(
        "import sys, modelcache, modelcache.integrations\n"
        "from modelcache import ModelHandle, Registry\n"
        "Registry([ModelHandle('m', source='http://127.0.0.1:9/m.bin')])\n"
        "print(sorted(m for m in ('fastapi', 'starlette', 'flask', 'uvicorn') if m in sys.modules))"
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


def test_without_fastapi_the_import_says_what_to_install() -> None:
    probe = _run(
        "import sys\nsys.modules['fastapi'] = None\n"
        "try:\n    import modelcache.integrations.fastapi\n"
        "except ImportError as error:\n    print(error)\n"
    )
    assert probe.returncode == 0, probe.stderr
    assert "pip install 'modelcache[fastapi]'" in probe.stdout


def test_routes_under_a_prefix(model_server: ModelServer, cache: Cache) -> None:
    url, digest = served(model_server)
    registry = Registry([handle(url, digest, cache, strategy="lazy")])
    app = FastAPI(lifespan=lifespan(registry))
    app.include_router(router(registry), prefix="/ops")
    with TestClient(app) as client:
        assert client.get("/health").status_code == 404
        assert client.get("/ops/health").status_code == 200
        assert client.post("/ops/models/net/load").status_code == 202
        wait_for(lambda: client.get("/ops/ready").status_code == 200, what="ready")
        page = client.get("/ops/models", headers={"Accept": "text/html"}).text
        assert "fetch(location.pathname" in page  # the page refreshes from where it was served

"""A real uvicorn process on 127.0.0.1 serving an app module: probes during a background load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import MiB, make_payload, sha

from modelcache.testing import ModelServer

APP = """
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI

from modelcache import ModelHandle, Registry
from modelcache.integrations.fastapi import lifespan, model, router

models = Registry([
    ModelHandle("net", source=os.environ["NET_URL"], sha256=os.environ["NET_SHA256"],
                loader=lambda path: path.stat().st_size, strategy="background"),
])


@asynccontextmanager
async def app_lifespan(app):
    async with lifespan(models)(app):  # modelcache's lifespan inside the app's own
        yield
    Path(os.environ["CLOSED_MARKER"]).write_text(models["net"].state.value)


app = FastAPI(lifespan=app_lifespan)
app.include_router(router(models))


@app.get("/size")
async def size(net: int = Depends(model(models, "net", timeout=0.1))) -> dict[str, int]:
    return {"bytes": net}
"""


class Service:
    """A uvicorn subprocess listening on a socket this test bound (no port race)."""

    def __init__(self, proc: subprocess.Popen[str], url: str, closed_marker: Path) -> None:
        self.proc = proc
        self.url = url
        self.closed_marker = closed_marker
        self.client = httpx.Client(base_url=url, timeout=5.0)

    def get(self, path: str) -> httpx.Response:
        return self.client.get(path)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def service(
    tmp_path: Path, model_server: ModelServer, modelcache_home: Path
) -> Iterator[tuple[Service, float]]:
    """The app served by uvicorn while its 6 MiB model downloads for a few seconds."""
    payload = make_payload(6 * MiB, seed=3)
    url = model_server.add("net.bin", payload)
    model_server.set_rate("net.bin", 512 * 1024)  # per connection (the transfer opens several)
    (tmp_path / "probe_app.py").write_text(APP)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    env = {
        **os.environ,
        "NET_URL": url,
        "NET_SHA256": sha(payload),
        "MODELCACHE_HOME": str(modelcache_home),
        "PYTHONPATH": str(tmp_path),
        "CLOSED_MARKER": str(tmp_path / "closed"),
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "probe_app:app",
            "--fd",
            str(listener.fileno()),
            "--log-level",
            "warning",
        ],
        pass_fds=[listener.fileno()],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    listener.close()
    running = Service(proc, f"http://127.0.0.1:{port}", tmp_path / "closed")
    yield running, started
    running.stop()


def poll(service: Service, path: str, timeout: float = 30.0) -> httpx.Response:
    """The first answer to ``path`` once the server accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return service.get(path)
        except httpx.TransportError:
            if service.proc.poll() is not None or time.monotonic() > deadline:
                output = service.proc.stdout.read() if service.proc.stdout else ""
                raise AssertionError(f"uvicorn did not come up:\n{output}") from None
            time.sleep(0.05)


def test_health_at_once_ready_503_then_200(service: tuple[Service, float]) -> None:
    server, _ = service
    health = poll(server, "/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}

    ready = server.get("/ready")
    assert ready.status_code == 503
    model = ready.json()["models"]["net"]
    assert model["state"] == "fetching"
    assert model["bytes_done"] < 6 * MiB
    busy = server.get("/size")
    assert busy.status_code == 503
    assert busy.json()["detail"]["state"] == "fetching"

    seen_progress = set()
    deadline = time.monotonic() + 60
    while (ready := server.get("/ready")).status_code != 200:
        assert ready.status_code == 503
        seen_progress.add(ready.json()["models"]["net"]["bytes_done"])
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.1)
    assert ready.json()["ready"] is True
    assert len(seen_progress) >= 2, "the status should show the download moving"
    assert server.get("/size").json() == {"bytes": 6 * MiB}
    assert server.get("/health").status_code == 200


def test_sigterm_during_a_download_shuts_down_promptly(service: tuple[Service, float]) -> None:
    server, _ = service
    assert poll(server, "/health").status_code == 200
    assert server.get("/ready").json()["models"]["net"]["state"] == "fetching"
    stopping = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(20)  # uvicorn re-raises the signal after its graceful shutdown
    assert time.monotonic() - stopping < 10  # the lifespan's close() cancelled the download
    assert server.closed_marker.read_text() == "unloaded"

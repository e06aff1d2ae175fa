"""examples/flask_app.py run as ``python flask_app.py``: on-demand loading, then startup loading.

Whisper's checkpoint is a fake in openai-whisper's exact format served by a real origin.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import sha

from modelcache.testing import ModelServer
from modelcache.testing.fake_weights import WHISPER_TEST_DIMS, write_fake_weights

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_weights(tmp_path_factory.mktemp("whisper"), "whisper", **WHISPER_TEST_DIMS)


def silence(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(b"\x00\x00" * int(16_000 * seconds))
    return buffer.getvalue()


class App:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def url(self, timeout: float = 60.0) -> str:
        """The address the development server prints once it listens."""
        deadline = time.monotonic() + timeout
        while not (
            found := re.search(r"Running on (http://127\.0\.0\.1:\d+)", self.log.read_text())
        ):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        return found.group(1)


@pytest.fixture
def start_app(
    checkpoint: Path, model_server: ModelServer, modelcache_home: Path, tmp_path: Path
) -> Iterator[Callable[..., App]]:
    url = model_server.add("mirror/tiny.pt", checkpoint)
    apps: list[App] = []

    def start(**env: str) -> App:
        log = tmp_path / f"flask-{len(apps)}.log"
        environment = {
            **os.environ, "WHISPER_SOURCE": url, "WHISPER_SHA256": sha(checkpoint.read_bytes()),
            "MAX_TOKENS": "8", "MODELCACHE_HOME": str(modelcache_home), "PORT": "0", **env,
        }  # fmt: skip
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, str(EXAMPLES / "flask_app.py")],
                env=environment,
                cwd=tmp_path,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        apps.append(App(proc, log))
        return apps[-1]

    yield start
    for app in apps:
        app.proc.kill()
        app.proc.wait(30)


def test_on_demand_the_first_request_starts_the_download(
    start_app: Callable[..., App], model_server: ModelServer
) -> None:
    model_server.set_rate("mirror/tiny.pt", 512 * 1024)  # a download of a few seconds
    app = start_app()
    with httpx.Client(base_url=app.url(), timeout=60) as client:
        assert client.get("/health").status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["models"]["whisper-tiny"]["state"] == "not_loaded"
        assert model_server.count("mirror/tiny.pt") == (0, 0)  # nothing fetched yet

        first = client.post("/transcribe", content=silence())
        assert first.status_code == 503  # the download started; the client retries later
        assert first.headers["Retry-After"] == "1"
        assert first.json()["detail"]["state"] in ("fetching", "loading")

        deadline = time.monotonic() + 90
        while (ready := client.get("/ready")).status_code != 200:
            assert ready.json()["models"]["whisper-tiny"]["error"] is None, ready.text
            assert time.monotonic() < deadline, app.log.read_text()
            time.sleep(0.2)
        answer = client.post("/transcribe", content=silence())
        assert answer.status_code == 200, answer.text
        assert isinstance(answer.json()["text"], str)
        assert answer.json()["seconds"] == 1.0
        assert client.post("/transcribe", content=b"RIFF....").status_code == 400
    assert model_server.count("mirror/tiny.pt")[0] >= 1


def test_startup_loading_listens_only_once_ready(start_app: Callable[..., App]) -> None:
    app = start_app(MODELCACHE_STRATEGY="eager")
    with httpx.Client(base_url=app.url(timeout=90), timeout=60) as client:
        assert client.get("/health").status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 200  # the first answer already finds the model loaded
        assert ready.json()["models"]["whisper-tiny"]["strategy"] == "eager"
        assert client.post("/transcribe", content=silence()).status_code == 200

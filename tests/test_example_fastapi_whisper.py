"""examples/fastapi_whisper.py served by uvicorn, Whisper's checkpoint from a throttled origin.

The checkpoint is a fake in openai-whisper's exact format (small dimensions, random weights),
so the service really builds a ``whisper.Whisper`` and transcribes, offline.
"""

from __future__ import annotations

import io
import math
import os
import socket
import struct
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import sha

from modelcache.testing import ModelServer
from modelcache.testing.fake_weights import WHISPER_TEST_DIMS, write_fake_weights

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Whisper checkpoint in the real layout, small enough to transcribe quickly."""
    return write_fake_weights(tmp_path_factory.mktemp("whisper"), "whisper", **WHISPER_TEST_DIMS)


def wav(seconds: float = 1.0, rate: int = 22_050, channels: int = 2) -> bytes:
    """A 440 Hz tone as 16-bit PCM WAV (stereo at 22.05 kHz: the service converts it)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        frames = b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * n / rate))) * channels
            for n in range(int(seconds * rate))
        )
        out.writeframes(frames)
    return buffer.getvalue()


@pytest.fixture
def service(
    checkpoint: Path, model_server: ModelServer, modelcache_home: Path, tmp_path: Path
) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes], Path]]:
    url = model_server.add("mirror/tiny.pt", checkpoint)
    model_server.set_rate("mirror/tiny.pt", 512 * 1024)  # a few seconds of download
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    log = tmp_path / "uvicorn.log"
    env = {
        **os.environ,
        "WHISPER_SOURCE": url,
        "WHISPER_SHA256": sha(checkpoint.read_bytes()),
        "MAX_TOKENS": "8",
        "MODELCACHE_HOME": str(modelcache_home),
        "PYTHONPATH": str(EXAMPLES),
    }
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "fastapi_whisper:app", "--fd",
             str(listener.fileno()), "--log-level", "warning"],
            pass_fds=[listener.fileno()], env=env, cwd=tmp_path, stdout=sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    listener.close()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    yield client, proc, log
    client.close()
    proc.kill()
    proc.wait(30)


def first_answer(client: httpx.Client, proc: subprocess.Popen[bytes], log: Path) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.get("/health")
        except httpx.TransportError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)


def test_transcribes_after_a_background_load(
    service: tuple[httpx.Client, subprocess.Popen[bytes], Path],
) -> None:
    client, proc, log = service
    assert first_answer(client, proc, log).status_code == 200  # at once, while downloading

    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["models"]["whisper-tiny"]["state"] in ("fetching", "loading")
    busy = client.post("/transcribe", content=wav())
    assert busy.status_code == 503  # answered at once with the status, not held
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["detail"]["name"] == "whisper-tiny"

    deadline = time.monotonic() + 90
    while (ready := client.get("/ready")).status_code != 200:
        assert ready.json()["models"]["whisper-tiny"]["error"] is None, ready.text
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    status = ready.json()["models"]["whisper-tiny"]
    assert status["cache_hit"] is False
    assert status["timings"]["fetch_s"] > 1  # the throttled origin

    answer = client.post("/transcribe", content=wav(seconds=1.0))
    assert answer.status_code == 200, answer.text + log.read_text()
    body = answer.json()
    assert isinstance(body["text"], str)  # random weights: words, but not meaningful ones
    assert isinstance(body["language"], str)
    assert body["seconds"] == 1.0

    bad = client.post("/transcribe", content=b"not a wav file")
    assert bad.status_code == 400
    assert "16-bit PCM WAV" in bad.json()["detail"]

"""The live /models page in headless Chromium (Debian's package), during a background load."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import uvicorn
from conftest import FAST, MiB, make_payload, wait_for
from fastapi import FastAPI

from modelcache import Cache, ModelHandle, Registry
from modelcache.integrations.fastapi import lifespan, router
from modelcache.testing import ModelServer

WIDTH, HEIGHT = 1100, 800
BAR_BLUE = (0x09, 0x69, 0xDA)  # the progress bar's fill
BUSY_AMBER = (0x9A, 0x67, 0x00)  # the "fetching" badge
ERROR_PINK = (0xFF, 0xEB, 0xE9)  # the error box


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is needed: apt-get install -y chromium (.ci/run does it)"
    return found


def browse(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on ``url`` with a fresh profile and no background traffic."""
    return subprocess.run(
        [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            "--virtual-time-budget=2500",  # let the page's script refresh from /models twice
            *extra, url,
        ],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip


@pytest.fixture
def page_url(model_server: ModelServer, cache: Cache) -> Iterator[tuple[str, Registry]]:
    """uvicorn (in a thread) serving a registry with a downloading, a ready and a failed model."""
    downloading = model_server.add("whisper-tiny.pt", make_payload(32 * MiB, seed=1))
    model_server.set_rate("whisper-tiny.pt", 128 * 1024)  # per connection: 16 s or more in all
    cache = Cache(cache.path, read_only_paths=[], transfer=replace(FAST, piece_size=64 * 1024))
    small = model_server.add("minilm.safetensors", make_payload(64 * 1024, seed=2))
    registry = Registry([
        ModelHandle("whisper-tiny", source=downloading, loader=lambda p: p, strategy="background",
                    cache=cache),
        ModelHandle("minilm", source=small, loader=lambda p: p, strategy="eager", cache=cache),
        ModelHandle("sharp", source=model_server.url + "/sharp.pt", strategy="background",
                    cache=cache, required=False),
    ])  # fmt: skip
    app = FastAPI(lifespan=lifespan(registry))
    app.include_router(router(registry))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="uvicorn")
    port = server.servers[0].sockets[0].getsockname()[1]
    wait_for(lambda: registry["sharp"].status()["error"] is not None, what="the 404")
    wait_for(lambda: registry["whisper-tiny"].status()["bytes_done"] > 0, what="progress")
    yield f"http://127.0.0.1:{port}/models", registry
    server.should_exit = True
    thread.join(30)


def test_the_page_shows_state_progress_and_errors_while_loading(
    page_url: tuple[str, Registry], tmp_path: Path
) -> None:
    url, registry = page_url
    shot = tmp_path / "models.png"
    taken = browse(url, tmp_path / "profile-shot", f"--screenshot={shot}")
    assert taken.returncode == 0, taken.stderr[-2000:]
    dumped = browse(url, tmp_path / "profile-dom", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert registry["whisper-tiny"].status()["state"] == "fetching"  # still loading throughout

    # the screenshot: a PNG of the window, with the progress bar, the badge and the error box
    assert shot.exists()
    width, height, pixels = read_png(shot)
    assert (width, height) == (WIDTH, HEIGHT)
    assert count(pixels, BAR_BLUE) > 50
    assert count(pixels, BUSY_AMBER) > 200
    assert count(pixels, ERROR_PINK) > 2000

    # the DOM after the script ran (and refreshed from /models JSON)
    dom = dumped.stdout
    assert int(re.search(r'data-refreshes="(\d+)"', dom).group(1)) >= 1  # type: ignore[union-attr]
    assert 'class="badge not-ready">not ready<' in dom
    whisper = section(dom, "whisper-tiny")
    assert 'data-state="fetching"' in whisper
    bar = re.search(r'role="progressbar"[^>]*aria-valuenow="([\d.]+)"', whisper)
    assert bar is not None
    assert 0 < float(bar.group(1)) < 100
    assert re.search(r"[\d.]+ [KM]iB of 32\.0 MiB \(\d+%\)", whisper)
    minilm = section(dom, "minilm")
    assert 'data-state="ready"' in minilm
    assert "<td>fetch</td>" in minilm
    assert "<td>load</td>" in minilm
    sharp = section(dom, "sharp")
    assert 'data-state="failed"' in sharp
    assert "class=\"error\">SourceError: model 'sharp'" in sharp
    assert "not found (HTTP 404)" in sharp
    assert "progressbar" not in minilm + sharp


def section(dom: str, name: str) -> str:
    match = re.search(rf'<section class="model" data-name="{name}".*?</section>', dom, re.S)
    assert match is not None, f"no card for {name}"
    return match.group(0)


def count(pixels: list[tuple[int, int, int]], color: tuple[int, int, int], slack: int = 6) -> int:
    return sum(1 for p in pixels if all(abs(a - b) <= slack for a, b in zip(p, color, strict=True)))


def read_png(path: Path) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes): width, height, RGB."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, header = 8, b"", b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, interlace) == (8, 0)
    assert color_type in (2, 6)
    channels = 3 if color_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                guess = left + up - corner
                pa, pb, pc = abs(guess - left), abs(guess - up), abs(guess - corner)
                best = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + best) & 0xFF
        pixels.extend((line[i], line[i + 1], line[i + 2]) for i in range(0, stride, channels))
        previous = line
    return width, height, pixels

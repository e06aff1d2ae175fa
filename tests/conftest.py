"""Shared helpers: a clean environment, fast transfer options, random payloads, worker processes.

Everything runs against real servers on 127.0.0.1 (``model_server``) and real processes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from servers.no_skips import pytest_runtest_makereport  # noqa: F401  (a skip fails)

from modelcache import Cache, TransferOptions
from modelcache._transfer import resume_progress

if TYPE_CHECKING:
    from servers.proxy import FaultProxy
    from servers.registry import Registry

    from modelcache.testing import ModelServer

ProxyOf = Callable[["Registry"], "FaultProxy"]
"""``proxy_of(registry)``: the :func:`proxy_of` fixture's factory."""

KiB = 1 << 10
MiB = 1 << 20

#: the bin directory of the interpreter running the tests (the venv's): its ``python`` and
#: ``modelcache`` are the ones a shell command of the docs must run, whatever PATH pytest got
VENV_BIN = Path(sys.executable).parent


def venv_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with :data:`VENV_BIN` first on ``PATH``.

    A shell started with it runs this venv's ``python`` and ``modelcache``, as a reader's shell
    with the venv activated would. Fails loudly if the venv lacks either.
    """
    for name in ("python", "modelcache"):
        if not (VENV_BIN / name).is_file():
            raise AssertionError(
                f"{VENV_BIN / name} is missing: run the tests with the venv's interpreter "
                "(bash scripts/test.sh, or .venv/bin/python -m pytest)"
            )
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join(p for p in (str(VENV_BIN), env.get("PATH", "")) if p)
    return env


#: retries and timeouts short enough for tests, long enough for a loaded 2-core machine
FAST = TransferOptions(
    retries=3,
    backoff=0.01,
    max_backoff=0.05,
    deadline=20.0,
    stall_timeout=10.0,
    connect_timeout=10.0,
)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MODELCACHE_* variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("MODELCACHE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MODELCACHE_PROGRESS", "0")


@pytest.fixture(autouse=True)
def _release_leases() -> Iterator[None]:
    """Drop the in-use leases this process took, so tests do not see each other's."""
    yield
    Cache._leases.give_back_all()


@pytest.fixture
def cache(modelcache_home: Path) -> Cache:
    """A writable cache in a temporary directory with fast retries and no read-only layer."""
    return Cache(modelcache_home, read_only_paths=[], offline=False, transfer=FAST)


def make_payload(size: int, seed: int = 0) -> bytes:
    """``size`` pseudo-random bytes (incompressible, reproducible)."""
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from ``path`` (``/proc/self/maps``)."""
    target = str(path.resolve())
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def inside(pointer: int, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= pointer < end for start, end in ranges)


def write_onnx_linear(path: Path, weight: Any, bias: Any, external_data: str | None = None) -> None:
    """An ONNX model computing ``x @ weight + bias`` (numpy float32 arrays), built with the
    ``onnx`` package; its weights go to the file ``external_data`` beside it when given."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = weight.shape
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "weight"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if external_data is None:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external_data,
            size_threshold=0,
        )


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def asked_ranges(server: ModelServer, size: int) -> list[tuple[int, int]]:
    """The byte ranges ``[start, end)`` the server's requests asked for, in file order (a
    request without a Range asked for the whole file)."""
    asked = []
    for _, headers in server.request_headers:
        first, _, last = headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")
        asked.append((int(first), int(last) + 1 if last else size))
    return sorted(asked)


def tiles(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether sorted ``ranges`` cover ``[start, end)`` exactly once, end to end."""
    return (
        bool(ranges)
        and ranges[0][0] == start
        and ranges[-1][1] == end
        and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    )


def part_frontier(home: Path) -> int:
    """The most bytes a writer in the cache's ``.tmp`` recorded as written (its range map)."""
    return max((resume_progress(part) for part in (home / ".tmp").glob("*.part")), default=0)


def kill_at(
    worker: Worker, reached: Callable[[], bool], what: str, server: ModelServer, name: str
) -> None:
    """SIGKILL the worker once ``reached()``; return when the server stopped sending to it."""
    wait_for(reached, timeout=60, what=what)
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)
    # a capped response may write another block to the dead socket before it notices
    last = [-1, time.monotonic()]

    def settled() -> bool:
        sent = server.count(name)[1]
        if sent != last[0]:
            last[:] = [sent, time.monotonic()]
        return time.monotonic() - last[1] > 0.3

    wait_for(settled, what="the origin to notice the kill")


WORKER = r"""
import json, os, sys, time
from pathlib import Path
from modelcache import Cache, TransferOptions

args = json.loads(sys.argv[1])
if args.get("ready"):
    Path(args["ready"]).touch()
if args.get("go"):
    while not os.path.exists(args["go"]):
        time.sleep(0.005)
cache = Cache(args["home"], read_only_paths=[], offline=False,
              transfer=TransferOptions(**args["options"]))
try:
    got = cache.fetch_details(args["url"], args.get("sha256"))
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}), flush=True)
    sys.exit(0)
print(json.dumps({"path": str(got.path), "cache_hit": got.cache_hit}), flush=True)
if args.get("hold"):
    Path(args["hold"]).touch()
    time.sleep(600)
"""


class Worker:
    """A separate Python process that fetches one source into a cache."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        """The worker's JSON answer (waits for its first line)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout)
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"worker died (rc={self.proc.returncode}): {stderr}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """``spawn(home, url, options=FAST, **extra) -> Worker``; every worker is killed at the end."""
    script = tmp_path / "fetch_worker.py"
    script.write_text(WORKER)
    workers: list[Worker] = []

    def start(home: Path, url: str, options: TransferOptions = FAST, **extra: Any) -> Worker:
        args = {"home": str(home), "url": url, "options": asdict(options), **extra}
        proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MODELCACHE_PROGRESS": "0"},
        )
        worker = Worker(proc)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.kill()


# -- the docs ------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXAMPLE_HOST = "https://models.example.com"


def code_blocks(page: str, language: str) -> list[str]:
    """The fenced blocks of ``docs/<page>`` in ``language``, in order."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in (DOCS / page).read_text().splitlines():
        if current is None and line.strip() == f"```{language}":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def run_python_blocks(
    page: str, origin: str, replacements: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run every python block of the page in order, in one namespace, against ``origin``
    (``replacements``: other example text to swap, e.g. a registry's host)."""
    blocks = code_blocks(page, "python")
    assert blocks, f"{page} has no python blocks"
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    for n, block in enumerate(blocks):
        code = block.replace(EXAMPLE_HOST, origin)
        for example, real in (replacements or {}).items():
            code = code.replace(example, real)
        exec(compile(code, f"docs/{page}[block {n}]", "exec"), namespace)
    return namespace


# -- OCI registries ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry without auth, plain http on 127.0.0.1 (one per test module)."""
    from servers.registry import start_registry

    registry = start_registry(tmp_path_factory.mktemp("registry-open"))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry with token auth: anonymous pull, ``USER``/``PASSWORD`` push."""
    from servers.registry import start_registry

    registry = start_registry(tmp_path_factory.mktemp("registry-token"), auth="token")
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry with htpasswd (Basic) auth over TLS; ``ca_file`` is its CA."""
    from servers.registry import start_registry

    registry = start_registry(tmp_path_factory.mktemp("registry-basic"), auth="htpasswd")
    yield registry
    registry.stop()


@pytest.fixture(autouse=True)
def _no_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credential of the developer's own Docker config is ever read."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


@pytest.fixture
def proxy_of() -> Iterator[ProxyOf]:
    """``proxy_of(registry)``: a counting, fault-injecting proxy in front of a registry."""
    from servers.proxy import FaultProxy

    proxies: list[FaultProxy] = []

    def make(registry: Registry) -> FaultProxy:
        proxy = FaultProxy(registry.url)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()

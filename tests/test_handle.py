"""ModelHandle: strategies, one fetch and one load for many callers, failures, unload, reload.

Everything runs against the real HTTP server of ``model_server`` (counters, throttling, faults)
and real threads, event loops and processes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import KiB, MiB, make_payload, wait_for

from modelcache import (
    Cache,
    LoadError,
    ModelHandle,
    NotReadyError,
    Registry,
    SourceError,
    State,
    Strategy,
)
from modelcache.handle import HandleStatus, ReloadStatus, Timings
from modelcache.testing import ModelServer


class CountingLoader:
    """A loader that counts its calls, optionally waits for a gate, and returns the bytes."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.calls = 0
        self.delay = delay
        self.gate = gate
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
            call = self.calls
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.delay:
            time.sleep(self.delay)
        return {"data": path.read_bytes(), "call": call}


def handle(name: str, source: Any, cache: Cache, **options: Any) -> ModelHandle:
    options.setdefault("loader", CountingLoader())
    return ModelHandle(name, source=source, cache=cache, **options)


def throttled(server: ModelServer, name: str, size: int, seconds: float, seed: int = 0) -> str:
    """Serve ``size`` random bytes at ``/name`` at a rate that takes about ``seconds``."""
    url = server.add(name, make_payload(size, seed))
    server.set_rate(name, size / seconds)
    return url


# -- names, construction ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "whisper-tiny", "v1.2_b", "x" * 64, "A.b-C_9"])
def test_valid_names(name: str, cache: Cache) -> None:
    assert ModelHandle(name, source="https://example.com/m.pt", cache=cache).name == name


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "a/b", "a b", "née", "tiny\n", "../x", None, 3, "a:b"]
)
def test_invalid_names_raise_value_error(name: Any) -> None:
    with pytest.raises(ValueError, match="model name"):
        ModelHandle(name, source="https://example.com/m.pt")


def test_options_are_keyword_only_and_checked() -> None:
    with pytest.raises(TypeError):
        ModelHandle("m", "https://example.com/m.pt")  # type: ignore[misc]
    with pytest.raises(ValueError, match="strategy"):
        ModelHandle("m", source="https://example.com/m.pt", strategy="sometimes")
    with pytest.raises(ValueError, match="quantize"):
        ModelHandle("m", source="https://example.com/m.pt", quantize="int4")
    with pytest.raises(ValueError, match="idle_unload"):
        ModelHandle("m", source="https://example.com/m.pt", idle_unload=0)
    with pytest.raises(ValueError, match="sha256"):
        ModelHandle("m", source="https://example.com/m.pt", sha256="abc")


def test_constructing_handles_imports_nothing_heavy(tmp_path: Path) -> None:
    code = (
        "import sys, json\n"
        "from modelcache import ModelHandle, Registry\n"
        "h = ModelHandle('m', source='https://example.com/m.pt', strategy='background',\n"
        "                cache=sys.argv[1], quantize='int8')\n"
        "r = Registry([h]); r.status(); h.status()\n"
        "heavy = [m for m in ('torch', 'safetensors', 'fastapi', 'flask', 's3fs')\n"
        "         if m in sys.modules]\n"
        "print(json.dumps(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "c")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == []
    assert not (tmp_path / "c").exists()  # no I/O either


# -- strategies -----------------------------------------------------------------------------------


def test_many_threads_cause_one_fetch_and_one_load(model_server: ModelServer, cache: Cache) -> None:
    size = 256 * KiB
    url = throttled(model_server, "m.bin", size, seconds=0.4)
    baseline_url = model_server.add("baseline.bin", make_payload(size, 1))
    loader = CountingLoader()
    h = handle("m", url, cache, loader=loader)
    barrier = threading.Barrier(16)
    results: list[Any] = []

    def call() -> None:
        barrier.wait()
        results.append(h.get(timeout=30))

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    assert all(r is results[0] for r in results)
    assert loader.calls == 1
    requests, sent = model_server.count("m.bin")
    assert sent == size
    handle("baseline", baseline_url, cache).get()  # what a single caller costs
    assert requests == model_server.count("baseline.bin")[0]
    assert h.state is State.READY
    assert h.ready


def test_lazy_start_does_nothing_until_get(model_server: ModelServer, cache: Cache) -> None:
    url = model_server.add("m.bin", b"weights")
    h = handle("m", url, cache, strategy="lazy")
    h.start()
    time.sleep(0.05)
    assert h.state is State.NOT_LOADED
    assert model_server.count("m.bin") == (0, 0)
    assert h.get()["data"] == b"weights"
    assert h.status()["state"] == "ready"


def test_eager_start_blocks_and_raises(model_server: ModelServer, cache: Cache) -> None:
    url = throttled(model_server, "m.bin", 64 * KiB, seconds=0.2)
    h = handle("m", url, cache, strategy=Strategy.EAGER)
    h.start()
    assert h.state is State.READY
    missing = handle("gone", model_server.url + "/missing.bin", cache, strategy="eager")
    with pytest.raises(SourceError) as info:
        missing.start()
    assert "'gone'" in str(info.value)
    assert "/missing.bin" in str(info.value)
    assert missing.state is State.FAILED


def test_background_start_returns_at_once(model_server: ModelServer, cache: Cache) -> None:
    url = model_server.add("m.bin", b"weights")
    gate = threading.Event()
    loader = CountingLoader(gate=gate)
    h = handle("m", url, cache, strategy="background", loader=loader)
    h.start()  # returns although the load cannot finish until the gate opens
    assert h.state in (State.FETCHING, State.LOADING)
    with pytest.raises(NotReadyError):
        h.get(timeout=0.05)
    gate.set()
    assert h.get(timeout=30)["call"] == 1
    h.start()  # already READY: nothing happens
    assert loader.calls == 1


def test_environment_overrides_are_read_at_use_time(
    model_server: ModelServer, cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = model_server.add("m.bin", b"weights")
    h = handle("m", url, cache, strategy="lazy", quantize="int8")
    monkeypatch.setenv("MODELCACHE_STRATEGY", "eager")
    monkeypatch.setenv("MODELCACHE_QUANTIZE", "none")
    assert h.strategy is Strategy.EAGER
    h.start()  # eager now: loads; quantization is off, so a plain dict loads fine
    assert h.state is State.READY
    assert h.status()["strategy"] == "eager"
    assert h.status()["quantize"] is None

    other = handle("other", url, cache, strategy="eager")
    monkeypatch.setenv("MODELCACHE_STRATEGY", "LAZY")
    monkeypatch.setenv("MODELCACHE_QUANTIZE", "int8")
    other.start()
    assert other.state is State.NOT_LOADED
    assert other.status()["quantize"] == "int8"
    with pytest.raises(LoadError, match="int8"):  # a dict is no module: int8 refuses it
        other.get()

    monkeypatch.setenv("MODELCACHE_STRATEGY", "sideways")
    with pytest.raises(ValueError, match="sideways"):
        other.start()
    assert "sideways" in other.status()["strategy"]  # status() still answers


# -- asyncio ---------------------------------------------------------------------------------------


async def test_aget_never_blocks_the_event_loop(model_server: ModelServer, cache: Cache) -> None:
    url = throttled(model_server, "m.bin", 256 * KiB, seconds=0.5)
    loader = CountingLoader(delay=0.2)
    h = handle("m", url, cache, loader=loader)
    ticks = 0
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            ticks += 1
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    task = asyncio.create_task(ticker())
    began = time.monotonic()
    models = await asyncio.gather(*(h.aget(timeout=30) for _ in range(8)))
    elapsed = time.monotonic() - began
    stop.set()
    await task
    assert all(m is models[0] for m in models)
    assert loader.calls == 1
    assert elapsed >= 0.5
    # the loop kept turning the whole time: no pause of the ticker near the whole wait
    assert ticks >= 10
    assert max(gaps) < elapsed / 2, (ticks, max(gaps), elapsed)


async def test_aget_timeout_raises_not_ready_which_is_a_timeout(
    model_server: ModelServer, cache: Cache
) -> None:
    url = throttled(model_server, "m.bin", 128 * KiB, seconds=0.6)
    h = handle("m", url, cache)
    with pytest.raises(NotReadyError) as info:
        await h.aget(timeout=0.1)
    assert isinstance(info.value, TimeoutError)
    assert "'m'" in str(info.value)
    assert "/m.bin" in str(info.value)
    assert "fetching" in str(info.value)
    with pytest.raises(TimeoutError):
        await h.aget(timeout=0)
    model = await h.aget(timeout=30)  # the work went on meanwhile
    assert model["call"] == 1
    assert model_server.count("m.bin")[1] == 128 * KiB


async def test_aget_raises_the_failure(model_server: ModelServer, cache: Cache) -> None:
    h = handle("m", model_server.url + "/missing.bin", cache)
    with pytest.raises(SourceError, match="'m'"):
        await h.aget()


# -- timeouts, failures, recovery ----------------------------------------------------------------


def test_get_timeout_then_the_same_work_completes(model_server: ModelServer, cache: Cache) -> None:
    size = 128 * KiB
    url = throttled(model_server, "m.bin", size, seconds=0.6)
    loader = CountingLoader()
    h = handle("m", url, cache, loader=loader)
    began = time.monotonic()
    with pytest.raises(NotReadyError) as info:
        h.get(timeout=0.15)
    assert 0.1 < time.monotonic() - began < 5
    assert isinstance(info.value, TimeoutError)
    assert h.get(timeout=30)["call"] == 1
    assert loader.calls == 1
    assert model_server.count("m.bin")[1] == size


def test_failure_then_recovery_without_hammering(model_server: ModelServer, cache: Cache) -> None:
    url = model_server.add("m.bin", b"v1")
    model_server.remove("m.bin")
    h = handle("m", url, cache)
    h.retry_interval = 1.0
    with pytest.raises(SourceError) as first:
        h.get()
    assert first.value.model == "m"
    assert "404" in str(first.value)
    assert h.state is State.FAILED
    requests = model_server.count("m.bin")[0]
    assert requests >= 1
    status = h.status()
    assert status["state"] == "failed"
    assert "SourceError" in status["error"]
    json.dumps(status)

    model_server.add("m.bin", b"v1")
    calls = 0
    while time.monotonic() - h._failed_at < 0.6 * h.retry_interval:
        with pytest.raises(SourceError):  # within retry_interval: the same error, no request
            h.get()
        calls += 1
        time.sleep(0.01)
    assert calls >= 5
    assert model_server.count("m.bin")[0] == requests

    wait_for(lambda: time.monotonic() - h._failed_at > h.retry_interval, 5, "retry interval")
    assert h.get()["data"] == b"v1"
    assert h.status()["error"] is None


def test_failed_attempt_raises_in_every_waiting_thread(
    model_server: ModelServer, cache: Cache
) -> None:
    model_server.add("m.bin", b"v1")
    model_server.set_delay("m.bin", 0.2)
    model_server.fail_next("m.bin", times=1, status=403)
    h = handle("m", model_server.url + "/m.bin", cache)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            h.get()
        except SourceError as error:
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 8
    assert model_server.count("m.bin")[0] == 1  # one attempt for all of them
    h.begin_loading()  # an explicit request retries at once
    assert h.get(timeout=30)["data"] == b"v1"


def test_loader_failure_is_load_error_with_cause(model_server: ModelServer, cache: Cache) -> None:
    url = model_server.add("m.bin", b"v1")

    def broken(path: Path) -> Any:
        raise KeyError("layers.0.weight")

    h = handle("m", url, cache, loader=broken)
    with pytest.raises(LoadError) as info:
        h.get()
    assert isinstance(info.value.__cause__, KeyError)
    assert info.value.model == "m"
    assert info.value.source == url
    assert "layers.0.weight" in str(info.value)


def test_warmup_runs_before_ready(model_server: ModelServer, cache: Cache) -> None:
    url = model_server.add("m.bin", b"v1")
    seen: list[State] = []
    h = handle("m", url, cache, warmup=lambda model: seen.append(h.state))
    model = h.get()
    assert seen == [State.LOADING]
    assert model["data"] == b"v1"
    assert h.status()["timings"]["warmup_s"] is not None

    def bad_warmup(model: Any) -> None:
        raise RuntimeError("shape mismatch in forward")

    broken = handle("broken", url, cache, warmup=bad_warmup)
    with pytest.raises(LoadError, match=r"warmup failed.*shape mismatch"):
        broken.get()
    assert broken.state is State.FAILED


def test_fetch_downloads_without_loading(model_server: ModelServer, cache: Cache) -> None:
    url = model_server.add("m.bin", b"v1")
    loader = CountingLoader()
    h = handle("m", url, cache, loader=loader)
    path = h.fetch()
    assert path.read_bytes() == b"v1"
    assert path.is_relative_to(cache.path)
    assert loader.calls == 0
    assert h.state is State.NOT_LOADED
    h.get()
    assert h.status()["cache_hit"] is True


def test_status_names_the_mirror_that_served(model_server: ModelServer, cache: Cache) -> None:
    dead = model_server.url + "/gone.bin"  # 404: the next mirror is tried
    good = model_server.add("m.bin", b"weights")
    h = handle("m", [dead, good], cache)
    assert h.status()["served_from"] is None
    assert h.get()["data"] == b"weights"
    assert h.status()["source"] == dead
    assert h.status()["served_from"] == good
    h.unload()
    assert h.status()["served_from"] is None


# -- status ------------------------------------------------------------------------------------


def test_status_shows_live_progress_without_credentials(
    model_server: ModelServer, cache: Cache
) -> None:
    size = 3 * MiB  # progress comes a piece (1 MiB) at a time
    throttled(model_server, "m.bin", size, seconds=1.2)
    base = model_server.url.replace("http://", "http://alice:s3cr3tpw@")
    url = f"{base}/m.bin?token=t0k3nvalue&X-Amz-Signature=abcdef123456"
    h = handle("m", url, cache, strategy="background")
    h.start()
    wait_for(lambda: h.status()["bytes_done"] > 0, 10, "progress")
    status = h.status()
    assert status["state"] == "fetching"
    assert 0 < status["bytes_done"] < size
    assert status["bytes_total"] == size
    text = json.dumps(status)
    for secret in ("alice", "s3cr3tpw", "t0k3nvalue", "abcdef123456"):
        assert secret not in text
    wait_for(lambda: h.status()["bytes_done"] > status["bytes_done"], 10, "more progress")
    h.get(timeout=30)
    done = h.status()
    assert done["state"] == "ready"
    assert done["bytes_done"] == size
    assert done["cache_hit"] is False
    assert done["timings"]["fetch_s"] > 0.5
    assert done["timings"]["load_s"] is not None
    assert set(done) >= {
        "name",
        "state",
        "strategy",
        "source",
        "bytes_total",
        "bytes_done",
        "cache_hit",
        "quantize",
        "timings",
        "error",
    }
    assert done["strategy"] == "background"
    assert done["quantize"] is None
    again = handle("again", url, cache)
    again.get()
    assert again.status()["cache_hit"] is True

    model_server.remove("m.bin")
    broken = handle("broken", url.replace("m.bin", "m2.bin"), Cache(cache.path / "other"))
    with pytest.raises(SourceError):
        broken.get()
    text = json.dumps(broken.status())
    assert "SourceError" in text
    for secret in ("s3cr3tpw", "t0k3nvalue", "abcdef123456"):
        assert secret not in text


def test_status_is_its_typed_dict(model_server: ModelServer, cache: Cache) -> None:
    h = handle("m", model_server.add("m.bin", b"v1"), cache)
    keys = HandleStatus.__required_keys__
    assert set(h.status()) == keys  # before, while and after loading
    h.get()
    h.reload()
    wait_for(lambda: h.status()["reload"]["state"] == "ready", 10, "reload")
    status = h.status()
    assert set(status) == keys
    assert set(status["timings"]) == Timings.__required_keys__
    assert set(status["reload"]) == ReloadStatus.__required_keys__
    assert HandleStatus.__optional_keys__ == {"quantization"}  # set once int8 loaded


def mismatching_loader(path: Path) -> Any:
    """Load a checkpoint into a module whose every parameter has another shape: torch's
    error names each of the tensors (214 KB for Sharp's 1038)."""
    import torch

    state = torch.load(path, weights_only=True)
    module = torch.nn.Module()
    for key, tensor in state.items():
        owner = module
        *parents, leaf = key.split(".")
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        grown = torch.empty([n + 1 for n in tensor.shape])
        owner.register_parameter(leaf, torch.nn.Parameter(grown))
    module.load_state_dict(state)
    return module


def test_a_long_error_is_cut_short_in_status_and_logs_but_whole_on_the_exception(
    model_server: ModelServer,
    cache: Cache,
    fake_weights: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = model_server.add("sharp.pt", fake_weights("sharp"))
    h = handle("m", url, cache, loader=mismatching_loader)
    caplog.set_level(logging.INFO, logger="modelcache")
    with pytest.raises(LoadError) as info:
        h.get()
    full = str(info.value)
    assert len(full) > 200_000
    assert full.count("size mismatch for ") == 1038
    text = f"LoadError: {full}"
    assert h.status()["error"] == f"{text[:2000]}... ({len(text) - 2000} more characters)"
    logged = [r.getMessage() for r in caplog.records if r.name == "modelcache"]
    assert logged
    assert max(len(line) for line in logged) < 2100
    assert any(line.endswith(f"({len(full) - 2000} more characters)") for line in logged)

    h.loader = CountingLoader()  # serving, then a reload that fails the same way
    h.begin_loading()
    assert h.get(timeout=30)["call"] == 1
    caplog.clear()
    h.loader = mismatching_loader
    h.reload()
    wait_for(lambda: h.status()["reload"]["state"] == "failed", 30, "the reload to fail")
    status = h.status()
    assert status["state"] == "ready"
    reload_error = status["reload"]["error"]
    assert reload_error is not None
    assert reload_error.startswith("model 'm', source ")
    assert reload_error.endswith(" more characters)")
    assert len(reload_error) < 2100
    assert status["error"] == f"reload failed: {reload_error}"
    assert len(json.dumps(status)) < 6000

    def reload_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "reload failed" in r.getMessage()]

    wait_for(lambda: bool(reload_warnings()), 10, "the reload's warning (logged after)")
    (warning,) = reload_warnings()
    assert len(warning) < 2200
    assert warning.endswith(" more characters)")


# -- unload, idle -------------------------------------------------------------------------------


_UNLOAD_SCRIPT = """
import ctypes, gc, json, os, sys
from pathlib import Path
import torch
from modelcache import ModelHandle

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def load(path):
    state = torch.load(path, weights_only=True)  # no mmap: anonymous memory, the hard case
    layers = len(state) // 2
    width = state["layers.0.weight"].shape[0]
    with torch.device("meta"):
        model = torch.nn.ModuleDict(
            {"layers": torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))}
        )
    model.load_state_dict(state, assign=True)
    return model

h = ModelHandle("real", source=sys.argv[1], cache=sys.argv[2], loader=load)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
before = rss()
model = h.get()
loaded = rss()
del model
h.unload()
after = rss()
status = h.status()
again = h.get() is not None
h.unload()
print(json.dumps({"before": before, "loaded": loaded, "after": after, "state": status["state"],
                  "freed": status["bytes_freed"], "again": again}))
"""


def test_unload_really_frees_memory(fake_weights: Callable[..., Path], cache: Cache) -> None:
    # in a fresh process: a test process that already ran hundreds of tests has a fragmented
    # heap, and RSS there says little about what unload() gives back
    size = 48 * MiB
    path = fake_weights("state_dict", size_bytes=size)
    proc = subprocess.run(
        [sys.executable, "-c", _UNLOAD_SCRIPT, str(path), str(cache.path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    numbers = str(m)
    assert m["loaded"] - m["before"] > 0.8 * size, numbers
    assert m["state"] == "unloaded"
    assert m["loaded"] - m["after"] > 0.8 * size, numbers
    assert m["freed"] > 0.8 * size, numbers
    assert m["again"]  # loads again


class Model:
    """A model object a weak reference can follow."""


def reload_is(h: ModelHandle, state: str) -> Callable[[], bool]:
    return lambda: (h.status()["reload"] or {}).get("state") == state


def test_a_dropped_handle_frees_its_model_at_once(model_server: ModelServer, cache: Cache) -> None:
    """No reference cycle keeps a handle (and the model it serves) alive for the cyclic
    garbage collector to find some time later: dropping the last reference frees both."""
    url = model_server.add("m.bin", b"v1")
    h = ModelHandle("m", source=url, cache=cache, loader=lambda path: Model())
    first = weakref.ref(h.get())
    h.reload()
    wait_for(reload_is(h, "ready"), 10, "reload")
    assert first() is None  # the version replaced is gone
    model, handle_ref = weakref.ref(h.get()), weakref.ref(h)
    wait_for(
        lambda: not any(t.name.startswith("modelcache-") for t in threading.enumerate()),
        10,
        "the handle's threads to end",
    )
    gc.disable()
    try:
        del h
        assert handle_ref() is None
        assert model() is None
    finally:
        gc.enable()


def test_idle_unload(model_server: ModelServer, cache: Cache) -> None:
    url = model_server.add("m.bin", b"v1")
    loader = CountingLoader()
    h = handle("m", url, cache, loader=loader, idle_unload=1.0)
    h.get()
    for _ in range(8):  # in use: stays loaded
        time.sleep(0.15)
        assert h.get()["call"] == 1
    wait_for(lambda: h.status()["bytes_freed"] is not None, 5, "idle unload")
    assert h.state is State.UNLOADED
    assert h.get()["call"] == 2
    assert loader.calls == 2
    h.close()


def test_prune_keeps_an_entry_while_any_handle_serves_it(
    model_server: ModelServer, cache: Cache
) -> None:
    url = model_server.add("shared.bin", make_payload(4096))
    first, second = handle("first", url, cache), handle("second", url, cache)
    first.get()
    second.get()
    first.unload()
    assert cache.prune(0) == []  # the second handle still serves the file
    second.unload()
    assert len(cache.prune(0)) == 1


def test_a_failed_load_lets_the_cache_evict_its_entry(
    model_server: ModelServer, cache: Cache
) -> None:
    """A fetched file nobody serves holds no lease: prune and ``modelcache rm`` can remove it."""
    failing = handle("broken", model_server.add("broken.bin", b"x"), cache, loader=_refuse)
    with pytest.raises(LoadError):
        failing.get()
    assert [e.source for e in cache.prune(0)] == [failing.status()["source"]]


def test_a_reload_dropped_by_unload_lets_the_cache_evict_both_versions(
    model_server: ModelServer, cache: Cache
) -> None:
    gate = threading.Event()
    calls: list[Path] = []

    def slow_second_load(path: Path) -> bytes:
        calls.append(path)
        if len(calls) == 2:
            gate.wait(10)
        return path.read_bytes()

    v1, v2 = model_server.add("v1.bin", b"one"), model_server.add("v2.bin", b"two")
    h = handle("m", v1, cache, loader=slow_second_load)
    h.get()
    h.reload(source=v2)
    wait_for(reload_is(h, "loading"), 10, "the reload to load")
    h.unload()  # drops the reload under way
    gate.set()
    wait_for(reload_is(h, "cancelled"), 10, "the reload to end")
    assert sorted(e.source for e in cache.prune(0)) == sorted([v1, v2])
    h.close()


def _refuse(path: Path) -> Any:
    raise ValueError("not a model")


def test_unload_during_fetch_abandons_the_attempt(model_server: ModelServer, cache: Cache) -> None:
    url = throttled(model_server, "m.bin", 256 * KiB, seconds=0.6)
    loader = CountingLoader()
    h = handle("m", url, cache, loader=loader, strategy="background")
    h.start()
    wait_for(lambda: model_server.count("m.bin")[0] > 0, 10, "download under way")
    h.unload()
    assert h.state is State.UNLOADED
    wait_for(
        lambda: not any(t.name == "modelcache-load-m" for t in threading.enumerate()),
        10,
        "the abandoned attempt to end",
    )
    assert loader.calls == 0
    assert h.state is State.UNLOADED


# -- reload ------------------------------------------------------------------------------------


def test_reload_serves_the_old_model_until_the_new_one_is_complete(
    model_server: ModelServer, cache: Cache
) -> None:
    v1 = model_server.add("v1.bin", b"version 1")
    v2 = model_server.add("v2.bin", b"version 2")
    gate = threading.Event()
    calls = 0

    def load(path: Path) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        model: dict[str, Any] = {"data": path.read_bytes()}
        if calls > 1:
            assert gate.wait(30)
            for n in range(20):  # built piece by piece: no one may see it half done
                model[f"part{n}"] = n
                time.sleep(0.005)
        model["complete"] = True
        return model

    h = ModelHandle("m", source=v1, cache=cache, loader=load)
    old = h.get()
    seen: list[Any] = []
    slowest = 0.0
    stop = threading.Event()

    def reader() -> None:
        nonlocal slowest
        while not stop.is_set():
            began = time.monotonic()
            model = h.get()
            slowest = max(slowest, time.monotonic() - began)
            seen.append(model)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    h.reload(source=v2)
    wait_for(lambda: (h.status()["reload"] or {}).get("state") == "loading", 10, "loading v2")
    # the new version's loader is blocked on the gate: get() answers at once all the same
    assert h.state is State.READY
    assert h.get(timeout=5) is old
    gate.set()
    wait_for(lambda: h.get()["data"] == b"version 2", 10, "the swap")
    time.sleep(0.05)
    stop.set()
    for t in readers:
        t.join()
    new = h.get()
    assert all(m is old or m is new for m in seen)
    assert all(m["complete"] for m in seen)
    assert slowest < 2  # (the gate held the reload for much longer)
    status = h.status()
    assert status["reload"]["state"] == "ready"
    assert status["error"] is None
    assert status["source"] == v2
    assert status["state"] == "ready"


def test_reload_same_url_fetches_the_changed_file(model_server: ModelServer, cache: Cache) -> None:
    url = model_server.add("m.bin", b"old bytes")
    h = handle("m", url, cache)
    assert h.get()["data"] == b"old bytes"
    model_server.add("m.bin", b"new bytes, same URL")
    h.reload()
    wait_for(lambda: h.get()["data"] == b"new bytes, same URL", 10, "reload")
    assert h.status()["cache_hit"] is False


def test_failed_reload_keeps_the_old_model_serving(model_server: ModelServer, cache: Cache) -> None:
    url = model_server.add("m.bin", b"v1")
    h = handle("m", url, cache)
    old = h.get()
    h.reload(source=model_server.url + "/missing.bin")
    wait_for(lambda: h.status()["reload"]["state"] == "failed", 10, "reload failure")
    assert h.get() is old
    assert h.state is State.READY
    status = h.status()
    assert status["state"] == "ready"
    assert status["error"].startswith("reload failed:")
    assert "missing.bin" in status["error"]
    assert status["source"] == url
    json.dumps(status)

    def broken(path: Path) -> Any:
        raise RuntimeError("incompatible weights")

    h.loader = broken
    h.reload()
    wait_for(lambda: h.status()["reload"]["state"] == "failed", 10, "loader failure")
    assert "incompatible weights" in h.status()["error"]
    assert h.get() is old
    h.loader = CountingLoader()
    h.reload()
    wait_for(lambda: h.status()["reload"]["state"] == "ready", 10, "reload")
    assert h.status()["error"] is None
    assert h.get() is not old


def test_a_newer_reload_supersedes_one_under_way(model_server: ModelServer, cache: Cache) -> None:
    model_server.add("v1.bin", b"v1")
    slow = throttled(model_server, "v2.bin", 256 * KiB, seconds=1.0)
    v3 = model_server.add("v3.bin", b"v3")
    h = handle("m", model_server.url + "/v1.bin", cache)
    h.get()
    h.reload(source=slow)
    wait_for(lambda: model_server.count("v2.bin")[0] > 0, 10, "v2 under way")
    h.reload(source=v3)
    wait_for(lambda: h.get()["data"] == b"v3", 10, "v3")
    assert h.status()["reload"]["state"] == "ready"
    wait_for(
        lambda: not any(t.name == "modelcache-reload-m" for t in threading.enumerate()),
        10,
        "the superseded reload to end",
    )
    assert h.get()["data"] == b"v3"
    assert h.status()["reload"]["state"] == "ready"


def test_reload_before_anything_loaded_is_a_load(model_server: ModelServer, cache: Cache) -> None:
    model_server.add("v1.bin", b"v1")
    v2 = model_server.add("v2.bin", b"v2")
    h = handle("m", model_server.url + "/v1.bin", cache)
    h.reload(source=v2)
    assert h.get(timeout=30)["data"] == b"v2"
    assert model_server.count("v1.bin") == (0, 0)


# -- processes ---------------------------------------------------------------------------------

PROCESS = r"""
import json, os, sys, time
from pathlib import Path
from modelcache import Cache, ModelHandle, TransferOptions

home, url, go = sys.argv[1:4]
while not os.path.exists(go):
    time.sleep(0.005)
cache = Cache(home, read_only_paths=[], offline=False,
              transfer=TransferOptions(retries=2, backoff=0.01, deadline=20, stall_timeout=5))
h = ModelHandle("shared", source=url, cache=cache, strategy="background",
                loader=lambda path: path.read_bytes())
h.start()
data = h.get(timeout=60)
print(json.dumps({"size": len(data), "cache_hit": h.status()["cache_hit"]}), flush=True)
"""


def test_processes_with_handles_on_one_cache_download_once(
    model_server: ModelServer, cache: Cache, tmp_path: Path
) -> None:
    size = 512 * KiB
    url = throttled(model_server, "m.bin", size, seconds=0.5)
    script = tmp_path / "worker.py"
    script.write_text(PROCESS)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(cache.path), url, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    time.sleep(0.3)
    go.touch()
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        answers.append(json.loads(out))
    assert all(a["size"] == size for a in answers)
    assert sorted(a["cache_hit"] for a in answers) == [False, True, True]
    assert model_server.count("m.bin")[1] == size  # one download for the three


# -- the docs ----------------------------------------------------------------------------------


def _python_blocks(page: str) -> list[str]:
    text = (Path(__file__).parent.parent / "docs" / page).read_text()
    blocks, current, inside = [], [], False
    for line in text.splitlines():
        if line.strip().startswith("```python") and not inside:
            inside, current = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(current))
        elif inside:
            current.append(line)
    return blocks


EXAMPLE_HOST = "https://models.example.com"


def _serve_examples(server: ModelServer, fake_weights: Callable[..., Path]) -> None:
    server.add("tiny.safetensors", fake_weights("safetensors", size_bytes=64 * KiB))
    server.add("tiny-v2.safetensors", fake_weights("safetensors", size_bytes=64 * KiB, seed=2))
    server.add("net.safetensors", _net_checkpoint(fake_weights))


def _net_checkpoint(fake_weights: Callable[..., Path]) -> Path:
    import torch
    from safetensors.torch import save_file

    directory = fake_weights("safetensors", size_bytes=1 * KiB).parent
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    path = directory / "net.safetensors"
    save_file(net.state_dict(), str(path))
    return path


@pytest.mark.parametrize("page", ["quickstart.md", "handles.md"])
def test_docs_code_blocks_run(
    page: str,
    model_server: ModelServer,
    fake_weights: Callable[..., Path],
    modelcache_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Every ``python`` block of the page, in order, in one namespace, against model_server."""
    _serve_examples(model_server, fake_weights)
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(page)
    assert blocks, f"{page} has no python blocks"
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    try:
        for n, block in enumerate(blocks):
            code = block.replace(EXAMPLE_HOST, model_server.url)
            exec(compile(code, f"{page}[block {n}]", "exec"), namespace)
    finally:
        for value in list(namespace.values()):
            if isinstance(value, (ModelHandle, Registry)):
                value.close()

"""Fit a small host: lazy loading, int8 weights and idle unload (the recipe of seed 003).

Runs offline: it writes a small Linear-heavy model, serves it from an HTTP origin on 127.0.0.1
(standing in for your CDN or bucket) and walks one model through its life:

1. the process starts: nothing is downloaded or loaded (``strategy="lazy"``);
2. the first request downloads the weights, loads them, quantizes every Linear to int8 and
   caches the int8 weights beside the download;
3. after ``idle_unload`` seconds without a request the model is unloaded, its memory freed;
4. the next request loads again, straight from the cached int8 weights (no torchao import).

Run it twice: the second run finds the int8 weights in the cache (``--workdir``, kept between
runs) and never imports torchao. ``MODELCACHE_QUANTIZE=none`` runs the same walk with float
weights, for comparison. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from modelcache import Cache, ModelHandle, State
from modelcache.loaders import module_loader

IDLE_SECONDS = 1.5


class Classifier(nn.Module):
    """A Linear-heavy network (about 25 MB of float32 weights)."""

    def __init__(self, features: int = 256, width: int = 1024, depth: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(features, width), nn.GELU()]
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


SAMPLE = torch.linspace(-1, 1, 256).reshape(1, 256)


def warm_up(model: nn.Module) -> None:
    """One forward pass before READY: the weights are read in before the first real request."""
    with torch.no_grad():
        model(SAMPLE)


def make_handle(url: str, sha256: str, cache: Cache) -> ModelHandle:
    """The one object the service keeps: nothing happens until the first ``get()``."""
    return ModelHandle(
        "classifier",
        source=url,
        sha256=sha256,
        loader=module_loader(Classifier),  # built on the meta device, weights mapped
        strategy="lazy",  # load on the first request, not at start-up
        quantize="int8",  # MODELCACHE_QUANTIZE=none switches it off
        idle_unload=IDLE_SECONDS,  # free the memory after this long without a request
        warmup=warm_up,
        cache=cache,
    )


def predict(handle: ModelHandle, features: torch.Tensor) -> int:
    """What a request handler does: ``get()`` loads on first use, then returns at once."""
    model = handle.get()
    with torch.no_grad():
        return int(model(features).argmax())


# -- the walk-through -----------------------------------------------------------------------------


def rss_mib() -> float | None:
    """This process's resident memory in MiB (Linux), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def report(stage: str, handle: ModelHandle) -> dict[str, Any]:
    status = handle.status()
    quant = status.get("quantization") or {}
    row = {
        "stage": stage,
        "state": status["state"],
        "rss_mib": rss_mib(),
        "quantize": status["quantize"],
        "int8_from_cache": quant.get("cache_hit"),
        "quantize_s": quant.get("quantize_s"),
        "weights_before_mib": _mib(quant.get("bytes_before")),
        "weights_after_mib": _mib(quant.get("bytes_after")),
        "timings": status["timings"],
    }
    print(f"{stage:<28} state={row['state']:<10} rss={row['rss_mib']} MiB", flush=True)
    return row


def _mib(size: int | None) -> float | None:
    return None if size is None else round(size / 2**20, 1)


@contextmanager
def local_origin(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a stand-in for a CDN); yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def write_weights(directory: Path) -> tuple[Path, str]:
    """The model's float weights (the same bytes on every run); their path and sha256."""
    path = directory / "classifier.safetensors"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_file(Classifier().state_dict(), str(path))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "modelcache-low-memory",
        help="where the origin's files and the cache live (kept: a second run starts warm)",
    )
    workdir = parser.parse_args(argv).workdir
    weights, sha256 = write_weights(workdir / "origin")
    with local_origin(weights.parent) as origin:
        handle = make_handle(f"{origin}/{weights.name}", sha256, Cache(workdir / "cache"))
        stages = [report("started (lazy)", handle)]
        answer = predict(handle, SAMPLE)
        stages.append(report("first request", handle))
        deadline = time.monotonic() + IDLE_SECONDS + 10
        while handle.state is not State.UNLOADED and time.monotonic() < deadline:
            time.sleep(0.1)
        stages.append(report(f"idle {IDLE_SECONDS}s: unloaded", handle))
        again = predict(handle, SAMPLE)
        stages.append(report("next request", handle))
        handle.close()
    print(json.dumps({"answers": [answer, again], "stages": stages}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

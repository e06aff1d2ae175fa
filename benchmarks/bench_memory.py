"""Memory of a load: peak RSS, pages shared between workers, and time to READY on a warm cache.

A state dict of square float32 Linear layers (about 1 GiB; 16 MiB with ``--quick``), written as
``.safetensors`` and as a zip ``.pt``, fetched once over HTTP into a modelcache cache (untimed);
every file stays in the page cache (a restart on the same host). Every measurement runs in fresh
processes, contenders side by side, rounds alternating:

- **peak RSS of ``get()``**: modelcache (``module_loader``: the module built on the meta device,
  filled with the mapped tensors by ``load_state_dict(assign=True)``) against the naive path
  (build the module, ``torch.load`` / ``load_file`` the file, ``load_state_dict``). Both run the
  same warm-up forward pass, which reads every weight page. Peak is ``VmHWM`` minus the RSS the
  process had after ``import torch, modelcache``; the ratio is to the file's size.
- **4 workers**: 4 processes load the same safetensors file and stay alive; the sum of their PSS
  (``/proc/<pid>/smaps_rollup``) above what each had after its imports, over the file's size.
  Shared page-cache pages count 1/4 in each.
- **time to READY**: process start to READY of a warm-cache ``ModelHandle.get()`` (default
  loader, offline: no network) against the bare ``torch.load(mmap=True)`` (``.pt``) and
  ``safetensors.torch.load_file`` (``.safetensors``) of the same cached file. Both are mostly
  ``import torch``; on a shared machine the rounds scatter by tens of percent, so the goal is
  judged on the median of the per-round ratios (each round's two ran back to back), the
  fastest rounds are compared too, and modelcache's own time (its import, the cache lookup and the
  worker thread, measured once torch is imported) is reported beside them.

``python benchmarks/bench_memory.py [--quick]`` prints the rows as JSON lines; ``run(quick)``
returns them for ``benchmarks/run.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    NET_CODE,
    MiB,
    alternate,
    http_origin,
    pss,
    python,
    ratio,
    row,
    run_process,
    sha256_file,
    with_limits,
    write_checkpoint,
)

PEAK_GOAL = 1.2
"""Peak RSS of ``get()`` above imports, at most this multiple of the checkpoint (issue 3)."""
PSS_GOAL = 1.5
"""Total PSS of 4 workers above imports, at most this multiple of the checkpoint."""
READY_GOAL = 1.05
"""Warm-cache ``get()`` to READY, at most this multiple of the bare load."""
WORKERS = 4
LIMITS = {
    "memory-peak": "the file once: the tensors are mapped from the page cache and every page "
    "is read in (RSS counts those file pages); the naive path holds the file twice, the "
    "loaded state dict and the module's own parameters.",
    "memory-workers": "the page cache: the 4 workers map the same file pages, which PSS divides "
    "between them, so the total stays about one file; the naive path gives each worker a "
    "copy of its own.",
    "memory-ready": "import torch, most of each process's time. modelcache adds its own time "
    "(beside it) and its loader imports torch on the handle's worker thread, which took "
    "1.5-3% more CPU than the main thread in separate runs here; paired rounds scatter by "
    "about 5%.",
}

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
"""The children's environment: bytecode is cached as in any installed package (a development
shell with ``PYTHONDONTWRITEBYTECODE=1`` would compile modelcache at every start, about 60 ms)."""

# One child for the memory figures: imports, a baseline, one way of loading, a warm-up pass.
CHILD = (
    r"""
import json, os, sys, time

args = json.loads(sys.argv[1])


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


def pss_bytes():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024


import torch
from modelcache import Cache, ModelHandle
from modelcache.loaders import module_loader
"""
    + NET_CODE
    + r"""

width, layers = args["width"], args["layers"]
baseline = {"rss": status_bytes("VmRSS"), "pss": pss_bytes()}


def warmup(net):
    with torch.no_grad():
        x = torch.ones(1, width)
        for layer in net.layers:
            x = torch.tanh(layer(x))


if args["how"] == "modelcache":
    handle = ModelHandle(
        "net", source=args["url"], sha256=args["sha256"], cache=Cache(args["cache"], offline=True),
        loader=module_loader(lambda: Net(width, layers)), warmup=warmup, strategy="eager",
    )
    handle.start()
    model = handle.get()
else:
    model = Net(width, layers)
    path = args["path"]
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, weights_only=True)
    model.load_state_dict(state)
    del state
    warmup(model)
print("READY " + json.dumps({
    "baseline": baseline, "rss": status_bytes("VmRSS"), "hwm": status_bytes("VmHWM"),
}), flush=True)
if args.get("hold"):
    sys.stdin.readline()
"""
)

# The time-to-READY children do nothing else: the same file, the least code around it.
BARE = {
    ".pt": "import sys, torch\n"
    "state = torch.load(sys.argv[1], mmap=True, weights_only=True)\n"
    "print('READY', flush=True)\n",
    ".safetensors": "import sys\nfrom safetensors.torch import load_file\n"
    "state = load_file(sys.argv[1])\n"
    "print('READY', flush=True)\n",
}
HANDLE = (
    "import sys\n"
    "from modelcache import Cache, ModelHandle\n"
    "cache = Cache(sys.argv[3], offline=True)\n"
    "handle = ModelHandle('net', source=sys.argv[1], sha256=sys.argv[2], cache=cache)\n"
    "state = handle.get()\n"
    "print('READY', flush=True)\n"
)
OWN = (
    "import json, sys, time\n"
    "import torch, safetensors.torch\n"
    "began = time.perf_counter()\n"
    "from modelcache import Cache, ModelHandle\n"
    "cache = Cache(sys.argv[3], offline=True)\n"
    "handle = ModelHandle('net', source=sys.argv[1], sha256=sys.argv[2], cache=cache)\n"
    "state = handle.get()\n"
    "own = time.perf_counter() - began - handle.status()['timings']['load_s']\n"
    "print('READY ' + json.dumps({'own_s': own}), flush=True)\n"
)
"""What modelcache itself costs once torch is imported: its import, the cache lookup and the
worker thread (everything but the loader's ``load_s``, the work the bare contender does)."""


def _prepare(root: Path, size: int) -> dict[str, Any]:
    """Write both checkpoints, serve them, fetch them into a cache; what the children need."""
    origin = root / "origin"
    shapes = {}
    for suffix in (".safetensors", ".pt"):
        shapes[suffix] = write_checkpoint(origin / f"net{suffix}", size)
    assert shapes[".safetensors"] == shapes[".pt"]
    return {"origin": origin, "shape": shapes[".pt"], "cache": root / "cache"}


def _fetch_all(setup: dict[str, Any], base: str) -> dict[str, dict[str, Any]]:
    from modelcache import Cache

    cache = Cache(setup["cache"])
    files: dict[str, dict[str, Any]] = {}
    for suffix in (".safetensors", ".pt"):
        url = f"{base}/net{suffix}"
        origin = setup["origin"] / f"net{suffix}"
        digest = sha256_file(origin)
        cached = cache.fetch(url, digest)
        for path in (origin, cached):  # into the page cache: a warm host
            with open(path, "rb") as f:
                while f.read(16 * MiB):
                    pass
        files[suffix] = {
            "url": url,
            "sha256": digest,
            "origin": origin,
            "cached": cached,
            "size": origin.stat().st_size,
        }
    return files


def _child_args(setup: dict[str, Any], file: dict[str, Any], how: str) -> dict[str, Any]:
    width, layers = setup["shape"]
    return {
        "how": how,
        "url": file["url"],
        "sha256": file["sha256"],
        "path": str(file["origin"]),
        "cache": str(setup["cache"]),
        "width": width,
        "layers": layers,
    }


def _report(line: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(line.split(" ", 1)[1])
    return report


# -- peak RSS --------------------------------------------------------------------------------


def peak_rss(setup: dict[str, Any], files: dict[str, dict[str, Any]], rounds: int) -> list[dict]:
    rows: list[dict[str, Any]] = []
    for suffix, file in files.items():

        def measure(how: str, file: dict[str, Any] = file) -> Callable[[], float]:
            def once() -> float:
                args = json.dumps(_child_args(setup, file, how))
                result = run_process(python(CHILD, args), measure_rss=False, env=ENV).check()
                report = _report(next(x for x in result.lines if x.startswith("READY")))
                return float(report["hwm"] - report["baseline"]["rss"])

            return once

        results = alternate({how: measure(how) for how in ("modelcache", "naive")}, rounds)
        size = file["size"]
        for how, label in (("modelcache", "modelcache get()"), ("naive", _naive_label(suffix))):
            times_size = [v / size for v in results[how]]
            median = statistics.median(times_size)
            extra: dict[str, Any] = {}
            if how == "modelcache":
                extra = {"goal": f"<= {PEAK_GOAL}x the file", "met": median <= PEAK_GOAL}
            rows.append(
                row(
                    "memory-peak",
                    f"{label} ({suffix})",
                    times_size,
                    unit="x file",
                    title=f"Peak RSS above imports of a load to READY, {_mib(size)} checkpoint",
                    **{"peak above imports (MiB)": statistics.median(results[how]) / MiB},
                    **extra,
                )
            )
    return rows


def _naive_label(suffix: str) -> str:
    loader = "load_file" if suffix == ".safetensors" else "torch.load"
    return f"naive: build, {loader}, load_state_dict"


def _mib(size: int) -> str:
    return f"{size / MiB:.0f} MiB"


# -- pages shared by workers ----------------------------------------------------------------


def shared_pages(setup: dict[str, Any], file: dict[str, Any], rounds: int) -> list[dict]:
    def measure(how: str) -> Callable[[], dict[str, float]]:
        def once() -> dict[str, float]:
            args = json.dumps({**_child_args(setup, file, how), "hold": True})
            procs = [
                subprocess.Popen(
                    python(CHILD, args),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=ENV,
                )
                for _ in range(WORKERS)
            ]
            try:
                reports = []
                for proc in procs:
                    assert proc.stdout is not None
                    line = proc.stdout.readline()
                    if not line.startswith("READY"):
                        raise RuntimeError(f"worker failed: {line!r}")
                    reports.append(_report(line))
                time.sleep(0.2)
                total = sum(pss(proc.pid) for proc in procs)
                above = total - sum(r["baseline"]["pss"] for r in reports)
            finally:
                for proc in procs:
                    if proc.stdin is not None:
                        proc.stdin.close()
                for proc in procs:
                    proc.wait(60)
                    if proc.stdout is not None:
                        proc.stdout.close()
            return {"total": float(total), "above": float(above)}

        return once

    results = alternate({how: measure(how) for how in ("modelcache", "naive")}, rounds)
    size = file["size"]
    rows = []
    for how, label in (("modelcache", "modelcache get()"), ("naive", _naive_label(".safetensors"))):
        above = [r["above"] / size for r in results[how]]
        median = statistics.median(above)
        extra: dict[str, Any] = {}
        if how == "modelcache":
            extra = {"goal": f"<= {PSS_GOAL}x the file", "met": median <= PSS_GOAL}
        rows.append(
            row(
                "memory-workers",
                label,
                above,
                unit="x file",
                title=f"Total PSS of {WORKERS} workers above imports, {_mib(size)} safetensors",
                **{"total PSS (MiB)": statistics.median(r["total"] for r in results[how]) / MiB},
                **extra,
            )
        )
    return rows


# -- time to READY ---------------------------------------------------------------------------


def time_to_ready(setup: dict[str, Any], files: dict[str, dict[str, Any]], rounds: int) -> list:
    rows: list[dict[str, Any]] = []
    for suffix, file in files.items():
        bare = BARE[suffix]
        cached = str(file["cached"])

        def start(code: str, *args: str) -> Callable[[], dict[str, float]]:
            def once() -> dict[str, float]:
                result = run_process(python(code, *args), measure_rss=False, env=ENV).check()
                assert result.ready_s is not None
                line = next(x for x in result.lines if x.startswith("READY"))
                own = _report(line)["own_s"] if " " in line else 0.0
                return {"ready_s": result.ready_s, "own_s": own}

            return once

        bare_name = "torch.load(mmap=True)" if suffix == ".pt" else "safetensors load_file"
        contenders = {
            "modelcache": start(HANDLE, file["url"], file["sha256"], str(setup["cache"])),
            "bare": start(bare, cached),
            "own": start(OWN, file["url"], file["sha256"], str(setup["cache"])),
        }
        for warm_up in contenders.values():  # untimed: bytecode caches written, pages read
            warm_up()
        results = alternate(contenders, rounds)
        ready = {how: [r["ready_s"] for r in runs] for how, runs in results.items()}
        baseline = statistics.median(ready["bare"])
        for how, label in (("modelcache", "ModelHandle.get(), warm cache"), ("bare", bare_name)):
            median = statistics.median(ready[how])
            # each round's pair ran back to back: their ratio cancels the machine's slow drift
            paired = statistics.median(
                ratio(a, b) for a, b in zip(ready[how], ready["bare"], strict=True)
            )
            extra: dict[str, Any] = {
                "x bare": ratio(median, baseline),
                "x bare, per round": paired,
                "x bare (fastest rounds)": ratio(min(ready[how]), min(ready["bare"])),
            }
            if how == "modelcache":
                extra |= {
                    "modelcache's own time (ms)": 1000
                    * statistics.median(r["own_s"] for r in results["own"]),
                    "goal": f"<= {READY_GOAL}x the bare load (median of the per-round ratios)",
                    "met": paired <= READY_GOAL,
                }
            rows.append(
                row(
                    "memory-ready",
                    f"{label} ({suffix})",
                    ready[how],
                    unit="s",
                    title=f"Process start to READY, warm cache, {_mib(file['size'])} checkpoint",
                    **extra,
                )
            )
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    """Peak RSS, shared pages and time to READY; a 16 MiB checkpoint and few rounds when quick."""
    size = 16 * MiB if quick else 1024 * MiB
    memory_rounds, ready_rounds = (1, 2) if quick else (3, 15)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        setup = _prepare(Path(tmp), size)
        with http_origin(setup["origin"]) as base:
            files = _fetch_all(setup, base)
            rows = peak_rss(setup, files, memory_rounds)
            rows += shared_pages(setup, files[".safetensors"], memory_rounds)
            rows += time_to_ready(setup, files, ready_rounds)
    return with_limits(rows, LIMITS)


if __name__ == "__main__":
    import sys

    for result in run("--quick" in sys.argv):
        print(json.dumps(result))

"""int8 quantization: time to READY and peak memory, float vs int8 first start vs int8 warm start.

Each start is a fresh process (``python -c``) that builds a ``ModelHandle`` over a Linear-heavy
float32 ``.safetensors`` file (about 336 MB; 8 MB with ``--quick``) with
``module_loader`` (meta device + mmap), starts it eagerly with a warm-up forward pass (so every
weight page the model uses is read before READY, as in production) and prints ``READY``:

- **float**: ``quantize=None``;
- **int8, first start**: ``quantize="int8"`` with no cached int8 weights: the float weights are
  read, quantized with torchao and written to the cache as a derived entry;
- **int8, warm start**: ``quantize="int8"`` again: the cached int8 weights are mapped, the float
  ones never read, torchao never imported.

Peak RSS is the child's ``ru_maxrss`` (through ``/usr/bin/time`` or a small Python parent).
"Above imports" subtracts the RSS the process had right after ``import torch, modelcache``,
which every contender pays alike (torchao's import, about 80 MB, counts against the first
int8 start, the only one that imports it).
The file stays in the page cache between starts (a restart on the same host).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import MiB, alternate, python, ratio, row, run_process, with_limits

GOAL = 0.5
"""An int8 warm start's peak RSS at most this fraction of the float start's (issue 6)."""
LIMITS = {
    "int8-memory": "a first start loads the float weights and quantizes them (torchao), so both "
    "exist for a moment; a warm start maps the cached int8 weights and never loads the float "
    "ones.",
    "int8-ready": "import torch, and on a first start the quantization (torchao, on the CPU); a "
    "warm start maps the cached int8 weights.",
}

CHILD = r"""
import json, sys, time
began = time.perf_counter()
import torch
from modelcache import Cache, ModelHandle
from modelcache.loaders import module_loader


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


args = json.loads(sys.argv[1])
baseline = status_bytes("VmRSS")
imported = time.perf_counter() - began
width, layers = args["width"], args["layers"]


def factory():
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


batch = torch.randn(8, width, generator=torch.Generator().manual_seed(0))


def warmup(model):
    with torch.no_grad():
        model(batch)


handle = ModelHandle(
    "linear-heavy", source=args["path"], sha256=args["sha256"], loader=module_loader(factory),
    quantize=args["quantize"], strategy="eager", cache=Cache(args["cache"]), warmup=warmup,
)
started = time.perf_counter()
handle.start()
ready = time.perf_counter() - started
print("READY", flush=True)
status = handle.status()
print(json.dumps({
    "baseline": baseline, "rss": status_bytes("VmRSS"), "hwm": status_bytes("VmHWM"),
    "import_s": imported, "start_s": ready, "timings": status["timings"],
    "quantization": status.get("quantization"),
}), flush=True)
"""

CASES = {
    "float": None,
    "int8, first start": "int8",
    "int8, warm start": "int8",
}


def write_model(path: Path, width: int, layers: int) -> str:
    """A Linear-heavy float32 safetensors file; its sha256."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    state = {}
    for n in range(layers):
        state[f"{n}.weight"] = torch.randn(width, width, generator=generator) / width**0.5
        state[f"{n}.bias"] = torch.zeros(width)
    save_file(state, str(path))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _derived(cache: Path) -> list[str]:
    from modelcache import Cache

    return [e.key for e in Cache(cache).entries() if e.source.startswith("modelcache+int8://")]


def run(quick: bool) -> list[dict[str, Any]]:
    """Float vs int8 first start vs int8 warm start, side by side, rounds alternating."""
    width, layers, rounds = (512, 8, 1) if quick else (2048, 20, 3)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        root = Path(tmp)
        model = root / "linear-heavy.safetensors"
        digest = write_model(model, width, layers)
        model_bytes = model.stat().st_size
        cache = root / "cache"
        cache.mkdir()

        def start(case: str) -> Callable[[], dict[str, Any]]:
            args = {
                "path": str(model),
                "sha256": digest,
                "width": width,
                "layers": layers,
                "quantize": CASES[case],
                "cache": str(cache),
            }

            def measure() -> dict[str, Any]:
                result = run_process(python(CHILD, json.dumps(args)), timeout=900).check()
                report: dict[str, Any] = json.loads(result.lines[-1])
                report["ready_s"] = result.ready_s
                report["peak_rss"] = result.peak_rss or report["hwm"]
                return report

            return measure

        def before(case: str) -> None:
            if case == "int8, first start":
                from modelcache import Cache

                for key in _derived(cache):
                    Cache(cache).remove(key)
            elif case == "int8, warm start" and not _derived(cache):
                start("int8, first start")()  # untimed: the warm start needs the entry

        results = alternate({case: start(case) for case in CASES}, rounds, before=before)
        shutil.rmtree(cache, ignore_errors=True)
    return _rows(results, quick=quick, model_bytes=model_bytes, width=width, layers=layers)


def _rows(
    results: dict[str, list[dict[str, Any]]], *, quick: bool, **about: Any
) -> list[dict[str, Any]]:
    float_peak = _median([r["peak_rss"] for r in results["float"]])
    float_above = _median([r["peak_rss"] - r["baseline"] for r in results["float"]])
    size = f"{about['layers']} x Linear({about['width']}, {about['width']}) float32"
    rows: list[dict[str, Any]] = []
    for case, reports in results.items():
        info = reports[0].get("quantization") or {}
        peak = [r["peak_rss"] / MiB for r in reports]
        above = [(r["peak_rss"] - r["baseline"]) / MiB for r in reports]
        is_warm = case == "int8, warm start"
        rows.append(
            row(
                "int8-memory",
                case,
                peak,
                unit="MiB",
                title=f"Peak RSS of a start to READY ({size})",
                **{
                    "above imports (MiB)": _median(above),
                    "x float (peak)": ratio(_median(peak) * MiB, float_peak),
                    "x float (above imports)": ratio(_median(above) * MiB, float_above),
                    "RSS at READY (MiB)": _median([r["rss"] / MiB for r in reports]),
                    "weights (MiB)": (info.get("bytes_after") or info.get("bytes_before") or 0)
                    / MiB
                    if info
                    else None,
                },
                **(
                    {
                        "goal": f"int8 warm start peak RSS <= {GOAL}x float's (above imports)",
                        # an 8 MB model (--quick) is all import overhead: not judged
                        "met": None if quick else ratio(_median(above) * MiB, float_above) <= GOAL,
                        "note": "the warm start maps cached int8 weights; torchao is not imported",
                    }
                    if is_warm
                    else {}
                ),
            )
        )
    for case, reports in results.items():
        info = reports[0].get("quantization") or {}
        rows.append(
            row(
                "int8-ready",
                case,
                [r["ready_s"] for r in reports],
                unit="s",
                title=f"Process start to READY ({size})",
                **{
                    "handle start to READY (s)": _median([r["start_s"] for r in reports]),
                    "load_s": _median([r["timings"]["load_s"] or 0 for r in reports]),
                    "quantize step (s)": _median(
                        [r["timings"]["quantize_s"] or 0 for r in reports]
                    ),
                    "torchao quantize_s": info.get("quantize_s"),
                    "cached int8 load (s)": info.get("cached_load_s"),
                    "warmup_s": _median([r["timings"]["warmup_s"] or 0 for r in reports]),
                },
            )
        )
    return with_limits(rows, LIMITS)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, one round")
    options = parser.parse_args()
    for result in run(options.quick):
        print(json.dumps(result))

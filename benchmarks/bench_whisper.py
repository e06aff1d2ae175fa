"""Whisper: ``recipes.whisper_loader`` against ``whisper.load_model`` on the same checkpoint.

A fake checkpoint in openai-whisper's exact format with tiny's dimensions (72 MiB of float16,
37 M parameters; the small test dimensions with ``--quick``), on local disk and in the page
cache. Each load runs in a fresh process (``import torch, whisper, modelcache`` done before the
clock starts), contenders side by side, rounds alternating:

- **time**: seconds for the call that returns a ready ``whisper.Whisper``;
- **peak anonymous memory**: the largest ``RssAnon`` seen during the call (sampled every
  millisecond) minus the value before it. File-backed pages of a memory-mapped checkpoint are
  not anonymous: the page cache holds them once for every process and can drop them.

``whisper.load_model`` reads the file into memory (float16), builds a float32 model with random
initial weights, then copies; modelcache maps the file, converts to float32 and adopts the
tensors into a model whose parameters were never allocated. Both end with the same float32
model (the tests check they are equal).

``python benchmarks/bench_whisper.py [--quick]`` prints the rows as JSON lines.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

from common import MiB, alternate, python, ratio, row, run_process

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import torch, whisper
from modelcache.recipes import whisper_loader

mode, path = sys.argv[1], sys.argv[2]


def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024


peak = [0]
stop = threading.Event()


def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)


base = anon()
sampler = threading.Thread(target=sample)
sampler.start()
began = time.perf_counter()
if mode == "modelcache":
    model = whisper_loader(None)(Path(path))
else:
    model = whisper.load_model(path, device="cpu")
seconds = time.perf_counter() - began
stop.set()
sampler.join()
peak[0] = max(peak[0], anon())
assert next(model.parameters()).dtype == torch.float32
print(json.dumps({"seconds": seconds, "peak_anon": peak[0] - base}))
"""

CONTENDERS = {"modelcache": "modelcache", "whisper.load_model": "openai"}


def run(quick: bool) -> list[dict[str, Any]]:
    """The rows: load time and peak anonymous memory of both contenders."""
    from modelcache.testing.fake_weights import (
        WHISPER_TEST_DIMS,
        WHISPER_TINY_DIMS,
        write_fake_weights,
    )

    dims = WHISPER_TEST_DIMS if quick else WHISPER_TINY_DIMS
    rounds = 2 if quick else 7
    with tempfile.TemporaryDirectory() as scratch:
        path = write_fake_weights(Path(scratch), "whisper", **dims)
        size = path.stat().st_size

        def measure(mode: str) -> dict[str, float]:
            done = run_process(python(CHILD, mode, str(path)), timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{mode} failed: {done.stderr[-2000:]}")
            result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
            return result

        results = alternate({name: (lambda m=m: measure(m)) for name, m in CONTENDERS.items()},
                            rounds)  # fmt: skip
    shape = "tiny" if not quick else "test dims"
    rows: list[dict[str, Any]] = []
    seconds = {n: [r["seconds"] for r in rs] for n, rs in results.items()}
    anon = {n: [r["peak_anon"] / MiB for r in rs] for n, rs in results.items()}
    for name in CONTENDERS:
        rows.append(row("whisper-load", name, seconds[name], unit="s",
                        title=f"Whisper {shape}: seconds to a ready model",
                        file=f"{size / MiB:.1f} MiB"))  # fmt: skip
        rows.append(row("whisper-anon", name, anon[name], unit="MiB",
                        title=f"Whisper {shape}: peak anonymous memory of the load",
                        file=f"{size / MiB:.1f} MiB"))  # fmt: skip
    time_ratio = ratio(median(seconds["modelcache"]), median(seconds["whisper.load_model"]))
    anon_ratio = ratio(median(anon["modelcache"]), median(anon["whisper.load_model"]))
    rows[0]["note"] = (
        f"modelcache / whisper.load_model, medians of one run: time x{time_ratio:.2f}, "
        f"peak anonymous memory x{anon_ratio:.2f}"
    )
    return rows


if __name__ == "__main__":
    for result in run("--quick" in sys.argv):
        print(json.dumps(result))

"""Fetching over HTTP: modelcache beside curl, requests, torch.hub, fsspec and pooch.

One file on nginx (sendfile) on 127.0.0.1, every client in turn, rounds alternating:

- modelcache ``Cache.fetch`` with the sha256 (verified while writing, published atomically);
- ``curl -o FILE`` and ``curl -o /dev/null`` (the loopback limit, nothing written);
- requests streaming 1 MiB chunks to a file; ``torch.hub.download_url_to_file``;
  fsspec ``HTTPFileSystem.get``; ``pooch.retrieve`` (with the sha256);

then an origin that caps each connection at 50 MiB/s (nginx ``limit_rate``, like a CDN) against
a single-stream client, the peak memory of a fetch above the process's baseline, and the cost of
a cache hit. ``python benchmarks/bench_fetch.py [--quick]`` prints the markdown tables;
``run(quick)`` returns the rows for ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    SHA256_LIMITS,
    MiB,
    alternate,
    nginx,
    ratio,
    row,
    sha256_speed,
    summarize,
    with_limits,
)

FULL = {"size": 512 * MiB, "rounds": 5, "throttled_size": 256 * MiB, "throttled_rounds": 3}
QUICK = {"size": 64 * MiB, "rounds": 1, "throttled_size": 32 * MiB, "throttled_rounds": 1}
LIMITS = {
    "fetch-http": "the CPU. On 127.0.0.1 there is no link: the client and nginx share the 2 "
    "cores. A verifying client also pays SHA-256 (its own speed is below), which modelcache "
    "runs in one thread while another receives and writes, so it can come near the slower "
    "of SHA-256 and curl -o FILE, not beyond.",
    "fetch-ratios": "the CPU, as above. Each ratio is taken within a round, which cancels the "
    "machine's drift between rounds but not a slow phase within one.",
    "fetch-sha256": SHA256_LIMITS,
    "fetch-memory": "the transfer's buffers, which are fixed: 4 MiB of 256 KiB pieces between "
    "the thread that receives and the one that hashes (one piece per connection when "
    "parallel), and what its first fetch imports. The file's size does not count: its bytes "
    "go to the page cache, not to memory the process holds.",
    "fetch-hit": "a stat of the entry against the stamp recorded when it was verified (size, "
    "mtime, inode); no hashing, no network. A new Cache each call adds its construction.",
    "fetch-throttled": "the client's CPU on 127.0.0.1, shared with nginx: 16 connections (the "
    "default at most) of 50 MiB/s could carry 800 MiB/s, more than 2 cores receive, write "
    "and hash. The one stream is held to its connection's cap.",
}
CAP = 50 * MiB  # bytes/s per connection at the throttled origin
HITS = 200

GOAL_VS_HASHING_REQUESTS = 1.2  # issue 16: against the fastest peer that also verifies
GOAL_THROTTLED = 4.0
GOAL_MEMORY_MIB = 64.0
GOAL_HIT_MS = 5.0


# -- the contenders -------------------------------------------------------------------------------


def _write_random(path: Path, size: int) -> str:
    """Fill ``path`` with ``size`` random bytes; their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MiB))
            handle.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _modelcache(url: str, digest: str, work: Path, **options: Any) -> Callable[[], None]:
    from modelcache import Cache, TransferOptions

    transfer = TransferOptions(**options)

    def fetch() -> None:
        home = work / "modelcache"
        shutil.rmtree(home, ignore_errors=True)
        path = Cache(home, read_only_paths=[], offline=False, transfer=transfer).fetch(url, digest)
        assert path.stat().st_size > 0
        shutil.rmtree(home, ignore_errors=True)

    return fetch


def _curl(url: str, target: str) -> Callable[[], None]:
    def fetch() -> None:
        subprocess.run(["curl", "-sS", "--fail", "-o", target, url], check=True)
        if target != os.devnull:
            os.unlink(target)

    return fetch


def _requests(url: str, work: Path, *, sha256: bool = False) -> Callable[[], None]:
    import requests

    session = requests.Session()

    def fetch() -> None:
        target = work / "requests.bin"
        digest = hashlib.sha256()
        with session.get(url, stream=True, timeout=60) as response, open(target, "wb") as out:
            response.raise_for_status()
            for block in response.iter_content(MiB):
                out.write(block)
                if sha256:
                    digest.update(block)
        target.unlink()

    return fetch


def _torch_hub(url: str, work: Path) -> Callable[[], None]:
    from torch.hub import download_url_to_file

    def fetch() -> None:
        target = work / "torch-hub.bin"
        download_url_to_file(url, str(target), progress=False)
        target.unlink()

    return fetch


def _fsspec(url: str, work: Path) -> Callable[[], None]:
    import fsspec

    fs = fsspec.filesystem("http")

    def fetch() -> None:
        target = work / "fsspec.bin"
        fs.get(url, str(target))
        target.unlink()

    return fetch


def _pooch(url: str, digest: str, work: Path) -> Callable[[], None]:
    import logging

    import pooch

    logging.getLogger("pooch").setLevel(logging.WARNING)

    def fetch() -> None:
        target = work / "pooch"
        shutil.rmtree(target, ignore_errors=True)
        pooch.retrieve(
            url, known_hash=f"sha256:{digest}", fname="pooch.bin", path=target, progressbar=False
        )
        shutil.rmtree(target, ignore_errors=True)

    return fetch


def _cpu() -> float:
    """CPU seconds used so far by this process (all threads) and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _announce(name: str) -> None:
    print(f"  bench_fetch: {name}", file=sys.stderr, flush=True)


def _timed(fetch: Callable[[], None]) -> Callable[[], tuple[float, float]]:
    """A measurement of ``fetch``: ``(wall seconds, client CPU seconds)``."""

    def measure() -> tuple[float, float]:
        cpu, began = _cpu(), time.perf_counter()
        fetch()
        return time.perf_counter() - began, _cpu() - cpu

    return measure


# -- measurements ---------------------------------------------------------------------------------


def throughput(url: str, digest: str, size: int, rounds: int, work: Path) -> list[dict[str, Any]]:
    """Every client against the uncapped origin, rounds alternating; MiB/s rows."""
    contenders: dict[str, Callable[[], None]] = {
        "modelcache (sha256 included)": _modelcache(url, digest, work),
        "curl -o FILE": _curl(url, str(work / "curl.bin")),
        "curl -o /dev/null": _curl(url, os.devnull),
        "requests, 1 MiB chunks": _requests(url, work),
        "requests + sha256 in the loop": _requests(url, work, sha256=True),
        "torch.hub.download_url_to_file": _torch_hub(url, work),
        "fsspec HTTPFileSystem.get": _fsspec(url, work),
        "pooch.retrieve (sha256)": _pooch(url, digest, work),
    }
    for fetch in contenders.values():  # warm every client's imports and connections once
        fetch()
    measured = alternate(
        {name: _timed(fetch) for name, fetch in contenders.items()}, rounds, before=_announce
    )
    speed = {name: [size / MiB / wall for wall, _ in values] for name, values in measured.items()}
    cpu = {name: [c / (size / 1024 / MiB) for _, c in values] for name, values in measured.items()}
    base = summarize(speed["requests, 1 MiB chunks"]).median
    title = f"Fetching {size // MiB} MiB from nginx on 127.0.0.1"
    rows = [
        row(
            "fetch-http",
            name,
            values,
            unit="MiB/s",
            better="higher",
            title=title,
            **{
                "verifies sha256": name in VERIFYING,
                "vs requests": ratio(summarize(values).median, base),
                "client CPU s/GiB": summarize(cpu[name]).median,
            },
        )
        for name, values in speed.items()
    ]
    ours = speed["modelcache (sha256 included)"]
    judged = [
        ("requests + sha256 in the loop", GOAL_VS_HASHING_REQUESTS),
        ("requests, 1 MiB chunks", None),
        ("curl -o FILE", None),
    ]
    for peer, goal in judged:
        paired = [ratio(a, b) for a, b in zip(ours, speed[peer], strict=True)]
        judged_by: dict[str, Any] = {}
        if goal is not None:
            judged_by = {
                "goal": f">= {goal}x {peer} (issue 16)",
                "met": summarize(paired).median >= goal,
            }
        else:
            judged_by = {"note": f"{peer} verifies nothing: shown for information, not judged."}
        rows.append(
            row(
                "fetch-ratios",
                f"modelcache / {peer}",
                paired,
                unit="x",
                better="higher",
                title="modelcache's speed over its peers' (per round, same run)",
                **judged_by,
            )
        )
    rows[0]["note"] = (
        "client CPU s/GiB: CPU seconds used by the client process (all its threads) and its "
        "children per GiB fetched; nginx's own work is not in it. On 127.0.0.1 the client and "
        "the origin share the machine's cores, so CPU, not the network, sets the pace."
    )
    rows += sha256_ceiling()
    rows[-1]["note"] = (
        "modelcache hashes every byte while receiving; requests, curl, torch.hub and fsspec hash "
        "nothing (not verifying: shown for information, not judged against); pooch hashes after "
        "writing, a second read. 'requests + sha256 in the loop' is the fastest Python peer "
        "that verifies, the peer the goal is judged against."
    )
    return rows


VERIFYING = {
    "modelcache (sha256 included)",
    "requests + sha256 in the loop",
    "pooch.retrieve (sha256)",
}


def sha256_ceiling() -> list[dict[str, Any]]:
    """SHA-256's own in-memory speed on one core: the ceiling of any verifying client."""
    return [
        row(
            "fetch-sha256",
            "hashlib.sha256 in memory, one core",
            sha256_speed(),
            unit="MiB/s",
            better="higher",
            title="SHA-256's own speed on this machine (the ceiling of a verifying client)",
        )
    ]


def throttled(root: Path, digest: str, size: int, rounds: int, work: Path) -> list[dict[str, Any]]:
    """An origin capping each connection at 50 MiB/s: parallel ranges vs one stream."""
    with nginx(root, limit_rate=CAP) as base:
        url = f"{base}/throttled.bin"
        contenders = {
            "modelcache (parallel ranges)": _timed(_modelcache(url, digest, work)),
            "requests (one stream)": _timed(_requests(url, work)),
        }
        measured = alternate(contenders, rounds)
    speed = {name: [size / MiB / wall for wall, _ in values] for name, values in measured.items()}
    title = f"An origin capping each connection at {CAP // MiB} MiB/s ({size // MiB} MiB)"
    rows = [
        row("fetch-throttled", name, values, unit="MiB/s", better="higher", title=title)
        for name, values in speed.items()
    ]
    paired = [
        ratio(a, b)
        for a, b in zip(
            speed["modelcache (parallel ranges)"], speed["requests (one stream)"], strict=True
        )
    ]
    rows.append(
        row(
            "fetch-throttled",
            "modelcache / one stream",
            paired,
            unit="x",
            better="higher",
            title=title,
            goal=f">= {GOAL_THROTTLED}x a single-stream client",
            met=summarize(paired).median >= GOAL_THROTTLED,
        )
    )
    return rows


_MEMORY_CHILD = r"""
import json, sys
from modelcache import Cache

def status(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(name)

home, url, digest = sys.argv[1:4]
baseline = status("VmRSS")
Cache(home, read_only_paths=[], offline=False).fetch(url, digest)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
"""


def memory(url: str, digest: str, size: int, work: Path) -> list[dict[str, Any]]:
    """Peak resident memory of a process fetching the file, above its baseline after import."""
    home = work / "memory-cache"
    shutil.rmtree(home, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(home), url, digest],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MODELCACHE_PROGRESS": "0"},
    )
    shutil.rmtree(home, ignore_errors=True)
    answer = json.loads(done.stdout)
    above = (answer["peak"] - answer["baseline"]) / MiB
    return [
        row(
            "fetch-memory",
            f"modelcache fetching {size // MiB} MiB",
            [above],
            unit="MiB",
            title="Peak memory of a fetch above the process baseline",
            goal=f"< {GOAL_MEMORY_MIB:.0f} MiB whatever the file size",
            met=above < GOAL_MEMORY_MIB,
            baseline_mib=answer["baseline"] / MiB,
        )
    ]


def cache_hit(url: str, digest: str, work: Path) -> list[dict[str, Any]]:
    """Cost of a fetch whose entry is present (no network), per call."""
    from modelcache import Cache

    home = work / "hit-cache"
    Cache(home, read_only_paths=[], offline=False).fetch(url, digest)
    same = Cache(home, read_only_paths=[], offline=False)
    reused: list[float] = []
    fresh: list[float] = []
    for _ in range(HITS):
        began = time.perf_counter()
        same.fetch(url, digest)
        reused.append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        Cache(home).fetch(url, digest)
        fresh.append((time.perf_counter() - began) * 1000)
    shutil.rmtree(home, ignore_errors=True)
    title = "A cache hit (entry present, no network)"
    goal = f"< {GOAL_HIT_MS:.0f} ms"
    return [
        row(
            "fetch-hit",
            "Cache.fetch, same Cache object",
            reused,
            unit="ms",
            title=title,
            goal=goal,
            met=summarize(reused).median < GOAL_HIT_MS,
        ),
        row(
            "fetch-hit",
            "Cache().fetch, a new Cache each call",
            fresh,
            unit="ms",
            title=title,
            goal=goal,
            met=summarize(fresh).median < GOAL_HIT_MS,
        ),
    ]


@contextlib.contextmanager
def _workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-fetch-", dir=os.environ.get("BENCH_TMP")) as d:
        yield Path(d)


def run(quick: bool) -> list[dict[str, Any]]:
    """Every figure of this benchmark as rows for ``benchmarks/run.py``."""
    plan = QUICK if quick else FULL
    with _workspace() as work:
        root = work / "origin"
        root.mkdir()
        digest = _write_random(root / "model.bin", plan["size"])
        throttled_digest = _write_random(root / "throttled.bin", plan["throttled_size"])
        files = work / "clients"
        files.mkdir()
        rows: list[dict[str, Any]] = []
        with nginx(root) as base:
            url = f"{base}/model.bin"
            rows += throughput(url, digest, plan["size"], plan["rounds"], files)
            rows += memory(url, digest, plan["size"], files)
            rows += cache_hit(url, digest, files)
        rows += throttled(
            root, throttled_digest, plan["throttled_size"], plan["throttled_rounds"], files
        )
    return with_limits(rows, LIMITS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small file, one round")
    args = parser.parse_args()
    from run import markdown  # (beside this file)

    print(markdown(run(args.quick)))


if __name__ == "__main__":
    main()

"""Links like real ones: nginx behind a rate-limited veth pair, modelcache beside curl.

The harness creates two network namespaces (an origin and a client) joined by a veth pair whose
origin side is shaped with ``tc qdisc ... tbf`` (this kernel has tbf but no netem, so there is no
added delay), runs nginx inside the origin namespace and every client inside the client
namespace, and removes both namespaces at the end. Its addresses live only inside them
(10.199.x.0/24). Contenders, rounds alternating, each in a fresh interpreter timed after its
imports:

- modelcache ``Cache.fetch`` with the sha256 (verified while writing), timed after the imports
  its first fetch would make (urllib3 and the transfer engine, ~45 ms), as the requests
  contender is timed after ``import requests``;
- ``curl -o FILE`` (writes, verifies nothing) and ``curl -o /dev/null`` (nothing written);
- requests streaming 1 MiB chunks with sha256 in the loop (the fastest Python peer that verifies).

Links: 2 Gbit/s and 8 Gbit/s, then 2 Gbit/s with every connection capped at 20 MiB/s by nginx's
``limit_rate`` (a CDN). There one connection cannot fill the link, so the peers that matter fetch
ranges in parallel: ``curl --parallel`` with 16 connections asking for 2 MiB ranges each (as
modelcache's chunks) into /dev/null (nothing hashed, nothing written: what parallel TCP flows
get through this link at all), and aria2c with 16 connections, verifying the sha256 (the
segmented downloader users reach for; when it is installed). At 8 Gbit/s a sampler inside the
modelcache process records, every 5 ms, what each thread is doing (running, or waiting: on
another thread, on the socket, on the disk), which shows where the time goes. Creating
namespaces needs root; without it (or without ``ip``, ``tc`` or nginx) the module says so in
its note rather than failing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

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
from servers import netns  # noqa: E402

FULL = {"size": 1024 * MiB, "rounds": 5, "capped_size": 512 * MiB}
QUICK = {"size": 32 * MiB, "rounds": 1, "capped_size": 16 * MiB}
LINKS_GBIT = (2, 8)
CAP = 20 * MiB  # bytes/s per connection when capped
GOAL_OF_LINK = 0.95
LIMITS = {
    "link-rate": "at 2 Gbit/s the link itself, whose TCP payload is 0.956x of the tbf rate "
    "(curl's figure). At 8 Gbit/s the 2 cores: a verifying client needs what curl -o FILE "
    "spends (receive and page-cache write) plus SHA-256 (1 / its speed below, ~0.85 s per GiB "
    "in one thread that cannot be split), nginx, tbf and the veth's softirq take ~0.3 s per "
    "GiB more, which adds up to about 2 core-seconds per GiB: all of this machine at 954 MiB/s, "
    "with nothing else running. See where the time goes below: the hashing thread is busy most "
    "of the fetch.",
    "link-capped": (
        "the link, and how TCP flows share it when nginx paces "
        "each one. One connection gets 20 MiB/s, so the file goes as parallel ranges, as "
        "for every peer here: the first request's first 512 KiB decide that (about 35 ms: "
        "nginx sends a new answer's first MiB or two at once, then pauses, and the "
        "judgment falls due in the pause), then 8 connections fetch 2 MiB chunks, 16 once "
        "0.3 s shows the total still rising; the last chunks go as quarter chunks so the "
        "connections finish together. TCP's payload is 0.956x of the tbf rate at 2 Gbit/s "
        "(1448 bytes in a 1514-byte frame; curl -o FILE's figure on the uncapped link). "
        "Paced flows leave the link idle now and then (5 ms gaps every 50-150 ms, in a "
        "timeline of the client's received bytes), which costs every client: curl "
        "--parallel, receiving into /dev/null in C, gets no more than modelcache. "
        "The start costs modelcache ~22 ms more, 1% of this 512 MiB (0.951x for 1 GiB "
        "in a separate check): the first request is judged alone while the link "
        "carries little. Fetching the 4 chunks after it meanwhile (its rate timed once "
        "they were done) reached 0.950x here, but cost 1.1% at 8 Gbit/s (901 against "
        "911 MiB/s, 8 rounds), where the client is CPU-bound and 5 connections at once "
        "cost more CPU than one: not kept."
    ),
    "link-threads": "the 2 cores: the thread that hashes (modelcache-file_0, where the fetch "
    "runs) and the one that receives and writes (modelcache-stream) each run most of the "
    "fetch, and nginx, tbf and the veth's softirq need the rest.",
    "link-sha256": SHA256_LIMITS,
}

# -- the namespaces (tests/servers/netns.py, shared with tests/test_replicas.py) -------------


def why_not() -> str | None:
    """Why the namespaces cannot be made here, or ``None`` when they can."""
    problem = netns.why_not("tc", "curl")
    if problem is None and shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        return "nginx is not installed"
    return problem


link = netns.link


# -- the contenders (each a child in the client namespace) ------------------------------------

CPU = """
import json, os, sys, time
def cpu():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
"""

#: what modelcache's first fetch imports lazily (urllib3, the engine): imported before the clock
#: starts, as the requests contender's ``import requests`` brings urllib3 before its clock
FETCH_IMPORTS = """
import urllib3, concurrent.futures.thread
import modelcache._readers, modelcache._planners.http, modelcache._transfer
"""

MODELCACHE = (
    CPU
    + FETCH_IMPORTS
    + """
import shutil
from modelcache import Cache
url, digest, home, sample = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
sampler = None
if sample:
    sys.path.insert(0, sys.argv[5])
    from bench_link import ThreadSampler
    sampler = ThreadSampler()
c, began = cpu(), time.perf_counter()
if sampler: sampler.start()
Cache(home, read_only_paths=[], offline=False).fetch(url, digest)
took = time.perf_counter() - began
if sampler: sampler.stop()
print(json.dumps({"s": took, "cpu": cpu() - c, "threads": sampler.summary() if sampler else {}}))
shutil.rmtree(home, ignore_errors=True)
"""
)

CURL = (
    CPU
    + """
import subprocess
url, target = sys.argv[1], sys.argv[2]
c, began = cpu(), time.perf_counter()
subprocess.run(["curl", "-sS", "--fail", "-o", target, url], check=True)
took = time.perf_counter() - began
print(json.dumps({"s": took, "cpu": cpu() - c}))
if target != os.devnull:
    os.unlink(target)
"""
)

REQUESTS = (
    CPU
    + """
import hashlib, requests
url, target = sys.argv[1], sys.argv[2]
session = requests.Session()
c, began = cpu(), time.perf_counter()
digest = hashlib.sha256()
with session.get(url, stream=True, timeout=60) as response, open(target, "wb") as out:
    response.raise_for_status()
    for block in response.iter_content(1 << 20):
        out.write(block)
        digest.update(block)
took = time.perf_counter() - began
print(json.dumps({"s": took, "cpu": cpu() - c}))
os.unlink(target)
"""
)


#: ``curl --parallel``: the whole file as ``chunk``-byte ranges, ``connections`` at a time, into
#: /dev/null (the ranges go in a config file: a 1 GiB file is 512 of them)
PARALLEL_CURL = (
    CPU
    + """
import subprocess
url, size, chunk, connections, config = sys.argv[1:6]
size, chunk = int(size), int(chunk)
with open(config, "w") as out:
    for start in range(0, size, chunk):
        end = min(start + chunk, size) - 1
        out.write(f'url = "{url}"\\nrange = "{start}-{end}"\\noutput = "/dev/null"\\n')
c, began = cpu(), time.perf_counter()
subprocess.run(
    ["curl", "-sS", "--fail", "--parallel", "--parallel-max", connections, "-K", config],
    check=True,
)
took = time.perf_counter() - began
print(json.dumps({"s": took, "cpu": cpu() - c}))
"""
)

#: aria2c: ``connections`` connections of 1 MiB pieces or more, the sha256 checked at the end
ARIA2C = (
    CPU
    + """
import subprocess
url, target, digest, connections = sys.argv[1:5]
c, began = cpu(), time.perf_counter()
subprocess.run(
    ["aria2c", "-q", "-x", connections, "-s", connections, "-k", "1M",
     "--file-allocation=none", "--allow-overwrite=true", "--auto-file-renaming=false",
     f"--checksum=sha-256={digest}", "-d", os.path.dirname(target),
     "-o", os.path.basename(target), url],
    check=True,
)
took = time.perf_counter() - began
print(json.dumps({"s": took, "cpu": cpu() - c}))
os.unlink(target)
"""
)
PARALLEL = 16  # the parallel peers' connections (modelcache's default at most)
CHUNK = 2 * MiB  # curl --parallel's ranges (modelcache's default chunk)
CURL_FILE = "curl -o FILE (verifies nothing)"
PARALLEL_PEER = (
    f"curl --parallel, {PARALLEL} x {CHUNK // MiB} MiB ranges to /dev/null (verifies nothing)"
)


class ThreadSampler:
    """Every 5 ms, what each thread of this process is doing, from ``/proc/self/task``.

    A thread is *running* (state R), or waiting: on another thread (``futex``: a queue, a lock,
    the GIL), on the socket (``wait_woken``/``sk_wait_data``: no data yet), on the disk (state D),
    or elsewhere. Threads are grouped by name (``modelcache-1``... into ``modelcache-N``).
    """

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.interval = interval
        self.counts: dict[str, dict[str, int]] = {}
        #: per thread id: its group and its last ``schedstat`` (ns on a CPU, ns waiting for one)
        self.sched: dict[str, tuple[str, int, int]] = {}
        self._before: dict[str, tuple[int, int]] = {}
        self._span = (0.0, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        """Start sampling."""
        import time

        self._span = (time.monotonic(), 0.0)
        for tid in os.listdir("/proc/self/task"):  # threads already there: count from now
            with contextlib.suppress(OSError):
                ran, waited = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[:2]
                self._before[tid] = (int(ran), int(waited))
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        import time

        self._stop.set()
        self._thread.join()
        self._span = (self._span[0], time.monotonic())

    def _run(self) -> None:
        import threading

        own = str(threading.get_native_id())
        while not self._stop.wait(self.interval):
            names = {str(t.native_id): t.name for t in threading.enumerate()}
            for tid in os.listdir("/proc/self/task"):
                if tid == own:
                    continue
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
                    wchan = Path(f"/proc/self/task/{tid}/wchan").read_text().strip()
                    name = names.get(tid) or stat[stat.index("(") + 1 : stat.rindex(")")]
                    state = stat[stat.rindex(")") + 2]
                    group = _group(name)
                    what = _activity(state, wchan)
                    ran, waited = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[:2]
                    ran0, waited0 = self._before.get(tid, (0, 0))
                    self.sched[tid] = (group, int(ran) - ran0, int(waited) - waited0)
                    bucket = self.counts.setdefault(group, {})
                    bucket[what] = bucket.get(what, 0) + 1

    def summary(self) -> dict[str, dict[str, float]]:
        """Per thread group, the share of its samples in each activity (0-1), and from the
        scheduler's own account (``schedstat``) its time on a CPU and waiting for one, as
        shares of the sampled time (a thread in state R may be waiting for a CPU)."""
        out = {}
        for group, counts in self.counts.items():
            total = sum(counts.values())
            out[group] = {what: n / total for what, n in sorted(counts.items())}
        span = max(1e-9, self._span[1] - self._span[0]) * 1e9
        for group, ran, waited in self.sched.values():
            shares = out.setdefault(group, {})
            shares["on a CPU"] = shares.get("on a CPU", 0.0) + ran / span
            shares["waiting for a CPU"] = shares.get("waiting for a CPU", 0.0) + waited / span
        return out


def _group(name: str) -> str:
    stem = name.rstrip("0123456789")
    return f"{stem}N" if stem != name and stem.endswith("-") else name


def _activity(state: str, wchan: str) -> str:
    if state == "R":
        return "running"
    if state == "D":
        return "disk"
    if "futex" in wchan:
        return "waiting on a thread"
    if wchan in {"wait_woken", "sk_wait_data", "inet_csk_wait_for_connect"} or "sk_" in wchan:
        return "waiting on the socket"
    if "poll" in wchan or "select" in wchan or "epoll" in wchan:
        return "waiting on the socket"
    return f"other ({wchan or state})"


def _child(client: str, code: str, *argv: str) -> dict[str, Any]:
    env = dict(os.environ, MODELCACHE_PROGRESS="0")
    done = subprocess.run(
        ["ip", "netns", "exec", client, sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"a client failed in {client}:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def contenders(
    client: str, url: str, digest: str, work: Path, *, sample: bool = False, curl_only: bool = False
) -> dict[str, Callable[[], dict[str, Any]]]:
    """The clients, each a callable that fetches once and returns its figures (``curl_only``:
    modelcache and curl -o FILE)."""
    out = {
        "modelcache (sha256 included)": lambda: _child(
            client, MODELCACHE, url, digest, str(work / "mc"), "1" if sample else "0", str(HERE)
        ),
        CURL_FILE: lambda: _child(client, CURL, url, str(work / "curl.bin")),
    }
    if not curl_only:
        out["curl -o /dev/null (nothing written)"] = lambda: _child(client, CURL, url, os.devnull)
        out["requests + sha256 in the loop"] = lambda: _child(
            client, REQUESTS, url, str(work / "requests.bin")
        )
    return out


def parallel_peers(
    client: str, url: str, digest: str, size: int, work: Path
) -> dict[str, Callable[[], dict[str, Any]]]:
    """The peers that fetch ranges in parallel (aria2c only when it is installed)."""
    out = {
        PARALLEL_PEER: lambda: _child(
            client, PARALLEL_CURL, url, str(size), str(CHUNK), str(PARALLEL), str(work / "ranges")
        ),
    }
    if shutil.which("aria2c") is not None:
        out[f"aria2c -x {PARALLEL} (sha256 checked after)"] = lambda: _child(
            client, ARIA2C, url, str(work / "aria2c.bin"), digest, str(PARALLEL)
        )
    return out


def _rows(
    figure: str,
    title: str,
    measured: dict[str, list[dict[str, Any]]],
    size: int,
    link_mib_s: float,
    goal: str,
    suffix: str = "",
    against: tuple[str, str] = (CURL_FILE, "curl -o FILE"),
) -> list[dict[str, Any]]:
    """One row per contender; ``against``: the contender each round's speed is compared with,
    and its name in the column's title."""
    speed = {name: [size / MiB / m["s"] for m in ms] for name, ms in measured.items()}
    cpu = {name: [m["cpu"] / (size / 1024 / MiB) for m in ms] for name, ms in measured.items()}
    ours = "modelcache (sha256 included)"
    rows = []
    for name, values in speed.items():
        extra: dict[str, Any] = {
            "of the link": ratio(summarize(values).median, link_mib_s),
            f"vs {against[1]}, per round": summarize(
                [ratio(a, b) for a, b in zip(values, speed[against[0]], strict=True)]
            ).median,
            "client CPU s/GiB": summarize(cpu[name]).median,
        }
        if name == ours:
            extra["goal"] = goal
            extra["met"] = summarize(values).median / link_mib_s >= GOAL_OF_LINK
        rows.append(
            row(figure, name + suffix, values, unit="MiB/s", better="higher", title=title, **extra)
        )
    return rows


def _link_mib_s(gbit: float) -> float:
    return gbit * 1e9 / 8 / MiB


def _write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for _ in range(size // (8 * MiB) or 1):
            block = os.urandom(min(size, 8 * MiB))
            handle.write(block)
            digest.update(block)
    return digest.hexdigest()


def _merge_threads(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    merged: dict[str, dict[str, list[float]]] = {}
    for sample in samples:
        for group, shares in sample.get("threads", {}).items():
            for what, share in shares.items():
                merged.setdefault(group, {}).setdefault(what, []).append(share)
    return {
        group: {what: sum(v) / len(samples) for what, v in shares.items()}
        for group, shares in merged.items()
    }


def where_the_time_goes(threads: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per thread group: the share of its time running and waiting (percent)."""
    kinds = ["running", "waiting on the socket", "waiting on a thread", "disk"]
    scheduler = ["on a CPU", "waiting for a CPU"]
    rows = []
    for group, shares in sorted(threads.items()):
        other = 1 - sum(shares.get(k, 0.0) for k in kinds)
        cells = {f"{k} %": 100 * shares.get(k, 0.0) for k in kinds + scheduler}
        rows.append(
            {
                "figure": "link-threads",
                "name": group,
                "title": "Where the time goes at 8 Gbit/s: modelcache's threads, sampled every "
                "5 ms",
                **cells,
                "other %": 100 * max(0.0, other),
            }
        )
    if rows:
        rows[0]["note"] = (
            "Each thread's samples (state from /proc/self/task/*/stat, wait channel from .../wchan)"
            ": 'waiting on a thread' is a futex (a queue, a lock or the GIL); 'waiting on the "
            "socket' means no data had arrived; 'disk' is uninterruptible sleep (writeback). "
            "'on a CPU' and 'waiting for a CPU' are the scheduler's own account "
            "(/proc/self/task/*/schedstat) as shares of the fetch's time: 'running' samples "
            "include a runnable thread waiting for a CPU. Sampled in runs of their own (the "
            "sampler takes a share of a CPU), not in the timed rounds. MainThread waits for the "
            "workers while they fetch."
        )
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    """The link figures, or one row saying why they could not be measured here."""
    problem = why_not()
    ceiling = row(
        "link-sha256",
        "hashlib.sha256 in memory, one core",
        sha256_speed(64 * MiB if quick else 256 * MiB),
        unit="MiB/s",
        better="higher",
        title="SHA-256's own speed on this machine (the ceiling of a verifying client)",
    )
    if problem is not None:
        print(f"  bench_link: skipped: {problem}", file=sys.stderr, flush=True)
        ceiling["note"] = f"The link figures were not measured here: {problem}."
        return with_limits([ceiling], LIMITS)
    plan = QUICK if quick else FULL
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-link-", dir=os.environ.get("BENCH_TMP")) as d:
        work = Path(d)
        origin_dir = work / "origin"
        origin_dir.mkdir()
        digest = _write_random(origin_dir / "model.bin", plan["size"])
        capped_digest = _write_random(origin_dir / "capped.bin", plan["capped_size"])
        files = work / "client"
        files.mkdir()
        for gbit in LINKS_GBIT:
            with (
                link(gbit) as (origin, client, address),
                nginx(origin_dir, host=address, netns=origin) as base,
            ):
                url = f"{base}/model.bin"
                fetchers = contenders(client, url, digest, files)
                alternate(fetchers, 1)  # untimed: page cache, connections, imports
                measured = alternate(fetchers, plan["rounds"])
                if gbit == max(LINKS_GBIT):  # sampled apart: the sampler costs a CPU share
                    sampled = contenders(client, url, digest, files, sample=True)
                    ours = sampled["modelcache (sha256 included)"]
                    threads = _merge_threads([ours() for _ in range(max(1, plan["rounds"] // 2))])
            link_speed = _link_mib_s(gbit)
            rows += _rows(
                "link-rate",
                f"Fetching {plan['size'] // MiB} MiB over a veth link shaped by tbf",
                measured,
                plan["size"],
                link_speed,
                f">= {GOAL_OF_LINK}x the link ({gbit} Gbit/s = {link_speed:.0f} MiB/s; issue 16)",
                suffix=f" @ {gbit} Gbit/s",
            )
        with (
            link(2) as (origin, client, address),
            nginx(origin_dir, host=address, netns=origin, limit_rate=CAP) as base,
        ):
            url = f"{base}/capped.bin"
            fetchers = contenders(client, url, capped_digest, files, curl_only=True)
            fetchers |= parallel_peers(client, url, capped_digest, plan["capped_size"], files)
            measured = alternate(fetchers, max(1, plan["rounds"] - 2))
        capped = _rows(
            "link-capped",
            f"2 Gbit/s with every connection capped at {CAP // MiB} MiB/s "
            f"({plan['capped_size'] // MiB} MiB)",
            measured,
            plan["capped_size"],
            _link_mib_s(2),
            f">= {GOAL_OF_LINK}x the link when connections are capped (issue 16)",
            against=(PARALLEL_PEER, "curl --parallel"),
        )
        rows += capped
    rows += where_the_time_goes(threads)
    rows[0]["note"] = (
        "'of the link' is the median speed over the tbf rate (1 Gbit/s = 119.2 MiB/s); "
        "'client CPU s/GiB' is the CPU seconds of the client process, its threads and children "
        "per GiB (nginx's work is not in it). The origin and the client share this machine's 2 "
        "cores."
    )
    rows.append(ceiling)
    return with_limits(rows, LIMITS)


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=1))

"""A soak: 8 processes doing random get / unload / reload / prune / rm / verify on a few
models over HTTP and S3, while the harness SIGKILLs a random process every few seconds (and
starts it again) and the origins answer 500s and cut connections. First a cold start: every
process fetches every model once (the origins failing, nobody killed), which must cost each
file once per cache directory. Invariants are checked throughout (see ``test_soak``); a process
that crashes is one. The races the soak found are repeated on purpose by the focused tests at
the end.

``SOAK_SECONDS`` (default 15, CI) sets the length (``nox -s soak``: 60), ``SOAK_SEED`` the
seed and ``SOAK_REPORT`` a file for the figures (JSON). The harness's schedule of kills and
faults and each process's operations come from the seed, so a failing run prints the seed
that repeats it. Timing still varies between runs (what a kill interrupts), so a repeat is
close, not identical.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST, MiB, make_payload, sha, wait_for
from servers.proxy import FaultProxy
from servers.stores import S3Bucket

from modelcache import Cache
from modelcache.testing import ModelServer

pytest_plugins = ["servers.fixtures"]

PROCESSES = 8
CACHES = 2  # processes 0-3 share one cache directory, 4-7 the other
KILL_EVERY = (2.0, 4.0)  # seconds between SIGKILLs, drawn from the seed
FAULT_EVERY = (0.3, 0.8)  # seconds between origin faults
#: each process's operations, drawn with these weights: as many unloads as gets, so an entry is
#: often held by no process of its cache and `prune` / `rm` really evict (with fewer unloads
#: nearly every entry is always in use and eviction is rarely exercised)
OPS = ["get", "get", "unload", "unload", "reload", "prune", "rm", "verify"]

WORKER = r'''
import json, logging, os, random, sys, time
from pathlib import Path

import numpy
from safetensors.numpy import load_file

from modelcache import Cache, ModelCacheError, ModelHandle, TransferOptions
from modelcache._sources import Source

args = json.loads(sys.argv[1])
OPS = args["ops"]
rng = random.Random(args["seed"])
home = Path(args["home"])
options = TransferOptions(**args["options"])
cache = Cache(home, read_only_paths=[], offline=False, transfer=options)
models = args["models"]
originals = {m["name"]: load_file(m["original"]) for m in models}
handles = {
    m["name"]: ModelHandle(
        m["name"],
        source=m["url"],
        storage_options=m.get("storage_options"),
        cache=cache,
        loader=lambda path: load_file(str(path)),  # numpy: no torch import in 8 processes
    )
    for m in models
}
keys = {m["name"]: Source(m["url"]).key for m in models}


def say(**line):
    print(json.dumps(line), flush=True)


class Events(logging.Handler):
    """Every eviction this process makes (prune, rm), with when it was made, and every
    download it completes, with the file's size."""

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("evicted "):
            say(evicted=message.split()[1], t=time.time())
        elif message.startswith("downloaded "):
            say(downloaded=record.args[2])


logging.getLogger("modelcache").addHandler(Events())
logging.getLogger("modelcache").setLevel(logging.INFO)
held = {}  # models this process holds READY (it holds their entries' leases): their paths


def check_held():
    """An entry this process holds READY must stay where it was served from."""
    for name, path in held.items():
        if not os.path.exists(path):
            say(violation=f"{name}: held READY, but its entry's file {path} is gone", t=time.time())


if args["go"]:  # the first start: every model once, then wait for the others
    for name in rng.sample(list(handles), len(handles)):
        for attempt in range(5):  # the origins inject faults meanwhile
            try:
                handles[name].get(timeout=60)
                break
            except ModelCacheError:
                continue
        handles[name].unload()
    say(warm=True)
    while not os.path.exists(args["go"]):
        time.sleep(0.01)

while True:
    op = rng.choice(OPS)
    name = rng.choice(list(handles))
    handle = handles[name]
    try:
        if op == "get":
            state = handle.get(timeout=60)
            for key, tensor in originals[name].items():
                if not numpy.array_equal(state[key], tensor):
                    say(violation=f"{name}: tensor {key} differs from the original")
            status = handle.status()
            if name not in held:
                held[name] = status["path"]
                say(held=keys[name][:16], t=time.time())
        elif op == "unload":
            if name in held:
                del held[name]
                say(released=keys[name][:16], t=time.time())
            handle.unload()
        elif op == "reload":
            handle.reload()
        elif op == "prune":
            cache.prune(args["prune_to"])
        elif op == "rm":
            cache.remove(keys[name])
        elif op == "verify":
            problems = cache.verify()
            if problems:
                say(violation=f"verify: {problems}")
        say(op=op, ok=True)
    except (ModelCacheError, KeyError) as error:
        say(op=op, ok=False, error=type(error).__name__)
    check_held()
'''


def _save_model(path: Path, seed: int, mib: int) -> None:
    import numpy
    from safetensors.numpy import save_file

    generator = numpy.random.default_rng(seed)
    n = mib * MiB // 4 // 2
    save_file(
        {
            "a.weight": generator.standard_normal(n, dtype=numpy.float32),
            "b.weight": generator.standard_normal(n, dtype=numpy.float32),
        },
        str(path),
    )


class _Process:
    def __init__(
        self, index: int, command: list[str], log: list[dict[str, Any]], errors: Path
    ) -> None:
        self.index = index
        with errors.open("a") as stderr:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.reader = threading.Thread(target=self._read, args=(log,), daemon=True)
        self.reader.start()

    def _read(self, log: list[dict[str, Any]]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            item["process"] = self.index
            log.append(item)

    def kill(self, log: list[dict[str, Any]]) -> None:
        log.append({"process": self.index, "killed": True, "t": time.time()})
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _check_cache(home: Path) -> list[str]:
    """What the harness checks on disk: verify() is clean, no file at a final path is partial."""
    cache = Cache(home, read_only_paths=[], offline=True, transfer=FAST)
    problems = [f"verify: {p}" for p in cache.verify()]
    for meta in (home / "refs").glob("*/meta.json") if (home / "refs").is_dir() else []:
        try:
            record = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue  # evicted meanwhile
        for file in record["files"]:
            path = meta.parent / file["path"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue  # evicted meanwhile
            if size != file["size"]:
                problems.append(f"{path} has {size} bytes at its final path, not {file['size']}")
    return problems


def _evicted_while_held(log: list[dict[str, Any]], margin: float = 0.05) -> list[str]:
    """Evictions (by any process) of an entry that a process of the same cache held READY.

    A hold is counted from after ``get()`` returned until before ``unload()`` was called or the
    process was killed: inside the real hold, so an eviction found in it is a real one.
    """
    holds: list[tuple[int, int, str, float, float]] = []  # (cache, process, key, from, to)
    open_holds: dict[tuple[int, str], float] = {}
    for item in sorted(log, key=lambda i: i.get("t", 0.0)):
        process = item["process"]
        if "held" in item:
            open_holds[(process, item["held"])] = item["t"]
        elif "released" in item or "killed" in item:
            for (holder, key), since in list(open_holds.items()):
                if holder == process and item.get("released", key) == key:
                    cache = holder * CACHES // PROCESSES
                    holds.append((cache, holder, key, since, item["t"]))
                    del open_holds[(holder, key)]
    found = []
    for item in log:
        if "evicted" in item:
            cache = item["process"] * CACHES // PROCESSES
            for held_in, holder, key, since, until in holds:
                during = since + margin < item["t"] < until - margin
                if held_in == cache and key == item["evicted"] and during:
                    found.append(
                        f"process {item['process']} evicted {key} at {item['t']:.3f} while "
                        f"process {holder} held it READY ({since:.3f} to {until:.3f})"
                    )
    return found


@pytest.mark.slow
@pytest.mark.timeout(float(os.environ.get("SOAK_SECONDS", "15")) + 180)  # + cold start, teardown
def test_soak(
    tmp_path: Path,
    model_server: ModelServer,
    s3_bucket: S3Bucket,
    s3_proxy: FaultProxy,
) -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "15"))
    seed = int(os.environ.get("SOAK_SEED", str(random.randrange(1 << 30))))
    print(f"soak: seed {seed}, {seconds:.0f} s (SOAK_SEED={seed} repeats it)")
    # the kills and the faults each draw from their own generator, so the schedule of kills
    # (times from the end of the cold start, victims) is the same whatever the cold start took
    kill_rng, fault_rng = random.Random(f"{seed}-kills"), random.Random(f"{seed}-faults")
    models: list[dict[str, Any]] = []
    every_file = 0  # the bytes of the four files
    for n, mib in enumerate((2, 3, 4)):
        original = tmp_path / f"m{n}.safetensors"
        _save_model(original, seed + n, mib)
        url = model_server.add(original.name, original)
        models.append({"name": f"http{n}", "url": url, "original": str(original)})
        every_file += original.stat().st_size
    s3_original = tmp_path / "s3.safetensors"
    _save_model(s3_original, seed + 10, 3)
    every_file += s3_original.stat().st_size
    s3_url = s3_bucket.put("soak/model.safetensors", s3_original.read_bytes())
    models.append(
        {
            "name": "s3",
            "url": s3_url,
            "original": str(s3_original),
            "storage_options": s3_bucket.options(s3_proxy.url),
        }
    )
    largest = max(Path(m["original"]).stat().st_size for m in models)
    script = tmp_path / "soak_worker.py"
    script.write_text(WORKER)
    homes = [tmp_path / f"cache{c}" for c in range(CACHES)]
    options = {
        "retries": 8,
        "backoff": 0.02,
        "max_backoff": 0.2,
        "deadline": 20.0,
        "stall_timeout": 5.0,
        "connect_timeout": 5.0,
        "chunk_size": 512 * 1024,
    }
    log: list[dict[str, Any]] = []
    starts = Counter[int]()
    go = tmp_path / "go"

    def start(index: int) -> _Process:
        starts[index] += 1
        args = {
            "seed": seed * 1000 + index * 37 + starts[index],
            "home": str(homes[index * CACHES // PROCESSES]),
            "options": options,
            "models": models,
            "prune_to": 6 * MiB,
            "ops": OPS,
            "go": str(go) if starts[index] == 1 else None,
        }
        command = [sys.executable, str(script), json.dumps(args)]
        return _Process(index, command, log, tmp_path / f"worker{index}.stderr")

    def inject_fault() -> None:
        model = fault_rng.choice(models)
        if model["name"] == "s3":
            if fault_rng.random() < 0.5:
                s3_proxy.fail(times=1, status=500, match=lambda m, p: m == "GET")
            else:
                s3_proxy.cut(fault_rng.randrange(1, 2 * MiB), match=lambda m, p: m == "GET")
        else:
            name = Path(model["original"]).name
            if fault_rng.random() < 0.5:
                model_server.fail_next(name, 1, 500)
            else:
                model_server.cut_after(name, fault_rng.randrange(1, 2 * MiB))

    def served() -> int:
        return sum(model_server.bytes_sent.values()) + s3_proxy.bytes_sent

    processes = [start(i) for i in range(PROCESSES)]
    kills = faults = checks = 0
    victims: list[int] = []  # the same for one seed, run after run
    violations: list[str] = []

    def died() -> None:
        """A process that ended on its own (a crash) is a violation; it is started again."""
        for i, process in enumerate(processes):
            if process.proc.poll() is not None:
                errors = (tmp_path / f"worker{i}.stderr").read_text()[-2000:]
                violations.append(f"process {i} exited ({process.proc.returncode}): {errors}")
                process.kill(log)  # ends its holds
                processes[i] = start(i)

    try:
        # a cold start: every process fetches every model once while the origins fail (no kills)
        warm_by = time.monotonic() + 120
        next_fault = time.monotonic() + fault_rng.uniform(*FAULT_EVERY)
        while sum(1 for item in list(log) if "warm" in item) < PROCESSES:
            assert time.monotonic() < warm_by, f"seed {seed}: the cold start took over 120 s"
            if time.monotonic() >= next_fault:
                inject_fault()
                faults += 1
                next_fault = time.monotonic() + fault_rng.uniform(*FAULT_EVERY)
            died()
            assert violations == [], f"seed {seed}: {violations}"
            time.sleep(0.02)
        cold = served()
        go.touch()
        began = time.monotonic()
        next_kill = began + kill_rng.uniform(*KILL_EVERY)
        next_check = began + 1.0
        while time.monotonic() - began < seconds:
            now = time.monotonic()
            if now >= next_kill:
                victim = kill_rng.randrange(PROCESSES)
                victims.append(victim)
                processes[victim].kill(log)
                processes[victim] = start(victim)
                kills += 1
                next_kill = now + kill_rng.uniform(*KILL_EVERY)
            if now >= next_fault:
                inject_fault()
                faults += 1
                next_fault = now + fault_rng.uniform(*FAULT_EVERY)
            if now >= next_check:
                for home in homes:
                    violations += _check_cache(home)
                checks += 1
                next_check = now + 1.0
            died()
            time.sleep(0.02)
    finally:
        for process in processes:
            process.kill(log)
    total = served()
    s3_proxy.clear()
    for home in homes:
        violations += _check_cache(home)
    checks += 1
    violations += [item["violation"] for item in list(log) if "violation" in item]
    violations += _evicted_while_held(log)
    ops = Counter(item["op"] for item in log if "op" in item)
    done = Counter(item["op"] for item in log if item.get("ok"))
    # what the caches had to fetch: every file once per cache at the cold start, then again
    # after each eviction and each reload (a refresh fetches again); a download a kill cut
    # short is resumed by the next writer, so a kill wastes at most about a file
    needed = sum(item["downloaded"] for item in log if "downloaded" in item)
    allowed = 1.5 * needed + kills * largest
    evictions = sum(1 for item in log if "evicted" in item)
    figures = {
        "seed": seed,
        "seconds": seconds,
        "processes": PROCESSES,
        "kills": kills,
        "victims": victims,
        "faults": faults,
        "ops": dict(ops),
        "ops_ok": dict(done),
        "invariant_checks": checks,
        "held_checks": sum(1 for item in log if "op" in item),
        "cold_start_bytes": cold,
        "files_x_caches": every_file * CACHES,
        "bytes_served": total,
        "bytes_downloaded": needed,
        "downloads": sum(1 for item in log if "downloaded" in item),
        "evictions": evictions,
        "violations": len(violations),
    }
    print("soak figures:", json.dumps(figures))
    (tmp_path / "soak.json").write_text(json.dumps(figures))
    (tmp_path / "soak-log.json").write_text(json.dumps(log))
    if os.environ.get("SOAK_REPORT"):
        Path(os.environ["SOAK_REPORT"]).write_text(json.dumps(figures, indent=2))
    assert violations == [], f"seed {seed}: {violations[:10]}"
    assert cold <= 1.5 * every_file * CACHES, (
        f"seed {seed}: the cold start took {cold} bytes from the origins, over 1.5 x "
        f"{every_file * CACHES} (each file once per cache)"
    )
    assert kills >= seconds / KILL_EVERY[1] - 1, f"seed {seed}: only {kills} kills"
    assert done["get"] >= PROCESSES, f"seed {seed}: only {done['get']} gets succeeded: {ops}"
    assert evictions >= 1, f"seed {seed}: nothing was evicted, so eviction went untested"
    assert total <= allowed, (
        f"seed {seed}: {total} bytes served, over 1.5 x the {needed} bytes downloaded "
        f"(+ a file per kill)"
    )


# -- races the soak found, each repeated on purpose ----------------------------------------------

CHURN = r"""
import sys
from modelcache import Cache
home, urls = sys.argv[1], sys.argv[2:]
cache = Cache(home, read_only_paths=[], offline=False)
while True:
    for url in urls:
        key = cache.fetch_details(url).key
        Cache._leases.give_back_all()  # not in use: the next line evicts it
        cache.remove(key)
"""


def test_prune_and_entries_while_another_process_evicts(
    cache: Cache, model_server: ModelServer, tmp_path: Path
) -> None:
    """``prune`` and ``entries`` list the refs, then read when each was last used: a ref that
    another process evicts in between is skipped, not a ``FileNotFoundError`` (the soak's
    ``prune`` crashed on it)."""
    urls = [model_server.add(f"churn{n}.bin", make_payload(1000, n)) for n in range(8)]
    for url in urls:
        cache.fetch(url)
    Cache._leases.give_back_all()
    script = tmp_path / "churn.py"
    script.write_text(CHURN)
    churn = subprocess.Popen(
        [sys.executable, str(script), str(cache.path), *urls],
        stderr=subprocess.PIPE,
        text=True,
    )
    rounds = 0
    try:
        wait_for(lambda: model_server.requests["/churn7.bin"] >= 2, what="the churn")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and churn.poll() is None:
            cache.prune(1 << 40)  # evicts nothing, but lists and sorts every ref
            cache.entries()
            rounds += 1
        assert churn.poll() is None, f"the churning process died: {churn.communicate()[1]}"
    finally:
        churn.kill()
        churn.communicate()
    evicted = sum(model_server.requests.values()) - len(urls)
    assert rounds > 20, f"only {rounds} rounds of prune and entries"
    assert evicted > 20, f"the other process evicted only {evicted} times"


def test_an_entry_evicted_while_it_is_looked_up_is_a_miss_not_corruption(
    cache: Cache, model_server: ModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader that read an entry's ``meta.json`` just before another process evicted it
    finds its file gone: that is a miss, not a corrupt entry whose blob is deleted (the blob
    that another entry shares, so fetching the first again needs no download)."""
    data = make_payload(MiB, 3)
    one = model_server.add("one/w.bin", data)
    two = model_server.add("two/w.bin", data)
    key = cache.fetch_details(one, sha(data)).key
    cache.fetch(two, sha(data))  # a second entry of the same bytes: one blob
    store = cache._store()
    layer = store.writable()
    seen = layer.ref(key)  # a reader has read the entry's meta.json...
    assert seen is not None
    Cache._leases.give_back_all()
    cache.remove(key)  # ...when another process evicts it
    assert store.serve(layer, seen, one) is None
    assert "corrupt" not in caplog.text
    model_server.reset_counts()
    assert cache.fetch(one, sha(data)).read_bytes() == data
    assert model_server.count("one/w.bin") == (0, 0)  # made from the shared blob
    assert cache.verify() == []

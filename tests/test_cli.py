"""The ``modelcache`` command, run for real in subprocesses against ``model_server``.

Each test runs ``python -m modelcache ...`` or the installed ``modelcache`` script with a
temporary cache (``--cache DIR`` or ``MODELCACHE_HOME``) and checks what a user sees: the exit
status, stdout, stderr and the cache's contents.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import MiB, make_payload, part_frontier, sha, wait_for

from modelcache.cli import format_age, format_size, main, parse_size
from modelcache.testing import ModelServer

if TYPE_CHECKING:
    from servers.stores import S3Bucket

pytest_plugins = ["servers.fixtures"]

SCRIPT = Path(sys.executable).with_name("modelcache")


def modelcache(
    *args: str | os.PathLike[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    script: bool = False,
    python_flags: tuple[str, ...] = ("-m", "modelcache"),
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the command as a user would; returns the finished process (never raises on status)."""
    command = ([str(SCRIPT)] if script else [sys.executable, *python_flags]) + [
        os.fspath(a) for a in args
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def entries(cache: Path) -> list[dict[str, Any]]:
    listed = ok(modelcache("ls", "--json", "--cache", cache)).stdout
    return list(json.loads(listed))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def serve(model_server: ModelServer) -> Callable[..., tuple[str, bytes]]:
    """``serve(name, size, seed=0) -> (url, payload)``."""

    def add(name: str, size: int = 256 * 1024, seed: int = 0) -> tuple[str, bytes]:
        payload = make_payload(size, seed)
        return model_server.add(name, payload), payload

    return add


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10GB", 10 * 10**9),
        ("10gb", 10 * 10**9),
        ("1.5G", 1_500_000_000),
        ("512MiB", 512 * 2**20),
        ("2 GiB", 2 * 2**30),
        ("4096", 4096),
        ("0", 0),
        ("100kB", 100_000),
        ("1TiB", 2**40),
    ],
)
def test_sizes_take_decimal_and_binary_suffixes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "10XB", "-1GB", "ten", "1.2.3MB"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_sizes_and_ages_read_well() -> None:
    assert [format_size(n) for n in (0, 1023, 1024, 5 * MiB, 3 * 2**30 // 2)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 MiB",
        "1.5 GiB",
    ]
    now = 1_800_000_000.0
    ages = [format_age(now - s, now) for s in (2, 42, 300, 7200, 3 * 86400, 86400)]
    assert ages == ["just now", "42 s ago", "5 min ago", "2 h ago", "3 days ago", "1 day ago"]
    assert format_age(now - 400 * 86400, now)[:2] == "20"  # an old entry shows its date


# -- fetch SOURCE ---------------------------------------------------------------------------


def test_fetch_prints_the_cached_path_and_a_second_fetch_uses_no_network(
    home: Path, serve: Callable[..., tuple[str, bytes]], model_server: ModelServer
) -> None:
    url, payload = serve("weights.safetensors", 1 * MiB)
    first = ok(modelcache("fetch", url, "--cache", home))
    path = Path(first.stdout.strip())
    assert path.read_bytes() == payload
    assert path.is_relative_to(home)
    assert path.name == "weights.safetensors"
    assert "downloaded 1.0 MiB" in first.stderr
    assert url in first.stderr

    requests = model_server.count("weights.safetensors")[0]
    second = ok(modelcache("fetch", url, "--cache", home, script=True))
    assert Path(second.stdout.strip()) == path
    assert "already cached" in second.stderr
    assert model_server.count("weights.safetensors")[0] == requests


def test_fetch_json_and_sha256(home: Path, serve: Callable[..., tuple[str, bytes]]) -> None:
    url, payload = serve("m.bin")
    result = json.loads(
        ok(
            modelcache("fetch", url, "--sha256", sha(payload).upper(), "--cache", home, "--json")
        ).stdout
    )
    assert result["sha256"] == sha(payload)
    assert result["size"] == len(payload)
    assert result["cache_hit"] is False
    assert result["source"] == url
    assert Path(result["path"]).read_bytes() == payload


def test_fetch_with_a_wrong_sha256_fails_in_one_line_and_caches_nothing(
    home: Path, serve: Callable[..., tuple[str, bytes]]
) -> None:
    url, _ = serve("m.bin")
    result = modelcache("fetch", url, "--sha256", "0" * 64, "--cache", home)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("modelcache: error: ")
    assert "sha256 mismatch" in result.stderr
    assert url in result.stderr
    assert "Traceback" not in result.stderr
    assert entries(home) == []


def test_errors_never_show_credentials(home: Path, model_server: ModelServer) -> None:
    secret_url = model_server.url.replace("http://", "http://alice:s3cr3t-pw@")
    url = f"{secret_url}/missing.bin?token=abcd1234"
    result = modelcache("fetch", url, "--cache", home)
    assert result.returncode == 1
    assert "404" in result.stderr or "not found" in result.stderr.lower()
    assert "s3cr3t-pw" not in result.stderr
    assert "abcd1234" not in result.stderr
    assert "alice" not in result.stderr


def test_offline_fetch_names_the_command_that_preloads(
    home: Path, serve: Callable[..., tuple[str, bytes]], model_server: ModelServer
) -> None:
    url, _ = serve("m.bin")
    result = modelcache("fetch", url, "--cache", home, "--offline")
    assert result.returncode == 1
    assert f"modelcache fetch {url}" in result.stderr
    assert model_server.count("m.bin") == (0, 0)
    ok(modelcache("fetch", url, "--cache", home))
    ok(modelcache("fetch", url, "--offline", env={"MODELCACHE_HOME": str(home)}))


def test_a_local_path_is_used_in_place(home: Path, tmp_path: Path) -> None:
    local = tmp_path / "local.pt"
    local.write_bytes(make_payload(1000))
    result = ok(modelcache("fetch", local, "--sha256", sha(local.read_bytes()), "--cache", home))
    assert Path(result.stdout.strip()) == local
    assert "used in place" in result.stderr
    assert modelcache("fetch", local, "--sha256", "1" * 64, "--cache", home).returncode == 1


def test_progress_bar_on_a_terminal_only(
    home: Path, serve: Callable[..., tuple[str, bytes]], model_server: ModelServer
) -> None:
    url, _ = serve("slow.bin", 2 * MiB)
    model_server.set_rate("slow.bin", 4 * MiB)
    env = {**os.environ, "MODELCACHE_PROGRESS": ""}
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelcache", "fetch", url, "--cache", str(home)],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
        text=True,
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(30) == 0
    assert proc.stdout is not None
    assert Path(proc.stdout.read().strip()).is_file()
    proc.stdout.close()
    terminal = shown.decode()
    assert "slow.bin" in terminal
    assert "100%" in terminal
    assert "\r" in terminal

    other, _ = serve("piped.bin", 2 * MiB)
    model_server.set_rate("piped.bin", 4 * MiB)
    piped = ok(modelcache("fetch", other, "--cache", home, env={"MODELCACHE_PROGRESS": ""}))
    assert "%" not in piped.stderr
    assert "\r" not in piped.stderr


#: ``python -m modelcache`` with Ctrl-C raising KeyboardInterrupt, as in a terminal, even when
#: the tests run where SIGINT is ignored (a background job of a script ignores it, and a Python
#: started so keeps ignoring it)
AS_FROM_A_TERMINAL = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
from modelcache.cli import run
run()
"""


def test_interrupted_fetch_resumes(
    home: Path, serve: Callable[..., tuple[str, bytes]], model_server: ModelServer
) -> None:
    size = 4 * MiB
    url, payload = serve("big.bin", size)
    model_server.set_rate("big.bin", MiB)
    proc = subprocess.Popen(
        [sys.executable, "-c", AS_FROM_A_TERMINAL, "fetch", url, "--cache", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: part_frontier(home) >= MiB, what="a first MiB on disk")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err
    assert out == ""
    assert part_frontier(home) < size  # it stopped: the download did not run on to its end

    model_server.set_rate("big.bin", None)
    sent_before = model_server.count("big.bin")[1]
    result = ok(modelcache("fetch", url, "--cache", home))
    assert Path(result.stdout.strip()).read_bytes() == payload
    assert model_server.count("big.bin")[1] - sent_before <= size - MiB


# -- fetch --registry -----------------------------------------------------------------------

#: runs the command like ``python -m modelcache``, then reports the modules it imported
REPORT_MODULES = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps({"modules": sorted(sys.modules)}), file=sys.stderr))
from modelcache.cli import main
sys.exit(main())
"""

APP = """
import os
from pathlib import Path
from modelcache import ModelHandle, Registry

ORIGIN = os.environ["MODEL_ORIGIN"]
LOADS = Path(os.environ["LOAD_MARKER"])

def loader(path):
    LOADS.write_text(str(path))
    import torch  # a real loader imports torch; the CLI must never get here
    return torch.load(path)

registry = Registry([
    ModelHandle("classifier", source=f"{ORIGIN}/classifier.bin", loader=loader, strategy="eager"),
    ModelHandle("embedder", source=f"{ORIGIN}/embedder.bin", loader=loader,
                strategy="background", required=False),
])
registry.start()  # an app may start its models at import: the CLI must still load nothing

def make_registry():
    return Registry([ModelHandle("tagger", source=f"{ORIGIN}/tagger.bin", loader=loader)])

single = ModelHandle("single", source=f"{ORIGIN}/classifier.bin", loader=loader)
not_models = 42
"""


@pytest.fixture
def app(
    tmp_path: Path, serve: Callable[..., tuple[str, bytes]], model_server: ModelServer
) -> dict[str, Any]:
    """An app package ``shop`` whose ``shop.models`` holds a Registry of model_server URLs."""
    root = tmp_path / "app"
    (root / "shop").mkdir(parents=True)
    (root / "shop" / "__init__.py").write_text("")
    (root / "shop" / "models.py").write_text(APP)
    payloads = {
        name: serve(f"{name}.bin", (i + 1) * 100_000, i)[1]
        for i, name in enumerate(["classifier", "embedder", "tagger"])
    }
    marker = tmp_path / "loaded"
    env = {"MODEL_ORIGIN": model_server.url, "LOAD_MARKER": str(marker)}
    return {"root": root, "env": env, "marker": marker, "payloads": payloads}


def preload(app: dict[str, Any], spec: str, *args: str | Path, **kwargs: Any) -> Any:
    """``modelcache fetch --registry SPEC ARGS...`` run from the app's directory."""
    kwargs.setdefault("cwd", app["root"])
    kwargs["env"] = {**app["env"], **kwargs.get("env", {})}
    return modelcache("fetch", "--registry", spec, *args, **kwargs)


def test_fetch_registry_preloads_every_handle_without_loading_or_importing_torch(
    home: Path, app: dict[str, Any], model_server: ModelServer
) -> None:
    result = ok(
        preload(app, "shop.models:registry", "--cache", home, python_flags=("-c", REPORT_MODULES))
    )
    assert not app["marker"].exists(), "a model was loaded"
    modules = set(json.loads(result.stderr.splitlines()[-1])["modules"])
    assert {"modelcache.cli", "shop.models"} <= modules
    assert not {"torch", "safetensors", "numpy"} & modules

    lines = result.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "RESULT", "SIZE", "PATH"]
    assert lines[1].split()[:2] == ["classifier", "downloaded"]
    assert lines[2].split()[:2] == ["embedder", "downloaded"]
    cached = {Path(e["path"]).name: Path(e["path"]).read_bytes() for e in entries(home)}
    assert cached == {
        "classifier.bin": app["payloads"]["classifier"],
        "embedder.bin": app["payloads"]["embedder"],
    }

    model_server.reset_counts()
    again = ok(preload(app, "shop.models:registry", "--cache", home, "--json", script=True))
    report = json.loads(again.stdout)
    assert [(m["name"], m["cache_hit"], m["error"]) for m in report] == [
        ("classifier", True, None),
        ("embedder", True, None),
    ]
    assert all(Path(m["path"]).is_file() for m in report)
    assert model_server.requests == {}


def test_fetch_registry_follows_modelcache_home_and_app_dir(
    home: Path, app: dict[str, Any], tmp_path: Path
) -> None:
    env = {"MODELCACHE_HOME": str(home)}
    result = ok(
        preload(app, "shop.models:make_registry", "--app-dir", app["root"], env=env, cwd=tmp_path)
    )
    assert "tagger" in result.stdout
    assert [Path(e["path"]).name for e in entries(home)] == ["tagger.bin"]
    ok(preload(app, "shop.models:single", "--app-dir", app["root"], "-q", env=env, cwd=tmp_path))
    assert len(entries(home)) == 2


def test_fetch_registry_offline_checks_a_preloaded_cache(
    home: Path, app: dict[str, Any], model_server: ModelServer
) -> None:
    missing = preload(app, "shop.models:registry", "--cache", home, "--offline")
    assert missing.returncode == 1
    assert "classifier" in missing.stderr
    assert "modelcache fetch" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert model_server.requests == {}

    ok(preload(app, "shop.models:registry", "--cache", home))
    model_server.reset_counts()
    ok(preload(app, "shop.models:registry", "--cache", home, "--offline"))
    assert model_server.requests == {}


def test_fetch_registry_failures(
    home: Path, app: dict[str, Any], model_server: ModelServer
) -> None:
    model_server.remove("embedder.bin")  # optional: a warning, exit 0
    result = ok(preload(app, "shop.models:registry", "--cache", home))
    assert "warning (optional model)" in result.stderr
    assert "embedder" in result.stderr
    assert "FAILED" in result.stdout

    model_server.remove("classifier.bin")  # required: exit 1
    shutil.rmtree(home)
    result = preload(app, "shop.models:registry", "--cache", home)
    assert result.returncode == 1
    assert "model 'classifier'" in result.stderr
    assert "classifier.bin" in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "modelcache: error: 1 of 2 models could not be pre-loaded"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("spec", "status", "message"),
    [
        ("shop.models", 2, "expects MODULE:ATTR"),
        ("shop.nothere:registry", 1, "cannot import 'shop.nothere'"),
        ("shop.models:nothere", 1, "has no attribute 'nothere'"),
        ("shop.models:not_models", 1, "is a int; expected a Registry"),
    ],
)
def test_fetch_registry_bad_targets(
    home: Path, app: dict[str, Any], spec: str, status: int, message: str
) -> None:
    result = preload(app, spec, "--cache", home)
    assert result.returncode == status
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_app_that_crashes_on_import_shows_its_traceback(home: Path, app: dict[str, Any]) -> None:
    (app["root"] / "shop" / "broken.py").write_text("raise RuntimeError('bad config: no DB_URL')\n")
    result = preload(app, "shop.broken:registry", "--cache", home)
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "bad config: no DB_URL" in result.stderr
    assert result.stderr.splitlines()[-1] == "modelcache: error: importing 'shop.broken' failed"


# -- ls -------------------------------------------------------------------------------------


def test_ls_shows_an_aligned_table_and_json(
    home: Path, serve: Callable[..., tuple[str, bytes]]
) -> None:
    assert ok(modelcache("ls", "--cache", home)).stdout == ""
    a, _ = serve("alpha.safetensors", 3 * MiB)
    b, _ = serve("b.pt", 2000)
    ok(modelcache("fetch", a, "--cache", home))
    ok(modelcache("fetch", b, "--cache", home))

    result = ok(modelcache("ls", "--cache", home))
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KEY", "SIZE", "LAST", "USED", "SOURCE"]
    rows = {line.split()[-1]: line for line in lines[1:]}
    assert set(rows) == {a, b}
    assert "3.0 MiB" in rows[a]
    assert "2.0 KiB" in rows[b]
    assert "just now" in rows[a]
    columns = {line.index("SOURCE") if "SOURCE" in line else line.index("http") for line in lines}
    assert len(columns) == 1  # the columns line up
    assert "2 entries, 3.0 MiB" in result.stderr

    listed = entries(home)
    assert {e["source"] for e in listed} == {a, b}
    assert set(listed[0]) >= {"key", "source", "path", "size", "sha256", "last_used"}
    keys = ok(modelcache("ls", "-q", env={"MODELCACHE_HOME": str(home)})).stdout.split()
    assert sorted(keys) == sorted(e["key"] for e in listed)


def test_ls_marks_entries_of_a_read_only_layer(
    home: Path, tmp_path: Path, serve: Callable[..., tuple[str, bytes]]
) -> None:
    baked = tmp_path / "baked"
    url, _ = serve("baked.bin")
    ok(modelcache("fetch", url, "--cache", baked))
    result = ok(modelcache("ls", "--cache", home, env={"MODELCACHE_READ_ONLY_PATHS": str(baked)}))
    assert result.stdout.splitlines()[0].split() == [
        "KEY",
        "SIZE",
        "LAST",
        "USED",
        "LAYER",
        "SOURCE",
    ]
    assert "read-only" in result.stdout.splitlines()[1]


# -- verify ---------------------------------------------------------------------------------


def test_verify_finds_a_flipped_byte_and_rm_clears_it(
    home: Path, serve: Callable[..., tuple[str, bytes]]
) -> None:
    good, _ = serve("good.bin")
    bad, _ = serve("bad.bin", seed=1)
    ok(modelcache("fetch", good, "--cache", home))
    path = Path(ok(modelcache("fetch", bad, "--cache", home)).stdout.strip())
    last_used = {e["key"]: e["last_used"] for e in entries(home)}
    assert ok(modelcache("verify", "--cache", home)).stderr.strip() == (
        "2 entries verified, 0 corrupt"
    )
    assert json.loads(ok(modelcache("verify", "--json", "--cache", home)).stdout) == []
    # re-hashing is not a use: the LRU order that prune follows stays as it was
    assert {e["key"]: e["last_used"] for e in entries(home)} == last_used

    with open(path, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    key = path.parent.name

    human = modelcache("verify", "--cache", home)
    assert human.returncode == 1
    statuses = {line.split()[0]: line.split()[1] for line in human.stdout.splitlines()[1:]}
    assert statuses[key[:12]] == "CORRUPT"
    assert list(statuses.values()).count("ok") == 1
    assert "1 corrupt entry" in human.stderr
    assert "modelcache rm" in human.stderr

    machine = modelcache("verify", "--json", "--cache", home)
    assert machine.returncode == 1
    problems = json.loads(machine.stdout)
    assert len(problems) == 1
    assert problems[0]["key"] == key
    assert "sha256" in problems[0]["problem"]
    assert problems[0]["source"] == bad

    ok(modelcache("rm", key[:10], "--cache", home))
    assert ok(modelcache("verify", "--cache", home)).returncode == 0
    assert [e["source"] for e in entries(home)] == [good]


# -- rm -------------------------------------------------------------------------------------


def test_rm_by_prefix_and_its_failures(home: Path, serve: Callable[..., tuple[str, bytes]]) -> None:
    # two entries whose sha256s start alike, to make a prefix ambiguous
    first = make_payload(1000, 0)
    seed = 1
    while sha(make_payload(1000, seed))[0] != sha(first)[0]:
        seed += 1
    second = make_payload(1000, seed)
    keep, _ = serve("keep.bin")
    ok(modelcache("fetch", keep, "--cache", home))
    for name, data in (("one.bin", first), ("two.bin", second)):
        url = serve(name, 1000, 0 if data is first else seed)[0]
        ok(modelcache("fetch", url, "--sha256", sha(data), "--cache", home))

    ambiguous = modelcache("rm", sha(first)[0], "--cache", home)
    assert ambiguous.returncode == 1
    assert "give more of the key" in ambiguous.stderr
    unknown = modelcache("rm", "nope", "--cache", home)
    assert unknown.returncode == 1
    assert "no entry 'nope'" in unknown.stderr
    assert len(entries(home)) == 3

    removed = json.loads(
        ok(modelcache("rm", sha(first)[:8], sha(second), "--cache", home, "--json")).stdout
    )
    assert {e["sha256"] for e in removed} == {sha(first), sha(second)}
    assert [e["source"] for e in entries(home)] == [keep]
    assert modelcache("rm", "--cache", home).returncode == 2


def test_rm_refuses_an_entry_another_process_uses(
    home: Path,
    serve: Callable[..., tuple[str, bytes]],
    spawn: Callable[..., Any],
    tmp_path: Path,
) -> None:
    url, _ = serve("held.bin")
    holding = tmp_path / "holding"
    worker = spawn(home, url, hold=str(holding))
    assert "path" in worker.result()
    wait_for(holding.exists, what="the worker to hold the entry")
    key = entries(home)[0]["key"]
    refused = modelcache("rm", key, "--cache", home)
    assert refused.returncode == 1
    assert "in use by a running process" in refused.stderr
    worker.kill()
    ok(modelcache("rm", key, "--cache", home))
    assert entries(home) == []


# -- prune ----------------------------------------------------------------------------------


def _fetch_in_order(
    home: Path, serve: Callable[..., tuple[str, bytes]], names: list[str]
) -> dict[str, str]:
    urls = {}
    for i, name in enumerate(names):
        urls[name] = serve(name, MiB, i)[0]
        ok(modelcache("fetch", urls[name], "--cache", home))
        time.sleep(0.02)
    return urls


def test_prune_evicts_least_recently_used_first(
    home: Path, serve: Callable[..., tuple[str, bytes]]
) -> None:
    urls = _fetch_in_order(home, serve, ["a.bin", "b.bin", "c.bin"])
    time.sleep(0.02)
    ok(modelcache("fetch", urls["a.bin"], "--cache", home))  # a is now the most recent

    result = ok(modelcache("prune", "--max-size", "2MiB", "--cache", home))
    assert "evicted 1 entry" in result.stderr
    assert urls["b.bin"] in result.stderr
    assert {e["source"] for e in entries(home)} == {urls["a.bin"], urls["c.bin"]}

    report = json.loads(
        ok(modelcache("prune", "--max-size", "1.5MB", "--cache", home, "--json")).stdout
    )
    assert [e["source"] for e in report["evicted"]] == [urls["c.bin"]]
    assert report["size"] == MiB
    assert report["max_size"] == 1_500_000
    assert ok(modelcache("prune", "--max-size", "10GB", "--cache", home)).stderr.startswith(
        "evicted 0 entries"
    )


def test_prune_never_evicts_an_entry_a_running_process_holds(
    home: Path,
    serve: Callable[..., tuple[str, bytes]],
    spawn: Callable[..., Any],
    tmp_path: Path,
) -> None:
    urls = _fetch_in_order(home, serve, ["old.bin", "new.bin"])
    holding = tmp_path / "holding"
    worker = spawn(home, urls["old.bin"], hold=str(holding))  # old is the LRU one, but in use
    assert worker.result()["cache_hit"] is True
    wait_for(holding.exists, what="the worker to hold the entry")
    # (the worker's hit refreshed old's last use; age it again so LRU would pick it first)
    old = next(e for e in entries(home) if e["source"] == urls["old.bin"])
    past = time.time() - 3600
    os.utime(Path(old["path"]).parent / "meta.json", (past, past))

    result = ok(modelcache("prune", "--max-size", "0", "--cache", home))
    assert [e["source"] for e in entries(home)] == [urls["old.bin"]]
    assert "in use by running processes were kept" in result.stderr
    assert Path(old["path"]).stat().st_size == MiB

    worker.kill()
    ok(modelcache("prune", "--max-size", "0", "--cache", home))
    assert entries(home) == []


def test_prune_leaves_a_download_in_progress_alone(
    home: Path, serve: Callable[..., tuple[str, bytes]], model_server: ModelServer
) -> None:
    stale = serve("stale.bin", MiB, 1)[0]
    ok(modelcache("fetch", stale, "--cache", home))
    url, payload = serve("incoming.bin", 3 * MiB)
    model_server.set_rate("incoming.bin", 2 * MiB)
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelcache", "fetch", url, "--cache", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: any(home.glob(".tmp/*.part")), what="the download to start writing")
        proc.send_signal(signal.SIGSTOP)  # the writer is alive but holds still while prune runs
        try:
            pruned = ok(modelcache("prune", "--max-size", "0", "--cache", home))
        finally:
            proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "evicted 1 entry" in pruned.stderr
    assert stale in pruned.stderr
    assert proc.returncode == 0, err
    assert Path(out.strip()).read_bytes() == payload
    assert [e["source"] for e in entries(home)] == [url]
    ok(modelcache("verify", "--cache", home))


# -- usage ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["fetch"],
        ["fetch", "http://x/y.bin", "--registry", "a.b:c"],
        ["fetch", "http://x/y.bin", "--sha256", "abc"],
        ["fetch", "--registry", "a.b:c", "--sha256", "0" * 64],
        ["fetch", "http://x/y.bin", "-o", "novalue"],
        ["prune"],
        ["prune", "--max-size", "lots"],
        ["rm"],
        ["mirror", "http://x/y.bin"],
        ["ls", "--no-such-flag"],
    ],
)
def test_bad_usage_exits_2(args: list[str], home: Path) -> None:
    result = modelcache(*args)
    assert result.returncode == 2
    assert "usage: modelcache" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    top = ok(modelcache("--help", script=True)).stdout
    assert ok(modelcache("--version")).stdout.startswith("modelcache ")
    for command in ("fetch", "ls", "verify", "rm", "prune", "mirror"):
        assert command in top
        with pytest.raises(SystemExit) as exited:  # in-process: the same parser, faster
            main([command, "--help"])
        assert exited.value.code == 0
        assert "--cache DIR" in capsys.readouterr().out


def test_an_unwritable_cache_is_a_clear_failure(
    tmp_path: Path, serve: Callable[..., tuple[str, bytes]]
) -> None:
    url, _ = serve("m.bin")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = modelcache("fetch", url, "--cache", not_a_dir / "cache")
    assert result.returncode == 1
    assert result.stderr.startswith("modelcache: error: ")
    assert "Traceback" not in result.stderr


# -- mirror ---------------------------------------------------------------------------------


def test_mirror_copies_a_model_to_a_volume_with_its_sha256(
    home: Path, tmp_path: Path, serve: Callable[..., tuple[str, bytes]], model_server: ModelServer
) -> None:
    url, payload = serve("sharp.pt", MiB)
    volume = tmp_path / "volume"  # created by the command: "DIR/" means into DIR
    result = ok(modelcache("mirror", url, f"{volume}/", "--cache", home))
    copy = volume / "sharp.pt"
    assert Path(result.stdout.strip()) == copy
    assert copy.read_bytes() == payload
    assert (volume / "sharp.pt.sha256").read_text().split()[0] == sha(payload)
    assert "1 of 1 file copied" in result.stderr
    assert sha(payload) in result.stderr
    assert [e["source"] for e in entries(home)] == [url]  # it passed through --cache

    model_server.reset_counts()
    again = json.loads(ok(modelcache("mirror", url, copy, "--cache", home, "--json")).stdout)
    assert again["copied"] == 0
    assert again["sha256"] == sha(payload)
    assert again["size"] == MiB
    assert model_server.requests == {}

    from_local = tmp_path / "elsewhere.pt"
    ok(
        modelcache(
            "mirror", f"file://{copy}", from_local, "--sha256", sha(payload), "--cache", home
        )
    )
    assert from_local.read_bytes() == payload


def test_mirror_to_a_bucket_then_fetch_from_it(
    home: Path, tmp_path: Path, serve: Callable[..., tuple[str, bytes]], s3_bucket: S3Bucket
) -> None:
    url, payload = serve("sharp.pt", MiB)
    options = [f"{k}={v}" for k, v in s3_bucket.options().items()]
    dest_args = [arg for option in options for arg in ("--dest-option", option)]
    result = ok(
        modelcache("mirror", url, f"s3://{s3_bucket.name}/models/", *dest_args, "--cache", home)
    )
    copy = f"s3://{s3_bucket.name}/models/sharp.pt"
    assert result.stdout.strip() == copy
    assert s3_bucket.get("models/sharp.pt") == payload
    assert s3_bucket.head("models/sharp.pt")["Metadata"]["sha256"] == sha(payload)

    source_args = [arg for option in options for arg in ("-o", option)]
    fresh = tmp_path / "fresh"
    fetched = json.loads(
        ok(
            modelcache(
                "fetch", copy, *source_args, "--sha256", sha(payload), "--cache", fresh, "--json"
            )
        ).stdout
    )
    assert fetched["cache_hit"] is False
    assert Path(fetched["path"]).read_bytes() == payload
    secret = s3_bucket.options()["secret"]
    missing = modelcache(
        "fetch", f"s3://{s3_bucket.name}/models/nope.pt", *source_args, "--cache", fresh
    )
    assert missing.returncode == 1
    assert "nope.pt" in missing.stderr
    for shown in (result, missing):
        assert secret not in shown.stdout + shown.stderr


def test_mirror_failures_copy_nothing(
    home: Path, tmp_path: Path, serve: Callable[..., tuple[str, bytes]]
) -> None:
    url, _ = serve("m.bin")
    dest = tmp_path / "copy.bin"
    wrong = modelcache("mirror", url, dest, "--sha256", "0" * 64, "--cache", home)
    assert wrong.returncode == 1
    assert "sha256 mismatch" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    missing = modelcache("mirror", url.replace("m.bin", "gone.bin"), dest, "--cache", home)
    assert missing.returncode == 1
    assert "gone.bin" in missing.stderr
    assert not dest.exists()


# -- the docs page --------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
DOCS_ORIGIN = "https://models.example.com/v1"


def _blocks(language: str) -> list[str]:
    text = (ROOT / "docs" / "cli.md").read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def _rebase(command: str, root: Path) -> str:
    """Absolute paths in a command (``/mnt/models``) moved under ``root``; URLs untouched."""
    return re.sub(r"(?<![\w:/.])/(?=[A-Za-z])", f"{root}/", command)


def test_every_command_of_the_docs_page_runs(tmp_path: Path, model_server: ModelServer) -> None:
    payloads = {
        "tagger.pt": (256 * 1024, 1),
        "classifier.safetensors": (256 * 1024, 2),
        "embedder.safetensors": (512 * 1024, 3),
    }
    for name, (size, seed) in payloads.items():
        model_server.add(f"v1/{name}", make_payload(size, seed))
    origin = f"{model_server.url}/v1"
    context = tmp_path / "srv"
    shutil.copytree(
        ROOT / "examples" / "docker", context, ignore=shutil.ignore_patterns("__pycache__")
    )
    env = {
        **os.environ,
        "MODELCACHE_HOME": str(tmp_path / "home"),
        "MODEL_ORIGIN": origin,
        "PATH": f"{SCRIPT.parent}{os.pathsep}{os.environ['PATH']}",
    }
    commands = [
        line[2:]
        for block in _blocks("console")
        for line in block.splitlines()
        if line.startswith("$ ")
    ]
    assert len(commands) >= 10
    for command in commands:
        runnable = _rebase(command.replace(DOCS_ORIGIN, origin), tmp_path / "fs")
        result = subprocess.run(
            ["sh", "-c", runnable],
            cwd=context,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"$ {command}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "fs" / "mnt" / "models" / "tagger.pt").is_file()


def test_the_docs_page_quotes_the_docker_example_as_it_is() -> None:
    quoted = {
        "dockerfile": (ROOT / "examples" / "docker" / "Dockerfile").read_text(),
        "python": (ROOT / "examples" / "docker" / "app" / "models.py").read_text(),
    }
    for language, source in quoted.items():
        blocks = _blocks(language)
        assert blocks
        for block in blocks:
            for line in block.splitlines():
                if line.strip() and not line.startswith("#"):
                    assert line in source.splitlines(), (
                        f"{language}: {line!r} is not in the example"
                    )

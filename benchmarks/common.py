"""Shared helpers for the benchmarks: rounds, statistics, rows, processes, servers, the machine.

Every ``benchmarks/bench_*.py`` exposes ``run(quick: bool) -> list[dict]``: flat,
JSON-serialisable rows that ``benchmarks/run.py`` turns into ``docs/benchmarks.md``. Rows that
share a ``figure`` make one table and one plot. Keys ``run.py`` understands (all optional except
``figure`` and ``name``; any other key becomes a column):

- ``figure``: the table the row belongs to (a short slug, ``"fetch-http"``)
- ``title``: the figure's heading; ``name``: the contender (the row's label)
- ``median``, ``low``, ``high``, ``n``, ``unit``: the measured value and its spread (what
  :func:`row` fills in from the raw values); ``better``: ``"lower"`` or ``"higher"``
- ``goal``: the goal from the issues this row is judged by; ``met``: ``True``/``False``
- ``note``: a remark shown under the table

Measure contenders side by side, rounds alternating (:func:`alternate`), and state claims as
ratios of medians taken in the same run (:func:`ratio`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "NET_CODE",
    "MiB",
    "ProcessResult",
    "RunningProcess",
    "Stats",
    "alternate",
    "checkpoint_shape",
    "drop_from_page_cache",
    "free_port",
    "http_origin",
    "human_bytes",
    "machine",
    "nginx",
    "pss",
    "python",
    "ratio",
    "row",
    "run_process",
    "sha256_file",
    "sha256_speed",
    "spawn",
    "summarize",
    "timed",
    "vm_hwm",
    "write_checkpoint",
]

MiB = 1 << 20
T = TypeVar("T")


# -- statistics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """A sample's median and spread (min, max and the quartiles)."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    n: int

    @property
    def spread(self) -> float:
        """``(max - min) / median``: the relative spread of the rounds (0 for one round)."""
        return (self.high - self.low) / self.median if self.median else 0.0


def summarize(values: Sequence[float]) -> Stats:
    """Median, min, max and quartiles of ``values`` (at least one)."""
    if not values:
        raise ValueError("no values to summarize")
    data = sorted(float(v) for v in values)
    if len(data) > 1:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    else:
        q1 = q3 = data[0]
    return Stats(statistics.median(data), data[0], data[-1], q1, q3, len(data))


def ratio(a: float, b: float) -> float:
    """``a / b``, or ``inf`` when ``b`` is zero."""
    return a / b if b else float("inf")


def row(
    figure: str,
    name: str,
    values: Sequence[float],
    *,
    unit: str,
    better: str = "lower",
    **extra: Any,
) -> dict[str, Any]:
    """A result row: ``name``'s median, min and max of ``values`` in ``unit``, plus ``extra``."""
    s = summarize(values)
    return {
        "figure": figure,
        "name": name,
        "median": s.median,
        "low": s.low,
        "high": s.high,
        "n": s.n,
        "unit": unit,
        "better": better,
        **extra,
    }


def with_limits(rows: list[dict[str, Any]], limits: dict[str, str]) -> list[dict[str, Any]]:
    """Put each figure's "what limits this figure" line (``limits[figure]``) on its first row,
    for the report to print under the figure's table."""
    for figure, text in limits.items():
        first = next((r for r in rows if r.get("figure") == figure), None)
        if first is not None:
            first["limits"] = text
    return rows


#: what limits SHA-256's own speed, under each table of it
SHA256_LIMITS = (
    "one core: hashlib's SHA-256 (OpenSSL) cannot split one file's hash between cores, so "
    "this is the ceiling of any client that verifies a file as it arrives."
)


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` took (monotonic clock)."""
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def alternate(
    contenders: Mapping[str, Callable[[], T]],
    rounds: int,
    *,
    before: Callable[[str], None] | None = None,
) -> dict[str, list[T]]:
    """Run every contender once per round, the order rotated each round; their results by name.

    Each callable measures itself and returns its value (seconds, bytes, a dict...): rotating
    the order keeps "always first" or "always after X" from favouring one contender.
    ``before(name)`` runs untimed before each call (clear a cache, drop pages...).
    """
    names = list(contenders)
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if before is not None:
                before(name)
            results[name].append(contenders[name]())
    return results


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


# -- memory -----------------------------------------------------------------------------------


def _status_kib(path: str, field_name: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"{field_name} not in {path}")


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set size (``VmHWM``) of a live process, in bytes; Linux only.

    A child process can print its own at the end (``vm_hwm()``): unlike ``ru_maxrss`` from
    ``wait4``, it never includes the parent's memory copied at fork.
    """
    return _status_kib(f"/proc/{pid}/status", "VmHWM")


def pss(pid: int | str = "self") -> int:
    """Proportional set size of a live process (``/proc/<pid>/smaps_rollup``), in bytes.

    Pages shared by N processes count 1/N in each: the sum over workers is what they cost.
    """
    return _status_kib(f"/proc/{pid}/smaps_rollup", "Pss")


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to evict ``path``'s pages (``posix_fadvise DONTNEED``): a cold read next."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- processes --------------------------------------------------------------------------------

# ``ru_maxrss`` of a child counts the memory of the process it was forked from (the kernel keeps
# the larger of the old and the new image at exec), so the child is started by a small parent of
# its own: GNU time when installed (~1 MiB floor), else a bare Python (~8 MiB floor).
_WRAPPER = (
    "import os,sys\n"
    "pid=os.posix_spawn(sys.argv[2],sys.argv[2:],os.environ)\n"
    "_,st,ru=os.wait4(pid,0)\n"
    "open(sys.argv[1],'w').write(str(ru.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(st) % 256)\n"
)


def _measured_argv(args: Sequence[str], report: Path) -> list[str]:
    program = shutil.which(args[0]) or args[0]
    gnu_time = Path("/usr/bin/time")
    if gnu_time.exists():
        return [str(gnu_time), "-q", "-f", "%M", "-o", str(report), program, *args[1:]]
    return [sys.executable, "-S", "-I", "-c", _WRAPPER, str(report), program, *args[1:]]


@dataclass
class ProcessResult:
    """What a finished process did: exit status, output, wall time and peak memory."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    """Seconds from start to exit."""
    ready_s: float | None
    """Seconds from start to the first stdout line starting with the ready marker."""
    peak_rss: int | None
    """Peak resident set size in bytes (``ru_maxrss`` through a small parent), when known."""
    lines: list[str] = field(default_factory=list)

    def check(self) -> ProcessResult:
        """Raise ``RuntimeError`` with the output when the process failed; else ``self``."""
        if self.returncode != 0:
            raise RuntimeError(
                f"benchmark process exited {self.returncode}:\n{self.stdout[-2000:]}\n"
                f"{self.stderr[-4000:]}"
            )
        return self


class RunningProcess:
    """A started process whose stdout is read in a thread, noting when it prints the marker."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready_marker: str = "READY",
        measure_rss: bool = True,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-proc-")
        self._report = Path(self._tmp.name) / "maxrss"
        argv = _measured_argv(args, self._report) if measure_rss else list(args)
        self._marker = ready_marker
        self.ready_s: float | None = None
        self.ready = threading.Event()
        self._lines: list[str] = []
        self._err: list[str] = []
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            argv,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._readers = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.ready_s is None and line.startswith(self._marker):
                self.ready_s = time.perf_counter() - self.started
                self.ready.set()
            self._lines.append(line.rstrip("\n"))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line)

    def kill(self) -> None:
        """SIGKILL the process group (the process and what it started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float = 600.0) -> ProcessResult:
        """Wait for the exit (killing the process after ``timeout``); the :class:`ProcessResult`."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        wall = time.perf_counter() - self.started
        for reader in self._readers:
            reader.join(10)
        peak: int | None = None
        with contextlib.suppress(OSError, ValueError):
            peak = int(self._report.read_text().split()[-1]) * 1024
        self._tmp.cleanup()
        return ProcessResult(
            self.proc.returncode,
            "\n".join(self._lines),
            "".join(self._err),
            wall,
            self.ready_s,
            peak,
            list(self._lines),
        )


def spawn(args: Sequence[str], **options: Any) -> RunningProcess:
    """Start ``args`` (see :class:`RunningProcess` for the options); wait on it later."""
    return RunningProcess(args, **options)


def run_process(args: Sequence[str], *, timeout: float = 600.0, **options: Any) -> ProcessResult:
    """Run ``args`` to the end; exit status, output, wall time, time to READY and peak RSS."""
    return RunningProcess(args, **options).wait(timeout)


def python(code: str, *args: str) -> list[str]:
    """The argv running ``code`` in a fresh interpreter (this one's executable)."""
    return [sys.executable, "-c", code, *args]


# -- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_NGINX_CONF = """\
worker_processes 2;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    types {{ application/octet-stream bin pt safetensors; }}
    default_type application/octet-stream;
    server {{
        listen {host}:{port};
        root {root};
        {limit}
    }}
}}
"""


def _nginx_binary() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _listening(host: str, port: int, netns: str | None) -> bool:
    if netns is None:
        try:
            with socket.create_connection((host, port), 0.2):
                return True
        except OSError:
            return False
    probe = f"exec 3<>/dev/tcp/{host}/{port}"
    done = subprocess.run(
        ["ip", "netns", "exec", netns, "bash", "-c", probe], capture_output=True, timeout=10
    )
    return done.returncode == 0


@contextlib.contextmanager
def nginx(
    root: Path,
    *,
    limit_rate: int | None = None,
    host: str = "127.0.0.1",
    netns: str | None = None,
) -> Iterator[str]:
    """Serve ``root`` with nginx (sendfile, Range) on 127.0.0.1; yields the base URL.

    ``limit_rate`` caps each connection (bytes/s), like a CDN. nginx's workers run
    unprivileged: the files are made world-readable. ``FileNotFoundError`` without nginx.
    ``netns`` runs nginx inside that network namespace (``ip netns exec``), listening on
    ``host`` there.
    """
    binary = _nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx-light)")
    root = Path(root).resolve()
    for directory in [root, *root.parents]:
        if directory == Path("/"):
            break
        with contextlib.suppress(PermissionError):
            directory.chmod(directory.stat().st_mode | 0o055)
    for path in root.rglob("*"):
        path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as prefix:
        (Path(prefix) / "tmp").mkdir()
        port = free_port()
        limit = f"limit_rate {limit_rate};" if limit_rate else ""
        conf = Path(prefix) / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.format(prefix=prefix, host=host, port=port, root=root, limit=limit)
        )
        wrap = ["ip", "netns", "exec", netns] if netns else []
        proc = subprocess.Popen(
            [*wrap, binary, "-c", str(conf), "-p", prefix, "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                if _listening(host, port, netns):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"nginx did not start: {err}")
                time.sleep(0.05)
            yield f"http://{host}:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


@contextlib.contextmanager
def http_origin(root: Path, *, prefer_nginx: bool = True) -> Iterator[str]:
    """Serve the files under ``root`` over HTTP on 127.0.0.1; yields the base URL.

    nginx when installed (not the bottleneck), else modelcache's test :class:`ModelServer`.
    """
    if prefer_nginx and _nginx_binary():
        with nginx(root) as url:
            yield url
        return
    from modelcache.testing import ModelServer

    with ModelServer() as server:
        for path in Path(root).rglob("*"):
            if path.is_file():
                server.add(path.relative_to(root).as_posix(), path)
        yield server.url


# -- the machine ------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def _memory_total() -> int | None:
    with contextlib.suppress(OSError, LookupError):
        return _status_kib("/proc/meminfo", "MemTotal")
    return None


def _os_name() -> str:
    with contextlib.suppress(OSError):
        text = Path("/etc/os-release").read_text()
        match = re.search(r'^PRETTY_NAME="?([^"\n]+)"?$', text, re.M)
        if match:
            return match.group(1)
    return platform.system()


PEERS = (
    "torch",
    "safetensors",
    "torchao",
    "requests",
    "fsspec",
    "pooch",
    "huggingface_hub",
    "s3fs",
    "boto3",
    "moto",
    "urllib3",
)


def machine() -> dict[str, str]:
    """The machine and software the figures were measured on (imports nothing heavy)."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    memory = _memory_total()
    info = {
        "CPU": _cpu_model(),
        "cores": f"{usable} usable ({cores} online)",
        "memory": human_bytes(memory) if memory else "unknown",
        "OS": _os_name(),
        "kernel": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "modelcache": _version("modelcache") or "not installed",
    }
    curl = shutil.which("curl")
    nginx_bin = _nginx_binary()
    for dist in PEERS:
        v = _version(dist)
        if v:
            info[dist] = v
    for tool, binary in (("curl", curl), ("nginx", nginx_bin)):
        if binary:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [binary, "-V" if tool == "nginx" else "--version"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                text = (out.stdout or out.stderr).splitlines()
                if text:
                    info[tool] = text[0].split(" (")[0].replace("nginx version: ", "")
    return info


# -- a Linear-heavy model -----------------------------------------------------------------------

NET_CODE = """
import torch


class Net(torch.nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))
"""
"""Source of ``Net(width, layers)``: the module a checkpoint of :func:`write_checkpoint` fills."""


def checkpoint_shape(size_bytes: int) -> tuple[int, int]:
    """``(width, layers)`` of a stack of square float32 Linear layers of about ``size_bytes``."""
    width = max(16, min(1024, int((size_bytes / 4) ** 0.5)))
    layers = max(1, round(size_bytes / ((width * width + width) * 4)))
    return width, layers


def write_checkpoint(path: Path, size_bytes: int, *, seed: int = 0) -> tuple[int, int]:
    """Write a ``Net`` state dict of about ``size_bytes`` (``.pt`` or ``.safetensors`` by suffix).

    Returns ``(width, layers)``; build the module with ``Net(width, layers)`` from
    :data:`NET_CODE`. The tensors are random (incompressible), written in a child process so the
    caller never imports torch.
    """
    width, layers = checkpoint_shape(size_bytes)
    code = (
        "import sys, torch\n"
        "w, n, seed, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]\n"
        "g = torch.Generator().manual_seed(seed)\n"
        "sd = {}\n"
        "for i in range(n):\n"
        "    sd[f'layers.{i}.weight'] = torch.randn(w, w, generator=g)\n"
        "    sd[f'layers.{i}.bias'] = torch.randn(w, generator=g)\n"
        "if path.endswith('.safetensors'):\n"
        "    from safetensors.torch import save_file\n"
        "    save_file(sd, path)\n"
        "else:\n"
        "    torch.save(sd, path)\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(python(code, str(width), str(layers), str(seed), str(path)), check=True)
    return width, layers


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_speed(size: int = 256 * MiB, rounds: int = 3) -> list[float]:
    """``hashlib.sha256``'s in-memory speed on one core, MiB/s per round (4 MiB updates)."""
    import hashlib

    block = os.urandom(4 * MiB)
    values = []
    for _ in range(rounds):
        digest = hashlib.sha256()
        began = time.perf_counter()
        for _ in range(size // len(block)):
            digest.update(block)
        values.append(size / MiB / (time.perf_counter() - began))
    return values

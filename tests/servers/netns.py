"""Network namespaces joined by veth pairs, for the tests and the benchmarks (root needed).

- :func:`link`: two namespaces (an origin and a client) joined by one veth pair shaped with
  ``tc ... tbf`` (``benchmarks/bench_link.py``);
- :func:`hosts`: ``count`` namespaces, each a "host" with its own address, joined to a bridge in
  this (the root) namespace, where an origin listens on the bridge's address
  (``tests/test_replicas.py``).

Every namespace, veth and bridge made here is named ``mc<kind><pid>...`` and removed when its
context exits, whatever happened; one an earlier run left behind when it was killed (its process
is gone) is removed by the next run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Hosts", "hosts", "ip", "link", "remove_stale", "why_not"]

ORIGIN_IP, CLIENT_IP = "10.199.{n}.1", "10.199.{n}.2"
"""The addresses of :func:`link`'s two ends (they live only inside its namespaces)."""

HOSTS_NET = "10.198.{n}.0/24"
""":func:`hosts`'s subnet: the bridge (in the root namespace) is ``.1``, host ``i`` ``.(10+i)``."""

_OURS = re.compile(r"^mc[a-z](\d+)\D")


def why_not(*tools: str) -> str | None:
    """Why namespaces cannot be made here (not root, ``ip`` or a tool missing), or ``None``."""
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()}): network namespaces and veth pairs need root"
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: iproute2)"
    return None


def ip(*args: str) -> None:
    """Run ``ip ARGS``; a failure raises ``RuntimeError`` with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _gone(name: str) -> bool:
    match = _OURS.match(name)
    return match is not None and not Path(f"/proc/{match.group(1)}").exists()


def remove_stale() -> None:
    """Remove the namespaces and bridges of earlier runs whose process is gone."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        if _gone(name):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    links = subprocess.run(
        ["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True
    ).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip() if line.count(":") >= 2 else ""
        if _gone(name):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


@contextlib.contextmanager
def _namespaces(names: list[str]) -> Iterator[None]:
    """Make the namespaces; delete them at the end (their veth ends go with them)."""
    made: list[str] = []
    try:
        for name in names:
            ip("netns", "add", name)
            made.append(name)
        yield
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def link(gbit: float) -> Iterator[tuple[str, str, str]]:
    """Origin and client namespaces joined by a veth pair shaped to ``gbit`` on the origin side.

    Yields ``(origin namespace, client namespace, origin address)``; removes both at the end.
    """
    remove_stale()
    n = os.getpid() % 250
    tag = f"mcb{os.getpid()}"
    origin, client = f"{tag}-o", f"{tag}-c"
    with _namespaces([origin, client]):
        pair = ["vo", "netns", origin, "type", "veth", "peer", "name", "vc", "netns", client]
        ip("link", "add", *pair)
        ip("-n", origin, "addr", "add", f"{ORIGIN_IP.format(n=n)}/24", "dev", "vo")
        ip("-n", client, "addr", "add", f"{CLIENT_IP.format(n=n)}/24", "dev", "vc")
        for ns, dev in ((origin, "vo"), (client, "vc")):
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        burst = max(1, int(gbit * 2))  # MiB: enough for a 64 KiB GSO packet at any rate
        subprocess.run(
            ["ip", "netns", "exec", origin, "tc", "qdisc", "add", "dev", "vo", "root", "tbf",
             "rate", f"{gbit}gbit", "burst", f"{burst}mb", "latency", "50ms"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        yield origin, client, ORIGIN_IP.format(n=n)


@dataclass(frozen=True)
class Hosts:
    """What :func:`hosts` made: the origin's address and each host's namespace and address."""

    gateway: str
    """The bridge's address in the root namespace: an origin listening there is reachable."""
    namespaces: list[str]
    addresses: list[str]

    def run(self, index: int) -> list[str]:
        """The argv prefix that runs a command on host ``index`` (``ip netns exec NS``)."""
        return ["ip", "netns", "exec", self.namespaces[index]]


def _free_subnet() -> int:
    """An ``n`` of :data:`HOSTS_NET` no address of the root namespace is in."""
    shown = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    for step in range(250):
        n = (os.getpid() + step) % 250
        if f" {HOSTS_NET.format(n=n)[: -len('0/24')]}" not in shown:
            return n
    raise RuntimeError(f"no free subnet {HOSTS_NET.format(n='*')} in the root namespace")


@contextlib.contextmanager
def hosts(count: int) -> Iterator[Hosts]:
    """``count`` namespaces, each with one veth to a bridge in the root namespace.

    Host ``i`` is ``10.198.n.(10+i)``; the bridge is ``10.198.n.1``, which an origin in this
    process binds. Everything is removed at the end, also when the body fails.
    """
    remove_stale()
    tag = f"mcr{os.getpid()}"
    bridge = f"{tag}b"
    n = _free_subnet()
    prefix = HOSTS_NET.format(n=n)[: -len("0/24")]
    names = [f"{tag}-{i}" for i in range(count)]
    made_bridge = False
    try:
        ip("link", "add", bridge, "type", "bridge")
        made_bridge = True
        ip("addr", "add", f"{prefix}1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        with _namespaces(names):
            addresses = []
            for i, ns in enumerate(names):
                outside = f"{tag}v{i}"
                ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
                ip("link", "set", outside, "master", bridge)
                ip("link", "set", outside, "up")
                address = f"{prefix}{10 + i}"
                ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
                ip("-n", ns, "link", "set", "lo", "up")
                addresses.append(address)
            yield Hosts(f"{prefix}1", names, addresses)
    finally:
        if made_bridge:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True)

"""Full and read-only disks, on real filesystems the tests mount (a small ``tmpfs``, a read-only
bind mount): no monkeypatched calls. Mounting needs root; without it these tests fail and say so.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import FAST, MiB, make_payload, sha
from servers.hostile import HostileServer, Request

from modelcache import Cache, InsufficientSpaceError, ModelCacheError
from modelcache.testing import ModelServer


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({done.stderr.strip()}): these tests mount real "
            "filesystems and must run as root (as CI does)"
        )


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``mount(name, size_mib=None, bind=None, read_only=False)``: a tmpfs of that size, or a
    read-only bind mount of ``bind``, at ``tmp_path/name``; unmounted at the end."""
    mounted: list[Path] = []

    def make(
        name: str, size_mib: int | None = None, bind: Path | None = None, read_only: bool = False
    ) -> Path:
        if os.geteuid() != 0:
            raise AssertionError("these tests mount real filesystems and must run as root")
        target = tmp_path / name
        target.mkdir()
        if bind is not None:
            _run("mount", "--bind", str(bind), str(target))
            mounted.append(target)
            if read_only:
                _run("mount", "-o", "remount,bind,ro", str(target))
        else:
            _run("mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(target))
            mounted.append(target)
        return target

    yield make
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


def leftovers(home: Path) -> list[Path]:
    """Part files (and their range maps) left in the cache's ``.tmp``."""
    tmp = home / ".tmp"
    return sorted(tmp.rglob("*")) if tmp.is_dir() else []


def test_a_known_size_larger_than_the_free_space_is_refused_before_the_body(
    mount: Callable[..., Path], model_server: ModelServer
) -> None:
    disk = mount("small", size_mib=32)
    cache = Cache(disk / "cache", read_only_paths=[], offline=False, transfer=FAST)
    small = make_payload(1 * MiB, 1)
    kept = cache.fetch(model_server.add("small.bin", small))
    url = model_server.add("big.bin", make_payload(40 * MiB, 2))
    with pytest.raises(InsufficientSpaceError, match="free") as raised:
        cache.fetch(url)
    assert "big.bin" in str(raised.value)
    assert str(disk) in str(raised.value)
    requests, sent = model_server.count("big.bin")
    assert requests == 1  # the first answer's size was enough to refuse, and nothing retried
    assert sent < 8 * MiB  # the body was not read (only what the socket buffers took)
    assert leftovers(cache.path) == []
    assert kept.read_bytes() == small
    assert cache.verify() == []


def test_enospc_mid_download_of_an_unknown_size_is_the_same_clear_error(
    mount: Callable[..., Path], model_server: ModelServer
) -> None:
    disk = mount("small", size_mib=32)
    cache = Cache(disk / "cache", read_only_paths=[], offline=False, transfer=FAST)
    small = make_payload(1 * MiB, 3)
    kept = cache.fetch(model_server.add("small.bin", small), sha256=sha(small))
    big = make_payload(48 * MiB, 4)

    def chunked(request: Request) -> None:  # no Content-Length: the size is learnt at the end
        request.head(200, {"Transfer-Encoding": "chunked", "ETag": '"big"'})
        for at in range(0, len(big), MiB):
            piece = big[at : at + MiB]
            if not request.write(b"%x\r\n%b\r\n" % (len(piece), piece)):
                return
        request.write(b"0\r\n\r\n")

    with HostileServer() as server:
        url = server.route("/unknown.bin", chunked)
        with pytest.raises(InsufficientSpaceError, match="disk filled up") as raised:
            cache.fetch(url)
    assert "unknown.bin" in str(raised.value)
    assert leftovers(cache.path) == []  # the part file is removed: the disk is usable again
    assert kept.read_bytes() == small
    assert cache.verify() == []
    assert [e.source for e in cache.entries()] == [model_server.url + "/small.bin"]
    again = make_payload(2 * MiB, 5)  # and the cache goes on working
    assert cache.fetch(model_server.add("after.bin", again)).read_bytes() == again


def test_a_writable_cache_on_a_read_only_filesystem(
    mount: Callable[..., Path], model_server: ModelServer, tmp_path: Path
) -> None:
    baked = tmp_path / "baked"
    data = make_payload(1 * MiB, 6)
    url = model_server.add("baked.bin", data)
    Cache(baked, read_only_paths=[], offline=False, transfer=FAST).fetch(url)
    (tmp_path / "volume").mkdir()
    volume = mount("ro-volume", bind=tmp_path / "volume", read_only=True)
    layer = mount("ro-layer", bind=baked, read_only=True)
    with pytest.raises(OSError, match="Read-only file system"):
        (volume / "probe").write_bytes(b"")  # the mount really is read-only
    cache = Cache(volume / "cache", read_only_paths=[layer], offline=False, transfer=FAST)
    model_server.reset_counts()
    got = cache.fetch(url)  # the read-only layer still serves what it holds
    assert got.read_bytes() == data
    assert got.is_relative_to(layer)
    assert model_server.count("baked.bin") == (0, 0)
    other = model_server.add("other.bin", make_payload(1 * MiB, 7))
    with pytest.raises(ModelCacheError, match="cannot write the cache") as raised:
        cache.fetch(other)
    assert str(volume / "cache") in str(raised.value)
    assert "other.bin" in str(raised.value)
    assert model_server.count("other.bin") == (0, 0)
    assert cache.verify() == []

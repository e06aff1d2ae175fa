"""The huggingface_hub drop-ins, against olah (a real Hub mirror serving git repos) and the
Hub stand-in.

Each behaviour is checked against both origins: olah answers repo info without sizes or
digests and only for a named revision, the stand-in like the Hub itself.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MiB, make_payload, sha
from servers.hub import HubStandIn
from servers.olah import OlahServer, git_repo, git_tag, tamper_lfs_object

from modelcache import Cache, IntegrityError, NotCachedError, SourceError
from modelcache.compat import LocalEntryNotCachedError, hf_hub_download, snapshot_download

pytest_plugins = ["servers.fixtures"]

CONFIG = b'{"hidden_size": 8, "model_type": "bert"}'
WEIGHTS = make_payload(300_000, seed=11)
REPO = {
    "config.json": CONFIG,
    "model.safetensors": WEIGHTS,
    "README.md": b"# a tiny model\n",
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    "onnx/model.onnx": make_payload(5000, seed=12),
}


class Origin:
    """A Hub origin for the tests: olah or the stand-in, behind one interface."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url

    def push(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> str:
        """Commit ``files`` (the whole tree) on main; the commit."""
        raise NotImplementedError

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        """Point the tag ``name`` at ``commit``."""
        raise NotImplementedError

    def tamper(self, repo_id: str, original: bytes, data: bytes) -> None:
        """Serve ``data`` for the LFS file whose content was ``original``."""
        raise NotImplementedError

    def stop(self) -> None:
        """Make the origin unreachable."""
        raise NotImplementedError


class StandInOrigin(Origin):
    def __init__(self, hub: HubStandIn) -> None:
        super().__init__("stand-in", hub.url)
        self.hub = hub

    def push(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> str:
        return self.hub.push(repo_id, files, repo_type=repo_type)

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        self.hub.tag(repo_id, name, commit)

    def tamper(self, repo_id: str, original: bytes, data: bytes) -> None:
        self.hub.tamper(sha(original), data)

    def stop(self) -> None:
        self.hub.close()


class OlahOrigin(Origin):
    def __init__(self, server: OlahServer) -> None:
        super().__init__("olah", server.url)
        self.server = server

    def push(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> str:
        return git_repo(self.server.repo_path(repo_id, repo_type), files)

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        git_tag(self.server.repo_path(repo_id), name, commit)

    def tamper(self, repo_id: str, original: bytes, data: bytes) -> None:
        tamper_lfs_object(self.server.repo_path(repo_id), sha(original), data)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(params=["olah", "stand-in"])
def origin(
    request: pytest.FixtureRequest,
    store_env: None,
    modelcache_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Origin]:
    """An origin set as ``HF_ENDPOINT``, with ``MODELCACHE_HOME`` an empty cache."""
    if request.param == "olah":
        server: OlahServer = request.getfixturevalue("olah_server")
        if not server.running:
            server.start()
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield OlahOrigin(server)
        return
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield StandInOrigin(hub)


@pytest.fixture
def repo_id() -> str:
    """A repo name no other test uses (olah serves one session)."""
    return f"org/tiny-{uuid.uuid4().hex[:8]}"


def tree(folder: str | Path) -> dict[str, bytes]:
    """Every file below ``folder`` by its relative path."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def meta_of(path: str | Path) -> dict[str, object]:
    entry = Path(path)
    while not (entry / "meta.json").is_file():
        entry = entry.parent
    data: dict[str, object] = json.loads((entry / "meta.json").read_text())
    return data


def test_hf_hub_download_returns_the_file_and_a_warm_start_needs_no_server(
    origin: Origin, repo_id: str
) -> None:
    commit = origin.push(repo_id, REPO)

    path = hf_hub_download(repo_id, "model.safetensors")

    assert isinstance(path, str)
    assert Path(path).name == "model.safetensors"
    assert Path(path).read_bytes() == WEIGHTS
    meta = meta_of(path)
    assert meta["revision"] == {"requested": None, "commit": commit}
    assert "unverified" not in meta  # olah's sizes and digests came from paths-info
    config = hf_hub_download(repo_id, "config.json")
    assert Path(config).read_bytes() == CONFIG

    origin.stop()  # any request now fails: the warm start must make none
    assert hf_hub_download(repo_id, "model.safetensors") == path
    assert hf_hub_download(repo_id, "config.json", local_files_only=True) == config


def test_snapshot_download_lays_out_the_repo_and_patterns_choose_files(
    origin: Origin, repo_id: str
) -> None:
    origin.push(repo_id, REPO)

    folder = snapshot_download(repo_id)

    assert isinstance(folder, str)
    assert tree(folder) == REPO
    assert "unverified" not in meta_of(folder)  # olah's from the recursive tree
    chosen = snapshot_download(
        repo_id, allow_patterns=["*.json", "onnx/"], ignore_patterns="1_Pooling/*"
    )
    assert sorted(tree(chosen)) == ["config.json", "onnx/model.onnx"]
    only = snapshot_download(repo_id, allow_patterns="*.safetensors")
    assert tree(only) == {"model.safetensors": WEIGHTS}
    # the two entries share the weights' blob: one copy on disk
    assert os.stat(Path(only) / "model.safetensors").st_ino == (
        os.stat(Path(folder) / "model.safetensors").st_ino
    )

    origin.stop()
    assert snapshot_download(repo_id) == folder
    assert snapshot_download(repo_id, local_files_only=True) == folder


def test_subfolder_and_local_dir(origin: Origin, repo_id: str, tmp_path: Path) -> None:
    origin.push(repo_id, REPO)
    out = tmp_path / "out"

    path = hf_hub_download(repo_id, "config.json", subfolder="1_Pooling", local_dir=out)

    assert path == str(out / "1_Pooling" / "config.json")
    assert Path(path).read_bytes() == REPO["1_Pooling/config.json"]
    folder = snapshot_download(repo_id, local_dir=out, allow_patterns=["*.safetensors", "*.md"])
    assert folder == str(out.resolve())
    assert tree(out) == {
        "1_Pooling/config.json": REPO["1_Pooling/config.json"],
        "model.safetensors": WEIGHTS,
        "README.md": REPO["README.md"],
    }
    cached = snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.md"])
    # the local_dir's files are links to the cached copies, not second copies
    assert (
        os.stat(out / "model.safetensors").st_ino
        == os.stat(Path(cached) / "model.safetensors").st_ino
    )


def test_revisions_tags_commits_and_force_download(origin: Origin, repo_id: str) -> None:
    first = origin.push(repo_id, {"w.bin": b"version one" * 200})
    origin.tag(repo_id, "v1.0", first)
    origin.push(repo_id, {"w.bin": b"version two" * 200})

    assert Path(hf_hub_download(repo_id, "w.bin", revision="v1.0")).read_bytes() == (
        b"version one" * 200
    )
    assert Path(hf_hub_download(repo_id, "w.bin", revision=first)).read_bytes() == (
        b"version one" * 200
    )
    assert Path(hf_hub_download(repo_id, "w.bin")).read_bytes() == b"version two" * 200

    third = origin.push(repo_id, {"w.bin": b"version three" * 200})
    # main was resolved once and recorded: no request, the recorded commit
    assert Path(hf_hub_download(repo_id, "w.bin")).read_bytes() == b"version two" * 200
    moved = hf_hub_download(repo_id, "w.bin", force_download=True)
    assert Path(moved).read_bytes() == b"version three" * 200
    assert meta_of(moved)["revision"] == {"requested": None, "commit": third}


def test_dataset_repos(origin: Origin, repo_id: str) -> None:
    origin.push(repo_id, {"data/calib.bin": b"calibration" * 100}, repo_type="dataset")
    path = hf_hub_download(repo_id, "calib.bin", subfolder="data", repo_type="dataset")
    assert Path(path).read_bytes() == b"calibration" * 100
    folder = snapshot_download(repo_id, repo_type="dataset")
    assert tree(folder) == {"data/calib.bin": b"calibration" * 100}


def test_a_file_that_differs_from_its_listed_digest_is_refused(
    origin: Origin, repo_id: str
) -> None:
    origin.push(repo_id, REPO)
    flipped = bytearray(WEIGHTS)
    flipped[1000] ^= 0xFF
    origin.tamper(repo_id, WEIGHTS, bytes(flipped))

    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        hf_hub_download(repo_id, "model.safetensors")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        snapshot_download(repo_id)
    assert Cache().entries() == []


def test_huggingface_hubs_own_download_gives_the_same_files(
    origin: Origin, repo_id: str, tmp_path: Path
) -> None:
    """The drop-in's folder holds what huggingface_hub's own snapshot_download gives."""
    import huggingface_hub

    origin.push(repo_id, REPO)
    # huggingface_hub reads HF_ENDPOINT once, at its import: name the origin
    theirs = huggingface_hub.snapshot_download(
        repo_id, cache_dir=tmp_path / "hf-cache", endpoint=origin.url
    )
    ours = snapshot_download(repo_id)
    assert tree(ours) == tree(theirs)
    their_file = huggingface_hub.hf_hub_download(
        repo_id,
        "config.json",
        subfolder="1_Pooling",
        cache_dir=tmp_path / "hf-cache",
        endpoint=origin.url,
    )
    our_file = hf_hub_download(repo_id, "config.json", subfolder="1_Pooling")
    assert Path(our_file).read_bytes() == Path(their_file).read_bytes()
    assert Path(our_file).name == Path(their_file).name


# -- offline ---------------------------------------------------------------------------------


def test_an_offline_miss_is_caught_by_huggingface_hubs_except_clauses(
    hub: HubStandIn, modelcache_home: Path
) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub.push("org/m", REPO)

    with pytest.raises(LocalEntryNotFoundError) as caught:
        hf_hub_download("org/m", "model.safetensors", local_files_only=True)
    error = caught.value
    assert isinstance(error, LocalEntryNotCachedError)
    assert isinstance(error, NotCachedError)
    assert isinstance(error, FileNotFoundError)
    assert "local_files_only=True" in str(error)
    assert "modelcache fetch hf://org/m/model.safetensors" in str(error)
    assert "'org/m'" in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert hub.requests == []


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "MODELCACHE_OFFLINE"])
def test_offline_variables_are_honoured(
    hub: HubStandIn, modelcache_home: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    hub.push("org/m", REPO)
    monkeypatch.setenv(variable, "1")
    with pytest.raises(FileNotFoundError, match=f"{variable} is set"):
        snapshot_download("org/m")
    assert hub.requests == []


# -- the cache's guarantees --------------------------------------------------------------------


def test_concurrent_calls_download_once(hub: HubStandIn, modelcache_home: Path) -> None:
    data = make_payload(2 * MiB, seed=3)
    hub.push("org/m", {"model.safetensors": data})
    paths: list[str] = []

    def call() -> None:
        paths.append(hf_hub_download("org/m", "model.safetensors"))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(paths) == 4
    assert len(set(paths)) == 1
    assert hub.count(lambda m, p: p.startswith("/lfs/")) == 1
    assert hub.count(lambda m, p: p.startswith("/api/")) == 1


def test_a_cut_download_resumes(hub: HubStandIn, modelcache_home: Path) -> None:
    data = make_payload(3 * MiB, seed=4)
    hub.push("org/m", {"model.safetensors": data})
    hub.cut(after=MiB, times=1, match=lambda m, p: p.startswith("/lfs/"))
    assert Path(hf_hub_download("org/m", "model.safetensors")).read_bytes() == data
    assert hub.count(lambda m, p: p.startswith("/lfs/")) == 2


def test_token_endpoint_and_cache_dir_arguments(
    store_env: None, modelcache_home: Path, tmp_path: Path
) -> None:
    token = "hf_dropInTokenValue12345"
    with HubStandIn() as hub:  # HF_ENDPOINT is not set: the argument names the mirror
        hub.push("org/private", REPO, token=token)
        with pytest.raises(SourceError):
            hf_hub_download("org/private", "config.json", endpoint=hub.url)
        path = hf_hub_download(
            "org/private",
            "config.json",
            endpoint=hub.url,
            token=token,
            cache_dir=tmp_path / "my-cache",
        )
    assert Path(path).read_bytes() == CONFIG
    entries = Cache(tmp_path / "my-cache").entries()
    assert [e.source for e in entries] == ["hf://org/private/config.json"]
    assert token not in (Path(path).parent / "meta.json").read_text()
    assert Cache().entries() == []  # nothing went into the default cache


def test_importing_the_drop_ins_imports_no_hub_client() -> None:
    code = "import sys, modelcache.compat; print('huggingface_hub' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"

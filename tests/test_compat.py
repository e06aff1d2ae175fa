"""Drop-ins: the seeds' own code, with only the import changed, against a local origin."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from modelcache import Cache, IntegrityError, NotCachedError, SourceError, recipes
from modelcache.compat import load_state_dict_from_url, whisper_load_model
from modelcache.testing import ModelServer
from modelcache.testing.fake_weights import WHISPER_TEST_DIMS

FakeWeights = Callable[..., Path]


def same_tensors(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sharp_url(fake_weights: FakeWeights, model_server: ModelServer) -> tuple[str, Path]:
    """A Sharp-shaped fake served under the real file name; its URL and path."""
    path = fake_weights("sharp")
    return model_server.add("models/sharp/sharp_2572gikvuh.pt", path), path


# -- seed 000, with `torch.hub.load_state_dict_from_url` -> `load_state_dict_from_url` ------------

SEED_000_OPTION_2 = """
CACHE_DIR = Path(os.getenv("CACHE_DIR", "~/.cache/torch/hub/checkpoints"))
CACHE_DIR.mkdir(parents=True, exist_ok=True)

MODEL_PATH = CACHE_DIR / "sharp_2572gikvuh.pt"

if not MODEL_PATH.exists():
    logger.info("Downloading model...")
    state_dict = load_state_dict_from_url(DEFAULT_MODEL_URL, progress=True)
    torch.save(state_dict, MODEL_PATH)
else:
    logger.info("Loading model from cache")
    state_dict = torch.load(MODEL_PATH, weights_only=True)
"""


def test_seed_000_persistent_disk_snippet(
    sharp_url: tuple[str, Path],
    model_server: ModelServer,
    modelcache_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, path = sharp_url
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    original = torch.load(path, weights_only=True)
    for _ in range(2):  # first run downloads and saves, the second loads the saved copy
        namespace: dict[str, Any] = {
            "os": os, "Path": Path, "torch": torch, "logger": logging.getLogger("app"),
            "DEFAULT_MODEL_URL": url, "load_state_dict_from_url": load_state_dict_from_url,
        }  # fmt: skip
        exec(SEED_000_OPTION_2, namespace)
        assert same_tensors(namespace["state_dict"], original)
    assert (tmp_path / "cache" / "sharp_2572gikvuh.pt").is_file()
    assert model_server.count("models/sharp/sharp_2572gikvuh.pt")[1] == path.stat().st_size


def test_seed_000_object_storage_fallback_snippet(
    sharp_url: tuple[str, Path], modelcache_home: Path
) -> None:
    url, path = sharp_url
    code = textwrap.dedent("""
        def load_model_from_s3():
            try:
                raise ConnectionError("no bucket here")  # stands for s3.get_object(...)
            except:
                # Fallback to downloading
                return load_state_dict_from_url(DEFAULT_MODEL_URL, progress=True)
        state_dict = load_model_from_s3()
    """)
    namespace: dict[str, Any] = {
        "DEFAULT_MODEL_URL": url, "load_state_dict_from_url": load_state_dict_from_url,
    }  # fmt: skip
    exec(code, namespace)
    assert same_tensors(namespace["state_dict"], torch.load(path, weights_only=True))


def test_seed_000_docker_build_step_then_offline_start(
    sharp_url: tuple[str, Path], model_server: ModelServer, tmp_path: Path
) -> None:
    url, _ = sharp_url
    models = tmp_path / "app" / "models"
    # RUN python -c "import torch; torch.hub.load_state_dict_from_url('...', progress=True,
    #                model_dir='/app/models')"   with the import changed:
    build = (
        "from modelcache.compat import load_state_dict_from_url; "
        f"load_state_dict_from_url('{url}', progress=True, model_dir='{models}')"
    )
    env = {**os.environ, "MODELCACHE_PROGRESS": "0", "MODELCACHE_HOME": str(tmp_path / "home")}
    subprocess.run([sys.executable, "-c", build], check=True, env=env, timeout=120)
    model_server.remove("models/sharp/sharp_2572gikvuh.pt")  # the container has no origin

    start = textwrap.dedent(f"""
        import torch
        from modelcache.compat import load_state_dict_from_url
        state_dict = load_state_dict_from_url('{url}', progress=True)
        baked = load_state_dict_from_url('{url}', progress=True, model_dir='{models}')
        print(len(state_dict), len(baked))
    """)
    runtime = {**env, "MODELCACHE_READ_ONLY_PATHS": str(models), "MODELCACHE_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", start], env=runtime, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1038", "1038"]
    assert not (tmp_path / "home").exists() or not any(
        p for p in (tmp_path / "home").iterdir() if not p.name.startswith(".")
    )  # nothing copied into the writable cache


# -- torch.hub's behaviour -----------------------------------------------------------------------


def test_same_result_as_torch_hub(
    sharp_url: tuple[str, Path], modelcache_home: Path, tmp_path: Path
) -> None:
    url, _ = sharp_url
    theirs = torch.hub.load_state_dict_from_url(
        url, model_dir=str(tmp_path / "hub"), progress=False
    )
    ours = load_state_dict_from_url(url, model_dir=tmp_path / "ours")
    assert type(ours) is type(theirs)
    assert same_tensors(ours, theirs)


@pytest.mark.parametrize("progress", [True, False])
def test_progress_false_draws_no_bar(
    sharp_url: tuple[str, Path],
    modelcache_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    progress: bool,
) -> None:
    url, _ = sharp_url
    monkeypatch.setenv("MODELCACHE_PROGRESS", "1")  # bars forced on, as on a terminal
    load_state_dict_from_url(url, progress=progress)
    assert ("sharp_2572gikvuh.pt" in capsys.readouterr().err) is progress


def test_warm_start_needs_no_network(
    sharp_url: tuple[str, Path], model_server: ModelServer, modelcache_home: Path
) -> None:
    url, _ = sharp_url
    first = load_state_dict_from_url(url)
    model_server.remove("models/sharp/sharp_2572gikvuh.pt")
    model_server.reset_counts()
    again = load_state_dict_from_url(url, progress=False)
    assert same_tensors(first, again)
    assert model_server.count("models/sharp/sharp_2572gikvuh.pt") == (0, 0)


def test_interrupted_download_resumes(
    fake_weights: FakeWeights, model_server: ModelServer, modelcache_home: Path
) -> None:
    path = fake_weights("state_dict", size_bytes=4 << 20)
    url = model_server.add("big.pt", path)
    model_server.cut_after("big.pt", 1 << 20)  # the first response stops after 1 MiB
    state = load_state_dict_from_url(url)
    assert same_tensors(state, torch.load(path, weights_only=True))
    requests, sent = model_server.count("big.pt")
    assert requests >= 2
    assert sent < path.stat().st_size + (1 << 20) + 1  # resumed, not started again


def test_concurrent_callers_download_once(
    fake_weights: FakeWeights, model_server: ModelServer, modelcache_home: Path
) -> None:
    path = fake_weights("state_dict", size_bytes=2 << 20)
    url = model_server.add("shared.pt", path)
    model_server.set_rate("shared.pt", 8 << 20)  # slow enough for the callers to overlap
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(load_state_dict_from_url(url))
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(results) == 4
    assert model_server.count("shared.pt")[1] == path.stat().st_size  # one download's bytes


def test_check_hash_verifies_the_prefix_in_the_file_name(
    fake_weights: FakeWeights, model_server: ModelServer, modelcache_home: Path
) -> None:
    path = fake_weights("state_dict", size_bytes=100_000)
    digest = sha_of(path)
    good = model_server.add(f"resnet-{digest[:8]}.pth", path)
    assert same_tensors(
        load_state_dict_from_url(good, check_hash=True), torch.load(path, weights_only=True)
    )

    bad = model_server.add("resnet-0badc0de.pth", path)
    with pytest.raises(IntegrityError, match="0badc0de") as caught:
        load_state_dict_from_url(bad, check_hash=True)
    assert "resnet-0badc0de.pth" in str(caught.value)  # names the model and the source
    assert bad in str(caught.value)
    (entry,) = Cache(modelcache_home).entries()  # the good one stays, the bad one is gone
    assert entry.source == good
    assert len(load_state_dict_from_url(bad)) > 0  # without check_hash it loads
    with pytest.raises(IntegrityError):  # file_name decides which name carries the prefix
        load_state_dict_from_url(good, check_hash=True, file_name="resnet-0badc0de.pth")
    assert load_state_dict_from_url(bad, check_hash=True, file_name=f"r-{digest[:10]}.pth")


def test_weights_only_by_default(
    model_server: ModelServer, modelcache_home: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    payload = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Runs(str(marker))}, payload)
    url = model_server.add("evil.pt", payload)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_state_dict_from_url(url)
    assert not marker.exists()  # the pickle's code never ran
    loaded = load_state_dict_from_url(url, weights_only=False)  # asked for explicitly
    assert marker.exists()
    assert torch.equal(loaded["w"], torch.ones(2))


class _Runs:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_map_location_and_legacy_zip(
    fake_weights: FakeWeights, model_server: ModelServer, modelcache_home: Path, tmp_path: Path
) -> None:
    path = fake_weights("state_dict", size_bytes=50_000)
    url = model_server.add("m.pt", path)
    state = load_state_dict_from_url(url, map_location=lambda storage, location: storage)
    assert same_tensors(state, torch.load(path, weights_only=True))
    meta = load_state_dict_from_url(url, map_location="meta")
    assert all(t.is_meta for t in meta.values())

    zipped = tmp_path / "old.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.write(path, "old.pth")
    state = load_state_dict_from_url(model_server.add("old.zip", zipped))
    assert same_tensors(state, torch.load(path, weights_only=True))


def test_a_file_torch_hub_saved_is_used_in_place(
    sharp_url: tuple[str, Path], model_server: ModelServer, modelcache_home: Path, tmp_path: Path
) -> None:
    url, _ = sharp_url
    models = tmp_path / "models"
    torch.hub.load_state_dict_from_url(url, model_dir=str(models), progress=False)
    model_server.reset_counts()
    state = load_state_dict_from_url(url, model_dir=models)
    assert len(state) == 1038
    assert model_server.count("models/sharp/sharp_2572gikvuh.pt") == (0, 0)


def test_errors_name_the_file_and_source(model_server: ModelServer, modelcache_home: Path) -> None:
    url = model_server.url + "/missing/weights.pt"
    with pytest.raises(SourceError) as caught:
        load_state_dict_from_url(url)
    assert "weights.pt" in str(caught.value)
    assert url in str(caught.value)


# -- whisper.load_model -------------------------------------------------------------------------


@pytest.fixture
def tiny_on_server(
    fake_weights: FakeWeights, model_server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, Path]:
    """A fake Whisper served the way OpenAI lays out its files (``<sha256>/tiny.pt``), and
    ``tiny`` pointed at it in modelcache's table: whisper_load_model("tiny") fetches it."""
    path = fake_weights("whisper", **WHISPER_TEST_DIMS)
    url = model_server.add(f"models/{sha_of(path)}/tiny.pt", path)
    monkeypatch.setitem(recipes._WHISPER_URLS, "tiny", url)
    return url, path


def test_whisper_load_model_by_name(
    tiny_on_server: tuple[str, Path], model_server: ModelServer, tmp_path: Path
) -> None:
    from whisper.model import Whisper

    url, _ = tiny_on_server
    root = tmp_path / "whisper-cache"
    model = whisper_load_model("tiny", download_root=str(root))
    assert isinstance(model, Whisper)
    assert next(model.parameters()).device.type == "cpu"
    model_server.reset_counts()
    again = whisper_load_model("tiny", device="cpu", download_root=str(root))
    assert model_server.count(url.split("/", 3)[3]) == (0, 0)
    assert same_tensors(model.state_dict(), again.state_dict())


def test_whisper_load_model_matches_openai_whisper_for_a_path(
    fake_weights: FakeWeights, modelcache_home: Path
) -> None:
    import whisper

    path = fake_weights("whisper", **WHISPER_TEST_DIMS)
    ours = whisper_load_model(str(path), device="cpu")
    theirs = whisper.load_model(str(path), device="cpu")
    assert same_tensors(ours.state_dict(), theirs.state_dict())
    in_memory = whisper_load_model(str(path), device="cpu", in_memory=True)
    assert same_tensors(in_memory.state_dict(), theirs.state_dict())
    mel = torch.randn(1, 80, 3000)
    tokens = torch.tensor([[50258]])
    with torch.no_grad():
        assert torch.equal(ours(mel, tokens), theirs(mel, tokens))


def test_whisper_load_model_reuses_openai_whispers_download(
    tiny_on_server: tuple[str, Path], model_server: ModelServer, tmp_path: Path
) -> None:
    url, path = tiny_on_server
    root = tmp_path / "whisper"
    root.mkdir()
    (root / "tiny.pt").write_bytes(path.read_bytes())  # what whisper.load_model left there
    model_server.reset_counts()
    model = whisper_load_model("tiny", download_root=str(root))
    assert model.dims.n_text_state == WHISPER_TEST_DIMS["n_text_state"]
    assert model_server.count(url.split("/", 3)[3]) == (0, 0)


def test_whisper_load_model_unknown_name_and_offline(
    modelcache_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import whisper

    with pytest.raises(RuntimeError, match=r"Model huge not found; available models = \["):
        whisper_load_model("huge")
    with pytest.raises(RuntimeError, match="not found"):
        whisper.load_model("huge")  # the same error as the original
    monkeypatch.setenv("MODELCACHE_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no earlier whisper download
    with pytest.raises(NotCachedError, match="modelcache fetch") as caught:
        whisper_load_model("base.en")
    assert recipes.whisper_url("base.en") in str(caught.value)
    assert "whisper-base.en" in str(caught.value)


# -- docs/recipes.md: the one-line changes and the Dockerfile -------------------------------------


def after(diff: str) -> str:
    """The code a diff block leaves: its context and added lines."""
    return "\n".join(line[1:] for line in diff.splitlines() if line[:1] in ("+", " "))


def test_docs_diffs_run(
    sharp_url: tuple[str, Path], tiny_on_server: tuple[str, Path], modelcache_home: Path
) -> None:
    from conftest import code_blocks
    from whisper.model import Whisper

    hub, load_model = code_blocks("recipes.md", "diff")
    url, path = sharp_url
    namespace: dict[str, Any] = {"DEFAULT_MODEL_URL": url}
    exec(after(hub), namespace)
    assert same_tensors(namespace["state_dict"], torch.load(path, weights_only=True))
    exec(after(load_model), namespace)  # "tiny" points at the local fake (tiny_on_server)
    assert isinstance(namespace["model"], Whisper)


def test_docs_dockerfile_build_then_offline_app(
    sharp_url: tuple[str, Path], model_server: ModelServer, tmp_path: Path
) -> None:
    from conftest import code_blocks

    (dockerfile,) = code_blocks("recipes.md", "dockerfile")
    run = next(line for line in dockerfile.splitlines() if line.startswith("RUN "))
    env_line = next(line for line in dockerfile.splitlines() if line.startswith("ENV "))
    url, _ = sharp_url
    apple = "https://ml-site.cdn-apple.com/models/sharp/sharp_2572gikvuh.pt"
    models = tmp_path / "app" / "models"
    code = run.split('python -c "', 1)[1].rstrip('"').replace(apple, url)
    code = code.replace("/app/models", str(models))
    base = {**os.environ, "MODELCACHE_PROGRESS": "0", "MODELCACHE_HOME": str(tmp_path / "home")}
    subprocess.run([sys.executable, "-c", code], env=base, check=True, timeout=110)
    model_server.remove("models/sharp/sharp_2572gikvuh.pt")

    runtime = dict(base)
    for pair in env_line.removeprefix("ENV ").split():
        key, value = pair.split("=", 1)
        runtime[key] = value.replace("/app/models", str(models))
    hub_diff = code_blocks("recipes.md", "diff")[0]
    app = f"DEFAULT_MODEL_URL = {url!r}\n{after(hub_diff)}\nprint(len(state_dict))"
    done = subprocess.run(
        [sys.executable, "-c", app], env=runtime, capture_output=True, text=True, timeout=110
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1038"

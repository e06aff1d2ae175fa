"""The error hierarchy: what each is, what it says, and that it crosses process boundaries."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from conftest import run_python_blocks

import modelcache
from modelcache import (
    Cache,
    InsufficientSpaceError,
    IntegrityError,
    LoadError,
    LockTimeoutError,
    ModelCacheError,
    NotCachedError,
    NotReadyError,
    SourceError,
)
from modelcache._sources import Source
from modelcache.errors import in_context, shorten
from modelcache.testing import ModelServer

ALL = [
    SourceError,
    IntegrityError,
    NotCachedError,
    LockTimeoutError,
    InsufficientSpaceError,
    LoadError,
    NotReadyError,
]


@pytest.mark.parametrize("cls", ALL)
def test_every_error_names_model_and_source_and_pickles(cls: type[ModelCacheError]) -> None:
    error = cls("it broke", model="whisper-tiny", source="https://host/tiny.pt")
    assert isinstance(error, ModelCacheError)
    assert "whisper-tiny" in str(error)
    assert "https://host/tiny.pt" in str(error)
    assert "it broke" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error)
    assert (copy.reason, copy.model, copy.source) == (error.reason, error.model, error.source)


def test_timeouts_are_timeout_errors_and_space_is_an_os_error() -> None:
    assert issubclass(LockTimeoutError, TimeoutError)
    assert issubclass(NotReadyError, TimeoutError)
    assert issubclass(InsufficientSpaceError, OSError)
    with pytest.raises(TimeoutError):
        raise NotReadyError("not ready after 5s", model="m")


def test_source_error_keeps_status_and_attempts_through_pickle() -> None:
    error = SourceError(
        "all 2 sources failed",
        model="m",
        source="https://a/m.pt",
        status=None,
        attempts=[("https://a/m.pt", "not found (HTTP 404)"), ("s3://b/m.pt", "refused")],
    )
    assert "tried:" in str(error)
    assert "s3://b/m.pt: refused" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.attempts == error.attempts
    assert str(copy) == str(error)
    refused = pickle.loads(pickle.dumps(SourceError("refused", status=403)))
    assert refused.status == 403


def test_not_cached_names_the_command_that_preloads() -> None:
    error = NotCachedError("offline", model="m", source="https://host/tiny.pt")
    assert "modelcache fetch https://host/tiny.pt" in str(error)


def test_with_model_names_the_model_once() -> None:
    error = IntegrityError("sha256 mismatch", source="https://h/m.pt")
    assert "model" not in str(error)
    assert error.with_model("sharp") is error
    assert "model 'sharp'" in str(error)
    error.with_model("other")
    assert "other" not in str(error)
    assert "sharp" in str(pickle.loads(pickle.dumps(error)))


def test_shorten_keeps_short_text_and_says_how_much_it_cut() -> None:
    assert shorten("x" * 2000) == "x" * 2000
    assert shorten("ab" * 1500) == "ab" * 1000 + "... (1000 more characters)"
    assert shorten("abcdef", limit=2) == "ab... (4 more characters)"


def test_in_context_names_model_and_source_once() -> None:
    cache_error = SourceError("not found (HTTP 404)", source="https://host/m.pt", status=404)
    assert in_context(cache_error, model="m", source="ignored", doing="fetch") is cache_error
    assert (cache_error.model, cache_error.source) == ("m", "https://host/m.pt")
    assert str(cache_error) == "model 'm', source https://host/m.pt: not found (HTTP 404)"
    in_context(cache_error, model="other", source="x", doing="fetch")
    assert cache_error.model == "m"  # named once: a second boundary changes nothing


def test_in_context_turns_anything_else_into_a_picklable_load_error() -> None:
    source = Source.parse("https://alice:s3cr3t@host/m.pt?token=t0k3n")
    failure = KeyError(f"layers.0.weight missing in {source.url}")
    error = in_context(
        failure, model="m", source=source.redacted, doing="loading m.pt", scrub=source.scrub
    )
    assert type(error) is LoadError
    assert error.__cause__ is failure
    assert (error.model, error.source) == ("m", source.redacted)
    assert str(error).startswith(f"model 'm', source {source.redacted}: loading m.pt failed: ")
    assert "KeyError: " in str(error)
    assert "layers.0.weight" in str(error)
    for secret in ("alice", "s3cr3t", "t0k3n"):
        assert secret not in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy)) == (LoadError, str(error))

    unnamed = SourceError("refused", status=403)  # a lower layer's, naming neither yet
    named = in_context(unnamed, model="m", source="https://host/m.pt", doing="fetch")
    assert named is unnamed  # its class and reason stay: get() raises the fetch's own error
    assert str(named) == "model 'm', source https://host/m.pt: refused"
    assert str(pickle.loads(pickle.dumps(named))) == str(named)


def test_errors_are_importable_from_one_place() -> None:
    for cls in [ModelCacheError, *ALL]:
        assert getattr(modelcache, cls.__name__) is cls
        assert cls.__module__ == "modelcache.errors"


def test_docs_errors_page_example_runs(
    model_server: ModelServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = run_python_blocks("errors.md", model_server.url)
    assert isinstance(namespace["cache"], Cache)
    out = capsys.readouterr().out
    assert "whisper-tiny" in out
    assert "404" in out


def test_docs_errors_page_lists_the_whole_hierarchy() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    for cls in [ModelCacheError, *ALL]:
        assert cls.__name__ in text
        assert f"### `{cls.__name__}`" in text or cls is ModelCacheError

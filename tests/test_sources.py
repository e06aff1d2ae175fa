"""Sources: parsing, cache keys that ignore signatures, redaction of everything shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelcache._sources import Source, parse_hf_url, parse_sources, redact

SIGNED = (
    "https://bob:pa55word@Bucket.S3.amazonaws.com:443/models/tiny.pt"
    "?X-Amz-Signature=abcdef123456&X-Amz-Credential=AKIAXYZ&versionId=7"
)


def test_redact_masks_userinfo_and_query_values() -> None:
    shown = redact(f"failed to GET {SIGNED} (timeout)")
    for secret in ("pa55word", "bob", "abcdef123456", "AKIAXYZ"):
        assert secret not in shown
    assert "https://***@Bucket.S3.amazonaws.com:443/models/tiny.pt?" in shown
    assert shown.endswith("(timeout)")
    assert redact("no url here") == "no url here"


def test_an_http_error_naming_a_bare_signed_path_masks_its_query() -> None:
    # urllib3 names a request by its path alone in some messages ("Max retries exceeded with
    # url: /models/tiny.pt?X-Amz-Signature=..."): no scheme for redact to find
    import urllib3

    from modelcache._readers import send
    from modelcache._retry import TransientError

    class Refusing:
        def request(self, method: str, url: str, **kwargs: object) -> None:
            path = url.split("amazonaws.com:443", 1)[1]
            raise urllib3.exceptions.MaxRetryError(None, path, None)  # type: ignore[arg-type]

    with pytest.raises(TransientError) as caught:
        send(Refusing(), "GET", SIGNED, headers={})
    assert "Max retries exceeded with url: /models/tiny.pt?X-Amz-Signature=" in str(caught.value)
    for secret in ("abcdef123456", "AKIAXYZ"):
        assert secret not in str(caught.value)


def test_source_shows_only_the_redacted_form() -> None:
    source = Source.parse(SIGNED)
    assert str(source) == source.redacted
    assert "pa55word" not in repr(source)
    assert "abcdef123456" not in repr(source)
    assert source.name == "tiny.pt"
    assert source.protocol == "https"
    assert not source.is_local


def test_key_ignores_credentials_signatures_and_default_ports() -> None:
    resigned = SIGNED.replace("abcdef123456", "zzzzzz").replace("bob:pa55word@", "")
    other_version = SIGNED.replace("versionId=7", "versionId=8")
    assert Source.parse(SIGNED).key == Source.parse(resigned).key
    assert Source.parse(SIGNED).key == Source.parse(resigned.replace(":443", "")).key
    assert Source.parse(SIGNED).key != Source.parse(other_version).key
    assert "versionId=7" in Source.parse(SIGNED).normalized
    assert "Signature" not in Source.parse(SIGNED).normalized


def test_scrub_removes_secrets_from_third_party_messages() -> None:
    source = Source.parse(
        "s3://bucket/model.bin", {"s3": {"key": "AKIA1234", "secret": "verysecret"}}
    )
    assert source.storage_options == {"key": "AKIA1234", "secret": "verysecret"}
    text = source.scrub("botocore said: bad secret verysecret for key AKIA1234")
    assert "verysecret" not in text
    assert "AKIA1234" not in text


def test_storage_options_are_picked_per_protocol() -> None:
    options = {"s3": {"anon": True}, "https": {"headers": {"X": "1"}}}
    s3, web = parse_sources(["s3://b/m.bin", "https://h/m.bin"], options)
    assert dict(s3.storage_options) == {"anon": True}
    assert dict(web.storage_options) == {"headers": {"X": "1"}}
    flat = parse_sources("s3://b/m.bin", {"anon": True})[0]
    assert dict(flat.storage_options) == {"anon": True}


def test_local_paths(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    for given in (path, str(path), path.as_uri()):
        source = Source.parse(given)
        assert source.is_local
        assert source.local_path == path
        assert source.name == "w.safetensors"
    assert Source.parse(path).key == Source.parse(path.as_uri()).key


def test_mirrors_keep_their_order() -> None:
    sources = parse_sources(["https://a/m.pt", "https://b/m.pt", "/c/m.pt"])
    assert [s.redacted for s in sources] == ["https://a/m.pt", "https://b/m.pt", "/c/m.pt"]


@pytest.mark.parametrize("bad", ["", "   ", []])
def test_empty_sources_are_rejected(bad: str | list[str]) -> None:
    with pytest.raises(ValueError, match="source"):
        parse_sources(bad)


def test_hf_urls() -> None:
    location = parse_hf_url("hf://openai/whisper-tiny@main/model.safetensors")
    assert (location.repo_id, location.revision, location.path) == (
        "openai/whisper-tiny",
        "main",
        "model.safetensors",
    )
    assert parse_hf_url("hf://org/repo").path == ""
    assert Source.parse("hf://org/repo").is_directory
    assert Source.parse("hf://org/repo@v1/sub/w.bin").name == "w.bin"
    with pytest.raises(ValueError, match="hf://"):
        parse_hf_url("hf://only-owner")

"""pytest fixtures for the store tests: servers once per session, a fresh bucket per test.

A test module that uses them says ``pytest_plugins = ["servers.fixtures"]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .hub import HubStandIn
from .olah import OlahServer
from .proxy import FaultProxy
from .stores import GCSBucket, S3Bucket, ServerProcess, start_gcs, start_moto

__all__ = [
    "gcs_bucket",
    "gcs_proxy",
    "gcs_server",
    "hub",
    "moto_server",
    "olah_server",
    "s3_bucket",
    "s3_proxy",
    "store_env",
]


@pytest.fixture
def store_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cloud credentials, endpoints or Hub settings from the developer's shell."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "STORAGE_EMULATOR_HOST",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "HF_TOKEN",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/modelcache-test")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/modelcache-test")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[ServerProcess]:
    """moto's S3 server, one process for the whole session."""
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[ServerProcess]:
    """gcp-storage-emulator, one process for the whole session."""
    server = start_gcs()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(moto_server: ServerProcess, store_env: None) -> S3Bucket:
    """A fresh, empty bucket on the moto server."""
    return S3Bucket(moto_server.endpoint)


@pytest.fixture
def gcs_bucket(gcs_server: ServerProcess, store_env: None) -> GCSBucket:
    """A fresh, empty bucket on the GCS emulator."""
    return GCSBucket(gcs_server.endpoint)


@pytest.fixture(scope="session")
def _s3_proxy(moto_server: ServerProcess) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.endpoint) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def _gcs_proxy(gcs_server: ServerProcess) -> Iterator[FaultProxy]:
    with FaultProxy(gcs_server.endpoint) as proxy:
        yield proxy


@pytest.fixture
def s3_proxy(_s3_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the moto server (faults cleared after the test).

    One proxy serves the session, so the S3 clients behind it (slow to create) are reused.
    """
    _s3_proxy.clear()
    yield _s3_proxy
    _s3_proxy.clear()


@pytest.fixture
def gcs_proxy(_gcs_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the GCS emulator (faults cleared after the test)."""
    _gcs_proxy.clear()
    yield _gcs_proxy
    _gcs_proxy.clear()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, store_env: None) -> Iterator[HubStandIn]:
    """The Hub stand-in, set as ``HF_ENDPOINT``."""
    with HubStandIn() as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
        yield stand_in


@pytest.fixture(scope="session")
def olah_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OlahServer]:
    """olah (a real Hub mirror) serving git repos, one process for the session.

    A test that stops it need not restart it: the next test using it does.
    """
    with OlahServer(tmp_path_factory.mktemp("olah")) as server:
        yield server

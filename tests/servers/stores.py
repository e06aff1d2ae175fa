"""moto's S3 server and gcp-storage-emulator as child processes on 127.0.0.1.

Each runs as a real server process (so a test can kill it); buckets are made per test by the
helpers, which write objects with the clients' own APIs (boto3, gcsfs), never through
modelcache.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GCSBucket", "S3Bucket", "ServerProcess", "free_port", "start_gcs", "start_moto"]

# cloud SDKs must never probe metadata addresses, and gcsfs must not try gRPC first (the
# emulator speaks only JSON over HTTP): set before gcsfs is imported
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("NO_GCE_CHECK", "True")
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

S3_KEY = "modelcache-test-key"
S3_SECRET = "modelcache-test-secret-value"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A server child process and its endpoint."""

    process: subprocess.Popen[bytes]
    endpoint: str

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers)."""
        stop_process(self.process)


def stop_process(process: subprocess.Popen[Any]) -> None:
    """Terminate a server process, and kill it if it lingers more than 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _start(command: list[str], port: int, timeout: float = 60.0) -> ServerProcess:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return ServerProcess(process, f"http://127.0.0.1:{port}")
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{command} did not listen on {port}") from None
            time.sleep(0.05)


def start_moto(port: int | None = None) -> ServerProcess:
    """moto's S3 server (``python -m moto.server``)."""
    port = port or free_port()
    return _start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port)


def start_gcs(port: int | None = None) -> ServerProcess:
    """gcp-storage-emulator, in memory."""
    port = port or free_port()
    binary = shutil.which("gcp-storage-emulator")
    command = [binary] if binary else [sys.executable, "-m", "gcp_storage_emulator"]
    return _start(
        [*command, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"],
        port,
    )


def _bucket_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class S3Bucket:
    """A fresh bucket on an S3 endpoint, with a boto3 client to fill it."""

    endpoint: str
    name: str = field(default_factory=lambda: _bucket_name("models"))

    def __post_init__(self) -> None:
        import boto3

        self.client: Any = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        )
        self.client.create_bucket(Bucket=self.name)

    def options(self, endpoint: str | None = None) -> dict[str, Any]:
        """``storage_options`` for modelcache (through ``endpoint``, e.g. a fault proxy)."""
        return {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": endpoint or self.endpoint}

    def put(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> str:
        """Store ``data`` at ``key``; the ``s3://`` URL."""
        self.client.put_object(Bucket=self.name, Key=key, Body=data, Metadata=metadata or {})
        return self.url(key)

    def get(self, key: str) -> bytes:
        """The object's bytes."""
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def head(self, key: str) -> dict[str, Any]:
        """``HeadObject``."""
        return dict(self.client.head_object(Bucket=self.name, Key=key))

    def delete(self, key: str) -> None:
        """Remove ``key``."""
        self.client.delete_object(Bucket=self.name, Key=key)

    def url(self, key: str) -> str:
        """``s3://<bucket>/<key>``."""
        return f"s3://{self.name}/{key}"


@dataclass
class GCSBucket:
    """A fresh bucket on the GCS emulator, filled with gcsfs."""

    endpoint: str
    name: str = field(default_factory=lambda: _bucket_name("models"))

    def __post_init__(self) -> None:
        import gcsfs

        self.fs: Any = gcsfs.GCSFileSystem(
            endpoint_url=self.endpoint,
            token="anon",
            project="modelcache-test",
            skip_instance_cache=True,
        )
        self.fs.mkdir(self.name)

    def options(self, endpoint: str | None = None) -> dict[str, Any]:
        """``storage_options`` for modelcache."""
        return {
            "endpoint_url": endpoint or self.endpoint,
            "token": "anon",
            "project": "modelcache-test",
        }

    def put(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> str:
        """Store ``data`` at ``key``; the ``gs://`` URL."""
        with warnings.catch_warnings():  # aiohttp: "a large body ... might lock the event loop"
            warnings.simplefilter("ignore", ResourceWarning)
            self.fs.pipe_file(f"{self.name}/{key}", data, metadata=metadata)
        return self.url(key)

    def get(self, key: str) -> bytes:
        """The object's bytes."""
        return bytes(self.fs.cat_file(f"{self.name}/{key}"))

    def url(self, key: str) -> str:
        """``gs://<bucket>/<key>``."""
        return f"gs://{self.name}/{key}"

"""Debian's docker-registry (CNCF distribution 2.8) on 127.0.0.1, open or behind real auth.

- :func:`start_registry` runs ``docker-registry serve`` with a temporary storage directory;
  ``auth="token"`` configures distribution's token auth against a :class:`TokenServer` (a
  small realm in this process that signs JWTs with a key whose certificate is the registry's
  ``rootcertbundle``), ``auth="htpasswd"`` Basic auth from a bcrypt htpasswd file, over TLS
  with a self-signed certificate (:attr:`Registry.ca_file` is its CA).
- The registry is installed with apt when missing (as root); a test run that cannot install
  it fails loudly rather than skipping.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .stores import free_port, stop_process

__all__ = [
    "PASSWORD",
    "USER",
    "Registry",
    "TokenServer",
    "ensure_registry_installed",
    "start_registry",
]

USER = "alice"
PASSWORD = "s3cret-registry-password"
SERVICE = "modelcache-test-registry"
ISSUER = "modelcache-test-issuer"
_BINARY = "docker-registry"


def ensure_registry_installed() -> str:
    """The path of ``docker-registry``, installing Debian's package when it is missing."""
    found = shutil.which(_BINARY)
    if found:
        return found
    for command in (["apt-get", "install", "-y", "docker-registry"],):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, check=False)
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"cannot install docker-registry: {done.stderr[-2000:]}")
    found = shutil.which(_BINARY)
    if not found:
        raise RuntimeError("docker-registry was installed but is not on PATH")
    return found


def _self_signed(directory: Path, name: str) -> tuple[Path, Path, Any]:
    """A self-signed certificate for 127.0.0.1/localhost: ``(cert.pem, key.pem, key)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, (key, cert)


@dataclass
class TokenRequest:
    """What the token server was asked: scopes, whether credentials came, what it granted."""

    scopes: list[str]
    user: str | None
    authorization: str | None
    granted: list[dict[str, Any]] = field(default_factory=list)


class TokenServer:
    """A token realm: anonymous callers may pull, ``USER``/``PASSWORD`` may pull and push."""

    def __init__(self, directory: Path) -> None:
        self.cert_file, _, (self._key, self._cert) = _self_signed(directory, "token-signer")
        self.requests: list[TokenRequest] = []
        self.issued: list[str] = []
        """Every token handed out (tests check none of them is ever shown)."""
        self.lifetime = 300
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def realm(self) -> str:
        """The realm URL the registry names in its challenges."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _token(self, user: str | None, scopes: list[str]) -> tuple[str, list[dict[str, Any]]]:
        import jwt
        from cryptography.hazmat.primitives import serialization

        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = {"pull", "push"} if user == USER else {"pull"}
            granted = sorted(set(actions.split(",")) & allowed)
            if kind == "repository" and granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": SERVICE,
            "exp": now + self.lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        der = self._cert.public_bytes(serialization.Encoding.DER)
        headers = {"x5c": [base64.b64encode(der).decode()]}
        token = jwt.encode(claims, self._key, algorithm="RS256", headers=headers)
        self.issued.append(token)
        return token, access

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                scopes = [s for value in query.get("scope", []) for s in value.split(" ")]
                authorization = self.headers.get("Authorization")
                user = None
                if authorization:
                    scheme, _, encoded = authorization.partition(" ")
                    name, _, password = base64.b64decode(encoded).decode().partition(":")
                    if scheme.lower() != "basic" or (name, password) != (USER, PASSWORD):
                        record = TokenRequest(scopes, None, authorization)
                        server.requests.append(record)
                        self._answer(401, {"details": "bad credentials"})
                        return
                    user = name
                token, granted = server._token(user, scopes)
                server.requests.append(TokenRequest(scopes, user, authorization, granted))
                self._answer(200, {"token": token, "expires_in": server.lifetime})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


@dataclass
class Registry:
    """A running docker-registry."""

    process: subprocess.Popen[bytes]
    root: Path
    port: int
    scheme: str
    log_file: Path
    ca_file: Path | None = None
    token_server: TokenServer | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, the registry part of an ``oci://`` URL."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:<port>``."""
        return f"{self.scheme}://{self.address}"

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes."""
        hex_digest = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"

    def log_lines(self) -> Iterator[dict[str, Any]]:
        """The registry's JSON log records so far."""
        for line in self.log_file.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    yield json.loads(line)
                except ValueError:
                    continue

    def stop(self) -> None:
        """Stop the registry (and its token server)."""
        stop_process(self.process)
        if self.token_server is not None:
            self.token_server.close()


def start_registry(directory: Path, *, auth: str | None = None) -> Registry:
    """Run docker-registry on a free port with storage under ``directory``.

    ``auth``: ``None`` (open, plain http), ``"token"`` (Bearer tokens from a
    :class:`TokenServer`, plain http) or ``"htpasswd"`` (Basic, over TLS).
    """
    binary = ensure_registry_installed()
    directory.mkdir(parents=True, exist_ok=True)
    root = directory / "storage"
    port = free_port()
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  formatter: json",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {root}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        f"  secret: {uuid.uuid4().hex}",
    ]
    scheme = "http"
    ca_file = None
    token_server = None
    if auth == "token":
        token_server = TokenServer(directory)
        lines += [
            "auth:",
            "  token:",
            f"    realm: {token_server.realm}",
            f"    service: {SERVICE}",
            f"    issuer: {ISSUER}",
            f"    rootcertbundle: {token_server.cert_file}",
        ]
    elif auth == "htpasswd":
        import bcrypt

        htpasswd = directory / "htpasswd"
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
        htpasswd.write_text(f"{USER}:{hashed}\n")
        cert, key, _ = _self_signed(directory, "registry")
        ca_file = cert
        scheme = "https"
        lines += [
            "  tls:",
            f"    certificate: {cert}",
            f"    key: {key}",
            "auth:",
            "  htpasswd:",
            "    realm: modelcache-test",
            f"    path: {htpasswd}",
        ]
    elif auth is not None:
        raise ValueError(f"unknown auth {auth!r}")
    config = directory / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    log_file = directory / "registry.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    registry = Registry(process, root, port, scheme, log_file, ca_file, token_server)
    _wait_ready(registry)
    return registry


def _wait_ready(registry: Registry, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        if registry.process.poll() is not None:
            raise RuntimeError(
                f"docker-registry exited with {registry.process.returncode}: "
                f"{registry.log_file.read_text(errors='replace')[-2000:]}"
            )
        try:
            socket.create_connection(("127.0.0.1", registry.port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                registry.stop()
                raise RuntimeError("docker-registry did not listen in time") from None
            time.sleep(0.05)

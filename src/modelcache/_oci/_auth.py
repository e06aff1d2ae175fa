"""Registry credentials and the token dance of the distribution spec, secrets kept out of sight.

Where credentials come from, first found wins (as ``oras`` and ``skopeo`` look):

1. ``storage_options={"oci": {"username": ..., "password": ...}}``;
2. the Docker config, ``$DOCKER_CONFIG/config.json`` else ``~/.docker/config.json``: the
   registry's ``credHelpers`` entry, else its ``auths`` entry (``auth``: base64 of
   ``user:password``, or ``username``/``password``, or an ``identitytoken``), else ``credsStore``.
   A credential helper is the ``docker-credential-<name>`` program ``docker login`` configured.

How they are used: a request goes out with the Authorization header cached for its scope, if
any. A ``401`` names the scheme in ``WWW-Authenticate``: ``Basic`` is answered with the
credentials; ``Bearer realm=...,service=...,scope=...`` with a token from the realm (asked
anonymously when there are no credentials, as for public images, with Basic credentials or an
identity token otherwise), cached per scope until it expires.

Secrets (passwords, tokens, the Basic header) never reach a log line, an error or a ``repr``:
:meth:`Authenticator.scrub` masks every one this registry's requests used.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from modelcache import _config as config
from modelcache._retry import retryable_status
from modelcache._sources import redact
from modelcache._transfer import FatalError, TransientError

__all__ = [
    "Authenticator",
    "Challenge",
    "Credentials",
    "Send",
    "credentials_for",
    "docker_config_path",
    "merge_scopes",
    "parse_challenge",
    "pull_scope",
    "push_scope",
]

log = logging.getLogger("modelcache")

Send = Callable[
    [str, str, Mapping[str, str], "bytes | None"], "tuple[int, Mapping[str, str], bytes]"
]
"""``send(method, url, headers, body) -> (status, headers, body)``: one plain HTTP exchange."""

_MASK = "***"
_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
_TOKEN_MARGIN = 10.0  # seconds before its expiry a token is no longer sent
_DEFAULT_LIFETIME = 60.0  # the token spec's default ``expires_in``
_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_HELPER_TIMEOUT = 30.0


def pull_scope(repository: str) -> str:
    """The token scope to read ``repository``."""
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    """The token scope to write ``repository``."""
    return f"repository:{repository}:pull,push"


def merge_scopes(scopes: Iterable[str]) -> list[str]:
    """One scope per resource with the union of its actions (``repository:a:pull,push``)."""
    actions: dict[str, set[str]] = {}
    for scope in scopes:
        resource, sep, wanted = scope.rpartition(":")
        if not sep or not resource:
            continue
        actions.setdefault(resource, set()).update(a for a in wanted.split(",") if a)
    return [f"{resource}:{','.join(sorted(acts))}" for resource, acts in sorted(actions.items())]


@dataclass(frozen=True)
class Credentials:
    """A user name and password, or an identity (refresh) token; never shown by ``repr``."""

    username: str = field(repr=False)
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)
    origin: str = "storage_options"
    """Where they came from, for messages: ``storage_options``, the Docker config, a helper."""

    def secrets(self) -> list[str]:
        """Every string to mask in text shown to people."""
        found = [s for s in (self.password, self.identity_token) if s and len(s) >= 3]
        if self.password:
            found.append(_basic(self.username, self.password))
        return found


def _basic(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    directory = config.env("DOCKER_CONFIG")
    return (Path(directory) if directory else Path.home() / ".docker").expanduser() / "config.json"


def credentials_for(registry: str, options: Mapping[str, Any]) -> Credentials | None:
    """The credentials for ``registry`` (``host[:port]``): the options', else Docker's."""
    username, password = options.get("username"), options.get("password")
    if username is not None or password is not None:
        if not isinstance(username, str) or not isinstance(password, str):
            raise FatalError("storage_options 'username' and 'password' go together, as strings")
        return Credentials(username, password)
    return _from_docker_config(registry)


def _config_key(key: str) -> str:
    """``https://host:port/v1/`` and ``host:port`` both name ``host:port``."""
    if "://" in key:
        key = urlsplit(key).netloc or key
    return key.split("/", 1)[0].lower()


def _from_docker_config(registry: str) -> Credentials | None:
    path = docker_config_path()
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise FatalError(f"cannot read the Docker config {path}: {type(error).__name__}") from None
    if not isinstance(document, Mapping):
        return None
    names = (
        {registry, "index.docker.io", _HUB_CONFIG_KEY} if registry == "docker.io" else {registry}
    )
    names = {_config_key(n) for n in names}
    helpers = document.get("credHelpers")
    if isinstance(helpers, Mapping):
        for key, helper in helpers.items():
            if _config_key(str(key)) in names and isinstance(helper, str):
                return _from_helper(helper, _server_url(registry))
    auths = document.get("auths")
    if isinstance(auths, Mapping):
        for key, entry in auths.items():
            if _config_key(str(key)) in names and isinstance(entry, Mapping):
                found = _from_auth_entry(entry, path)
                if found is not None:
                    return found
    store = document.get("credsStore")
    if isinstance(store, str) and store:
        return _from_helper(store, _server_url(registry))
    return None


def _server_url(registry: str) -> str:
    return _HUB_CONFIG_KEY if registry == "docker.io" else registry


def _from_auth_entry(entry: Mapping[str, Any], path: Path) -> Credentials | None:
    origin = f"Docker config {path}"
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials("", "", identity_token=token, origin=origin)
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            username, sep, password = base64.b64decode(encoded).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise FatalError(f"the Docker config {path} has an 'auth' that is not base64") from None
        if not sep:
            raise FatalError(f"the Docker config {path} has an 'auth' without user:password")
        return Credentials(username, password, origin=origin)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str):
        return Credentials(name, secret, origin=origin)
    return None


def _from_helper(helper: str, server: str) -> Credentials | None:
    """Ask ``docker-credential-<helper> get`` (the protocol ``docker login`` set up)."""
    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run(
            [program, "get"],
            input=server,
            capture_output=True,
            text=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FatalError(f"credential helper {program} failed: {type(error).__name__}") from None
    if done.returncode != 0:
        if "credentials not found" in done.stdout.lower() + done.stderr.lower():
            return None
        raise FatalError(f"credential helper {program} failed (exit {done.returncode})")
    try:
        answer = json.loads(done.stdout)
        username, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError):
        raise FatalError(f"credential helper {program} gave an answer that is not JSON") from None
    origin = f"credential helper {program}"
    if username == "<token>":
        return Credentials("", "", identity_token=secret, origin=origin)
    return Credentials(username, secret, origin=origin)


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header: ``scheme`` lowercased, its parameters."""

    scheme: str
    params: Mapping[str, str]

    @property
    def scopes(self) -> list[str]:
        """The scopes the registry asks for (space-separated in one ``scope`` parameter)."""
        return self.params.get("scope", "").split()


def parse_challenge(header: str | None) -> Challenge | None:
    """``Bearer realm="...",service="...",scope="..."`` or ``Basic realm="..."``; else None."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for name, value in _PARAM.findall(rest):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[name.lower()] = value
    return Challenge(scheme.lower(), params)


@dataclass
class _Token:
    header: str
    expires: float


class Authenticator:
    """The Authorization header for each request to one registry.

    Args:
        registry: ``host[:port]`` (for messages and credential look-up).
        credentials: what to log in with, or ``None`` (anonymous).
        send: one plain HTTP exchange, used to ask token realms.
    """

    def __init__(self, registry: str, credentials: Credentials | None, send: Send) -> None:
        self._registry = registry
        self._credentials = credentials
        self._send = send
        self._lock = threading.Lock()
        self._tokens: dict[str, _Token] = {}  # scope -> the token that grants it
        self._basic = False  # the registry asked for Basic: send it with every request
        self._secrets: set[str] = set(credentials.secrets() if credentials else ())

    def header(self, scope: str) -> str | None:
        """The Authorization header value to send with a request needing ``scope``, if any."""
        with self._lock:
            token = self._tokens.get(scope)
            if token is not None and token.expires > time.monotonic():
                return token.header
            if self._basic and self._credentials is not None:
                return f"Basic {_basic(self._credentials.username, self._credentials.password)}"
        return None

    def answer(self, challenge_header: str | None, scope: str, sent: str | None) -> bool:
        """Meet a ``401``'s challenge for ``scope``; True when a retry may now succeed.

        ``sent``: the Authorization header the refused request carried (a retry with the same
        one would be refused again). Raises :class:`FatalError` when the registry refuses.
        """
        challenge = parse_challenge(challenge_header)
        if challenge is None:
            return False
        if challenge.scheme == "basic":
            if self._credentials is None or not self._credentials.password:
                raise FatalError(self.refusal(), 401)
            with self._lock:
                self._basic = True
            return self.header(scope) != sent
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return False
        asked = {*scope.split(), *challenge.scopes}
        token = self._fetch_token(challenge, merge_scopes(asked))
        with self._lock:
            self._tokens[scope] = token
            for each in asked:
                self._tokens[each] = token
        return token.header != sent

    def scrub(self, text: str) -> str:
        """``text`` with every credential and token this registry used masked."""
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
            text = text.replace(secret, _MASK)
        return redact(text)

    def refusal(self) -> str:
        """Why the registry refuses: no credentials, or these credentials (never shown)."""
        if self._credentials is None:
            return (
                f"{self._registry} requires credentials: pass storage_options={{'oci': "
                "{'username': ..., 'password': ...}} or log in with docker/oras"
            )
        return f"{self._registry} refused the credentials from {self._credentials.origin}"

    def _fetch_token(self, challenge: Challenge, scopes: list[str]) -> _Token:
        realm = challenge.params["realm"]
        if urlsplit(realm).scheme not in ("http", "https"):
            raise FatalError(f"{self._registry} named a token realm that is not http(s)")
        query: list[tuple[str, str]] = []
        if "service" in challenge.params:
            query.append(("service", challenge.params["service"]))
        headers = {"Accept": "application/json"}
        credentials = self._credentials
        if credentials is not None and credentials.identity_token:
            # OAuth2 refresh-token grant (what ``docker login`` stores for some registries)
            form = [*query, *(("scope", s) for s in scopes)]
            form += [
                ("grant_type", "refresh_token"),
                ("client_id", "modelcache"),
                ("refresh_token", credentials.identity_token),
            ]
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            status, _, body = self._send("POST", realm, headers, urlencode(form).encode())
        else:
            query += [("scope", s) for s in scopes]
            if credentials is not None and credentials.password:
                headers["Authorization"] = (
                    f"Basic {_basic(credentials.username, credentials.password)}"
                )
            sep = "&" if "?" in realm else "?"
            status, _, body = self._send("GET", realm + sep + urlencode(query), headers, None)
        if status in (401, 403):
            raise FatalError(self.refusal(), status)
        if retryable_status(status):
            raise TransientError(f"the token service of {self._registry} answered HTTP {status}")
        if status != 200:
            raise FatalError(
                f"the token service of {self._registry} answered HTTP {status}", status
            )
        try:
            answer = json.loads(body)
            value = answer.get("token") or answer.get("access_token")
            lifetime = float(answer.get("expires_in") or _DEFAULT_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            value = None
        if not isinstance(value, str) or not value:
            raise FatalError(f"the token service of {self._registry} sent no token")
        with self._lock:
            self._secrets.add(value)
        log.debug("oci: got a token for %s (%s)", self._registry, " ".join(scopes))
        expires = time.monotonic() + max(0.0, lifetime - _TOKEN_MARGIN)
        return _Token(f"Bearer {value}", expires)

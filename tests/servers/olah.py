"""olah, a real self-hosted Hub mirror, serving git repos we build on 127.0.0.1.

olah (PyPI) answers huggingface_hub's routes; offline, it serves the git repos found under its
``mirrors-path`` as ``<mirrors-path>/<type>s/<org>/<repo>`` (read with GitPython). Large files
are git-lfs pointer files whose objects sit in ``.git/lfs/objects/<aa>/<bb>/<sha256>``, as
``git lfs`` leaves them; git-lfs itself is not needed: :func:`git_repo` writes the pointers and
the objects with plain git.

:class:`OlahServer` starts ``olah-cli -c CONFIG`` as a child process (a test can stop it) and
fails loudly when it cannot start: a test against olah never skips.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from .stores import free_port, stop_process

__all__ = [
    "LFS_THRESHOLD",
    "OlahServer",
    "git_repo",
    "git_tag",
    "lfs_object",
    "lfs_pointer",
    "tamper_lfs_object",
]

LFS_THRESHOLD = 1024
"""Files of at least this many bytes are committed as git-lfs pointers."""

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "modelcache tests",
    "GIT_AUTHOR_EMAIL": "tests@modelcache.invalid",
    "GIT_COMMITTER_NAME": "modelcache tests",
    "GIT_COMMITTER_EMAIL": "tests@modelcache.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file of an object (what git stores in place of the content)."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args],
        env={**os.environ, **_GIT_ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def git_repo(
    directory: Path,
    files: Mapping[str, bytes | Path],
    *,
    branch: str = "main",
    message: str = "add files",
    lfs_threshold: int = LFS_THRESHOLD,
) -> str:
    """Commit ``files`` (relative path -> bytes or a file to copy) on ``branch``; the commit.

    A repo is created at ``directory`` when there is none; every call is one more commit of the
    whole tree. Files of ``lfs_threshold`` bytes or more are committed as git-lfs pointers with
    their objects under ``.git/lfs/objects`` (hard-linked from a given file when possible).
    """
    if not (directory / ".git").is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        _git(directory, "init", "-q", "-b", branch)
    else:
        _git(directory, "checkout", "-q", "-B", branch)
    for existing in _git(directory, "ls-files", "-z").split("\0"):
        if existing:
            (directory / existing).unlink()
    for relative, content in sorted(files.items()):
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        size = content.stat().st_size if isinstance(content, Path) else len(content)
        if size < lfs_threshold:
            data = content.read_bytes() if isinstance(content, Path) else content
            target.write_bytes(data)
            continue
        if isinstance(content, Path):
            sha256 = _file_sha256(content)
        else:
            sha256 = hashlib.sha256(content).hexdigest()
        stored = lfs_object(directory, sha256)
        if not stored.exists():
            stored.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                try:
                    os.link(content, stored)
                except OSError:
                    shutil.copyfile(content, stored)
            else:
                stored.write_bytes(content)
        target.write_bytes(lfs_pointer(sha256, size))
    _git(directory, "add", "-A")
    _git(directory, "commit", "-q", "--allow-empty", "-m", message)
    return _git(directory, "rev-parse", "HEAD")


def git_tag(directory: Path, name: str, commit: str) -> None:
    """Point the tag ``name`` at ``commit`` (moving it if it exists)."""
    _git(directory, "tag", "-f", name, commit)


def lfs_object(directory: Path, sha256: str) -> Path:
    """Where the repo at ``directory`` keeps the LFS object ``sha256``."""
    return directory / ".git" / "lfs" / "objects" / sha256[:2] / sha256[2:4] / sha256


def tamper_lfs_object(directory: Path, sha256: str, data: bytes) -> None:
    """Make the repo serve ``data`` for the LFS object ``sha256`` (its pointer unchanged).

    The object is replaced, never written in place: it may be a hard link to a package's file.
    """
    stored = lfs_object(directory, sha256)
    stored.unlink()
    stored.write_bytes(data)


class OlahServer:
    """``olah-cli`` in offline mode on 127.0.0.1, serving the git repos under :attr:`mirrors`.

    Add a repo with :meth:`repo_path` + :func:`git_repo` (olah reads the repos on each request,
    so repos may be added or changed while it runs).
    """

    def __init__(self, root: Path, timeout: float = 60.0) -> None:
        self.root = root
        self.mirrors = root / "mirrors"
        self.mirrors.mkdir(parents=True, exist_ok=True)
        (root / "repos").mkdir(exist_ok=True)
        self.port = free_port()
        self.config = root / "olah.toml"
        self.config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f'repos-path = "{root / "repos"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            "[accessibility]\n"
            "offline = true\n"
        )
        self.log = root / "olah.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.start(timeout)

    @property
    def url(self) -> str:
        """The mirror's endpoint, for ``HF_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    def repo_path(self, repo_id: str, repo_type: str = "model") -> Path:
        """Where olah looks for the git repo of ``repo_id``."""
        return self.mirrors / f"{repo_type}s" / repo_id

    def start(self, timeout: float = 60.0) -> None:
        """Start olah (again) and wait until it answers; raise, with its log, if it cannot."""
        binary = shutil.which("olah-cli") or str(Path(sys.executable).parent / "olah-cli")
        if not Path(binary).exists():
            raise RuntimeError("olah-cli not found: pip install olah (it is in the dev extra)")
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, "-c", str(self.config)],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"olah-cli exited with {self._process.returncode}:\n{self._log_tail()}"
                )
            try:  # any HTTP answer will do (olah's index page is a 500 with some starlettes)
                with urllib.request.urlopen(self.url + "/api/models/-/-/refs", timeout=1.0):
                    return
            except urllib.error.HTTPError:
                return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"olah-cli did not answer on {self.url} within {timeout:.0f}s:\n"
                        f"{self._log_tail()}"
                    ) from None
                time.sleep(0.1)

    def _log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        """Stop olah (kill it if it lingers)."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process)

    @property
    def running(self) -> bool:
        """Whether the olah process is alive."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> OlahServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

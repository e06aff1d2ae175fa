"""The ``modelcache`` command: pre-load, list, verify, delete and mirror cached models.

Commands (``modelcache COMMAND --help`` for each)::

    modelcache fetch SOURCE [--sha256 H]       pre-load one source
    modelcache fetch --registry pkg.mod:attr   pre-load every handle of an app's Registry
    modelcache ls [--json]                     entries with size, source, last use
    modelcache verify [--json]                 re-hash entries; exit 1 if any is corrupt
    modelcache rm KEY [KEY ...]                delete entries (a unique key or sha256 prefix)
    modelcache prune --max-size 10GB           evict least recently used entries
    modelcache clear                           delete everything (also a cache of an old layout)
    modelcache mirror SOURCE DEST              copy a model to your own bucket, volume or
                                               OCI registry (oci://registry/repo:tag)

Exit status: 0 on success, 1 on a failure the message explains, 2 on bad usage. Results go
to stdout (a table for people, JSON with ``--json``); notes, warnings and errors to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from ._hashing import normalize_sha256
from ._sizes import format_size, parse_size
from ._sources import Source
from ._version import __version__
from .cache import Cache, Entry
from .errors import ModelCacheError
from .handle import ModelHandle
from .registry import Registry

__all__ = ["format_age", "format_size", "main", "parse_size"]

PROG = "modelcache"


class Failure(Exception):
    """A failure the message explains: printed on one line, exit status 1."""


# -- values: sizes, ages, digests ---------------------------------------------------------------


def format_age(timestamp: float, now: float | None = None) -> str:
    """How long ago ``timestamp`` was: ``just now``, ``5 min ago``, ``3 days ago``, a date."""
    seconds = (time.time() if now is None else now) - timestamp
    if seconds < 10:
        return "just now"
    for limit, size, unit in ((60, 1, "s"), (3600, 60, "min"), (86400, 3600, "h")):
        if seconds < limit:
            return f"{int(seconds // size)} {unit} ago"
    days = int(seconds // 86400)
    if days < 60:
        return f"{days} day{'s' if days > 1 else ''} ago"
    return time.strftime("%Y-%m-%d", time.localtime(timestamp))


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _sha256_arg(text: str) -> str:
    try:
        digest = normalize_sha256(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    assert digest is not None
    return digest


def _option_arg(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return name.strip(), value


# -- output -------------------------------------------------------------------------------------


class Output:
    """Where results, notes and errors go; ``quiet`` silences the notes."""

    def __init__(self, quiet: bool, out: IO[str] | None = None, err: IO[str] | None = None):
        self.quiet = quiet
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def result(self, text: str = "") -> None:
        """A line of the command's result (stdout)."""
        print(text, file=self.out)

    def json(self, data: Any) -> None:
        """The result as JSON (stdout)."""
        print(json.dumps(data, indent=2), file=self.out)

    def note(self, text: str) -> None:
        """A line for people (stderr), dropped by ``--quiet``."""
        if not self.quiet:
            print(text, file=self.err)

    def error(self, text: str) -> None:
        """An error line (stderr), always shown."""
        print(f"{PROG}: error: {text}", file=self.err)

    def table(
        self, headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
    ) -> None:
        """An aligned table; the last column is cut to the terminal's width on a terminal."""
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers) - 1)]
        limit = shutil.get_terminal_size().columns if self.out.isatty() else None
        for row in [headers, *rows]:
            cells = [
                cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                for i, cell in enumerate(row[:-1])
            ]
            line = "  ".join([*cells, row[-1]]).rstrip()
            if limit is not None and len(line) > limit:
                line = line[: max(limit - 3, 0)] + "..."
            self.result(line)


# -- fetch ----------------------------------------------------------------------------------------


def _cmd_fetch(args: argparse.Namespace, out: Output) -> int:
    if args.registry:
        return _fetch_registry(args, out)
    storage_options = dict(args.storage_option or [])
    cache = _cache(args)
    started = time.monotonic()
    try:
        fetched = cache.fetch_details(args.source, args.sha256, storage_options or None)
    except ValueError as error:
        raise Failure(str(error)) from None
    seconds = time.monotonic() - started
    if args.json:
        out.json(
            {
                "source": fetched.source,
                "path": str(fetched.path),
                "cache_hit": fetched.cache_hit,
                "sha256": fetched.sha256,
                "size": fetched.size,
                "seconds": round(seconds, 3),
            }
        )
        return 0
    out.result(str(fetched.path))
    if Source.parse(args.source).is_local:
        out.note(f"a local path, used in place ({format_size(fetched.size)}): {fetched.source}")
    elif fetched.cache_hit:
        out.note(f"already cached ({format_size(fetched.size)}): {fetched.source}")
    else:
        out.note(f"downloaded {format_size(fetched.size)} in {seconds:.1f}s: {fetched.source}")
    return 0


def _fetch_registry(args: argparse.Namespace, out: Output) -> int:
    """Pre-load every handle of the app's registry, loading no model into memory."""
    # Read by every handle whose cache follows the environment; lazy makes an import-time
    # ``registry.start()`` a no-op, so nothing is loaded.
    if args.cache is not None:
        os.environ["MODELCACHE_HOME"] = str(args.cache)
    if args.offline:
        os.environ["MODELCACHE_OFFLINE"] = "1"
    os.environ["MODELCACHE_STRATEGY"] = "lazy"
    handles = _load_handles(args.registry, args.app_dir)
    if not handles:
        raise Failure(f"{args.registry} holds no model")
    rows: list[list[str]] = []
    report: list[dict[str, Any]] = []
    failed_required = 0
    for handle in handles:
        was_cached = _is_cached(handle)
        started = time.monotonic()
        item: dict[str, Any] = {
            "name": handle.name,
            "source": handle.source,
            "required": handle.required,
            "path": None,
            "cache_hit": was_cached,
            "size": None,
            "error": None,
        }
        try:
            path = handle.fetch()
        except ModelCacheError as error:
            item["error"] = str(error)
            failed_required += handle.required
            level = "error" if handle.required else "warning (optional model)"
            print(f"{PROG}: {level}: {error}", file=out.err)
            rows.append([handle.name, "FAILED", "", handle.source])
        else:
            size = _disk_size(path)
            item.update(path=str(path), size=size, seconds=round(time.monotonic() - started, 3))
            how = (
                "local" if handle.sources[0].is_local else "cached" if was_cached else "downloaded"
            )
            rows.append([handle.name, how, format_size(size), str(path)])
        report.append(item)
    if args.json:
        out.json(report)
    elif not out.quiet:
        out.table(["MODEL", "RESULT", "SIZE", "PATH"], rows, right=[2])
    if failed_required:
        raise Failure(f"{failed_required} of {len(handles)} models could not be pre-loaded")
    return 0


def _is_cached(handle: ModelHandle) -> bool:
    try:
        return handle.cache.lookup([s.url for s in handle.sources], handle.sha256) is not None
    except (ModelCacheError, ValueError, OSError):
        return False


def _disk_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _load_handles(spec: str, app_dir: str) -> list[ModelHandle]:
    """The handles named by ``pkg.module:attr`` (a Registry, a ModelHandle, an iterable of
    handles, or a callable returning one of those)."""
    module_name, _, attr = spec.partition(":")
    directory = str(Path(app_dir).resolve())
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        missing = error.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise Failure(
                f"cannot import {module_name!r} (from {directory}): {error}; "
                "run from the app's directory or pass --app-dir"
            ) from None
        raise _AppError(f"importing {module_name!r} failed") from error
    except Exception as error:
        raise _AppError(f"importing {module_name!r} failed") from error
    for part in attr.split("."):
        if not hasattr(target, part):
            raise Failure(f"{module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if callable(target) and not isinstance(target, (Registry, ModelHandle)):
        try:
            target = target()
        except Exception as error:
            raise _AppError(f"calling {spec} failed") from error
    if isinstance(target, Registry):
        return list(target.values())
    if isinstance(target, ModelHandle):
        return [target]
    if isinstance(target, (list, tuple)) and all(isinstance(h, ModelHandle) for h in target):
        return list(target)
    raise Failure(
        f"{spec} is a {type(target).__name__}; expected a Registry, a ModelHandle, "
        "or a callable returning one"
    )


class _AppError(Failure):
    """The app's own code raised while being imported or called: shown with its traceback."""


# -- ls, verify, rm, prune ---------------------------------------------------------------------


def _cmd_ls(args: argparse.Namespace, out: Output) -> int:
    cache = _cache(args)
    entries = cache.entries()
    if args.json:
        out.json([e.to_dict() for e in entries])
        return 0
    if out.quiet:
        for entry in entries:
            out.result(entry.key)
        return 0
    if not entries:
        out.note(f"no entries in {cache.path}")
        return 0
    now = time.time()
    layered = any(e.read_only for e in entries)
    rows = []
    for entry in entries:
        row = [entry.key[:12], format_size(entry.size), format_age(entry.last_used, now)]
        if layered:
            row.append("read-only" if entry.read_only else "")
        rows.append([*row, entry.source])
    headers = ["KEY", "SIZE", "LAST USED", *(["LAYER"] if layered else []), "SOURCE"]
    out.table(headers, rows, right=[1])
    total = sum(e.size for e in entries)
    out.note(f"{_plural(len(entries), 'entry', 'entries')}, {format_size(total)} in {cache.path}")
    return 0


def _cmd_verify(args: argparse.Namespace, out: Output) -> int:
    cache = _cache(args)
    entries = {e.key: e for e in cache.entries()}
    problems = cache.verify_entries()
    if args.json:
        out.json(
            [
                {
                    "key": p.key,
                    "problem": p.problem,
                    "source": entries[p.key].source if p.key in entries else None,
                    "path": str(entries[p.key].path) if p.key in entries else None,
                }
                for p in problems
            ]
        )
    else:
        bad = {p.key for p in problems}
        rows = [[key[:12], "ok", entry.source] for key, entry in entries.items() if key not in bad]
        rows += [[p.key[:12], "CORRUPT", p.problem] for p in problems]
        if rows and not out.quiet:
            out.table(["KEY", "STATUS", "DETAIL"], rows)
        checked = len(entries | dict.fromkeys(bad))
        out.note(f"{_plural(checked, 'entry', 'entries')} verified, {len(bad)} corrupt")
    if problems:
        raise Failure(
            f"{_plural(len({p.key for p in problems}), 'corrupt entry', 'corrupt entries')}; "
            "delete with `modelcache rm KEY` and fetch again"
        )
    return 0


def _cmd_rm(args: argparse.Namespace, out: Output) -> int:
    cache = _cache(args)
    removed: list[Entry] = []
    failures = 0
    for key in args.keys:
        try:
            entry = cache.entry(key)
            cache.remove(entry.key)
        except (KeyError, ModelCacheError) as error:
            out.error(error.args[0] if isinstance(error, KeyError) else str(error))
            failures += 1
            continue
        removed.append(entry)
        if not args.json:
            out.note(f"removed {entry.key[:12]} ({format_size(entry.size)}): {entry.source}")
    if args.json:
        out.json([e.to_dict() for e in removed])
    if failures:
        raise Failure(f"{_plural(failures, 'entry was', 'entries were')} not removed")
    return 0


def _cmd_prune(args: argparse.Namespace, out: Output) -> int:
    cache = _cache(args)
    evicted = cache.prune(args.max_size)
    kept = [e for e in cache.entries() if not e.read_only]
    held = sum(e.size for e in kept)
    if args.json:
        out.json(
            {
                "evicted": [e.to_dict() for e in evicted],
                "freed": sum(e.size for e in evicted),
                "size": held,
                "max_size": args.max_size,
            }
        )
    else:
        for entry in evicted:
            out.note(
                f"evicted {entry.key[:12]} ({format_size(entry.size)}, last used "
                f"{format_age(entry.last_used)}): {entry.source}"
            )
        out.note(
            f"evicted {_plural(len(evicted), 'entry', 'entries')}, freed "
            f"{format_size(sum(e.size for e in evicted))}; {cache.path} holds "
            f"{format_size(held)} (max {format_size(args.max_size)})"
        )
    if held > args.max_size:
        out.note(f"{PROG}: note: entries in use by running processes were kept")
    return 0


def _cmd_clear(args: argparse.Namespace, out: Output) -> int:
    cache = _cache(args)
    removed = cache.clear()
    if args.json:
        out.json({"removed": removed, "path": str(cache.path)})
    else:
        out.note(f"removed {_plural(removed, 'entry', 'entries')} from {cache.path}")
    return 0


# -- mirror ---------------------------------------------------------------------------------------


def _cmd_mirror(args: argparse.Namespace, out: Output) -> int:
    try:
        from .mirror import mirror
    except ImportError as error:
        raise Failure(f"mirror is not available in this installation: {error}") from None
    if args.cache is not None:
        os.environ["MODELCACHE_HOME"] = str(args.cache)  # the cache the model passes through
    target = Source.parse(args.dest)
    if target.is_local and args.dest.endswith(("/", os.sep)):
        target.local_path.mkdir(parents=True, exist_ok=True)  # "DIR/" means into that directory
    started = time.monotonic()
    try:
        result = mirror(
            args.source,
            args.dest,
            sha256=args.sha256,
            storage_options=dict(args.storage_option or []) or None,
            dest_options=dict(args.dest_option or []) or None,
        )
    except ValueError as error:
        raise Failure(str(error)) from None
    seconds = time.monotonic() - started
    data = _jsonable(result)
    if args.json:
        out.json(data)
        return 0
    if not isinstance(data, dict):
        data = {"dest": str(data if data is not None else args.dest)}
    out.result(str(data.get("dest") or args.dest))
    details = [format_size(data["size"])] if isinstance(data.get("size"), int) else []
    if isinstance(data.get("files"), int) and isinstance(data.get("copied"), int):
        details.append(f"{data['copied']} of {_plural(data['files'], 'file', 'files')} copied")
    if data.get("sha256"):
        details.append(f"sha256 {data['sha256']}")
    suffix = f" ({', '.join(details)})" if details else ""
    out.note(f"mirrored {data.get('source') or args.source} in {seconds:.1f}s{suffix}")
    return 0


def _jsonable(value: Any) -> Any:
    """A mirror result as plain data: dataclasses and objects with ``to_dict`` become dicts."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# -- parser ---------------------------------------------------------------------------------------


def _cache(args: argparse.Namespace) -> Cache:
    return Cache(args.cache, offline=True if getattr(args, "offline", False) else None)


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``modelcache`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Pre-load, list, verify and delete cached model weights.",
        epilog="Environment: MODELCACHE_HOME (the cache), MODELCACHE_READ_ONLY_PATHS, "
        "MODELCACHE_OFFLINE, MODELCACHE_PROGRESS. See `modelcache COMMAND --help`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache",
        metavar="DIR",
        type=Path,
        help="the cache directory (default: $MODELCACHE_HOME, else the user cache directory)",
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", help="print results only: no notes, no progress bars"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log what modelcache does")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the result as JSON")
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument(
        "-o",
        "--storage-option",
        metavar="KEY=VALUE",
        type=_option_arg,
        action="append",
        help="an fsspec option for the source (repeatable; VALUE may be JSON)",
    )
    parents = [common, as_json]

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fetch = commands.add_parser(
        "fetch",
        parents=[*parents, storage],
        help="pre-load a source or an app's models",
        description="Pre-load one source, or every model of an app's Registry, into the cache "
        "without loading anything into memory. Prints the cached path.",
    )
    fetch.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="a URL (https://, s3://, gs://, hf://, oci://) or a local path",
    )
    fetch.add_argument(
        "--sha256",
        type=_sha256_arg,
        metavar="HEX",
        help="the expected sha256; a mismatch caches nothing",
    )
    fetch.add_argument(
        "--registry",
        metavar="MODULE:ATTR",
        help="pre-load every handle of a Registry (or a ModelHandle, or a "
        "callable returning one), e.g. app.models:registry",
    )
    fetch.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="the directory to import --registry's module from (default: .)",
    )
    fetch.add_argument(
        "--offline",
        action="store_true",
        help="use no network: succeed only if everything is already cached "
        "(a start-up check for a pre-loaded volume)",
    )
    fetch.set_defaults(handler=_cmd_fetch, parser=fetch)

    ls = commands.add_parser(
        "ls",
        parents=parents,
        help="list cached entries",
        description="List entries with size, last use and source. With --quiet, print keys only.",
    )
    ls.set_defaults(handler=_cmd_ls)

    verify = commands.add_parser(
        "verify",
        parents=parents,
        help="re-hash entries; exit 1 if any is corrupt",
        description="Re-hash every file of every entry. Exit status 1 if any is corrupt.",
    )
    verify.set_defaults(handler=_cmd_verify)

    rm = commands.add_parser(
        "rm",
        parents=parents,
        help="delete entries",
        description="Delete entries by key or sha256 (a unique prefix will do). "
        "An entry a running process uses is not deleted.",
    )
    rm.add_argument("keys", nargs="+", metavar="KEY")
    rm.set_defaults(handler=_cmd_rm)

    prune = commands.add_parser(
        "prune",
        parents=parents,
        help="evict least recently used entries",
        description="Evict least recently used entries until the cache holds at most "
        "--max-size. Entries a running process uses or writes are never evicted.",
    )
    prune.add_argument(
        "--max-size",
        required=True,
        type=_size_arg,
        metavar="SIZE",
        help="e.g. 10GB, 512MiB, 0 (decimal: KB MB GB TB; binary: KiB MiB GiB TiB)",
    )
    prune.set_defaults(handler=_cmd_prune)

    clear = commands.add_parser(
        "clear",
        parents=parents,
        help="delete every entry",
        description="Delete every entry and blob of the writable cache, whatever version of "
        "modelcache wrote it. Stop the processes that use the cache first.",
    )
    clear.set_defaults(handler=_cmd_clear)

    mirror = commands.add_parser(
        "mirror",
        parents=[*parents, storage],
        help="copy a model to your own bucket, volume or OCI registry",
        description="Copy a model from its origin to DEST (a bucket, a volume, or an OCI "
        "registry's oci://<registry>/<repository>:<tag>, pushed as an artifact of one layer "
        "per file), keeping and checking its sha256.",
    )
    mirror.add_argument("source", metavar="SOURCE")
    mirror.add_argument("dest", metavar="DEST")
    mirror.add_argument(
        "--sha256", type=_sha256_arg, metavar="HEX", help="the expected sha256 of the source"
    )
    mirror.add_argument(
        "--dest-option",
        metavar="KEY=VALUE",
        type=_option_arg,
        action="append",
        help="an fsspec option for DEST (repeatable; VALUE may be JSON)",
    )
    mirror.set_defaults(handler=_cmd_mirror)
    return parser


def _check_usage(args: argparse.Namespace) -> None:
    if args.command != "fetch":
        return
    parser: argparse.ArgumentParser = args.parser
    if args.registry and args.source:
        parser.error("give either SOURCE or --registry, not both")
    if not args.registry and not args.source:
        parser.error("give a SOURCE or --registry MODULE:ATTR")
    if args.registry:
        module, sep, attr = args.registry.partition(":")
        if not sep or not module.strip() or not attr.strip():
            parser.error(f"--registry expects MODULE:ATTR, got {args.registry!r}")
        if args.sha256 or args.storage_option:
            parser.error("--sha256 and --storage-option go with SOURCE, not --registry")


@contextlib.contextmanager
def _logging(verbose: bool, quiet: bool) -> Iterator[None]:
    logger = logging.getLogger("modelcache")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    previous = (logger.level, logger.propagate)
    logger.setLevel(logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_usage(args)
    out = Output(quiet=args.quiet)
    if args.quiet:
        os.environ["MODELCACHE_PROGRESS"] = "0"
    handler: Callable[[argparse.Namespace, Output], int] = args.handler
    try:
        with _logging(args.verbose, args.quiet):
            return handler(args, out)
    except _AppError as error:
        cause = error.__cause__
        if cause is not None:
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=out.err)
        out.error(str(error))
    except (Failure, ModelCacheError) as error:
        out.error(str(error))
    except BrokenPipeError:
        return _broken_pipe()
    except OSError as error:
        out.error(f"{error.strerror or error}" + (f": {error.filename}" if error.filename else ""))
    except KeyboardInterrupt:
        out.error("interrupted; a download resumes where it stopped when run again")
        return 130
    return 1


def _broken_pipe() -> int:
    """stdout was closed early (``modelcache ls | head``): exit quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def run() -> None:
    """Entry point for ``python -m modelcache``."""
    sys.exit(main())

"""The progress bar a fetch draws on stderr (tqdm), when asked or on a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from modelcache import _config as config
from modelcache._transfer import Progress

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(label: str, progress: Progress | None, enabled: bool | None) -> Iterator[Progress]:
    """A progress callback that also draws a bar; ``enabled=None``: ``$MODELCACHE_PROGRESS``
    decides, else only on a terminal."""
    if enabled is None:
        enabled = config.progress_enabled(sys.stderr.isatty())
    if not enabled:
        yield progress or (lambda done, total: None)
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False)

    def report(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if progress is not None:
            progress(done, total)

    try:
        yield report
    finally:
        if bar.total is not None and bar.n >= bar.total:
            bar.refresh()  # draw the finished bar once before it is cleared
        bar.close()

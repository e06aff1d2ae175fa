"""ModelHandle: one model's weights, fetched and loaded once, eagerly, lazily or in the background.

Each handle is a small thread-safe state machine::

    NOT_LOADED -> FETCHING -> LOADING -> READY
                        \\          \\-> FAILED   (the next get() tries again)
    READY -> UNLOADED (unload(), idle_unload)      UNLOADED -> FETCHING ... on the next get()

The strategies differ only in when the work starts: ``eager`` in :meth:`ModelHandle.start`
(blocking, raising), ``lazy`` on the first :meth:`ModelHandle.get`, ``background`` in a daemon
thread started by :meth:`ModelHandle.start`. The work itself always runs in one worker thread
per attempt, so any number of threads and coroutines asking at once cause one fetch and one load.

:meth:`ModelHandle.reload` runs the same load pipeline beside the serving model and swaps the
result in under the lock, so ``get()`` never waits for it and never sees half of it.

The parts, one job each: ``_handle`` (the class and its state machine), ``_pipeline`` (fetch,
load, quantize, warm up), ``_reload``, ``_status``, ``_state`` (the enums), ``_holds`` (which
cached files this process serves) and ``_memory``.
"""

from ._handle import ModelHandle
from ._state import State, Strategy
from ._status import HandleStatus, ReloadStatus, Timings

__all__ = ["HandleStatus", "ModelHandle", "ReloadStatus", "State", "Strategy", "Timings"]

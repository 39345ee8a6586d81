"""Parent process: killing a running attempt for a cancel (``Client.cancel(id,
terminate=True)``, issue 25), reusing what a hard timeout does.

Any thread asks (``DispatcherCore.terminate``: taskorch serve's operator, in a connection's
reader); ``Terminations`` holds the request until the dispatcher thread's next turn, where the
pool kills the worker that runs the attempt (``WorkerPool.terminate``: SIGTERM, then SIGKILL
after ``local_workers.SIGKILL_AFTER``, exactly as at a hard timeout, so a task stuck in C code
with its signals blocked dies all the same). The death comes back as ``AttemptLost`` with a
``Terminated`` error, which the rules end ``cancelled`` (never retried: ``TaskRules``); the
worker is replaced as after any death. A Dask pool restarts the worker process that runs the
attempt (``dask_timeout``: its other running attempts are lost with it, as in a crash).

Accepted race: the attempt may end on its own between the request and the kill. Then nothing
is killed (the pool checks that the worker still runs that attempt) and the task keeps its
own outcome; the caller learns which from the outcome.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskorch._parent.task import WorkItem


class Terminated(Exception):
    """The error an attempt killed for a cancel is lost with (never reaches a caller: the task
    ends cancelled)."""


class Terminations:
    """Attempts to kill, from any thread to the dispatcher thread. ``_lock`` guards
    ``_items`` only; nothing else happens under it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[WorkItem] = []

    def request(self, item: WorkItem) -> None:
        with self._lock:
            self._items.append(item)

    def take(self) -> list[WorkItem]:  # (dispatcher thread)
        with self._lock:
            items, self._items = self._items, []
        return items

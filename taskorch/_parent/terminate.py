"""Parent process: killing a running attempt for a cancel (``Client.cancel(id,
terminate=True)``, issue 25), reusing what a hard timeout does.

Any thread asks (``DispatcherCore.terminate``: taskorch serve's operator, in a connection's
reader); ``Terminations`` holds the request until the dispatcher thread's next turn, where the
pool kills the worker that runs the attempt (``WorkerPool.terminate``: SIGTERM, then SIGKILL
after ``local_workers.SIGKILL_AFTER``, exactly as at a hard timeout, so a task stuck in C code
with its signals blocked dies all the same). The death comes back as ``AttemptLost`` with a
``Terminated`` error, which the rules end ``cancelled`` (never retried: ``TaskRules``); the
worker is replaced as after any death. A Dask pool restarts the worker process that runs the
attempt (``dask_timeout``: its other running attempts run again, not charged).

The asking thread waits for the pool's answer (``TerminateRequest``, at most
``ANSWER_WAIT``): True once the kill is under way (or the attempt ended meanwhile), False if
the pool cannot kill it (a Dask worker without a nanny cannot be restarted: the task runs on),
so that the caller is told at once instead of waiting for an outcome that is not coming.

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


#: How long the asking thread waits for the pool's answer: a local kill answers at the
#: dispatcher's next turn, a Dask pool once the worker is gone or its restart was refused
#: (the nanny waits 4 s for a stuck worker to close, a worker without one refuses at once).
#: Without an answer by then the kill counts as under way: the caller waits for the outcome.
ANSWER_WAIT = 30.0


class TerminateRequest:
    """One terminate: asked by any thread, answered on the dispatcher thread (the first
    answer counts). ``granted``: the kill is under way, or the attempt ended meanwhile (its
    outcome tells which); False: it runs on, nothing can kill it."""

    __slots__ = ("item", "granted", "_answered")

    def __init__(self, item: WorkItem) -> None:
        self.item = item
        self.granted = True
        self._answered = threading.Event()

    def answer(self, granted: bool) -> None:
        if not self._answered.is_set():
            self.granted = granted
            self._answered.set()

    @property
    def answered(self) -> bool:
        return self._answered.is_set()

    def wait(self, timeout: float) -> bool:
        """The answer (True if none came within ``timeout``: see ``ANSWER_WAIT``)."""
        self._answered.wait(timeout)
        return self.granted


class Terminations:
    """Attempts to kill, from any thread to the dispatcher thread, and those not answered yet.
    ``_lock`` guards ``_items`` and ``_asked`` only; nothing else happens under it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[TerminateRequest] = []  # for the dispatcher's next turn
        self._asked: list[TerminateRequest] = []  # not answered (pruned at each request)

    def request(self, item: WorkItem) -> TerminateRequest:
        request = TerminateRequest(item)
        with self._lock:
            self._items.append(request)
            self._asked = [r for r in self._asked if not r.answered] + [request]
        return request

    def take(self) -> list[TerminateRequest]:  # (dispatcher thread)
        with self._lock:
            items, self._items = self._items, []
        return items

    def answer_all(self) -> None:
        """The dispatcher thread ends: whoever still waits is answered (the outcome tells)."""
        with self._lock:
            asked, self._asked, self._items = self._asked, [], []
        for request in asked:
            request.answer(True)

"""Parent process: ``future.cancel()`` of a queued task, for the ``Backlog`` that owns it.

``Cancels`` is the backlog's (``Backlog.cancels``) and works under its lock (``locked()``).
A call waiting in the backlog is cancelled at once; one handed to a worker and not started is
recalled if the dispatcher can (``recalls``): the caller waits for the worker's answer, and
the dispatcher thread picks up the requests (``take_recall_requests``) and answers those it
cannot recall (``refuse``). One that starts first, or answers late, runs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from taskorch._parent.task import CancelRequest, TaskState, WorkItem


class _Owner(Protocol):  # the Backlog, as seen from here
    def locked(self) -> AbstractContextManager[object]: ...

    def wake_dispatcher(self) -> None: ...

    def remove_queued_locked(self, queued: dict[int, WorkItem]) -> list[WorkItem]: ...


class Cancels:
    """Cancels of one backlog's queued tasks (guarded by its lock)."""

    def __init__(self, backlog: _Owner) -> None:
        self._backlog = backlog
        self.recalls = False  # can the dispatcher recall a call to cancel it? (set at connect)
        # Calls handed over that a caller waits to cancel: the dispatcher recalls them.
        self._wanted: list[WorkItem] = []

    def take_recall_requests(self) -> list[WorkItem]:
        """Dispatcher thread: calls handed over that callers wait to cancel, still queued."""
        with self._backlog.locked():
            if not self._wanted:
                return []
            items = [item for item in self._wanted if item.cancel_request is not None
                     and item.state is TaskState.QUEUED]
            self._wanted.clear()
        return items

    def refuse(self, items: list[WorkItem]) -> None:
        """The dispatcher could not recall ``items``: their cancels are refused (they run)."""
        with self._backlog.locked():
            for item in items:
                if item.cancel_request is not None:
                    item.cancel_request.answer_locked(item, False)

    def cancel_queued(self, items: list[WorkItem], wait: float) -> list[WorkItem]:
        """``future.cancel()`` (and ``Executor.shutdown(cancel_futures=True)``): cancel those of
        ``items`` that are queued, and their futures (after the lock is released, in this
        thread: their callbacks run here when called from ``future.cancel()``); returns them.
        A call waiting in the backlog (ready, not due, or waiting in ``waits``) is cancelled at
        once; one handed to a worker and not started is recalled if the dispatcher can, the
        caller waiting up to ``wait`` s for the worker's answer."""
        cancelled: list[WorkItem] = []
        backlog = self._backlog
        with backlog.locked():
            queued = {id(item): item for item in items if item.state is TaskState.QUEUED
                      and item.cancel_request is None}
            if not queued:
                return cancelled
            cancelled = backlog.remove_queued_locked(queued)
            for item in cancelled:
                del queued[id(item)]
            handed = list(queued.values()) if self.recalls else []
            if handed:
                request = CancelRequest(handed)
                self._wanted += handed
        try:
            if handed:
                backlog.wake_dispatcher()
                request.done.wait(wait)
        finally:  # (a KeyboardInterrupt in the wait too: a granted call is ours to resolve)
            if handed:
                with backlog.locked():
                    for item in handed:
                        if item.cancel_request is request:  # unanswered in time: it runs
                            item.cancel_request = None
                    cancelled += request.granted
            for item in cancelled:
                item.future.cancel_now()
        return cancelled

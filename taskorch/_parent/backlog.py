"""Parent process: the bounded backlog and the task ledger, shared by producers and dispatcher.

Producers (any application thread via ``run()``, event loops via ``run_async()``) add
``WorkItem``s; the dispatcher thread takes them for the workers and reports every transition
back here, so the counts and the bound live in one place under one lock.

The lock (``Backlog.lock``, a plain ``threading.Lock``):
- guards ``pending``, every counter, ``closed``/``stop_deadline``, the room waiters, and each
  item's ``state`` and ``worker`` fields;
- is taken by producers once per task and by the dispatcher once per batch of events;
- is never held across IPC, a ``join``, a Future method that runs callbacks, or logging of
  user data: callers collect what to resolve and do it after releasing it.

The bound is exact: ``queued`` counts tasks accepted and not yet started (in ``pending`` or
prefetched by a worker), and ``offer`` checks and increments it under the lock, so no number of
concurrent producers can push it past ``max_backlog``. A slot frees when a worker acknowledges
the start of a task (or the task is cancelled), not when it is handed over.

``reserved`` slots count against the same bound: ``taskorch serve`` holds one for each
submission while its journal record commits (``reserve`` ... ``admit_reserved`` or
``unreserve``), so that a committed task always has its slot. ``recover`` alone may go past
the bound: the tasks a server recovers from its journal were accepted before it died.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, Union

from taskorch._errors import OrchestratorBrokenError, OrchestratorClosedError, QueueFullError
from taskorch._parent.task import CancelRequest, TaskListener, TaskState, WorkItem
from taskorch._stats import Stats

if TYPE_CHECKING:  # asyncio costs ~14 ms to import; only run_async() callers need it, and have it
    import asyncio

    from taskorch._parent.figures import Figures

#: Terminal states and the counter each one increments.
_TERMINAL = {
    TaskState.SUCCEEDED: "succeeded",
    TaskState.FAILED: "failed",
    TaskState.CANCELLED: "cancelled",
    TaskState.ABANDONED: "abandoned",
}


class Backlog:
    def __init__(self, max_backlog: int) -> None:
        self.max_backlog = max_backlog
        self.lock = threading.Lock()
        self.wake_dispatcher: Callable[[], None] = _no_dispatcher_yet
        # Accepted tasks not handed to a worker, oldest first; re-queued ones go to the front.
        self.pending: deque[WorkItem] = deque()
        # True while the dispatcher is known to come back to `pending` without a wakeup (it
        # was woken already, or it left work behind for lack of worker capacity): producers
        # then skip the wakeup syscall. Cleared by the dispatcher when it empties `pending`.
        self.dispatcher_will_look = False
        self.closed = False
        self.broken: str | None = None  # why no worker can be started, once that is so
        self.stop_deadline: float | None = None  # time.monotonic() by which stop() must end
        # Can the dispatcher take back a call handed over and not started, to cancel it? Set
        # once by the orchestrator (the local backend can; see ``cancel_queued``).
        self.recalls_for_cancel = False
        # Calls handed over that a caller waits to cancel: the dispatcher recalls them.
        self.recall_wanted: list[WorkItem] = []
        # Every accepted task not finished, by id, wherever it is (pending, in transit to a
        # worker, held by one, backing off): what a forked child fails at the fork.
        self.unfinished: dict[int, WorkItem] = {}
        # Callers waiting for room, FIFO: run_async() (an asyncio future and its loop) and
        # blocking producers such as map() (a threading.Event, loop None).
        self._room_waiters: deque[tuple[asyncio.AbstractEventLoop | None, _Waiter]] = deque()
        self._last_task_id = 0
        # Slots held for tasks not yet enqueued (see the module docstring); they count in the
        # bound, not in the stats.
        self.reserved = 0
        # Counters (see Stats).
        self.submitted = self.queued = self.running = 0
        self.succeeded = self.failed = self.cancelled = self.abandoned = 0
        self.retried = self.dropped = self.rejected = 0
        self.workers = self.worker_restarts = self.crashes = self.timeouts = 0
        self.breaker_state = "closed"
        # Workers started to replace another, by cause (sums to worker_restarts; for metrics).
        self.restarts_by_cause: dict[str, int] = {}
        # Per-task figures for metrics, once enabled (``figures.enable``); recorded under the lock.
        self.figures: Figures | None = None
        # The orchestrator's listeners to every task's moments (``listeners``; swapped whole,
        # under the lock); called with it held.
        self.listeners: tuple[TaskListener, ...] = ()

    # -- producers -----------------------------------------------------------------------

    def offer(self, item: WorkItem, drop_when_full: bool) -> bool:
        """Accept ``item`` (True), drop it (False), or raise QueueFullError / closed errors."""
        with self.lock:
            if not self._room_or_refuse_locked(drop_when_full):
                return False
            wake = self._accept(item)
        if wake:
            self.wake_dispatcher()
        return True

    def offer_or_wait(
        self, item: WorkItem, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[None] | None:
        """Accept ``item`` (None), or return a future that resolves when there may be room."""
        with self.lock:
            self._check_open()
            if not self._has_room_locked():
                return self._room_waiter_locked(loop)
            wake = self._accept(item)
        if wake:
            self.wake_dispatcher()
        return None

    def offer_blocking(self, item: WorkItem, deadline: float | None) -> bool:
        """Accept ``item`` (True), waiting for room until ``deadline`` (False: timed out)."""
        while True:
            with self.lock:
                self._check_open()
                if self._has_room_locked():
                    wake = self._accept(item)
                    break
                event = threading.Event()
                self._room_waiters.append((None, event))
            remaining = None if deadline is None else deadline - time.monotonic()
            if (remaining is not None and remaining <= 0) or not event.wait(remaining):
                self.forget_waiter(event)
                return False
        if wake:
            self.wake_dispatcher()
        return True

    def reserve(self, drop_when_full: bool) -> bool:
        """Hold one slot (True), or count a drop (False) or raise QueueFullError as offer()
        does. The holder then calls ``admit_reserved`` or ``unreserve``."""
        with self.lock:
            if not self._room_or_refuse_locked(drop_when_full):
                return False
            self.reserved += 1
        return True

    def reserve_or_wait(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None] | None:
        """Hold one slot (None), or return a future that resolves when there may be room."""
        with self.lock:
            self._check_open()
            if not self._has_room_locked():
                return self._room_waiter_locked(loop)
            self.reserved += 1
        return None

    # -- the bound (the lock held) -------------------------------------------------------

    def _has_room_locked(self) -> bool:
        """The bound: queued tasks plus slots held for clients stay under max_backlog."""
        return self.queued + self.reserved < self.max_backlog

    def _room_or_refuse_locked(self, drop_when_full: bool) -> bool:
        """run()'s rule: True if there is room; else count a drop (False) or a rejection
        (QueueFullError). Closed and broken errors first."""
        self._check_open()
        if self._has_room_locked():
            return True
        if drop_when_full:
            self.dropped += 1
            return False
        self.rejected += 1
        raise QueueFullError(self.max_backlog)

    def _room_waiter_locked(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future on ``loop`` that resolves when there may be room (FIFO among waiters)."""
        waiter: asyncio.Future[None] = loop.create_future()
        self._room_waiters.append((loop, waiter))
        return waiter

    def reserve_share(self, limit: int, share: int) -> int:
        """Hold up to ``limit`` slots, at most 1/``share`` of the room left; how many. Never
        raises, never counts a rejection (taskorch serve's credits)."""
        with self.lock:
            if self.closed or self.broken is not None:
                return 0
            room = self.max_backlog - self.queued - self.reserved
            n = max(0, min(limit, room // share))
            self.reserved += n
        return n

    def unreserve(self, n: int = 1) -> None:
        if n <= 0:
            return
        with self.lock:
            self.reserved -= n
            self._wake_room_waiters_locked(n)

    def admit_reserved(self, item: WorkItem) -> None:
        """Enqueue ``item`` in a slot held by ``reserve``; the slot is given back whatever
        happens. Raises OrchestratorClosedError / OrchestratorBrokenError as offer() does."""
        with self.lock:
            self.reserved -= 1
            try:
                self._check_open()
            except BaseException:
                self._wake_room_waiters_locked(1)
                raise
            wake = self._accept(item)
        if wake:
            self.wake_dispatcher()

    def recover(self, item: WorkItem, crashed: bool, fail: bool) -> None:
        """Enqueue a task recovered from a journal, past the bound if need be. ``crashed``: it
        was running when its server died (counted as a crash, and a retry unless ``fail``).
        ``fail``: its attempts are spent; it is counted submitted and failed at once, and the
        caller resolves its future."""
        with self.lock:
            self._check_open()
            if crashed:
                self.crashes += 1
            if not fail:
                self.retried += crashed
                wake = self._accept(item)
            else:
                self._last_task_id += 1
                item.task_id = item.future.task_id = self._last_task_id
                self.submitted += 1
                self.failed += 1
                item.state = TaskState.FAILED
                wake = False
        if wake:
            self.wake_dispatcher()

    def forget_waiter(self, waiter: _Waiter) -> None:
        """A waiting caller gave up: drop its waiter, and pass on a wakeup it received."""
        with self.lock:
            for i, (_, w) in enumerate(self._room_waiters):
                if w is waiter:
                    del self._room_waiters[i]
                    return
            self._wake_room_waiters_locked(1)

    def _check_open(self) -> None:
        if self.closed:
            raise OrchestratorClosedError(
                "the orchestrator was stopped and takes no new tasks; create a new one"
            )
        if self.broken is not None:
            raise OrchestratorBrokenError(self.broken)

    def _accept(self, item: WorkItem) -> bool:
        """Enqueue (lock held); True if the caller must wake the dispatcher after unlocking."""
        self._last_task_id += 1
        item.task_id = item.future.task_id = self._last_task_id
        self.submitted += 1
        self.queued += 1
        item.accepted_at = time.monotonic()
        self.pending.append(item)
        self.unfinished[item.task_id] = item
        for listener in self.listeners:
            listener.accepted(item)
        wake = not self.dispatcher_will_look
        self.dispatcher_will_look = True
        return wake

    # -- state transitions (callers hold the lock) -------------------------------------------

    def start_locked(self, item: WorkItem) -> None:
        """A worker acknowledged the start of ``item``'s first attempt: its slot frees."""
        if item.state is TaskState.QUEUED:
            item.state = TaskState.RUNNING
            self.queued -= 1
            self.running += 1
            if not item.future.done():  # (unless the caller resolved it itself)
                item.future.set_running_or_notify_cancel()  # no callbacks run for RUNNING
            self._wake_room_waiters_locked(1)
            if item.cancel_request is not None:  # it started first: too late to cancel
                item.cancel_request.answer_locked(item, False)

    def finish_locked(self, item: WorkItem, state: TaskState) -> bool:
        """Move ``item`` to a terminal state; the caller resolves its future after unlocking,
        unless this returns True: it ended cancelled while a caller of ``cancel()`` waited,
        and that caller cancels the future itself (before its cancel() returns True)."""
        if item.state is TaskState.QUEUED:
            self.queued -= 1
            self._wake_room_waiters_locked(1)
        elif item.state is TaskState.RUNNING:
            self.running -= 1
        else:
            raise AssertionError(f"{item!r} finished twice")
        item.state = state
        item.worker = None
        self.unfinished.pop(item.task_id, None)
        setattr(self, _TERMINAL[state], getattr(self, _TERMINAL[state]) + 1)
        if state is TaskState.CANCELLED:
            for listener in self.listeners:
                listener.cancelled(item)
            if item.listener is not None:
                item.listener.cancelled(item)
        request = item.cancel_request
        if request is None:
            return False
        granted = state is TaskState.CANCELLED
        request.answer_locked(item, granted)
        return granted

    def cancel_queued(self, items: list[WorkItem], wait: float) -> list[WorkItem]:
        """``future.cancel()`` (and ``Executor.shutdown(cancel_futures=True)``): cancel those of
        ``items`` that are queued, and their futures (after the lock is released, in this
        thread: their callbacks run here when called from ``future.cancel()``); returns them.

        A call waiting in ``pending`` is cancelled at once. One handed to a worker and not
        started is recalled, if the dispatcher can (``recalls_for_cancel``): the caller waits
        up to ``wait`` seconds for the worker's answer (its reader thread answers at once,
        even while a task runs; a worker that dies answers by its death). A call that starts
        first, or whose answer is later than ``wait``, is not cancelled: it runs."""
        cancelled: list[WorkItem] = []
        with self.lock:
            queued = {id(item): item for item in items if item.state is TaskState.QUEUED
                      and item.cancel_request is None}
            if not queued:
                return cancelled
            if len(queued) == 1:  # future.cancel(): no need to rebuild the deque
                (item,) = queued.values()
                try:
                    self.pending.remove(item)
                    cancelled.append(item)
                except ValueError:  # handed over
                    pass
            else:
                kept: deque[WorkItem] = deque()
                for item in self.pending:
                    (cancelled if id(item) in queued else kept).append(item)
                self.pending.clear()
                self.pending.extend(kept)
            for item in cancelled:
                del queued[id(item)]
                self.finish_locked(item, TaskState.CANCELLED)
            handed = list(queued.values()) if self.recalls_for_cancel else []
            if handed:
                request = CancelRequest(handed)
                self.recall_wanted += handed
        try:
            if handed:
                self.wake_dispatcher()
                request.done.wait(wait)
        finally:  # (a KeyboardInterrupt in the wait too: a granted call is ours to resolve)
            if handed:
                with self.lock:
                    for item in handed:
                        if item.cancel_request is request:  # unanswered in time: it runs
                            item.cancel_request = None
                    cancelled += request.granted
            for item in cancelled:
                item.future.cancel_now()
        return cancelled

    def mark_broken(self, reason: str) -> None:
        """No task can run any more: producers and waiters get OrchestratorBrokenError."""
        with self.lock:
            if self.broken is None:
                self.broken = reason
            self._wake_room_waiters_locked(len(self._room_waiters))  # they see `broken`

    def close(self, deadline: float) -> None:
        with self.lock:
            self.closed = True
            if self.stop_deadline is None or deadline < self.stop_deadline:
                self.stop_deadline = deadline
            self._wake_room_waiters_locked(len(self._room_waiters))  # they see `closed`

    def _wake_room_waiters_locked(self, n: int) -> None:
        while n > 0 and self._room_waiters:
            loop, waiter = self._room_waiters.popleft()
            if isinstance(waiter, threading.Event):
                waiter.set()
            else:
                assert loop is not None
                try:
                    loop.call_soon_threadsafe(_deliver_room, self, waiter)
                except RuntimeError:  # that loop is closed: its caller is gone
                    continue
            n -= 1

    # -- snapshots ---------------------------------------------------------------------------

    def stats(self) -> Stats:
        with self.lock:
            return Stats(
                submitted=self.submitted, queued=self.queued, running=self.running,
                succeeded=self.succeeded, failed=self.failed, cancelled=self.cancelled,
                abandoned=self.abandoned, retried=self.retried, dropped=self.dropped,
                rejected=self.rejected, workers=self.workers,
                worker_restarts=self.worker_restarts, crashes=self.crashes,
                timeouts=self.timeouts, breaker_state=self.breaker_state,
            )


def _deliver_room(backlog: Backlog, waiter: asyncio.Future[None]) -> None:
    """On the waiter's loop: wake it, or pass the wakeup on if it was cancelled meanwhile."""
    if waiter.done():
        with backlog.lock:
            backlog._wake_room_waiters_locked(1)
    else:
        waiter.set_result(None)


_Waiter = Union["asyncio.Future[None]", threading.Event]


def _no_dispatcher_yet() -> None:
    raise AssertionError("Backlog.wake_dispatcher was not set")
